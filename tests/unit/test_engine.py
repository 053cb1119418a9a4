"""The runner: ok / changed / failed / skipped paths, 'still not satisfied after apply', the report."""

import json
import re
from types import SimpleNamespace

import pytest
from invoke import Result

from provision import config
from provision.engine import CHANGED, FAILED, OK, PLANNED, SKIPPED, Change, Check, Runner, StepError
from provision.host import Host
from testbed.testing import FEDORA42_OS, mock_context


def make_step(name, *, satisfied_before, satisfied_after=True, apply_cmd="true", attention=(), raises=None):
    state = {"applied": False}

    def check(facts, cfg):
        ok = satisfied_after if state["applied"] else satisfied_before
        if ok:
            return Check.done(attention=list(attention))
        return Check.todo([Change(f"fix {name}", "not there", [apply_cmd])])

    def apply(host, facts, cfg, chk):
        if raises:
            raise raises
        host.run(apply_cmd, root=True)
        state["applied"] = True

    return SimpleNamespace(NAME=name, TITLE=name, FACTS=[], check=check, apply=apply, state=state)


@pytest.fixture
def cfg(tmp_path):
    c = config.validate(config.defaults()["gpubox"])
    c["report_dir"] = str(tmp_path / "reports")
    return c


def runner(cfg, steps, plan=False, responses=None):
    ctx = mock_context({"user": "root 0", "os": FEDORA42_OS}, responses or {"true": Result(), "false": Result(exited=1, stderr="boom")})
    host = Host(ctx)
    return Runner(host, cfg, steps, plan=plan, echo=lambda s: None), ctx


def statuses(report):
    return [(s.name, s.status) for s in report.steps]


def test_ok_changed_skipped(cfg):
    steps = [make_step("a", satisfied_before=True), make_step("b", satisfied_before=False), make_step("c", satisfied_before=False)]
    r, ctx = runner(cfg, steps)
    rep = r.run(skipped=["c"])
    assert statuses(rep) == [("a", OK), ("b", CHANGED), ("c", SKIPPED)]
    assert steps[1].state["applied"] and not steps[2].state["applied"]
    # facts once at the start, once after b's apply
    assert rep.fact_commands == 2
    assert [c["command"] for c in rep.steps[1].commands if "@@fact" not in c["command"]] == ["true"]


def test_still_not_satisfied_after_apply_is_a_failure(cfg):
    steps = [make_step("a", satisfied_before=False, satisfied_after=False), make_step("b", satisfied_before=False)]
    rep = runner(cfg, steps)[0].run()
    assert statuses(rep) == [("a", FAILED), ("b", SKIPPED)]
    assert "still not satisfied after apply: fix a (not there)" in rep.steps[0].error
    assert rep.failed and not steps[1].state["applied"]


def test_command_failure_names_step_command_status_and_output(cfg):
    steps = [make_step("a", satisfied_before=False, apply_cmd="false")]
    rep = runner(cfg, steps)[0].run()
    err = rep.steps[0].error
    assert rep.steps[0].status == FAILED
    assert "a: a command failed" in err and "command: false" in err and "exit status: 1" in err and "boom" in err
    assert "FAILED" in rep.table() and "full log:" in rep.table()


def test_step_error_stops_the_run(cfg):
    steps = [make_step("a", satisfied_before=False, raises=StepError("a: refused", "do X")), make_step("b", satisfied_before=False)]
    rep = runner(cfg, steps)[0].run()
    assert statuses(rep) == [("a", FAILED), ("b", SKIPPED)]
    assert "fix: do X" in rep.steps[0].error


def test_plan_changes_nothing_and_lists_reasons(cfg):
    steps = [make_step("a", satisfied_before=False), make_step("b", satisfied_before=True, attention=["reboot required"])]
    r, ctx = runner(cfg, steps, plan=True)
    rep = r.run()
    assert statuses(rep) == [("a", PLANNED), ("b", OK)]
    assert not steps[0].state["applied"]
    assert rep.steps[0].changes == [{"what": "fix a", "why": "not there", "commands": ["true"]}]
    assert "! reboot required" in rep.table()
    # only the fact script ran
    assert all("@@fact" in call.args[0] for call in ctx.run.call_args_list)


def test_report_json_and_step_logs_written(cfg, tmp_path):
    rep = runner(cfg, [make_step("a", satisfied_before=False)])[0].run()
    data = json.loads(open(rep.path).read())
    assert data["steps"][0]["status"] == CHANGED and data["steps"][0]["seconds"] >= 0
    assert data["steps"][0]["commands"][0]["command"] == "true"
    log = open(data["steps"][0]["log"]).read()
    assert "$ true" in log and "# exit 0" in log
    assert (tmp_path / "reports" / "localhost-latest.json").exists()


def test_sudo_used_only_when_not_root(cfg):
    ctx = mock_context({"user": "alice 1000", "os": FEDORA42_OS}, {"sudo -n sh -c true": Result()})
    rep = Runner(Host(ctx), cfg, [make_step("a", satisfied_before=False)], echo=lambda s: None).run()
    assert rep.steps[0].status == CHANGED
    assert rep.steps[0].commands[0]["command"] == "sudo -n sh -c true"


# --- operations: what the plan prints is what apply runs -----------------------------------------------------

def op_step(name, ops_by_change):
    """A step whose check wants the given changes, each with its operations; apply runs them (run_changes)."""
    from provision.engine import run_changes
    state = {"applied": False}

    def check(facts, cfg):
        if state["applied"]:
            return Check.done()
        return Check.todo([Change(f"fix {i}", "not there", ops) for i, ops in enumerate(ops_by_change)])

    def apply(host, facts, cfg, chk):
        notes = run_changes(host, chk)
        state["applied"] = True
        return notes

    return SimpleNamespace(NAME=name, TITLE=name, FACTS=[], check=check, apply=apply)


def test_plan_prints_the_operations_and_provision_runs_exactly_them(cfg, capsys):
    from provision.ops import Cmd
    shared = Cmd(["echo", "one shared"], root=True)
    steps = [op_step("a", [[Cmd(["echo", "a b"])], [shared, Cmd(["echo", "x"])], [shared]])]
    r, ctx = runner(cfg, steps, plan=True, responses={re.compile(r"^echo "): Result()})
    plan = r.run()
    table = plan.table()
    assert plan.steps[0].planned == ["$ echo 'a b'", "# echo 'one shared'", "$ echo x"]   # the shared one once
    assert [ln.strip() for ln in table.splitlines() if ln.strip()[:2] in ("$ ", "# ")] == plan.steps[0].planned
    assert ran(r) == []                                                                   # plan ran nothing
    r, ctx = runner(cfg, steps, responses={re.compile(r"^echo "): Result()})
    rep = r.run()
    assert rep.steps[0].status == CHANGED
    assert rep.steps[0].ran == plan.steps[0].planned
    assert ran(r) == ["echo 'a b'", "echo 'one shared'", "echo x"]
    assert rep.steps[0].ran_commands == ran(r)


def test_a_change_without_an_operation_is_refused_before_anything_runs(cfg):
    from provision.ops import Cmd
    steps = [op_step("a", [[Cmd(["echo", "first"])], []]), op_step("b", [["echo described only"]])]
    r, ctx = runner(cfg, steps, responses={re.compile(r"^echo "): Result()})
    rep = r.run()
    assert rep.steps[0].status == FAILED and "carries no operation" in rep.steps[0].error
    assert ran(r) == [] and rep.steps[0].ran == []
    assert rep.steps[1].error == "not run: step a failed"


def ran(r):
    """The commands the runner's host ran, fact gathering left out."""
    return [rec.command for rec in r.host.records if "@@fact" not in rec.command]
