"""Invoke tasks for the sandbox: `invoke sandbox.up [--hosts N]|down|status|reset` and `invoke demo`.

`demo` is the README's main job on a machine without Fedora or a GPU: bring the sandbox up, run
`fab -S <its ssh config> -H gpubox provision` over real SSH (with the sandbox's config overrides:
file:// CUDA repo, the llama.cpp mirror at its SHA, CPU-only build, HF_ENDPOINT = the local server),
print the run report, then `serve` (llama-server on the tiny models) and `verify` (testinfra over SSH). Exit status: 0 when every step that ran
is done or only waits for what a chroot cannot do (reboot, module load: reported as attention, not as
done); 1 when a step FAILED or verify found a failure; the report is printed either way.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from invoke import Collection, Exit, task

from . import runtime
from .paths import REPO_ROOT, Paths


def _info_lines(inf: runtime.Info) -> list[str]:
    return [
        f"ssh config:      {inf.ssh_config}",
        f"ssh:             ssh -F {inf.ssh_config} gpubox",
        f"target:          systemd (host pid {inf.pids.get('init')}) under systemd-nspawn (pid {inf.pids.get('target')}); "
        f"without ssh: nsenter -t {inf.pids.get('init')} -m -u -i -n -p -C systemctl status",
        f"fab:             {inf.fab_command}",
        f"testinfra:       --hosts=ssh://gpubox --ssh-config={inf.ssh_config}",
        f"hf endpoint:     {inf.hf_endpoint or '(provision/hfserver.py missing: none)'}  (HF_ENDPOINT, target and host)",
        f"git mirror:      {inf.git_url} @ {inf.git_sha}",
        f"cuda repo:       {inf.cuda_repo_baseurl}",
        f"overrides:       {inf.overrides_file}  (gpubox: mapping; demo and tests apply it)",
        f"persistent dir:  {inf.persist_mount} in the target (survives sandbox.reset; ccache lives there)",
    ]


def _fail(e: Exception) -> Exit:
    return Exit(f"sandbox: {e}", code=1)


def _fleet_lines(inf: runtime.FleetInfo) -> list[str]:
    return [
        f"ssh config:      {inf.ssh_config}  (hosts {', '.join(inf.hosts)}; and gpubox)",
        *(f"{h + ':':<16} ssh -F {inf.ssh_config} {h}   ({inf.addresses[h]}; systemd host pid "
          f"{inf.pids[h]['init']}, systemd-nspawn pid {inf.pids[h]['target']})" for h in inf.hosts),
        f"fleet:           {inf.fab_command}",
        f"hf endpoint:     {inf.hf_endpoint or '(testbed/hfserver.py missing: none)'}  (every host has a route to it)",
        f"git mirror:      {inf.git_url} @ {inf.git_sha}",
        f"overrides:       {inf.overrides_file}",
    ]


@task(help={"hosts": "bring up N hosts gpubox1..gpubox<N> (each its own namespace) instead of the one `gpubox`"},
      auto_shortflags=False)
def up(c, hosts=0):
    """Create (first time, minutes) and start the sandbox host `gpubox` (--hosts N: gpubox1..N); says how to reach it."""
    try:
        t0 = time.monotonic()
        inf = runtime.up_fleet(int(hosts)) if int(hosts) else runtime.up()
    except runtime.SandboxError as e:
        raise _fail(e)
    print(f"sandbox up in {time.monotonic() - t0:.1f}s")
    print("\n".join(_fleet_lines(inf) if int(hosts) else _info_lines(inf)))


@task
def down(c):
    """Stop everything the sandbox started (by PID; a fleet's hosts too), remove its namespaces; keeps the cache."""
    try:
        done = runtime.down(log=lambda m: None)
    except runtime.SandboxError as e:
        raise _fail(e)
    print("\n".join(done) if done else "sandbox: nothing was up")


@task
def status(c):
    """Show what is built and what is running."""
    print(json.dumps(runtime.status(), indent=2))


@task
def reset(c):
    """Back to the pristine state (drops the targets' writable layers, a fleet's too; the persistent cache stays)."""
    try:
        t0 = time.monotonic()
        runtime.reset()
        if runtime.fleet_running():
            runtime.reset_fleet()
    except runtime.SandboxError as e:
        raise _fail(e)
    print(f"sandbox reset in {time.monotonic() - t0:.2f}s")


sandbox_ns = Collection("sandbox", up, down, status, reset)


def demo_env(inf: runtime.Info) -> dict:
    """The controller's environment for running gpubox against the sandbox: Fabric reads the overrides
    as its project config file is not read (docs/testbed.md), so they go in through -f (runtime config)."""
    env = dict(os.environ)
    if inf.hf_endpoint:
        env["HF_ENDPOINT"] = inf.hf_endpoint
    return env


@task(help={"only": "comma-separated steps to run", "skip": "comma-separated steps to skip",
            "reset": "start from the pristine sandbox (default: yes)"})
def demo(c, only=None, skip=None, reset=True):
    """The whole journey on the sandbox: sandbox.up, `fab -H gpubox provision`, serve, verify, report."""
    p = Paths.default()
    p.root.mkdir(parents=True, exist_ok=True)
    with open(p.lock, "w") as lock:
        # The one sandbox is shared with test sessions: take turns (they hold this lock too).
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"demo: waiting for {p.lock} (a test session or another demo uses the sandbox)")
            fcntl.flock(lock, fcntl.LOCK_EX)
        _demo(only, skip, reset)


def _demo(only, skip, reset):
    try:
        inf = runtime.up()
        if reset:
            runtime.reset()
    except runtime.SandboxError as e:
        raise _fail(e)
    print("== sandbox")
    print("\n".join(_info_lines(inf)))
    env = demo_env(inf)
    fab = [sys.executable, "-m", "fabric", "-S", inf.ssh_config, "-H", "gpubox", "-f", inf.overrides_file]
    steps = ["provision"]
    if only:
        steps.append(f"--only={only}")
    if skip:
        steps.append(f"--skip={skip}")
    print("\n== provision: " + " ".join(["fab", *fab[3:], *steps]))
    rc_prov = subprocess.call([*fab, *steps], cwd=str(REPO_ROOT), env=env)
    print("\n== report (provision)")
    rc_rep = subprocess.call([*fab, "report"], cwd=str(REPO_ROOT), env=env)
    rc_serve = None
    if rc_prov == 0:
        print("\n== serve: " + " ".join(["fab", *fab[3:], "serve"]))
        rc_serve = subprocess.call([*fab, "serve"], cwd=str(REPO_ROOT), env=env)
    else:
        print("\n== serve: skipped (provision did not complete)")
    print("\n== verify: " + " ".join(["fab", *fab[3:], "verify"]))
    rc_ver = subprocess.call([*fab, "verify"], cwd=str(REPO_ROOT), env=env)
    print(f"\ndemo: provision exit {rc_prov}, report exit {rc_rep}, serve exit {rc_serve}, verify exit {rc_ver}")
    print(f"the sandbox stays up: `ssh -F {inf.ssh_config} gpubox`, `invoke sandbox.down` to stop it")
    if rc_prov or rc_serve or rc_ver or rc_rep:
        raise Exit(code=1)
