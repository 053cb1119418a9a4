"""tune on the target: gather the GPU state, predict with llama-fit-params, verify with real probes.

Every command runs through provision.host.Host (locally under Invoke, over SSH under Fabric, or through
provision.tune.local for the offline benchmark); the decisions are provision.tune.search's pure functions.

    result = tune(host, Inputs(...))     # prints progress; returns the result dict that tune.json stores

Order of work, cheapest first: nvidia-smi (is there a GPU at all? if not: say so, change nothing), the
identities of the files (stat), the stored result (a hit costs nothing more), the GGUF headers (read on the
target by provision/ggufhead.py), fit-params estimates (< 1 s each), then real probes.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ..facts import parse_gpus
from ..host import CommandFailed, cmd
from .. import ggufhead, remote
from . import fitparams, probe as P, search as S, state as ST



class TuneError(Exception):
    """tune cannot go on. Names the cause and the fix."""

    def __init__(self, cause: str, fix: str = "", output: str = ""):
        self.cause, self.fix, self.output = cause, fix, output
        msg = f"tune: {cause}"
        if fix:
            msg += f"\n  fix: {fix}"
        if output:
            msg += "\n  last output:\n" + "\n".join("    " + ln for ln in output.strip().splitlines()[-12:])
        super().__init__(msg)


class NoGPU(TuneError):
    pass


@dataclass
class Inputs:
    bin_dir: str                       # where llama-server and llama-fit-params are (build_dir/bin)
    model: str                         # the model GGUF, resolved on the target
    serve: dict[str, Any]              # cfg["serve"]-shaped settings (ctx_size, cache types, drafting...)
    state_dir: str                     # tune.json lives here
    draft: str = ""                    # the assistant GGUF ("" = no drafting)
    margin_mib: int = 256
    max_probes: int = 3
    prior_overhead_mib: int = 1024
    probe_port: int = 18080
    prompt_tokens: int = 512
    gen_tokens: int = 32
    ready_timeout: int = 600
    request_timeout: int = 300
    workdir: str = "/tmp/gpubox-tune"
    model_sha256: str = ""
    gpu_index: int = 0
    speed_check: bool = True           # with and without the MTP head, at the chosen value
    speed_tokens: int = 128

    @property
    def server(self) -> str:
        return self.bin_dir.rstrip("/") + "/llama-server"

    @property
    def fit_params(self) -> str:
        return self.bin_dir.rstrip("/") + "/llama-fit-params"

    @property
    def drafting(self) -> bool:
        return bool(self.draft) and self.serve.get("spec_type", "none") != "none"


# --- facts on the target ----------------------------------------------------------------------------------

def gpu_state(host, index: int = 0) -> dict[str, Any]:
    """The card tune works on, with its free memory now; NoGPU when none is visible."""
    q = cmd(["nvidia-smi", "--query-gpu=name,compute_cap,memory.total,memory.free,driver_version",
             "--format=csv,noheader,nounits"])
    r = host.run(f"command -v nvidia-smi >/dev/null 2>&1 || {{ echo 'nvidia-smi: command not found' >&2; exit 127; }}; {q}",
                 check=False)
    gpus = parse_gpus(r.stdout or "", r.exited) if r.exited == 0 else []
    if not gpus:
        why = ((r.stderr or "") + (r.stdout or "")).strip().splitlines()
        raise NoGPU(f"no NVIDIA GPU is visible on {host.name} ({why[-1] if why else 'nvidia-smi listed no GPU'}); "
                    "nothing was probed and nothing was changed",
                    "run tune on the GPU box after the driver step and a reboot (`nvidia-smi` must list the card)")
    if index >= len(gpus):
        raise NoGPU(f"GPU index {index} asked, {len(gpus)} visible", "set tune.gpu to an index nvidia-smi lists")
    g = dict(gpus[index])
    apps = host.run(cmd(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                         "--format=csv,noheader,nounits"]), check=False)
    g["apps"] = [ln.strip() for ln in (apps.stdout or "").splitlines() if ln.strip()] if apps.exited == 0 else []
    return g


def file_ids(host, paths: list[str]) -> dict[str, str]:
    """size and mtime of each file ('missing' when absent): cheap identities for the cache key."""
    script = 'for p in "$@"; do if [ -e "$p" ]; then stat -L -c "%s %Y" -- "$p"; else echo missing; fi; done'
    r = host.run(["bash", "-c", script, "stat", *paths], check=False)
    lines = (r.stdout or "").splitlines()
    return {p: (lines[i].strip() if i < len(lines) else "missing") for i, p in enumerate(paths)}


def gguf_summaries(host, paths: list[str]) -> dict[str, dict[str, Any]]:
    r = host.run(remote.argv([ggufhead], "print_summaries", *paths), check=False)
    out: dict[str, dict[str, Any]] = {}
    for line in (r.stdout or "").splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        out[d.get("path", "")] = d
    for p in paths:
        if p not in out:
            raise TuneError(f"could not read the GGUF header of {p} on {host.name} (python3 exit {r.exited})",
                            "python3 must be installed on the target (Fedora: dnf install python3)",
                            (r.stderr or "") + (r.stdout or ""))
        if "error" in out[p]:
            raise TuneError(f"{p}: {out[p]['error']}", "re-download it: invoke models")
    return out


def read_state(host, state_dir: str) -> dict[str, Any]:
    r = host.run(["cat", f"{state_dir.rstrip('/')}/{ST.FILENAME}"], check=False)
    return ST.parse(r.stdout or "") if r.exited == 0 else ST.empty()


def write_state(host, state_dir: str, doc: dict[str, Any]) -> str:
    path = f"{state_dir.rstrip('/')}/{ST.FILENAME}"
    text = ST.dumps(ST.trim(doc))
    try:
        host.write_file(path, text, mode="0644")
    except CommandFailed:          # the state dir is root's (e.g. /var/lib/gpubox)
        host.write_file(path, text, mode="0644", root=True)
    return path


def reusable(hit: dict[str, Any], inp: Inputs) -> bool:
    """A stored result answers this run unless the run wants the MTP speed check and the result has none.

    >>> inp = Inputs(bin_dir="b", model="m", serve={"spec_type": "mtp"}, state_dir="s", draft="head.gguf")
    >>> reusable({"n_cpu_moe": 24}, inp), reusable({"n_cpu_moe": 24, "speed": {"mtp_speedup": 1.2}}, inp)
    (False, True)
    >>> reusable({"n_cpu_moe": 24}, Inputs(bin_dir="b", model="m", serve={}, state_dir="s"))
    True
    """
    return not (inp.drafting and inp.speed_check and not hit.get("speed"))


def _help(host, binary: str):
    try:
        from ..serve import helptext
    except ImportError:
        return None
    r = host.run([binary, "--help"], check=False)
    text = (r.stdout or "") + "\n" + (r.stderr or "")
    if "--model" not in text and "-m," not in text:
        return None
    return helptext.parse(text)


# --- the command lines --------------------------------------------------------------------------------------

def probe_serve(serve: dict[str, Any], k: int, port: int) -> dict[str, Any]:
    """The user's serve settings at --n-cpu-moe k, on the probe port. --mlock/--no-mmap are left out: they
    change host RAM only (and locking 16 GiB per probe is slow); device memory is the same."""
    s = copy.deepcopy(serve)
    # api_key_file left out too: the probe listens on loopback only and its requests carry no key.
    s.update(n_cpu_moe=k, host="127.0.0.1", port=port, mlock=False, mmap=True, api_key_file="")
    return s


def server_argv(inp: Inputs, parsed, k: int, *, drafting: bool) -> list[str]:
    s = probe_serve(inp.serve, k, inp.probe_port)
    draft = inp.draft if drafting else ""
    try:
        from ..serve import render as R
    except ImportError:
        R = None
    if R is not None and parsed is not None:
        try:
            argv = R.render(s, parsed, binary=inp.server, model_path=inp.model, draft_path=draft).argv
        except R.RenderError as e:
            raise TuneError(str(e), "fix the serve settings first (invoke serve --plan shows the command)")
        if _accepts(parsed, "-fit"):
            argv += ["-fit", "off"]           # the values are fixed; skip the fit dry-run at start-up
        return argv
    if drafting:
        raise TuneError("the serve renderer (provision/serve/render.py) is needed to render the assistant's flags",
                        "install the complete gpubox tree")
    argv = [inp.server, "-m", inp.model, "-ngl", str(s["n_gpu_layers"]), "-c", str(s["ctx_size"]),
            "-fa", str(s["flash_attn"]), "-ctk", s["cache_type_k"], "-ctv", s["cache_type_v"],
            "-np", str(s["parallel"]), "--host", "127.0.0.1", "--port", str(inp.probe_port)]
    if k:
        argv += ["-ncmoe", str(k)]
    return argv


def _accepts(parsed, flag: str) -> bool:
    if parsed is None:
        return True
    from ..serve import helptext
    return helptext.accepts(parsed, flag)


# --- the run ------------------------------------------------------------------------------------------------

def tune(host, inp: Inputs, *, force: bool = False, max_ctx: bool = False,
         echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Reuse the cached answer for the same card, binaries, model and settings, else search: estimates with
    llama-fit-params, a few real probes, the overhead constant learned; the choice goes to tune.json."""
    t_start = time.monotonic()
    gpu = _usable_gpu(host, inp, echo)               # raises NoGPU: nothing read, nothing written
    key, fields, mkey = _identity(host, inp, gpu)
    doc = read_state(host, inp.state_dir)
    hit = doc["results"].get(key)
    if hit and not force and not reusable(hit, inp):
        echo("tune: the stored result for these settings has no speed figures (it was tuned without the speed "
             "check): tuning again, with the learned overhead")
    elif hit and not force:
        return _reuse(host, inp, doc, key, gpu, echo)
    ms, extra = _model_facts(host, inp, echo)
    parsed_server, parsed_fit = _help(host, inp.server), _help(host, inp.fit_params)
    q = _question(inp, gpu, ms, extra, doc["overhead"].get(mkey), echo)
    estimate = Estimator(host, inp, parsed_fit)
    ps = _probe_settings(inp, ms)
    probe = Prober(host, inp, parsed_server, ps, echo)
    action, estimates, probes = S.search(q, estimate, probe)
    kn = S.learn(q, estimates, probes)
    for c in kn.corrections:
        echo(f"tune: {c}")
    now = _dt.datetime.now().isoformat(timespec="seconds")
    if kn.measured:
        doc["overhead"][mkey] = {"mib": kn.overhead_mib, "learned": now, "from": kn.source,
                                 "card": gpu["name"], "driver": gpu["driver"]}
    base = _result(host, inp, gpu, key, fields, now, kn, extra, int(ms.get("block_count") or 0), estimates, probes,
                   estimate)
    if isinstance(action, S.GiveUp):
        base.update(n_cpu_moe=None, reason=action.reason, seconds=round(time.monotonic() - t_start, 2))
        if kn.measured:
            write_state(host, inp.state_dir, doc)
        err = TuneError(action.reason, "see the probe table above; probe logs: " + inp.workdir)
        err.result = base  # type: ignore[attr-defined]
        raise err
    assert isinstance(action, S.Done)
    base.update(n_cpu_moe=action.value, verified_by=action.by, reason=action.reason)
    echo(f"tune: chosen --n-cpu-moe {action.value}: {action.reason}")
    if max_ctx:
        base["max_ctx"] = largest_ctx(host, inp, q, kn, action.value, estimate, echo)
    if inp.drafting and inp.speed_check:
        base["speed"] = speed_check(host, inp, parsed_server, action.value, ps, echo)
    base["seconds"] = round(time.monotonic() - t_start, 2)
    return _store(host, inp, doc, key, base, len(probes), echo)


def _usable_gpu(host, inp: Inputs, echo) -> dict[str, Any]:
    gpu = gpu_state(host, inp.gpu_index)
    echo(f"tune: {gpu['name']} (driver {gpu['driver']}), {gpu['free_mib']} of {gpu['vram_mib']} MiB free")
    busy = [a for a in gpu["apps"] if "llama-server" in a]
    if busy:
        raise TuneError(f"a llama-server already holds GPU memory ({'; '.join(busy)}): probes would measure the "
                        "wrong free memory", "stop it first (e.g. systemctl stop gpubox-llama), then re-run tune")
    return gpu


def _identity(host, inp: Inputs, gpu: dict) -> tuple[str, dict, str]:
    """(cache key, its fields, machine key): the files by size+mtime (and the model's sha256 when locked)."""
    files = [inp.server, inp.fit_params, inp.model] + ([inp.draft] if inp.drafting else [])
    ids = file_ids(host, files)
    missing = [p for p in files if ids[p] == "missing"]
    if missing:
        raise TuneError(f"missing on {host.name}: {', '.join(missing)}",
                        "build llama.cpp (invoke build; llama-fit-params is one of build.targets) and fetch the "
                        "models (invoke models) first")
    model_id = (f"sha256 {inp.model_sha256}" if inp.model_sha256 else "") + f" size+mtime {ids[inp.model]}"
    draft_id = ids.get(inp.draft, "") if inp.drafting else ""
    fields = ST.cache_fields(gpu, model_id.strip(), draft_id, ids[inp.server], inp.serve, inp.drafting,
                             inp.margin_mib)
    return ST.cache_key(fields), fields, ST.machine_key(gpu, ids[inp.server])


def _reuse(host, inp: Inputs, doc: dict, key: str, gpu: dict, echo) -> dict[str, Any]:
    hit = dict(doc["results"][key], reused=True)
    echo(f"tune: reusing the result of {hit.get('when')} (cache key {key}: same card, driver, model, "
         f"context, cache types and margin): --n-cpu-moe {hit['n_cpu_moe']}; --force asks again")
    if hit.get("free_mib") is not None and gpu["free_mib"] + inp.margin_mib < hit["free_mib"]:
        echo(f"tune: warning: {gpu['free_mib']} MiB free now, {hit['free_mib']} MiB when tuned: something else "
             "uses the GPU; re-run with --force if the server fails to start")
    if (doc.get("current") or {}).get("key") != key:
        doc["current"] = doc["results"][key]
        write_state(host, inp.state_dir, doc)
    return hit


def _model_facts(host, inp: Inputs, echo) -> tuple[dict, dict]:
    """The main model's header summary, and what the assistant adds that llama-fit-params does not see."""
    summaries = gguf_summaries(host, [inp.model] + ([inp.draft] if inp.drafting else []))
    ms = summaries[inp.model]
    if not ms.get("expert_count"):
        raise TuneError(f"{inp.model} ({ms.get('arch')}) has no experts: --n-cpu-moe changes nothing for it",
                        "tune is for mixture-of-experts models; set serve.n_cpu_moe: 0")
    serve = inp.serve
    extra = {"weights_mib": 0, "kv_mib": 0, "total_mib": 0}
    if inp.drafting:
        extra = ggufhead.assistant_mib(
            summaries[inp.draft], ctx=int(serve["ctx_size"]), type_k=serve["cache_type_k_draft"],
            type_v=serve["cache_type_v_draft"], n_gpu_layers=int(serve.get("n_gpu_layers_draft", 999)),
            n_cpu_moe=int(serve.get("n_cpu_moe_draft", 0)), overrides=serve.get("override_tensor_draft") or [])
        echo(f"tune: assistant {Path(inp.draft).name}: {extra['weights_mib']} MiB weights + {extra['kv_mib']} MiB KV "
             f"at {serve['ctx_size']} tokens (not seen by llama-fit-params)")
    return ms, extra


def _question(inp: Inputs, gpu: dict, ms: dict, extra: dict, stored: dict | None, echo) -> S.Question:
    serve = inp.serve
    n_layers = int(ms.get("block_count") or 0)
    q = S.Question(free_mib=gpu["free_mib"], n_max=n_layers, margin_mib=inp.margin_mib, extra_mib=extra["total_mib"],
                   overhead_mib=(stored or {}).get("mib"), prior_overhead_mib=inp.prior_overhead_mib,
                   max_probes=inp.max_probes)
    echo(f"tune: {Path(inp.model).name}: {n_layers} layers, {ms.get('expert_count')} experts; context "
         f"{serve['ctx_size']}, KV {serve['cache_type_k']}/{serve['cache_type_v']}, margin {inp.margin_mib} MiB; "
         f"overhead constant " + (f"{q.overhead_mib} MiB (stored, {stored.get('from')})" if stored
                                  else f"not learned on this machine yet (prior {q.prior_overhead_mib} MiB)"))
    return q


class Estimator:
    """estimate(k, ctx): llama-fit-params' device total in MiB at --n-cpu-moe k; the call times are kept."""

    def __init__(self, host, inp: Inputs, parsed_fit: dict):
        self.host, self.inp, self.parsed_fit = host, inp, parsed_fit
        self.calls: list[float] = []

    def __call__(self, k: int, ctx: Optional[int] = None) -> int:
        inp = self.inp
        argv = fitparams.argv(inp.fit_params, model=inp.model, n_cpu_moe=k, ctx=ctx or int(inp.serve["ctx_size"]),
                              serve=inp.serve, accepted=(lambda f: _accepts(self.parsed_fit, f)))
        t0 = time.monotonic()
        r = self.host.run(argv, check=False, timeout=300)
        self.calls.append(time.monotonic() - t0)
        if r.exited != 0:
            raise TuneError(f"llama-fit-params failed at --n-cpu-moe {k} (exit {r.exited})",
                            "check that the build has llama-fit-params and that the model loads",
                            (r.stderr or "") + (r.stdout or ""))
        try:
            return fitparams.device_total(fitparams.parse(r.stdout or ""))
        except fitparams.FitParamsError as e:
            raise TuneError(str(e), "build with CUDA (build.cuda: true) and run tune where the GPU is visible",
                            (r.stderr or "")[-2000:])


def _probe_settings(inp: Inputs, ms: dict) -> P.ProbeSettings:
    serve = inp.serve
    return P.ProbeSettings(workdir=inp.workdir, port=inp.probe_port, ready_timeout=inp.ready_timeout,
                           request_timeout=inp.request_timeout,
                           prompt_tokens=P.prompt_tokens_for(int(serve["ctx_size"]), inp.gen_tokens, inp.prompt_tokens),
                           gen_tokens=inp.gen_tokens, vocab=int(ms.get("n_vocab") or 32000), gpu=inp.gpu_index)


class Prober:
    """probe(k, predicted): one real llama-server run at --n-cpu-moe k (a prompt batch and a few tokens)."""

    def __init__(self, host, inp: Inputs, parsed_server: dict, ps: P.ProbeSettings, echo):
        self.host, self.inp, self.parsed_server, self.ps, self.echo = host, inp, parsed_server, ps, echo

    def __call__(self, k: int, predicted: int) -> S.ProbeResult:
        argv = server_argv(self.inp, self.parsed_server, k, drafting=self.inp.drafting)
        r, raw = P.run_probe(self.host, k, argv, self.ps)
        r.predicted_mib = predicted
        self.echo(f"tune: probe --n-cpu-moe {k}: predicted {predicted} MiB, measured "
                  f"{r.peak_mib if r.peak_mib is not None else '?'} MiB, {r.outcome}"
                  + (f", {r.gen_tps} gen t/s" if r.gen_tps else "") + f", {r.seconds:.1f} s"
                  + (f" ({r.detail})" if r.detail else ""))
        return r


def _result(host, inp: Inputs, gpu: dict, key: str, fields: dict, now: str, kn: S.Knowledge, extra: dict,
            n_layers: int, estimates: dict, probes: list, estimate: Estimator) -> dict[str, Any]:
    return {"key": key, "key_fields": fields, "when": now, "host": host.name, "card": gpu["name"],
            "driver": gpu["driver"], "free_mib": gpu["free_mib"], "margin_mib": inp.margin_mib,
            "overhead_mib": kn.overhead_mib, "overhead_source": kn.source, "corrections": kn.corrections,
            "assistant": extra, "n_layers": n_layers, "estimates": {str(k): v for k, v in sorted(estimates.items())},
            "probes": [asdict(p) for p in probes], "n_probes": len(probes), "fit_params_calls": len(estimate.calls),
            "fit_params_seconds": round(sum(estimate.calls), 2),
            "valid_for": json.loads(json.dumps(ST.valid_for(inp.serve, inp.drafting), default=str))}


def _store(host, inp: Inputs, doc: dict, key: str, base: dict, n_probes: int, echo) -> dict[str, Any]:
    result = dict(base)
    doc["results"][key] = result
    doc["current"] = result
    path = write_state(host, inp.state_dir, doc)
    echo(f"tune: wrote {path} (n_cpu_moe {result['n_cpu_moe']}; the serve step reads it) in {result['seconds']:.1f} s, "
         f"{n_probes} real probe(s), {result['fit_params_calls']} fit-params call(s) for the search")
    return result


def largest_ctx(host, inp: Inputs, q: S.Question, kn: S.Knowledge, k: int, estimate, echo) -> dict[str, Any]:
    """The largest context that the prediction says fits at --n-cpu-moe k (fit-params only, not probed)."""
    budget = q.free_mib - q.margin_mib - kn.overhead_mib
    serve = inp.serve
    draft_s = None
    if inp.drafting:
        draft_s = gguf_summaries(host, [inp.draft])[inp.draft]

    def extra(ctx: int) -> int:
        if draft_s is None:
            return 0
        return ggufhead.assistant_mib(draft_s, ctx=ctx, type_k=serve["cache_type_k_draft"],
                                      type_v=serve["cache_type_v_draft"],
                                      n_gpu_layers=int(serve.get("n_gpu_layers_draft", 999)),
                                      n_cpu_moe=int(serve.get("n_cpu_moe_draft", 0)),
                                      overrides=serve.get("override_tensor_draft") or [])["total_mib"]

    hi = int(gguf_summaries(host, [inp.model])[inp.model].get("context_length") or 131072)
    cq = S.CtxQuestion(budget_mib=budget, lo=512, hi=hi, step=256)
    est: dict[int, int] = {}
    while True:
        a = S.largest_ctx(cq, est, extra)
        if isinstance(a, S.NeedEstimate):
            est[a.value] = estimate(k, a.value)
            continue
        break
    echo(f"tune: largest context predicted to fit at --n-cpu-moe {k}: {a if a is not None else 'none'} "
         f"(model trained for {hi}; prediction only, not probed)")
    return {"n_cpu_moe": k, "ctx": a, "trained": hi, "estimates": {str(c): v for c, v in sorted(est.items())}}


def speed_check(host, inp: Inputs, parsed, k: int, ps: P.ProbeSettings, echo) -> dict[str, Any]:
    """Generation and prompt tokens/s of a chat request at the chosen value, with and without the MTP head."""
    out: dict[str, Any] = {}
    req = P.chat_request(inp.speed_tokens)
    for label, drafting in (("with_mtp", True), ("without_mtp", False)):
        r, raw = P.run_probe(host, k, server_argv(inp, parsed, k, drafting=drafting), ps, request=req)
        d = asdict(r)
        d["label"] = label
        out[label] = d
        acc = (f", draft {r.draft_accepted}/{r.draft_n} accepted" if r.draft_n else "")
        echo(f"tune: speed {label.replace('_', ' ')}: {r.outcome}, {r.gen_tps} gen t/s, {r.prompt_tps} prompt t/s{acc}")
    w, wo = out["with_mtp"].get("gen_tps"), out["without_mtp"].get("gen_tps")
    if w and wo:
        out["mtp_speedup"] = round(w / wo, 3)
        echo(f"tune: the MTP head changes generation speed by x{out['mtp_speedup']} on this card")
    return out
