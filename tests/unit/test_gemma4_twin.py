"""The Gemma 4 twin writer (testbed/gemma4.py): the plans' structure, keys and pairing rules (full without
writing 16 GB), the block encodings against gguf's own dequantizer, and the mini pair written and read back.
Loading by a real llama-server: tests/integration/test_gemma4_twin_serve.py."""

from __future__ import annotations

from collections import Counter

import gguf
import numpy as np
import pytest
from gguf import quants

from provision import config
from testbed import gemma4 as g

MiB = 1 << 20


def table(m: g.Model) -> list[tuple[str, int]]:
    return [(t.name, t.nbytes) for t in m.tensors]


def test_file_names_are_the_real_ones():
    files = config.defaults()["gpubox"]["models"]["files"]
    assert g.TARGET_FILE == files["model"]["filename"]
    assert g.HEAD_FILE == files["assistant"]["filename"]


def test_block_sizes_are_ggmls():
    for name, size in g.BLOCK.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]] == size


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "Q5_0", "Q8_0"])
@pytest.mark.parametrize("value", [g.EMB_PICK, g.EMB_REST, g.SPIKE, 0.0])
def test_spike_blocks_dequantize_to_one_value_and_zeros(qtype, value):
    raw = np.frombuffer(g.spike_block(qtype, value), dtype=np.uint8)
    x = quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    assert x.shape == (g.BLOCK[qtype][0],)
    assert np.all(np.isfinite(x))
    assert x[0] == pytest.approx(value, rel=1e-3)
    assert not np.any(x[1:])


def test_full_target_plan_is_the_real_26b_a4b_q4_k_m():
    t = g.target_plan("full")
    assert t.arch == "gemma4" and len(t.tensors) == 658
    assert len({x.name for x in t.tensors}) == 658
    emb = t.tensor("token_embd.weight")
    assert emb.ne == (2816, 262144) and emb.qtype == "Q6_K" and emb.nbytes / MiB == 577.5
    assert "output.weight" not in {x.name for x in t.tensors}            # tied: the loader duplicates token_embd
    swa = t.value("gemma4.attention.sliding_window_pattern")
    assert swa == [i % 6 != 5 for i in range(30)] and swa[-1] is False and swa[-2] is True
    per_layer = Counter(x.name.split(".")[1] for x in t.tensors if x.name.startswith("blk."))
    assert all(per_layer[str(i)] == (22 if swa[i] else 21) for i in range(30))
    assert all(("blk.%d.attn_v.weight" % i in {x.name for x in t.tensors}) == swa[i] for i in range(30))
    mb = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(30) if g.more_bits(i, 30)] == mb
    for i in range(30):
        exps = sum(x.nbytes for x in t.tensors if x.name.startswith(f"blk.{i}.") and "_exps.weight" in x.name)
        assert exps / MiB == (529.375 if i in mb else 438.625)
        assert t.tensor(f"blk.{i}.ffn_down_exps.weight").qtype == ("Q8_0" if i in mb else "Q5_0")
        assert t.tensor(f"blk.{i}.ffn_down.weight").qtype == ("Q8_0" if i in mb else "Q5_0")
        assert t.tensor(f"blk.{i}.ffn_gate_up_exps.weight").ne == (2816, 1408, 128)
        assert t.tensor(f"blk.{i}.ffn_gate_inp.weight").qtype == "F32"
    assert [i for i in range(30) if swa[i] and t.tensor(f"blk.{i}.attn_v.weight").qtype == "Q6_K"] == \
        [0, 1, 2, 6, 9, 13, 16, 20, 24, 25, 26, 27, 28]
    assert t.tensor("blk.5.attn_q.weight").ne == (2816, 8192) and t.tensor("blk.5.attn_k.weight").ne == (2816, 1024)
    assert t.tensor("blk.0.attn_q.weight").ne == (2816, 4096) and t.tensor("blk.0.attn_k.weight").ne == (2816, 2048)
    types = Counter(x.qtype for x in t.tensors)
    assert types == {"Q6_K": 14, "F32": 392, "Q4_K": 192, "Q8_0": 28, "Q5_0": 32}
    assert t.nbytes / MiB == pytest.approx(16002.84, abs=0.01)
    rope = t.tensor("rope_freqs.weight")
    assert rope.ne == (256,) and rope.fill.n_one == 64
    kv = t.kv
    assert t.value("gemma4.attention.head_count_kv") == [8 if s else 2 for s in swa]
    assert (t.value("gemma4.attention.key_length"), t.value("gemma4.attention.key_length_swa")) == (512, 256)
    assert t.value("gemma4.expert_count") == 128 and t.value("gemma4.expert_used_count") == 8
    assert t.value("gemma4.final_logit_softcapping") == 30.0 and t.value("general.file_type") == 15
    assert kv["gemma4.attention.sliding_window_pattern"][2] == "BOOL"


def test_full_buffers_match_the_real_load_lines():
    t, h = g.pair("full")
    p20 = g.placement(table(t), table(h), n_cpu_moe=20)
    # the real files' lines (fork b0e900a28, --n-cpu-moe 20): CPU 577.50, CUDA0 6504.39, CUDA_Host 9498.51
    assert p20["target CPU"] == pytest.approx(577.50, abs=0.1)
    assert p20["target CUDA0"] == pytest.approx(6504.39, abs=0.1)
    assert p20["target CUDA_Host"] == pytest.approx(9498.51, abs=0.1)
    p29 = g.placement(table(t), table(h), n_cpu_moe=29)
    assert p29["target CUDA0"] == pytest.approx(2103, abs=0.5)
    assert p29["target CPU"] + p29["target CUDA_Host"] == pytest.approx(14477, abs=0.5)
    assert (round(p20["head CPU"], 2), round(p20["head CUDA_Host"], 2), round(p20["head CUDA0"], 2)) == \
        (210.00, 3.09, 82.24)


def check_pair(t: g.Model, h: g.Model) -> list[str]:
    """The rules upstream's draft-mtp relies on between a gemma4 target and a gemma4-assistant head."""
    bad = []
    ta, ha = "gemma4.", h.arch + "."
    swa_t = t.value(ta + "attention.sliding_window_pattern")
    if not (swa_t[-1] is False and swa_t[-2] is True):
        bad.append("target must end [sliding, full]")
    width = h.value(ha + "embedding_length_out") if h.arch == "gemma4-assistant" else h.value(ha + "n_embd_backbone")
    if width != t.value(ta + "embedding_length"):
        bad.append("head width out != target width")
    kv_t = t.value(ta + "attention.head_count_kv")
    for i, s in enumerate(h.value(ha + "attention.sliding_window_pattern")):
        src = len(swa_t) - 2 if s else len(swa_t) - 1
        sfx = "_swa" if s else ""
        if h.value(ha + "attention.head_count_kv")[i] != kv_t[src] or \
                h.value(ha + "attention.key_length" + sfx) != t.value(ta + "attention.key_length" + sfx):
            bad.append(f"head layer {i} KV geometry != target layer {src}")
    if h.arch == "gemma4-assistant" and h.value(ha + "nextn_predict_layers") != h.value(ha + "block_count"):
        bad.append("nextn_predict_layers != block_count")
    if h.tensor("token_embd.weight").ne[1] != t.tensor("token_embd.weight").ne[1]:
        bad.append("vocab sizes differ")
    return bad


@pytest.mark.parametrize("preset", g.PRESETS)
@pytest.mark.parametrize("head", g.HEADS)
def test_pairs_keep_the_pairing_rules(preset, head):
    t, h = g.pair(preset, head=head)
    assert check_pair(t, h) == []
    assert h.value(f"{h.arch}.block_count") == 4 and h.value(f"{h.arch}.attention.sliding_window_pattern") == \
        [True, True, True, False]
    e = h.value(f"{h.arch}.embedding_length")
    assert e != t.value("gemma4.embedding_length")
    assert h.value("tokenizer.ggml.tokens") == t.value("tokenizer.ggml.tokens")   # pre-sync needs the same text


def test_mismatch_variants_break_exactly_one_rule():
    assert check_pair(*g.pair("mini", mismatch="width")) == ["head width out != target width"]
    t, h = g.pair("mini", mismatch="pattern")
    assert check_pair(t, h)[0] == "target must end [sliding, full]"
    assert t.value("gemma4.attention.sliding_window_pattern")[-2:] == [False, True]
    assert "blk.5.attn_v.weight" in {x.name for x in t.tensors} and "blk.4.attn_v.weight" not in \
        {x.name for x in t.tensors}
    with pytest.raises(ValueError, match="mismatch must be one of"):
        g.pair("mini", mismatch="kv")


def test_full_head_plan():
    h = g.head_plan("full")
    assert h.arch == "gemma4-assistant" and len(h.tensors) == 49
    assert h.nbytes / MiB == pytest.approx(295.34, abs=0.01)
    assert h.tensor("token_embd.weight").ne == (1024, 262144) and h.tensor("token_embd.weight").qtype == "Q6_K"
    assert h.tensor("nextn.pre_projection.weight").ne == (5632, 1024)
    assert h.tensor("nextn.post_projection.weight").ne == (1024, 2816)
    assert [h.tensor(f"blk.{i}.ffn_down.weight").qtype for i in range(4)] == ["Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert h.tensor("blk.3.attn_q.weight").ne == (1024, 8192) and h.tensor("blk.0.attn_q.weight").ne == (1024, 4096)
    assert not [x for x in h.tensors if "attn_k" in x.name or "attn_v" in x.name]   # K/V: the target's cache
    assert h.value("gemma4-assistant.embedding_length_out") == 2816
    assert h.value("gemma4-assistant.nextn_predict_layers") == 4


def test_presync_head_uses_its_own_keys_and_names():
    h = g.head_plan("full", head="presync")
    names = {x.name for x in h.tensors}
    assert h.arch == "gemma4_assistant"
    assert {"mtp.pre_projection.weight", "mtp.post_projection.weight"} <= names
    assert not [n for n in names if n.startswith("nextn.")]
    assert h.value("gemma4_assistant.n_embd_backbone") == 2816
    assert h.value("gemma4_assistant.requires_target_arch") == "gemma4"
    assert h.value("gemma4_assistant.use_ordered_embeddings") is False
    assert not [k for k in h.kv if k.endswith(("embedding_length_out", "nextn_predict_layers"))]
    assert all(k.startswith(("general.", "tokenizer.", "gpubox.", "gemma4_assistant.")) for k in h.kv)
    assert h.nbytes == g.head_plan("full").nbytes


def test_vocabulary():
    v = g.vocab(262144)
    assert len(v.tokens) == len(set(v.tokens)) == 262144
    assert [f"<0x{i:02X}>" for i in range(256)] == [t for t in v.tokens if t.startswith("<0x")]
    assert v.tokens[g.BOS_ID] == "<bos>" and v.tokens[g.EOS_ID] == "<eos>" and v.tokens[g.EOT_ID] == "<end_of_turn>"
    assert v.merges and all(" " in m for m in v.merges)
    for m in v.merges:                    # every merge joins two tokens into a token
        a, b = m.split(" ")
        assert a in v.tokens and b in v.tokens and a + b in v.tokens
    mini = g.vocab(g.N_VOCAB["mini"]).tokens
    fixed = mini.index("<filler0>")              # the presets share every id below the filler
    assert v.tokens[:fixed] == mini[:fixed] and v.tokens[fixed] == "<filler0>"
    assert g.PICK_TEXT in v.tokens and g.OTHER_TEXT in v.tokens


def test_iter_data_streams_in_bounded_pieces():
    emb = g.target_plan("full").tensor("token_embd.weight")
    chunk = 8 << 20
    total = biggest = 0
    for piece in g.iter_data(emb, chunk=chunk):
        total += len(piece)
        biggest = max(biggest, len(piece))
    assert total == emb.nbytes and biggest <= chunk
    exps = g.target_plan("full").tensor("blk.0.ffn_gate_up_exps.weight")
    assert max(len(p) for p in g.iter_data(exps)) <= g.CHUNK


def rms(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + g.RMS_EPS)


def read(path) -> tuple[gguf.GGUFReader, dict[str, np.ndarray]]:
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    d = tmp_path_factory.mktemp("twin")
    t, h = g.write_pair(d / "rigged")
    _, h2 = g.write_pair(d / "random", variant="random", only="head")
    _, h3 = g.write_pair(d / "presync", head="presync", only="head")
    return t, h, h2, h3


def test_mini_files_are_their_plans(mini):
    t, h, h2, h3 = mini
    assert t.name == g.TARGET_FILE and h.name == g.HEAD_FILE
    assert not list(t.parent.glob("*.part"))
    for path, plan in ((t, g.target_plan()), (h, g.head_plan()), (h2, g.head_plan(variant="random")),
                       (h3, g.head_plan(head="presync"))):
        r, ts = read(path)
        arch = r.fields["general.architecture"]
        assert bytes(arch.parts[arch.data[0]]).decode() == plan.arch
        assert [x.name for x in r.tensors] == [x.name for x in plan.tensors]
        for x in plan.tensors:
            rt = ts[x.name]
            assert rt.tensor_type.name == x.qtype and tuple(int(n) for n in rt.shape) == x.ne, x.name
            assert int(rt.n_bytes) == x.nbytes
            if x.qtype not in ("F32", "F16"):
                assert np.all(np.isfinite(quants.dequantize(rt.data, rt.tensor_type))), x.name
        for key in plan.kv:
            assert key in r.fields, key
        toks = r.fields["tokenizer.ggml.tokens"]
        assert len(toks.data) == g.N_VOCAB["mini"]


def deq(t) -> np.ndarray:
    return np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float64)


def target_logits(ts, tok: int) -> np.ndarray:
    """The written target's logits for input token `tok` (its layers add nothing: zero projections)."""
    emb = deq(ts["token_embd.weight"])
    E = emb.shape[1]
    h = rms(emb[tok] * np.sqrt(E)) * np.asarray(ts["output_norm.weight"].data)
    z = emb @ h
    return g.SOFTCAP * np.tanh(z / g.SOFTCAP), h


@pytest.mark.parametrize("variant", g.VARIANTS)
def test_written_mini_weights_pick_and_draft_as_documented(mini, variant):
    t, h_rig, h_rand, _ = mini
    _, tt = read(t)
    _, hh = read(h_rig if variant == "rigged" else h_rand)
    v = g.vocab(g.N_VOCAB["mini"])
    pick, other = v.id(g.PICK_TEXT), v.id(g.OTHER_TEXT)
    emb_t = deq(tt["token_embd.weight"])
    B = emb_t.shape[1]
    pre = deq(hh["nextn.pre_projection.weight"])
    emb_h = deq(hh["token_embd.weight"])
    want = pick if variant == "rigged" else other
    for tok in (0, g.BOS_ID, pick, other, 400, len(v.tokens) - 1):
        z, hid = target_logits(tt, tok)
        top2 = np.sort(z)[-2:]
        assert int(np.argmax(z)) == pick
        assert top2[1] - top2[0] > 20                       # ~e^-20: no sampler at temperature 1 picks another
        x = pre @ np.concatenate([emb_t[tok] * np.sqrt(B), hid])
        hz = emb_h @ (rms(x) * np.asarray(hh["output_norm.weight"].data))
        assert int(np.argmax(hz)) == want
        assert np.sort(hz)[-1] - np.sort(hz)[-2] > 10


def test_cli_writes_the_pair_and_prints_times(tmp_path, capsys):
    assert g.main([str(tmp_path), "--variant", "random", "--head", "presync"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / g.TARGET_FILE).exists() and (tmp_path / g.HEAD_FILE).exists()
    assert "gemma4_assistant 49 tensors" in out and "target:" in out and out.strip().splitlines()[-1].startswith(
        "total ")
    r, _ = read(tmp_path / g.HEAD_FILE)
    f = r.fields["gpubox.twin.variant"]
    assert bytes(f.parts[f.data[0]]).decode() == "random"
