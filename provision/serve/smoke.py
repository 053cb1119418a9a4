"""Prove a started llama-server: wait for readiness, then the recipe's smoke request.

HTTP runs ON the target (the server listens on the target's loopback, which the controller may not reach:
the sandbox lives in its own network namespace). The client is bash's /dev/tcp, so nothing beyond bash and
coreutils is needed on the target (no curl or python in a minimal chroot):

    wait_ready(host, ...)   polls /health every second: 503 {"error":{"message":"Loading model"}} while the
                            model loads, 200 when ready; prints progress; bounded by serve.ready_timeout. If the
                            server process dies meanwhile, raises ServerExited with the log lines that explain
                            why (out of memory, unknown architecture, invalid argument ...), not a timeout.
    smoke(host, ...)        POST /v1/chat/completions with a system and a user message (non-streamed) and
                            reads `timings`: prompt/generation tokens per second, draft_n/draft_n_accepted.
                            When the server dies in the middle of the request (no response, and the log shows
                            an assertion/abort), the result says so, with the log lines (read_log given).
    attach_log(res, log)    adds what the server's log says about the same request: its `draft acceptance =`
                            line (accepted / generated, mean accepted length) and the latest speculative
                            `statistics <type>:` line (trace level, -lv 4), so the smoke line shows draft
                            acceptance from both the response and the log.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from ..engine import StepError
from ..host import sh
from . import logparse

# The recipe's smoke test: one system and one user message, non-streamed.
SMOKE_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Say hello in one short sentence."},
]
SMOKE_MAX_TOKENS = 32

# bash-only HTTP/1.1 client: request body on stdin; prints the raw response. With serve.api_key_file ({kf} not
# empty) the key is read ON the target from that file (its first non-empty line, as llama-server's
# --api-key-file reads it) and sent as `Authorization: Bearer`: it never travels to the controller or onto a
# command line (printf is a bash builtin). /health needs no key; /v1/* does.
_CLIENT = r'''
body=$(cat; printf x); body=${{body%x}}
export LC_ALL=C
auth=
kf={kf}
if [ -n "$kf" ]; then
  key=$(grep -m1 . "$kf") || exit 8
  auth="Authorization: Bearer $key"$'\r\n'
fi
exec 3<>/dev/tcp/{h}/{p} || exit 7
if [ {m} = GET ]; then
  printf '%s %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n' {m} {path} {hp} "$auth" >&3
else
  printf '%s %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n' {m} {path} {hp} "$auth" "${{#body}}" >&3
  printf '%s' "$body" >&3
fi
cat <&3
'''


class ServerExited(StepError):
    """The server process ended while loading or answering."""


@dataclass
class Response:
    status: int
    body: str
    headers: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


def connect_host(serve: dict) -> str:
    h = serve.get("host") or "127.0.0.1"
    return "127.0.0.1" if h == "0.0.0.0" else ("::1" if h == "::" else h)


def parse_response(raw: str) -> Response:
    head, sep, body = raw.partition("\r\n\r\n")
    if not sep:
        return Response(0, raw)
    lines = head.split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        return Response(0, raw)
    headers = {}
    for l in lines[1:]:
        k, _, v = l.partition(":")
        headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        out, rest = [], body
        while rest:
            size_line, _, rest = rest.partition("\r\n")
            try:
                n = int(size_line.split(";")[0], 16)
            except ValueError:
                break
            if n == 0:
                break
            out.append(rest[:n])
            rest = rest[n + 2:]
        body = "".join(out)
    return Response(status, body, headers)


def client_script(serve: dict, method: str, path: str) -> str:
    """The bash client for one request to the server `serve` describes (every value quoted)."""
    h, p = connect_host(serve), serve["port"]
    return sh(_CLIENT, h=h, p=p, m=method, path=path, hp=f"{h}:{p}", kf=serve.get("api_key_file") or "")


def http_command(serve: dict, path: str, timeout: int = 10) -> str:
    """A GET as one shell command (for testinfra's host.run, which takes no stdin); parse with parse_response."""
    return sh("timeout {t} bash -c {s} < /dev/null", t=timeout, s=client_script(serve, "GET", path))


def http(host, serve: dict, method: str, path: str, payload: Any = None, timeout: int = 10) -> Response:
    """One HTTP request from the target to its own llama-server. status 0 = no connection."""
    body = json.dumps(payload) if payload is not None else ""
    # The key file is 0600 and owned by the server's user: read it as root (sudo), as the serve step checks it.
    r = host.run(["timeout", str(timeout), "bash", "-c", client_script(serve, method, path)], check=False,
                 stdin=body, root=bool(serve.get("api_key_file")))
    if r.exited != 0 and not (r.stdout or "").strip():
        return Response(0, (r.stderr or "").strip())
    return parse_response(r.stdout or "")


def wait_ready(host, serve: dict, *, pid: int | str | None, timeout: int, read_log: Callable[[], str],
               echo: Callable[[str], None] = print, poll: float = 1.0) -> dict[str, Any]:
    """Poll /health until 200. Raises ServerExited (with the explaining log lines) or StepError (timeout)."""
    t0 = time.monotonic()
    last_print = -10.0
    states: list[str] = []
    while True:
        el = time.monotonic() - t0
        if pid is not None and not host.ok(["kill", "-0", str(pid)], root=True):
            text = read_log()
            lines = logparse.explain_exit(text)
            raise ServerExited(
                f"serve: llama-server (pid {pid}) exited during load after {el:.1f}s",
                "read the log lines below; `invoke doctor` turns them into a fix",
                output="\n".join(lines))
        r = http(host, serve, "GET", "/health", timeout=5)
        if r.status == 200:
            return {"seconds": round(el, 2), "states": states}
        state = "not listening yet" if r.status == 0 else (
            "loading model (503)" if r.status == 503 else f"HTTP {r.status}")
        if not states or states[-1] != state:
            states.append(state)
        if el - last_print >= 5:
            echo(f"[serve] waiting for llama-server: {state}, {el:.0f}s of {timeout}s")
            last_print = el
        if el > timeout:
            lines = logparse.explain_exit(read_log())
            raise StepError(f"serve: llama-server not ready after {timeout}s (last state: {state})",
                            "raise serve.ready_timeout for slow disks, or read the log (invoke serve.logs)",
                            output="\n".join(lines))
        time.sleep(poll)


@dataclass
class SmokeResult:
    ok: bool
    status: int
    reply: str = ""
    prompt_n: int = 0
    prompt_per_second: float = 0.0
    predicted_n: int = 0
    predicted_per_second: float = 0.0
    draft_n: int | None = None
    draft_n_accepted: int | None = None
    draft_acceptance: float | None = None
    model: str = ""
    error: str = ""
    aborted: bool = False                      # the server died in the middle of this request
    log_lines: list[str] = field(default_factory=list)
    # From the server's log (attach_log): the request's `draft acceptance = ...` line and the statistics line.
    log_draft_accepted: int | None = None
    log_draft_generated: int | None = None
    log_draft_acceptance: float | None = None
    log_draft_mean_len: float | None = None
    spec_type: str = ""                        # the type named by the statistics line (draft-mtp, draft, ...)
    spec_acc_tokens: int | None = None         # cumulative over the server's life
    spec_gen_tokens: int | None = None

    def line(self) -> str:
        if self.aborted:
            return ("smoke request FAILED: llama-server aborted in the middle of the request; its log:\n"
                    + "\n".join(f"  log: {l}" for l in self.log_lines))
        if not self.ok:
            return f"smoke request FAILED (HTTP {self.status}): {self.error}"
        s = (f"smoke: prompt {self.prompt_n} tokens at {self.prompt_per_second:.1f} t/s, generation "
             f"{self.predicted_n} tokens at {self.predicted_per_second:.1f} t/s")
        if self.draft_n is not None:
            s += (f", draft acceptance {self.draft_n_accepted}/{self.draft_n} = {self.draft_acceptance:.1%}"
                  " (timings)")
        if self.log_draft_generated is not None:
            s += (f", log: draft acceptance = {self.log_draft_acceptance:.5f} ({self.log_draft_accepted} accepted / "
                  f"{self.log_draft_generated} generated)")
            if self.log_draft_mean_len is not None:
                s += f", mean len {self.log_draft_mean_len:.2f}"
        if self.spec_type:
            s += f", statistics {self.spec_type}: {self.spec_acc_tokens}/{self.spec_gen_tokens} tokens accepted"
        if self.draft_n is None and self.log_draft_generated is None and not self.spec_type:
            s += ", no drafting"
        return s + f"; reply: {self.reply[:60]!r}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def aborted_run(text: str, last: int = 2) -> list[str]:
    """The abort lines of the latest run that died in the middle of a request, among the last `last` runs of a
    whole log file (the supervisor may have restarted the server already: then the aborted run is the one
    before the last start marker). [] when none did."""
    for run in reversed(logparse.runs(text)[-last:]):
        lines = logparse.explain_abort(run)
        if lines:
            return lines
    return []


def smoke(host, serve: dict, *, max_tokens: int = SMOKE_MAX_TOKENS, timeout: int = 120,
          read_log: Callable[[], str] | None = None, settle: float = 1.0) -> SmokeResult:
    """The smoke request. read_log (the whole log file, all runs) lets a failed request be explained: a server
    that died while answering is reported as aborted, with its log lines."""
    payload = {"messages": SMOKE_MESSAGES, "max_tokens": max_tokens, "stream": False}
    r = http(host, serve, "POST", "/v1/chat/completions", payload, timeout=timeout)
    if r.status != 200:
        if r.status == 0 and read_log is not None:
            time.sleep(settle)                  # the dying process's last lines reach the log
            lines = aborted_run(read_log())
            if lines:
                return SmokeResult(False, 0, aborted=True, log_lines=lines,
                                   error="llama-server aborted in the middle of the request")
        return SmokeResult(False, r.status, error=r.body[:300])
    try:
        d = r.json()
        t = d.get("timings") or {}
        res = SmokeResult(True, 200, reply=d["choices"][0]["message"].get("content") or "",
                          prompt_n=int(t.get("prompt_n", 0)), prompt_per_second=float(t.get("prompt_per_second", 0.0)),
                          predicted_n=int(t.get("predicted_n", 0)),
                          predicted_per_second=float(t.get("predicted_per_second", 0.0)), model=d.get("model", ""))
        if "draft_n" in t:
            res.draft_n, res.draft_n_accepted = int(t["draft_n"]), int(t.get("draft_n_accepted", 0))
            res.draft_acceptance = res.draft_n_accepted / res.draft_n if res.draft_n else 0.0
        return res
    except (ValueError, KeyError, IndexError, TypeError) as e:
        return SmokeResult(False, r.status, error=f"unexpected response ({e}): {r.body[:300]}")


def attach_log(res: SmokeResult, log: logparse.Log) -> SmokeResult:
    """What the log says about the smoke request (its last request) and the latest statistics line."""
    if log.requests:
        q = log.requests[-1]
        if q.draft_generated is not None:
            res.log_draft_accepted, res.log_draft_generated = q.draft_accepted, q.draft_generated
            res.log_draft_acceptance, res.log_draft_mean_len = q.draft_acceptance, q.draft_mean_len
    if log.spec_stats:
        st = log.spec_stats[-1]
        res.spec_type, res.spec_acc_tokens, res.spec_gen_tokens = st["type"], st.get("acc_tokens"), st.get("gen_tokens")
    return res


def models(host, serve: dict) -> list[str]:
    r = http(host, serve, "GET", "/v1/models")
    if r.status != 200:
        return []
    try:
        return [m.get("id", "") for m in r.json().get("data", [])]
    except ValueError:
        return []
