#!/usr/bin/env python3
"""Benchmark: the no-op provision of steps 1-4 (driver, cuda, compiler, patch) on 1, 2 and 4 sandbox hosts,
one host after another against all at once.

Brings up a fleet of 4 sandbox hosts (`sandbox.up --hosts 4`; root), converges steps 1-4 on all of them
(one parallel fleet run), then times fleet runs that change nothing:

- serial:   provision.fleet.run_fleet(..., parallel=1), i.e. one host after another, each on its own fresh
            connection, exactly what `fab -H a,b provision` does per host (same engine, same run lock);
- parallel: run_fleet(..., parallel=N), Fabric's ThreadingGroup with every host at once.

For each it prints the median wall time over the rounds, the SSH commands per host (commands run over each
host's connection, the run lock's included) and the controller's CPU time (user + system of this process).
With --processes it also times the whole commands a user types: `fab -H h1,..,hN provision --only ...` (today's
serial way) against `gpubox -H h1,..,hN fleet --only ...`.

Build and models are not part of it: on a 2-core machine the builds of several hosts would only measure the
cores. Prints figures; asserts nothing.

    sudo python bench/fleet_bench.py [--rounds 3] [--sizes 1,2,4] [--processes] [--keep]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import fabric  # noqa: E402

from provision import fleet  # noqa: E402
from testbed.sandbox import runtime  # noqa: E402

STEPS = ["driver", "cuda", "compiler", "patch"]


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def one(inf, cfg, hosts, parallel):
    fab_cfg = fabric.Config(overrides={"run": {"in_stream": False}}, runtime_ssh_path=inf.ssh_config)
    c0, t0 = cpu(), time.monotonic()
    with open(os.devnull, "w") as null:
        rep = fleet.run_fleet(hosts, fab_cfg, cfg, names=fleet.ALL,
                              skipped=[s for s in fleet.ALL if s not in STEPS], parallel=parallel, out=null, err=null)
    return rep, time.monotonic() - t0, cpu() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sizes", default="1,2,4")
    ap.add_argument("--processes", action="store_true",
                    help="also time `fab -H ... provision` vs `gpubox -H ... fleet`")
    ap.add_argument("--keep", action="store_true", help="leave the fleet up afterwards")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench/fleet_bench.py needs root (the sandbox's hosts live in network namespaces)", file=sys.stderr)
        return 2
    sizes = [int(x) for x in args.sizes.split(",")]
    p = runtime.Paths.default()
    p.root.mkdir(parents=True, exist_ok=True)
    lock = open(p.lock, "w")          # the sandbox is shared with test sessions and demos: take turns
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting for {p.lock} (a test session or a demo uses the sandbox)", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
    t0 = time.monotonic()
    inf = runtime.up_fleet(max(sizes), p)
    print(f"fleet of {len(inf.hosts)} sandbox hosts up in {time.monotonic() - t0:.1f}s; {os.cpu_count()} cores here")
    report_dir = Path(os.environ.get("GPUBOX_CACHE", "~/.cache/gpubox")).expanduser() / "bench-reports" / "fleet"
    cfg = inf.gpubox_config(report_dir)
    try:
        rep, dt, _ = one(inf, cfg, inf.hosts, len(inf.hosts))
        if rep.failed:
            print(rep.table())
            return 1
        changed = sum(1 for h in rep.hosts if h.changed)
        if changed:
            print(f"converging first: {changed} host(s) changed in {dt:.1f}s (all at once)")
        rows = []
        for n in sizes:
            hosts = inf.hosts[:n]
            for mode, par in (("serial", 1), ("parallel", n)):
                walls, cpus, cmds = [], [], set()
                for _ in range(args.rounds):
                    rep, dt, c = one(inf, cfg, hosts, par)
                    if rep.failed or any(h.changed for h in rep.hosts):
                        print(f"NOT a no-op run ({mode}, {n} hosts):\n{rep.table()}")
                        return 1
                    walls.append(dt)
                    cpus.append(c)
                    cmds |= {h.ssh_commands for h in rep.hosts}
                rows.append((n, mode, statistics.median(walls), min(walls), statistics.median(cpus), sorted(cmds)))
        print(f"\nno-op provision of {','.join(STEPS)} over SSH, median of {args.rounds} rounds "
              "(run_fleet in-process):")
        print(f"  {'hosts':>5}  {'mode':<8}  {'wall':>7}  {'min':>7}  {'speed-up':>8}  {'controller CPU':>14}  "
              "SSH commands/host")
        base = {n: w for n, m, w, *_ in rows if m == "serial"}
        for n, mode, w, mn, c, cmds in rows:
            print(f"  {n:>5}  {mode:<8}  {w:6.2f}s  {mn:6.2f}s  {base[n] / w:7.2f}x  {c:13.2f}s  {cmds}")

        if args.processes:
            env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": inf.hf_endpoint}
            common = ["-S", inf.ssh_config, "-f", inf.overrides_file]
            print("\nwhole commands (process wall time, median):")
            for n in sizes:
                hosts = ",".join(inf.hosts[:n])
                for label, argv in (
                        ("fab -H .. provision", [sys.executable, "-m", "fabric", *common, "-H", hosts, "provision"]),
                        ("gpubox -H .. fleet", [sys.executable, "-m", "provision.cli", *common, "-H", hosts, "fleet"])):
                    walls = []
                    for _ in range(args.rounds):
                        t = time.monotonic()
                        r = subprocess.run([*argv, "--only", ",".join(STEPS), "--set", f"report_dir={report_dir}"],
                                           cwd=REPO, env=env, capture_output=True, text=True)
                        walls.append(time.monotonic() - t)
                        if r.returncode != 0:
                            print(f"{label} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
                            return 1
                    print(f"  {n} host(s)  {label:<20} {statistics.median(walls):6.2f}s")
    finally:
        if not args.keep:
            runtime.down_fleet(p, log=lambda m: None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
