"""gpubox tasks: `invoke provision` on the GPU box, `fab -H gpubox provision` from a workstation.

The six steps, in order (each module holds its check, apply and facts; tests/ uses the same names):

    1. driver    provision/steps/driver.py    NVIDIA 580xx branch (RPM Fusion), locked; akmods, reboot state
    2. cuda      provision/steps/cuda.py      CUDA 12.9 from NVIDIA's repo, without NVIDIA's driver
    3. compiler  provision/steps/compiler.py  gcc-14 + private gcc/g++ shims (CUDA 12.9 rejects gcc 15)
    4. patch     provision/steps/patch.py     crt/math_functions.h vs glibc >= 2.41, idempotent, backed up
    5. build     provision/steps/build.py     the llama.cpp fork at a pinned commit, native CUDA archs
    6. models    provision/steps/models.py    the model GGUF and its MTP assistant head, verified

Every task body takes `c`: an Invoke Context locally, a Fabric Connection under `fab -H`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from invoke import Collection, Exit, task

from provision import config
from provision.engine import Runner
from provision.host import Host
from provision.steps import BY_NAME, STEPS
from provision.serve import tasks as serve_tasks
from provision.tune import tasks as tune_tasks
from testbed.sandbox.tasks import sandbox_ns, demo

REPO = Path(__file__).resolve().parent

# Common flags of the step tasks.
HELP = {
    "only": "comma-separated steps to run (driver,cuda,compiler,patch,build,models)",
    "skip": "comma-separated steps to skip",
    "set": "override a setting, KEY=VALUE (repeatable), e.g. --set build.jobs=8",
}


def settings(c, sets=()) -> dict:
    """Validated config or exit status 2 with the problems listed; nothing has run on the host."""
    try:
        return config.load(c, sets)
    except config.ConfigError as e:
        raise Exit(str(e), code=config.EXIT_CONFIG)


def run_steps(c, names, *, plan=False, only=None, skip=None, sets=()):
    cfg = settings(c, sets)
    try:
        chosen = config.select_steps(only, skip)
    except config.ConfigError as e:
        raise Exit(str(e), code=config.EXIT_CONFIG)
    steps = [BY_NAME[n] for n in names]
    skipped = [n for n in names if n not in chosen]
    report = Runner(Host(c), cfg, steps, plan=plan).run(skipped=skipped)
    print(report.table())
    if report.failed:
        raise Exit(code=1)
    return report


ALL = [m.NAME for m in STEPS]


@task(help=HELP, iterable=["set"])
def plan(c, only=None, skip=None, set=None):
    """Check every step and print what each would change, and why. Changes nothing."""
    run_steps(c, ALL, plan=True, only=only, skip=skip, sets=set or ())


@task(help=HELP, iterable=["set"])
def provision(c, only=None, skip=None, set=None):
    """Run all six steps in order: check, apply what differs, check again."""
    run_steps(c, ALL, only=only, skip=skip, sets=set or ())


def _step_task(name: str, doc: str):
    @task(name=name, help={"set": HELP["set"], "plan": "check only"}, iterable=["set"])
    def one(c, plan=False, set=None):
        run_steps(c, [name], plan=plan, sets=set or ())
    one.__doc__ = doc
    one.body.__doc__ = doc
    return one


driver = _step_task("driver", "Step 1: the NVIDIA 580xx driver branch, locked.")
cuda = _step_task("cuda", "Step 2: CUDA 12.9 without NVIDIA's conflicting driver.")
compiler = _step_task("compiler", "Step 3: gcc-14 and the build-only gcc/g++ shims.")
patch = _step_task("patch", "Step 4: patch crt/math_functions.h for glibc >= 2.41.")
models = _step_task("models", "Step 6: download the model and its MTP assistant head, verified.")


@task(help=HELP, iterable=["set"])
def build(c, only=None, skip=None, set=None):
    """Step 5 with the steps it depends on (cuda, compiler, patch unless the toolchain comes from config)."""
    cfg = settings(c, set or ())
    b = cfg["build"]
    needs = ["build"]
    if b["cuda"] and not (b["nvcc"] and b["host_compiler"]):
        needs = ["cuda", "compiler", "patch", "build"]
    run_steps(c, needs, only=only, skip=skip, sets=set or ())


@task(help={"step": "the step to undo: patch (restore the header backup) or compiler (remove the shims)",
            "set": HELP["set"]}, iterable=["set"])
def undo(c, step, set=None):
    """Undo a step that has an undo: patch (original header back) or compiler (shims removed)."""
    cfg = settings(c, set or ())
    mod = BY_NAME.get(step)
    if mod is None or not hasattr(mod, "undo"):
        have = ", ".join(m.NAME for m in STEPS if hasattr(m, "undo"))
        raise Exit(f"undo: step {step!r} has no undo (steps with one: {have}); package steps are undone with dnf",
                   code=config.EXIT_CONFIG)
    host = Host(c)
    from provision import facts as factmod
    done = mod.undo(host, factmod.gather(host, cfg, [mod]), cfg) or []
    print(f"undo {step}: " + ("; ".join(done) if done else "nothing to undo"))


@task(help={"set": HELP["set"], "deep": "re-hash model files instead of trusting the lock"}, iterable=["set"])
def verify(c, set=None, deep=False):
    """Run the testinfra suite (tests/verify) against the same host."""
    cfg = settings(c, set or ())
    host = getattr(c, "host", None)
    cfgfile = Path(os.path.expanduser(cfg["report_dir"])) / "verify-config.json"
    cfgfile.parent.mkdir(parents=True, exist_ok=True)
    cfgfile.write_text(json.dumps(cfg))
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(REPO / "tests" / "verify")]
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
    rc = subprocess.call(argv, env=env, cwd=str(REPO))
    if rc != 0:
        raise Exit(f"verify: testinfra reported failures (pytest exit {rc})", code=1)


@task(help={"set": HELP["set"]}, iterable=["set"])
def report(c, set=None):
    """Print the latest run report for this host."""
    cfg = settings(c, set or ())
    host = getattr(c, "host", None) or "localhost"
    path = Path(os.path.expanduser(cfg["report_dir"])) / f"{host}-latest.json"
    if not path.exists():
        raise Exit(f"report: no run recorded for {host} yet ({path}); run `invoke plan` or `provision` first", code=1)
    data = json.loads(path.read_text())
    print(f"gpubox {data['mode']} on {data['host']} at {data['started']} ({data['seconds']:.2f}s)")
    for s in data["steps"]:
        print(f"  {s['name']:<9} {s['status']:<12} {s['seconds']:6.2f}s  " + "; ".join(c['what'] for c in s["changes"]))
        for a in s["attention"]:
            print(f"            ! {a}")
    print(f"report: {path}")


ns = Collection(plan, provision, driver, cuda, compiler, patch, build, models, verify, report, undo)
ns.add_collection(serve_tasks.ns)   # invoke serve, serve.start|stop|status|logs
ns.add_task(serve_tasks.doctor)       # invoke doctor
ns.add_task(tune_tasks.tune)          # invoke tune
ns.add_collection(sandbox_ns, name="sandbox")  # invoke sandbox.up|down|status|reset
ns.add_task(demo)                     # invoke demo: the whole journey on the sandbox
ns.configure(config.defaults())
