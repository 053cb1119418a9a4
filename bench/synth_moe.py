#!/usr/bin/env python3
"""Write a synthetic qwen3moe GGUF of realistic shape for the tune benchmark (numpy + standard library).

Shaped like a 30B-A3B by default (48 layers, n_embd 2048, 128 experts / 8 used, expert FFN 768, 32 query /
4 KV heads of dim 128, vocabulary 151,936), experts and attention Q4_K, norms F32: about 17.3 GB (16.1 GiB),
579 tensors, as in docs/tuning.md. Weight values do not change speed or memory, so:

- experts, attention and the dense FFN are all-zero Q4_K blocks (a zero f16 scale is a valid block); they
  are left as holes in a sparse file, so writing takes seconds and reading them costs no disk;
- token_embd and output are small random Q4_K blocks (finite f16 scales), the routers (ffn_gate_inp) random
  F32 so different tokens pick different experts, norms are ones: no NaN can appear;
- the vocabulary is SentencePiece-style: <unk> <s> </s>, 256 byte tokens, <|im_start|>/<|im_end|>, then
  filler pieces; with a ChatML template so /v1/chat/completions works.

It does not need the `gguf` package (the GPU machine is offline): the writer below follows the GGUF v3
layout (header, key/values, tensor table, 32-byte aligned data). A 2-layer, small-vocabulary copy is
checked on the CPU build before any GPU time is spent:

    python bench/synth_moe.py /tmp/synth2.gguf --layers 2 --vocab 4096
    python bench/synth_moe.py /data/synth-30b.gguf                       # the GPU benchmark's model
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np

# ggml types and their (elements per block, bytes per block).
F32, F16, Q4_K = 0, 1, 12
BLOCK = {F32: (1, 4), F16: (1, 2), Q4_K: (256, 144)}
# GGUF metadata value types.
T_U32, T_I32, T_F32, T_BOOL, T_STR, T_ARR = 4, 5, 6, 7, 8, 9
ALIGN = 32
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _s(x: str) -> bytes:
    b = x.encode()
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, value) -> bytes:
    out = _s(key) + struct.pack("<I", vtype)
    if vtype == T_STR:
        return out + _s(value)
    if vtype == T_U32:
        return out + struct.pack("<I", value)
    if vtype == T_I32:
        return out + struct.pack("<i", value)
    if vtype == T_F32:
        return out + struct.pack("<f", value)
    if vtype == T_BOOL:
        return out + struct.pack("<?", value)
    if vtype == T_ARR:
        etype, items = value
        out += struct.pack("<IQ", etype, len(items))
        if etype == T_STR:
            return out + b"".join(_s(i) for i in items)
        if etype == T_F32:
            return out + np.asarray(items, dtype="<f4").tobytes()
        if etype == T_I32:
            return out + np.asarray(items, dtype="<i4").tobytes()
    raise ValueError(f"unsupported value type {vtype}")


def nbytes(shape: tuple[int, ...], ttype: int) -> int:
    per, size = BLOCK[ttype]
    n = 1
    for d in shape:
        n *= d
    if shape[0] % per:
        raise ValueError(f"first dimension {shape[0]} is not a multiple of {per} for type {ttype}")
    return n // per * size


def vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + ["<|im_start|>", "<|im_end|>"]
    types = [2, 3, 3] + [6] * 256 + [3, 3]
    words = ["the", "a", "model", "expert", "layer", "token", "GPU", "memory", "fits", "ok"]
    pieces = ["\u2581" + w for w in words] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens += pieces
    types += [1] * len(pieces)
    i = 0
    while len(tokens) < n_vocab:
        tokens.append(f"\u2581f{i}")
        types.append(1)
        i += 1
    tokens, types = tokens[:n_vocab], types[:n_vocab]
    scores = [0.0 if t != 1 else -float(j) for j, t in enumerate(types)]
    return tokens, scores, types


def tensor_plan(a) -> list[tuple[str, tuple[int, ...], int, str]]:
    """(name, ggml shape ne0-first, type, fill) for every tensor; fill is zero, ones, rand_q4k or rand_f32."""
    hd = a.head_dim
    t = [("token_embd.weight", (a.embd, a.vocab), Q4_K, "rand_q4k"),
         ("output_norm.weight", (a.embd,), F32, "ones"),
         ("output.weight", (a.embd, a.vocab), Q4_K, "rand_q4k")]
    for i in range(a.layers):
        p = f"blk.{i}."
        t += [(p + "attn_norm.weight", (a.embd,), F32, "ones"),
              (p + "attn_q.weight", (a.embd, a.heads * hd), Q4_K, "zero"),
              (p + "attn_k.weight", (a.embd, a.kv_heads * hd), Q4_K, "zero"),
              (p + "attn_v.weight", (a.embd, a.kv_heads * hd), Q4_K, "zero"),
              (p + "attn_output.weight", (a.heads * hd, a.embd), Q4_K, "zero"),
              (p + "attn_q_norm.weight", (hd,), F32, "ones"),
              (p + "attn_k_norm.weight", (hd,), F32, "ones"),
              (p + "ffn_norm.weight", (a.embd,), F32, "ones"),
              (p + "ffn_gate_inp.weight", (a.embd, a.experts), F32, "rand_f32"),
              (p + "ffn_gate_exps.weight", (a.embd, a.ff_exp, a.experts), Q4_K, "zero"),
              (p + "ffn_down_exps.weight", (a.ff_exp, a.embd, a.experts), Q4_K, "zero"),
              (p + "ffn_up_exps.weight", (a.embd, a.ff_exp, a.experts), Q4_K, "zero")]
    return t


def fill(kind: str, shape: tuple[int, ...], ttype: int, rng: np.random.Generator) -> bytes:
    n = nbytes(shape, ttype)
    if kind == "ones":
        return np.ones(n // 4, dtype="<f4").tobytes()
    if kind == "rand_f32":
        return (rng.standard_normal(n // 4) * 0.5).astype("<f4").tobytes()
    if kind == "rand_q4k":
        blocks = rng.integers(0, 256, size=(n // 144, 144), dtype=np.uint8)
        scales = blocks[:, :4].view("<u2")
        scales[:, 0] = np.float16(0.02).view("<u2")      # d: small and finite
        scales[:, 1] = np.float16(0.0).view("<u2")       # dmin
        return blocks.tobytes()
    raise ValueError(kind)


def write(path: str | Path, a) -> dict:
    t0 = time.monotonic()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    arch = "qwen3moe"
    toks, scores, types = vocab(a.vocab)
    kvs = [
        _kv("general.architecture", T_STR, arch),
        _kv("general.name", T_STR, a.name),
        _kv("general.file_type", T_U32, 15),                 # MOSTLY_Q4_K_M
        _kv("general.alignment", T_U32, ALIGN),
        _kv(f"{arch}.block_count", T_U32, a.layers),
        _kv(f"{arch}.context_length", T_U32, a.ctx_train),
        _kv(f"{arch}.embedding_length", T_U32, a.embd),
        _kv(f"{arch}.feed_forward_length", T_U32, a.ff),
        _kv(f"{arch}.attention.head_count", T_U32, a.heads),
        _kv(f"{arch}.attention.head_count_kv", T_U32, a.kv_heads),
        _kv(f"{arch}.attention.key_length", T_U32, a.head_dim),
        _kv(f"{arch}.attention.value_length", T_U32, a.head_dim),
        _kv(f"{arch}.rope.freq_base", T_F32, 1000000.0),
        _kv(f"{arch}.attention.layer_norm_rms_epsilon", T_F32, 1e-6),
        _kv(f"{arch}.expert_count", T_U32, a.experts),
        _kv(f"{arch}.expert_used_count", T_U32, a.experts_used),
        _kv(f"{arch}.expert_feed_forward_length", T_U32, a.ff_exp),
        _kv("tokenizer.ggml.model", T_STR, "llama"),
        _kv("tokenizer.ggml.tokens", T_ARR, (T_STR, toks)),
        _kv("tokenizer.ggml.scores", T_ARR, (T_F32, scores)),
        _kv("tokenizer.ggml.token_type", T_ARR, (T_I32, types)),
        _kv("tokenizer.ggml.bos_token_id", T_U32, 1),
        _kv("tokenizer.ggml.eos_token_id", T_U32, 2),
        _kv("tokenizer.ggml.unknown_token_id", T_U32, 0),
        _kv("tokenizer.ggml.add_bos_token", T_BOOL, True),
        _kv("tokenizer.chat_template", T_STR, CHATML),
    ]
    plan = tensor_plan(a)
    infos, offsets, off = [], [], 0
    for name, shape, ttype, _ in plan:
        offsets.append(off)
        infos.append(_s(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)
                     + struct.pack("<IQ", ttype, off))
        off += (nbytes(shape, ttype) + ALIGN - 1) // ALIGN * ALIGN
    header = b"GGUF" + struct.pack("<IQQ", 3, len(plan), len(kvs)) + b"".join(kvs) + b"".join(infos)
    data_start = (len(header) + ALIGN - 1) // ALIGN * ALIGN
    total = data_start + off
    tmp = path.with_suffix(path.suffix + ".part")
    with open(tmp, "wb") as f:
        f.write(header + b"\0" * (data_start - len(header)))
        for (name, shape, ttype, kind), o in zip(plan, offsets):
            if kind == "zero":
                continue                                     # a hole: reads back as zeros
            f.seek(data_start + o)
            f.write(fill(kind, shape, ttype, rng))
        f.truncate(total)
    os.replace(tmp, path)
    expert_layer = 3 * nbytes((a.embd, a.ff_exp, a.experts), Q4_K)
    return {"path": str(path), "bytes": total, "gib": round(total / 2**30, 2), "tensors": len(plan),
            "layers": a.layers, "expert_mib_per_layer": round(expert_layer / 2**20, 1),
            "seconds": round(time.monotonic() - t0, 2)}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--embd", type=int, default=2048)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--experts-used", type=int, default=8)
    p.add_argument("--ff-exp", type=int, default=768)
    p.add_argument("--ff", type=int, default=6144)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--ctx-train", type=int, default=40960)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="synthetic qwen3moe 30B-A3B shape")
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    print(json.dumps(write(a.out, a)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
