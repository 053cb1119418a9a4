"""Real probes on the target: one llama-server process per candidate value, run through provision.host.Host.

`run_probe(host, argv, ...)` runs probe.sh (next to this file) as `bash -c SCRIPT` with every value as a
positional argument, and returns the parsed outcome; `classify` is the pure part that turns the server's
exit status and log into one of the outcomes of provision.tune.search. The GPU benchmark's exhaustive sweep
uses the same function, so the sweep and the tuner measure alike.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import search as S

SCRIPT = (Path(__file__).with_name("probe.sh")).read_text()

# Out-of-memory forms (docs/fork.md, docs/tuning.md), most specific first.
KV_OOM = re.compile(r"failed to allocate buffer for kv cache|failed to allocate compute (pp |tg )?buffers?|"
                    r"ggml_gallocr_reserve_n: failed to allocate|failed to allocate \S+ compute buffer", re.I)
LOAD_OOM = re.compile(r"cudaMalloc failed: out of memory|alloc_tensor_range: failed to allocate|"
                      r"unable to allocate \S+ buffer|failed to allocate \S+ buffer|"
                      r"ErrorOutOfDeviceMemory|out of memory", re.I)
RUN_OOM = re.compile(r"CUDA error: out of memory|cudaErrorMemoryAllocation", re.I)


@dataclass
class Raw:
    """What probe.sh printed."""
    state: str = ""
    rc: Optional[int] = None
    http: str = ""
    base: Optional[int] = None
    peak: Optional[int] = None
    times: list[float] = field(default_factory=list)
    response: str = ""
    log: str = ""
    detail: str = ""


def parse_output(out: str) -> Raw:
    raw = Raw()
    section = None
    resp_lines: list[str] = []
    log_lines: list[str] = []
    for line in out.splitlines():
        if section == "log":
            log_lines.append(line)
            continue
        if line == "@@response":
            section = "response"
            continue
        if line == "@@log":
            section = "log"
            continue
        if section == "response":
            resp_lines.append(line)
            continue
        if line.startswith("@@"):
            key, _, val = line[2:].partition(" ")
            val = val.strip()
            if key == "state":
                raw.state = val
            elif key == "rc" and re.fullmatch(r"-?\d+", val):
                raw.rc = int(val)
            elif key == "http":
                raw.http = val
            elif key in ("base", "peak") and re.fullmatch(r"\d+", val):
                setattr(raw, key, int(val))
            elif key == "times":
                try:
                    raw.times = [float(x) for x in val.split()]
                except ValueError:
                    pass
            elif key == "detail":
                raw.detail = val
    raw.response = "\n".join(resp_lines).strip()
    raw.log = "\n".join(log_lines)
    return raw


def _first(pattern: re.Pattern, text: str) -> str:
    for line in text.splitlines():
        if pattern.search(line):
            return line.strip()[:240]
    return ""


def _last_error_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if re.search(r"error|failed|abort|exiting|invalid", line, re.I):
            return line.strip()[:240]
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1].strip()[:240] if lines else ""


def classify(raw: Raw) -> tuple[str, str]:
    """(outcome, the line that decided it). Every out-of-memory form is a NO_FIT outcome; anything else
    that failed is ERROR or TIMEOUT (the search stops: that is not a memory verdict)."""
    log = raw.log
    if raw.state == "ok":
        try:
            timings = json.loads(raw.response).get("timings")
        except (ValueError, AttributeError):
            timings = None
        if timings:
            return S.OK, ""
        return S.ERROR, "the server answered without timings: " + raw.response[:200]
    if raw.state == "error":
        return S.ERROR, raw.detail
    if raw.state == "timeout":
        return S.TIMEOUT, "not ready within the timeout; " + _last_error_line(log)
    rc = raw.rc
    if rc in (134, -6) or re.search(r"\bSIGABRT\b|Aborted", log):
        line = _first(RUN_OOM, log) or _first(LOAD_OOM, log) or _first(re.compile(r"GGML_ASSERT|abort", re.I), log)
        return S.ABORT, f"exit {rc} (SIGABRT)" + (f": {line}" if line else "")
    if rc in (139, -11):
        return S.SEGFAULT, f"exit {rc} (SIGSEGV)" + (f" after: {_first(KV_OOM, log) or _first(LOAD_OOM, log)}"
                                                     if (KV_OOM.search(log) or LOAD_OOM.search(log)) else "")
    if KV_OOM.search(log):
        return S.OOM_KV, _first(KV_OOM, log)
    if RUN_OOM.search(log):
        return S.OOM_RUN, _first(RUN_OOM, log)
    if LOAD_OOM.search(log):
        return (S.OOM_LOAD if raw.state == "exited" else S.OOM_RUN), _first(LOAD_OOM, log)
    if raw.state == "badresponse":
        return S.ERROR, f"HTTP {raw.http or 'no answer'}: {raw.response[:200] or _last_error_line(log)}"
    return S.ERROR, f"exit {rc}: {_last_error_line(log)}"


def to_result(value: int, raw: Raw, seconds: float) -> S.ProbeResult:
    outcome, detail = classify(raw)
    r = S.ProbeResult(value=value, outcome=outcome, seconds=round(seconds, 2), detail=detail)
    if raw.peak is not None and raw.base is not None:
        r.peak_mib = max(0, raw.peak - raw.base)
    if outcome == S.OK:
        t = json.loads(raw.response).get("timings") or {}
        r.gen_tps = _num(t.get("predicted_per_second"))
        r.prompt_tps = _num(t.get("prompt_per_second"))
        r.draft_n = t.get("draft_n")
        r.draft_accepted = t.get("draft_n_accepted")
    return r


def _num(v: Any) -> Optional[float]:
    try:
        return round(float(v), 2)
    except (TypeError, ValueError):
        return None


@dataclass
class ProbeSettings:
    workdir: str                 # on the target; each value's server.log stays in WORKDIR/k<value>
    port: int = 18080
    ready_timeout: int = 600
    request_timeout: int = 300
    prompt_tokens: int = 512
    gen_tokens: int = 32
    vocab: int = 32000
    gpu: int = 0


def token_request(n_prompt: int, n_gen: int, vocab: int) -> tuple[str, str]:
    """/completion with n_prompt token ids spread over the vocabulary (varied ids, so a MoE routes them to
    different experts), n_gen tokens generated whatever the model says (ignore_eos)."""
    v = max(vocab, 16)
    ids = [3 + (i * 7919) % (v - 3) for i in range(n_prompt)]
    body = {"prompt": ids, "n_predict": n_gen, "ignore_eos": True, "temperature": 0, "cache_prompt": False}
    return "/completion", json.dumps(body, separators=(",", ":"))


SPEED_PROMPT = ("Explain, step by step and in plain words, how a mixture-of-experts language model decides "
                "which experts process each token, and why keeping more experts in GPU memory makes "
                "generation faster. Then give three practical tips for running such a model on an 8 GB card.")


def chat_request(n_gen: int, text: str = SPEED_PROMPT) -> tuple[str, str]:
    """/v1/chat/completions (its `timings` carry draft_n / draft_n_accepted when drafting)."""
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": n_gen, "temperature": 0,
            "cache_prompt": False}
    return "/v1/chat/completions", json.dumps(body, separators=(",", ":"))


def run_probe(host, value: int, argv: list[str], ps: ProbeSettings,
              request: tuple[str, str] | None = None) -> tuple[S.ProbeResult, Raw]:
    """Run the server argv (which must listen on 127.0.0.1:ps.port) once; never raises for a failed server."""
    path, body = request or token_request(ps.prompt_tokens, ps.gen_tokens, ps.vocab)
    work = f"{ps.workdir.rstrip('/')}/k{value}"
    # The script travels as `bash -c` text, not on stdin: Invoke feeds stdin one byte per 10 ms.
    args = ["bash", "-c", SCRIPT, "gpubox-probe", work, ps.port, ps.ready_timeout, ps.request_timeout, ps.gpu,
            path, body, "--", *argv]
    t0 = time.monotonic()
    res = host.run(args, check=False, timeout=ps.ready_timeout + ps.request_timeout + 60)
    dt = time.monotonic() - t0
    raw = parse_output(getattr(res, "stdout", "") or "")
    if not raw.state:
        raw.state = "error"
        raw.detail = f"the probe script printed nothing usable (exit {getattr(res, 'exited', '?')}): " + \
            ((getattr(res, "stderr", "") or "").strip().splitlines() or [""])[-1][:200]
    return to_result(value, raw, dt), raw


def prompt_tokens_for(ctx: int, gen: int, wanted: int) -> int:
    """A full prompt batch, but never more than the context leaves after the generated tokens."""
    return max(1, min(wanted, ctx - gen - 4))
