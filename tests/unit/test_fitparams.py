"""llama-fit-params `-fitp on`: the parser on real output, the command line against the real binary.

tests/data/tune/fitparams-cpu-synth2-*.{stdout,stderr} are the real output of the CPU build of
llama-fit-params (llama.cpp from llama-cpp-python 0.3.36's sdist) on the 2-layer synthetic qwen3moe written by
bench/synth_moe.py (--layers 2 --vocab 4096, full 30B-A3B layer shape), with the command
`llama-fit-params -m synth2.gguf -fitp on -ngl 999 -c CTX -fa on -ctk KV -ctv KV -ncmoe 1`. A CPU build
prints only the Host line; a CUDA build prints one line per device first, in the same format
(common/fit.cpp common_fit_print: printf "%s " name, then "%zu " model, context, compute, then "\\n").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from provision import ggufhead
from provision.tune import fitparams as F

DATA = Path(__file__).resolve().parents[1] / "data" / "tune"
REPO = Path(__file__).resolve().parents[2]


def real(name: str) -> tuple[str, str]:
    return (DATA / f"{name}.stdout").read_text(), (DATA / f"{name}.stderr").read_text()


def test_parse_real_cpu_output():
    out, err = real("fitparams-cpu-synth2-c576-f16")
    est = F.parse(out)
    assert list(est) == ["Host"]
    assert est["Host"] == F.Estimate("Host", 6, 3, 88)
    # The log on stderr (with the newest builds' time/level prefix) never parses as an estimate.
    assert F.parse(err) == {}
    assert F.parse(err + out) == est


def test_context_estimate_follows_context_and_cache_type():
    """576 tokens f16 -> 3 MiB; 32768 tokens q8_0 -> 68 MiB (2 layers x 4 KV heads x 128 x 2 x 34/32 bytes)."""
    small = F.parse(real("fitparams-cpu-synth2-c576-f16")[0])["Host"]
    big = F.parse(real("fitparams-cpu-synth2-c32768-q8_0")[0])["Host"]
    assert (small.context, big.context) == (3, 68)
    assert big.compute > small.compute


def test_cpu_only_output_has_no_gpu_estimate():
    est = F.parse(real("fitparams-cpu-synth2-c576-f16")[0])
    with pytest.raises(F.FitParamsError, match="no GPU device line"):
        F.device_total(est)


def test_gpu_lines_in_the_printed_format():
    # common_fit_print's format with docs/tuning.md's numbers at --n-cpu-moe 29 (estimate 7306 MiB in total).
    text = "CUDA0 7012 54 240 \nHost 9680 0 12 \n"
    est = F.parse(text)
    assert F.device_total(est) == 7306 and F.device_total(est, "CUDA0") == 7306
    assert F.parse("CUDA0 1 2 3\nCUDA1 4 5 6\nHost 7 8 9\n")["CUDA1"].total == 15
    with pytest.raises(F.FitParamsError, match="CUDA1"):
        F.device_total(est, "CUDA1")


def test_argv_renders_the_users_settings():
    serve = {"n_gpu_layers": 99, "flash_attn": "on", "cache_type_k": "q8_0", "cache_type_v": "turbo3",
             "parallel": 1, "override_tensor": []}
    argv = F.argv("/b/llama-fit-params", model="/m.gguf", n_cpu_moe=21, ctx=131072, serve=serve, accepted=lambda f: True)
    assert argv == ["/b/llama-fit-params", "-m", "/m.gguf", "-fitp", "on", "-ngl", "99", "-c", "131072", "-fa", "on",
                    "-ctk", "q8_0", "-ctv", "turbo3", "-ncmoe", "21", "-np", "1"]
    assert "-ncmoe" not in F.argv("/b/f", model="/m", n_cpu_moe=0, ctx=512, serve=serve)
    assert "-np" not in F.argv("/b/f", model="/m", n_cpu_moe=1, ctx=512, serve=serve, accepted=lambda f: f != "-np")
    assert "-np" not in F.argv("/b/f", model="/m", n_cpu_moe=1, ctx=512, serve=serve, accepted=None)




@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    sys.path.insert(0, str(REPO / "bench"))
    import synth_moe
    path = tmp_path_factory.mktemp("fp") / "synth2.gguf"
    synth_moe.write(path, synth_moe.parser().parse_args([str(path), "--layers", "2", "--vocab", "4096"]))
    return path


@pytest.mark.parametrize("ctx, kv", [(576, "f16"), (32768, "f16"), (32768, "q8_0"), (4096, "q4_0")])
def test_the_real_binary_takes_the_argv_and_its_kv_matches_the_header_formula(llama_bin, synth, ctx, kv):
    """The command tune builds runs on the real binary, and its context estimate agrees with the KV formula
    that tune applies to the assistant's GGUF header (the same arithmetic, checked against llama.cpp)."""
    from provision.serve import helptext
    binary = str(llama_bin / "llama-fit-params")
    h = subprocess.run([binary, "--help"], capture_output=True, text=True)
    parsed = helptext.parse(h.stdout + h.stderr)
    serve = {"n_gpu_layers": 999, "flash_attn": "on", "cache_type_k": kv, "cache_type_v": kv, "parallel": 1,
             "override_tensor": []}
    argv = F.argv(binary, model=str(synth), n_cpu_moe=1, ctx=ctx, serve=serve,
                  accepted=lambda f: helptext.accepts(parsed, f))
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    est = F.parse(p.stdout)["Host"]
    s = ggufhead.summary(str(synth))
    padded = -(-ctx // 256) * 256                       # llama.cpp pads the context to a multiple of 256
    assert abs(est.context - ggufhead.kv_mib(s, padded, kv, kv)) <= 1, (est, ggufhead.kv_mib(s, padded, kv, kv))
