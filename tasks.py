"""Tasks for `invoke` and `fab` in a clone: gpubox's own, plus the test bench's.

gpubox's tasks (plan, provision, the six steps driver/cuda/compiler/patch/build/models, verify, report,
undo, serve, doctor, tune) are declared in provision/tasks.py: the installed `gpubox` command runs the
same collection. A clone adds the test bench (testbed/, not part of the installed product):

    invoke sandbox.up|down|status|reset   the Fedora-42-like sandbox host (up --hosts N: N of them)
    invoke demo                           the whole journey on the sandbox

Their bodies import testbed only when they run, so `invoke plan`/`invoke provision` load none of it.
"""

from __future__ import annotations

from invoke import Collection, task

import provision.tasks


def _bench(name: str):
    from testbed.sandbox import tasks as bench
    return getattr(bench, name)


@task(help={"hosts": "bring up N hosts gpubox1..gpubox<N> (each its own namespace) instead of the one `gpubox`"},
      auto_shortflags=False)
def up(c, hosts=0):
    """Create (first time, minutes) and start the sandbox host `gpubox` (--hosts N: gpubox1..N); says how to reach it."""
    _bench("up")(c, hosts=hosts)


@task
def down(c):
    """Stop everything the sandbox started (by PID), remove its namespace; keeps the cache."""
    _bench("down")(c)


@task
def status(c):
    """Show what is built and what is running."""
    _bench("status")(c)


@task
def reset(c):
    """Back to the pristine state (drops the target's writable layer; the persistent cache stays)."""
    _bench("reset")(c)


@task(help={"only": "comma-separated steps to run", "skip": "comma-separated steps to skip",
            "reset": "start from the pristine sandbox (default: yes)"})
def demo(c, only=None, skip=None, reset=True):
    """The whole journey on the sandbox: sandbox.up, `fab -H gpubox provision`, serve, verify, report."""
    _bench("demo")(c, only=only, skip=skip, reset=reset)


ns = Collection.from_module(provision.tasks)
ns.add_collection(Collection("sandbox", up, down, status, reset))
ns.add_task(demo)
