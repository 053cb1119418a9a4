"""The fleet runner's decisions, with fake connections: bounded concurrency through Fabric's ThreadingGroup,
a failing or unreachable host that does not stop the others, whole prefixed output lines, the combined
table and JSON, the exit status, and the executor that hands `-H a,b,c` to the fleet task in one call.

The steps here are tiny fakes (as in test_engine.py) run by the real Runner; the connections answer from
Invoke's MockContext. tests/integration/test_fleet_in_sandbox.py runs the real steps on three sandbox hosts."""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import threading
import time
from types import SimpleNamespace

import pytest
from invoke import Collection, Exit, Result, task

from provision import config, fleet
from provision.engine import CHANGED, FAILED, OK, PLANNED, Change, Check, Report, StepResult
from testbed.testing import FEDORA42_OS, mock_context

NAMES = ["one", "two"]


@pytest.fixture
def steps(monkeypatch):
    mods = {}
    for n in NAMES:
        def check(facts, cfg, n=n):
            if n in facts.get("_fixed", ()):
                return Check.done()
            return Check.todo([Change(f"fix {n}", "not there", [_op(n)])])

        def apply(host, facts, cfg, chk, n=n):
            from provision.engine import run_changes
            run_changes(host, chk)
            host.c.fixed.add(n)
        mods[n] = SimpleNamespace(NAME=n, TITLE=n, FACTS=[], check=check, apply=apply)
    monkeypatch.setattr(fleet, "BY_NAME", mods)
    # The facts the fake steps read: which of them were fixed on this host (from the connection's record).
    real_gather = fleet.Runner.gather

    def gather(self):
        f = real_gather(self)
        f["_fixed"] = set(self.host.c.fixed)
        return f
    monkeypatch.setattr(fleet.Runner, "gather", gather)
    # The run lock is the target's (tests/unit/test_runlock.py, test_runlock_in_sandbox.py); not under test here.
    monkeypatch.setattr(fleet.runs, "locked", lambda host, cfg, what: contextlib.nullcontext())
    return mods


def _op(name):
    from provision.ops import Cmd
    return Cmd(["fix-" + name], root=True)


class FakeConnection(fleet.FleetConnection):
    """Answers from a MockContext: the fact script (Fedora 42, root), `fix-*` commands (exit 1 where the host
    is told to fail), and a delay per command so that hosts overlap. Records how many hosts ran at once."""
    fail: dict[str, str] = {}          # host -> step whose fix exits 1
    fixed: set | None = None           # declared: a Connection turns unknown attribute names into config keys
    mock = None
    state: dict[str, set] = {}
    unreachable: set[str] = set()
    delay = 0.03
    active = 0
    peak = 0
    lock = threading.Lock()

    def __init__(self, host, **kw):
        super().__init__(host, **kw)
        self.fixed = type(self).state.setdefault(host, set())     # what was fixed on this host, across runs
        responses = {}
        for n in NAMES:
            bad = self.fail.get(host) == n
            responses[f"fix-{n}"] = Result(stdout="", stderr=("E: repo cuda: no metadata\nrepository missing"
                                                               if bad else ""), exited=1 if bad else 0)
        self.mock = mock_context({"os": FEDORA42_OS, "whoami": "root\n0"}, responses)

    def _remote_run(self, command, **kw):
        if self.host in self.unreachable:
            raise socket.timeout("timed out")
        time.sleep(self.delay)
        kw.pop("in_stream", None)
        return self.mock.run(command, **kw)

    def _provision(self, job):
        cls = type(self)
        with cls.lock:
            cls.active += 1
            cls.peak = max(cls.peak, cls.active)
        try:
            return super()._provision(job)
        finally:
            with cls.lock:
                cls.active -= 1

    def close(self):
        pass


@pytest.fixture
def conn_cls():
    class C(FakeConnection):
        fail, unreachable, active, peak, lock, state = {}, set(), 0, 0, threading.Lock(), {}
    return C


@pytest.fixture
def cfg(tmp_path):
    c = config.validate(config.defaults()["gpubox"])
    c["report_dir"] = str(tmp_path / "reports")
    return c


def fab_config():
    import fabric
    return fabric.Config(lazy=True)


def test_hosts_and_parallel_bound():
    assert fleet.parse_hosts("a, b,,a,c") == ["a", "b", "c"]
    assert fleet.parse_hosts(["a,b", "c"]) == ["a", "b", "c"]
    assert fleet.parse_hosts(None) == []
    assert fleet.bound(None, 3) == 3
    assert fleet.bound(None, 40) == fleet.DEFAULT_PARALLEL
    assert fleet.bound("2", 5) == 2
    assert fleet.bound(8, 3) == 3          # never more slots than hosts
    for bad in ("0", "-1", "x", 0):
        with pytest.raises(config.ConfigError, match="--parallel"):
            fleet.bound(bad, 3)


def test_parallel_is_a_bound_and_a_failing_host_does_not_stop_the_others(steps, conn_cls, cfg, tmp_path):
    conn_cls.fail = {"b": "two"}
    out = io.StringIO()
    rep = fleet.run_fleet(["a", "b", "c", "d", "e"], fab_config(), cfg, names=NAMES, parallel=2, out=out,
                          err=out, connection=conn_cls)
    assert conn_cls.peak == 2                      # at most 2 at once, and really 2 at once
    by = {h.host: h for h in rep.hosts}
    assert [h.host for h in rep.hosts] == ["a", "b", "c", "d", "e"]      # the order given, whatever finished first
    assert rep.failed == ["b"]
    for h in "acde":
        assert by[h].status == CHANGED and by[h].steps == {"one": CHANGED, "two": CHANGED}, by[h]
    b = by["b"]
    assert b.steps == {"one": CHANGED, "two": FAILED}
    assert b.failure["step"] == "two"
    assert b.failure["command"] == "fix-two" and b.failure["exited"] == 1
    assert "repository missing" in b.failure["output"]
    assert b.failure["log"].endswith("two.log") and b.report.endswith("-provision.json")
    # Every command went over the host's connection and was counted: facts, fix-one, facts, fix-two (b stops).
    assert by["a"].ssh_commands == 5 and b.ssh_commands == 4
    # Intervals: with 2 slots the 5 hosts overlap pairwise, never 3 at once.
    for t in (x.start + 0.001 for x in rep.hosts):
        assert sum(1 for x in rep.hosts if x.start <= t < x.end) <= 2
    data = json.loads((tmp_path / "reports" / "fleet-latest.json").read_text())
    assert data["failed"] == ["b"] and data["parallel"] == 2 and data["mode"] == "provision"
    assert data["hosts"][1]["failure"]["command"] == "fix-two"
    assert rep.path.endswith("-provision.json") and json.loads(open(rep.path).read()) == data


def test_output_lines_are_whole_and_prefixed(steps, conn_cls, cfg):
    out = io.StringIO()
    fleet.run_fleet(["h1", "h2", "h3"], fab_config(), cfg, names=NAMES, out=out, err=out, connection=conn_cls)
    lines = out.getvalue().splitlines()
    assert lines, "the hosts said nothing"
    for line in lines:
        assert re.match(r"^\[h[123]\] ", line), line
    for h in ("h1", "h2", "h3"):
        mine = [l for l in lines if l.startswith(f"[{h}] ")]
        assert mine[0] == f"[{h}] provision started"
        assert f"[{h}] [one] applying: fix one" in mine
        assert re.match(rf"^\[{h}\] changed in \d+\.\d\ds, 5 SSH commands$", mine[-1]), mine


def test_prefixed_output_never_mixes_two_threads_in_a_line():
    sink = io.StringIO()
    o = fleet.Output(sink, sink)
    words = {f"t{i}": [f"w{i}-{k}" for k in range(200)] for i in range(4)}

    def speak(name):
        o.own(name)
        import sys
        for w in words[name]:
            sys.stdout.write(w[:2])       # a line written in pieces
            sys.stdout.write(w[2:] + "\n")
        sys.stdout.write("progress 10%\rprogress 50%\rtail without newline")
        o.disown()
    with o:
        ts = [threading.Thread(target=speak, args=(n,)) for n in words]
        [t.start() for t in ts]
        [t.join() for t in ts]
    lines = sink.getvalue().splitlines()
    for name, ws in words.items():
        mine = [l for l in lines if l.startswith(f"[{name}] ")]
        assert mine == [f"[{name}] {w}" for w in ws] + [f"[{name}] tail without newline"]
    assert len(lines) == 4 * 201


def test_an_unreachable_host_is_its_own_failure(steps, conn_cls, cfg):
    conn_cls.unreachable = {"gone"}
    rep = fleet.run_fleet(["ok1", "gone"], fab_config(), cfg, names=NAMES, out=io.StringIO(), err=io.StringIO(),
                          connection=conn_cls)
    by = {h.host: h for h in rep.hosts}
    assert by["ok1"].status == CHANGED
    g = by["gone"]
    assert g.status == FAILED and g.failure["step"] == "connect" and "timed out" in g.failure["cause"]
    assert g.steps == {"one": fleet.NOT_RUN, "two": fleet.NOT_RUN}
    assert "step connect: TimeoutError: timed out" in rep.table()


def test_plan_changes_nothing_and_groups_hosts_with_one_plan(steps, conn_cls, cfg):
    rep = fleet.run_fleet(["p1", "p2"], fab_config(), cfg, plan=True, names=NAMES, out=io.StringIO(),
                          err=io.StringIO(), connection=conn_cls)
    assert [h.status for h in rep.hosts] == [PLANNED, PLANNED]
    assert all(h.ssh_commands == 1 for h in rep.hosts)      # the facts, once: nothing applied
    text = rep.table()
    assert "plan for p1, p2:" in text and "    # fix-one" in text and "    # fix-two" in text
    assert text.count("plan for") == 1


def test_skipped_steps_and_the_table(cfg):
    rep = fleet.FleetReport("provision", "20260101-000000", 2, ["driver", "cuda", "patch", "build"])
    good = fleet.HostRun("box1", OK, steps={"driver": OK, "cuda": OK, "patch": "skipped"}, start=0, end=1.5,
                         ssh_commands=3)
    bad = fleet.HostRun("box22", FAILED, steps={"driver": CHANGED, "cuda": FAILED, "patch": fleet.NOT_RUN},
                        start=0.1, end=2.0, ssh_commands=9, report="/r/box22.json",
                        failure={"step": "cuda", "cause": "cuda: a command failed", "command": "dnf -y install x",
                                 "exited": 1, "output": "a\nErrors during downloading metadata for repository 'cuda'",
                                 "fix": "see the output", "log": "/r/box22/cuda.log"})
    rep.hosts = [good, bad]
    t = rep.table().splitlines()
    assert re.match(r"^  host +driver +cuda +patch +time +ssh$", t[1]), t[1]     # build: skipped everywhere
    assert t[0].startswith("gpubox fleet provision: 2 hosts, at most 2 at once, 1 converged, 1 failed")
    assert re.match(r"^  box1 +ok +ok +skipped +1\.50s +3$", t[2]), t[2]
    assert re.match(r"^  box22 +changed +FAILED +not run +1\.90s +9$", t[3]), t[3]
    text = "\n".join(t)
    assert "  box22: step cuda: a command failed\n    command: dnf -y install x\n    exit status: 1" in text
    assert "      Errors during downloading metadata for repository 'cuda'" in text
    assert "    step log: /r/box22/cuda.log" in text and "box1:" not in text


def test_fill_takes_the_first_failure_and_marks_steps_not_run():
    r = Report("h", "x", "provision", steps=[
        StepResult("driver", CHANGED, changes=[{"what": "a", "why": "b", "commands": []}]),
        StepResult("cuda", FAILED, error="cuda: boom", failure={"cause": "cuda: boom", "command": "dnf x",
                                                                "exited": 1, "output": "tail"}, log="/l"),
        StepResult("patch", "skipped", error="not run: step cuda failed"),
        StepResult("build", "skipped")])
    hr = fleet.HostRun("h", FAILED)
    fleet.fill(hr, r)
    assert hr.status == FAILED and hr.exit == 1
    assert hr.steps == {"driver": CHANGED, "cuda": FAILED, "patch": fleet.NOT_RUN, "build": "skipped"}
    assert hr.failure == {"step": "cuda", "cause": "cuda: boom", "command": "dnf x", "exited": 1,
                          "output": "tail", "log": "/l"}


# --- the task and the executor --------------------------------------------------------------------

def test_fleet_task_exits_1_when_a_host_failed_and_2_on_bad_input(steps, conn_cls, cfg, monkeypatch, capsys):
    from invoke import Config, Context
    conn_cls.fail = {"y": "one"}
    real = fleet.run_fleet
    monkeypatch.setattr(fleet, "run_fleet", lambda *a, **k: real(*a, **{**k, "names": NAMES, "skipped": [],
                                                                         "connection": conn_cls}))
    c = Context(Config(overrides={"gpubox": {"report_dir": cfg["report_dir"]}}))
    with pytest.raises(Exit) as e:
        fleet.fleet.body(c, hosts="x,y", parallel="2")
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "gpubox fleet provision: 2 hosts, at most 2 at once, 1 converged, 1 failed" in out
    assert "  y: step one: a command failed" in out
    conn_cls.fail = {}
    rep = fleet.fleet.body(c, hosts="x,y")        # all good: returns, exit status 0
    assert rep.failed == [] and [h.status for h in rep.hosts] == [OK, CHANGED]   # x converged in the first run
    for kw in ({"hosts": ""}, {"hosts": "x", "parallel": "0"}, {"hosts": "x", "only": "nosuch"}):
        with pytest.raises(Exit) as e:
            fleet.fleet.body(c, **kw)
        assert e.value.code == config.EXIT_CONFIG, kw


def test_fleet_task_under_fab_H_says_how_to_run_it():
    from fabric import Connection
    with pytest.raises(Exit) as e:
        fleet.fleet.body(Connection("box1"), hosts=None)
    assert e.value.code == config.EXIT_CONFIG and "fab fleet --hosts a,b,c" in str(e.value.message)


def test_executor_gives_the_fleet_task_all_H_hosts_in_one_call():
    import fabric
    from fabric.main import Fab
    seen = []

    @task
    def one(c):
        seen.append(("one", c.host))

    @task
    def many(c, hosts=None, plan=False):
        seen.append(("many", type(c).__name__, hosts, plan))
    many.fleet_hosts = True
    prog = Fab(name="t", namespace=Collection(one, many), executor_class=fleet.Executor,
               config_class=fabric.Config)
    prog.run(["t", "-H", "a,b,c", "one", "many", "--plan"], exit=False)
    assert seen == [("one", "a"), ("one", "b"), ("one", "c"), ("many", "Context", "a,b,c", True)]
    seen.clear()
    prog.run(["t", "-H", "a,b", "many", "--hosts", "x,y"], exit=False)    # --hosts wins, still one call
    assert seen == [("many", "Context", "x,y", False)]
    seen.clear()
    prog.run(["t", "many", "--hosts", "z"], exit=False)
    assert seen == [("many", "Context", "z", False)]


def test_fab_takes_the_executor_from_a_config_file(tmp_path):
    """docs/fleet.md: `tasks.executor_class: provision.fleet.Executor` in a file given with -f makes Fabric's own
    program hand -H to the fleet task too (Invoke reads it from the config at execute time)."""
    import fabric
    from fabric.main import Fab
    seen = []

    @task
    def many(c, hosts=None):
        seen.append((type(c).__name__, hosts))
    many.fleet_hosts = True
    prog = Fab(name="fab", namespace=Collection(many), executor_class=fabric.Executor, config_class=fabric.Config)
    prog.run(["fab", "-H", "a,b", "many"], exit=False)
    assert seen == [("Connection", None), ("Connection", None)]      # stock: once per host
    seen.clear()
    (tmp_path / "f.yaml").write_text("tasks:\n  executor_class: provision.fleet.Executor\n")
    prog.run(["fab", "-f", str(tmp_path / "f.yaml"), "-H", "a,b", "many"], exit=False)
    assert seen == [("Context", "a,b")]


def test_the_gpubox_program_uses_the_fleet_executor():
    from provision import cli
    assert cli.program.executor_class is fleet.Executor
    assert getattr(cli.ns.tasks["fleet"], "fleet_hosts", False)


# --- the sandbox's fleet: names, addresses, one ssh config -----------------------------------------

def test_sandbox_fleet_hosts_have_their_own_names_and_addresses_and_gpubox_keeps_its_own(tmp_path):
    from testbed.sandbox import paths, runtime
    ts = paths.fleet_targets(4)
    assert [t.name for t in ts] == ["gpubox1", "gpubox2", "gpubox3", "gpubox4"]
    every = [paths.TARGET, *paths.fleet_targets(paths.MAX_FLEET)]
    for attr in ("name", "netns", "host_if", "address", "host_address", "cgroup"):
        values = [getattr(t, attr) for t in every]
        assert len(set(values)) == len(values), attr
    assert all(len(t.host_if) <= 15 for t in every)                  # Linux interface names
    assert (paths.TARGET.address, paths.TARGET.host_address) == ("10.200.0.2", "10.200.0.1")
    assert (ts[2].address, ts[2].host_address) == ("10.200.3.2", "10.200.3.1")
    with pytest.raises(ValueError):
        paths.fleet_target(0)
    p = paths.Paths(tmp_path)
    assert p.instance(paths.TARGET).upper == p.upper                 # the single host's layer where it was
    assert p.instance(ts[1]).upper == tmp_path / "instances" / "gpubox2" / "upper"
    runtime._write_ssh_config(p, ts[:3])
    text = p.ssh_config.read_text()
    blocks = re.findall(r"^Host (\S+) (\S+)\n    HostName (\S+)$", text, re.M)
    assert blocks == [("gpubox", "10.200.0.2", "10.200.0.2"), ("gpubox1", "10.200.1.2", "10.200.1.2"),
                      ("gpubox2", "10.200.2.2", "10.200.2.2"), ("gpubox3", "10.200.3.2", "10.200.3.2")]
    import paramiko
    cfg = paramiko.SSHConfig.from_path(str(p.ssh_config))
    assert cfg.lookup("gpubox3")["hostname"] == "10.200.3.2" and cfg.lookup("gpubox")["hostname"] == "10.200.0.2"
    runtime._write_ssh_config(p, [])
    assert re.findall(r"^Host (\S+)", p.ssh_config.read_text(), re.M) == ["gpubox"]


def test_rows_and_prefixes_use_the_name_given_not_the_ssh_configs_address(steps, conn_cls, cfg):
    import fabric
    import paramiko
    fc = fabric.Config(ssh_config=paramiko.SSHConfig.from_text("Host box1\n    HostName 10.9.9.1\n"))
    out = io.StringIO()
    rep = fleet.run_fleet(["box1"], fc, cfg, names=NAMES, out=out, err=out, connection=conn_cls)
    assert [h.host for h in rep.hosts] == ["box1"]
    assert out.getvalue().startswith("[box1] provision started\n")


def test_ssh_config_option_replaces_the_loaded_one(tmp_path):
    import fabric
    import paramiko
    from invoke import Config, Context
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("Host box\n    HostName 10.1.1.1\n")
    b.write_text("Host box\n    HostName 10.2.2.2\n")
    under_fab = Context(fabric.Config(ssh_config=paramiko.SSHConfig.from_path(str(a))))
    assert fleet.fabric_config(under_fab).base_ssh_config.lookup("box")["hostname"] == "10.1.1.1"
    assert fleet.fabric_config(under_fab, str(b)).base_ssh_config.lookup("box")["hostname"] == "10.2.2.2"
    under_invoke = Context(Config(overrides={"ssh_config_path": str(a)}))      # the sandbox's -f file names one
    assert fleet.fabric_config(under_invoke).base_ssh_config.lookup("box")["hostname"] == "10.1.1.1"
    assert fleet.fabric_config(under_invoke, str(b)).base_ssh_config.lookup("box")["hostname"] == "10.2.2.2"
    with pytest.raises(Exit) as e:
        fleet.fabric_config(under_invoke, str(tmp_path / "nope"))
    assert e.value.code == config.EXIT_CONFIG
