"""`invoke tune` (and `fab -H gpubox tune`): find the --n-cpu-moe for this card and configuration.

Reads the validated gpubox configuration, resolves the paths on the target (build_dir/bin, models.dir),
runs provision.tune.runner.tune through Host, prints the probe table, writes the PNG and a JSON copy on
the controller (report_dir), and leaves the result in <state_dir>/tune.json on the target, where the serve
step reads it (provision.tune.state.tuned_n_cpu_moe).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

from invoke import Exit, task

from ..runs import locked, settings
from ..engine import write_atomic
from ..host import Host, expand_home, sh
from . import report
from .runner import Inputs, NoGPU, TuneError, gpu_state, tune as run_tune

HELP = {
    "set": "override a setting, KEY=VALUE (repeatable), e.g. --set tune.margin_mib=512 --set serve.ctx_size=32768",
    "force": "ask again even when the stored result matches (card, driver, model, context, cache types, margin)",
    "max-ctx": "also report the largest context predicted to fit at the chosen value (fit-params only)",
    "no-plot": "skip the PNG",
}


def inputs_from_cfg(cfg: dict, home: str) -> Inputs:
    serve = dict(cfg["serve"])
    files = cfg["models"]["files"]
    mdir = expand_home(cfg["models"]["dir"], home).rstrip("/")
    draft = ""
    if serve.get("draft_model"):
        draft = f"{mdir}/{files[serve['draft_model']]['filename']}"
    t = cfg["tune"]
    return Inputs(
        bin_dir=expand_home(cfg["build"]["build_dir"], home).rstrip("/") + "/bin",
        model=f"{mdir}/{files['model']['filename']}",
        draft=draft, serve=serve, state_dir=expand_home(cfg["state_dir"], home),
        margin_mib=t["margin_mib"], max_probes=t["max_probes"], prior_overhead_mib=t["overhead_prior_mib"],
        probe_port=t["probe_port"], prompt_tokens=t["probe_prompt_tokens"], gen_tokens=t["probe_gen_tokens"],
        ready_timeout=serve.get("ready_timeout", 600), model_sha256=files["model"].get("sha256") or "",
        speed_check=t["speed_check"])


def _home(host: Host, user: str) -> str:
    script = (sh("h=$(getent passwd {u} | cut -d: -f6); ", u=user) if user else "h=; ") + \
        '[ -n "$h" ] || h=$HOME; echo "$h"; id -u'
    r = host.run(["sh", "-c", script], check=False)
    lines = (r.stdout or "").split()
    if len(lines) >= 2 and lines[1].isdigit():
        host.is_root = lines[1] == "0"
    return lines[0] if lines else "/root"


@task(help=HELP, iterable=["set"])
def tune(c, set=None, force=False, max_ctx=False, no_plot=False):
    """Find the expert placement (--n-cpu-moe) with the most experts on the GPU that runs your configuration."""
    cfg = settings(c, set)
    host = Host(c)
    inp = inputs_from_cfg(cfg, _home(host, cfg.get("user") or ""))
    try:
        gpu_state(host, inp.gpu_index)    # no GPU: say so before the lock (which creates state_dir) changes anything
        # One gpubox run at a time per box: the probes start and stop llama-servers and would measure a GPU
        # that a provision or serve in flight is changing.
        with locked(host, cfg, "tune"):
            res = run_tune(host, inp, force=force, max_ctx=max_ctx)
    except NoGPU as e:
        raise Exit(str(e), code=1)
    except TuneError as e:
        partial = getattr(e, "result", None)
        if partial:
            print(report.table(partial["probes"], "probes (nothing chosen):"))
        raise Exit(str(e), code=1)
    print(report.table(res["probes"], "probes:"))
    if res.get("speed"):
        print(report.table([res["speed"][k] for k in ("with_mtp", "without_mtp") if k in res["speed"]],
                           "speed at the chosen value (chat request):"))
    rdir = Path(os.path.expanduser(cfg["report_dir"]))
    rdir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    write_atomic(rdir / f"{host.name}-tune-latest.json", json.dumps(res, indent=1, default=str))
    if not no_plot and not res.get("reused"):
        print(report.plot_result(res, str(rdir / f"{host.name}-tune-{stamp}.png")))
    print(f"tune: --n-cpu-moe {res['n_cpu_moe']}" + (" (reused)" if res.get("reused") else ""))
    return res
