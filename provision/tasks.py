"""gpubox's tasks: `gpubox provision` (installed), `invoke provision` / `fab -H HOST provision` (a clone).

The six steps, in order (provision/steps/__init__.py declares the order; each module holds its facts,
check, apply and verify helpers; tests/ uses the same names):

    1. driver    provision/steps/driver.py    NVIDIA 580xx branch (RPM Fusion), locked; akmods, reboot state
    2. cuda      provision/steps/cuda.py      CUDA 12.9 from NVIDIA's repo, without NVIDIA's driver
    3. compiler  provision/steps/compiler.py  gcc-14 + private gcc/g++ shims (CUDA 12.9 rejects gcc 15)
    4. patch     provision/steps/patch.py     crt/math_functions.h vs glibc >= 2.41, idempotent, backed up
    5. build     provision/steps/build.py     the llama.cpp fork at a pinned commit, native CUDA archs
    6. models    provision/steps/models.py    the model GGUF and its MTP assistant head, verified

Every task body takes `c`: an Invoke Context locally, a Fabric Connection under `-H HOST`.
`fleet` runs plan/provision on several hosts at once: provision/fleet.py.
"""

from __future__ import annotations

from invoke import Collection, task

from . import config, fleet, runs
from .serve import tasks as serve_tasks
from .steps import STEPS
from .tune import tasks as tune_tasks

# Invoke reads the project's invoke.yaml (and -f FILE) after importing the tasks; the installed `gpubox`
# imports this module before it reads any file. With gpubox's bounded loader a malformed or oversized
# config file is exit status 2 of the task, not a traceback (docs/config.md).
config.install_file_loader()

HELP = {
    "only": "comma-separated steps to run (" + ",".join(m.NAME for m in STEPS) + ")",
    "skip": "comma-separated steps to skip",
    "set": "override a setting, KEY=VALUE (repeatable), e.g. --set build.jobs=8",
}
ALL = [m.NAME for m in STEPS]


@task(help=HELP, iterable=["set"])
def plan(c, only=None, skip=None, set=None):
    """Check every step and print what each would change, and why. Changes nothing."""
    runs.run_steps(c, ALL, plan=True, only=only, skip=skip, sets=set)


@task(help=HELP, iterable=["set"])
def provision(c, only=None, skip=None, set=None):
    """Run all six steps in order: check, apply what differs, check again."""
    runs.run_steps(c, ALL, only=only, skip=skip, sets=set)


def step_task(i: int, step):
    """`invoke <step>`: one step alone (build: with the steps it depends on)."""
    @task(name=step.NAME, help={"set": HELP["set"], "plan": "check only"}, iterable=["set"])
    def one(c, plan=False, set=None):
        names = runs.build_needs(runs.settings(c, set)) if step.NAME == "build" else [step.NAME]
        runs.run_steps(c, names, plan=plan, sets=set)
    one.__doc__ = one.body.__doc__ = f"Step {i}: {step.TITLE}." + (
        " With the steps it needs (cuda, compiler, patch unless the toolchain comes from config)."
        if step.NAME == "build" else "")
    return one


def build_task(i: int, step):
    """`invoke build`: the build step task, with --check-reproducible (issue 15)."""
    one = step_task(i, step)

    @task(name=step.NAME, help={**one.help, "check-reproducible": "then build the same pin again into a second, "
                                "emptied directory (<build_dir>-repro, no ccache; a CPU build from a second clone) "
                                "and compare bin/ file by file; exit 1 if a file differs"}, iterable=["set"])
    def build(c, plan=False, set=None, check_reproducible=False):
        one.body(c, plan=plan, set=set)
        if check_reproducible and not plan:
            runs.check_reproducible(c, set)
    build.__doc__ = build.body.__doc__ = one.__doc__
    return build


STEP_TASKS = [(build_task if m.NAME == "build" else step_task)(i, m) for i, m in enumerate(STEPS, 1)]


@task(help={"step": "the step to undo: patch (restore the header backup) or compiler (remove the shims)",
            "set": HELP["set"]}, iterable=["set"])
def undo(c, step, set=None):
    """Undo a step that has an undo: patch (original header back) or compiler (shims removed)."""
    runs.undo(c, step, set)


@task(help={"set": HELP["set"], "deep": "re-hash model files instead of trusting the lock"}, iterable=["set"])
def verify(c, set=None, deep=False):
    """Run the testinfra suite against the same host."""
    runs.verify(c, set, deep)


@task(help={"set": HELP["set"]}, iterable=["set"])
def report(c, set=None):
    """Print the latest run report for this host."""
    runs.show_report(c, set)


ns = Collection(plan, provision, *STEP_TASKS, verify, report, undo)
ns.add_collection(serve_tasks.ns)   # serve, serve.start|stop|status|logs
ns.add_task(serve_tasks.doctor)       # doctor
ns.add_task(tune_tasks.tune)          # tune
ns.add_task(fleet.fleet)              # fleet: several hosts at once (provision/fleet.py, docs/fleet.md)
# No `gpubox` defaults for Invoke: its environment loader would cast INVOKE_GPUBOX_* by their types ("false"
# -> True, "abc" -> a traceback) and its merge refuses a file's `gpubox: [..]` over a mapping (a traceback);
# config.load layers defaults.yaml, the files, the environment and --set itself (docs/config.md).
