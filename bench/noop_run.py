#!/usr/bin/env python3
"""Benchmark: the no-op second run of the system steps (driver, cuda, compiler, patch) over SSH.

Brings the sandbox up (root; built on first use), makes sure the four steps have converged (one
provision run when they have not), then times provision runs that should change nothing and prints:

- wall time of the Runner (Fabric Connection opened fresh each round, so the SSH connect is included;
  the sandbox's ssh config sets no ControlMaster for Paramiko, which Fabric uses);
- wall time of the whole `fab -S <ssh config> -H gpubox provision --only ...` process (Python start-up,
  task loading, config) for the user's view;
- SSH commands per run (Host.records: every remote command, fact script included) and fact commands
  (Runner.fact_commands).

Targets (issue #4): no-op run <= 1.5 s; all facts in <= 2 commands. Prints figures; asserts nothing.

    sudo python bench/noop_run.py [--rounds 5] [--steps driver,cuda,compiler,patch] [--no-fab]
    python bench/noop_run.py --host myfedora --ssh-config ~/.ssh/config [--overrides invoke.yaml]
        (any other host instead of the sandbox: it must already be provisioned, or this converges it)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fabric import Config, Connection  # noqa: E402

from provision import config  # noqa: E402
from testbed import sandbox  # noqa: E402
from provision.engine import Runner  # noqa: E402
from provision.host import Host  # noqa: E402
from provision.steps import BY_NAME  # noqa: E402


class Target:
    """Where to run: the sandbox (default) or a host from an ssh config."""

    def __init__(self, host, ssh_config, overrides_file):
        self.host, self.ssh_config, self.overrides_file = host, ssh_config, overrides_file

    def overrides(self) -> dict:
        if not self.overrides_file:
            return {}
        import yaml
        return yaml.safe_load(Path(self.overrides_file).read_text()) or {}


def sandbox_cfg(info, report_dir: str) -> dict:
    raw = config.defaults()["gpubox"]
    over = (info.overrides() or {}).get("gpubox", {})

    def merge(a, b):
        for k, v in b.items():
            if isinstance(v, dict) and isinstance(a.get(k), dict):
                merge(a[k], v)
            else:
                a[k] = v
    merge(raw, over)
    raw["report_dir"] = report_dir
    return config.validate(raw)


def one_run(info, cfg, steps):
    kw = {"runtime_ssh_path": info.ssh_config} if info.ssh_config else {}
    conn = Connection(info.host, config=Config(overrides={"run": {"in_stream": False}}, **kw))
    host = Host(conn)
    t0 = time.monotonic()
    rep = Runner(host, cfg, steps, echo=lambda s: None).run()
    dt = time.monotonic() - t0
    conn.close()
    return rep, dt, host


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", default="driver,cuda,compiler,patch")
    ap.add_argument("--no-fab", action="store_true", help="skip timing the fab process")
    ap.add_argument("--host", help="an ssh host instead of the sandbox")
    ap.add_argument("--ssh-config", help="the ssh config that names --host")
    ap.add_argument("--overrides", help="a YAML file with a gpubox: mapping (as fab -f takes)")
    args = ap.parse_args()
    if not args.host and os.geteuid() != 0:
        print("bench/noop_run.py needs root (the sandbox uses network namespaces and a chroot)", file=sys.stderr)
        return 2

    names = [n.strip() for n in args.steps.split(",") if n.strip()]
    steps = [BY_NAME[n] for n in names]
    t0 = time.monotonic()
    if args.host:
        info = Target(args.host, args.ssh_config, args.overrides)
    else:
        info = sandbox.up()
        print(f"sandbox up in {time.monotonic() - t0:.2f}s ({info.host} at {info.address})")
    report_dir = str(Path(os.environ.get("GPUBOX_CACHE", "~/.cache/gpubox")).expanduser() / "bench-reports")
    cfg = sandbox_cfg(info, report_dir)

    rep, dt, host = one_run(info, cfg, steps)
    if rep.failed:
        print(rep.table())
        return 1
    if rep.changed:
        print(f"converging first: {rep.changed} step(s) changed in {dt:.2f}s ({len(host.records)} commands)")
        for s in rep.steps:
            for a in s.attention:
                print(f"  {s.name}: ! {a}")

    walls, cmds, facts = [], [], []
    for _ in range(args.rounds):
        rep, dt, host = one_run(info, cfg, steps)
        if rep.changed or rep.failed:
            print("NOT a no-op run:")
            print(rep.table())
            return 1
        walls.append(dt)
        cmds.append(len(host.records))
        facts.append(rep.fact_commands)

    print(f"\nno-op run of {','.join(names)} over SSH (Runner, fresh connection), {args.rounds} rounds:")
    print(f"  wall time   median {statistics.median(walls):.3f}s  min {min(walls):.3f}s  max {max(walls):.3f}s"
          f"   (target <= 1.5 s)")
    print(f"  SSH commands per run: {sorted(set(cmds))}   fact commands per run: {sorted(set(facts))}"
          f"   (target: facts in <= 2 commands)")
    last = rep
    print("  per step (s): " + ", ".join(f"{s.name} {s.status} {s.seconds:.3f}" for s in last.steps))

    if not args.no_fab:
        fab = [sys.executable, "-m", "fabric", *(["-S", info.ssh_config] if info.ssh_config else []),
               "-H", info.host, *(["-f", info.overrides_file] if info.overrides_file else []),
               "provision", "--only", ",".join(names), "--set", f"report_dir={report_dir}"]
        fwalls = []
        for _ in range(max(1, args.rounds // 2)):
            t = time.monotonic()
            r = subprocess.run(fab, cwd=REPO, capture_output=True, text=True)
            fwalls.append(time.monotonic() - t)
            if r.returncode != 0:
                print("fab run failed:\n" + r.stdout + r.stderr)
                return 1
        print(f"  `fab ... provision --only {','.join(names)}` process wall: median {statistics.median(fwalls):.3f}s"
              f"  min {min(fwalls):.3f}s")
        print("  " + r.stdout.strip().splitlines()[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
