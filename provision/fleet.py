"""Several boxes at once: the same step bodies on each host, concurrently, with one report for the fleet.

    gpubox -H box1,box2,box3 fleet [--plan] [--parallel N] [--only ...] [--skip ...] [--set k=v]
    fab fleet --hosts box1,box2,box3 ...      invoke fleet --hosts box1,box2,box3 --ssh-config FILE ...

How (docs/fleet.md):
- Fabric's ThreadingGroup runs one method on every Connection of the group, each in its own thread, and
  returns a GroupResult (an exception in place of a host's result). `FleetConnection.provision_steps` is
  that method: the step engine (Runner, with the target's run lock unless planning) on its own host,
  exactly what `provision`/`plan` run for one host, returning a `HostRun` instead of printing and exiting.
- ThreadingGroup has no bound (fabric/group.py starts a thread per connection and joins them all), so
  `--parallel N` is a semaphore the method takes before it touches its host: every thread starts, at
  most N hosts are being worked on, and a finished host frees its slot for the next at once (batches
  of N would wait for the slowest host of each batch). A host's connection is opened inside its slot and
  closed when it is done, so at most N SSH connections are open at a time.
- A host that fails (a step failed, the lock was busy, SSH could not connect) is that host's result; the
  others go on. The exit status is 1 when any host failed.
- Output: what a host's thread prints (the engine's `[step] applying: ...` lines, lock messages, progress)
  goes out whole lines at a time, each prefixed `[host] `; nothing else is written while the hosts run
  (commands run with hide=True, as for one host). Each host keeps its own report and step logs as today;
  the fleet's table and JSON (`<report_dir>/fleet-<stamp>-<mode>.json`, `fleet-latest.json`) come after.
"""

from __future__ import annotations

import copy
import datetime as _dt
import io
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import fabric
from fabric import Connection, ThreadingGroup
from fabric.exceptions import GroupException
from invoke import Call, Exit, task

from . import config, runs
from .engine import CHANGED, FAILED, OK, PLANNED, SKIPPED, Runner, write_atomic
from .host import Host
from .steps import BY_NAME, STEPS

# At most this many hosts at once unless --parallel says otherwise. Why 10 (docs/fleet.md): OpenSSH's
# sshd starts dropping unauthenticated connections beyond MaxStartups' first figure, 10 by default, so a
# fleet behind one jump host must not open more at once; on the controller each host is two threads
# (its own and Paramiko's transport) that mostly wait on the box, and bench/fleet_bench.py measures what
# they cost.
DEFAULT_PARALLEL = 10
ALL = [m.NAME for m in STEPS]
NOT_RUN = "not run"


def parse_hosts(hosts: str | Sequence[str] | None) -> list[str]:
    """`a,b,c` (or a list of such) -> ['a', 'b', 'c'], order kept, duplicates dropped."""
    if not hosts:
        return []
    items = [hosts] if isinstance(hosts, str) else list(hosts)
    out: list[str] = []
    for item in items:
        for h in str(item).split(","):
            h = h.strip()
            if h and h not in out:
                out.append(h)
    return out


def bound(parallel: int | str | None, hosts: int) -> int:
    """The number of hosts worked on at once: --parallel N (1 or more), default min(DEFAULT_PARALLEL, hosts)."""
    if parallel in (None, ""):
        return max(1, min(DEFAULT_PARALLEL, hosts))
    try:
        n = int(parallel)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise config.ConfigError([f"--parallel {parallel!r}: give a whole number of hosts, 1 or more "
                                  f"(the default is {DEFAULT_PARALLEL} or the number of hosts, if fewer)"])
    return min(n, max(1, hosts))


# --- output: whole lines, each prefixed with its host --------------------------------------------------

class PrefixedOutput(io.TextIOBase):
    """Stands in for sys.stdout/sys.stderr while hosts run in threads. A thread that `own`s a prefix has its
    writes buffered and sent on as whole lines, each starting with the prefix, under one lock (so lines of
    two hosts never mix); a carriage-return redraw keeps only its last state. Other threads' writes pass
    straight through. isatty() is False: progress reporters print lines, not bars."""

    def __init__(self, real, lock: threading.Lock, owners: dict[int, str]):
        self.real, self._lock, self._owners = real, lock, owners
        self._bufs: dict[int, str] = {}

    def write(self, s: str) -> int:
        ident = threading.get_ident()
        prefix = self._owners.get(ident)
        if prefix is None:
            with self._lock:
                self.real.write(s)
            return len(s)
        buf = self._bufs.get(ident, "") + s
        *lines, rest = buf.split("\n")
        self._bufs[ident] = rest
        if lines:
            text = "".join(f"{prefix}{line.rsplit(chr(13), 1)[-1]}\n" for line in lines)
            with self._lock:
                self.real.write(text)
                self.real.flush()
        return len(s)

    def flush_thread(self) -> None:
        """What the calling thread left without a newline, as a last line."""
        rest = self._bufs.pop(threading.get_ident(), "")
        if rest.strip():
            self.write(rest + "\n")
            self._bufs.pop(threading.get_ident(), None)

    def flush(self) -> None:
        with self._lock:
            self.real.flush()

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self):  # noqa: D401  (what print() and io code may ask)
        return getattr(self.real, "encoding", "utf-8")


class Output:
    """The fleet's terminal: installs the prefixing streams for the length of a `with`, maps threads to hosts."""

    def __init__(self, out=None, err=None):
        self._lock = threading.Lock()
        self._owners: dict[int, str] = {}
        self._real = (out, err)
        self.stdout = self.stderr = None

    def own(self, host: str) -> None:
        """The calling thread speaks for `host` from now on."""
        self._owners[threading.get_ident()] = f"[{host}] "

    def disown(self) -> None:
        for s in (self.stdout, self.stderr):
            if s is not None:
                s.flush_thread()
        self._owners.pop(threading.get_ident(), None)

    def __enter__(self) -> "Output":
        out, err = self._real
        self._saved = (sys.stdout, sys.stderr)
        self.stdout = PrefixedOutput(out or sys.stdout, self._lock, self._owners)
        self.stderr = PrefixedOutput(err or sys.stderr, self._lock, self._owners)
        sys.stdout, sys.stderr = self.stdout, self.stderr
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout, sys.stderr = self._saved


class _Owned(io.TextIOBase):
    """A command's out_stream (e.g. the build's progress parser): Invoke writes to it from its own IO thread,
    which from then on prints under the host's prefix too."""

    def __init__(self, inner, out: Output, host: str):
        self.inner, self.out, self.host = inner, out, host

    def write(self, s: str) -> int:
        self.out.own(self.host)
        return self.inner.write(s)

    def flush(self) -> None:
        self.inner.flush()


# --- one host ---------------------------------------------------------------------------------------

@dataclass
class Job:
    """What every host runs: the steps, the validated settings (each host gets its own copy), the mode."""
    names: list[str]
    skipped: list[str]
    cfg: dict
    plan: bool
    slots: threading.Semaphore
    out: Output | None = None
    t0: float = field(default_factory=time.monotonic)


@dataclass
class HostRun:
    host: str
    status: str                      # ok, changed, would change, failed
    steps: dict[str, str] = field(default_factory=dict)   # step -> ok/changed/would change/failed/skipped/not run
    changed: int = 0
    failure: dict[str, Any] = field(default_factory=dict)  # step, cause, fix, command, exited, output, log
    exit: int = 0                    # what `provision` on this host alone would exit with
    ssh_commands: int = 0            # commands run over this host's connection (one SSH exec channel each)
    fact_commands: int = 0
    start: float = 0.0               # seconds after the fleet started: slot taken / host done
    end: float = 0.0
    report: str = ""
    planned: dict[str, list[str]] = field(default_factory=dict)


class FleetConnection(Connection):
    """A Fabric Connection with gpubox's fleet method; counts the commands it runs (each is one SSH channel).

    Attributes are declared on the class: a Connection (Invoke's DataProxy) turns the assignment of a name it
    does not have into a config key."""
    commands = 0
    reached = False            # a command came back: the host was reached at least once
    fleet_out: Output | None = None

    def run(self, command, **kwargs):
        self.commands += 1
        if self.fleet_out is not None and kwargs.get("out_stream") is not None:
            kwargs["out_stream"] = _Owned(kwargs["out_stream"], self.fleet_out, self.name)
        result = self._remote_run(command, **kwargs)
        self.reached = True
        return result

    def _remote_run(self, command, **kwargs):
        return super().run(command, **kwargs)

    @property
    def name(self) -> str:
        """The host as given (-H / --hosts), not the address an ssh config's HostName turned it into."""
        return self.original_host

    def provision_steps(self, job: Job) -> HostRun:
        """Plan or provision this host (inside one of the job's slots); never raises for a failed host."""
        with job.slots:
            if job.out is not None:
                self.fleet_out = job.out
                job.out.own(self.name)
            try:
                return self._provision(job)
            finally:
                self.close()
                if job.out is not None:
                    job.out.disown()

    def _provision(self, job: Job) -> HostRun:
        hr = HostRun(self.name, FAILED, start=time.monotonic() - job.t0)
        host = Host(self)
        cfg = copy.deepcopy(job.cfg)
        runner = Runner(host, cfg, [BY_NAME[n] for n in job.names], plan=job.plan)
        print("plan" if job.plan else "provision", "started")
        try:
            report = runs.run_runner(runner, ",".join(n for n in job.names if n not in job.skipped),
                                     skipped=job.skipped)
        except Exit as e:          # the run lock: busy (75) or not to be taken (1)
            hr.failure = {"step": runner.current or "lock", "cause": str(e.message or "")}
            hr.exit = e.code
        except config.ConfigError as e:   # a ~/ path that does not resolve on this target
            hr.failure = {"step": runner.current or "facts", "cause": str(e)}
            hr.exit = config.EXIT_CONFIG
        except Exception as e:  # noqa: BLE001  (SSH refused, dropped...: this host's failure, not the fleet's)
            where = "connect" if not self.reached else (runner.current or "lock")
            hr.failure = {"step": where, "cause": f"{type(e).__name__}: {e}".strip(),
                          "fix": "check that the host answers: ssh HOST true" if where == "connect" else ""}
            hr.exit = 1
        else:
            fill(hr, report)
        hr.ssh_commands = self.commands
        hr.end = time.monotonic() - job.t0
        if hr.status == FAILED:
            for n in job.names:
                hr.steps.setdefault(n, SKIPPED if n in job.skipped else NOT_RUN)
            cause = (hr.failure.get("cause") or "").splitlines()
            print(f"FAILED at {hr.failure.get('step')}" + (f": {cause[0]}" if cause else ""))
        else:
            print(f"{hr.status} in {hr.end - hr.start:.2f}s, {hr.ssh_commands} SSH commands")
        return hr


def fill(hr: HostRun, report) -> None:
    """A host's engine Report -> its row: step statuses, its first failure, counts."""
    hr.report, hr.fact_commands, hr.changed = report.path, report.fact_commands, report.changed
    for s in report.steps:
        hr.steps[s.name] = NOT_RUN if (s.status == SKIPPED and s.error.startswith("not run")) else s.status
        if s.planned:
            hr.planned[s.name] = list(s.planned)
        if s.status == FAILED and not hr.failure:
            hr.failure = {"step": s.name, **(s.failure or {"cause": s.error.splitlines()[0] if s.error else ""}),
                          "log": s.log}
    if report.failed:
        hr.status, hr.exit = FAILED, 1
    elif report.mode == "plan":
        hr.status = PLANNED if report.changed else OK
    else:
        hr.status = CHANGED if report.changed else OK


# --- the fleet --------------------------------------------------------------------------------------

class FleetGroup(ThreadingGroup):
    """ThreadingGroup with gpubox's method, called the way Group.run calls Connection.run (Group._do)."""

    def provision_steps(self, job: Job):
        return self._do("provision_steps", job)


@dataclass
class FleetReport:
    mode: str
    started: str
    parallel: int
    steps: list[str]
    hosts: list[HostRun] = field(default_factory=list)
    seconds: float = 0.0
    path: str = ""

    @property
    def failed(self) -> list[str]:
        return [h.host for h in self.hosts if h.status == FAILED]

    def to_json(self) -> str:
        d = asdict(self)
        d["failed"] = self.failed
        return json.dumps(d, indent=2, default=str)

    def table(self) -> str:
        hw = max([len(h.host) for h in self.hosts] + [4])
        # A step every host skipped (--only/--skip) gets no column.
        steps = [n for n in self.steps if any(h.steps.get(n, SKIPPED) != SKIPPED for h in self.hosts)] or self.steps
        sw = {n: max(len(n), *(len(h.steps.get(n, "")) for h in self.hosts)) for n in steps}
        good = sum(1 for h in self.hosts if h.status != FAILED)
        rows = [f"gpubox fleet {self.mode}: {len(self.hosts)} hosts, at most {self.parallel} at once, "
                f"{good} " + ("planned" if self.mode == "plan" else "converged") + f", {len(self.failed)} failed, "
                f"{self.seconds:.2f}s",
                f"  {'host':<{hw}}  " + "  ".join(f"{n:<{sw[n]}}" for n in steps) + "     time  ssh"]
        for h in self.hosts:
            cells = "  ".join(f"{(h.steps.get(n, '') or '-').replace(FAILED, 'FAILED'):<{sw[n]}}" for n in steps)
            rows.append(f"  {h.host:<{hw}}  {cells}  {h.end - h.start:6.2f}s  {h.ssh_commands:>3}")
        if self.mode == "plan":
            rows += self._plans()
        if self.failed:
            rows += ["", "first failure of each failed host:"]
            for h in self.hosts:
                if h.status != FAILED:
                    continue
                f = h.failure
                step, cause = f.get("step", "?"), f.get("cause", "")
                if cause.startswith(f"{step}: "):       # the engine's causes name their step already
                    cause = cause[len(step) + 2:]
                rows.append(f"  {h.host}: step {step}: {cause}")
                if f.get("command"):
                    rows.append(f"    command: {f['command']}")
                    rows.append(f"    exit status: {f.get('exited')}")
                if f.get("output"):
                    rows.append("    last lines:")
                    rows += [f"      {line}" for line in f["output"].splitlines()[-8:]]
                if f.get("fix"):
                    rows.append(f"    fix: {f['fix']}")
                if f.get("log"):
                    rows.append(f"    step log: {f['log']}")
                if h.report:
                    rows.append(f"    host report: {h.report}")
        if self.path:
            rows.append(f"fleet report: {self.path}")
        return "\n".join(rows)

    def _plans(self) -> list[str]:
        """The operations each host's provision would run, hosts with the same plan listed together."""
        groups: dict[tuple, list[str]] = {}
        for h in self.hosts:
            if h.status != FAILED:
                key = tuple((n, tuple(h.planned.get(n, []))) for n in self.steps)
                groups.setdefault(key, []).append(h.host)
        rows: list[str] = []
        for key, names in groups.items():
            rows += ["", f"plan for {', '.join(names)}:"]
            ops = [(n, lines) for n, lines in key if lines]
            if not ops:
                rows.append("  nothing to change")
            for n, lines in ops:
                rows.append(f"  {n}:")
                rows += [f"    {line}" for line in lines]
        return rows


def run_fleet(hosts: Sequence[str], fab_config, cfg: dict, *, plan: bool = False, names: Sequence[str] = ALL,
              skipped: Sequence[str] = (), parallel: int | None = None, out=None, err=None,
              connection: Callable[..., FleetConnection] = FleetConnection,
              group: type = FleetGroup) -> FleetReport:
    """Plan or provision every host, at most `parallel` at once; write and return the fleet's report."""
    hosts = parse_hosts(hosts)
    n = bound(parallel, len(hosts))
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    rep = FleetReport("plan" if plan else "provision", stamp, n, list(names))
    t0 = time.monotonic()
    job = Job(list(names), list(skipped), cfg, plan, threading.BoundedSemaphore(n), t0=t0)
    conns = [connection(h, config=fab_config.clone()) for h in hosts]
    with Output(out, err) as o:
        job.out = o
        g = group.from_connections(conns)
        try:
            results = g.provision_steps(job)
        except GroupException as e:
            results = e.result
        finally:
            g.close()
    by_conn = dict(results)
    for c in conns:
        r = by_conn.get(c)
        if isinstance(r, HostRun):
            rep.hosts.append(r)
        else:   # an exception escaped provision_steps itself (a defect): still this host's failure only
            rep.hosts.append(HostRun(c.name, FAILED, steps={n: NOT_RUN for n in names}, exit=1,
                                     failure={"step": "?", "cause": f"{type(r).__name__}: {r}"}))
    rep.seconds = time.monotonic() - t0
    write(rep, Path(os.path.expanduser(cfg["report_dir"])))
    return rep


def write(rep: FleetReport, report_dir: Path) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    path = report_dir / f"fleet-{rep.started}-{rep.mode}.json"
    rep.path = str(path)
    text = rep.to_json()
    write_atomic(path, text)
    write_atomic(report_dir / "fleet-latest.json", text)


def fabric_config(c, ssh_config: str | None = None):
    """The Fabric config every host's Connection is made from: the task's own (a Fabric program already
    loaded -S and the ssh configs), or Invoke's turned into one (then the config's ssh_config_path, e.g. from
    the sandbox's -f file, names the ssh config). --ssh-config replaces whatever ssh config was loaded."""
    cfg = c.config.clone() if isinstance(c.config, fabric.Config) else c.config.clone(into=fabric.Config)
    path = ssh_config or (None if isinstance(c.config, fabric.Config) else cfg.get("ssh_config_path"))
    if path:
        path = os.path.expanduser(path)
        if not os.path.isfile(path):
            raise Exit(f"fleet: the ssh config {path} does not exist; fix: give an existing file to --ssh-config",
                       code=config.EXIT_CONFIG)
        import paramiko
        # This file alone, as with -S. (A Fabric config's clone carries the loaded SSHConfig object, and
        # load_ssh_config() then reads no file: fabric/config.py, _given_explicit_object.)
        cfg.base_ssh_config = paramiko.SSHConfig.from_path(path)
        cfg.set_runtime_ssh_path(path)
    return cfg


HELP = {
    "hosts": "comma-separated hosts (under `gpubox -H a,b` the -H list)",
    "parallel": f"hosts worked on at once (default {DEFAULT_PARALLEL}, or the number of hosts if fewer)",
    "plan": "check only: what each host's provision would change",
    "only": "comma-separated steps to run (" + ",".join(ALL) + ")",
    "skip": "comma-separated steps to skip",
    "set": "override a setting, KEY=VALUE (repeatable), for every host",
    "ssh-config": "an ssh config file for the hosts (fab/gpubox: -S)",
}


@task(help=HELP, iterable=["set"], auto_shortflags=False)
def fleet(c, hosts=None, parallel=None, plan=False, only=None, skip=None, set=None, ssh_config=None):
    """Plan or provision several hosts at once (Fabric's ThreadingGroup); one table and one JSON report."""
    if hasattr(c, "host") and hasattr(c, "open"):
        raise Exit("fleet: `fab -H` runs a task once per host, one after another; give the hosts to the fleet "
                   "task instead: `fab fleet --hosts a,b,c`, `gpubox -H a,b,c fleet`, or set "
                   "tasks.executor_class: provision.fleet.Executor in a Fabric config file (docs/fleet.md)",
                   code=config.EXIT_CONFIG)
    names = parse_hosts(hosts)
    if not names:
        raise Exit("fleet: no hosts; fix: --hosts a,b,c (or gpubox -H a,b,c fleet)", code=config.EXIT_CONFIG)
    cfg = runs.settings(c, set)
    try:
        chosen = config.select_steps(only, skip)
        n = bound(parallel, len(names))
    except config.ConfigError as e:
        raise Exit(str(e), code=config.EXIT_CONFIG)
    rep = run_fleet(names, fabric_config(c, ssh_config), cfg, plan=plan, names=ALL,
                    skipped=[s for s in ALL if s not in chosen], parallel=n)
    print(rep.table())
    if rep.failed:
        raise Exit(code=1)
    return rep


fleet.fleet_hosts = True   # Executor below hands it -H's hosts instead of running it once per host


class Executor(fabric.Executor):
    """Fabric's executor, except that a task marked `fleet_hosts` runs once, with -H's list as its `hosts`
    (the `gpubox` program uses it; `fab` does with `tasks.executor_class: provision.fleet.Executor`)."""

    def expand_calls(self, calls, apply_hosts=True):
        ret = []
        for call in super().expand_calls(calls, apply_hosts):
            if not getattr(call.task, "fleet_hosts", False) or not hasattr(call, "init_kwargs"):
                ret.append(call)
                continue
            host = call.init_kwargs.get("host")
            prev = ret[-1] if ret else None
            if (prev is not None and getattr(prev, "_fleet_of", None) is call.task
                    and {k: v for k, v in prev.kwargs.items() if k != "hosts"}
                    == {k: v for k, v in call.kwargs.items() if k != "hosts"}):
                if not call.kwargs.get("hosts"):     # the same call for the next -H host: one more host
                    prev.kwargs["hosts"] += "," + host
                continue                             # --hosts given: it wins, the -H copies go
            one = Call(call.task, called_as=call.called_as, args=call.args, kwargs=dict(call.kwargs))
            if not one.kwargs.get("hosts"):
                one.kwargs["hosts"] = host
            one._fleet_of = call.task
            ret.append(one)
        return ret
