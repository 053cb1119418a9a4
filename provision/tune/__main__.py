"""python -m provision.tune: the tuner on this machine, with explicit paths (no Invoke or YAML needed).

The offline GPU benchmark (bench/tune_bench.py) uses it where Invoke is not installed; `invoke tune` is
the same runner with paths and settings taken from the gpubox configuration.

    python -m provision.tune --bin-dir BUILD/bin --model M.gguf --ctx 4096 --ctk f16 --ctv f16 \\
        --state-dir /tmp/state --margin 0 --json out.json --plot out.png
Exit status: 0 chosen (or reused), 1 cannot tune (no GPU visible: nothing changed), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..host import Host
from . import report
from .local import LocalContext
from .runner import Inputs, TuneError, tune


def serve_settings(a) -> dict:
    """cfg["serve"]-shaped settings for the renderer, from the command line."""
    return {"host": "127.0.0.1", "port": a.port, "ctx_size": a.ctx, "parallel": a.np, "n_gpu_layers": a.ngl,
            "n_cpu_moe": 0, "cache_type_k": a.ctk, "cache_type_v": a.ctv, "flash_attn": a.fa,
            "mlock": False, "mmap": True, "draft_model": "assistant" if a.draft else "",
            "spec_type": (a.spec_type or "mtp") if a.draft else "none", "draft_block_size": 3, "draft_max": 16, "draft_min": 0,
            "n_gpu_layers_draft": 99, "n_cpu_moe_draft": 0, "cache_type_k_draft": a.ctkd,
            "cache_type_v_draft": a.ctvd, "override_tensor_draft": a.otd, "override_tensor": [],
            "log_verbosity": None, "on_missing_option": "error", "service_user": "", "ready_timeout": 600}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m provision.tune", description=__doc__.splitlines()[0])
    p.add_argument("--bin-dir", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--draft", default="")
    p.add_argument("--spec-type", default="", help="with --draft: mtp (the fork's assistant head, default) or "
                   "draft (a plain draft model, e.g. on upstream llama.cpp)")
    p.add_argument("--ctx", type=int, required=True)
    p.add_argument("--ctk", default="f16")
    p.add_argument("--ctv", default="f16")
    p.add_argument("--ctkd", default="f16")
    p.add_argument("--ctvd", default="f16")
    p.add_argument("--otd", action="append", default=[])
    p.add_argument("--fa", default="on", choices=["on", "off", "auto"])
    p.add_argument("--ngl", type=int, default=999)
    p.add_argument("--np", type=int, default=1)
    p.add_argument("--state-dir", required=True)
    p.add_argument("--workdir", default="/tmp/gpubox-tune")
    p.add_argument("--margin", type=int, default=256)
    p.add_argument("--max-probes", type=int, default=3)
    p.add_argument("--prior", type=int, default=1024, help="overhead MiB assumed until measured")
    p.add_argument("--port", type=int, default=18080)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=32)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--force", action="store_true")
    p.add_argument("--max-ctx", action="store_true")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--plot", help="write the PNG here (needs matplotlib)")
    a = p.parse_args(argv)
    inp = Inputs(bin_dir=a.bin_dir, model=a.model, draft=a.draft, serve=serve_settings(a), state_dir=a.state_dir,
                 margin_mib=a.margin, max_probes=a.max_probes, prior_overhead_mib=a.prior, probe_port=a.port,
                 prompt_tokens=a.prompt_tokens, gen_tokens=a.gen_tokens, workdir=a.workdir,
                 speed_check=not a.no_speed)
    host = Host(LocalContext())
    try:
        res = tune(host, inp, force=a.force, max_ctx=a.max_ctx)
    except TuneError as e:
        print(str(e), file=sys.stderr)
        res = getattr(e, "result", None)
        if res and a.json:
            with open(a.json, "w") as fh:
                json.dump(dict(res, error=str(e)), fh, indent=1, default=str)
        if res:
            print(report.table(res["probes"], "probes:"))
        return 1
    print(report.table(res["probes"], "probes:"))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1, default=str)
    if a.plot and not res.get("reused"):
        print(report.plot_result(res, a.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
