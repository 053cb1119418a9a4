"""A local git mirror of llama.cpp, standing in for the fork's URL inside the sandbox.

Source: the `llama-cpp-python==0.3.36` sdist from PyPI, which vendors llama.cpp under vendor/llama.cpp.
Its `.git` *file* (a submodule pointer) is deleted before `git init`; directories no CMake build of
llama-server / llama-bench / llama-fit-params reads are stripped; the tree is committed with a fixed
author, committer and date, so the commit SHA depends only on the content (stable across machines).
The bare repository is ``<cache>/sandbox/git/llama.cpp.git``, mounted read-only in the target at
``/srv/git/llama.cpp.git`` (URL ``file:///srv/git/llama.cpp.git``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .paths import GIT_MOUNT, Paths

SDIST = "llama_cpp_python-0.3.36.tar.gz"
REQUIREMENT = "llama-cpp-python==0.3.36"
# Looked for first (the set-up script's download), then the cache.
SDIST_PLACES = (Path("/tmp/setup/sdist"),)
# Not read by the CMake build (keeps the mirror small and clones fast). Kept although they look optional:
# scripts/ (xxd.cmake embeds the server UI), pocs/ and app/ (add_subdirectory), licenses/ (app).
STRIP = (".github", ".devops", "docs", "media", "models", "gguf-py", "requirements", "requirements.txt",
         "conversion", "grammars", "prompts", "ci", "skills", "flake.nix",
         "convert_hf_to_gguf.py", "convert_hf_to_gguf_update.py", "convert_llama_ggml_to_gguf.py",
         "convert_lora_to_gguf.py", "pyproject.toml", "poetry.lock", "mypy.ini", "pyrightconfig.json", "ty.toml",
         "build-xcframework.sh")
MIRROR_VERSION = 1
NAME = "llama.cpp.git"
URL = f"file://{GIT_MOUNT}/{NAME}"
GIT_ENV = {"GIT_AUTHOR_NAME": "gpubox sandbox", "GIT_AUTHOR_EMAIL": "sandbox@gpubox.invalid",
           "GIT_COMMITTER_NAME": "gpubox sandbox", "GIT_COMMITTER_EMAIL": "sandbox@gpubox.invalid",
           "GIT_AUTHOR_DATE": "2026-01-01T00:00:00+0000", "GIT_COMMITTER_DATE": "2026-01-01T00:00:00+0000",
           "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null"}


class MirrorError(Exception):
    pass


def sdist_path(p: Paths, log=print) -> Path:
    for d in (*SDIST_PLACES, p.sdist):
        if (d / SDIST).is_file():
            return d / SDIST
    p.sdist.mkdir(parents=True, exist_ok=True)
    # pip prepares an sdist's metadata by running its build backend; with build isolation it fetches that
    # backend (scikit-build-core) itself. (--no-build-isolation failed on a fresh machine: backend missing.)
    argv = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
            "-q", "-d", str(p.sdist), REQUIREMENT]
    log("sandbox: " + " ".join(argv[2:]))
    r = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, PIP_CONSTRAINT=""))
    if r.returncode != 0 or not (p.sdist / SDIST).is_file():
        raise MirrorError(f"could not download {REQUIREMENT} (exit {r.returncode}): {r.stderr[-800:]}\n"
                          f"fix: put {SDIST} into {p.sdist} or let pip reach PyPI once")
    return p.sdist / SDIST


def _key(sdist: Path) -> str:
    """The sdist's identity (name, size, mtime: hashing 76 MB on every `up` is not worth it) and the recipe."""
    st = sdist.stat()
    h = hashlib.sha256(repr((sdist.name, st.st_size, int(st.st_mtime), STRIP, MIRROR_VERSION, GIT_ENV)).encode())
    return h.hexdigest()[:16]


def _git(args, cwd, log=None):
    r = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, **GIT_ENV})
    if r.returncode != 0:
        raise MirrorError(f"git {' '.join(args)} failed: {r.stderr.strip()[-800:]}")
    return r.stdout.strip()


def ensure(p: Paths, log=print) -> tuple[str, str]:
    """The mirror's URL (as seen in the target) and its commit SHA; builds it once per sdist."""
    bare = p.git / NAME
    stamp = p.git / ".llama.cpp.recipe"
    sdist = sdist_path(p, log)
    key = _key(sdist)
    if bare.is_dir() and stamp.exists():
        k, _, sha = stamp.read_text().strip().partition(" ")
        if k == key:
            return URL, sha
    tmp = Path(tempfile.mkdtemp(prefix="gpubox-llama-"))
    try:
        prefix = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(prefix) and len(m.name) > len(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            kw = {"filter": "tar"} if sys.version_info >= (3, 12) else {}
            tf.extractall(tmp / "src", members=members, **kw)
        src = tmp / "src"
        (src / ".git").unlink(missing_ok=True)
        for name in STRIP:
            t = src / name
            if t.is_dir():
                shutil.rmtree(t)
            elif t.exists():
                t.unlink()
        _git(["init", "-q", "-b", "master", "."], src)
        _git(["add", "-A", "."], src)
        _git(["commit", "-q", "-m", "llama.cpp as vendored by llama-cpp-python 0.3.36 (gpubox sandbox mirror)"], src)
        sha = _git(["rev-parse", "HEAD"], src)
        new = p.git / (NAME + ".new")
        shutil.rmtree(new, ignore_errors=True)
        p.git.mkdir(parents=True, exist_ok=True)
        _git(["clone", "-q", "--bare", str(src), str(new)], tmp)
        _git(["--git-dir", str(new), "update-server-info"], tmp)
        shutil.rmtree(bare, ignore_errors=True)
        new.rename(bare)
        stamp.write_text(f"{key} {sha}\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"sandbox: llama.cpp mirror {URL} at {sha}")
    return URL, sha
