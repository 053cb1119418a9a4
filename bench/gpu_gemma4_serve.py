"""Serve the full Gemma 4 twin pair on the GPU machine through gpubox's serve step (bench/gpu_gemma4.sh).

For one built profile (post-sync or pre-sync fork), at the recipe's settings (128k context, turbo3 KV for the
target and the head, flash attention on, MTP drafting, mlock on, mmap off) and a given --n-cpu-moe, twice:
with the recipe's `-otd token_embd\\.weight=CUDA0` override and without it. Each run prints both load_tensors
stanzas (target and assistant), the KV/compute lines, the smoke request's speed and draft acceptance, and
doctor's verdict; the logs and a JSON summary go to --out.

    python3 bench/gpu_gemma4_serve.py --build-dir B --profile current|recipe --models-dir D --n-cpu-moe N --out O
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from invoke import Config, Context  # noqa: E402

from gpu_serve import free_port, serve_run  # noqa: E402
from provision import config  # noqa: E402
from provision.facts import gather  # noqa: E402
from provision.host import Host  # noqa: E402
from provision.serve import logparse, service, step  # noqa: E402

OTD = r"token_embd\.weight=CUDA0"


def stanzas(text: str) -> list[list[str]]:
    """The load_tensors lines of each model block (target first, then the assistant), as printed."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        l = logparse.clean(line)
        if l.startswith("llama_model_loader: loaded meta"):
            blocks.append([l])
        elif blocks and l.startswith(("load_tensors:", "llama_kv_cache:", "sched_reserve:")) and "buffer size" in l \
                or blocks and l.startswith("load_tensors: offloaded"):
            blocks[-1].append(l)
    return blocks


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build-dir", required=True)
    ap.add_argument("--profile", required=True, choices=["current", "recipe"])
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--n-cpu-moe", type=int, required=True)
    ap.add_argument("--ctx", type=int, default=131072)
    ap.add_argument("--kv", default="turbo3")
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/gg/serve")
    ap.add_argument("--cuda-prefix", default="/usr/local/cuda")
    ap.add_argument("--runs", default="otd,no-otd", help="comma list of otd / no-otd")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) / a.profile
    g = config.defaults()["gpubox"]
    g["state_dir"] = str(work / "state")
    g["report_dir"] = str(work / "reports")
    g["build"].update(build_dir=a.build_dir, cuda=True, profile=a.profile)
    g["cuda"]["prefix"] = a.cuda_prefix
    g["models"]["dir"] = a.models_dir
    kv = a.kv
    g["serve"].update(port=free_port(), ctx_size=a.ctx, n_cpu_moe=a.n_cpu_moe, cache_type_k=kv, cache_type_v=kv,
                      cache_type_k_draft=kv, cache_type_v_draft=kv, flash_attn="on", ready_timeout=600)
    c = Context(Config(overrides={"run": {"in_stream": False}}))
    host = Host(c)
    results: dict = {"profile": a.profile, "n_cpu_moe": a.n_cpu_moe, "ctx": a.ctx, "kv": kv, "runs": {}}
    ok = True
    try:
        for run in a.runs.split(","):
            g["serve"]["override_tensor_draft"] = [OTD] if run == "otd" else []
            cfg = config.validate(json.loads(json.dumps(g)))
            label = f"{a.profile}-{run}"
            entry, good = serve_run(host, cfg, label, out)
            ok = ok and good
            text = (out / f"{label}.log").read_text()
            entry["stanzas"] = stanzas(text)
            print(f"--- {label}: load_tensors stanzas (target, then assistant)")
            for i, b in enumerate(entry["stanzas"]):
                print(f"  [{'target' if i == 0 else 'assistant'}]")
                for l in b:
                    print("    " + l)
            print(f"--- {label}: doctor codes: {[f['code'] for f in entry.get('findings', [])] or 'none'}")
            results["runs"][run] = entry
            facts = gather(host, cfg, [step])
            service.stop(host, cfg, facts)
    finally:
        (out / f"serve-{a.profile}.json").write_text(json.dumps(results, indent=1, default=str))
    print("RESULT: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
