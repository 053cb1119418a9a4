"""Helpers for unit tests of decisions: facts in, commands out (Invoke's MockContext underneath).

>>> out = facts_stdout({"kernel": "6.14.0-63.fc42.x86_64", "gpus": ("", 127)})
>>> from provision import facts
>>> facts.parse(out, [f for f in facts.CORE_FACTS if f.name in ("kernel", "gpus")])
{'kernel': '6.14.0-63.fc42.x86_64', 'gpus': []}
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from invoke import MockContext, Result

FEDORA42_OS = 'NAME="Fedora Linux"\nVERSION_ID=42\nID=fedora\nPRETTY_NAME="Fedora Linux 42 (Workstation Edition)"\n'


def facts_stdout(blocks: dict[str, Any]) -> str:
    """The fact script's output for the given facts: value text, or (text, exit status)."""
    parts = []
    for name, v in blocks.items():
        text, rc = (v if isinstance(v, tuple) else (v, 0))
        parts.append(f"@@fact {name}\n{text}\n@@rc {rc}")
    return "\n".join(parts) + "\n"


def mock_context(fact_blocks: dict[str, Any], responses: dict[str, Any] | None = None) -> MockContext:
    """A MockContext answering the fact script with `fact_blocks` and other commands from `responses`
    ({regex or exact command: Result/str/bool}). Any other command raises NotImplementedError, so a test
    sees every command a decision emits."""
    # The target user's home, unless the test says otherwise (the runner resolves ~/ paths against it).
    fact_blocks = {"home": "/root", **fact_blocks}
    run: dict[Any, Any] = {re.compile(r"^bash -c .*@@fact", re.S): Result(stdout=facts_stdout(fact_blocks))}
    for k, v in (responses or {}).items():
        run[k] = v
    return MockContext(run=run)


def tracked_copy(repo: Path, dst: Path) -> Path:
    """The clone's files that git tracks (plus untracked, not ignored ones), copied to dst: building a wheel
    from the copy cannot dirty the clone, and setuptools' build/ of an earlier run cannot leak in."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                           capture_output=True, check=True).stdout.split(b"\0")
    for f in filter(None, files):
        src = repo / f.decode()
        if src.is_file():
            (dst / f.decode()).parent.mkdir(parents=True, exist_ok=True)
            (dst / f.decode()).write_bytes(src.read_bytes())
    return dst
