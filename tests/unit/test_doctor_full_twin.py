"""doctor and logparse on REAL fork logs of the full Gemma 4 twin, served on the GPU machine (docs/gpu/gemma4.md).

Both fork dialects, the recipe's settings (128k, turbo3 KV for target and head, --n-cpu-moe 24), with and without
the recipe's `-otd token_embd\\.weight=CUDA0`. The buffer sizes are the real 26B-A4B Q4_K_M layout's.
"""

from pathlib import Path

import pytest

from provision.serve import doctor, logparse

LOGS = Path(__file__).resolve().parent.parent / "data" / "logs"
SERVE = {"n_cpu_moe": 24, "ctx_size": 131072, "n_gpu_layers": 99, "cache_type_k": "turbo3", "cache_type_v": "turbo3",
         "draft_model": "assistant", "spec_type": "mtp"}


def parsed(name: str) -> logparse.Log:
    return logparse.parse((LOGS / name).read_text())


def codes(name: str, dialect: str) -> dict:
    return {f.code: f for f in doctor.diagnose(parsed(name), serve=SERVE, dialect=dialect, expect_gpu=True)}


@pytest.mark.parametrize("name", ["fork-postsync-b10018-full-twin-otd.log", "fork-postsync-b10018-full-twin-no-otd.log",
                                  "fork-presync-b0e900a-full-twin-otd.log", "fork-presync-b0e900a-full-twin-no-otd.log"])
def test_target_buffers_are_the_real_layout_at_24(name):
    log = parsed(name)
    t = log.target
    # token_embd on the CPU; CUDA0 = its output copy + non-expert weights + experts of layers 24..29; host = 0..23
    assert t.model_buffers == {"CPU": 577.50, "CUDA0": 4568.38, "CUDA_Host": 11434.51}
    assert t.offloaded == (31, 31)
    assert len(log.requests) == 1 and log.requests[0].draft_acceptance == 1.0
    assert log.requests[0].draft_accepted == 20


def test_presync_without_override_head_embedding_on_host():
    log = parsed("fork-presync-b0e900a-full-twin-no-otd.log")
    assert log.draft.model_buffers == {"CPU": 210.00, "CUDA0": 82.24, "CUDA_Host": 3.09}
    f = codes("fork-presync-b0e900a-full-twin-no-otd.log", "pre-sync")["draft-embedding-on-cpu"]
    assert "210.00 MiB" in f.title
    assert '--override-tensor-draft "token_embd\\.weight=CUDA0"' in f.fix
    assert f.evidence == ["load_tensors: CPU model buffer size = 210.00 MiB"]


def test_presync_with_override_nothing_found():
    log = parsed("fork-presync-b0e900a-full-twin-otd.log")
    assert log.draft.model_buffers == {"CUDA0": 292.24, "CUDA_Host": 3.09}     # 82.24 + the 210 MiB embedding
    found = codes("fork-presync-b0e900a-full-twin-otd.log", "pre-sync")
    assert "draft-embedding-on-cpu" not in found and "gpu-not-visible" not in found


@pytest.mark.parametrize("name", ["fork-postsync-b10018-full-twin-otd.log", "fork-postsync-b10018-full-twin-no-otd.log"])
def test_postsync_head_output_copy_on_gpu_either_way(name):
    """Post-sync the head's LM head is an output copy that -ngld puts on CUDA0 (295.34 MiB = 210 + 82.24 + 3.09);
    without -otd the unused input copy of token_embd stays in a 210 MiB CPU buffer, which is no finding."""
    log = parsed(name)
    assert log.draft.model_buffers["CUDA0"] == 295.34
    assert log.draft.model_buffers.get("CPU") == (None if name.endswith("-otd.log") and "no-otd" not in name else 210.00)
    assert "draft-embedding-on-cpu" not in codes(name, "post-sync")
