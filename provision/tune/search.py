"""The placement search as pure functions: estimates and probe outcomes in, the next action out.

Nothing here runs a command. `next_action(question, estimates, probes)` looks at what is known so far
and answers with one of:

    NeedEstimate(k)      ask llama-fit-params for --n-cpu-moe k (no allocation, under a second)
    Probe(k, predicted)  run the real configuration once at k (a full prompt batch plus generated tokens)
    Done(k, ...)         k is the answer: a real probe ran it (or ran a lower value, see `by`)
    GiveUp(reason)       no value can be verified; the reason names the cause and the fix

The driver (provision/tune/runner.py) fulfils the request and calls again with the new fact; the same
inputs always give the same action, so the unit tests replay recorded outcomes as data.

The model of memory (measured in docs/tuning.md, on an H200 capped to 8 GiB):

    peak(k) = estimate(k) + extra + overhead

- estimate(k): llama-fit-params' device total (model + context + compute) at --n-cpu-moe k, at the user's
  context size and cache types; it is non-increasing in k (k = experts of the first k layers on the CPU);
- extra: what fit-params cannot see: the MTP assistant's weights and KV cache (from its GGUF header);
- overhead: a per-machine constant (CUDA context, cuBLAS workspace, the pool that grows on the first
  batch). It is learned from a probe's measured peak (overhead = peak - estimate - extra), stored per
  card/driver, and re-learned whenever a probe contradicts it.

A value fits when peak(k) + margin <= free. The answer is the smallest k that fits (the most experts on
the GPU), and only values that a real probe ran are ever answered: a wrong constant costs probes, never a
crash. Every out-of-memory form (load failure, KV/compute buffer failure, abort exit 134, segfault)
counts as "does not fit".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

# Probe outcomes.
OK = "ok"
OOM_LOAD = "oom-load"        # exit 1 while loading: cudaMalloc failed / unable to allocate CUDA0 buffer
OOM_KV = "oom-kv"            # KV cache or compute buffer could not be allocated
OOM_RUN = "oom-run"          # loaded, then "CUDA error: out of memory" during the request
ABORT = "abort"              # exit 134 / SIGABRT (near the floor: the first prompt batch)
SEGFAULT = "segfault"        # exit 139 / SIGSEGV (a failed KV allocation may crash this way)
ERROR = "error"              # any other failure: not a verdict about memory; the search stops
TIMEOUT = "timeout"          # never became ready / never answered; the search stops

NO_FIT = frozenset({OOM_LOAD, OOM_KV, OOM_RUN, ABORT, SEGFAULT})
OUTCOMES = (OK, OOM_LOAD, OOM_KV, OOM_RUN, ABORT, SEGFAULT, ERROR, TIMEOUT)


@dataclass
class ProbeResult:
    """One real run of the configuration at one --n-cpu-moe value."""
    value: int
    outcome: str
    peak_mib: Optional[int] = None        # measured peak GPU memory of the server (None: not measurable)
    seconds: float = 0.0
    gen_tps: Optional[float] = None
    prompt_tps: Optional[float] = None
    predicted_mib: Optional[int] = None   # estimate + extra + overhead at the time of the probe
    detail: str = ""                      # the log line that decided the outcome
    draft_n: Optional[int] = None
    draft_accepted: Optional[int] = None

    @property
    def fits(self) -> bool:
        return self.outcome == OK


@dataclass
class Question:
    """What the user asks: the most experts on the GPU for this card, configuration and margin."""
    free_mib: int                         # GPU memory free before any probe (nvidia-smi memory.free)
    n_max: int                            # the largest meaningful --n-cpu-moe (the number of layers)
    margin_mib: int = 0                   # free memory to keep (desktop, other processes)
    extra_mib: int = 0                    # the assistant head's weights + KV, not seen by fit-params
    overhead_mib: Optional[int] = None    # the stored per-machine constant, None when never learned here
    prior_overhead_mib: int = 1024        # used until a probe measures the constant (deliberately high)
    max_probes: int = 3
    pad_mib: int = 512                    # after an unexplained failure: lower bound + pad, then re-measure
    n_min: int = 0


@dataclass(frozen=True)
class NeedEstimate:
    value: int


@dataclass(frozen=True)
class Probe:
    value: int
    predicted_mib: int


@dataclass(frozen=True)
class Done:
    value: int
    reason: str
    by: int                               # the probed value that proves it runs (== value, or a lower one)
    overhead_mib: int


@dataclass(frozen=True)
class GiveUp:
    reason: str


Action = Union[NeedEstimate, Probe, Done, GiveUp]


@dataclass
class Knowledge:
    """What the probes so far say; derived by replaying them in order (see `learn`)."""
    overhead_mib: int
    measured: bool                        # overhead came from a measured peak in this run
    source: str                           # "stored", "prior", "measured at k=..", "raised after failure at k=.."
    max_fail: Optional[int] = None        # the largest value seen not to fit
    min_run: Optional[int] = None         # the smallest value seen to run (margin or not)
    corrections: list[str] = field(default_factory=list)


def learn(q: Question, estimates: dict[int, int], probes: Iterable[ProbeResult]) -> Knowledge:
    """Replay the probes: each measured success sets the overhead, each failure raises its lower bound."""
    if q.overhead_mib is not None:
        kn = Knowledge(q.overhead_mib, False, "stored")
    else:
        kn = Knowledge(q.prior_overhead_mib, False, "prior")
    for p in probes:
        est = estimates.get(p.value)
        if p.outcome == OK:
            kn.min_run = p.value if kn.min_run is None else min(kn.min_run, p.value)
            if est is None:
                continue
            if p.peak_mib is not None:
                o = p.peak_mib - est - q.extra_mib
                if o != kn.overhead_mib:
                    kn.corrections.append(
                        f"overhead {kn.overhead_mib} -> {o} MiB: measured peak {p.peak_mib} MiB at {p.value} "
                        f"(estimate {est} + assistant {q.extra_mib})")
                kn.overhead_mib, kn.measured, kn.source = o, True, f"measured at {p.value}"
            else:
                # It ran, so the true overhead is at most free - estimate - extra.
                ub = q.free_mib - est - q.extra_mib
                if kn.overhead_mib > ub:
                    kn.corrections.append(f"overhead {kn.overhead_mib} -> {ub} MiB: {p.value} ran (no peak reading)")
                    kn.overhead_mib, kn.source = ub, f"bounded by run at {p.value}"
        elif p.outcome in NO_FIT:
            kn.max_fail = p.value if kn.max_fail is None else max(kn.max_fail, p.value)
            if est is None:
                continue
            lb = q.free_mib - est - q.extra_mib    # it did not fit: the true overhead is above this
            if kn.overhead_mib <= lb:
                new = lb + 1 if kn.measured else max(kn.overhead_mib, lb + q.pad_mib)
                kn.corrections.append(
                    f"overhead {kn.overhead_mib} -> {new} MiB: {p.value} predicted to fit but {p.outcome}"
                    + ("" if kn.measured else f" (lower bound {lb} + pad {q.pad_mib}, to be measured)"))
                kn.overhead_mib = new
                kn.source = f"raised after {p.outcome} at {p.value}"
    return kn


def predicted(q: Question, kn: Knowledge, est: int) -> int:
    return est + q.extra_mib + kn.overhead_mib


def smallest_fitting(lo: int, hi: int, estimates: dict[int, int], threshold: int) -> Union[int, None, NeedEstimate]:
    """The smallest k in [lo, hi] with estimate(k) <= threshold, asking for as few estimates as possible.

    estimate(k) is non-increasing and nearly linear in k (each layer moves the same expert bytes), so the
    search interpolates between the nearest known points: with a linear table it needs the two ends and
    then two points around the crossing."""
    if lo > hi:
        return None
    for k in (hi, lo):
        if k not in estimates:
            return NeedEstimate(k)
    if estimates[hi] > threshold:
        return None
    if estimates[lo] <= threshold:
        return lo
    a, b = lo, hi                       # estimates[a] > threshold >= estimates[b]
    while True:
        for k in sorted(estimates):
            if a < k < b:
                if estimates[k] > threshold:
                    a = k
                else:
                    b = k
                    break
        if b - a <= 1:
            return b
        ea, eb = estimates[a], estimates[b]
        frac = (ea - threshold) / (ea - eb) if ea != eb else 0.5
        g = a + math.ceil(frac * (b - a) - 1e-9)
        # Every known point strictly between a and b was folded in above, so g is a new one.
        return NeedEstimate(min(max(g, a + 1), b - 1))


def next_action(q: Question, estimates: dict[int, int], probes: list[ProbeResult]) -> Action:
    """The next step of the search (see the module docstring)."""
    for p in probes:
        if p.outcome in (ERROR, TIMEOUT):
            return GiveUp(f"the probe at --n-cpu-moe {p.value} failed for a reason other than memory "
                          f"({p.outcome}: {p.detail or 'see the probe log'}); fix that first, then re-run tune")
    kn = learn(q, estimates, probes)
    budget = q.free_mib - q.margin_mib
    threshold = budget - q.extra_mib - kn.overhead_mib

    # Values that ran and leave the margin (by measurement, else by prediction with a measured constant).
    def acceptable(p: ProbeResult) -> bool:
        if p.outcome != OK:
            return False
        if p.peak_mib is not None:
            return p.peak_mib + q.margin_mib <= q.free_mib
        est = estimates.get(p.value)
        return est is not None and predicted(q, kn, est) <= budget

    good = sorted(p.value for p in probes if acceptable(p))
    best = good[0] if good else None

    lo = q.n_min if kn.max_fail is None else kn.max_fail + 1
    hi = q.n_max if best is None else best - 1
    # A value that ran but broke the margin is settled by its measurement: look above it.
    ran_short = {p.value for p in probes if p.outcome == OK and not acceptable(p)}
    while True:
        cand = smallest_fitting(lo, hi, estimates, threshold) if lo <= hi else None
        if isinstance(cand, NeedEstimate):
            return cand
        if cand is not None and cand in ran_short:
            lo = cand + 1
            continue
        break

    if cand is None:
        if best is not None:
            return Done(best, _why_done(q, kn, best, best, estimates), best, kn.overhead_mib)
        # Nothing is predicted to fit. With an unmeasured constant that may be the constant's fault:
        # measure it once at the top value before giving up.
        top = q.n_max
        tried = {p.value for p in probes}
        if not kn.measured and top not in tried and (kn.max_fail is None or kn.max_fail < top) \
                and len(probes) < q.max_probes:
            if top not in estimates:
                return NeedEstimate(top)
            return Probe(top, predicted(q, kn, estimates[top]))
        if kn.max_fail is not None and kn.max_fail >= top:
            return GiveUp(f"does not fit even with the experts of all {top} layers on the CPU "
                          f"({_outcome_at(probes, top)} at --n-cpu-moe {top}); lower serve.ctx_size, use a "
                          f"quantized KV cache (serve.cache_type_k/v) or lower tune.margin_mib")
        est_top = estimates.get(top)
        need = predicted(q, kn, est_top) if est_top is not None else None
        if kn.min_run is not None and kn.measured:
            return GiveUp(f"only values that break the margin run (the lowest, {kn.min_run}, peaks above "
                          f"{q.free_mib} - {q.margin_mib} MiB); lower tune.margin_mib, serve.ctx_size or the "
                          f"KV cache type")
        return GiveUp(f"does not fit: at --n-cpu-moe {top} (all experts on the CPU) the prediction is "
                      f"{need} MiB + margin {q.margin_mib} MiB > {q.free_mib} MiB free; lower serve.ctx_size, "
                      f"use a quantized KV cache or free GPU memory")

    # A value above one that ran needs less memory, so it runs too: with a measured constant its margin
    # can be decided without another load.
    if kn.min_run is not None and cand > kn.min_run and kn.measured:
        return Done(cand, _why_done(q, kn, cand, kn.min_run, estimates), kn.min_run, kn.overhead_mib)
    if len(probes) >= q.max_probes:
        if best is not None:
            return Done(best, _why_done(q, kn, best, best, estimates) +
                        f"; probe budget ({q.max_probes}) spent before {cand} could be tried", best, kn.overhead_mib)
        return GiveUp(f"no value verified within tune.max_probes = {q.max_probes} (next candidate {cand}, "
                      f"overhead now {kn.overhead_mib} MiB, {kn.source}); re-run tune (the constant learned "
                      f"so far is kept) or raise tune.max_probes")
    return Probe(cand, predicted(q, kn, estimates[cand]))


def _outcome_at(probes: list[ProbeResult], k: int) -> str:
    for p in probes:
        if p.value == k:
            return p.outcome
    return "no fit"


def _why_done(q: Question, kn: Knowledge, k: int, by: int, estimates: dict[int, int]) -> str:
    below = k - 1
    if below < q.n_min:
        return f"{k} runs and is the lowest value"
    tried = kn.max_fail is not None and kn.max_fail >= below
    if tried:
        why_not = f"{below} did not fit (probed)"
    elif below in estimates:
        why_not = (f"{below} is predicted at {predicted(q, kn, estimates[below])} MiB > "
                   f"{q.free_mib - q.margin_mib} MiB ({q.free_mib} free - margin {q.margin_mib})")
    else:
        why_not = f"values below {k} are predicted not to fit"
    runs = "ran in a real probe" if by == k else f"needs less memory than {by}, which ran in a real probe"
    return f"{k} {runs}; {why_not}"


def search(q: Question, estimate: Callable[[int], int], probe: Callable[[int, int], ProbeResult],
           estimates: Optional[dict[int, int]] = None, probes: Optional[list[ProbeResult]] = None,
           max_steps: int = 200) -> tuple[Action, dict[int, int], list[ProbeResult]]:
    """Drive next_action with the two callbacks until Done or GiveUp (used by the runner and the tests)."""
    estimates = dict(estimates or {})
    probes = list(probes or [])
    for _ in range(max_steps):
        act = next_action(q, estimates, probes)
        if isinstance(act, NeedEstimate):
            estimates[act.value] = estimate(act.value)
        elif isinstance(act, Probe):
            r = probe(act.value, act.predicted_mib)
            if r.predicted_mib is None:
                r.predicted_mib = act.predicted_mib
            probes.append(r)
        else:
            return act, estimates, probes
    return GiveUp("search did not converge (internal limit of steps)"), estimates, probes


# --- the largest context at a placement --------------------------------------------------------------

@dataclass(frozen=True)
class CtxQuestion:
    budget_mib: int                       # free - margin - overhead
    lo: int = 512
    hi: int = 262144
    step: int = 256


def largest_ctx(cq: CtxQuestion, estimates: dict[int, int], extra: Callable[[int], int]) -> Union[int, None, NeedEstimate]:
    """The largest context (a multiple of cq.step) whose estimate + assistant extra fits the budget.

    estimates maps ctx -> fit-params device total at the fixed placement; it grows with ctx."""
    def fits(c: int) -> bool:
        return estimates[c] + extra(c) <= cq.budget_mib

    lo, hi = cq.lo // cq.step, cq.hi // cq.step   # in units of step
    for u in (lo, hi):
        if u * cq.step not in estimates:
            return NeedEstimate(u * cq.step)
    if not fits(lo * cq.step):
        return None
    if fits(hi * cq.step):
        return hi * cq.step
    a, b = lo, hi                                  # fits(a), not fits(b)
    while b - a > 1:
        m = (a + b) // 2
        if m * cq.step not in estimates:
            return NeedEstimate(m * cq.step)
        if fits(m * cq.step):
            a = m
        else:
            b = m
    return a * cq.step
