"""GPU check of the serve step (run by bench/gpu_serve.sh on the GPU machine; works on CPU too, minus the GPU parts).

Given a llama-server binary (a CUDA build of the fork or of upstream), offline:
  1. writes tiny GGUFs with testbed.testmodels: a llama MoE target and a dense llama draft model;
  2. starts the server through gpubox's serve step (render for the binary's dialect from its own --help, install
     the launch files, start, wait for /health) at -lv 4, with the draft's token embedding forced onto the GPU
     (the recipe's remedy, override token_embd\\.weight=CUDA0);
  3. proves it: the smoke chat completion (tokens/s from `timings`, draft acceptance), the load_tensors lines
     (CUDA0 buffers), the parsed log, doctor's findings;
  4. demonstrates a doctor finding on a real log: restarts with the draft's token embedding on the CPU
     (override token_embd\\.weight=CPU) and shows the `draft-embedding-on-cpu` finding;
  5. copies logs, the help text, the rendered commands, proofs and findings to $OUT.
Prints figures; exits non-zero when a stage that must work fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from invoke import Config, Context  # noqa: E402

from provision import config  # noqa: E402
from provision.engine import Runner  # noqa: E402
from provision.facts import gather  # noqa: E402
from provision.host import Host  # noqa: E402
from provision.serve import doctor, logparse, service, smoke, step  # noqa: E402
from testbed.testmodels import write_tiny  # noqa: E402


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def serve_run(host, cfg: dict, label: str, out: Path, *, expect_gpu: bool = True) -> tuple[dict, bool]:
    """One serve-step run (render, install, start, ready), the smoke request, the load lines, doctor's verdict.
    Returns (the record for results.json, whether it worked); the server is left running."""
    ok = True
    print(f"\n=== {label} ===")
    t = time.monotonic()
    rep = Runner(host, cfg, [step], echo=print).run()
    print(rep.table())
    res = rep.steps[0]
    print("command: " + " ".join(res.info.get("argv", [])))
    for n in res.info.get("notes", []):
        print(f"note: {n}")
    entry = {"status": res.status, "seconds": round(time.monotonic() - t, 2), "argv": res.info.get("argv"),
             "dialect": res.info.get("dialect"), "error": res.error}
    facts = gather(host, cfg, [step])
    text = service.read_log(host, cfg, facts)
    (out / f"{label}.log").write_text(text)
    if res.status == "failed":
        ok = False
        print(f"FAIL: {label}: {res.error}")
        return entry, ok
    sm = smoke.smoke(host, cfg["serve"])
    print(sm.line())
    entry["smoke"] = sm.to_dict()
    ok = ok and sm.ok
    text = service.read_log(host, cfg, facts)          # now with the request's timing lines
    (out / f"{label}.log").write_text(text)
    print("load_tensors / KV / compute lines:")
    for line in text.splitlines():
        l = logparse.clean(line)
        if l.startswith(("load_tensors:", "llama_kv_cache", "sched_reserve:", "llama_model_loader: loaded meta",
                         "ggml_cuda_init", "  Device ")) or "print_timing" in l or "statistics" in l:
            print("  " + l)
    model, draft = step.model_paths(cfg, "")
    log = logparse.parse(text, target_path=model, draft_path=draft)
    entry["log"] = log.to_dict()
    findings = doctor.diagnose(log, serve=cfg["serve"], dialect=res.info.get("dialect", "unknown"), facts=facts,
                               expect_gpu=expect_gpu)
    entry["findings"] = [f.to_dict() for f in findings]
    print("doctor:")
    print(doctor.summary(findings))
    return entry, ok



def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("server", help="path to llama-server (its directory holds the shared libraries)")
    ap.add_argument("--out", default=os.environ.get("OUT", "out-gpu-serve"))
    ap.add_argument("--work", default="")
    ap.add_argument("--cuda-prefix", default="/usr/local/cuda")
    a = ap.parse_args()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work or f"/tmp/gpubox-gpu-serve-{os.getpid()}").resolve()
    server = Path(a.server).resolve()
    if not os.access(server, os.X_OK):
        print(f"FAIL: {server} is not an executable llama-server")
        return 2
    # gpubox expects <build_dir>/bin/llama-server: link the binary's directory as bin/.
    build = work / "build"
    build.mkdir(parents=True, exist_ok=True)
    if not (build / "bin").exists():
        (build / "bin").symlink_to(server.parent)
    models = work / "models"
    t0 = time.monotonic()
    # head size 128 (n_embd 256 / 2 heads): the size the GPU flash-attention kernels cover
    write_tiny(models / "tiny-moe.gguf", arch="llama", n_layers=4, n_experts=8, n_embd=256, n_head=2, n_ff=256, seed=0)
    write_tiny(models / "tiny-draft.gguf", arch="llama", n_layers=2, n_embd=256, n_head=2, n_ff=256, seed=1)
    print(f"models: {models} written in {time.monotonic() - t0:.2f}s "
          f"({sum(f.stat().st_size for f in models.glob('*.gguf')) / 1e6:.2f} MB)")

    g = config.defaults()["gpubox"]
    g["state_dir"] = str(work / "state")
    g["report_dir"] = str(work / "reports")
    g["build"]["build_dir"] = str(build)
    g["build"]["cuda"] = True
    g["cuda"]["prefix"] = a.cuda_prefix
    g["models"]["dir"] = str(models)
    g["models"]["files"]["model"]["filename"] = "tiny-moe.gguf"
    g["models"]["files"]["assistant"]["filename"] = "tiny-draft.gguf"
    g["serve"].update(port=free_port(), ctx_size=4096, n_gpu_layers=99, n_cpu_moe=1, n_gpu_layers_draft=99,
                      spec_type="draft", cache_type_k="f16", cache_type_v="f16", cache_type_k_draft="f16",
                      cache_type_v_draft="f16", override_tensor_draft=[r"token_embd\.weight=CUDA0"],
                      log_verbosity=4, mlock=False, mmap=False, ready_timeout=300)
    devices = os.popen(f"LD_LIBRARY_PATH={server.parent} {server} --list-devices 2>&1").read()
    gpu = "CUDA0" in devices
    print("devices:\n" + devices.strip())
    if not gpu:
        # A CPU build has no CUDA0 buffer type: the remedy override would be refused ("unknown buffer type").
        print("NOTE: no CUDA0 device: CPU run; the GPU parts (CUDA0 buffers, the finding) cannot show")
        g["serve"]["override_tensor_draft"] = []
    cfg = config.validate(g)
    c = Context(Config(overrides={"run": {"in_stream": False}}))
    host = Host(c)
    results: dict = {"server": str(server)}
    ok = True

    try:
        results["help"] = "see help.txt"
        (out / "help.txt").write_text(os.popen(f"LD_LIBRARY_PATH={server.parent} {server} --help 2>&1").read())
        results["remedy"], good = serve_run(host, cfg, "gpu-serve-embd-on-gpu", out)
        ok = ok and good
        log_a = results["remedy"].get("log") or {}
        cuda_lines = [m for m in log_a.get("models", []) if any(k.startswith("CUDA") for k in m["model_buffers"])]
        print(f"\nmodels with a CUDA model buffer: {len(cuda_lines)} of {len(log_a.get('models', []))}")
        if not cuda_lines:
            print("NOTE: no CUDA buffer in the log: this binary or host has no usable GPU (CPU run)")

        cfg2 = json.loads(json.dumps(cfg))
        cfg2["serve"]["override_tensor_draft"] = [r"token_embd\.weight=CPU"]
        results["finding"], good = serve_run(host, cfg2, "gpu-serve-embd-on-cpu", out)
        ok = ok and good
        codes = [f["code"] for f in results["finding"].get("findings", [])]
        print(f"\ndoctor finding draft-embedding-on-cpu shown on the real log: {'draft-embedding-on-cpu' in codes}")
        before = [f["code"] for f in results["remedy"].get("findings", [])]
        print(f"and absent with the remedy (token_embd on CUDA0): {'draft-embedding-on-cpu' not in before}")
        if gpu and ("draft-embedding-on-cpu" not in codes or not cuda_lines):
            ok = False
    finally:
        facts = gather(host, cfg, [step])
        service.stop(host, cfg, facts)
        lay = service.layout(cfg, "")
        if Path(lay.log).exists():
            shutil.copy(lay.log, out / "llama-server.full.log")
        for p in (lay.launch, lay.env, lay.supervise):
            if Path(p).exists():
                shutil.copy(p, out / Path(p).name)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        print(f"\nlogs and results in {out}")
    print("RESULT: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
