"""The step engine: check -> apply -> check again, in order, with a report.

Every step is a module with the same small interface:

    NAME = "driver"                      # the name used by --only/--skip and in tests/
    TITLE = "NVIDIA 580xx driver branch"
    FACTS = [Fact(...), ...]             # extra facts it needs (gathered with the core facts, one command)
    def check(facts, cfg) -> Check       # pure: facts in, wanted changes out, each with its operations
    def apply(host, facts, cfg, check)   # run_changes(host, check): the check's operations, nothing else

A Change carries the operations that make it (provision/ops.py): `plan` prints them, `apply` runs them
in order and the Check records the line of each one that ran (`Check.ran`), so the report of a
provision lists exactly what its plan printed.

After `apply` the runner gathers facts again and calls `check` once more: a step that is still not
satisfied is FAILED, not changed. A step that raises StepError or whose command fails stops the run
with a message naming the step, the command, its exit status and the last lines of its output.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from . import facts as factmod
from .host import CommandFailed, Host
from .ops import Op, text_of

OK, CHANGED, FAILED, SKIPPED, PLANNED = "ok", "changed", "failed", "skipped", "would change"


@dataclass
class Change:
    """One difference between the host and the wanted state, with the operations that remove it."""
    what: str                 # e.g. "install cuda-nvcc-12-9"
    why: str                  # e.g. "not installed"
    ops: list[Any] = field(default_factory=list)   # provision.ops.Op; plain strings are descriptions only

    @property
    def commands(self) -> list[str]:
        """The operations' texts (a command line, or a typed action's one line)."""
        return [text_of(o) for o in self.ops]

    def lines(self) -> list[str]:
        return [o.line() if isinstance(o, Op) else f"? {o}" for o in self.ops]

    def as_dict(self) -> dict:
        return {"what": self.what, "why": self.why, "commands": self.commands}


@dataclass
class Check:
    satisfied: bool
    changes: list[Change] = field(default_factory=list)
    # Things the user must know even when satisfied: "reboot required", "Secure Boot key not enrolled".
    attention: list[str] = field(default_factory=list)
    # Warnings shown in the plan (e.g. packages built for another Fedora release).
    warnings: list[str] = field(default_factory=list)
    # Facts the step derived and wants in the report (versions found, paths used...).
    info: dict[str, Any] = field(default_factory=dict)
    # The lines of the operations run_changes ran, in order (an operation that failed is the last),
    # and the texts of those that are exactly one command on the target (Op.literal).
    ran: list[str] = field(default_factory=list)
    ran_commands: list[str] = field(default_factory=list)

    def operations(self) -> list[Any]:
        """Every change's operations in order; one operation that fixes several changes counts once."""
        seen: set[int] = set()
        out = []
        for c in self.changes:
            for o in c.ops:
                if id(o) not in seen:
                    seen.add(id(o))
                    out.append(o)
        return out

    @property
    def planned(self) -> list[str]:
        """The lines of the operations, in the order apply runs them."""
        return [o.line() if isinstance(o, Op) else f"? {o}" for o in self.operations()]

    @classmethod
    def done(cls, **kw) -> "Check":
        return cls(True, **kw)

    @classmethod
    def todo(cls, changes: list[Change], **kw) -> "Check":
        return cls(False, changes, **kw)


class StepError(Exception):
    """A step cannot go on. The message names the cause and the fix."""

    def __init__(self, cause: str, fix: str = "", *, command: str | None = None, exited: int | None = None,
                 output: str = ""):
        self.cause, self.fix, self.command, self.exited, self.output = cause, fix, command, exited, output
        msg = cause
        if fix:
            msg += f"\n  fix: {fix}"
        if command:
            msg += f"\n  command: {command}\n  exit status: {exited}"
        if output:
            msg += "\n  last output:\n" + "\n".join("    " + line for line in output.splitlines()[-15:])
        super().__init__(msg)


class NotFedora(StepError):
    pass


def failure_of(e: StepError) -> dict[str, Any]:
    """A StepError as the report's data: the last 15 lines of output, as its message shows them."""
    return {"cause": e.cause, "fix": e.fix, "command": e.command or "", "exited": e.exited,
            "output": "\n".join((e.output or "").splitlines()[-15:])}


def run_changes(host: Host, chk: Check, state: dict | None = None) -> list[str]:
    """Run the Check's operations in order, recording each line in `chk.ran` (and the step log) before it
    runs; return the notes they gave. A description-only change (no operation) is an error, not a no-op."""
    state = {} if state is None else state
    for ch in chk.changes:
        if not ch.ops or not all(isinstance(o, Op) for o in ch.ops):
            raise StepError(f"cannot apply {ch.what!r} ({ch.why}): it carries no operation that makes it",
                            "this is a defect of the step: report it")
    notes: list[str] = []
    for op in chk.operations():
        chk.ran.append(op.line())
        if op.literal:
            chk.ran_commands.append(op.text())
        if host.log:
            host.log(f"## {op.line()}")
        note = op.run(host, state)
        if note:
            notes.extend([note] if isinstance(note, str) else list(note))
    return notes


def require_fedora(facts: dict, step: str) -> None:
    """Steps that use dnf/rpm refuse any host that is not Fedora 42."""
    if not factmod.is_fedora(facts):
        os_ = facts.get("os")
        seen = f"{os_.get('id')} {os_.get('version')}" if isinstance(os_, dict) else "unknown"
        raise NotFedora(f"{step}: this host is {seen}, not Fedora 42; gpubox's system steps target Fedora 42 only",
                        "run it on the Fedora 42 GPU box (invoke provision there, or fab -H HOST provision), or "
                        "try the sandbox host: invoke demo")


@dataclass
class StepResult:
    name: str
    status: str
    seconds: float = 0.0
    changes: list[dict] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    planned: list[str] = field(default_factory=list)     # the operations the check asked for (lines)
    ran: list[str] = field(default_factory=list)         # the operations apply ran, in order (lines)
    ran_commands: list[str] = field(default_factory=list)  # those of them that are one command (texts)
    commands: list[dict] = field(default_factory=list)   # every command on the target, facts included
    error: str = ""
    # The same failure as data (a fleet's report lists it per host): cause, fix, and when a command
    # failed, the command, its exit status and its last output lines.
    failure: dict[str, Any] = field(default_factory=dict)
    log: str = ""


@dataclass
class Report:
    host: str
    started: str
    mode: str
    steps: list[StepResult] = field(default_factory=list)
    os: str = ""
    fact_commands: int = 0
    seconds: float = 0.0
    path: str = ""

    @property
    def failed(self) -> bool:
        return any(s.status == FAILED for s in self.steps)

    @property
    def changed(self) -> int:
        return sum(1 for s in self.steps if s.status in (CHANGED, PLANNED))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def table(self) -> str:
        rows = [f"gpubox {self.mode} on {self.host} [{self.os}]: {len(self.steps)} steps, {self.changed} changed, "
                f"{self.seconds:.2f}s, {self.fact_commands} fact command(s)"]
        w = max([len(s.name) for s in self.steps] + [4])
        rows.append(f"  {'step':<{w}}  {'status':<12} {'time':>7}  detail")
        for s in self.steps:
            detail = "; ".join([c["what"] + (f" ({c['why']})" if c.get("why") else "") for c in s.changes][:4])
            if len(s.changes) > 4:
                detail += f"; +{len(s.changes) - 4} more"
            if s.error:
                detail = s.error.splitlines()[0]
            rows.append(f"  {s.name:<{w}}  {s.status:<12} {s.seconds:>6.2f}s  {detail}")
            for a in s.attention:
                rows.append(f"  {'':<{w}}  ! {a}")
            for wn in s.warnings:
                rows.append(f"  {'':<{w}}  warning: {wn}")
            if self.mode == "plan":
                rows.extend(f"  {'':<{w}}    {line}" for line in s.planned)
        if self.failed:
            bad = next(s for s in self.steps if s.status == FAILED)
            rows.append("")
            rows.append(f"step {bad.name} FAILED:")
            rows.extend("  " + line for line in bad.error.splitlines())
            if bad.log:
                rows.append(f"  full log: {bad.log}")
        if self.path:
            rows.append(f"report: {self.path}")
        return "\n".join(rows)


class Runner:
    """Runs steps in order. `plan=True` only checks; nothing is changed on the host."""

    def __init__(self, host: Host, cfg: dict, steps: list[Any], *, plan: bool = False,
                 report_dir: str | None = None, echo: Callable[[str], None] = print):
        self.host, self.cfg, self.steps, self.plan = host, cfg, steps, plan
        self.echo = echo
        self.report_dir = Path(os.path.expanduser(report_dir or cfg["report_dir"]))
        self._fact_runs = 0
        self.current = ""        # what run() is doing now: "facts" or a step's name (a fleet names it on a crash)

    def gather(self) -> dict:
        self._fact_runs += 1
        return factmod.gather(self.host, self.cfg, self.steps)

    def run(self, skipped: Iterable[str] = ()) -> Report:
        """Every step in order (those in `skipped` not); after a failed step the rest are not run."""
        skipped = set(skipped)
        t0 = time.monotonic()
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        report = Report(host=self.host.name, started=stamp, mode="plan" if self.plan else "provision")
        logdir = self.report_dir / f"{self.host.name}-{stamp}"
        self.current = "facts"
        facts = self._start(report)
        stopped = ""
        for step in self.steps:
            res = StepResult(step.NAME, SKIPPED)
            report.steps.append(res)
            if step.NAME in skipped:
                continue
            if stopped:
                res.error = f"not run: step {stopped} failed"
                continue
            self.current = step.NAME
            facts = self._step(step, facts, res, logdir)
            if res.status == FAILED and not self.plan:
                stopped = step.NAME
        self.current = ""
        report.fact_commands = self._fact_runs
        report.seconds = time.monotonic() - t0
        self.write(report)
        return report

    def _start(self, report: Report) -> dict:
        """The first facts; `~/` paths resolved against the target user's home; a note on a host not Fedora 42."""
        facts = self.gather()
        # `~/` paths mean the target user's home: resolved once, so every check, change and command of
        # the steps sees absolute paths (config.on_target; a ConfigError when the home is unknown).
        # A plan on a target whose home could not be read keeps them as written (it changes nothing).
        from .config import on_target
        home = facts.get("home")
        if not (self.plan and not (isinstance(home, str) and home.startswith("/"))):
            self.cfg = on_target(self.cfg, home)
        os_ = facts.get("os")
        report.os = f"{os_.get('pretty')} ({os_.get('id')} {os_.get('version')})" if isinstance(os_, dict) else "unknown"
        if not factmod.is_fedora(facts):
            self.echo(f"note: {self.host.name} runs {report.os}, not Fedora 42: "
                      + ("this plan shows what provision would change; provision itself would refuse the system steps."
                         if self.plan else "the system steps will refuse to change it."))
        return facts

    def _step(self, step: Any, facts: dict, res: StepResult, logdir: Path) -> dict:
        """One step with its own log file: check; unless planning, apply and check again. Returns the facts."""
        logdir.mkdir(parents=True, exist_ok=True)
        logfile = logdir / f"{step.NAME}.log"
        res.log = str(logfile)
        with logfile.open("a") as lf:
            def log(line: str) -> None:
                lf.write(line + "\n")
                lf.flush()
            self.host.log = log
            start_rec = len(self.host.records)
            s0 = time.monotonic()
            chk = None
            try:
                chk = step.check(facts, self.cfg)
                res.changes, res.planned = [c.as_dict() for c in chk.changes], chk.planned
                res.warnings, res.info = list(chk.warnings), dict(chk.info)
                if chk.satisfied or self.plan:
                    res.status, res.attention = (OK if chk.satisfied else PLANNED), list(chk.attention)
                else:
                    facts = self._apply(step, facts, chk, res)
            except CommandFailed as e:
                err = StepError(f"{step.NAME}: a command failed", "see the output below and the step log",
                                command=e.command, exited=e.exited, output=e.tail())
                res.status, res.error, res.failure = FAILED, str(err), failure_of(err)
            except StepError as e:
                res.status, res.error, res.failure = FAILED, str(e), failure_of(e)
            finally:
                self.host.log = None
                if chk is not None:
                    res.ran, res.ran_commands = list(chk.ran), list(chk.ran_commands)
                res.seconds = time.monotonic() - s0
                res.commands = [asdict(r) for r in self.host.records[start_rec:]]
                if res.error:
                    log("FAILED: " + res.error)
        return facts

    def _apply(self, step: Any, facts: dict, chk: Check, res: StepResult) -> dict:
        """apply, gather again, check again: still not satisfied is FAILED, never changed."""
        self.echo(f"[{step.NAME}] applying: " + "; ".join(c.what for c in chk.changes))
        extra = step.apply(self.host, facts, self.cfg, chk) or []
        facts = self.gather()
        after = step.check(facts, self.cfg)
        res.attention = list(after.attention) + [a for a in extra if a not in after.attention]
        res.info.update(after.info)
        if after.satisfied:
            res.status = CHANGED
        else:
            res.status = FAILED
            res.error = (f"{step.NAME}: still not satisfied after apply: "
                         + "; ".join(f"{c.what} ({c.why})" for c in after.changes))
            # No command failed: every operation ran and exited 0; what is still different is the "output".
            res.failure = {"cause": f"{step.NAME}: still not satisfied after apply", "fix": "", "command": "",
                           "exited": None, "output": "\n".join(f"{c.what} ({c.why})" for c in after.changes)}
        return facts

    def write(self, report: Report) -> None:
        self.report_dir.mkdir(parents=True, exist_ok=True)
        path = self.report_dir / f"{report.host}-{report.started}-{report.mode}.json"
        report.path = str(path)
        text = report.to_json()
        write_atomic(path, text)
        write_atomic(self.report_dir / f"{report.host}-latest.json", text)


def write_atomic(path: str | Path, text: str) -> None:
    """Write a controller-side file whole or not at all: a unique temp file beside it (O_EXCL), fsync,
    rename. A run killed mid-write leaves the old report (and at most a hidden temp file), never half a one."""
    import tempfile
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
