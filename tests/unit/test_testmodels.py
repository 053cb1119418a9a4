"""testmodels.write_tiny: the GGUF files it writes, read back with the gguf package's reader.
(That a real llama-server loads and answers with them is tested in tests/integration/test_serve.py.)"""

import gguf
import numpy as np
import pytest

from testbed.testmodels import BYTE, CONTROL, NORMAL, read_arch, vocab, write_tiny


def fields(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def scalar(r, key):
    f = r.fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0] == gguf.GGUFValueType.STRING else v[0]


def test_vocab_is_313_spm_tokens():
    tokens, scores, types = vocab()
    assert len(tokens) == len(scores) == len(types) == 313
    assert types.count(BYTE) == 256 and tokens[3] == "<0x00>"
    assert tokens.index("<|im_start|>") > 0 and types[tokens.index("<|im_end|>")] == CONTROL


def test_dense_llama(tmp_path):
    p = write_tiny(tmp_path / "m.gguf")
    r, t = fields(p)
    assert read_arch(p) == "llama" and scalar(r, "llama.block_count") == 2
    assert "<|im_start|>" in scalar(r, "tokenizer.chat_template")
    assert "blk.1.ffn_gate.weight" in t and "blk.0.ffn_gate_exps.weight" not in t
    assert p.stat().st_size < 400_000
    # printable replies: output rows of byte/control/unknown tokens are zero, word pieces are not
    out = np.asarray(t["output.weight"].data, dtype=np.float32)
    _, _, types = vocab()
    assert all(not out[i].any() for i, ty in enumerate(types) if ty != NORMAL)
    assert all(out[i].any() for i, ty in enumerate(types) if ty == NORMAL)


@pytest.mark.parametrize("arch,experts", [("llama", 4), ("qwen3moe", 0)])
def test_moe(tmp_path, arch, experts):
    p = write_tiny(tmp_path / "moe.gguf", arch=arch, n_experts=experts, n_layers=3)
    r, t = fields(p)
    assert scalar(r, f"{arch}.expert_count") == 4
    assert list(t["blk.2.ffn_up_exps.weight"].shape) == [64, 128, 4]     # ne: n_embd, n_ff, n_expert
    if arch == "qwen3moe":
        assert "blk.0.attn_q_norm.weight" in t


def test_general_arch_override_and_seed(tmp_path):
    a = write_tiny(tmp_path / "a.gguf", general_arch="gemma4-assistant")
    assert read_arch(a) == "gemma4-assistant"
    b1 = write_tiny(tmp_path / "b1.gguf", seed=1).read_bytes()
    b2 = write_tiny(tmp_path / "b2.gguf", seed=1).read_bytes()
    c = write_tiny(tmp_path / "c.gguf", seed=2).read_bytes()
    assert b1 == b2 and b1 != c


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        write_tiny(tmp_path / "x.gguf", arch="gemma4")
    with pytest.raises(ValueError):
        write_tiny(tmp_path / "x.gguf", n_embd=65, n_head=2)
