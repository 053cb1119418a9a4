"""Tiny GGUF models for tests, written with the `gguf` package (no downloads, a few hundred KB).

A real llama-server loads them and answers HTTP with random-weight text:

    from testbed.testmodels import write_tiny
    write_tiny("/tmp/m.gguf")                                   # llama, 2 layers, dense
    write_tiny("/tmp/moe.gguf", arch="llama", n_experts=4)      # llama MoE: --n-cpu-moe has experts to move
    write_tiny("/tmp/q.gguf", arch="qwen3moe")                  # qwen3moe (always MoE, 4 experts by default)
    write_tiny("/tmp/a.gguf", general_arch="gemma4-assistant")  # header-only fixture for arch checks

The vocabulary is SentencePiece-style (313 tokens: <unk> <s> </s>, 256 byte tokens, the ChatML
<|im_start|>/<|im_end|> controls, and 52 word pieces) with a ChatML chat template, so
/v1/chat/completions works. The output rows of byte and control tokens are zeroed: their logits are 0
while the word pieces' are random, so greedy replies are printable word pieces.

`general_arch` overrides only `general.architecture` (keys stay under `arch`): such a file is for code that
reads GGUF headers (the models/serve checks), not for loading.

`n_embd`/`n_head` set the attention head size (n_embd / n_head, default 32: quantized KV caches such as
q8_0 need a multiple of 32). Run as a script: python -m testbed.testmodels OUT.gguf [--arch ...].
"""

from __future__ import annotations

import argparse
import string
from pathlib import Path

import numpy as np

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

# SentencePiece token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

WORDS = ["the", "a", "GPU", "model", "is", "ready", "to", "serve", "and", "of", "fast", "tokens", "box", "hello",
         "world", "test", "on", "it", "in", "for", "with", "you", "we", "llama", "expert", "layer"]


def vocab() -> tuple[list[str], list[float], list[int]]:
    """The 313-token vocabulary: tokens, scores, token types."""
    tokens = ["<unk>", "<s>", "</s>"]
    types = [UNKNOWN, CONTROL, CONTROL]
    tokens += [f"<0x{i:02X}>" for i in range(256)]
    types += [BYTE] * 256
    tokens += ["<|im_start|>", "<|im_end|>"]
    types += [CONTROL, CONTROL]
    pieces = ["\u2581" + w for w in WORDS] + list(string.ascii_lowercase)
    tokens += pieces
    types += [NORMAL] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    assert len(tokens) == 313, len(tokens)
    return tokens, scores, types


def write_tiny(path: str | Path, arch: str = "llama", n_layers: int = 2, n_experts: int = 0,
               general_arch: str | None = None, seed: int = 0, *, n_embd: int = 64, n_head: int = 2,
               n_head_kv: int | None = None, n_ff: int = 128, ctx: int = 4096, n_expert_used: int = 2,
               f16: bool = True) -> Path:
    """Write a tiny random-weight GGUF; returns the path. qwen3moe defaults to 4 experts."""
    import gguf  # imported here: only tests and the GPU script need it

    if arch not in ("llama", "qwen3moe"):
        raise ValueError(f"write_tiny: arch must be llama or qwen3moe, not {arch!r}")
    if arch == "qwen3moe" and n_experts == 0:
        n_experts = 4
    if n_embd % n_head:
        raise ValueError("write_tiny: n_embd must be a multiple of n_head")
    n_head_kv = n_head_kv or n_head
    head_dim = n_embd // n_head
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    wtype = np.float16 if f16 else np.float32

    def mat(*shape: int) -> np.ndarray:
        # numpy shape is ggml's ne reversed: (rows, cols) = ne {cols, rows}
        return (rng.standard_normal(shape) * 0.3).astype(wtype)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    tokens, scores, types = vocab()
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), general_arch or arch)
    a = arch
    w.add_name(f"gpubox tiny {arch}{' moe' if n_experts else ''}")
    w.add_uint32(f"{a}.context_length", ctx)
    w.add_uint32(f"{a}.embedding_length", n_embd)
    w.add_uint32(f"{a}.block_count", n_layers)
    w.add_uint32(f"{a}.feed_forward_length", n_ff)
    w.add_uint32(f"{a}.attention.head_count", n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", n_head_kv)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    w.add_uint32(f"{a}.vocab_size", n_vocab)
    if arch == "llama":
        w.add_uint32(f"{a}.rope.dimension_count", head_dim)
    else:
        w.add_uint32(f"{a}.attention.key_length", head_dim)
        w.add_uint32(f"{a}.attention.value_length", head_dim)
    if n_experts:
        w.add_uint32(f"{a}.expert_count", n_experts)
        w.add_uint32(f"{a}.expert_used_count", min(n_expert_used, n_experts))
        if arch == "qwen3moe":
            w.add_uint32(f"{a}.expert_feed_forward_length", n_ff)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)

    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(CHATML)

    w.add_tensor("token_embd.weight", mat(n_vocab, n_embd))
    w.add_tensor("output_norm.weight", ones(n_embd))
    out = mat(n_vocab, n_embd)
    out[[i for i, t in enumerate(types) if t != NORMAL]] = 0  # printable replies: only word pieces score
    w.add_tensor("output.weight", out)
    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    for i in range(n_layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", ones(n_embd))
        w.add_tensor(p + "attn_q.weight", mat(q_dim, n_embd))
        w.add_tensor(p + "attn_k.weight", mat(kv_dim, n_embd))
        w.add_tensor(p + "attn_v.weight", mat(kv_dim, n_embd))
        w.add_tensor(p + "attn_output.weight", mat(n_embd, q_dim))
        if arch == "qwen3moe":
            w.add_tensor(p + "attn_q_norm.weight", ones(head_dim))
            w.add_tensor(p + "attn_k_norm.weight", ones(head_dim))
        w.add_tensor(p + "ffn_norm.weight", ones(n_embd))
        if n_experts:
            w.add_tensor(p + "ffn_gate_inp.weight", mat(n_experts, n_embd).astype(np.float32))
            w.add_tensor(p + "ffn_gate_exps.weight", mat(n_experts, n_ff, n_embd))
            w.add_tensor(p + "ffn_down_exps.weight", mat(n_experts, n_embd, n_ff))
            w.add_tensor(p + "ffn_up_exps.weight", mat(n_experts, n_ff, n_embd))
        else:
            w.add_tensor(p + "ffn_gate.weight", mat(n_ff, n_embd))
            w.add_tensor(p + "ffn_down.weight", mat(n_embd, n_ff))
            w.add_tensor(p + "ffn_up.weight", mat(n_ff, n_embd))

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_arch(path: str | Path) -> str:
    """general.architecture of a GGUF file (reads the header only)."""
    import gguf

    r = gguf.GGUFReader(str(path))
    f = r.fields["general.architecture"]
    return bytes(f.parts[f.data[0]]).decode()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="write a tiny GGUF test model")
    ap.add_argument("out")
    ap.add_argument("--arch", default="llama", choices=["llama", "qwen3moe"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=0)
    ap.add_argument("--general-arch", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--n-head", type=int, default=2)
    a = ap.parse_args(argv)
    p = write_tiny(a.out, arch=a.arch, n_layers=a.layers, n_experts=a.experts, general_arch=a.general_arch,
                   seed=a.seed, n_embd=a.n_embd, n_head=a.n_head)
    print(f"{p} {p.stat().st_size} bytes")


if __name__ == "__main__":
    main()
