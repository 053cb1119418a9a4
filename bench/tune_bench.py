#!/usr/bin/env python3
"""GPU benchmark of `tune`: exhaustive sweep vs the tuner, on one warm machine, GPU capped to 8 GiB.

Run by bench/gpu_tune.sh on the GPU machine (offline; needs python3 with numpy and torch, a CUDA build of
llama-server + llama-fit-params). For each context (default 576 and 32768, f16 KV, margin 0):

  (b) the tuner: `invoke tune` when Invoke and PyYAML are importable, else `python -m provision.tune` (the
      same runner without the config layer); its choice, real probes, fit-params calls and wall time;
  (a) the sweep: every --n-cpu-moe value 0..48, one real probe each (the same probe as the tuner's: the
      rendered llama-server command, a 512-token prompt batch, 32 generated tokens, peak VRAM polled);
      the floor = the smallest value that ran.
  Targets printed as PASS/FAIL: choice runs and floor <= choice <= floor + 1; tuner time <= sweep time / 3;
  at most 3 real probes.

Then the tuner once more at the first context with nothing changed (must reuse its result: no probe), and a
serve + smoke chat request at the long context with the tuner's value (a long prompt, no OOM on the first
batch). The tuner runs before the sweep in each context, after the model file was read once into the page
cache, so neither profits from the other. If the remaining time (--budget-s) cannot afford a full sweep, the
sweep becomes coarse (every 4th value) plus every value from choice-4 to choice+2, and says so.

Everything printed also goes to OUT/bench.log; figures to OUT/tune_bench.json; plots (matplotlib, when
importable; else later with --plot-only OUT/tune_bench.json) to OUT/tune_<ctx>.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from provision.host import Host  # noqa: E402
from provision.tune import probe as P, report, runner as R, search as S  # noqa: E402
from provision.tune.__main__ import serve_settings  # noqa: E402
from provision.tune.local import LocalContext  # noqa: E402

T0 = time.monotonic()
LOG = None


def say(*a) -> None:
    line = " ".join(str(x) for x in a)
    print(line, flush=True)
    if LOG:
        LOG.write(line + "\n")
        LOG.flush()


def elapsed() -> float:
    return time.monotonic() - T0


# --- the VRAM cap ---------------------------------------------------------------------------------------------

class Holder:
    def __init__(self, leave_mib: int, out: Path):
        self.leave, self.ready = leave_mib, out / "holder.ready"
        self.proc = None

    def start(self) -> dict:
        if self.ready.exists():
            self.ready.unlink()
        self.proc = subprocess.Popen([sys.executable, str(REPO / "bench" / "vram_holder.py"), str(self.leave),
                                      str(self.ready), str(os.getpid()), "700"], start_new_session=True)
        for _ in range(1200):
            if self.ready.exists():
                free, total, pid = self.ready.read_text().split()
                return {"free_mib": int(free), "total_mib": int(total), "pid": int(pid)}
            if self.proc.poll() is not None:
                raise SystemExit(f"bench: the VRAM holder exited {self.proc.returncode} (torch with CUDA needed)")
            time.sleep(0.1)
        raise SystemExit("bench: the VRAM holder was not ready within 120 s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# --- the two ways to run the tuner ---------------------------------------------------------------------------

def have_invoke() -> bool:
    try:
        import invoke  # noqa: F401
        import yaml  # noqa: F401
        return True
    except ImportError:
        return False


def run_tuner(a, ctx: int, state: Path, out: Path, *, force: bool, tag: str, draft: str = "") -> tuple[dict, float, str]:
    jpath = out / f"tune_{tag}.json"
    if jpath.exists():
        jpath.unlink()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not draft and (a.tuner == "invoke" or (a.tuner == "auto" and have_invoke() and Path(a.bin_dir).name == "bin")):
        reports = out / f"reports_{tag}"
        argv = [sys.executable, "-m", "invoke", "tune", "--no-plot",
                "--set", f"build.build_dir={Path(a.bin_dir).parent}", "--set", f"models.dir={Path(a.model).parent}",
                "--set", f"models.files.model.filename={Path(a.model).name}", "--set", "serve.draft_model=",
                "--set", f"serve.ctx_size={ctx}", "--set", f"serve.cache_type_k={a.kv}",
                "--set", f"serve.cache_type_v={a.kv}", "--set", "serve.n_gpu_layers=999",
                "--set", f"state_dir={state}", "--set", f"report_dir={reports}", "--set", "tune.margin_mib=0",
                "--set", f"tune.probe_port={a.port}", "--set", f"tune.max_probes={a.max_probes}"]
        if force:
            argv.append("--force")
        how = "invoke tune"
    else:
        argv = [sys.executable, "-m", "provision.tune", "--bin-dir", a.bin_dir, "--model", a.model, "--ctx", str(ctx),
                "--ctk", a.kv, "--ctv", a.kv, "--state-dir", str(state), "--margin", "0", "--port", str(a.port),
                "--max-probes", str(a.max_probes), "--workdir", str(out / "probes" / f"tune_{tag}"),
                "--json", str(jpath), "--prompt-tokens", str(P.prompt_tokens_for(ctx, 32, 512))]
        if draft:
            argv += ["--draft", draft, "--spec-type", a.spec_type, "--ctkd", a.kvd or a.kv, "--ctvd", a.kvd or a.kv]
        if not draft or not a.speed:
            argv.append("--no-speed")
        if force:
            argv.append("--force")
        how = "python -m provision.tune"
    t0 = time.monotonic()
    p = subprocess.run(argv, cwd=str(REPO), env=env, capture_output=True, text=True)
    dt = time.monotonic() - t0
    for line in (p.stdout + p.stderr).splitlines():
        say("    | " + line)
    if how == "invoke tune":
        lj = out / f"reports_{tag}" / "localhost-tune-latest.json"
        if lj.exists():
            shutil.copy(lj, jpath)
    res = json.loads(jpath.read_text()) if jpath.exists() else {"error": f"exit {p.returncode}", "probes": []}
    return res, dt, how


# --- the exhaustive sweep ------------------------------------------------------------------------------------

def sweep_values(n_max: int, choice, affordable: int) -> tuple[list[int], str]:
    full = list(range(0, n_max + 1))
    if len(full) <= affordable or choice is None:
        return full, "full (every value)"
    dense = set(range(max(0, choice - 4), min(n_max, choice + 2) + 1))
    vals = sorted(set(range(0, n_max + 1, 4)) | {n_max} | dense)
    return vals, f"COARSE (time budget): every 4th value + every value {min(dense)}..{max(dense)}"


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _cost(values: list[int], floor: int, t_fail: float, t_ok: float) -> float:
    return sum(t_fail if v < floor else t_ok for v in values)


def sweep(host, a, ctx: int, values: list[int], out: Path, draft: str = "", *, stop_at_failure: bool = False,
          tag: str = "") -> tuple[list[dict], float]:
    """One probe per value, in the order given; with stop_at_failure, the first value that does not run ends it."""
    inp = inputs(a, ctx, out / "unused-state", draft)
    parsed = R._help(host, inp.server)
    ps = P.ProbeSettings(workdir=str(out / "probes" / f"sweep_{ctx}{tag}"), port=a.port, ready_timeout=180,
                         request_timeout=180, prompt_tokens=P.prompt_tokens_for(ctx, 32, 512), gen_tokens=32,
                         vocab=a.vocab)
    rows = []
    t0 = time.monotonic()
    for k in values:
        if elapsed() > a.deadline_s:
            say(f"    sweep ctx {ctx}: DEADLINE ({a.deadline_s:.0f} s) reached: values from {k} on not probed")
            break
        r, raw = P.run_probe(host, k, R.server_argv(inp, parsed, k, drafting=bool(draft)), ps)
        d = vars(r).copy()
        rows.append(d)
        say(f"    sweep ctx {ctx:>6}{tag} k {k:>2}: {r.outcome:<9} peak {str(r.peak_mib):>5} MiB  "
            f"gen {str(r.gen_tps):>7} t/s  prompt {str(r.prompt_tps):>8} t/s  {r.seconds:5.1f} s  {r.detail[:90]}")
        if stop_at_failure and r.outcome != S.OK:
            break
    return rows, time.monotonic() - t0


def inputs(a, ctx: int, state: Path, draft: str = "") -> R.Inputs:
    ns = SimpleNamespace(port=a.port, ctx=ctx, np=1, ngl=999, ctk=a.kv, ctv=a.kv, fa="on", draft=draft,
                         ctkd=a.kvd or a.kv if draft else "f16", ctvd=a.kvd or a.kv if draft else "f16", otd=[],
                         spec_type=a.spec_type)
    return R.Inputs(bin_dir=a.bin_dir, model=a.model, draft=draft, serve=serve_settings(ns), state_dir=str(state),
                    margin_mib=0, probe_port=a.port, speed_check=False)


def floor_of(rows: list[dict]):
    ok = sorted(r["value"] for r in rows if r["outcome"] == S.OK)
    if not ok:
        return None, []
    fl = ok[0]
    holes = [r["value"] for r in rows if r["value"] > fl and r["outcome"] != S.OK]
    return fl, holes


# --- main ----------------------------------------------------------------------------------------------------

def main() -> int:
    global LOG
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin-dir", required=False, default=os.environ.get("LLAMA_BIN", ""))
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--model", default=os.environ.get("SYNTH_MODEL", "/tmp/gpubox-synth/synth-30b-a3b.gguf"))
    ap.add_argument("--cap-mib", type=int, default=8192)
    ap.add_argument("--contexts", default="576,32768")
    ap.add_argument("--kv", default="f16")
    ap.add_argument("--port", type=int, default=18080)
    ap.add_argument("--max-probes", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=510, help="whole-script time budget; sweeps go coarse to fit")
    ap.add_argument("--deadline-s", type=float, default=555, help="no new sweep probe after this many seconds")
    ap.add_argument("--tuner", choices=["auto", "invoke", "module"], default="auto")
    ap.add_argument("--smoke-chars", type=int, default=4000)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--plot-only", help="draw the plots of an earlier tune_bench.json and exit")
    ap.add_argument("--draft", default="", help="the assistant (MTP head) GGUF: the tuner and sweep run once with it")
    ap.add_argument("--spec-type", default="mtp", help="with --draft: mtp (the assistant head) or draft")
    ap.add_argument("--kvd", default="", help="the head's KV cache type (default: --kv)")
    ap.add_argument("--modes", default="", help="comma list of mtp,none: with the head and without drafting "
                    "(default: mtp,none with --draft, else none)")
    ap.add_argument("--sweep", choices=["full", "window"], default="full",
                    help="window: one probe per value from the tuner's choice + 4 down to the first that fails")
    ap.add_argument("--no-speed", dest="speed", action="store_false", help="skip the tuner's MTP speed check")
    ap.add_argument("--no-rerun", dest="rerun", action="store_false", help="skip the re-run and the long smoke")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.plot_only:
        return plot_all(json.loads(Path(a.plot_only).read_text()), Path(a.plot_only).parent)
    LOG = open(out / "bench.log", "a")
    if not a.bin_dir or not (Path(a.bin_dir) / "llama-server").exists() or not (Path(a.bin_dir) / "llama-fit-params").exists():
        say(f"bench: llama-server and llama-fit-params are needed in --bin-dir / $LLAMA_BIN (got {a.bin_dir!r})")
        return 2
    host = Host(LocalContext())
    ver = subprocess.run([str(Path(a.bin_dir) / "llama-server"), "--version"], capture_output=True, text=True)
    say("bench: llama-server", ((ver.stdout + ver.stderr).strip().splitlines() or ["?"])[-1])
    g = R.gpu_state(host)
    say(f"bench: {g['name']} driver {g['driver']}, {g['free_mib']}/{g['vram_mib']} MiB free before the cap")

    import synth_moe
    want = synth_moe.parser().parse_args([a.model])
    modes = [m for m in (a.modes or ("mtp,none" if a.draft else "none")).split(",") if m]
    if not Path(a.model).exists():
        info = synth_moe.write(a.model, want)
        say(f"bench: wrote synthetic model {info}")
    else:
        say(f"bench: synthetic model exists: {a.model} ({Path(a.model).stat().st_size / 2**30:.2f} GiB)")
    t = time.monotonic()
    subprocess.run(["cat", a.model], stdout=subprocess.DEVNULL, check=True)
    say(f"bench: read the model once into the page cache in {time.monotonic() - t:.1f} s")

    holder = Holder(a.cap_mib, out)
    data: dict = {"gpu": {k: v for k, v in g.items() if k != "apps"}, "cap_mib": a.cap_mib, "kv": a.kv, "runs": []}
    state = out / "tune-state"
    if state.exists():
        shutil.rmtree(state)
    try:
        hi = holder.start()
        g2 = R.gpu_state(host)
        say(f"bench: VRAM holder pid {hi['pid']}: torch sees {hi['free_mib']} MiB free, nvidia-smi {g2['free_mib']} MiB")
        data["free_after_cap_mib"] = g2["free_mib"]
        contexts = [int(x) for x in a.contexts.split(",") if x]
        t_fail, t_ok = 1.5, 8.0
        for i, (ctx, mode) in enumerate((c, m) for c in contexts for m in modes):
            draft = a.draft if mode == "mtp" else ""
            tag = f"{ctx}" + ("_mtp" if draft else "")
            say(f"\n=== context {ctx}, KV {a.kv}, {'MTP head ' + Path(draft).name if draft else 'no drafting'}, "
                f"margin 0, {g2['free_mib']} MiB free (elapsed {elapsed():.0f} s) ===")
            say("  (b) tuner:")
            res, t_tune, how = run_tuner(a, ctx, state / tag, out, force=True, tag=tag, draft=draft)
            choice = res.get("n_cpu_moe")
            n_max = res.get("n_layers") or 48
            # (a) the sweep: full unless the remaining budget cannot afford it (costs from the tuner's own probes)
            tp = res.get("probes") or []
            t_ok = _mean([p["seconds"] for p in tp if p["outcome"] == S.OK]) or t_ok
            t_fail = _mean([p["seconds"] for p in tp if p["outcome"] != S.OK]) or t_fail
            guess = choice if choice is not None else n_max // 2
            full_cost = _cost(list(range(n_max + 1)), guess, t_fail, t_ok)
            coarse_cost = _cost(sweep_values(n_max, guess, 0)[0], guess, t_fail, t_ok)
            future = (len(contexts) - i - 1) * (30 + coarse_cost) + 60
            room = a.budget_s - elapsed() - future
            if a.sweep == "window" and choice is not None:
                values = list(range(min(n_max, choice + 4), -1, -1))
                smode = f"window: {values[0]} down to the first value that does not run"
            else:
                values, smode = sweep_values(n_max, choice, n_max + 1 if full_cost <= room else 0)
            say(f"  sweep cost estimate: full {full_cost:.0f} s, coarse {coarse_cost:.0f} s; room {room:.0f} s "
                f"(probe ~{t_ok:.1f} s ok, ~{t_fail:.1f} s failing)")
            say(f"  (a) sweep, {smode}: up to {len(values)} values")
            rows, t_sweep = sweep(host, a, ctx, values, out, draft, stop_at_failure=a.sweep == "window",
                                  tag="_mtp" if draft else "")
            rows.sort(key=lambda r: r["value"])
            t_fail = _mean([r["seconds"] for r in rows if r["outcome"] != S.OK]) or t_fail
            t_ok = _mean([r["seconds"] for r in rows if r["outcome"] == S.OK]) or t_ok
            fl, holes = floor_of(rows)
            n_probes = res.get("n_probes")
            ok_choice = choice is not None and fl is not None and fl <= choice <= fl + 1
            chosen_row = next((r for r in rows if r["value"] == choice), None)
            runs = bool(chosen_row and chosen_row["outcome"] == S.OK)
            full_equiv = t_sweep if smode.startswith(("full", "window")) else None
            run = {"ctx": ctx, "drafting": mode, "draft": draft, "sweep_mode": smode, "sweep_values": values, "sweep": rows, "sweep_seconds": round(t_sweep, 1),
                   "floor": fl, "non_monotone": holes, "tuner": how, "tuner_result": res, "tuner_seconds": round(t_tune, 1),
                   "choice": choice, "tuner_probes": n_probes, "fit_params_calls": res.get("fit_params_calls"),
                   "targets": {"choice_runs": runs, "within_one_above_floor": ok_choice,
                               "time_le_third": (t_tune <= t_sweep / 3) if full_equiv else None,
                               "probes_le_3": n_probes is not None and n_probes <= 3}}
            data["runs"].append(run)
            if res.get("speed"):
                run["speed"] = res["speed"]
                say(f"  speed check (tuner): {json.dumps(res['speed'], default=str)[:600]}")
            say(f"  result ctx {ctx} {mode}: sweep floor {fl} ({len(rows)} probes, {t_sweep:.1f} s{'' if full_equiv else ', coarse'})"
                f"; tuner ({how}) chose {choice} with {n_probes} real probes + {res.get('fit_params_calls')} fit-params "
                f"calls in {t_tune:.1f} s (ratio {t_tune / t_sweep:.2f})")
            for k, v in run["targets"].items():
                say(f"    target {k:<24} {'PASS' if v else ('n/a' if v is None else 'FAIL')}")
            if holes:
                say(f"    note: values above the floor that did not run: {holes}")
            est = res.get("estimates") or {}
            pairs = [(int(k), e) for k, e in est.items()]
            for k, e in sorted(pairs):
                r = next((x for x in rows if x["value"] == k and x.get("peak_mib") is not None and x["outcome"] == S.OK), None)
                if r:
                    say(f"    fit-params estimate at {k}: {e} MiB, sweep peak {r['peak_mib']} MiB -> constant {r['peak_mib'] - e} MiB")

        if contexts and a.rerun:
            ctx0 = contexts[0]
            say(f"\n=== re-run the tuner at context {ctx0} with nothing changed (elapsed {elapsed():.0f} s) ===")
            tag0 = f"{ctx0}" + ("_mtp" if modes[0] == "mtp" else "")
            res, t_re, how = run_tuner(a, ctx0, state / tag0, out, force=False, tag=f"{tag0}_again",
                                       draft=a.draft if modes[0] == "mtp" else "")
            data["rerun"] = {"ctx": ctx0, "reused": bool(res.get("reused")), "seconds": round(t_re, 1),
                             "n_cpu_moe": res.get("n_cpu_moe")}
            say(f"  reused: {bool(res.get('reused'))}, --n-cpu-moe {res.get('n_cpu_moe')}, {t_re:.1f} s")

            long = max(contexts)
            run_long = next(r for r in data["runs"] if r["ctx"] == long and r["drafting"] == "none")
            k = run_long["choice"]
            if k is not None:
                say(f"\n=== serve + smoke at the full context {long} with --n-cpu-moe {k} (elapsed {elapsed():.0f} s) ===")
                inp = inputs(a, long, state)
                parsed = R._help(host, inp.server)
                argv = R.server_argv(inp, parsed, k, drafting=False)
                say("  command: " + " ".join(argv))
                text = smoke_text(a.smoke_chars)
                ps = P.ProbeSettings(workdir=str(out / "probes" / "smoke"), port=a.port, ready_timeout=180,
                                     request_timeout=240, vocab=a.vocab)
                r, raw = P.run_probe(host, k, argv, ps, request=P.chat_request(64, text))
                try:
                    t = json.loads(raw.response).get("timings", {})
                except ValueError:
                    t = {}
                data["smoke"] = dict(vars(r), ctx=long, prompt_n=t.get("prompt_n"), predicted_n=t.get("predicted_n"),
                                     oom_in_log=bool(P.RUN_OOM.search(raw.log) or P.LOAD_OOM.search(raw.log)))
                say(f"  smoke: {r.outcome}, prompt {t.get('prompt_n')} tokens at {r.prompt_tps} t/s, "
                    f"{t.get('predicted_n')} generated at {r.gen_tps} t/s, peak {r.peak_mib} MiB of "
                    f"{g2['free_mib']} free, OOM in log: {data['smoke']['oom_in_log']}  -> "
                    f"{'PASS' if r.outcome == S.OK and not data['smoke']['oom_in_log'] else 'FAIL'}")
    finally:
        holder.stop()
        say(f"bench: VRAM holder stopped; total {elapsed():.0f} s")
        (out / "tune_bench.json").write_text(json.dumps(data, indent=1, default=str))

    say("\n=== summary ===")
    say(f"{'ctx':>6} {'draft':>5} {'sweep':>7} {'floor':>5} {'sweep s':>8} {'tuner':>6} {'choice':>6} {'probes':>6} {'fitp':>5} "
        f"{'tuner s':>8} {'ratio':>6}  targets")
    for r in data["runs"]:
        tg = " ".join(f"{k}={'PASS' if v else ('n/a' if v is None else 'FAIL')}" for k, v in r["targets"].items())
        say(f"{r['ctx']:>6} {r.get('drafting', 'none'):>5} {r['sweep_mode'].split()[0].rstrip(':'):>7} {str(r['floor']):>5} "
            f"{r['sweep_seconds']:>8.1f} {'':>6} {str(r['choice']):>6} {str(r['tuner_probes']):>6} "
            f"{str(r['fit_params_calls']):>5} {r['tuner_seconds']:>8.1f} {r['tuner_seconds'] / max(r['sweep_seconds'], 0.1):>6.2f}  {tg}")
        say(report.table(r["tuner_result"].get("probes") or [], f"  tuner probes at ctx {r['ctx']}:"))
    plot_all(data, out)
    return 0


def smoke_text(n: int) -> str:
    base = ("The model keeps the experts of the last layers in GPU memory and the first ones on the CPU. "
            "Each token picks a few experts per layer; a longer prompt fills the KV cache. ")
    return ("Summarize the following text in one sentence.\n\n" + base * (n // len(base) + 1))[:n]


def plot_all(data: dict, out: Path) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        say(f"bench: no plots here (matplotlib missing); later: python bench/tune_bench.py --plot-only {out / 'tune_bench.json'}")
        return 0
    for r in data.get("runs", []):
        res = r["tuner_result"] or {}
        over = res.get("overhead_mib") or 0
        pred = {int(k): v + over for k, v in (res.get("estimates") or {}).items()}
        path = out / f"tune_{r['ctx']}{'_' + r['drafting'] if r.get('drafting', 'none') != 'none' else ''}.png"
        report.plot(str(path), res.get("probes") or [], free_mib=data.get("free_after_cap_mib") or data["cap_mib"],
                    predicted=pred, chosen=r["choice"],
                    title=f"{data['gpu'].get('name')} capped to {data['cap_mib']} MiB: context {r['ctx']}, KV {data['kv']}, "
                          f"{'MTP' if r.get('drafting') == 'mtp' else 'no drafting'}; "
                          f"sweep floor {r['floor']}, tuner {r['choice']}",
                    extra_series={"sweep": r["sweep"]})
        say(f"bench: plot {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
