"""One way to run commands on the target, locally (Invoke Context) or over SSH (Fabric Connection).

Commands are argument lists joined with `shlex.join`, or `sh(template, **values)` where every value
is quoted with `shlex.quote`: configuration values never reach a shell unquoted.

>>> sh("test -e {path} && echo yes", path="/tmp/a b; touch /tmp/x")
"test -e '/tmp/a b; touch /tmp/x' && echo yes"
>>> cmd(["rpm", "-q", "a$(id)"])
"rpm -q 'a$(id)'"
"""

from __future__ import annotations

import io
import secrets
import shlex
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence


def cmd(argv: Sequence[Any]) -> str:
    """An argument list as one shell-safe command string."""
    return shlex.join(str(a) for a in argv)


def sh(template: str, **values: Any) -> str:
    """A shell snippet with every {name} replaced by the shell-quoted value.

    Lists are quoted element by element and joined with spaces."""
    quoted = {}
    for k, v in values.items():
        if isinstance(v, (list, tuple)):
            quoted[k] = " ".join(shlex.quote(str(x)) for x in v)
        else:
            quoted[k] = shlex.quote(str(v))
    return template.format(**quoted)


class CommandFailed(Exception):
    """A command on the target exited non-zero."""

    def __init__(self, command: str, exited: int, stdout: str, stderr: str):
        self.command, self.exited, self.stdout, self.stderr = command, exited, stdout, stderr
        super().__init__(f"command exited {exited}: {command}\n{self.tail()}")

    def tail(self, n: int = 15) -> str:
        lines = (self.stdout + "\n" + self.stderr).strip().splitlines()
        return "\n".join(lines[-n:])


@dataclass
class Record:
    command: str
    exited: int
    seconds: float
    root: bool


@dataclass
class Host:
    """A thin recorder around an Invoke Context or Fabric Connection.

    `root=True` runs with sudo unless the login user is already root (decided from facts, so no
    extra round trip). Every command, its status and duration are recorded for the run report, and
    its output is appended to the current step's log file."""

    c: Any
    is_root: bool | None = None
    log: Callable[[str], None] | None = None
    records: list[Record] = field(default_factory=list)
    echo: bool = False

    @property
    def name(self) -> str:
        return getattr(self.c, "host", None) or "localhost"

    @property
    def remote(self) -> bool:
        return hasattr(self.c, "host") and hasattr(self.c, "open")

    def run(self, command: str | Sequence[Any], *, root: bool = False, check: bool = True,
            stdin: str | None = None, timeout: float | None = None, env: dict[str, str] | None = None,
            stream: Callable[[str], None] | None = None, pty: bool = False):
        """Run one command; raise CommandFailed on non-zero exit when check is true.

        `stream` gets stdout line by line while the command runs (progress parsing)."""
        if not isinstance(command, str):
            command = cmd(command)
        if env:
            command = cmd(["env", *[f"{k}={v}" for k, v in env.items()]]) + " " + command
        use_sudo = root and self.is_root is False
        if use_sudo:
            # -n: never prompt (a hidden password prompt would hang); sudo must be passwordless or the
            # error says so. The command runs under `sh -c` so redirections happen as root too.
            command = cmd(["sudo", "-n", "sh", "-c", command])
        kwargs: dict[str, Any] = dict(hide=True, warn=True, in_stream=io.StringIO(stdin) if stdin is not None else False)
        if timeout:
            kwargs["timeout"] = timeout
        if pty:
            kwargs["pty"] = True
        if stream is not None:
            kwargs["out_stream"] = _LineStream(stream)
            kwargs["hide"] = "stderr"
        if self.log:
            self.log(f"$ {command}")
        t0 = time.monotonic()
        result = self.c.run(command, **kwargs)
        dt = time.monotonic() - t0
        exited = getattr(result, "exited", 0) or 0
        stdout = getattr(result, "stdout", "") or ""
        stderr = getattr(result, "stderr", "") or ""
        self.records.append(Record(command, exited, dt, root))
        if self.log:
            if stdout.strip() and stream is None:
                self.log(stdout.rstrip())
            if stderr.strip():
                self.log(stderr.rstrip())
            self.log(f"# exit {exited} in {dt:.2f}s")
        if check and exited != 0:
            raise CommandFailed(command, exited, stdout, stderr)
        return result

    def ok(self, command: str | Sequence[Any], **kw) -> bool:
        """True when the command exits 0."""
        return self.run(command, check=False, **kw).exited == 0

    def as_user(self, user: str, argv: Sequence[Any]) -> list[Any]:
        """argv run as `user`: runuser when gpubox logs in as root (no sudo needed), else sudo -n -u."""
        if self.is_root:
            return ["runuser", "-u", user, "--", *argv]
        return ["sudo", "-n", "-u", user, "--", *argv]

    def write_file(self, path: str, content: str, *, mode: str = "0644", owner: str | None = None,
                   root: bool = False, as_user: str | None = None) -> None:
        """Write a whole file atomically: into a new private directory beside it, then one rename.

        The directory `.<name>.gpubox-<random>` is made by `mkdir -m 0700`, which fails on anything that
        exists (a planted file or symlink included), so the file written inside it is nobody else's to
        swap. The size is checked, then `mv -T` renames it over the path (a symlink at the path is
        replaced, not followed; a directory there is an error, not a target). Two writers of one path
        each use their own directory: the path ends as one of the two, whole. A failure removes the
        directory. When root writes into a directory another user can write, use `as_user` instead.

        The content travels in command arguments (WRITE_CHUNK characters each), not on stdin: Invoke and
        Fabric feed an in_stream one byte per 10 ms poll, so a 50 kB file would take minutes.

        `as_user`: every command runs as that user (Host.as_user), for files in a tree the user owns
        (the build step's source and build directories); `root` and `owner` are then not used."""
        if "\0" in content:
            raise ValueError(f"write_file {path}: the content holds a NUL byte")
        if as_user and (root or owner):
            raise ValueError("write_file: as_user excludes root and owner")

        def run(argv: list[Any], **kw):
            return self.run(self.as_user(as_user, argv) if as_user else argv, root=root, **kw)

        head, _, base = path.rpartition("/")
        tmp = f"{head}/.{base[:100]}.gpubox-{secrets.token_hex(8)}"
        chunks = [content[i:i + WRITE_CHUNK] for i in range(0, len(content), WRITE_CHUNK)] or [""]
        try:
            run(["sh", "-c", 'set -e; mkdir -p "$(dirname "$1")"; mkdir -m 0700 "$1"; printf "%s" "$2" > "$1/f"',
                 "sh", tmp, chunks[0]])
            for chunk in chunks[1:]:
                run(["sh", "-c", 'printf "%s" "$2" >> "$1/f"', "sh", tmp, chunk])
            finish = ('set -e; f="$1/f"; n=$(wc -c < "$f"); if [ "$n" != "$4" ]; then '
                      'echo "gpubox write_file: $f has $n bytes, expected $4" >&2; exit 4; fi; '
                      + ('chown "$5" "$f"; ' if owner else "") + 'chmod "$2" "$f"; mv -Tf "$f" "$3"; rmdir "$1"')
            run(["sh", "-c", finish, "sh", tmp, mode, path, len(content.encode()), owner or ""])
        except BaseException:
            run(["rm", "-rf", "--", tmp], check=False)
            raise


WRITE_CHUNK = 24_000   # characters per argument: Linux allows 128 KiB per argument


class _LineStream(io.StringIO):
    """A file-like sink that hands complete lines to a callback (for Ninja's [n/N] progress)."""

    def __init__(self, callback: Callable[[str], None]):
        super().__init__()
        self._cb = callback
        self._buf = ""

    def write(self, s: str) -> int:
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            self._cb(line)
        return len(s)

    def flush(self) -> None:
        pass


def expand_home(path: str, home: str) -> str:
    """`~/Models` -> `/home/u/Models` using the target user's home from facts."""
    if path == "~" or path.startswith("~/"):
        return home.rstrip("/") + path[1:]
    return path


def joined(items: Iterable[str]) -> str:
    return ", ".join(items)
