"""A local command runner with the small part of Invoke's Context interface that provision.host.Host uses.

For `python -m provision.tune` on a machine without Invoke installed (the offline GPU benchmark machine):
it runs commands with bash through subprocess, for real. Everywhere else Host wraps Invoke's own Context
or a Fabric Connection.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass


@dataclass
class Result:
    command: str
    stdout: str
    stderr: str
    exited: int


class LocalContext:
    def run(self, command: str, *, hide=True, warn=True, in_stream=None, timeout=None, pty=False,
            out_stream=None, **_):
        stdin = in_stream.read() if in_stream not in (None, False) else None
        try:
            p = subprocess.run(["bash", "-c", command], input=stdin, capture_output=True, text=True,
                               timeout=timeout, stdin=None if stdin is not None else subprocess.DEVNULL)
            res = Result(command, p.stdout, p.stderr, p.returncode)
        except subprocess.TimeoutExpired as e:
            def s(b):
                return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
            res = Result(command, s(e.stdout), s(e.stderr) + f"\ntimed out after {timeout}s", 124)
        if out_stream is not None:
            out_stream.write(res.stdout)
        if not warn and res.exited != 0:
            raise RuntimeError(f"command exited {res.exited}: {command}")
        return res
