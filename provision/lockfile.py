"""The lock file: one JSON file on the target that describes what was provisioned.

`<state_dir>/gpubox.lock.json` (e.g. /var/lib/gpubox/gpubox.lock.json) holds

* ``models``: for each key of models.files, the repo, file name, configured revision, the commit it
  resolved to, sha256, size, the path and mtime it was verified at, the GGUF architecture read
  from its header, and ``verified`` (false only for a file accepted with allow_unverified: nobody
  knew its sha256, the one recorded is what gpubox computed). Later runs use this commit and hash (no network, no re-hash) unless asked to
  update (models.update=true);
* ``box``: the fork commit (wanted by the profile, and found in the source tree), the driver and
  CUDA versions and the compilers found, the OS, kernel and glibc: one file describes the box.
* ``build``: what the build step produced: the commit, the build directory and the size and sha256 of
  every file in its bin/ (symbolic links by target), as in the build stamp. `invoke verify` re-hashes
  the installed files against it.

The models step writes it (after a successful download/verification) keeping ``build``; the build
step writes ``build`` only (`with_build`), keeping the rest. Both use the same atomic write. The JSON
is stable (sorted keys) so a re-run that changes nothing writes nothing.

>>> e = entry({"key": "model", "repo": "o/n", "filename": "f.gguf", "commit": "a" * 40, "sha256": "b" * 64,
...            "size": 3, "path": "/m/f.gguf", "mtime_ns": 5, "arch": "gemma4"}, revision="main")
>>> e["commit"][:3], e["revision"], e["size"]
('aaa', 'main', 3)
>>> matches(e, {"repo": "o/n", "filename": "f.gguf", "revision": "main"})
True
>>> matches(e, {"repo": "o/n", "filename": "f.gguf", "revision": "a" * 40})
True
>>> matches(e, {"repo": "o/n", "filename": "f.gguf", "revision": "v2"})
False
"""

from __future__ import annotations

import json
import posixpath
from typing import Any

from .facts import UNKNOWN

LOCK_NAME = "gpubox.lock.json"
FORMAT = 1


def path(cfg: dict) -> str:
    return posixpath.join(cfg["state_dir"], LOCK_NAME)


def parse(text: str) -> dict:
    """The lock's JSON; ValueError when it is not a gpubox lock."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError("not a gpubox lock file (format 1)")
    data.setdefault("models", {})
    data.setdefault("box", {})
    return data


def dumps(data: dict) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def entry(result: dict, revision: str) -> dict:
    """A lock entry from one fetch result."""
    return {
        "repo": result["repo"], "filename": result["filename"], "revision": revision,
        "commit": result["commit"], "sha256": result["sha256"], "size": result["size"],
        "path": result["path"], "mtime_ns": result["mtime_ns"], "arch": result.get("arch", UNKNOWN),
        # false: nobody knew the file's sha256 (models.files.*.allow_unverified); the hash is gpubox's own.
        "verified": result.get("verified", True) is not False,
    }


def matches(e: dict | None, f: dict) -> bool:
    """Does the lock entry describe the configured file (same repo, name and revision or its commit)?"""
    if not isinstance(e, dict):
        return False
    return (e.get("repo") == f["repo"] and e.get("filename") == f["filename"]
            and f["revision"] in (e.get("revision"), e.get("commit")))


def box(facts: dict, cfg: dict) -> dict:
    """What the box is, from facts: fork, driver, CUDA, compiler, OS. Deterministic (no timestamps)."""
    from .config import fork_pin

    pin = fork_pin(cfg)
    pk = facts.get("packages") if isinstance(facts.get("packages"), dict) else {}
    gpus = facts.get("gpus") if isinstance(facts.get("gpus"), list) else []
    nvcc = facts.get("nvcc") if isinstance(facts.get("nvcc"), dict) else {}
    gcc = facts.get("gcc") if isinstance(facts.get("gcc"), dict) else {}
    os_ = facts.get("os") if isinstance(facts.get("os"), dict) else {}
    branch = cfg["driver"]["branch"]
    driver_pkg = next((n for n in (f"akmod-nvidia-{branch}", f"xorg-x11-drv-nvidia-{branch}", "akmod-nvidia") if n in pk), None)
    return {
        "fork": {"profile": pin.get("profile"), "dialect": pin.get("dialect"), "wanted_sha": pin.get("sha"),
                 "source_sha": facts.get("models_fork_head", UNKNOWN), "assistant_arch": pin.get("assistant_arch")},
        "driver": {"loaded": gpus[0]["driver"] if gpus else UNKNOWN,
                   "package": f"{driver_pkg}-{pk[driver_pkg]}" if driver_pkg else UNKNOWN,
                   "gpus": [g.get("name") for g in gpus]},
        "cuda": {"nvcc": nvcc.get("path", UNKNOWN), "version": nvcc.get("version", UNKNOWN), "build": nvcc.get("build", UNKNOWN)},
        "compiler": {"default_gcc": gcc.get("default", UNKNOWN), "gcc_available": gcc.get("available", []),
                     "wanted_major": cfg["compiler"]["major"]},
        "os": {"id": os_.get("id", UNKNOWN), "version": os_.get("version", UNKNOWN),
               "kernel": facts.get("kernel", UNKNOWN), "glibc": facts.get("glibc", UNKNOWN)},
    }


def build(old: dict | None, facts: dict, cfg: dict, results: list[dict]) -> dict:
    """The new lock: the old one's entries, updated with these results, and the box as it is now.

    Entries for keys no longer configured are dropped (the lock describes the configured box)."""
    data: dict[str, Any] = {"format": FORMAT, "models": {}, "box": box(facts, cfg)}
    if isinstance(old, dict) and isinstance(old.get("build"), dict):
        data["build"] = old["build"]       # the build step's record; not the models step's to change
    old_models = (old or {}).get("models", {}) if isinstance(old, dict) else {}
    files = cfg["models"]["files"]
    for key, f in files.items():
        if matches(old_models.get(key), f):
            data["models"][key] = old_models[key]
    for r in results:
        data["models"][r["key"]] = entry(r, files[r["key"]]["revision"])
    return data


def build_entry(stamp: dict, build_dir: str) -> dict:
    """The lock's record of a build, from its stamp: commit, directory, bin/'s files and links."""
    return {"sha": stamp.get("sha"), "build_dir": build_dir, "files": stamp.get("files") or {},
            "links": stamp.get("links") or {}}


def with_build(old: dict | None, entry: dict) -> dict:
    """The lock with its ``build`` record replaced; everything else as it was (a new lock if none).

    >>> lk = with_build({"format": 1, "models": {"m": {}}, "box": {"os": {}}}, {"sha": "s", "files": {}})
    >>> sorted(lk), lk["models"], lk["build"]["sha"]
    (['box', 'build', 'format', 'models'], {'m': {}}, 's')
    >>> with_build(None, {"sha": "s"})["models"]
    {}
    """
    data = dict(old) if isinstance(old, dict) and old.get("format") == FORMAT else {"format": FORMAT}
    data.setdefault("models", {})
    data.setdefault("box", {})
    data["build"] = entry
    return data
