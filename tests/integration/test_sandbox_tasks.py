"""`invoke demo` (testbed/sandbox/tasks.py) end to end on the sandbox: reset, `fab provision` over SSH (the six
steps; the build with the persistent ccache), `fab serve` with the mini Gemma 4 twin pair and its MTP head
(upstream llama.cpp, --spec-type draft-mtp), `fab verify`. The smoke line must show the head's draft acceptance,
from the response's timings and from the server's own log lines.

The test session holds the sandbox lock, so the demo's body runs in-process (`_demo`: the task minus taking
that lock); its fab subprocesses write to this process's stdout, read back with capfd."""

from __future__ import annotations

import re

import pytest

from testbed.sandbox import tasks

pytestmark = pytest.mark.integration


def test_demo_serves_the_mini_pair_with_draft_mtp_and_shows_acceptance(sandbox, capfd):
    try:
        tasks._demo(None, None, True)
        failed = None
    except BaseException as e:                   # invoke's Exit: some phase failed; the output says which
        failed = e
    out, err = capfd.readouterr()
    text = out + err
    with capfd.disabled():
        print("\n".join(l for l in text.splitlines() if l.startswith(("demo:", "smoke", "log:", "  command:"))))
    assert failed is None, text[-6000:]
    assert re.search(r"demo: provision exit 0, report exit 0, serve exit 0, verify exit 0", text), text[-4000:]
    cmd = next(l for l in text.splitlines() if l.startswith("  command: "))
    argv = cmd.split()
    assert argv[argv.index("--spec-type") + 1] == "draft-mtp"
    assert argv[argv.index("--spec-draft-model") + 1].endswith("/gemma-4-26B-A4B-it-assistant.Q4_K_M.gguf")
    smoke = next(l for l in text.splitlines() if l.startswith("smoke: "))
    # the rigged head: every drafted token accepted, in the timings and in the log's own line
    m = re.search(r"draft acceptance (\d+)/(\d+) = 100\.0% \(timings\)", smoke)
    assert m and int(m.group(2)) > 0 and m.group(1) == m.group(2), smoke
    assert "log: draft acceptance = 1.00000" in smoke and "statistics draft-mtp:" in smoke, smoke
    assert re.search(r"log: draft \S+gemma-4-26B-A4B-it-assistant\.Q4_K_M\.gguf \(gemma4-assistant\)", text)
