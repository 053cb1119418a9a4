"""Where the sandbox keeps things, on the host and inside the target (see the package docstring)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

NETNS = "gpubox"
HOST_IF = "gpubox0"
HOST_ADDRESS = "10.200.0.1"
ADDRESS = "10.200.0.2"
PREFIX = 24
HF_PORT = 8790

REPO_MOUNT = "/srv/gpubox-repos"
GIT_MOUNT = "/srv/git"
PERSIST_MOUNT = "/var/cache/gpubox-persist"
REPOS = ("fedora", "rpmfusion", "updates", "cuda")

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
TEMPLATES = REPO_ROOT / "testbed" / "templates"


def cache_root() -> Path:
    return Path(os.path.expanduser(os.environ.get("GPUBOX_CACHE") or "~/.cache/gpubox"))


@dataclass(frozen=True)
class Paths:
    root: Path

    @classmethod
    def default(cls) -> "Paths":
        return cls(cache_root() / "sandbox")

    def __getattr__(self, name: str) -> Path:  # only for names listed in _DIRS
        if name in _DIRS:
            return self.root / _DIRS[name]
        raise AttributeError(name)

    @property
    def lock(self) -> Path:
        """The flock that serialises users of the one sandbox (tests, demo, bench)."""
        return self.root.parent / "sandbox.lock"


_DIRS = {
    "debs": "debs",
    "base": "base",
    "pristine": "pristine",
    "repos": "repos",
    "git": "git",
    "hf": "hf",
    "persist": "persist",
    "instance": "instance",
    "upper": "instance/upper",
    "work": "instance/work",
    "merged": "instance/merged",
    "ssh": "ssh",
    "key": "ssh/id_ed25519",
    "ssh_config": "ssh/config",
    "wheels": "wheels",
    "sdist": "sdist",
    "logs": "logs",
    "overrides": "invoke.yaml",
    "state": "state.json",
    "init": "instance/init.sh",
}
