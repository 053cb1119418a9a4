"""The plan is what runs: on the pristine sandbox, `fab ... plan` then `fab ... provision` over SSH, all six steps.

For every step, the operations the provision ran (its report's `ran`, recorded by the engine as each one
started) equal the operations the plan printed under that step, line for line and in order; and every
operation that is one command (Cmd, Dnf) is among the commands the target really ran for that step, in the
same order. A plan afterwards prints no operation at all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
STEPS = ["driver", "cuda", "compiler", "patch", "build", "models"]


def fab(inf, task: str, report_dir: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "fabric", "-S", inf.ssh_config, "-H", "gpubox", "-f", inf.overrides_file,
            task, "--set", f"report_dir={report_dir}"]
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "HF_ENDPOINT": inf.hf_endpoint})
    assert r.returncode == 0, f"fab {task} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r


def report(report_dir: Path) -> dict:
    (latest,) = report_dir.glob("*-latest.json")
    return {s["name"]: s for s in json.loads(latest.read_text())["steps"]}


def printed_operations(stdout: str) -> list[str]:
    """The operation lines of the plan's table: indented, starting with the root (#) or user ($) prompt."""
    return [line.strip() for line in stdout.splitlines() if line.startswith("    ") and line.strip()[:2] in ("# ", "$ ")]


def is_subsequence(needles: list[str], hay: list[str]) -> bool:
    it = iter(hay)
    return all(any(n == h for h in it) for n in needles)


@pytest.fixture(scope="module")
def runs(sandbox, sandbox_lock, tmp_path_factory):
    from testbed.sandbox import runtime

    def reset_sandbox():
        runtime.reset(sandbox_lock, log=lambda m: None)

    reset_sandbox()
    out = {}
    for name, task in (("plan", "plan"), ("provision", "provision"), ("after", "plan")):
        rd = tmp_path_factory.mktemp(name)
        r = fab(sandbox, task, rd)
        out[name] = {"stdout": r.stdout, "steps": report(rd)}
    yield out
    reset_sandbox()


def test_every_step_ran_exactly_the_operations_its_plan_printed(runs):
    plan, prov = runs["plan"]["steps"], runs["provision"]["steps"]
    assert [plan[n]["status"] for n in STEPS] == ["would change"] * 6, runs["plan"]["stdout"]
    assert [prov[n]["status"] for n in STEPS] == ["changed"] * 6, runs["provision"]["stdout"]
    for n in STEPS:
        assert plan[n]["planned"], n
        assert prov[n]["ran"] == plan[n]["planned"], (n, prov[n]["ran"], plan[n]["planned"])
    # ... and the printed plan is exactly those lines, step after step
    assert printed_operations(runs["plan"]["stdout"]) == [line for n in STEPS for line in plan[n]["planned"]]


def test_each_command_operation_is_a_command_the_target_ran(runs):
    prov = runs["provision"]["steps"]
    for n in STEPS:
        raw = [c["command"] for c in prov[n]["commands"]]
        literal = prov[n]["ran_commands"]
        assert is_subsequence(literal, raw), (n, literal, raw)
    # dnf transactions, git, cmake: the system steps are mostly literal commands
    assert any(c.startswith("dnf5 -y install --allowerasing") for c in prov["driver"]["ran_commands"])
    # the clone is a typed operation (build.Clone), so it shows in the raw commands the target ran
    assert any("git clone --no-checkout" in c["command"] for c in prov["build"]["commands"])


def test_a_plan_after_the_provision_prints_no_operation(runs):
    after = runs["after"]["steps"]
    assert [after[n]["status"] for n in STEPS] == ["ok"] * 6, runs["after"]["stdout"]
    assert printed_operations(runs["after"]["stdout"]) == []
