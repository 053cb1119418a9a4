"""Where the sandbox keeps things, on the host and inside the target (see the package docstring)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path



@dataclass(frozen=True)
class Target:
    """One sandbox host: its name (hostname, nspawn machine name, ssh Host alias), its network namespace and
    veth pair, its addresses, its own cgroup. Every name and address the runtime uses comes from here."""
    name: str
    netns: str
    host_if: str            # the host side of the veth pair (the target side is eth0 inside netns)
    host_address: str
    address: str
    prefix: int = 24

    @property
    def cgroup(self) -> str:
        """The cgroup (in every mounted hierarchy) that systemd-nspawn runs in; removed by `down`."""
        return f"gpubox-sandbox-{self.name}"


TARGET = Target(name="gpubox", netns="gpubox", host_if="gpubox0", host_address="10.200.0.1", address="10.200.0.2")
MAX_FLEET = 32


def fleet_target(k: int) -> Target:
    """Host k (1..MAX_FLEET) of `sandbox.up --hosts N`: gpubox<k> in network namespace gpubox<k>, its own /24
    (host side 10.200.<k>.1, target 10.200.<k>.2); the single host `gpubox` keeps 10.200.0.x."""
    if not 1 <= k <= MAX_FLEET:
        raise ValueError(f"sandbox host number {k}: 1 to {MAX_FLEET}")
    return Target(name=f"gpubox{k}", netns=f"gpubox{k}", host_if=f"vgpubox{k}", host_address=f"10.200.{k}.1",
                  address=f"10.200.{k}.2")


def fleet_targets(n: int) -> list[Target]:
    return [fleet_target(k) for k in range(1, n + 1)]
# The same values under their old names (tests and callers import these).
NETNS, HOST_IF, HOST_ADDRESS, ADDRESS, PREFIX = (TARGET.netns, TARGET.host_if, TARGET.host_address, TARGET.address,
                                                 TARGET.prefix)
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

    def instance(self, t: Target) -> "Instance":
        """The target's writable layer and start script: instance/ for `gpubox` (as before), instances/<name>/
        for the hosts of a fleet; all share base/ and pristine/ as their lower layers."""
        if t.name == TARGET.name:
            return Instance(self.root / "instance", self.root / "logs" / "target.log")
        return Instance(self.root / "instances" / t.name, self.root / "logs" / f"{t.name}.log")

    @property
    def fleet_state(self) -> Path:
        """What `up --hosts N` started (hosts, PIDs, the fleet's HF server); the single host's is state.json."""
        return self.root / "fleet.json"

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
    "start": "instance/nspawn.sh",
}


@dataclass(frozen=True)
class Instance:
    """One target's own files: overlay upper and work directories, the mount point, the start script, its log."""
    root: Path
    log: Path

    @property
    def upper(self) -> Path:
        return self.root / "upper"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def start(self) -> Path:
        return self.root / "nspawn.sh"
