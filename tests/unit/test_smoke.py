"""smoke: the smoke request's result, with draft acceptance from the response's `timings` and from the server's
REAL log lines (the post-sync fork's mini Gemma 4 pair), and a server that aborts in the middle of the request
(the REAL post-sync draft-simple log). The HTTP side is a stand-in host answering what bash's /dev/tcp client
prints; tests/integration/test_serve.py runs the same code against a real llama-server."""

import json
from pathlib import Path
from types import SimpleNamespace

from provision.serve import logparse, smoke

LOGS = Path(__file__).resolve().parent.parent / "data" / "logs"
SERVE = {"host": "127.0.0.1", "port": 8080}


class Answering:
    """host.run(...) for the smoke request: one canned raw HTTP answer (or none: the connection was closed)."""

    def __init__(self, raw: str, exited: int = 0):
        self.raw, self.exited, self.calls = raw, exited, []

    def run(self, argv, check=True, stdin=None, **kw):
        self.calls.append((argv, stdin))
        return SimpleNamespace(exited=self.exited, stdout=self.raw, stderr="" if self.raw else "bash: connection reset")


def http_ok(body: dict) -> str:
    text = json.dumps(body)
    return f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(text)}\r\n\r\n{text}"


RESPONSE = {"model": "main.gguf", "choices": [{"message": {"content": "the GPU is ready"}}],
            "timings": {"prompt_n": 27, "prompt_per_second": 144.24, "predicted_n": 48,
                        "predicted_per_second": 1601.92, "draft_n": 35, "draft_n_accepted": 35}}


def test_draft_acceptance_from_timings_and_from_the_real_log():
    host = Answering(http_ok(RESPONSE))
    res = smoke.smoke(host, SERVE)
    assert res.ok and (res.draft_n, res.draft_n_accepted, res.draft_acceptance) == (35, 35, 1.0)
    (argv, body), = host.calls
    assert json.loads(body)["messages"] == smoke.SMOKE_MESSAGES and json.loads(body)["stream"] is False
    log = logparse.parse((LOGS / "fork-postsync-b10018-mini-gemma4-draft-mtp.log").read_text())
    smoke.attach_log(res, log)
    assert (res.log_draft_accepted, res.log_draft_generated, res.log_draft_mean_len) == (35, 35, 3.92)
    assert (res.spec_type, res.spec_acc_tokens, res.spec_gen_tokens) == ("draft-mtp", 70, 70)
    line = res.line()
    assert "draft acceptance 35/35 = 100.0% (timings)" in line
    assert "log: draft acceptance = 1.00000 (35 accepted / 35 generated), mean len 3.92" in line
    assert "statistics draft-mtp: 70/70 tokens accepted" in line


def test_no_drafting_says_so():
    body = json.loads(json.dumps(RESPONSE))
    del body["timings"]["draft_n"], body["timings"]["draft_n_accepted"]
    res = smoke.attach_log(smoke.smoke(Answering(http_ok(body)), SERVE),
                           logparse.parse((LOGS / "fork-postsync-b10018-nodraft-turbo3.log").read_text()))
    assert res.ok and res.draft_n is None and res.line().endswith("no drafting; reply: 'the GPU is ready'")


def test_zero_acceptance_is_shown_not_hidden():
    body = json.loads(json.dumps(RESPONSE))
    body["timings"].update(draft_n=87, draft_n_accepted=0)
    res = smoke.smoke(Answering(http_ok(body)), SERVE)
    assert "draft acceptance 0/87 = 0.0% (timings)" in res.line()


def abort_log() -> str:
    """A whole log file as the supervisor leaves it: the REAL aborted run, its exit line, and the restart."""
    aborted = (LOGS / "fork-postsync-b10018-draft-simple-assert.log").read_text()
    restarted = (LOGS / "fork-postsync-b10018-nodraft-turbo3.log").read_text()   # begins with a start marker
    return (f"{logparse.START_MARKER} 2026-12-01T07:06:20Z pid 13000 uid 0\n{aborted}"
            "gpubox-supervisor: llama-server exited with status 134; restarting in 5 s\n\n" + restarted)


def test_abort_in_the_middle_of_the_request_is_reported_with_its_log_lines():
    host = Answering("", exited=1)                        # the connection closed without an answer
    res = smoke.smoke(host, SERVE, read_log=abort_log, settle=0)
    assert not res.ok and res.aborted
    assert res.log_lines == [
        "slot launch_slot_: id  0 | task 0 | processing task, is_child = 0",
        "cmd_child_to_router:error:<dir>/llama-context.cpp:2202: GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max) failed",
        "gpubox-supervisor: llama-server exited with status 134; restarting in 5 s"]
    line = res.line()
    assert line.startswith("smoke request FAILED: llama-server aborted in the middle of the request")
    assert "log: cmd_child_to_router:error:" in line


def test_no_answer_without_an_abort_in_the_log_is_a_plain_failure():
    res = smoke.smoke(Answering("", exited=1), SERVE,
                      read_log=lambda: (LOGS / "fork-postsync-b10018-nodraft-turbo3.log").read_text(), settle=0)
    assert not res.ok and not res.aborted and res.status == 0
    assert res.line().startswith("smoke request FAILED (HTTP 0)")
