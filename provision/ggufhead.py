"""gpubox's one GGUF header reader (metadata and tensor table, no weights), standard library only.

It runs ON THE TARGET, where the files are (provision/remote.py sends it): the models step reads
`general.architecture` of each downloaded file with it (`architecture`, which stops after that key), and
the tuner and the serve step print one JSON summary per file (`print_summaries`), so no multi-megabyte
header crosses SSH. The summary gives what llama-fit-params cannot: the MTP assistant's weights and
KV-cache shape, and, for the main model, the layer count (the largest useful --n-cpu-moe) and the
vocabulary size; and the keys the serve step's pair rules need (provision/serve/pair.py: sliding-window
pattern, KV geometry, embedding_length_out / n_embd_backbone, nextn_predict_layers).

Why not the `gguf` package here: gguf's GGUFReader imports numpy (gguf 0.19 requires numpy, pyyaml,
requests and tqdm), and neither the Fedora box's python3 nor the sandbox's carries numpy by default; the
target needs nothing beyond python3 and huggingface_hub. On the controller gguf is a dependency: it
writes the test models and, in tests/unit/test_ggufhead.py, checks this reader field by field.

Tensor sizes come from the offsets in the tensor table (the next tensor's offset, or the end of the file,
minus this one's), so no table of quantization block sizes is needed.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from typing import Any, BinaryIO

# GGUF value types.
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Arrays longer than this are summarized by their length (the vocabulary: 150k-260k strings).
_ARRAY_KEEP = 4096


class GGUFError(Exception):
    pass


def _read(f: BinaryIO, n: int) -> bytes:
    b = f.read(n)
    if len(b) != n:
        raise GGUFError("truncated GGUF header")
    return b


def _u32(f: BinaryIO) -> int:
    return struct.unpack("<I", _read(f, 4))[0]


def _u64(f: BinaryIO) -> int:
    return struct.unpack("<Q", _read(f, 8))[0]


def _str(f: BinaryIO) -> str:
    n = _u64(f)
    if n > 1 << 24:
        raise GGUFError(f"implausible string length {n}")
    return _read(f, n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int) -> Any:
    if vtype in _SCALAR:
        fmt = _SCALAR[vtype]
        return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]
    if vtype == _STRING:
        return _str(f)
    if vtype == _ARRAY:
        etype = _u32(f)
        n = _u64(f)
        if etype in _SCALAR and n > _ARRAY_KEEP:
            f.seek(n * struct.calcsize(_SCALAR[etype]), os.SEEK_CUR)
            return {"array_len": n}
        items = [_value(f, etype) for _ in range(n)]
        return {"array_len": n} if n > _ARRAY_KEEP else items
    raise GGUFError(f"unknown GGUF value type {vtype}")


def read_header(path: str, stop_at: str | None = None) -> dict[str, Any]:
    """{'version', 'metadata': {key: value}, 'tensors': [{'name', 'shape', 'type', 'offset', 'bytes'}],
    'data_start', 'file_size'}. With `stop_at`, reading ends after that key (no tensor table)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if _read(f, 4) != b"GGUF":
            raise GGUFError(f"{path} is not a GGUF file (bad magic)")
        version = _u32(f)
        if version not in (2, 3):
            raise GGUFError(f"{path}: unsupported GGUF version {version}")
        n_tensors, n_kv = _u64(f), _u64(f)
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _str(f)
            meta[key] = _value(f, _u32(f))
            if key == stop_at:
                return {"version": version, "metadata": meta, "tensors": [], "data_start": None, "file_size": size}
        tensors = []
        for _ in range(n_tensors):
            name = _str(f)
            nd = _u32(f)
            shape = [_u64(f) for _ in range(nd)]
            ttype = _u32(f)
            off = _u64(f)
            tensors.append({"name": name, "shape": shape, "type": ttype, "offset": off})
        align = int(meta.get("general.alignment", 32))
        pos = f.tell()
        data_start = (pos + align - 1) // align * align
    order = sorted(range(len(tensors)), key=lambda i: tensors[i]["offset"])
    for j, i in enumerate(order):
        end = tensors[order[j + 1]]["offset"] if j + 1 < len(order) else size - data_start
        tensors[i]["bytes"] = max(0, end - tensors[i]["offset"])
    return {"version": version, "metadata": meta, "tensors": tensors, "data_start": data_start, "file_size": size}


_EXPS = re.compile(r"^blk\.(\d+)\.ffn_(up|down|gate|gate_up)_(ch|)exps")
_BLK = re.compile(r"^blk\.(\d+)\.")


def summary(path: str) -> dict[str, Any]:
    """What the tuner needs, small enough to print as one JSON line."""
    h = read_header(path)
    meta = h["metadata"]
    arch = meta.get("general.architecture", "")

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    tokens = meta.get("tokenizer.ggml.tokens")
    n_vocab = tokens["array_len"] if isinstance(tokens, dict) else (len(tokens) if isinstance(tokens, list) else None)
    per_layer: dict[int, int] = {}
    experts: dict[int, int] = {}
    other = 0
    named: dict[str, int] = {}
    for t in h["tensors"]:
        m = _BLK.match(t["name"])
        if m:
            i = int(m.group(1))
            per_layer[i] = per_layer.get(i, 0) + t["bytes"]
            if _EXPS.match(t["name"]):
                experts[i] = experts.get(i, 0) + t["bytes"]
        else:
            other += t["bytes"]
            named[t["name"]] = t["bytes"]
    return {
        "path": path,
        "file_size": h["file_size"],
        "arch": arch,
        "name": meta.get("general.name", ""),
        "block_count": key("block_count"),
        "context_length": key("context_length"),
        "embedding_length": key("embedding_length"),
        "head_count": key("attention.head_count"),
        "head_count_kv": key("attention.head_count_kv"),
        "key_length": key("attention.key_length"),
        "value_length": key("attention.value_length"),
        "key_length_swa": key("attention.key_length_swa"),
        "value_length_swa": key("attention.value_length_swa"),
        "sliding_window": key("attention.sliding_window"),
        "sliding_window_pattern": key("attention.sliding_window_pattern"),
        "embedding_length_out": key("embedding_length_out"),     # post-sync / upstream MTP head
        "nextn_predict_layers": key("nextn_predict_layers"),
        "n_embd_backbone": key("n_embd_backbone"),               # pre-sync MTP head
        "expert_count": key("expert_count"),
        "n_vocab": n_vocab,
        "n_tensors": len(h["tensors"]),
        "tensor_bytes": sum(t["bytes"] for t in h["tensors"]),
        "layer_bytes": {str(k): v for k, v in sorted(per_layer.items())},
        "expert_bytes": {str(k): v for k, v in sorted(experts.items())},
        "other_bytes": named,
    }


# --- the assistant head: what it adds to the GPU ---------------------------------------------------------

# Bytes per element of each KV cache type (block bytes / block elements). turbo* are the fork's
# TurboQuant types; their sizes are estimates from its documentation (turbo3 about 3.5 bits), rounded up.
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32,
            "iq4_nl": 18 / 32, "q5_0": 22 / 32, "q5_1": 24 / 32, "turbo2": 2.5 / 8, "turbo3": 3.5 / 8,
            "turbo4": 4.25 / 8}
MIB = 1 << 20


def _per_layer(value: Any, n_layer: int) -> list[int]:
    if isinstance(value, list):
        return [int(v) for v in value][:n_layer] + [0] * max(0, n_layer - len(value))
    return [int(value or 0)] * n_layer


def kv_mib(s: dict[str, Any], ctx: int, type_k: str, type_v: str) -> int:
    """KV cache of a model at ctx tokens (every layer at the full context: an upper bound with SWA)."""
    n_layer = int(s.get("block_count") or 0)
    n_head = s.get("head_count") or 1
    n_embd = int(s.get("embedding_length") or 0)
    head_dim = (n_embd // int(n_head if not isinstance(n_head, list) else max(n_head) or 1)) if n_embd else 0
    k_len = int(s.get("key_length") or head_dim)
    v_len = int(s.get("value_length") or head_dim)
    kv_heads = _per_layer(s.get("head_count_kv") if s.get("head_count_kv") is not None else n_head, n_layer)
    per_token = sum(h * (k_len * KV_BYTES[type_k] + v_len * KV_BYTES[type_v]) for h in kv_heads)
    return int(-(-per_token * ctx // MIB))


# MTP heads (docs/serve-mtp.md, "Where the head's weights land"): no KV cache of their own (their layers view
# the target's cache), and their token_embd placement differs by format.
MTP_HEADS = {"gemma4-assistant": "post-sync", "gemma4_assistant": "pre-sync"}


def assistant_mib(s: dict[str, Any], *, ctx: int, type_k: str, type_v: str, n_gpu_layers: int = 999,
                  n_cpu_moe: int = 0, overrides: list[str] = ()) -> dict[str, int]:
    """The assistant's GPU share: weights on the GPU plus its KV cache at the serving context.

    A plain draft model: its layers and output on the GPU, token_embd only when an override puts it there (the
    loader keeps the input embedding on the CPU), and a KV cache of its own. A Gemma 4 MTP head: no KV cache
    (it views the target's); post-sync/upstream (gemma4-assistant) its output copy of token_embd follows -ngld
    to the GPU while the unused input copy stays on the host; pre-sync (gemma4_assistant) token_embd is the LM
    head and stays on the CPU unless an override moves it, and its pre-projection (an input-layer tensor) stays
    in host memory. (Pre-sync real figures, GTX 1080: CUDA0 82.24 MiB, CPU 210.00 token_embd, CUDA_Host 3.09.)"""
    n_layer = int(s.get("block_count") or 0)
    on_gpu_layers = min(n_gpu_layers, n_layer)
    mtp = MTP_HEADS.get(s.get("arch", ""))
    weights = 0
    for i_s, b in s.get("layer_bytes", {}).items():
        i = int(i_s)
        if i >= n_layer - on_gpu_layers:           # -ngl offloads the LAST layers
            weights += b
            if i < n_cpu_moe:
                weights -= s.get("expert_bytes", {}).get(i_s, 0)
    pats = [o.split("=", 1)[0] for o in overrides if "=" in o and not o.split("=", 1)[1].upper().startswith("CPU")]
    all_on_gpu = n_layer > 0 and on_gpu_layers >= n_layer
    for name, b in s.get("other_bytes", {}).items():
        if name.startswith("token_embd."):
            if any(re.search(p, name) for p in pats) or (mtp == "post-sync" and all_on_gpu):
                weights += b
        elif mtp == "pre-sync" and name.endswith("pre_projection.weight"):
            if any(re.search(p, name) for p in pats):
                weights += b
        elif all_on_gpu:                           # output / output_norm go with the last layer
            weights += b
    kv = kv_mib(s, ctx, type_k, type_v) if on_gpu_layers and not mtp else 0
    w = int(-(-weights // MIB))
    return {"weights_mib": w, "kv_mib": kv, "total_mib": w + kv}


def architecture(path: str) -> str:
    """general.architecture, reading only the metadata up to that key (the first one gguf writers write)."""
    arch = read_header(path, stop_at="general.architecture")["metadata"].get("general.architecture")
    if not isinstance(arch, str):
        raise GGUFError(f"{path}: general.architecture not found in the GGUF header")
    return arch


def print_summaries(*paths: str) -> int:
    """One JSON summary per line (an error object for a file that cannot be read): the tuner's remote entry."""
    for p in paths:
        try:
            print(json.dumps(summary(p)))
        except (OSError, GGUFError) as e:
            print(json.dumps({"path": p, "error": f"{type(e).__name__}: {e}"}))
    return 0


if __name__ == "__main__":
    sys.exit(print_summaries(*sys.argv[1:]))
