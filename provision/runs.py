"""The bodies behind the tasks: settings, running steps, the verify suite, the report, undo.

provision/tasks.py declares the tasks (one screen); these functions do the work, so the same code
serves `invoke`/`fab` from a clone and the installed `gpubox` command (provision/cli.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

from invoke import Exit

from . import config, resources, runlock
from .engine import Runner, write_atomic
from .host import Host
from .steps import BY_NAME, STEPS


def settings(c, sets=()) -> dict:
    """Validated config or exit status 2 with the problems listed; nothing has run on the host."""
    try:
        return config.load(c, sets or ())
    except config.ConfigError as e:
        raise Exit(str(e), code=config.EXIT_CONFIG)


def run_steps(c, names, *, plan=False, only=None, skip=None, sets=()):
    """Run (or with plan=True only check) the named steps in order; print the report table."""
    cfg = settings(c, sets)
    try:
        chosen = config.select_steps(only, skip)
    except config.ConfigError as e:
        raise Exit(str(e), code=config.EXIT_CONFIG)
    steps = [BY_NAME[n] for n in names]
    skipped = [n for n in names if n not in chosen]
    host = Host(c)
    try:
        report = run_runner(Runner(host, cfg, steps, plan=plan), ",".join(n for n in names if n in chosen),
                            skipped=skipped)
    except config.ConfigError as e:   # a ~/ path that does not resolve on this target
        raise Exit(str(e), code=config.EXIT_CONFIG)
    print(report.table())
    if report.failed:
        raise Exit(code=1)
    return report


def run_runner(runner: Runner, what: str, skipped=()):
    """The engine's run on its host: a plan changes nothing, so it takes no lock (and never waits for one);
    a run that changes the box holds the target's run lock (`what` names it to a second run)."""
    if runner.plan:
        return runner.run(skipped=skipped)
    with locked(runner.host, runner.cfg, what):
        return runner.run(skipped=skipped)


@contextlib.contextmanager
def locked(host: Host, cfg: dict, what: str):
    """The target's run lock around a run that changes the box (provision/runlock.py); exit 75 when another
    run holds it (after lock_wait seconds), 1 when it cannot be taken at all."""
    try:
        with runlock.run_lock(host, cfg, what):
            yield
    except runlock.LockBusy as e:
        raise Exit(str(e), code=runlock.EXIT_BUSY)
    except runlock.LockError as e:
        raise Exit(f"{what}: {e}\n  fix: gpubox needs root on the target (log in as root or allow sudo without "
                   "a password) and a writable state_dir", code=1)


def build_needs(cfg: dict) -> list[str]:
    """Step 5 and the steps it depends on: cuda, compiler and patch unless the toolchain comes from config."""
    b = cfg["build"]
    if b["cuda"] and not (b["nvcc"] and b["host_compiler"]):
        return ["cuda", "compiler", "patch", "build"]
    return ["build"]


def check_reproducible(c, sets=()) -> None:
    """After a build: the same pin again in a second directory, bin/ compared file by file (provision.repro)."""
    from . import repro
    same, text = repro.check_build(c, sets or ())
    print(text)
    if not same:
        raise Exit("build: not reproducible: the second build differs (above); docs/reproducible-builds.md "
                   "lists the known causes", code=1)


def undo(c, step: str, sets=()) -> None:
    cfg = settings(c, sets)
    mod = BY_NAME.get(step)
    if mod is None or not hasattr(mod, "undo"):
        have = ", ".join(m.NAME for m in STEPS if hasattr(m, "undo"))
        raise Exit(f"undo: step {step!r} has no undo (steps with one: {have}); package steps are undone with dnf",
                   code=config.EXIT_CONFIG)
    host = Host(c)
    from . import facts as factmod
    with locked(host, cfg, f"undo {step}"):
        facts = factmod.gather(host, cfg, [mod])
        try:
            cfg = config.on_target(cfg, facts.get("home"))
        except config.ConfigError as e:
            raise Exit(str(e), code=config.EXIT_CONFIG)
        done = mod.undo(host, facts, cfg) or []
    print(f"undo {step}: " + ("; ".join(done) if done else "nothing to undo"))


def verify(c, sets=(), deep=False) -> None:
    """pytest with the testinfra suite (resources.VERIFY) against the host the context points at."""
    cfg = settings(c, sets)
    host = getattr(c, "host", None)
    cfgfile = Path(os.path.expanduser(cfg["report_dir"])) / "verify-config.json"
    cfgfile.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(cfgfile, json.dumps(cfg))
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(resources.VERIFY)]
    if host:
        user = getattr(c, "user", None)
        argv += [f"--hosts=ssh://{user + '@' if user else ''}{host}"]
        ssh_cfg = c.config.get("runtime_ssh_path") or c.config.get("ssh_config_path")
        if ssh_cfg:
            argv += [f"--ssh-config={ssh_cfg}"]
    else:
        argv += ["--hosts=local://"]
    env = dict(os.environ, GPUBOX_CONFIG=str(cfgfile), GPUBOX_VERIFY_DEEP="1" if deep else "0")
    print("verify:", " ".join(argv[2:]))
    rc = subprocess.call(argv, env=env, cwd=str(resources.VERIFY))
    if rc != 0:
        raise Exit(f"verify: testinfra reported failures (pytest exit {rc})", code=1)


def show_report(c, sets=()) -> None:
    cfg = settings(c, sets)
    host = getattr(c, "host", None) or "localhost"
    path = Path(os.path.expanduser(cfg["report_dir"])) / f"{host}-latest.json"
    if not path.exists():
        raise Exit(f"report: no run recorded for {host} yet ({path}); run `plan` or `provision` first", code=1)
    try:
        data = json.loads(path.read_text())
        steps = [(s["name"], s["status"], float(s["seconds"]), [str(x["what"]) for x in s["changes"]],
                  [str(a) for a in s["attention"]]) for s in data["steps"]]
        head = f"gpubox {data['mode']} on {data['host']} at {data['started']} ({float(data['seconds']):.2f}s)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise Exit(f"report: {path} is not a gpubox run report ({type(e).__name__}: {e}); run `plan` "
                   "to write a new one", code=1)
    print(head)
    for name, status, secs, changes, attention in steps:
        print(f"  {name:<9} {status:<12} {secs:6.2f}s  " + "; ".join(changes))
        for a in attention:
            print(f"            ! {a}")
    print(f"report: {path}")
