"""logparse on log text: REAL CPU logs (tests/data/logs/cpu-*.log, captured from the upstream CPU llama-server
serving testbed.testmodels GGUFs) and GPU-style samples written strictly from docs/fork.md's line formats
(tests/data/logs/gpu-style-*.log; see the README there: they are not program output)."""

from pathlib import Path

import pytest

from provision.serve import logparse

LOGS = Path(__file__).resolve().parent.parent / "data" / "logs"
MODEL = "/home/u/Models/gemma-4-26B-A4B-it-Q4_K_M.gguf"
ASSISTANT = "/home/u/Models/gemma-4-26B-A4B-it-assistant.Q4_K_M.gguf"


def read(name):
    return (LOGS / name).read_text()


def test_presync_bare_lines_two_models():
    log = logparse.parse(read("gpu-style-presync-embd-on-cpu.log"))
    assert [m.role for m in log.models] == ["target", "draft"]
    t, d = log.target, log.draft
    assert t.path == MODEL and d.path == ASSISTANT            # "(version GGUF V3 (latest))" is not part of the path
    assert t.arch == "gemma4" and d.arch == "gemma4_assistant"
    assert t.offloaded == (31, 31) and d.offloaded == (5, 5)
    assert t.model_buffers == {"CUDA0": 5123.45, "CPU_Mapped": 9876.54}
    assert d.model_buffers == {"CUDA0": 61.2, "CPU": 384.0}
    assert t.kv_buffers == {"CUDA0": 810.0} and d.kv_buffers == {"CUDA0": 10.0}
    assert t.compute_buffers == {"CUDA0": 517.0, "CUDA_Host": 264.01}
    assert log.cuda_devices_found == 1
    assert log.devices == [{"index": 0, "name": "NVIDIA GeForce GTX 1080", "compute_capability": "6.1",
                            "vmm": "yes", "vram_mib": 8107}]
    assert log.ready and log.listening == "http://127.0.0.1:8080"
    (r,) = log.requests
    assert (r.slot, r.task, r.prompt_n, r.prompt_per_second, r.predicted_n, r.predicted_per_second, r.total_ms) == \
        (0, 7, 24, 46.84, 128, 31.9, 4524.34)
    # the recipe build's wording: "draft acceptance rate ="
    assert (r.draft_acceptance, r.draft_accepted, r.draft_generated, r.draft_mean_len) == (0.6125, 49, 80, None)


def test_postsync_prefixed_lines_trace_stats_memory():
    log = logparse.parse(read("gpu-style-postsync-prefixed.log"))
    assert [m.role for m in log.models] == ["target", "draft"]
    assert log.draft.model_buffers == {"CUDA0": 445.2}
    (r,) = log.requests
    assert (r.draft_acceptance, r.draft_accepted, r.draft_generated, r.draft_mean_len) == (0.7, 28, 40, 2.4)
    (st,) = log.spec_stats
    assert st["type"] == "draft-mtp" and (st["calls_begin"], st["calls_draft"], st["calls_accept"]) == (1, 20, 20)
    assert st["acc_tokens"] == 28 and st["dur_ms"] == [0.012, 85.3, 1.2]
    assert log.memory[0] == {"device": "CUDA0 (GTX 1080)", "total": 8107, "free": 402, "self": 7213, "model": 5568,
                             "context": 820, "compute": 825, "unaccounted": 492}
    assert log.memory[1]["device"] == "Host" and log.memory[1]["model"] == 9876
    assert len(log.fa_fallbacks) == 1 and "Flash Attention is assigned to device CPU" in log.fa_fallbacks[0]


def test_roles_by_path_when_order_differs():
    text = read("gpu-style-presync-embd-on-cpu.log")
    log = logparse.parse(text, target_path=ASSISTANT, draft_path=MODEL)   # deliberately swapped
    assert log.model("target").path == ASSISTANT and log.model("draft").path == MODEL


def test_oom_at_load():
    log = logparse.parse(read("gpu-style-oom-at-load.log"))
    assert len(log.oom) == 3 and log.exited_on_load_error and not log.ready
    assert any("failed to allocate CUDA0 buffer of size 1258291200" in l for l in log.oom)
    why = logparse.explain_exit(read("gpu-style-oom-at-load.log"))
    assert why[-1] == "srv  llama_server: exiting due to model loading error"
    assert any("cudaMalloc failed: out of memory" in l for l in why)


def test_mlock_and_cuda_init_failure():
    log = logparse.parse(read("gpu-style-mlock-and-nogpu.log"))
    assert log.cuda_init_error == "no CUDA-capable device is detected"
    assert len(log.mlock_failures) == 1 and "15728640000-byte" in log.mlock_failures[0]


def test_prefix_and_colour_are_stripped():
    assert logparse.clean("0.00.291.952 E gguf_init_from_file: failed") == "gguf_init_from_file: failed"
    assert logparse.clean("\x1b[32m0.01.000.001 I \x1b[0mload_tensors: x") == "load_tensors: x"
    assert logparse.clean("load_tensors: bare") == "load_tensors: bare"


def test_last_run_keeps_only_the_latest_start():
    text = ("gpubox: llama-server start 2026-01-01T00:00:00Z pid 1 uid 0\nold line\n"
            "gpubox: llama-server start 2026-01-01T00:01:00Z pid 2 uid 0\nnew line\n")
    assert logparse.last_run(text) == "new line\n"
    assert logparse.last_run("no marker\n") == "no marker\n"


CPU_LOGS = sorted(LOGS.glob("cpu-*.log"))


@pytest.mark.skipif(not CPU_LOGS, reason="no real CPU logs recorded yet")
def test_real_cpu_log_with_draft_model():
    text = read("cpu-moe-draft.log")
    log = logparse.parse(text)
    assert [m.role for m in log.models] == ["target", "draft"]
    assert all(m.path.endswith(".gguf") for m in log.models)
    t = log.target
    assert t.model_buffers and all(k.startswith("CPU") for k in t.model_buffers)
    assert t.offloaded is None            # a CPU-only upstream build prints no "offloaded N/M layers" line
    assert t.model_buffers == {"CPU": 0.52} and log.draft.model_buffers == {"CPU": 0.23}
    assert t.kv_buffers == {"CPU": 1.0} and t.compute_buffers == {"CPU": 4.01}
    assert t.arch == "llama" and t.n_tensors == 23
    assert log.ready and log.listening == "http://127.0.0.1:35147"
    r0, r1 = log.requests
    assert (r0.task, r0.prompt_n, r0.prompt_per_second, r0.predicted_n, r0.predicted_per_second) == (0, 110, 950.31, 32, 95.71)
    assert (r0.draft_acceptance, r0.draft_accepted, r0.draft_generated, r0.draft_mean_len) == (0.01754, 1, 57, 1.03)
    assert (r1.task, r1.draft_generated) == (32, 59)
    # trace-level speculative statistics (this binary prints them at -lv 4 with a "spec common_specu:" prefix)
    assert [s["type"] for s in log.spec_stats] == ["draft-simple", "draft-simple"]
    assert log.spec_stats[1]["calls_draft"] == 59 and log.spec_stats[1]["gen_tokens"] == 116
    # the fit dry-run's host memory tables, before the load
    assert log.memory[0] == {"device": "Host", "self": 5, "model": 0, "context": 1, "compute": 4}


@pytest.mark.skipif(not CPU_LOGS, reason="no real CPU logs recorded yet")
def test_real_cpu_log_of_a_failed_load():
    text = read("cpu-load-error.log")
    log = logparse.parse(text)
    assert log.exited_on_load_error and not log.ready
    assert "unknown model architecture: 'gpubox-no-such-arch'" in log.load_errors[0]
    why = logparse.explain_exit(text)
    assert "srv  llama_server: exiting due to model loading error" in why
    assert why[-1].startswith("gpubox-supervisor: llama-server exited with status 1")


# --- REAL logs of the fork, from the GPU machine (H200; see tests/data/logs/README.md) ------------------------

def test_real_presync_log_one_request_not_four():
    """The pre-sync fork prints `slot print_timing: id  0 | task 0 | ` alone and the timing lines bare after it:
    they are ONE request (the old parser made four of them)."""
    log = logparse.parse(read("fork-presync-b0e900a-draft-f16.log"))
    (r,) = log.requests
    assert (r.slot, r.task) == (0, 0)
    assert (r.prompt_n, r.prompt_ms, r.prompt_per_second) == (110, 164.41, 669.08)
    assert (r.predicted_n, r.predicted_ms, r.predicted_per_second, r.total_ms) == (32, 128.07, 249.87, 292.47)
    assert (r.draft_acceptance, r.draft_accepted, r.draft_generated, r.draft_mean_len) == (0.02083, 1, 48, None)
    (st,) = log.spec_stats                          # `statistics draft:` follows bare, too
    assert st["type"] == "draft" and (st["gen_tokens"], st["acc_tokens"]) == (48, 1)
    assert [m.role for m in log.models] == ["target", "draft"]
    assert log.target.model_buffers == {"CUDA0": 11.19, "CUDA_Host": 3.15}
    assert log.draft.model_buffers == {"CUDA0": 2.06} and log.draft.offloaded == (3, 3)
    assert log.ready and log.in_flight is None and not log.aborts


def test_bare_timing_lines_without_a_header_make_one_request_each():
    lines = [l for l in read("fork-presync-b0e900a-draft-f16.log").splitlines() if "slot print_timing" not in l]
    text = "\n".join(lines)
    twice = text + "\n" + "\n".join(l for l in lines if "time =" in l or "draft acceptance" in l)
    log = logparse.parse(twice)
    assert [(r.prompt_n, r.predicted_n, r.draft_generated) for r in log.requests] == [(110, 32, 48), (110, 32, 48)]


def test_real_postsync_mtp_log_two_requests_and_stats():
    log = logparse.parse(read("fork-postsync-b10018-mini-gemma4-draft-mtp.log"))
    assert [(m.role, m.arch) for m in log.models] == [("target", "gemma4"), ("draft", "gemma4-assistant")]
    assert log.target.model_buffers == {"CPU_Mapped": 0.21, "CUDA0": 14.0}
    assert log.draft.model_buffers == {"CPU_Mapped": 0.11, "CUDA0": 1.05}
    assert log.draft.kv_shared == [(1, 5), (0, 4)]  # the head's layers view the target's last full / SWA layers
    assert log.spec_impls == ["draft-mtp"]
    r0, r1 = log.requests
    assert (r0.task, r0.draft_accepted, r0.draft_generated, r0.draft_mean_len) == (0, 35, 35, 3.92)
    assert (r1.task, r1.prompt_n, r1.predicted_per_second) == (16, 5, 1887.76)
    assert [s["type"] for s in log.spec_stats] == ["draft-mtp", "draft-mtp"]
    assert log.spec_stats[-1]["acc_tokens"] == 70 and log.spec_stats[-1]["mean_acc_len"] == 3.92
    # "Gemma4Assistant requires ctx_other ... (this warning is normal during memory fitting)" is no load error
    assert log.load_errors == [] and log.ready


def test_real_postsync_turbo3_kv_types():
    log = logparse.parse(read("fork-postsync-b10018-nodraft-turbo3.log"))
    assert log.target.kv_types == ["turbo3/turbo3"] and log.target.kv_buffers == {"CUDA0": 3.25}
    (r,) = log.requests
    assert r.predicted_n == 32 and r.draft_generated is None


def test_real_draft_simple_abort_in_the_middle_of_a_request():
    text = read("fork-postsync-b10018-draft-simple-assert.log")
    log = logparse.parse(text)
    assert log.ready and log.requests == []
    assert log.in_flight == {"slot": 0, "task": 0}
    (a,) = log.aborts
    assert "GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max) failed" in a
    assert logparse.explain_abort(text) == [
        "slot launch_slot_: id  0 | task 0 | processing task, is_child = 0",
        "cmd_child_to_router:error:<dir>/llama-context.cpp:2202: GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max) failed"]
    assert logparse.explain_abort(read("fork-postsync-b10018-nodraft-turbo3.log")) == []


def test_runs_split_at_the_start_markers():
    a, b = read("fork-postsync-b10018-draft-simple-assert.log"), read("fork-postsync-b10018-nodraft-turbo3.log")
    text = f"{logparse.START_MARKER} 2026 pid 1\n{a}gpubox-supervisor: llama-server exited with status 134; restarting in 5 s\n{b}"
    r1, r2 = logparse.runs(text)
    assert logparse.parse(r1).aborts[-1] == "gpubox-supervisor: llama-server exited with status 134; restarting in 5 s"
    assert logparse.parse(r2).requests and not logparse.parse(r2).aborts


# --- REAL upstream logs with the MTP head (CPU build, the mini Gemma 4 twin; tests/data/logs/README.md) -----

@pytest.mark.parametrize("variant,accepted,generated", [("rigged", 20, 20), ("random", 0, 59)])
def test_real_upstream_mtp_logs(variant, accepted, generated):
    text = read(f"cpu-gemma4-mini-draft-mtp-{variant}.log")
    log = logparse.parse(text)
    assert [(m.role, m.arch) for m in log.models] == [("target", "gemma4"), ("draft", "gemma4-assistant")]
    assert log.target.model_buffers == {"CPU": 9.74} and log.draft.model_buffers == {"CPU": 1.62}
    assert log.draft.kv_buffers == {}                                  # no cache of its own: it views the target's
    assert log.draft.kv_shared == [(3, 5), (0, 4), (1, 4), (2, 4)]     # full -> target 5, sliding -> target 4
    assert log.spec_impls == ["draft-mtp"]
    r0, r1 = log.requests
    assert (r0.prompt_n, r0.predicted_n, r0.draft_accepted, r0.draft_generated) == (45, 32, accepted, generated)
    assert r1.prompt_n == 5                                            # the second request reuses the prompt cache
    assert [(s["type"], s["acc_tokens"], s["gen_tokens"]) for s in log.spec_stats] == \
        [("draft-mtp", accepted, generated), ("draft-mtp", 2 * accepted, 2 * generated)]
    # the E/W lines of the fit dry run (the head cannot make a context alone) are no load errors, no exit reason
    assert log.load_errors == [] and log.aborts == [] and log.ready
    assert not [l for l in logparse.explain_exit(text) if "ctx_other" in l or "extra model" in l]


def test_systemd_main_process_line_is_an_abort_in_the_units_journal():
    """Under systemd the server's own output ends where the signal hit; the unit's journal (`journalctl -u`,
    which shows PID 1's messages about the unit too) then says how it died: that line counts as the abort."""
    text = (f"{logparse.START_MARKER} 2026-12-01T12:00:00Z\n"
            "main: server is listening on http://127.0.0.1:8080\n"
            "slot launch_slot_: id  0 | task 7 | processing task, is_child = 0\n"
            "llama-server.service: Main process exited, code=dumped, status=6/ABRT\n"
            "llama-server.service: Failed with result 'core-dump'.\n")
    assert logparse.explain_abort(text) == [
        "slot launch_slot_: id  0 | task 7 | processing task, is_child = 0",
        "llama-server.service: Main process exited, code=dumped, status=6/ABRT"]
    # a clean stop is not an abort
    assert logparse.explain_abort(text.replace("code=dumped, status=6/ABRT", "code=exited, status=0/SUCCESS")) == []
