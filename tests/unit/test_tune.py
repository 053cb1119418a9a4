"""tune: the placement search on recorded probe outcomes (facts in, decisions out), the probe's outcome
classification on real log texts and on a real CPU llama-server, the state file, the GGUF header reader,
and `invoke tune` on this host, which has no GPU.

The recorded data is docs/tuning.md (one H200 capped to 8192 MiB free, synthetic 30B-A3B
shape, 48 layers, 324 MiB of experts per layer, overhead constant 682 MiB):

    context 576, f16 KV:   0-24 OOM at load (exit 1); 28 loads, then CUDA OOM on the first batch (exit 134);
                           29 = floor, peak 7988; 30/31/32: 7664/7340/7016; 36/40/44/48: 5720/4424/3128/1832
    context 32k, f16 KV (3072 MiB):  floor 38;   context 32k, q8_0 KV (1632 MiB): floor 34, 33 aborted.

The peaks fall by exactly 324 MiB per layer, so measured(k) = 7988 - 324 (k - 29), and docs/tuning.md says the
fit-params estimate was measured - 682 at every value tried: estimate(k) = 7306 - 324 (k - 29) at 576.
docs/tuning.md did not record 25-27 (its coarse sweep stepped by 4): the oracle below treats them as OOM at load,
like 24. At 32k the KV grows from 54 MiB (576) to 3072 (f16) / 1632 (q8_0) MiB, the compute estimate is
taken as unchanged; with that the "estimate + 682 <= free" rule reproduces both recorded floors.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision import config, ggufhead
from provision.tune import probe as P, runner as R, search as S, state as ST
from provision.tune.report import table

REPO = Path(__file__).resolve().parents[2]
FREE = 8192
OVERHEAD = 682
LAYER = 324


def estimate_576(k: int) -> int:
    return 7306 - LAYER * (k - 29)


def estimate_32k(k: int, kv: str) -> int:
    return estimate_576(k) + {"f16": 3072, "q8_0": 1632}[kv] - 54


class Oracle:
    """A recorded machine: answers a probe with the outcome docs/tuning.md recorded (or that its rule implies)."""

    def __init__(self, est, *, recorded_fail: dict[int, str] | None = None, load_fail_form=S.OOM_LOAD,
                 peaks=True, free=FREE):
        self.est, self.recorded, self.form, self.peaks, self.free = est, recorded_fail or {}, load_fail_form, peaks, free
        self.calls: list[int] = []
        self.estimates_asked: list[int] = []

    def estimate(self, k: int) -> int:
        self.estimates_asked.append(k)
        return self.est(k)

    def truth(self, k: int) -> str:
        if k in self.recorded:
            return self.recorded[k]
        return S.OK if self.est(k) + OVERHEAD <= self.free else self.form

    def probe(self, k: int, predicted: int) -> S.ProbeResult:
        self.calls.append(k)
        out = self.truth(k)
        if out == S.OK:
            return S.ProbeResult(k, S.OK, peak_mib=(self.est(k) + OVERHEAD) if self.peaks else None,
                                 seconds=8.0, gen_tps=60 + 0.5 * (48 - k), prompt_tps=400.0)
        return S.ProbeResult(k, out, seconds=1.0 if out == S.OOM_LOAD else 2.0,
                             detail="cudaMalloc failed: out of memory" if out == S.OOM_LOAD else "CUDA error: out of memory")

    def floor(self, lo=0, hi=48) -> int:
        return next(k for k in range(lo, hi + 1) if self.truth(k) == S.OK)


# context 576: the table as recorded
REC_576 = {**{k: S.OOM_LOAD for k in range(0, 28)}, 28: S.ABORT}


def oracle_576(**kw) -> Oracle:
    return Oracle(estimate_576, recorded_fail=REC_576, **kw)


def run(oracle: Oracle, **q) -> tuple[S.Action, dict, list[S.ProbeResult]]:
    question = S.Question(free_mib=oracle.free, n_max=48, **q)
    return S.search(question, oracle.estimate, oracle.probe)


# --- the recorded table itself ------------------------------------------------------------------------------

def test_recorded_table_is_consistent_with_the_rule():
    """measured = estimate + 682 reproduces every recorded peak, and the rule predicts both boundaries."""
    recorded = {29: 7988, 30: 7664, 31: 7340, 32: 7016, 36: 5720, 40: 4424, 44: 3128, 48: 1832}
    for k, peak in recorded.items():
        assert estimate_576(k) + OVERHEAD == peak
    assert estimate_576(28) + OVERHEAD > FREE >= estimate_576(29) + OVERHEAD
    assert oracle_576().floor() == 29
    assert Oracle(lambda k: estimate_32k(k, "f16")).floor() == 38
    assert Oracle(lambda k: estimate_32k(k, "q8_0")).floor() == 34


# --- the search on the recorded 576-token table -----------------------------------------------------------

@pytest.mark.parametrize("stored, why", [
    (None, "first run on this machine: prior 1024 MiB"),
    (682, "the right constant"),
    (200, "WRONG, too low: first candidate is below the floor"),
    (0, "WRONG, zero"),
    (500, "WRONG, low: the candidate is 28, which loads and aborts on its first batch"),
    (2000, "WRONG, too high: first candidate far above the floor"),
    (5000, "WRONG, absurdly high"),
])
def test_576_finds_the_floor_with_at_most_three_probes(stored, why):
    o = oracle_576()
    act, est, probes = run(o, margin_mib=0, overhead_mib=stored)
    assert isinstance(act, S.Done), (why, act)
    assert act.value == 29, (why, [(p.value, p.outcome) for p in probes])   # the floor, never below
    assert o.truth(act.value) == S.OK and act.by == 29
    assert len(probes) <= 3, (why, o.calls)
    assert len(o.estimates_asked) <= 8, (why, o.estimates_asked)
    kn = S.learn(S.Question(free_mib=FREE, n_max=48, overhead_mib=stored), est, probes)
    assert kn.measured and kn.overhead_mib == OVERHEAD      # the constant is learned from the probe
    if stored not in (None, OVERHEAD):
        assert kn.corrections, why                         # the misprediction was detected and corrected


def test_runtime_abort_at_28_counts_as_does_not_fit():
    """With a constant of 500 MiB, 28 is predicted to fit (7630 + 500 <= 8192): it loads, then exit 134 on
    the first batch. That abort must count as 'does not fit' and 28 must never be the answer."""
    o = oracle_576()
    act, est, probes = run(o, margin_mib=0, overhead_mib=500)
    assert probes[0].value == 28 and probes[0].outcome == S.ABORT
    assert isinstance(act, S.Done) and act.value == 29
    kn = S.learn(S.Question(free_mib=FREE, n_max=48, overhead_mib=500), est, probes[:1])
    assert kn.max_fail == 28 and kn.overhead_mib > 500


@pytest.mark.parametrize("form", [S.OOM_LOAD, S.OOM_KV, S.ABORT, S.SEGFAULT, S.OOM_RUN])
def test_every_out_of_memory_form_is_no_fit(form):
    o = Oracle(estimate_576, load_fail_form=form)
    act, _, probes = run(o, margin_mib=0, overhead_mib=0)
    assert probes[0].outcome == form
    assert isinstance(act, S.Done) and act.value == 29


def test_never_chooses_an_unprobed_value_below_a_failure_even_with_a_wrong_constant():
    """Sweep many wrong constants: the answer is always a value that ran (never below the floor), within one
    layer above it, and the search never needs more than 3 probes."""
    for stored in [None] + list(range(0, 6001, 97)):
        o = oracle_576()
        act, _, probes = run(o, margin_mib=0, overhead_mib=stored)
        assert isinstance(act, S.Done), (stored, act)
        assert o.truth(act.value) == S.OK
        assert 29 <= act.value <= 30, (stored, act.value)
        assert len(probes) <= 3, (stored, [(p.value, p.outcome) for p in probes])


@pytest.mark.parametrize("margin, want", [(0, 29), (100, 29), (204, 29), (205, 30), (256, 30), (528, 30), (529, 31),
                                          (1000, 32)])
def test_margin_keeps_free_memory(margin, want):
    """peak(29) = 7988 leaves 204 MiB; peak(30) = 7664 leaves 528."""
    o = oracle_576()
    act, _, probes = run(o, margin_mib=margin, overhead_mib=OVERHEAD)
    assert isinstance(act, S.Done) and act.value == want, (margin, act, [(p.value, p.outcome, p.peak_mib) for p in probes])
    assert estimate_576(act.value) + OVERHEAD + margin <= FREE
    assert len(probes) <= 3


def test_margin_with_a_wrong_constant_uses_the_measurement():
    o = oracle_576()
    act, _, probes = run(o, margin_mib=256, overhead_mib=200)
    assert isinstance(act, S.Done) and act.value == 30 and len(probes) <= 3


# --- the floor moves with the context and the KV type -------------------------------------------------------

@pytest.mark.parametrize("kv, floor, recorded", [("f16", 38, {}), ("q8_0", 34, {33: S.ABORT})])
@pytest.mark.parametrize("stored", [None, 682, 200, 2000])
def test_32k_context(kv, floor, recorded, stored):
    o = Oracle(lambda k: estimate_32k(k, kv), recorded_fail=recorded)
    assert o.floor() == floor
    act, _, probes = run(o, margin_mib=0, overhead_mib=stored)
    assert isinstance(act, S.Done) and floor <= act.value <= floor + 1, (kv, stored, act)
    assert o.truth(act.value) == S.OK
    assert len(probes) <= 3


def test_the_constant_learned_at_576_answers_32k_in_one_probe():
    o1 = oracle_576()
    act1, est1, pr1 = run(o1, margin_mib=0, overhead_mib=None)
    learned = S.learn(S.Question(free_mib=FREE, n_max=48), est1, pr1).overhead_mib
    o2 = Oracle(lambda k: estimate_32k(k, "f16"))
    act2, _, pr2 = run(o2, margin_mib=0, overhead_mib=learned)
    assert act2.value == 38 and len(pr2) == 1


# --- assistant head, missing peak readings, limits -------------------------------------------------------------

def test_assistant_extra_moves_the_floor():
    """An assistant of 600 MiB (weights + KV) that fit-params cannot see: about two layers more on the CPU."""
    extra = 600
    o = Oracle(lambda k: estimate_576(k) + extra)          # the real machine carries the assistant
    q = S.Question(free_mib=FREE, n_max=48, margin_mib=0, extra_mib=extra, overhead_mib=OVERHEAD)
    act, _, probes = S.search(q, estimate_576, o.probe)    # fit-params' estimate does not include it
    assert act.value == o.floor() == 31 and len(probes) == 1


def test_without_peak_readings_the_search_still_converges_safely():
    o = oracle_576(peaks=False)
    for stored in (None, 200, 2000):
        act, _, probes = run(o, margin_mib=0, overhead_mib=stored)
        assert isinstance(act, S.Done) and o.truth(act.value) == S.OK and act.value >= 29, stored
        assert len(probes) <= 4


def test_does_not_fit_at_all_gives_up_with_the_fix():
    o = Oracle(lambda k: estimate_32k(k, "f16"), free=2000)
    act, _, probes = run(o, margin_mib=0, overhead_mib=OVERHEAD)
    assert isinstance(act, S.GiveUp)
    assert "ctx_size" in act.reason and len(probes) <= 1


def test_everything_fits_gives_zero():
    o = Oracle(estimate_576, free=80000)
    act, _, probes = run(o, margin_mib=0, overhead_mib=OVERHEAD)
    assert act.value == 0 and len(probes) == 1


def test_a_probe_budget_too_small_never_answers_an_unverified_value():
    o = oracle_576()
    act, _, probes = run(o, margin_mib=0, overhead_mib=0, max_probes=1)
    assert len(probes) == 1 and probes[0].outcome != S.OK
    assert isinstance(act, S.GiveUp) and "max_probes" in act.reason


def test_budget_spent_after_a_success_answers_the_verified_value():
    o = oracle_576()
    act, _, probes = run(o, margin_mib=0, overhead_mib=5000, max_probes=1)
    assert isinstance(act, S.Done) and act.value == probes[0].value and "budget" in act.reason


@pytest.mark.parametrize("outcome", [S.ERROR, S.TIMEOUT])
def test_a_failure_that_is_not_memory_stops_the_search(outcome):
    def probe(k, pred):
        return S.ProbeResult(k, outcome, detail="error: invalid argument: --bogus")
    q = S.Question(free_mib=FREE, n_max=48, overhead_mib=OVERHEAD)
    act, _, probes = S.search(q, estimate_576, probe)
    assert isinstance(act, S.GiveUp) and len(probes) == 1 and "--bogus" in act.reason


def test_smallest_fitting_matches_brute_force_on_uneven_tables():
    """Real models need not be uniform (different layer sizes, compute noise): compare with brute force."""
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 60)
        vals, v = [], rng.randint(5000, 30000)
        for _ in range(n + 1):
            vals.append(v)
            v -= rng.choice([0, 1, 50, 300, 324, 700])
        thr = rng.randint(min(vals) - 200, max(vals) + 200)
        est: dict[int, int] = {}
        asked = 0
        while True:
            a = S.smallest_fitting(0, n, est, thr)
            if isinstance(a, S.NeedEstimate):
                est[a.value] = vals[a.value]
                asked += 1
                continue
            break
        want = next((k for k in range(n + 1) if vals[k] <= thr), None)
        assert a == want, (vals, thr, a, want)


def test_linear_table_needs_few_estimates():
    est: dict[int, int] = {}
    calls = 0
    while True:
        a = S.smallest_fitting(0, 48, est, FREE - OVERHEAD)
        if isinstance(a, S.NeedEstimate):
            est[a.value] = estimate_576(a.value)
            calls += 1
            continue
        break
    assert a == 29 and calls <= 4


def test_largest_context():
    # 96 KiB per token of f16 KV (48 layers x 4 heads x 128 x 2 x 2 bytes) on top of 4000 MiB
    def e(ctx):
        return 4000 + ctx * 96 // 1024
    est: dict[int, int] = {}
    cq = S.CtxQuestion(budget_mib=7000, lo=512, hi=131072, step=256)
    while True:
        a = S.largest_ctx(cq, est, lambda c: 0)
        if isinstance(a, S.NeedEstimate):
            est[a.value] = e(a.value)
            continue
        break
    assert e(a) <= 7000 < e(a + 256) and len(est) <= 12


def test_table_prints_every_probe():
    o = oracle_576()
    _, _, probes = run(o, margin_mib=0, overhead_mib=200)
    text = table([vars(p) for p in probes], "probes:")
    assert text.count("\n") == len(probes) + 1
    assert "oom-load" in text and "7988" in text and "predicted MiB" in text


# --- probe outcome classification on real texts ------------------------------------------------------------
# The lines are the fork's own (docs/fork.md, docs/tuning.md).

LOAD_OOM_LOG = """\
0.00.812.113 E ggml_backend_cuda_buffer_type_alloc_buffer: allocating 7290.00 MiB on device 0: cudaMalloc failed: out of memory
0.00.812.120 E alloc_tensor_range: failed to allocate CUDA0 buffer of size 7644119040
0.00.812.700 E llama_model_load: error loading model: unable to allocate CUDA0 buffer
0.00.813.001 E srv  llama_server: exiting due to model loading error
"""
ABORT_LOG = """\
srv  llama_server: model loaded
srv  llama_server: listening on http://127.0.0.1:18080
slot launch_slot_: id  0 | task 0 | processing task
CUDA error: out of memory
  current device: 0, in function alloc at ggml/src/ggml-cuda/ggml-cuda.cu:470
/src/ggml/src/ggml-cuda/ggml-cuda.cu:88: CUDA error
"""
# Real, from the CPU build with its address space capped (test_real_allocation_failure_is_out_of_memory).
CPU_ALLOC_LOG = """\
0.00.409.307 E ggml_aligned_malloc: insufficient memory (attempted to allocate 261.01 MB)
0.00.409.335 E ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size 273690656
0.00.409.340 E ggml_gallocr_reserve_n_impl: failed to allocate CPU buffer of size 273690656
0.00.409.341 E graph_reserve: failed to allocate compute buffers
0.00.449.264 E llama_init_from_model: failed to initialize the context: failed to allocate compute pp buffers
"""
KV_LOG = """\
llama_kv_cache: CUDA0 KV buffer size =  3072.00 MiB
E llama_init_from_model: failed to allocate buffer for kv cache
"""


@pytest.mark.parametrize("state, rc, log, want", [
    ("exited", 1, LOAD_OOM_LOG, S.OOM_LOAD),
    ("died", 134, ABORT_LOG, S.ABORT),
    ("exited", 139, KV_LOG, S.SEGFAULT),
    ("exited", 1, KV_LOG, S.OOM_KV),
    ("exited", 1, CPU_ALLOC_LOG, S.OOM_KV),
    ("exited", 1, "error: invalid argument: --draft-block-size\n", S.ERROR),
    ("exited", 1, "E gguf_init_from_file: failed to read magic\nllama_model_load: error loading model\n", S.ERROR),
    ("timeout", None, "loading...\n", S.TIMEOUT),
])
def test_classify(state, rc, log, want):
    outcome, detail = P.classify(P.Raw(state=state, rc=rc, log=log))
    assert outcome == want
    if want in S.NO_FIT or want == S.ERROR:
        assert detail


def test_parse_probe_output():
    out = ("@@state ok\n@@rc 0\n@@http 200\n@@base 74000\n@@peak 81988\n@@times 1.0 4.5 9.0 9.5\n@@response\n"
           '{"content":"x","timings":{"prompt_n":512,"prompt_per_second":401.5,"predicted_n":32,'
           '"predicted_per_second":61.2}}\n\n@@log\nsrv  llama_server: model loaded\n')
    raw = P.parse_output(out)
    r = P.to_result(29, raw, 9.5)
    assert (r.outcome, r.peak_mib, r.gen_tps, r.prompt_tps) == (S.OK, 7988, 61.2, 401.5)


# --- a real probe on the CPU build (the same script the GPU run uses) ---------------------------------------



@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    sys.path.insert(0, str(REPO / "bench"))
    import synth_moe
    path = tmp_path_factory.mktemp("moe") / "synth2.gguf"
    a = synth_moe.parser().parse_args([str(path), "--layers", "2", "--embd", "256", "--experts", "8",
                                       "--experts-used", "2", "--ff-exp", "256", "--ff", "512", "--heads", "4",
                                       "--kv-heads", "2", "--head-dim", "64", "--vocab", "2048"])
    synth_moe.write(path, a)
    return path


def _host():
    from provision.host import Host
    from provision.tune.local import LocalContext
    return Host(LocalContext())


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_real_probe_runs_a_batch_and_generates(llama_bin, tiny_moe, tmp_path):
    port = _free_port()
    argv = [str(llama_bin / "llama-server"), "-m", str(tiny_moe), "-c", "576", "-ncmoe", "1", "-np", "1",
            "-t", "2", "--host", "127.0.0.1", "--port", str(port)]
    ps = P.ProbeSettings(workdir=str(tmp_path), port=port, ready_timeout=120, request_timeout=120,
                         prompt_tokens=P.prompt_tokens_for(576, 16, 512), gen_tokens=16, vocab=2048)
    r, raw = P.run_probe(_host(), 1, argv, ps)
    assert r.outcome == S.OK, (raw.state, raw.rc, raw.log[-2000:])
    resp = json.loads(raw.response)
    assert resp["timings"]["prompt_n"] == 512 and resp["timings"]["predicted_n"] == 16
    assert r.gen_tps and r.prompt_tps and r.seconds > 0
    assert (tmp_path / "k1" / "server.log").exists()


def test_real_probe_bad_flag_is_an_error_not_a_memory_verdict(llama_bin, tiny_moe, tmp_path):
    port = _free_port()
    argv = [str(llama_bin / "llama-server"), "-m", str(tiny_moe), "--draft-block-size", "3",
            "--host", "127.0.0.1", "--port", str(port)]
    r, raw = P.run_probe(_host(), 0, argv, P.ProbeSettings(workdir=str(tmp_path), port=port, ready_timeout=60))
    assert r.outcome == S.ERROR and "draft-block-size" in r.detail


def test_real_allocation_failure_is_out_of_memory(llama_bin, tiny_moe, tmp_path):
    """The CPU build's own allocation failure (address space capped with ulimit -v, a 256k context): a real
    start-up failure, classified as does-not-fit. Which form it takes depends on where the allocation fails:
    'failed to allocate compute pp buffers' (exit 1) or GGML_ASSERT(ctx->mem_buffer != NULL) (exit 134)."""
    port = _free_port()
    argv = ["bash", "-c", 'ulimit -v 600000; exec "$@"', "x", str(llama_bin / "llama-server"), "-m", str(tiny_moe),
            "-c", "262144", "-t", "2", "--host", "127.0.0.1", "--port", str(port)]
    r, raw = P.run_probe(_host(), 0, argv, P.ProbeSettings(workdir=str(tmp_path), port=port, ready_timeout=60))
    assert r.outcome in (S.OOM_KV, S.ABORT), (r.outcome, r.detail, raw.log[-1500:])
    assert "failed to allocate" in r.detail or "mem_buffer" in r.detail


# --- state file and cache key ------------------------------------------------------------------------------

GPU = {"name": "NVIDIA GeForce GTX 1080", "driver": "580.95.05", "vram_mib": 8192}
SERVE = {"ctx_size": 131072, "cache_type_k": "turbo3", "cache_type_v": "turbo3", "flash_attn": "on",
         "n_gpu_layers": 99, "parallel": 1, "override_tensor": [], "draft_model": "assistant", "spec_type": "mtp",
         "n_gpu_layers_draft": 99, "n_cpu_moe_draft": 0, "cache_type_k_draft": "turbo3",
         "cache_type_v_draft": "turbo3", "override_tensor_draft": ["token_embd\\.weight=CUDA0"], "draft_block_size": 3}


def _key(gpu=GPU, model="size+mtime 1 2", serve=SERVE, margin=256, server="3 4"):
    return ST.cache_key(ST.cache_fields(gpu, model, "5 6", server, serve, True, margin))


@pytest.mark.parametrize("change", [
    {"gpu": dict(GPU, name="NVIDIA GeForce RTX 3060")}, {"gpu": dict(GPU, driver="580.99.01")},
    {"model": "size+mtime 1 3"}, {"serve": dict(SERVE, ctx_size=65536)}, {"serve": dict(SERVE, cache_type_k="q8_0")},
    {"serve": dict(SERVE, cache_type_v_draft="f16")}, {"margin": 512},
])
def test_cache_key_changes_with_what_changes_the_answer(change):
    assert _key(**change) != _key()


def test_cache_key_ignores_what_does_not():
    assert _key(serve=dict(SERVE, port=9999, mlock=False, n_cpu_moe=5)) == _key()


def test_state_roundtrip_and_serve_reads_the_current_value():
    doc = ST.empty()
    res = {"key": "k", "n_cpu_moe": 23, "valid_for": json.loads(json.dumps(ST.valid_for(SERVE, True)))}
    doc["current"] = res
    back = ST.parse(ST.dumps(doc))
    assert ST.tuned_n_cpu_moe(back, SERVE, True) == 23
    assert ST.tuned_n_cpu_moe(back, dict(SERVE, ctx_size=65536), True) is None   # tuned for another context
    assert ST.parse("not json") == ST.empty() and ST.parse("") == ST.empty()


def test_state_keeps_the_current_and_the_newest_results():
    doc = ST.empty()
    doc["results"] = {f"k{i}": {"key": f"k{i}", "when": f"2026-01-{i + 10:02d}"} for i in range(12)}
    doc["current"] = doc["results"]["k0"]                       # the oldest, but current
    kept = ST.trim(doc)["results"]
    assert len(kept) == ST.KEEP_RESULTS and "k0" in kept and "k11" in kept and "k1" not in kept


# --- GGUF header ------------------------------------------------------------------------------------------

def test_ggufhead_agrees_with_the_gguf_package(tiny_moe):
    import gguf
    s = ggufhead.summary(str(tiny_moe))
    r = gguf.GGUFReader(str(tiny_moe))
    assert s["arch"] == "qwen3moe" and s["block_count"] == 2 and s["expert_count"] == 8 and s["n_vocab"] == 2048
    assert s["n_tensors"] == len(r.tensors)
    by_name = {t.name: int(t.n_bytes) for t in r.tensors}
    exp0 = sum(v for k, v in by_name.items() if k.startswith("blk.0.") and "_exps" in k)
    assert s["expert_bytes"]["0"] - exp0 < 32 * 3          # sizes from offsets include <32 bytes of padding
    assert abs(s["tensor_bytes"] - sum(by_name.values())) < 32 * len(by_name)


def test_assistant_size_from_the_header(tiny_moe):
    s = ggufhead.summary(str(tiny_moe))
    a = ggufhead.assistant_mib(s, ctx=32768, type_k="f16", type_v="f16")
    # 2 layers x 2 KV heads x 64 (K) + 64 (V) x 2 bytes x 32768 tokens = 32 MiB
    assert a["kv_mib"] == 32
    with_embd = ggufhead.assistant_mib(s, ctx=32768, type_k="f16", type_v="f16",
                                       overrides=["token_embd\\.weight=CUDA0"])
    assert with_embd["weights_mib"] >= a["weights_mib"]
    assert ggufhead.assistant_mib(s, ctx=32768, type_k="q8_0", type_v="q8_0")["kv_mib"] == 17


def test_ggufhead_runs_as_a_script_like_on_the_target(tiny_moe):
    out = subprocess.run([sys.executable, "-c", Path(ggufhead.__file__).read_text(), str(tiny_moe), "/nonexistent.gguf"],
                         capture_output=True, text=True, check=True).stdout
    lines = [json.loads(x) for x in out.splitlines()]
    assert lines[0]["block_count"] == 2 and "error" in lines[1]


# --- `invoke tune` on a host with no GPU -----------------------------------------------------------------

@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this host has nvidia-smi")
def test_tune_without_a_gpu_says_so_and_changes_nothing(tmp_path):
    state = tmp_path / "state"
    reports = tmp_path / "reports"
    p = subprocess.run([sys.executable, "-m", "invoke", "tune", "--set", f"state_dir={state}",
                        "--set", f"report_dir={reports}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert "no NVIDIA GPU is visible" in p.stderr and "nothing was changed" in p.stderr
    assert not state.exists() and not reports.exists()


def test_state_is_written_atomically_and_read_back(tmp_path):
    """write_state goes through Host.write_file (temp file + rename) on a real shell; read_state parses it."""
    from provision.host import Host
    from provision.tune import runner
    from provision.tune.local import LocalContext
    host = Host(LocalContext())
    doc = ST.empty()
    doc["current"] = {"n_cpu_moe": 33}
    path = runner.write_state(host, str(tmp_path / "state"), doc)
    assert runner.read_state(host, str(tmp_path / "state"))["current"] == {"n_cpu_moe": 33}
    assert oct((tmp_path / "state" / "tune.json").stat().st_mode & 0o777) == "0o644"
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["tune.json"]   # no temp file left
    assert path.endswith("/state/tune.json")


def _plan_summary(model) -> dict:
    """ggufhead.summary's shape from a twin plan (testbed.gemma4: tensor sizes as data, nothing written)."""
    import re as _re
    layer, other = {}, {}
    for t in model.tensors:
        m = _re.match(r"blk\.(\d+)\.", t.name)
        if m:
            layer[m.group(1)] = layer.get(m.group(1), 0) + t.nbytes
        else:
            other[t.name] = t.nbytes
    return {"arch": model.arch, "block_count": model.value(f"{model.arch}.block_count"), "layer_bytes": layer,
            "other_bytes": other, "expert_bytes": {}}


def test_mtp_head_size_matches_the_real_assistant_placement():
    """The full twin's heads (real 26B-A4B assistant shapes and Q4_K_M types): pre-sync the real load lines say
    CUDA0 82.24 MiB (token_embd 210 MiB on the CPU, the 3.09 MiB pre-projection in CUDA_Host); with -otd the
    embedding joins CUDA0; post-sync the output copy is on the GPU anyway. No KV of its own (it views the
    target's), whatever the context and cache types."""
    from testbed import gemma4
    _, pre = gemma4.pair("full", head="presync")
    _, post = gemma4.pair("full", head="mtp")
    a = ggufhead.assistant_mib(_plan_summary(pre), ctx=131072, type_k="turbo3", type_v="turbo3")
    assert a == {"weights_mib": 83, "kv_mib": 0, "total_mib": 83}                   # 82.24 rounded up
    otd = ggufhead.assistant_mib(_plan_summary(pre), ctx=131072, type_k="turbo3", type_v="turbo3",
                                 overrides=["token_embd\\.weight=CUDA0"])
    assert otd["weights_mib"] == 293                                                  # + 210.00
    b = ggufhead.assistant_mib(_plan_summary(post), ctx=131072, type_k="turbo3", type_v="turbo3")
    assert b["kv_mib"] == 0 and b["weights_mib"] == 296                             # + 210 copy + 3.09 pre-proj
    assert ggufhead.assistant_mib(_plan_summary(post), ctx=131072, type_k="f16", type_v="f16",
                                  n_gpu_layers=0)["weights_mib"] == 0


def test_mtp_head_size_from_a_real_mini_file(tmp_path):
    from testbed import gemma4
    _, h = gemma4.write_pair(tmp_path, only="head")
    s = ggufhead.summary(str(h))
    a = ggufhead.assistant_mib(s, ctx=4096, type_k="f16", type_v="f16")
    assert a["kv_mib"] == 0 and a["weights_mib"] == -(-s["tensor_bytes"] // (1 << 20))


@pytest.mark.parametrize("variant", ["rigged", "random"])
def test_real_speed_check_with_the_mini_gemma4_pair_and_draft_mtp(llama_bin, tmp_path, variant):
    """The tuner's speed check on this CPU with the mini Gemma 4 twin and its MTP head: the probe command is the
    serve renderer's (--spec-type draft-mtp, the head via --spec-draft-model), one request with and one without
    drafting; a rigged head is always accepted, a random one never. (Speeds here are a 2-core CPU's.)"""
    from testbed import gemma4
    model, head = gemma4.write_pair(tmp_path / "pair", variant=variant)
    serve = dict(config.defaults()["gpubox"]["serve"])
    serve.update(ctx_size=2048, n_cpu_moe=1, cache_type_k="f16", cache_type_v="f16", cache_type_k_draft="f16",
                 cache_type_v_draft="f16", override_tensor_draft=[], flash_attn="auto", spec_type="mtp")
    inp = R.Inputs(bin_dir=str(llama_bin), model=str(model), draft=str(head), serve=serve, state_dir=str(tmp_path),
                   probe_port=_free_port(), workdir=str(tmp_path / "work"), speed_tokens=48, ready_timeout=120,
                   request_timeout=120)
    host = _host()
    parsed = R._help(host, inp.server)
    argv = R.server_argv(inp, parsed, 1, drafting=True)
    assert argv[argv.index("--spec-type") + 1] == "draft-mtp" and argv[argv.index("--spec-draft-model") + 1] == str(head)
    assert "--spec-type" not in R.server_argv(inp, parsed, 1, drafting=False)
    ps = P.ProbeSettings(workdir=inp.workdir, port=inp.probe_port, ready_timeout=120, request_timeout=120,
                         prompt_tokens=64, gen_tokens=16, vocab=gemma4.N_VOCAB["mini"])
    lines = []
    out = R.speed_check(host, inp, parsed, 1, ps, lines.append)
    w, wo = out["with_mtp"], out["without_mtp"]
    assert w["outcome"] == wo["outcome"] == S.OK, lines
    assert w["draft_n"] and w["draft_n"] > 0 and wo["draft_n"] in (None, 0)
    assert w["draft_accepted"] == (w["draft_n"] if variant == "rigged" else 0)
    assert out["mtp_speedup"] > 0 and any("the MTP head changes generation speed" in l for l in lines)
    print("\n" + "\n".join(lines))
