"""Operations: what a Change does on the target, as data.

A step's `check` compares facts with the wanted state and returns Changes; each Change carries the
operations that make it true (as in pyinfra, where an operation yields exactly the commands it will
run). `apply` executes those operations and nothing else, and the engine records each one's line, so
`plan` prints the operations a `provision` will run, in order, and the report shows the ones that ran.

An operation is a command (`Cmd`, `Dnf`: an argument list) or a small typed action whose one line says
what it does (`WriteFile`, and step-specific ones such as the patch step's header rewrite). A line starts
with `# ` when it runs as root (sudo unless the login user is root) and `$ ` otherwise:

>>> Cmd(["rpm", "-q", "gcc14"]).line()
'$ rpm -q gcc14'
>>> Dnf(["dnf5", "-y", "install", "gcc14"], step="compiler", what="installing gcc-14").line()
'# dnf5 -y install gcc14'
>>> WriteFile("/etc/x.repo", "[x]\\n", source="templates/x.j2", root=True).line()
'# write /etc/x.repo (templates/x.j2, 4 bytes, mode 0644)'
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

from .host import cmd


class Op:
    """One operation. Subclasses set `root` and implement `text()` and `run(host, state)`.

    `state` is a dict shared by the operations of one apply (a step's later operation may use what an
    earlier one produced, e.g. the build's timings for its stamp). `run` may return notes for the report."""

    root: bool = False
    literal = False      # True when text() is exactly the command string the host runs (Cmd, Dnf)

    def text(self) -> str:
        raise NotImplementedError

    def line(self) -> str:
        return ("# " if self.root else "$ ") + self.text()

    def run(self, host, state: dict) -> Any:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.line()


def env_prefix(env: dict[str, str] | None) -> str:
    """How Host.run puts an environment in front of a command (`env K=V ... `)."""
    return cmd(["env", *[f"{k}={v}" for k, v in env.items()]]) + " " if env else ""


@dataclass
class Cmd(Op):
    """One command. A failure is a StepError naming `fail` = (cause, fix) when given, else CommandFailed
    (which the engine reports with the command, its exit status and its last output lines)."""
    argv: Sequence[Any]
    root: bool = False
    env: dict[str, str] | None = None
    timeout: float | None = None
    fail: tuple[str, str] | None = None
    literal = True

    def text(self) -> str:
        return env_prefix(self.env) + cmd(self.argv)

    def run(self, host, state: dict) -> Any:
        from .engine import StepError
        res = host.run(list(self.argv), root=self.root, env=self.env, timeout=self.timeout, check=self.fail is None)
        if self.fail and res.exited != 0:
            cause, fix = self.fail
            raise StepError(cause, fix, command=self.text(), exited=res.exited,
                            output=((res.stdout or "") + "\n" + (res.stderr or "")).strip())
        return None


@dataclass
class Dnf(Op):
    """One dnf transaction as root; a failure names the step, what it tried, dnf's reason and the fix."""
    argv: Sequence[str]
    step: str
    what: str
    root: bool = True
    timeout: float | None = None
    literal = True

    def text(self) -> str:
        return cmd(self.argv)

    def run(self, host, state: dict) -> Any:
        from . import dnf
        dnf.run_transaction(host, self.step, self.what, list(self.argv), timeout=self.timeout)
        return None


@dataclass
class WriteFile(Op):
    """A whole file written atomically (Host.write_file: temp file beside it, then rename)."""
    path: str
    content: str = field(repr=False)
    mode: str = "0644"
    owner: str | None = None
    root: bool = False
    source: str = ""          # where the content comes from, for the line (e.g. templates/cuda.repo.j2)

    def text(self) -> str:
        parts = ([self.source] if self.source else []) + [f"{len(self.content.encode())} bytes", f"mode {self.mode}"]
        if self.owner:
            parts.append(f"owner {self.owner}")
        return f"write {self.path} ({', '.join(parts)})"

    def run(self, host, state: dict) -> Any:
        host.write_file(self.path, self.content, mode=self.mode, owner=self.owner, root=self.root)
        return None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode()).hexdigest()


@dataclass
class Refuse(Op):
    """A change apply cannot make: running it stops the step with the cause and the fix (the plan shows it)."""
    cause: str
    fix: str = ""

    def text(self) -> str:
        return f"stop: {self.cause}"

    def run(self, host, state: dict) -> Any:
        from .engine import StepError
        raise StepError(self.cause, self.fix)


def text_of(op: Any) -> str:
    """The line text of an operation, or a description string (steps not converted to operations yet)."""
    return op.text() if isinstance(op, Op) else str(op)
