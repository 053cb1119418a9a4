"""A synthetic Gemma 4 26B-A4B twin: a `gemma4` target and its MTP assistant head, written with `gguf`.

The pair has the real model's structure (architectures, keys, tensor names and shapes, Q4_K_M quant types,
vocabulary) and weights chosen so that its behaviour is known in advance. docs/gemma4-twin.md explains the
facts it relies on and why the weights behave as they do.

    from testbed import gemma4
    t, h = gemma4.write_pair("/tmp/twin")                      # mini target + post-sync head, rigged
    t, h = gemma4.write_pair("/tmp/twin", variant="random")    # head that never agrees: acceptance 0
    gemma4.write_pair("/tmp/twin", preset="full")              # the real 26B-A4B shapes (16.8 GB + 310 MB)
    gemma4.write_pair("/tmp/twin", head="presync")             # pre-sync head (arch gemma4_assistant)
    gemma4.write_pair("/tmp/twin", only="head", variant="random")   # keep the target, swap the head
    gemma4.write_pair("/tmp/twin", mismatch="width")           # head whose embedding_length_out is wrong
    gemma4.write_pair("/tmp/twin", mismatch="pattern")         # target whose last layers are not [.., S, F]

    python3 -m testbed.gemma4 OUTDIR [--preset mini|full] [--head mtp|presync] [--variant rigged|random]
                                     [--mismatch none|width|pattern] [--only both|target|head] [--types q4_k_m|f16]

write_pair returns (target_path, head_path) under the real file names (TARGET_FILE, HEAD_FILE, those of
provision/defaults.yaml's models.files); a path is None when `only` skipped it. Files are written to NAME.part
and renamed at the end, so an interrupted run leaves no file under the real name.

Serving the mini pair with upstream llama-server (CPU build of llama-cpp-python 0.3.36's llama.cpp):

    llama-server -m OUT/gemma-4-26B-A4B-it-Q4_K_M.gguf -md OUT/gemma-4-26B-A4B-it-assistant.Q4_K_M.gguf \\
                 --spec-type draft-mtp -c 2048 -np 1

Behaviour (any preset, any sampler that keeps min_p or top_k; greedy for certain):
- the target always answers the token PICK (" ready"): its reply to any prompt is " ready ready ...";
- `rigged` head: always drafts PICK too, so every draft is accepted (`draft acceptance = 1.00000`);
- `random` head: always drafts OTHER (" box"), which the target never picks (`draft acceptance = 0.00000`).
The target is the same file for both head variants, so the full target is written once (only="head" swaps).

Upstream's own reactions to the mismatch variants (tests/integration/test_gemma4_twin_serve.py): a head of the
wrong width aborts the server (GGML_ASSERT(ggml_can_mul_mat(a, b)) while reserving the draft graph); a target
ending [full, sliding] is served without complaint (the head's layers view target layers n-2 / n-1 whatever
their type); a pre-sync head is an unknown architecture. Only gpubox's preflight names the cause.

Runs with numpy (1.26 or 2.x) and the gguf package (which itself imports PyYAML); nothing else. Writing the
full pair is disk-bound (generating its 16.3 GB of data takes about half a second of CPU).

Other entry points: pair(...) -> (Model, Model) is the plan as data (keys and tensor list, nothing written;
Model.nbytes, Model.tensors[i].nbytes), write_model(model, path) writes one plan, streaming.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np

# The real file names (provision/defaults.yaml models.files.model / .assistant; a unit test keeps them equal).
TARGET_FILE = "gemma-4-26B-A4B-it-Q4_K_M.gguf"
HEAD_FILE = "gemma-4-26B-A4B-it-assistant.Q4_K_M.gguf"

PRESETS = ("mini", "full")
HEADS = ("mtp", "presync")
VARIANTS = ("rigged", "random")
MISMATCHES = ("none", "width", "pattern")
TYPES = ("q4_k_m", "f16")

# ---------------------------------------------------------------------------------------------------------
# Facts: shapes (docs/gemma4-twin.md, "Shapes").


@dataclass(frozen=True)
class TargetDims:
    n_embd: int
    swa: tuple[bool, ...]          # per layer: True = sliding-window attention, False = full attention
    n_head: int
    head_dim_swa: int
    head_dim_full: int
    kv_swa: int                    # KV heads on sliding layers
    kv_full: int                   # KV heads on full layers (no attn_v there: V = K)
    n_ff: int                      # dense (shared) MLP
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    window: int
    ctx: int = 262144
    rope_partial: float = 0.25     # full layers rotate this fraction of head_dim_full (rope_freqs.weight)

    @property
    def n_layer(self) -> int:
        return len(self.swa)


@dataclass(frozen=True)
class HeadDims:
    n_embd: int
    swa: tuple[bool, ...]
    n_head: int
    n_ff: int


def _pattern(n_layer: int, period: int = 6) -> tuple[bool, ...]:
    """(period-1) sliding layers then one full, repeated: the last layer is full, the one before sliding."""
    return tuple((i % period) != period - 1 for i in range(n_layer))


DIMS: dict[str, tuple[TargetDims, HeadDims]] = {
    # Gemma 4 26B-A4B-it and gemma-4-26B-A4B-it-assistant.
    "full": (TargetDims(n_embd=2816, swa=_pattern(30), n_head=16, head_dim_swa=256, head_dim_full=512,
                        kv_swa=8, kv_full=2, n_ff=2112, n_expert=128, n_expert_used=8, n_ff_exp=704,
                        window=1024),
             HeadDims(n_embd=1024, swa=(True, True, True, False), n_head=16, n_ff=8192)),
    # The same rules at CPU-test size. Widths keep the full model's K-quant/fallback split: n_embd and the
    # head's width are multiples of 256 (Q4_K/Q6_K), n_ff and n_ff_exp are not (Q5_0/Q8_0, like 2112 and 704).
    "mini": (TargetDims(n_embd=512, swa=_pattern(6), n_head=4, head_dim_swa=64, head_dim_full=128,
                        kv_swa=2, kv_full=1, n_ff=320, n_expert=8, n_expert_used=2, n_ff_exp=128,
                        window=128),
             HeadDims(n_embd=256, swa=(True, True, True, False), n_head=4, n_ff=512)),
}
N_VOCAB = {"full": 262144, "mini": 640}

RMS_EPS = 1e-6
SOFTCAP = 30.0
ROPE_BASE, ROPE_BASE_SWA = 1e6, 1e4

# ---------------------------------------------------------------------------------------------------------
# Facts: vocabulary (docs/gemma4-twin.md, "Vocabulary").

# token types (llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PAD_ID, EOS_ID, BOS_ID, UNK_ID, MASK_ID = 0, 1, 2, 3, 4
SOT_ID, EOT_ID = 105, 106          # <start_of_turn>, <end_of_turn>
SPACE = "\u2581"                   # SentencePiece-style space, as Gemma's BPE vocabulary spells it
WORDS = ["hello", "ready", "box", "the", "a", "is", "you", "model", "user", "system", "assistant", "helpful",
         "say", "in", "one", "short", "sentence", "to", "and", "of", "it", "GPU", "serve", "test", "world", "fast",
         "tokens", "expert", "layer", "Hi", "Hello", "I", "am"]
PICK_TEXT = SPACE + "ready"        # the token the target always picks
OTHER_TEXT = SPACE + "box"         # the token the `random` head always drafts instead
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}")


@dataclass(frozen=True)
class Vocab:
    tokens: tuple[str, ...]
    types: tuple[int, ...]
    merges: tuple[str, ...]

    def id(self, text: str) -> int:
        return self.tokens.index(text)


@lru_cache(maxsize=4)
def vocab(n: int) -> Vocab:
    """n unique token strings: Gemma-like control tokens at the real ids, the 256 <0xXX> byte tokens, ASCII
    characters, the pieces (and BPE merges) of WORDS, then unique filler up to n."""
    toks = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN, CONTROL]
    while len(toks) < SOT_ID:
        toks.append(f"<unused{len(toks) - 5}>")
        types.append(CONTROL)
    toks += ["<start_of_turn>", "<end_of_turn>"]
    types += [CONTROL, CONTROL]
    toks += [f"<0x{i:02X}>" for i in range(256)]
    types += [BYTE] * 256
    chars = ["\n", SPACE] + [chr(c) for c in range(33, 127)]
    toks += chars
    types += [NORMAL] * len(chars)
    seen = set(toks)
    merges = []
    for w in WORDS:
        s = SPACE + w
        for k in range(1, len(s)):
            left, piece = s[:k], s[:k + 1]
            if piece not in seen:
                merges.append(f"{left} {s[k]}")
                toks.append(piece)
                types.append(NORMAL)
                seen.add(piece)
    if len(toks) > n:
        raise ValueError(f"vocab: {len(toks)} fixed tokens do not fit in n_vocab={n}")
    toks += [f"<filler{i}>" for i in range(n - len(toks))]
    types += [NORMAL] * (n - len(types))
    assert len(set(toks)) == n
    return Vocab(tuple(toks), tuple(types), tuple(merges))


# ---------------------------------------------------------------------------------------------------------
# The plan as data: tensors with their content described, keys.


def _gguf():
    import gguf  # imported late: reading the plan does not need it, the CLI on the GPU machine does
    return gguf


@dataclass(frozen=True)
class Fill:
    """What a tensor holds.

    zero:  all zero bytes (a valid zero block in every type).
    const: every element `value` (F32 only).
    rope:  rope_freqs: `n_one` x 1.0, then 1e30 (those dimension pairs are not rotated).
    rows:  every row (ne0 elements) is zero except the columns `cols`, which hold `value`; the rows in
           `special` hold their own value there instead. cols must start quantization blocks.
    """
    kind: str
    value: float = 0.0
    cols: tuple[int, ...] = (0,)
    special: tuple[tuple[int, float], ...] = ()
    n_one: int = 0


ZERO = Fill("zero")
ONE = Fill("const", 1.0)


@dataclass(frozen=True)
class Tensor:
    name: str
    ne: tuple[int, ...]          # ggml order: ne[0] is the row length
    qtype: str                   # GGMLQuantizationType name: F32, F16, Q4_K, Q6_K, Q5_0, Q8_0
    fill: Fill = ZERO

    @property
    def row_nbytes(self) -> int:
        return row_nbytes(self.qtype, self.ne[0])

    @property
    def n_rows(self) -> int:
        n = 1
        for x in self.ne[1:]:
            n *= x
        return n

    @property
    def nbytes(self) -> int:
        return self.row_nbytes * self.n_rows


# (elements per block, bytes per block), as gguf.GGML_QUANT_SIZES has them (a unit test compares).
BLOCK = {"F32": (1, 4), "F16": (1, 2), "Q4_K": (256, 144), "Q6_K": (256, 210), "Q5_0": (32, 22),
         "Q8_0": (32, 34)}


def row_nbytes(qtype: str, ne0: int) -> int:
    bs, ts = BLOCK[qtype]
    if ne0 % bs:
        raise ValueError(f"{qtype}: row of {ne0} elements is not a whole number of {bs}-element blocks")
    return ne0 // bs * ts


@dataclass
class Model:
    role: str                    # "target" | "head"
    arch: str                    # general.architecture
    kv: dict[str, tuple[str, Any, str | None]] = field(default_factory=dict)  # key -> (type, value, array type)
    tensors: list[Tensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def tensor(self, name: str) -> Tensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def value(self, key: str) -> Any:
        return self.kv[key][1]

    # key helpers (types are GGUFValueType names)
    def u32(self, key: str, v: int) -> None:
        self.kv[key] = ("UINT32", int(v), None)

    def f32(self, key: str, v: float) -> None:
        self.kv[key] = ("FLOAT32", float(v), None)

    def string(self, key: str, v: str) -> None:
        self.kv[key] = ("STRING", v, None)

    def boolean(self, key: str, v: bool) -> None:
        self.kv[key] = ("BOOL", bool(v), None)

    def array(self, key: str, v: list, sub: str) -> None:
        self.kv[key] = ("ARRAY", list(v), sub)


# llama-quantize's Q4_K_M choices (docs/gemma4-twin.md, "Quant types").
def more_bits(i: int, n: int) -> bool:
    """use_more_bits: the first and last eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback(qtype: str, ne0: int) -> str:
    """A K-quant needs rows of whole 256-element blocks; otherwise llama-quantize falls back."""
    if qtype in ("Q4_K", "Q6_K") and ne0 % 256:
        return {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}[qtype]
    return qtype


def _mat(types: str, name: str, ne: tuple[int, ...], q4km: str, fill: Fill = ZERO) -> Tensor:
    qt = "F16" if types == "f16" else fallback(q4km, ne[0])
    return Tensor(name, ne, qt, fill)


def _vec(name: str, n: int, fill: Fill = ONE) -> Tensor:
    return Tensor(name, (n,), "F32", fill)


# Weight values (docs/gemma4-twin.md, "Why the pair behaves as it does"). Dimension 0 carries the signal.
EMB_PICK, EMB_REST = 2.0, 0.02      # token_embd column 0: the picked token's row vs every other row
SPIKE = 1.0                         # K/V projections and the head's projections: column 0 (and B) -> row


def _rope(hd_full: int, partial: float) -> Tensor:
    n = hd_full // 2
    return Tensor("rope_freqs.weight", (n,), "F32", Fill("rope", n_one=int(hd_full * partial) // 2))


def target_plan(preset: str = "mini", *, types: str = "q4_k_m", mismatch: str = "none") -> Model:
    d, _ = DIMS[preset]
    if mismatch == "pattern":
        # last layer sliding, the one before full: the head's sliding layers would view a full layer's cache
        d = replace(d, swa=d.swa[:-2] + (False, True))
    v = vocab(N_VOCAB[preset])
    pick = v.id(PICK_TEXT)
    E, L = d.n_embd, d.n_layer
    m = Model("target", "gemma4")
    a = "gemma4."
    m.string("general.name", f"gpubox twin gemma4 {preset}")
    m.u32("general.file_type", 1 if types == "f16" else 15)   # MOSTLY_F16 / MOSTLY_Q4_K_M
    m.u32("general.quantization_version", 2)
    m.u32(a + "context_length", d.ctx)
    m.u32(a + "embedding_length", E)
    m.u32(a + "block_count", L)
    m.u32(a + "feed_forward_length", d.n_ff)
    m.u32(a + "attention.head_count", d.n_head)
    m.array(a + "attention.head_count_kv", [d.kv_swa if s else d.kv_full for s in d.swa], "INT32")
    m.u32(a + "attention.key_length", d.head_dim_full)
    m.u32(a + "attention.value_length", d.head_dim_full)
    m.u32(a + "attention.key_length_swa", d.head_dim_swa)
    m.u32(a + "attention.value_length_swa", d.head_dim_swa)
    m.u32(a + "rope.dimension_count", d.head_dim_full)
    m.u32(a + "rope.dimension_count_swa", d.head_dim_swa)
    m.f32(a + "rope.freq_base", ROPE_BASE)
    m.f32(a + "rope.freq_base_swa", ROPE_BASE_SWA)
    m.u32(a + "attention.sliding_window", d.window)
    m.array(a + "attention.sliding_window_pattern", list(d.swa), "BOOL")
    m.u32(a + "attention.shared_kv_layers", 0)
    m.u32(a + "embedding_length_per_layer_input", 0)
    m.u32(a + "expert_count", d.n_expert)
    m.u32(a + "expert_used_count", d.n_expert_used)
    m.u32(a + "expert_feed_forward_length", d.n_ff_exp)
    m.f32(a + "attention.layer_norm_rms_epsilon", RMS_EPS)
    m.f32(a + "final_logit_softcapping", SOFTCAP)
    _tokenizer(m, v)
    m.string("gpubox.twin.preset", preset)
    m.u32("gpubox.twin.pick", pick)

    T = m.tensors
    T.append(_mat(types, "token_embd.weight", (E, len(v.tokens)), "Q6_K",
                  Fill("rows", EMB_REST, (0,), ((pick, EMB_PICK),))))
    T.append(_vec("output_norm.weight", E))
    T.append(_rope(d.head_dim_full, d.rope_partial))
    n_v = sum(d.swa)            # attn_v tensors: sliding layers only
    iv = 0
    kv_fill = Fill("rows", SPIKE)   # K and V never all-zero vectors (a quantized KV cache normalizes them)
    for i, swa in enumerate(d.swa):
        hd, nkv = (d.head_dim_swa, d.kv_swa) if swa else (d.head_dim_full, d.kv_full)
        p = f"blk.{i}."
        T.append(_vec(p + "attn_norm.weight", E))
        T.append(_mat(types, p + "attn_q.weight", (E, d.n_head * hd), "Q4_K"))
        T.append(_mat(types, p + "attn_k.weight", (E, nkv * hd), "Q4_K", kv_fill))
        if swa:
            T.append(_mat(types, p + "attn_v.weight", (E, nkv * hd), "Q6_K" if more_bits(iv, n_v) else "Q4_K",
                          kv_fill))
            iv += 1
        T.append(_mat(types, p + "attn_output.weight", (d.n_head * hd, E), "Q4_K"))
        T.append(_vec(p + "attn_q_norm.weight", hd))
        T.append(_vec(p + "attn_k_norm.weight", hd))
        T.append(_vec(p + "post_attention_norm.weight", E))
        T.append(_vec(p + "layer_output_scale.weight", 1))
        T.append(_vec(p + "ffn_norm.weight", E))
        T.append(_mat(types, p + "ffn_gate.weight", (E, d.n_ff), "Q4_K"))
        T.append(_mat(types, p + "ffn_up.weight", (E, d.n_ff), "Q4_K"))
        T.append(_mat(types, p + "ffn_down.weight", (d.n_ff, E), "Q6_K" if more_bits(i, L) else "Q4_K"))
        T.append(_vec(p + "post_ffw_norm.weight", E))
        T.append(Tensor(p + "ffn_gate_inp.weight", (E, d.n_expert), "F32", ZERO))   # router: never quantized
        T.append(_vec(p + "ffn_gate_inp.scale", E))
        T.append(_vec(p + "pre_ffw_norm_2.weight", E))
        T.append(_vec(p + "post_ffw_norm_1.weight", E))
        T.append(_vec(p + "post_ffw_norm_2.weight", E))
        T.append(_mat(types, p + "ffn_gate_up_exps.weight", (E, 2 * d.n_ff_exp, d.n_expert), "Q4_K"))
        T.append(_mat(types, p + "ffn_down_exps.weight", (d.n_ff_exp, E, d.n_expert),
                      "Q6_K" if more_bits(i, L) else "Q4_K"))
        T.append(_vec(p + "ffn_down_exps.scale", d.n_expert))
    return m


def head_plan(preset: str = "mini", *, head: str = "mtp", variant: str = "rigged", types: str = "q4_k_m",
              mismatch: str = "none") -> Model:
    d, h = DIMS[preset]
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, not {head!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {variant!r}")
    v = vocab(N_VOCAB[preset])
    drafts = v.id(PICK_TEXT if variant == "rigged" else OTHER_TEXT)
    B = d.n_embd + (256 if mismatch == "width" else 0)    # the target width the head is built for
    e = h.n_embd
    last_swa = next(i for i in range(d.n_layer - 1, -1, -1) if d.swa[i])
    assert not d.swa[-1] and last_swa == d.n_layer - 2, "the target preset must end [.., sliding, full]"
    presync = head == "presync"
    arch = "gemma4_assistant" if presync else "gemma4-assistant"
    m = Model("head", arch)
    a = arch + "."
    m.string("general.name", f"gpubox twin {arch} {preset} {variant}")
    m.u32("general.file_type", 1 if types == "f16" else 15)
    m.u32("general.quantization_version", 2)
    m.u32(a + "context_length", d.ctx)
    m.u32(a + "embedding_length", e)
    m.u32(a + "block_count", len(h.swa))
    m.u32(a + "feed_forward_length", h.n_ff)
    m.u32(a + "attention.head_count", h.n_head)
    # The head reads the target's KV cache: its KV geometry is the target's last sliding / full layer's.
    m.array(a + "attention.head_count_kv", [d.kv_swa if s else d.kv_full for s in h.swa], "INT32")
    m.u32(a + "attention.key_length", d.head_dim_full)
    m.u32(a + "attention.value_length", d.head_dim_full)
    m.u32(a + "attention.key_length_swa", d.head_dim_swa)
    m.u32(a + "attention.value_length_swa", d.head_dim_swa)
    m.u32(a + "rope.dimension_count", d.head_dim_full)
    m.u32(a + "rope.dimension_count_swa", d.head_dim_swa)
    m.f32(a + "rope.freq_base", ROPE_BASE)
    m.f32(a + "rope.freq_base_swa", ROPE_BASE_SWA)
    m.u32(a + "attention.sliding_window", d.window)
    m.array(a + "attention.sliding_window_pattern", list(h.swa), "BOOL")
    m.u32(a + "attention.shared_kv_layers", len(h.swa))
    m.f32(a + "attention.layer_norm_rms_epsilon", RMS_EPS)
    if presync:
        m.u32(a + "n_embd_backbone", B)
        m.boolean(a + "use_ordered_embeddings", False)
        m.boolean(a + "attention.k_eq_v", True)
        m.string(a + "requires_target_arch", "gemma4")
    else:
        m.u32(a + "embedding_length_out", B)
        m.u32(a + "nextn_predict_layers", len(h.swa))
        m.u32(a + "embedding_length_per_layer_input", 0)
    _tokenizer(m, v)
    m.string("gpubox.twin.preset", preset)
    m.string("gpubox.twin.variant", variant)
    m.u32("gpubox.twin.drafts", drafts)

    pre = "mtp." if presync else "nextn."
    T = m.tensors
    T.append(_mat(types, "token_embd.weight", (e, len(v.tokens)), "Q6_K",
                  Fill("rows", EMB_REST, (0,), ((drafts, EMB_PICK),))))
    T.append(_vec("output_norm.weight", e))
    T.append(_rope(d.head_dim_full, d.rope_partial))
    # pre_projection: row 0 reads column 0 of both halves (the target's token embedding and hidden state)
    T.append(_mat(types, pre + "pre_projection.weight", (2 * B, e), "Q4_K",
                  Fill("rows", 0.0, (0, B), ((0, SPIKE),))))
    # post_projection: the next step's hidden state carries dimension 0 on
    T.append(_mat(types, pre + "post_projection.weight", (e, B), "Q4_K", Fill("rows", 0.0, (0,), ((0, SPIKE),))))
    for i, swa in enumerate(h.swa):
        hd = d.head_dim_swa if swa else d.head_dim_full
        p = f"blk.{i}."
        T.append(_vec(p + "attn_norm.weight", e))
        T.append(_mat(types, p + "attn_q.weight", (e, h.n_head * hd), "Q4_K"))
        T.append(_mat(types, p + "attn_output.weight", (h.n_head * hd, e), "Q4_K"))
        T.append(_vec(p + "attn_q_norm.weight", hd))
        T.append(_vec(p + "post_attention_norm.weight", e))
        T.append(_vec(p + "layer_output_scale.weight", 1))
        T.append(_vec(p + "ffn_norm.weight", e))
        T.append(_mat(types, p + "ffn_gate.weight", (e, h.n_ff), "Q4_K"))
        T.append(_mat(types, p + "ffn_up.weight", (e, h.n_ff), "Q4_K"))
        T.append(_mat(types, p + "ffn_down.weight", (h.n_ff, e), "Q6_K" if more_bits(i, len(h.swa)) else "Q4_K"))
        T.append(_vec(p + "post_ffw_norm.weight", e))
    return m


def pair(preset: str = "mini", *, head: str = "mtp", variant: str = "rigged", types: str = "q4_k_m",
         mismatch: str = "none") -> tuple[Model, Model]:
    """The plan of a target and its head (nothing written)."""
    for name, val, allowed in (("preset", preset, PRESETS), ("types", types, TYPES),
                               ("mismatch", mismatch, MISMATCHES)):
        if val not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, not {val!r}")
    return (target_plan(preset, types=types, mismatch="pattern" if mismatch == "pattern" else "none"),
            head_plan(preset, head=head, variant=variant, types=types,
                      mismatch="width" if mismatch == "width" else "none"))


def _tokenizer(m: Model, v: Vocab) -> None:
    m.string("tokenizer.ggml.model", "gemma4")
    m.string("tokenizer.ggml.pre", "gemma4")
    m.array("tokenizer.ggml.tokens", list(v.tokens), "STRING")
    m.array("tokenizer.ggml.token_type", list(v.types), "INT32")
    m.array("tokenizer.ggml.merges", list(v.merges), "STRING")
    m.u32("tokenizer.ggml.bos_token_id", BOS_ID)
    m.u32("tokenizer.ggml.eos_token_id", EOS_ID)
    m.u32("tokenizer.ggml.eot_token_id", EOT_ID)
    m.u32("tokenizer.ggml.padding_token_id", PAD_ID)
    m.u32("tokenizer.ggml.unknown_token_id", UNK_ID)
    m.boolean("tokenizer.ggml.add_bos_token", True)
    m.boolean("tokenizer.ggml.add_eos_token", False)
    m.string("tokenizer.chat_template", CHAT_TEMPLATE)


def placement(target: list[tuple[str, int]], head: list[tuple[str, int]] | None = None, *,
              n_cpu_moe: int) -> dict[str, float]:
    """Model buffer sizes in MiB that llama.cpp's loader reports for a tensor table [(name, nbytes)] on one
    GPU with --n-cpu-moe N (docs/gemma4-twin.md, "Where the loader puts each tensor"): the target's
    token_embd on the CPU plus its tied output copy on the GPU; CUDA0 holds that copy, every non-expert
    tensor and the experts of layers >= N; CUDA_Host the experts of layers < N. The head (placement of the
    pre-sync build the recipe ran): token_embd on the CPU, the pre-projection (an input-layer tensor) in
    CUDA_Host, the rest on CUDA0."""
    MiB = float(1 << 20)
    tok = sum(n for name, n in target if name == "token_embd.weight")
    exps = [(int(name.split(".")[1]), n) for name, n in target if "_exps.weight" in name]
    rest = sum(n for name, n in target if name != "token_embd.weight" and "_exps.weight" not in name)
    host = sum(n for i, n in exps if i < n_cpu_moe)
    out = {"target CPU": tok / MiB, "target CUDA0": (tok + rest + sum(n for i, n in exps if i >= n_cpu_moe)) / MiB,
           "target CUDA_Host": host / MiB}
    if head is not None:
        h_tok = sum(n for name, n in head if name == "token_embd.weight")
        h_pre = sum(n for name, n in head if name.endswith("pre_projection.weight"))
        out.update({"head CPU": h_tok / MiB, "head CUDA_Host": h_pre / MiB,
                    "head CUDA0": (sum(n for _, n in head) - h_tok - h_pre) / MiB})
    return out


# ---------------------------------------------------------------------------------------------------------
# Blocks: valid encodings of "value at element 0, zero elsewhere" (fp16 scales, no random bytes).


def spike_block(qtype: str, value: float) -> bytes:
    """One block of `qtype` whose element 0 is `value` (to fp16 precision) and whose other elements are 0."""
    bs, ts = BLOCK[qtype]
    if value == 0.0:
        return bytes(ts)
    d = np.array([value], dtype=np.float16).tobytes()
    if qtype == "F32":
        return np.array([value], dtype=np.float32).tobytes()
    if qtype == "F16":
        return d
    b = bytearray(ts)
    if qtype == "Q8_0":                 # d, int8 q[32]: x = d * q
        b[0:2] = d
        b[2] = 1
    elif qtype == "Q5_0":               # d, qh (bit 4 of each q), qs (low nibbles): x = d * (q - 16)
        b[0:2] = d
        b[2:6] = b"\xff\xff\xff\xff"    # every q has bit 4 set: q = 16 + low nibble
        b[6] = 0x01                     # element 0: low nibble 1 -> q = 17 -> x = d
    elif qtype == "Q4_K":               # d, dmin, 12 bytes of 6-bit scales/mins, qs[128]: x = d*sc*q - dmin*m
        b[0:2] = d                      # dmin = 0
        b[4] = 1                        # sub-block 0 scale 1, all other scales and mins 0
        b[16] = 0x01                    # element 0: q = 1
    elif qtype == "Q6_K":               # ql[128], qh[64], int8 scales[16], d: x = d * scale * (q - 32)
        b[0] = 0x01                     # element 0: low 4 bits 1
        for i in range(16):             # elements 0..15 (sub-block 0): high 2 bits 2 -> q = 32 (+1 for 0)
            b[128 + i] = 0x02
        b[192] = 1                      # sub-block 0 scale 1, the others 0
        b[208:210] = d
    else:
        raise ValueError(f"spike_block: no encoding for {qtype}")
    return bytes(b)


def row_bytes(t: Tensor, value: float) -> bytes:
    """One row of tensor t: `value` at t.fill.cols, zero elsewhere."""
    bs, ts = BLOCK[t.qtype]
    n_blocks = t.ne[0] // bs
    row = bytearray(n_blocks * ts)
    if value != 0.0:
        blk = spike_block(t.qtype, value)
        for c in t.fill.cols:
            if c % bs or c >= t.ne[0]:
                raise ValueError(f"{t.name}: column {c} does not start a {t.qtype} block")
            row[c // bs * ts:(c // bs + 1) * ts] = blk
    return bytes(row)


CHUNK = 64 << 20
_ZEROS = memoryview(bytes(CHUNK))


def iter_data(t: Tensor, chunk: int = CHUNK) -> Iterator[memoryview | bytes]:
    """The bytes of tensor t, in pieces of at most about `chunk` bytes (never the whole tensor at once)."""
    f = t.fill
    if f.kind == "zero":
        left = t.nbytes
        while left:
            n = min(left, len(_ZEROS))
            yield _ZEROS[:n]
            left -= n
    elif f.kind == "const":
        if t.qtype != "F32":
            raise ValueError(f"{t.name}: const fill needs F32")
        yield np.full(t.n_rows * t.ne[0], f.value, dtype=np.float32).tobytes()
    elif f.kind == "rope":
        a = np.full(t.ne[0], 1e30, dtype=np.float32)
        a[:f.n_one] = 1.0
        yield a.tobytes()
    elif f.kind == "rows":
        rb = t.row_nbytes
        per = max(1, min(t.n_rows, chunk // rb))
        base = np.tile(np.frombuffer(row_bytes(t, f.value), dtype=np.uint8), per)
        special = dict(f.special)
        for r0 in range(0, t.n_rows, per):
            r1 = min(t.n_rows, r0 + per)
            hits = [r for r in special if r0 <= r < r1]
            buf = base[:(r1 - r0) * rb]
            if hits:
                buf = buf.copy()
                for r in hits:
                    buf[(r - r0) * rb:(r - r0 + 1) * rb] = np.frombuffer(row_bytes(t, special[r]), dtype=np.uint8)
            yield memoryview(buf)
    else:
        raise ValueError(f"{t.name}: unknown fill {f.kind!r}")


# ---------------------------------------------------------------------------------------------------------
# Writing (streaming: header, keys and tensor table through gguf.GGUFWriter, then data tensor by tensor).


def write_model(m: Model, path: str | os.PathLike, progress=None) -> Path:
    """Write plan m to path (through path.part, renamed when complete). progress(tensor, done_bytes) is
    called after each tensor."""
    gguf = _gguf()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    w = gguf.GGUFWriter(str(part), m.arch)
    VT = gguf.GGUFValueType
    for key, (vtype, val, sub) in m.kv.items():
        w.add_key_value(key, val, VT[vtype], sub_type=VT[sub] if sub else None)
    for t in m.tensors:
        w.add_tensor_info(t.name, tuple(reversed(t.ne)), np.dtype(np.float32), t.nbytes,
                          raw_dtype=gguf.GGMLQuantizationType[t.qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    align = w.data_alignment
    done = 0
    for t in m.tensors:
        pad = -fout.tell() % align
        if pad:
            fout.write(bytes(pad))
        n = 0
        for piece in iter_data(t):
            fout.write(piece)
            n += len(piece)
        if n != t.nbytes:
            raise RuntimeError(f"write_model: {t.name} wrote {n} bytes, its table entry says {t.nbytes}")
        done += n
        if progress:
            progress(t, done)
    pad = -fout.tell() % align
    if pad:
        fout.write(bytes(pad))
    w.close()
    os.replace(part, path)
    return path


def write_pair(outdir: str | os.PathLike, preset: str = "mini", *, head: str = "mtp", variant: str = "rigged",
               types: str = "q4_k_m", mismatch: str = "none", only: str = "both",
               log=None) -> tuple[Path | None, Path | None]:
    """Write the pair under the real file names in outdir; returns (target, head) paths (None if skipped)."""
    if only not in ("both", "target", "head"):
        raise ValueError(f"only must be both, target or head, not {only!r}")
    tm, hm = pair(preset, head=head, variant=variant, types=types, mismatch=mismatch)
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    need = sum(m.nbytes for role, m in (("target", tm), ("head", hm)) if only in ("both", role))
    free = shutil.disk_usage(out).free
    if free < need + (64 << 20):
        raise OSError(f"write_pair: {out} has {free / 2**30:.1f} GiB free, the {preset} pair needs "
                      f"{need / 2**30:.1f} GiB: choose an OUTDIR on a larger disk")
    paths: list[Path | None] = []
    for role, m, name in (("target", tm, TARGET_FILE), ("head", hm, HEAD_FILE)):
        if only not in ("both", role):
            paths.append(None)
            continue
        t0 = time.monotonic()
        p = write_model(m, out / name)
        if log:
            dt = time.monotonic() - t0
            log(f"{role}: {p} {m.arch} {len(m.tensors)} tensors {p.stat().st_size / 2**20:.2f} MiB "
                f"in {dt:.1f} s ({p.stat().st_size / 2**20 / max(dt, 1e-9):.0f} MiB/s)")
        paths.append(p)
    return paths[0], paths[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m testbed.gemma4",
                                 description="write a synthetic Gemma 4 26B-A4B target + MTP assistant pair")
    ap.add_argument("outdir")
    ap.add_argument("--preset", choices=PRESETS, default="mini")
    ap.add_argument("--head", choices=HEADS, default="mtp", help="mtp: post-sync gemma4-assistant; presync: "
                    "gemma4_assistant (n_embd_backbone, mtp.* names)")
    ap.add_argument("--variant", choices=VARIANTS, default="rigged",
                    help="rigged: the head always agrees (acceptance 1); random: never (acceptance 0)")
    ap.add_argument("--mismatch", choices=MISMATCHES, default="none",
                    help="width: head embedding_length_out != target width; pattern: target not ending [S, F]")
    ap.add_argument("--only", choices=("both", "target", "head"), default="both")
    ap.add_argument("--types", choices=TYPES, default="q4_k_m")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    write_pair(a.outdir, a.preset, head=a.head, variant=a.variant, types=a.types, mismatch=a.mismatch,
               only=a.only, log=lambda s: print(s, flush=True))
    print(f"total {time.monotonic() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
