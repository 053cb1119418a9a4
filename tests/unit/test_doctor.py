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


# --- REAL logs of the fork (H200, gpubox's own build step; tests/data/logs/README.md) -----------------------

def _with_draft_buffers(text: str, lines: list[str]) -> str:
    """The real pre-sync log with the draft's one load_tensors buffer line replaced by `lines` (the recipe's real
    assistant buffers, gemma4.md-sized): the format stays the real pre-sync one, only the numbers change."""
    draft_at = text.index("tiny-draft.gguf")      # `loading draft model '...'`: the draft's block follows
    head, tail = text[:draft_at], text[draft_at:]
    old = "load_tensors:        CUDA0 model buffer size =     2.06 MiB\n"
    assert old in tail
    return head + tail.replace(old, "".join(l + "\n" for l in lines), 1)


PRESYNC = (LOGS / "fork-presync-b0e900a-draft-f16.log").read_text()
# What the recipe's assistant printed (pre-sync, GTX 1080; docs/serve-mtp.md): token_embd Q6_K in CPU,
# pre_projection in CUDA_Host. With the override, token_embd's 210 MiB move to CUDA0 (82.24 + 210, derived).
RECIPE_HEAD_NO_OTD = ["load_tensors:          CPU model buffer size =   210.00 MiB",
                      "load_tensors:    CUDA_Host model buffer size =     3.09 MiB",
                      "load_tensors:        CUDA0 model buffer size =    82.24 MiB"]
RECIPE_HEAD_OTD = ["load_tensors:    CUDA_Host model buffer size =     3.09 MiB",
                   "load_tensors:        CUDA0 model buffer size =   292.24 MiB"]
HEAD_SUMMARY = {"arch": "gemma4_assistant", "other_bytes": {"token_embd.weight": 210 * 1048576}}


def test_real_presync_format_embedding_on_host_without_override():
    log = logparse.parse(_with_draft_buffers(PRESYNC, RECIPE_HEAD_NO_OTD))
    assert len(log.requests) == 1
    for head in (None, HEAD_SUMMARY):             # with and without the head's GGUF header
        f = {x.code: x for x in doctor.diagnose(log, serve=SERVE, dialect="pre-sync", head=head)}["draft-embedding-on-cpu"]
        assert "CPU 210.00 MiB" in f.title and "tiny-draft.gguf" in f.title
        assert '--override-tensor-draft "token_embd\\.weight=CUDA0"' in f.fix


def test_real_presync_format_with_override_has_no_finding():
    """With -otd token_embd=CUDA0 only the layer-input pre_projection stays in CUDA_Host: not the embedding."""
    log = logparse.parse(_with_draft_buffers(PRESYNC, RECIPE_HEAD_OTD))
    for head in (None, HEAD_SUMMARY):
        codes = {x.code for x in doctor.diagnose(log, serve=SERVE, dialect="pre-sync", head=head)}
        assert "draft-embedding-on-cpu" not in codes


def test_real_presync_log_acceptance_from_one_request():
    codes = {x.code: x for x in doctor.diagnose(logparse.parse(PRESYNC), serve=SERVE, dialect="pre-sync")}
    assert "draft-embedding-on-cpu" not in codes                   # the real tiny draft: all on CUDA0
    a = codes["draft-acceptance"]
    assert a.title == "draft acceptance 2.1% over 1 request(s)"     # 1 of 48, one request (not four)
    assert "statistics draft: 1 of 48 drafted tokens accepted over 29 draft calls" in a.detail


def test_real_postsync_mtp_log_healthy():
    """The mini Gemma 4 pair on the post-sync fork: small CPU_Mapped pieces (the unused input copy of token_embd)
    are no finding; acceptance from both requests and the draft-mtp statistics line."""
    log = logparse.parse((LOGS / "fork-postsync-b10018-mini-gemma4-draft-mtp.log").read_text())
    head = {"arch": "gemma4-assistant", "other_bytes": {"token_embd.weight": 438 * 128 * 2}}
    for h in (None, head):
        codes = {x.code: x for x in doctor.diagnose(log, serve=SERVE, dialect="post-sync", head=h)}
        assert set(codes) == {"draft-acceptance"}, doctor.summary(list(codes.values()))
    assert codes["draft-acceptance"].title == "draft acceptance 100.0% over 2 request(s)"
    assert "statistics draft-mtp: 70 of 70" in codes["draft-acceptance"].detail


def test_postsync_head_output_copy_on_host_is_a_finding():
    text = (LOGS / "fork-postsync-b10018-mini-gemma4-draft-mtp.log").read_text()
    text = text.replace("load_tensors:   CPU_Mapped model buffer size =     0.11 MiB",
                        "load_tensors:   CPU_Mapped model buffer size =     0.33 MiB")
    head = {"arch": "gemma4-assistant", "other_bytes": {"token_embd.weight": 438 * 128 * 2}}
    f = {x.code: x for x in doctor.diagnose(logparse.parse(text), serve=SERVE, dialect="post-sync", head=head)}
    assert "-ngld" in f["draft-embedding-on-cpu"].fix


def test_real_draft_simple_abort():
    log = logparse.parse((LOGS / "fork-postsync-b10018-draft-simple-assert.log").read_text())
    f = {x.code: x for x in doctor.diagnose(log, serve=dict(SERVE, spec_type="draft-simple"), dialect="post-sync")}
    a = f["server-aborted"]
    assert a.severity == "error" and "task 0 (slot 0)" in a.detail
    assert "serve.spec_type=mtp" in a.fix and "draft-simple" in a.fix
    assert any("GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max)" in e for e in a.evidence)
    assert a.evidence[0].startswith("slot launch_slot_: id 0 | task 0")


def test_real_postsync_nodraft_turbo3_healthy():
    log = logparse.parse((LOGS / "fork-postsync-b10018-nodraft-turbo3.log").read_text())
    assert doctor.diagnose(log, serve=SERVE, dialect="post-sync") == []


def test_real_upstream_mtp_logs_rigged_and_random():
    """Real upstream CPU logs of the mini twin pair through gpubox's serve step: the rigged head is accepted every
    time (info only), the random one never (a warning naming the pair check and spec_type=none)."""
    rigged = {x.code: x for x in doctor.diagnose(logparse.parse((LOGS / "cpu-gemma4-mini-draft-mtp-rigged.log")
                                                               .read_text()), serve=SERVE, dialect="upstream")}
    assert set(rigged) == {"draft-acceptance"}
    assert rigged["draft-acceptance"].title == "draft acceptance 100.0% over 2 request(s)"
    assert "statistics draft-mtp: 40 of 40 drafted tokens accepted over 20 draft calls" in rigged["draft-acceptance"].detail
    random = {x.code: x for x in doctor.diagnose(logparse.parse((LOGS / "cpu-gemma4-mini-draft-mtp-random.log")
                                                               .read_text()), serve=SERVE, dialect="upstream")}
    assert set(random) == {"draft-acceptance", "draft-never-accepted"}
    w = random["draft-never-accepted"]
    assert w.severity == "warning" and "not one of 118 drafted tokens" in w.title
    assert "serve.spec_type=none" in w.fix and len(w.evidence) == 2
