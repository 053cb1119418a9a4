"""pair: the rules a Gemma 4 target and its MTP head must meet to be served together, on REAL GGUF files written
by testbed.gemma4 (the mini twin, and its mismatch variants), read by provision/ggufhead.py exactly as the
serve step reads them on the target. The header reader is checked against the `gguf` package's own reader."""

from pathlib import Path

import pytest

from provision.serve import pair
from provision import ggufhead
from testbed import gemma4


def summaries(t: Path, h: Path):
    return ggufhead.summary(str(t)), ggufhead.summary(str(h))


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return summaries(*gemma4.write_pair(tmp_path_factory.mktemp("good")))


@pytest.fixture(scope="module")
def presync(tmp_path_factory):
    return summaries(*gemma4.write_pair(tmp_path_factory.mktemp("presync"), head="presync"))


def written(tmp_path, edit_target=None, edit_head=None, **kw):
    """The mini pair's plan with one key changed (the twin's plan is data), written with the twin's writer."""
    tm, hm = gemma4.pair("mini", **kw)
    if edit_target:
        edit_target(tm)
    if edit_head:
        edit_head(hm)
    return summaries(gemma4.write_model(tm, tmp_path / gemma4.TARGET_FILE),
                     gemma4.write_model(hm, tmp_path / gemma4.HEAD_FILE))


def rules(problems):
    return [p.rule for p in problems]


def test_the_mini_pair_passes_for_post_sync_and_upstream(good):
    t, h = good
    assert pair.check(t, h, dialect="post-sync") == [] and pair.check(t, h, dialect="upstream") == []


def test_header_reader_agrees_with_the_gguf_package(good):
    import gguf
    for s in good:
        r = gguf.GGUFReader(s["path"])
        arch = r.fields["general.architecture"].contents()
        assert s["arch"] == arch
        for key, field in (("embedding_length", "embedding_length"), ("block_count", "block_count"),
                           ("embedding_length_out", "embedding_length_out"),
                           ("nextn_predict_layers", "nextn_predict_layers"),
                           ("sliding_window_pattern", "attention.sliding_window_pattern"),
                           ("head_count_kv", "attention.head_count_kv"), ("key_length_swa", "attention.key_length_swa")):
            f = r.fields.get(f"{arch}.{field}")
            assert s[key] == (f.contents() if f is not None else None), key


def test_presync_head_for_a_post_sync_binary_is_refused_with_the_fix(presync):
    t, h = presync
    (p,) = pair.check(t, h, dialect="post-sync")
    assert p.rule == "arch" and "pre-sync assistant ('gemma4_assistant')" in p.cause and "'gemma4-assistant'" in p.cause
    assert "models.files.assistant.revision" in p.fix and "build.profile=recipe" in p.fix


def test_presync_head_passes_for_a_presync_binary(presync):
    assert pair.check(*presync, dialect="pre-sync") == []


def test_post_sync_head_for_a_presync_binary_is_refused(good):
    (p,) = pair.check(*good, dialect="pre-sync")
    assert p.rule == "arch" and "post-sync assistant" in p.cause and "build.profile=current" in p.fix


def test_head_width_differs_from_the_target(tmp_path):
    t, h = summaries(*gemma4.write_pair(tmp_path, mismatch="width"))
    (p,) = pair.check(t, h, dialect="post-sync")
    assert p.rule == "width" and "made for a target 768 wide" in p.cause and "is 512 wide" in p.cause
    assert "models.files.assistant" in p.fix


def test_presync_head_width_is_n_embd_backbone(tmp_path):
    t, h = summaries(*gemma4.write_pair(tmp_path, head="presync", mismatch="width"))
    assert rules(pair.check(t, h, dialect="pre-sync")) == ["width"]


def test_target_without_the_sliding_full_ending(tmp_path):
    t, h = summaries(*gemma4.write_pair(tmp_path, mismatch="pattern"))
    (p,) = pair.check(t, h, dialect="post-sync")
    assert p.rule == "pattern" and "ends with layers [full, sliding]" in p.cause and "models.files.model" in p.fix


def test_head_kv_geometry_differs(tmp_path):
    def kv(hm):
        hm.array("gemma4-assistant.attention.head_count_kv", [2, 2, 2, 2], "INT32")   # the full layer: 2, not 1
        hm.u32("gemma4-assistant.attention.key_length_swa", 32)
    t, h = written(tmp_path, edit_head=kv)
    problems = pair.check(t, h, dialect="post-sync")
    assert rules(problems) == ["kv", "kv"]
    assert "key_length_swa: head 32, target 64" in problems[0].cause
    assert "head layer 3 (full) has 2 KV heads, the target layer 5 it views has 1" in problems[1].cause


def test_nextn_predict_layers_must_equal_block_count(tmp_path):
    t, h = written(tmp_path, edit_head=lambda hm: hm.u32("gemma4-assistant.nextn_predict_layers", 1))
    (p,) = pair.check(t, h, dialect="upstream")
    assert p.rule == "nextn" and "nextn_predict_layers 1 and block_count 4" in p.cause


def test_a_llama_file_is_no_mtp_head(tmp_path, good):
    from testbed.testmodels import write_tiny
    llama = ggufhead.summary(str(write_tiny(tmp_path / "d.gguf")))
    (p,) = pair.check(good[0], llama, dialect="post-sync")
    assert p.rule == "arch" and "'llama', not an MTP assistant" in p.cause
    (p,) = pair.check(llama, good[1], dialect="post-sync")
    assert p.rule == "arch" and "target" in p.cause
