"""Findings from a parsed llama-server log: what is wrong, the evidence line, and the fix in gpubox's terms.

    findings = diagnose(logparse.parse(text), serve=cfg["serve"], dialect="pre-sync", facts=facts)

Each finding: severity (error / warning / info), code, title, detail, fix, evidence (log lines).
Rules (docs/fork.md, docs/tuning.md, docs/serve-mtp.md):
  - draft-embedding-on-cpu: the assistant's load_tensors block has host model buffers (CPU, CPU_Mapped,
    CUDA_Host) that hold its LM head while the log shows a GPU (embedding_on_host: per head format):
    its token embedding / tied LM head stays in system RAM and every draft step streams it over PCIe.
    Pre-sync remedy: --override-tensor-draft "token_embd\\.weight=CUDA0" (serve.override_tensor_draft).
  - oom-at-load: cudaMalloc / alloc_tensor_range / "unable to allocate CUDA0 buffer" -> raise serve.n_cpu_moe or
    lower serve.ctx_size, with numbers from the log (failed size, MiB of experts per layer moved).
  - oom-kv / oom-runtime: KV-cache allocation failed; CUDA OOM during generation.
  - mlock-failed: the memlock limit (RLIMIT_MEMLOCK) is too low for --mlock.
  - gpu-not-visible: CUDA init failed, or a CUDA run found no device -> driver/reboot state (step 1).
  - server-aborted: the process died in the middle of a request (GGML_ASSERT / abort / segfault), with the
    request that was in flight; the post-sync fork's draft-simple assertion gets its own fix.
  - layers-not-offloaded, flash-attn-fallback, load-error, draft-acceptance (per-request lines, and the
    speculative statistics line of the trace level), draft-never-accepted (0 of at least 20 drafted tokens).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .logparse import Log

# The post-sync fork's plain-draft defect (docs/serve-mtp.md): the draft context allows one output.
N_OUTPUTS_ASSERT = "n_outputs_max <= cparams.n_outputs_max"
# Drafted tokens without a single acceptance before doctor calls the head useless (a matching head on real text
# accepts some within a few dozen).
NEVER_ACCEPTED_MIN = 20

OVERRIDE = r"token_embd\.weight=CUDA0"
HOST_BUFFERS = ("CPU", "CPU_Mapped", "CPU_REPACK", "CUDA_Host")


@dataclass
class Finding:
    severity: str            # "error", "warning", "info"
    code: str
    title: str
    detail: str = ""
    fix: str = ""
    evidence: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        out = [f"[{self.severity}] {self.title}"]
        if self.detail:
            out.append(f"    {self.detail}")
        for e in self.evidence[:6]:
            out.append(f"    log: {e}")
        if self.fix:
            out.append(f"    fix: {self.fix}")
        return "\n".join(out)


def _gpu_seen(log: Log) -> bool:
    if log.cuda_devices_found:
        return True
    return any(b.startswith(("CUDA", "ROCm", "Vulkan", "Metal")) and not b.endswith("_Host")
               for m in log.models for b in list(m.model_buffers) + list(m.kv_buffers))


MIB = 1 << 20


def embedding_on_host(draft, *, dialect: str, head: dict[str, Any] | None = None) -> tuple[dict[str, float], str]:
    """The host model buffers of the assistant's load_tensors block that mean its LM head is not on the GPU,
    and why ({} when none). `head` is the assistant's GGUF header summary (provision.ggufhead), which
    gives the size of its token_embd.

    - pre-sync head (gemma4_assistant): token_embd IS the LM head (no output copy), and the loader keeps it in a
      `CPU` buffer unless -otd moves it; the small CUDA_Host buffer that stays with the override is the
      layer-input pre_projection. Host buffers holding at least token_embd's size (header known), else any
      CPU/CPU_Mapped buffer, are the finding.
    - post-sync / upstream head (gemma4-assistant): the LM head is a separate output copy that follows -ngld;
      the input copy of token_embd stays on the host and is never read (tokens come from the target's
      embedding). Host buffers larger than that one copy (header known), else larger than the head's GPU
      buffers, are the finding.
    - any other draft model (a plain draft): every host buffer (the old rule).
    Sizes: docs/serve-mtp.md ("Where the head's weights land")."""
    host = {k: v for k, v in draft.model_buffers.items() if k in HOST_BUFFERS}
    if not host:
        return {}, ""
    total = sum(host.values())
    embd = None
    if head and isinstance(head.get("other_bytes"), dict) and head["other_bytes"].get("token_embd.weight"):
        embd = head["other_bytes"]["token_embd.weight"] / MIB
    gpu = sum(v for k, v in draft.model_buffers.items() if k not in HOST_BUFFERS)
    if draft.arch == "gemma4_assistant" or (dialect == "pre-sync" and draft.arch != "gemma4-assistant"):
        if embd is not None:
            if total + 0.01 >= embd:
                return host, f"its token_embd ({embd:.2f} MiB) is the LM head and fits only in the host buffers"
            return {}, ""
        cpu = {k: v for k, v in host.items() if k in ("CPU", "CPU_Mapped")}
        return (cpu, "the pre-sync loader keeps token_embd (the LM head) in a CPU buffer") if cpu else ({}, "")
    if draft.arch == "gemma4-assistant":
        if embd is not None:
            if total > embd * 1.01 + 0.01:
                return host, (f"more than the unused input copy of token_embd ({embd:.2f} MiB) is on the host: "
                              "the output copy (the LM head) is not on the GPU")
            return {}, ""
        if total > gpu:
            return host, "the head's host buffers are larger than its GPU buffers: the output copy is not on the GPU"
        return {}, ""
    return host, "a draft model's weights on the host"


@dataclass
class _Case:
    """What the rules read besides the log: the serve settings, the built dialect, host facts, the head's header."""
    serve: dict[str, Any]
    dialect: str
    facts: dict[str, Any]
    expect_gpu: bool | None
    head: dict[str, Any] | None
    gpu: bool


def diagnose(log: Log, *, serve: dict[str, Any] | None = None, dialect: str = "unknown",
             facts: dict[str, Any] | None = None, expect_gpu: bool | None = None,
             head: dict[str, Any] | None = None) -> list[Finding]:
    """Every rule's findings, in RULES order."""
    case = _Case(serve or {}, dialect, facts or {}, expect_gpu, head, _gpu_seen(log))
    return [f for rule in RULES for f in rule(log, case)]


def _gpu_not_visible(log: Log, c: _Case) -> list[Finding]:
    gpus_fact = c.facts.get("gpus")
    if not (log.cuda_init_error or (log.cuda_devices_found == 0) or (c.expect_gpu and not c.gpu)):
        return []
    ev = [f"ggml_cuda_init: failed to initialize CUDA: {log.cuda_init_error}"] if log.cuda_init_error else []
    seen = ("nvidia-smi sees: " + ", ".join(g.get("name", "?") for g in gpus_fact)) if isinstance(gpus_fact, list) and gpus_fact \
        else "nvidia-smi sees no GPU" if isinstance(gpus_fact, list) else "nvidia-smi state unknown"
    return [Finding(
        "error", "gpu-not-visible", "llama-server found no usable CUDA GPU: every layer runs on the CPU",
        f"{seen}. A CUDA build without a visible GPU usually means the NVIDIA kernel module is not loaded: "
        "a reboot is pending after the driver swap, akmods has not finished building the module for the running "
        "kernel, or Secure Boot refused the unsigned module.",
        "run `invoke driver --plan` (step 1 reports reboot/akmods/Secure Boot state) and `nvidia-smi`; reboot "
        "if step 1 says so, then `invoke serve`", ev)]


def _out_of_memory(log: Log, c: _Case) -> list[Finding]:
    if not log.oom:
        return []
    serve = c.serve
    kv = any("kv cache" in l.lower() for l in log.oom)
    runtime = any("CUDA error: out of memory" in l for l in log.oom) and not any(
        "cudaMalloc failed" in l or "alloc_tensor_range" in l or "unable to allocate" in l for l in log.oom)
    moe_fix = _moe_fix(log, serve)
    ctx = int(serve.get("ctx_size") or 0)
    ctx_fix = f"or lower serve.ctx_size from {ctx} to {ctx // 2}" if ctx else "or lower serve.ctx_size"
    if runtime:
        return [Finding("error", "oom-runtime", "CUDA ran out of memory while generating (compute buffers)",
                        "the model loaded but a batch needed more VRAM than was left; the server aborts (exit 134)",
                        f"{moe_fix}, {ctx_fix}", log.oom)]
    if kv:
        return [Finding("error", "oom-kv", "the KV cache did not fit in VRAM",
                        f"context {ctx} with cache types {serve.get('cache_type_k')}/{serve.get('cache_type_v')}",
                        f"lower serve.ctx_size from {ctx} to {ctx // 2} (KV memory scales with context), "
                        f"or a smaller cache type, or {moe_fix}", log.oom)]
    return [Finding("error", "oom-at-load", "out of GPU memory while loading the model",
                    "the weights kept on the GPU do not fit next to the context",
                    f"{moe_fix}, {ctx_fix}", log.oom + [l for l in log.load_errors if l not in log.oom][:3])]


def _moe_fix(log: Log, serve: dict[str, Any]) -> str:
    """How far to raise serve.n_cpu_moe: from the failed allocation and the experts' MiB per CPU layer."""
    target = log.target
    failed_mib = None
    for l in log.oom:
        m = re.search(r"buffer of size (\d+)", l)
        if m:
            failed_mib = int(m.group(1)) / 1048576
    ncm = int(serve.get("n_cpu_moe") or 0)
    per_layer = None
    if target and ncm > 0:
        cpu = sum(v for k, v in target.model_buffers.items() if k.startswith("CPU"))
        if cpu:
            per_layer = cpu / ncm
    n_layers = (target.offloaded[1] - 1) if target and target.offloaded else None
    if not (per_layer and failed_mib):
        return (f"raise serve.n_cpu_moe from {ncm} to {ncm + 2} or more"
                + (f" ({failed_mib:.0f} MiB were missing)" if failed_mib else "") + " (`invoke tune` finds the floor)")
    more = max(1, math.ceil(failed_mib / per_layer))
    if n_layers and ncm + more > n_layers:
        return (f"even all {n_layers} layers' experts on the CPU (serve.n_cpu_moe={n_layers}) free only about "
                f"{(n_layers - ncm) * per_layer:.0f} of the {failed_mib:.0f} MiB missing: set it and")
    return (f"raise serve.n_cpu_moe from {ncm} to {ncm + more} (about {per_layer:.0f} MiB of experts per "
            f"layer leave the GPU; {failed_mib:.0f} MiB were missing)")


def _draft_embedding(log: Log, c: _Case) -> list[Finding]:
    draft = log.draft
    if not (draft and c.gpu):
        return []
    cpu_bufs, why = embedding_on_host(draft, dialect=c.dialect, head=c.head)
    if not cpu_bufs:
        return []
    where = ", ".join(f"{k} {v:.2f} MiB" for k, v in cpu_bufs.items())
    ev = [f"load_tensors: {k} model buffer size = {v:.2f} MiB" for k, v in cpu_bufs.items()]
    ev += [f"tensor {o['tensor']} buffer type overridden to {o['buffer']}" for o in draft.overrides]
    if c.dialect == "pre-sync":
        fix = (f'add --override-tensor-draft "{OVERRIDE}": set serve.override_tensor_draft to '
               f"['{OVERRIDE}'] (the recipe's default) and run `invoke serve`")
    else:
        fix = (f"check serve.n_gpu_layers_draft (-ngld) and serve.override_tensor_draft: on the post-sync fork "
               f"the assistant's separate output tensor follows -ngld; an override sending token_embd to the "
               f"CPU must go. On the pre-sync fork the remedy is --override-tensor-draft \"{OVERRIDE}\"")
    return [Finding(
        "warning", "draft-embedding-on-cpu",
        f"the assistant ({draft.path}) has a host (CPU-side) model buffer ({where}): its token embedding / LM head is not on the GPU",
        "every draft step then streams the embedding/LM head over PCIe, which eats the MTP speed-up; " + why,
        fix, ev)]


def _mlock(log: Log, c: _Case) -> list[Finding]:
    if not log.mlock_failures:
        return []
    mode = "the unit's LimitMEMLOCK=infinity" if c.facts.get("systemd") == "yes" else "`ulimit -l unlimited` before the start (the launch script does this when run as root)"
    return [Finding(
        "warning", "mlock-failed", "--mlock could not lock the model in RAM: the memlock limit (RLIMIT_MEMLOCK) is too low",
        "the server runs, but the kernel may page the weights out under memory pressure",
        f"raise the memlock limit ({mode}; check with `cat /proc/$(pidof llama-server)/limits`), "
        "or set serve.mlock=false", log.mlock_failures[:3])]


def _layers(log: Log, c: _Case) -> list[Finding]:
    target = log.target
    if not (target and target.offloaded and c.gpu):
        return []
    n, m = target.offloaded
    want = int(c.serve.get("n_gpu_layers") or 0)
    if not (n < m and want >= m):
        return []
    return [Finding("warning", "layers-not-offloaded", f"only {n}/{m} layers were offloaded to the GPU",
                    f"serve.n_gpu_layers is {want}", "check free VRAM and the fit messages in the log",
                    [f"load_tensors: offloaded {n}/{m} layers to GPU"])]


def _flash_attn(log: Log, c: _Case) -> list[Finding]:
    if not log.fa_fallbacks:
        return []
    return [Finding("warning", "flash-attn-fallback",
                    "flash attention is not on the GPU for some layers (falls back to the CPU or is disabled)",
                    "usually a KV cache type or head size the GPU kernels do not support",
                    "try serve.flash_attn=auto or a different cache type", log.fa_fallbacks[:4])]


def _load_errors(log: Log, c: _Case) -> list[Finding]:
    other_errors = [l for l in log.load_errors if l not in log.oom]
    if not other_errors or log.oom:
        return []
    hint = ""
    if any("unknown model architecture" in l or "predates" in l for l in other_errors):
        hint = ("the assistant GGUF and the fork disagree on its format (pre-sync gemma4_assistant vs post-sync "
                "gemma4-assistant): pin the assistant revision that matches build.profile (step 6)")
    return [Finding("error", "load-error", "the server failed to load a model", hint,
                    hint or "read the evidence lines; check the model paths and files (invoke models)",
                    other_errors[:6])]


def _aborts(log: Log, c: _Case) -> list[Finding]:
    """A request that killed the server."""
    if not log.aborts:
        return []
    task = f"task {log.in_flight['task']} (slot {log.in_flight['slot']})" if log.in_flight else "a request"
    ev = ([f"slot launch_slot_: id {log.in_flight['slot']} | task {log.in_flight['task']} | processing task"]
          if log.in_flight else []) + log.aborts[:5]
    spec = str(c.serve.get("spec_type") or "")
    if any(N_OUTPUTS_ASSERT in a for a in log.aborts):
        fix = ("the post-sync fork aborts every request with --spec-type draft-simple (the draft context allows "
               "one output); serve with the MTP head: serve.spec_type=mtp serve.draft_model=assistant, or "
               "serve.spec_type=none (gpubox refuses draft-simple for this dialect before launch)")
        detail = (f"{task} was being processed when llama-server hit an assertion in llama-context.cpp"
                  + (f" (serve.spec_type={spec})" if spec else ""))
    else:
        fix = ("read the evidence lines (`invoke serve.logs --all`); an abort while generating is a bug or an "
               "out-of-memory in the binary: try serve.spec_type=none, a smaller serve.ctx_size, or a higher "
               "serve.n_cpu_moe")
        detail = f"{task} was being processed when llama-server died"
    return [Finding("error", "server-aborted", "llama-server aborted in the middle of a request", detail, fix, ev)]


def _draft_acceptance(log: Log, c: _Case) -> list[Finding]:
    drafted = [r for r in log.requests if r.draft_generated]
    if not drafted:
        return []
    acc = sum(r.draft_accepted or 0 for r in drafted) / max(1, sum(r.draft_generated or 0 for r in drafted))
    detail = "from the per-request `draft acceptance` lines"
    if log.spec_stats:
        st = log.spec_stats[-1]
        detail += (f"; statistics {st['type']}: {st.get('acc_tokens', 0)} of {st.get('gen_tokens', 0)} drafted "
                   f"tokens accepted over {st.get('calls_draft', 0)} draft calls")
    return [Finding("info", "draft-acceptance", f"draft acceptance {acc:.1%} over {len(drafted)} request(s)", detail)]


def _never_accepted(log: Log, c: _Case) -> list[Finding]:
    drafted = [r for r in log.requests if r.draft_generated]
    generated = sum(r.draft_generated or 0 for r in drafted)
    if generated < NEVER_ACCEPTED_MIN or any(r.draft_accepted for r in drafted):
        return []
    return [Finding(
        "warning", "draft-never-accepted",
        f"not one of {generated} drafted tokens was accepted: the head never agrees with the target",
        "every draft step then costs time and buys nothing, so generation is slower than without drafting",
        "check that the head belongs to this model (`invoke serve` checks the pair rules before launch; "
        "models.files.assistant revision), or serve without drafting: serve.spec_type=none",
        [f"slot print_timing: id {r.slot} | task {r.task} | draft acceptance = 0.00000 "
         f"(0 accepted / {r.draft_generated} generated)" for r in drafted][:3])]


RULES = (_gpu_not_visible, _out_of_memory, _draft_embedding, _mlock, _layers, _flash_attn, _load_errors, _aborts,
         _draft_acceptance, _never_accepted)


def summary(findings: list[Finding]) -> str:
    if not findings:
        return "doctor: no findings"
    return "\n".join(f.text() for f in findings)
