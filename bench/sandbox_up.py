#!/usr/bin/env python3
"""Time `sandbox.up`: cold (nothing built) and warm (cache built), plus reset and down. Prints figures.

    python3 bench/sandbox_up.py            # warm figures only (builds the cache first if needed)
    python3 bench/sandbox_up.py --cold     # also a cold build in a scratch cache (minutes)

Cold: a scratch GPUBOX_CACHE with only the downloads copied in (debootstrap's .debs, the wheels, the
sdist), as CI with its download cache: debootstrap, fixture RPMs, pristine layer, git mirror, HF content,
start. Warm: the cache is built and the sandbox is down; `up` boots its systemd under systemd-nspawn and
waits for sshd and `systemctl is-system-running` (target: <= 5 s). Also: `up` while up, `reset`, `down`, and
what `down` left behind (runtime.leftovers: processes, mounts, cgroups, namespaces). Needs root; holds <cache>/sandbox.lock (the sandbox is a single shared one),
and leaves the sandbox up or down as it found it.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed.sandbox import Paths, runtime  # noqa: E402


def timed(fn, *a, **kw) -> float:
    t0 = time.monotonic()
    fn(*a, **kw)
    return time.monotonic() - t0


def quiet(msg: str) -> None:
    pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold", action="store_true", help="also time a cold build in a scratch cache")
    ap.add_argument("--repeat", type=int, default=5, help="warm repetitions (default 5)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/sandbox_up.py: needs root (network namespace, mounts, chroot)", file=sys.stderr)
        return 2
    p = Paths.default()
    p.root.mkdir(parents=True, exist_ok=True)
    lock = open(p.lock, "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    was_up = runtime.running(p)
    try:
        print(f"cpus: {os.cpu_count()}  cache: {p.root}")
        if args.cold:
            runtime.down(p, log=quiet)
            scratch = Path(tempfile.mkdtemp(prefix="gpubox-cold-", dir=str(p.root.parent)))
            cp = Paths(scratch / "sandbox")
            cp.root.mkdir(parents=True)
            for name in ("debs", "wheels", "sdist"):
                src = p.root / name
                if src.is_dir():
                    shutil.copytree(src, cp.root / name, symlinks=True)
            t = timed(runtime.up, cp, log=lambda m: print("  " + m))
            print(f"cold up (debootstrap + fixtures + pristine + mirror + start): {t:7.1f} s")
            runtime.down(cp, log=quiet)
            shutil.rmtree(scratch)
        runtime.ensure_built(p, log=lambda m: print("  " + m))
        warm, again, reset, down = [], [], [], []
        for _ in range(args.repeat):
            runtime.down(p, log=quiet)
            warm.append(timed(runtime.up, p, log=quiet))
            again.append(timed(runtime.up, p, log=quiet))
            reset.append(timed(runtime.reset, p, log=quiet))
            down.append(timed(runtime.down, p, log=quiet))

        def fmt(xs):
            return f"median {statistics.median(xs):6.2f} s  (min {min(xs):.2f}, max {max(xs):.2f}, n={len(xs)})"
        print(f"warm up (cache built, sandbox down): {fmt(warm)}   target <= 5 s")
        print(f"up while up (health check only):     {fmt(again)}")
        print(f"reset to pristine:                   {fmt(reset)}")
        print(f"down:                                {fmt(down)}")
        left = runtime.leftovers(p)
        print(f"left after down:                     {'nothing' if not left else '; '.join(left)}")
    finally:
        if was_up:
            runtime.up(p, log=quiet)
        else:
            runtime.down(p, log=quiet)
        fcntl.flock(lock, fcntl.LOCK_UN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
