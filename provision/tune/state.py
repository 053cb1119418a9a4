"""What tune remembers on the target: `<state_dir>/tune.json`.

    {
      "version": 1,
      "current": {RESULT},                  # the latest choice: what the serve step reads
      "results": {CACHE_KEY: {RESULT}},     # every answered question, so switching back reuses it
      "overhead": {MACHINE_KEY: {"mib": 682, "learned": "...", "from": "measured at 29", ...}}
    }

RESULT carries "n_cpu_moe" (the chosen --n-cpu-moe), "valid_for" (the serve settings it was tuned for:
ctx_size, cache types, drafting...), the probe table, the estimates and the reasons. The serve step uses
`tuned_n_cpu_moe(doc, serve_cfg)`: the tuned value when "current" was tuned for the same serve settings,
else None (then serve.n_cpu_moe from the config applies, and the serve step can say tune is stale).

The cache key hashes card, driver, VRAM size, the model file (sha256 from the config when pinned, else
size + mtime), the assistant file, the llama-server binary (size + mtime), the context size, all cache
types, the margin and the other settings that change device memory. Re-running tune with the same key
reuses the stored result without a probe; any change asks the question again.

The overhead constant is per machine: card, driver, VRAM size and llama-server binary.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

FILENAME = "tune.json"
VERSION = 1

# cfg["serve"] keys that change device memory (and so the answer).
MEMORY_KEYS = ("ctx_size", "cache_type_k", "cache_type_v", "flash_attn", "n_gpu_layers", "parallel",
               "override_tensor")
DRAFT_KEYS = ("draft_model", "spec_type", "n_gpu_layers_draft", "n_cpu_moe_draft", "cache_type_k_draft",
              "cache_type_v_draft", "override_tensor_draft", "draft_block_size")


def valid_for(serve: dict[str, Any], drafting: bool) -> dict[str, Any]:
    """The serve settings a result answers for."""
    d = {k: serve.get(k) for k in MEMORY_KEYS}
    d["drafting"] = drafting
    if drafting:
        d.update({k: serve.get(k) for k in DRAFT_KEYS})
    return d


def machine_key(gpu: dict[str, Any], server_id: str) -> str:
    return f"{gpu.get('name')}|driver {gpu.get('driver')}|{gpu.get('vram_mib')} MiB|server {server_id}"


def cache_fields(gpu: dict[str, Any], model_id: str, draft_id: str, server_id: str, serve: dict[str, Any],
                 drafting: bool, margin_mib: int) -> dict[str, Any]:
    return {"card": gpu.get("name"), "driver": gpu.get("driver"), "vram_mib": gpu.get("vram_mib"),
            "model": model_id, "assistant": draft_id if drafting else "", "server": server_id,
            "margin_mib": margin_mib, "serve": valid_for(serve, drafting)}


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def empty() -> dict[str, Any]:
    return {"version": VERSION, "current": None, "results": {}, "overhead": {}}


def parse(text: str) -> dict[str, Any]:
    """The stored document, or an empty one when the file is missing or unreadable (never a crash)."""
    try:
        doc = json.loads(text) if text.strip() else {}
    except ValueError:
        doc = {}
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        return empty()
    for k, v in empty().items():
        doc.setdefault(k, v)
    return doc


KEEP_RESULTS = 8


def trim(doc: dict[str, Any]) -> dict[str, Any]:
    """Keep the newest KEEP_RESULTS cached results (and always the current one): the file stays small."""
    res = doc.get("results") or {}
    if len(res) <= KEEP_RESULTS:
        return doc
    cur = (doc.get("current") or {}).get("key")
    newest = sorted(res, key=lambda k: (k == cur, str(res[k].get("when", ""))), reverse=True)[:KEEP_RESULTS]
    return dict(doc, results={k: res[k] for k in newest})


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True, default=str) + "\n"


def tuned_n_cpu_moe(doc: Optional[dict[str, Any]], serve: dict[str, Any], drafting: bool) -> Optional[int]:
    """For the serve step: the tuned --n-cpu-moe when the current result was tuned for these settings."""
    cur = (doc or {}).get("current") or None
    if not cur:
        return None
    if cur.get("valid_for") != json.loads(json.dumps(valid_for(serve, drafting), default=str)):
        return None
    v = cur.get("n_cpu_moe")
    return v if isinstance(v, int) else None
