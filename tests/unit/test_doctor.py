"""doctor: findings from parsed logs (GPU-style samples from docs/fork.md's formats, and real CPU logs)."""

from pathlib import Path

from provision.serve import doctor, logparse

LOGS = Path(__file__).resolve().parent.parent / "data" / "logs"
SERVE = {"n_cpu_moe": 21, "ctx_size": 131072, "n_gpu_layers": 99, "cache_type_k": "turbo3", "cache_type_v": "turbo3"}


def find(name, **kw):
    log = logparse.parse((LOGS / name).read_text())
    return {f.code: f for f in doctor.diagnose(log, serve=SERVE, **kw)}


def test_assistant_cpu_buffer_presync_remedy():
    f = find("gpu-style-presync-embd-on-cpu.log", dialect="pre-sync")["draft-embedding-on-cpu"]
    assert f.severity == "warning"
    assert "CPU 384.00 MiB" in f.title and "assistant.Q4_K_M.gguf" in f.title
    assert '--override-tensor-draft "token_embd\\.weight=CUDA0"' in f.fix
    assert f.evidence == ["load_tensors: CPU model buffer size = 384.00 MiB"]


def test_assistant_cpu_buffer_postsync_points_at_ngld():
    f = find("gpu-style-presync-embd-on-cpu.log", dialect="post-sync")["draft-embedding-on-cpu"]
    assert "-ngld" in f.fix


def test_no_embedding_finding_when_assistant_is_on_gpu():
    codes = find("gpu-style-postsync-prefixed.log", dialect="post-sync")
    assert "draft-embedding-on-cpu" not in codes
    assert codes["flash-attn-fallback"].severity == "warning"
    assert codes["draft-acceptance"].title.startswith("draft acceptance 70.0%")


def test_oom_at_load_with_numbers():
    f = find("gpu-style-oom-at-load.log")["oom-at-load"]
    assert f.severity == "error"
    # 4200 MiB of experts for 21 layers on the CPU = 200 MiB per layer; 1200 MiB missing -> 6 more layers
    assert "raise serve.n_cpu_moe from 21 to 27" in f.fix
    assert "lower serve.ctx_size from 131072 to 65536" in f.fix


def test_mlock_and_gpu_not_visible():
    codes = find("gpu-style-mlock-and-nogpu.log", facts={"gpus": [], "systemd": "yes"})
    assert "LimitMEMLOCK=infinity" in codes["mlock-failed"].fix
    g = codes["gpu-not-visible"]
    assert g.severity == "error" and "nvidia-smi sees no GPU" in g.detail and "invoke driver" in g.fix
    assert "reboot" in g.detail


def test_cpu_build_is_not_an_embedding_problem():
    # A CPU-only build has nothing but CPU buffers: no GPU in the log -> no embedding finding, no GPU finding
    log = logparse.parse((LOGS / "gpu-style-presync-embd-on-cpu.log").read_text().replace("CUDA0", "CPU")
                         .replace("ggml_cuda_init: found 1 CUDA devices", "x"))
    codes = {f.code for f in doctor.diagnose(log, serve=SERVE, dialect="pre-sync")}
    assert "draft-embedding-on-cpu" not in codes and "gpu-not-visible" not in codes


def test_unknown_architecture_load_error():
    text = ("llama_model_loader: loaded meta data with 3 key-value pairs and 2 tensors from /m/a.gguf (version GGUF V3 (latest))\n"
            "llama_model_load: error loading model: error loading model architecture: unknown model architecture: 'gemma4_assistant'\n"
            "srv  llama_server: exiting due to model loading error\n")
    f = {x.code: x for x in doctor.diagnose(logparse.parse(text))}["load-error"]
    assert "gemma4-assistant" in f.fix and "build.profile" in f.fix


def test_real_cpu_logs():
    ok = find("cpu-moe-draft.log", dialect="upstream")
    assert set(ok) == {"draft-acceptance"}                  # a healthy CPU run: nothing wrong, acceptance reported
    assert ok["draft-acceptance"].title == "draft acceptance 0.9% over 2 request(s)"   # 1 of 116 drafted tokens
    bad = find("cpu-load-error.log", dialect="upstream")["load-error"]
    assert bad.severity == "error"
    assert any("unknown model architecture: 'gpubox-no-such-arch'" in e for e in bad.evidence)


# --- real GPU logs (H200, CUDA build of upstream llama.cpp by bench/gpu_build.sh, run by bench/gpu_serve.sh) ---

def test_real_gpu_log_draft_embedding_forced_to_cpu():
    """The draft's token_embd forced to the CPU with -otd on a real GPU run: with --load-mode none the weight
    lands in a CUDA_Host (pinned host) buffer, and doctor reports it."""
    log = logparse.parse((LOGS / "gpu-h200-draft-embd-on-cpu.log").read_text())
    assert log.target.model_buffers == {"CUDA0": 11.19, "CUDA_Host": 3.15}
    assert log.draft.model_buffers == {"CUDA0": 1.91, "CUDA_Host": 0.15}
    f = {x.code: x for x in doctor.diagnose(log, serve=SERVE, dialect="upstream")}["draft-embedding-on-cpu"]
    assert "CUDA_Host 0.15 MiB" in f.title and "tiny-draft.gguf" in f.title
    assert f.evidence[0] == "load_tensors: CUDA_Host model buffer size = 0.15 MiB"


def test_real_gpu_log_with_the_remedy_has_no_finding():
    """The same run with the recipe's remedy (token_embd on CUDA0): the draft is all on CUDA0, no finding."""
    log = logparse.parse((LOGS / "gpu-h200-draft-embd-on-gpu.log").read_text())
    assert log.draft.model_buffers == {"CUDA0": 2.06}
    codes = {x.code for x in doctor.diagnose(log, serve=SERVE, dialect="upstream")}
    assert "draft-embedding-on-cpu" not in codes and "gpu-not-visible" not in codes
