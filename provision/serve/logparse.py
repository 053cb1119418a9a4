"""Parse a llama-server log (stderr, or --log-file) into what doctor and the serve step need.

Line formats: docs/fork.md and docs/serve-mtp.md ("Log lines": real lines of both fork dialects and of
upstream). Lines may carry the
newer time/level prefix (`0.00.291.952 I `, `1.02.003.004 W `) or none (the pre-sync build); ANSI colour
codes are stripped. The log is split per model at each

    llama_model_loader: loaded meta data with K key-value pairs and T tensors from <path> (version ...)

line: the first block is the target, a later one the assistant/draft (or whichever model the caller
names by path). Per model: `load_tensors` buffer sizes by device, `offloaded N/M layers`, KV and compute
buffers. Across the log: devices, flash-attention fallbacks, OOM lines, mlock failures, load errors,
readiness, per-request timings and draft acceptance (old `draft acceptance rate =` and new
`draft acceptance =`), MTP/speculative statistics (trace level), and the memory breakdown table.

Per-request timing lines come in two layouts. Post-sync and upstream prefix every line with
`slot print_timing: id  0 | task 7 | `; the pre-sync fork prints that prefix ALONE on one line and the
`prompt eval time =`, `eval time =`, `total time =`, `draft acceptance rate =` and `statistics draft:` lines
follow bare. Bare timing lines therefore belong to the request of the last stand-alone header (a bare
`prompt eval time` line with no header before it starts a request of its own).

A server that dies in the middle of a request (an assertion, an abort, a segfault) leaves `aborts` (the
lines that say so) and `in_flight` (the task that was being processed and never reached print_timing).

The serve step's launch script writes a `gpubox: llama-server start ...` marker before every start;
`last_run()` keeps the text after the last one, so a restart's old lines never mix with the new ones;
`runs()` splits a whole log at the markers.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

START_MARKER = "gpubox: llama-server start"

ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# `0.00.291.952 I ` (minutes.seconds.ms.us then a level letter), either part optional.
PREFIX_RE = re.compile(r"^(?:\d+\.\d{2}\.\d{3}\.\d{3} )?(?:[IWEDT] )?")
LOADER_RE = re.compile(r"llama_model_loader: loaded meta data with (\d+) key-value pairs and (\d+) tensors from (.+?)"
                       r"(?: \(version .*\))?\s*$")
ARCH_RE = re.compile(r"llama_model_loader: - kv\s+\d+:\s+general\.architecture\s+str\s+=\s+(\S+)")
OFFLOAD_RE = re.compile(r"load_tensors: offloaded (\d+)/(\d+) layers to GPU")
MODEL_BUF_RE = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s*([\d.]+) MiB")
KV_BUF_RE = re.compile(r"llama_kv_cache\w*:\s+(\S+) KV buffer size =\s*([\d.]+) MiB")
COMPUTE_BUF_RE = re.compile(r"^\w+:\s+(\S+) compute buffer size =\s*([\d.]+) MiB")
OVERRIDE_RE = re.compile(r"tensor (\S+) \(([\d.]+) MiB (\S+)\) buffer type overridden to (\S+)")
DEVICES_RE = re.compile(r"ggml_cuda_init: found (\d+) CUDA devices?")
DEVICE_RE = re.compile(r"^\s*Device (\d+): (.+?), compute capability ([\d.]+)(?:, VMM: (\w+))?(?:, VRAM: (\d+) MiB)?")
CUDA_INIT_FAIL_RE = re.compile(r"ggml_cuda_init: failed to initialize CUDA: (.+)")
FA_RE = re.compile(r"(?:Flash Attention|flash_attn|flash attention).*(?:missing support|not supported|set to disabled|CPU)", re.I)
MLOCK_RE = re.compile(r"failed to mlock (\d+)-byte buffer(?: \(after previously locking (\d+) bytes\))?: (.+)")
OOM_PATTERNS = [
    re.compile(r"cudaMalloc failed: out of memory"),
    re.compile(r"alloc_tensor_range: failed to allocate (\S+) buffer of size (\d+)"),
    re.compile(r"unable to allocate (\S+) buffer"),
    re.compile(r"failed to allocate buffer for kv cache"),
    re.compile(r"CUDA error: out of memory"),
    re.compile(r"failed to allocate (\S+) buffer of size (\d+)"),
]
LOAD_ERROR_RE = re.compile(r"(?:llama_model_load: error loading model: (.+)|error: (.+)|"
                           r"llama_init_from_model: failed (.+)|gguf_init_from_file\w*: (.+)|"
                           r"srv\s+load_model: (failed .+)|common_init_from_params: (failed .+))")
EXIT_LOAD_RE = re.compile(r"exiting due to model loading error")
READY_RE = re.compile(r"llama_server: model loaded|main: model loaded|server is listening|srv\s+\w+: model loaded")
LISTEN_RE = re.compile(r"listening on (http://\S+)")
SLOT_RE = re.compile(r"slot\s+\w+: id\s+(\d+) \| task (-?\d+) \|(?: |$)")
# The pre-sync fork's stand-alone timing header: nothing after the second bar.
TIMING_HEADER_RE = re.compile(r"slot\s+print_timing: id\s+(\d+) \| task (-?\d+) \|\s*$")
# A task starting to be processed (both dialects and upstream): the request in flight until its timing lines.
TASK_START_RE = re.compile(r"slot\s+launch_slot_: id\s+(\d+) \| task (\d+) \| processing task")
TASK_END_RE = re.compile(r"slot\s+(?:release|print_timing): id\s+(\d+) \| task (\d+) \|")
# A process that dies: ggml's assertion/abort, the C++ runtime, the kernel's signal, the supervisor's exit line,
# systemd's line about the unit's main process (in the unit's journal: `journalctl -u` shows PID 1's messages too).
ABORT_RE = re.compile(r"GGML_ASSERT\(|GGML_ABORT|ggml_abort|terminate called|Segmentation fault|Aborted|core dumped|"
                      r"CUDA error: |fatal error|gpubox-supervisor: llama-server exited with status (?!0;)|"
                      r"Main process exited, code=(?:dumped|killed), status=\d+/(?:ABRT|SEGV|BUS|FPE|ILL|KILL)")
# Not errors: the draft-mtp assistant cannot make a context on its own while -fit measures memory; upstream
# and the post-sync fork say so with an E line ("this warning is normal during memory fitting").
BENIGN_RE = re.compile(r"normal during memory fitting|failed to measure (?:draft model memory|the memory of the extra model)")
KV_TYPES_RE = re.compile(r"llama_kv_cache\w*: size =.*K \((\w+)\):.*V \((\w+)\):")
SHARE_RE = re.compile(r"llama_kv_cache\w*: layer\s+(\d+): sharing with layer\s+(\d+)")
SPEC_IMPL_RE = re.compile(r"adding speculative implementation '([^']+)'")
TIMING_RE = re.compile(r"(prompt eval|eval) time =\s*([\d.]+) ms /\s*(\d+) (?:tokens|runs)\s*\(\s*([\d.]+) ms per token,\s*([\d.]+) tokens per second\)")
TOTAL_RE = re.compile(r"total time =\s*([\d.]+) ms /\s*(\d+) tokens")
DRAFT_RE = re.compile(r"draft acceptance(?: rate)? =\s*([\d.]+) \(\s*(\d+) accepted /\s*(\d+) generated\)(?:, mean len =\s*([\d.]+))?")
SPEC_STATS_RE = re.compile(r"statistics\s+(\S+): #calls\(b,g,a\) =\s*(\d+)\s+(\d+)\s+(\d+)(.*)")
SPEC_FIELD_RE = re.compile(r"#(gen drafts|acc drafts|gen tokens|acc tokens|mean acc len) =\s*([\d.]+)")
SPEC_DUR_RE = re.compile(r"dur\(b,g,a\) =\s*([\d.]+),\s*([\d.]+),\s*([\d.]+) ms")
MEM_HEADER_RE = re.compile(r"memory breakdown \[MiB\]")
MEM_ROW_RE = re.compile(r"-\s+(.+?)\s*\|\s*(\d+)\s*=\s*(\d+)\s*\+\s*\(\s*(\d+)\s*=\s*(\d+)\s*\+\s*(\d+)\s*\+\s*(\d+)\s*\)\s*\+\s*(-?\d+)")
MEM_HOST_RE = re.compile(r"-\s+(Host|\S+)\s*\|\s*(\d+)\s*=\s*(\d+)\s*\+\s*(\d+)\s*\+\s*(\d+)\s*\|?\s*$")


@dataclass
class ModelBlock:
    path: str
    role: str = ""                         # "target", "draft" (assistant / MTP head)
    arch: str = ""
    n_tensors: int = 0
    offloaded: tuple[int, int] | None = None
    model_buffers: dict[str, float] = field(default_factory=dict)      # BUF -> MiB
    kv_buffers: dict[str, float] = field(default_factory=dict)
    compute_buffers: dict[str, float] = field(default_factory=dict)
    overrides: list[dict[str, Any]] = field(default_factory=list)      # -v only
    kv_types: list[str] = field(default_factory=list)                  # [K, V] of each KV cache line
    kv_shared: list[tuple[int, int]] = field(default_factory=list)     # draft-mtp: (own layer, target layer)


@dataclass
class Request:
    slot: int
    task: int
    prompt_n: int = 0
    prompt_ms: float = 0.0
    prompt_per_second: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    predicted_per_second: float = 0.0
    total_ms: float = 0.0
    draft_acceptance: float | None = None
    draft_accepted: int | None = None
    draft_generated: int | None = None
    draft_mean_len: float | None = None


@dataclass
class Log:
    models: list[ModelBlock] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    cuda_devices_found: int | None = None
    cuda_init_error: str = ""
    fa_fallbacks: list[str] = field(default_factory=list)
    oom: list[str] = field(default_factory=list)
    mlock_failures: list[str] = field(default_factory=list)
    load_errors: list[str] = field(default_factory=list)
    exited_on_load_error: bool = False
    ready: bool = False
    listening: str = ""
    requests: list[Request] = field(default_factory=list)
    spec_stats: list[dict[str, Any]] = field(default_factory=list)
    spec_impls: list[str] = field(default_factory=list)                # "draft-mtp", ... (post-sync, upstream)
    memory: list[dict[str, Any]] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)                    # lines saying the process died
    in_flight: dict[str, int] | None = None                            # {"slot", "task"} started, never finished
    lines: int = 0

    def model(self, role: str) -> ModelBlock | None:
        return next((m for m in self.models if m.role == role), None)

    @property
    def target(self) -> ModelBlock | None:
        return self.model("target")

    @property
    def draft(self) -> ModelBlock | None:
        return self.model("draft")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def clean(line: str) -> str:
    """A log line without ANSI colours and without the optional time/level prefix."""
    line = ANSI_RE.sub("", line.rstrip("\r\n"))
    return PREFIX_RE.sub("", line, count=1)


def last_run(text: str) -> str:
    """The part of a log file written by the latest start (after the last start marker)."""
    i = text.rfind(START_MARKER)
    if i < 0:
        return text
    nl = text.find("\n", i)
    return text[nl + 1:] if nl >= 0 else ""


def runs(text: str) -> list[str]:
    """A log file split at the start markers: one text per start (text before the first marker dropped
    when there is a marker at all)."""
    parts = text.split(START_MARKER)
    if len(parts) == 1:
        return [text]
    return [p.split("\n", 1)[1] if "\n" in p else "" for p in parts[1:]]


def parse(text: str, *, target_path: str | None = None, draft_path: str | None = None) -> Log:
    """Parse a log. Model blocks get role "target" / "draft" by path when given, else by order."""
    p = _Parser()
    for raw in text.splitlines():
        p.log.lines += 1
        line = clean(raw)
        if line.strip():
            p.feed(line)
    if p.started:
        slot, task = list(p.started)[-1]
        p.log.in_flight = {"slot": slot, "task": task}
    _assign_roles(p.log, target_path, draft_path)
    return p.log


class _Parser:
    """One line at a time through the handlers below, in order; a handler that returns True takes the line."""

    def __init__(self):
        self.log = Log()
        self.cur: ModelBlock | None = None
        self.in_mem = False
        self.requests: dict[tuple[int, int], Request] = {}
        self.header: Request | None = None       # the pre-sync stand-alone `slot print_timing: ... |` request
        self.header_fields: set[str] = set()     # which timing lines it has had
        self.started: dict[tuple[int, int], bool] = {}

    def feed(self, line: str) -> None:
        for handler in (self._watch, self._loader, self._block, self._devices, self._memory, self._problems,
                        self._server, self._timings, self._spec_stats):
            if handler(line):
                return

    # -- requests --
    def _get(self, key: tuple[int, int]) -> Request:
        if key not in self.requests:
            self.requests[key] = Request(slot=key[0], task=key[1])
            self.log.requests.append(self.requests[key])
        return self.requests[key]

    def _req(self, line: str, field_: str) -> Request:
        m = SLOT_RE.search(line)
        if m:
            return self._get((int(m.group(1)), int(m.group(2))))
        # A bare timing line (pre-sync): the last stand-alone header's request, unless that one already has
        # this line (then a new request without a header begins).
        if self.header is None or field_ in self.header_fields:
            self.header, self.header_fields = self._get((-1, len(self.log.requests))), set()
        self.header_fields.add(field_)
        return self.header

    # -- handlers --
    def _watch(self, line: str) -> bool:
        """Aborts, tasks started and ended (never the only thing on a line), the pre-sync timing header."""
        if ABORT_RE.search(line):
            self.log.aborts.append(line.strip())
        m = TASK_START_RE.search(line)
        if m:
            self.started[(int(m.group(1)), int(m.group(2)))] = True
        m = TASK_END_RE.search(line)
        if m:
            self.started.pop((int(m.group(1)), int(m.group(2))), None)
        m = TIMING_HEADER_RE.search(line)
        if m:
            self.header, self.header_fields = self._get((int(m.group(1)), int(m.group(2)))), set()
            return True
        return False

    def _loader(self, line: str) -> bool:
        m = LOADER_RE.search(line)
        if m:
            self.cur = ModelBlock(path=m.group(3).strip(), n_tensors=int(m.group(2)))
            self.log.models.append(self.cur)
            self.in_mem = False
        return bool(m)

    def _block(self, line: str) -> bool:
        """The lines of the current model's load: architecture, offload, buffers, KV, overrides."""
        cur = self.cur
        if cur is None:
            return False
        m = ARCH_RE.search(line)
        if m and not cur.arch:
            cur.arch = m.group(1)
            return True
        for rx, bufs in ((MODEL_BUF_RE, cur.model_buffers), (KV_BUF_RE, cur.kv_buffers)):
            m = rx.search(line)
            if m:
                bufs[m.group(1)] = bufs.get(m.group(1), 0.0) + float(m.group(2))
                return True
        if (m := OFFLOAD_RE.search(line)):
            cur.offloaded = (int(m.group(1)), int(m.group(2)))
        elif (m := COMPUTE_BUF_RE.search(line)):
            cur.compute_buffers[m.group(1)] = float(m.group(2))
        elif (m := KV_TYPES_RE.search(line)):
            cur.kv_types.append(f"{m.group(1)}/{m.group(2)}")
        elif (m := SHARE_RE.search(line)):
            cur.kv_shared.append((int(m.group(1)), int(m.group(2))))
        elif (m := OVERRIDE_RE.search(line)):
            cur.overrides.append({"tensor": m.group(1), "mib": float(m.group(2)), "type": m.group(3),
                                  "buffer": m.group(4)})
        return bool(m)

    def _devices(self, line: str) -> bool:
        log = self.log
        if (m := DEVICES_RE.search(line)):
            log.cuda_devices_found = int(m.group(1))
            return True
        m = DEVICE_RE.search(line)
        if m and log.cuda_devices_found is not None:
            log.devices.append({"index": int(m.group(1)), "name": m.group(2), "compute_capability": m.group(3),
                                "vmm": m.group(4) or "", "vram_mib": int(m.group(5)) if m.group(5) else None})
            return True
        if (m := CUDA_INIT_FAIL_RE.search(line)):
            log.cuda_init_error = m.group(1).strip()
            return True
        return False

    def _memory(self, line: str) -> bool:
        """The memory breakdown table: its rows follow its header line."""
        if MEM_HEADER_RE.search(line):
            self.in_mem = True
            return True
        if not self.in_mem:
            return False
        if (m := MEM_ROW_RE.search(line)):
            self.log.memory.append({"device": m.group(1).strip(), "total": int(m.group(2)), "free": int(m.group(3)),
                                    "self": int(m.group(4)), "model": int(m.group(5)), "context": int(m.group(6)),
                                    "compute": int(m.group(7)), "unaccounted": int(m.group(8))})
            return True
        if (m := MEM_HOST_RE.search(line)):
            self.log.memory.append({"device": m.group(1), "self": int(m.group(2)), "model": int(m.group(3)),
                                    "context": int(m.group(4)), "compute": int(m.group(5))})
            return True
        self.in_mem = False
        return False

    def _problems(self, line: str) -> bool:
        """mlock failures, out of memory, flash attention on the CPU, model load errors."""
        log = self.log
        if MLOCK_RE.search(line):
            log.mlock_failures.append(line.strip())
            return True
        if any(p.search(line) for p in OOM_PATTERNS):
            log.oom.append(line.strip())
        if FA_RE.search(line):
            log.fa_fallbacks.append(line.strip())
            return True
        if EXIT_LOAD_RE.search(line):
            log.exited_on_load_error = True
            log.load_errors.append(line.strip())
            return True
        if LOAD_ERROR_RE.search(line) and not line.startswith("warning") and not BENIGN_RE.search(line):
            log.load_errors.append(line.strip())
            return True
        return False

    def _server(self, line: str) -> bool:
        """Listening, ready, the speculative implementations it added."""
        if (m := LISTEN_RE.search(line)):
            self.log.listening = m.group(1)
        if READY_RE.search(line):
            self.log.ready = True
            return True
        if (m := SPEC_IMPL_RE.search(line)):
            self.log.spec_impls.append(m.group(1))
            return True
        return False

    def _timings(self, line: str) -> bool:
        """A request's prompt/eval/total times and its draft acceptance."""
        if (m := TIMING_RE.search(line)):
            r = self._req(line, "prompt_n" if m.group(1) == "prompt eval" else "predicted_n")
            if m.group(1) == "prompt eval":
                r.prompt_ms, r.prompt_n, r.prompt_per_second = float(m.group(2)), int(m.group(3)), float(m.group(5))
            else:
                r.predicted_ms, r.predicted_n, r.predicted_per_second = float(m.group(2)), int(m.group(3)), float(m.group(5))
            return True
        if (m := TOTAL_RE.search(line)):
            self._req(line, "total_ms").total_ms = float(m.group(1))
            return True
        if (m := DRAFT_RE.search(line)):
            r = self._req(line, "draft_generated")
            r.draft_acceptance = float(m.group(1))
            r.draft_accepted, r.draft_generated = int(m.group(2)), int(m.group(3))
            r.draft_mean_len = float(m.group(4)) if m.group(4) else None
            return True
        return False

    def _spec_stats(self, line: str) -> bool:
        m = SPEC_STATS_RE.search(line)
        if not m:
            return False
        st: dict[str, Any] = {"type": m.group(1), "calls_begin": int(m.group(2)), "calls_draft": int(m.group(3)),
                              "calls_accept": int(m.group(4))}
        for k, v in SPEC_FIELD_RE.findall(m.group(5)):
            st[k.replace(" ", "_")] = float(v) if "." in v else int(v)
        d = SPEC_DUR_RE.search(m.group(5))
        if d:
            st["dur_ms"] = [float(d.group(1)), float(d.group(2)), float(d.group(3))]
        self.log.spec_stats.append(st)
        return True


def _assign_roles(log: Log, target_path: str | None, draft_path: str | None) -> None:
    for mb in log.models:
        if draft_path and mb.path == draft_path:
            mb.role = "draft"
        elif target_path and mb.path == target_path:
            mb.role = "target"
    rest = [mb for mb in log.models if not mb.role]
    have = {mb.role for mb in log.models}
    for mb in rest:
        if "target" not in have:
            mb.role = "target"
            have.add("target")
        elif "draft" not in have:
            mb.role = "draft"
            have.add("draft")
        else:
            mb.role = "other"


def explain_exit(text: str, n: int = 12) -> list[str]:
    """The lines of a log that explain why a server stopped: errors, OOM, load errors; else its tail."""
    keep = []
    for raw in text.splitlines():
        line = clean(raw)
        low = line.lower()
        if (LOAD_ERROR_RE.search(line) or EXIT_LOAD_RE.search(line) or any(p.search(line) for p in OOM_PATTERNS)
                or CUDA_INIT_FAIL_RE.search(line) or ABORT_RE.search(line) or "error" in low or "failed" in low
                or "abort" in low or "segmentation fault" in low or "invalid argument" in low or "unsupported" in low
                or "gpubox-supervisor" in low):
            if "warning: no usable gpu" in low or BENIGN_RE.search(line):
                continue
            keep.append(line.strip())
    if not keep:
        keep = [clean(x).strip() for x in text.splitlines() if x.strip()]
    return keep[-n:]


def explain_abort(text: str, n: int = 12) -> list[str]:
    """The lines of a run that died in the middle of a request: the request that was being processed (its
    `processing task` line and the slot lines after it), then every line saying the process died. [] when the
    run shows no abort."""
    log = parse(text)
    if not log.aborts:
        return []
    keep: list[str] = []
    task = log.in_flight["task"] if log.in_flight else None
    for raw in text.splitlines():
        line = clean(raw).strip()
        m = TASK_START_RE.search(line)
        if task is not None and m and int(m.group(2)) == task:
            keep.append(line)
        elif line in log.aborts and line not in keep:
            keep.append(line)
    return keep[-n:]
