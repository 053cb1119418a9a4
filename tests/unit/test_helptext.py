"""helptext: the REAL recorded `llama-server --help` texts of both fork dialects (and upstream's, recorded from
the CPU build of llama-cpp-python 0.3.36's vendored llama.cpp) -> accepted flags, removed stubs, values, dialect."""

from pathlib import Path

import pytest

from provision.serve import helptext

HELP = Path(__file__).resolve().parent.parent / "data" / "help"
RECIPE = HELP / "llama-server-help.recipe-b0e900a28.txt"
CURRENT = HELP / "llama-server-help.current-b10018-1.2.0.txt"
UPSTREAM = sorted(HELP.glob("llama-server-help.upstream-*.txt"))
TURBO = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1", "turbo2", "turbo3", "turbo4"]


@pytest.fixture(scope="module")
def recipe():
    return helptext.parse(RECIPE.read_text())


@pytest.fixture(scope="module")
def current():
    return helptext.parse(CURRENT.read_text())


def entries(path):
    return sum(1 for l in path.read_text().splitlines() if l.startswith("-") and not l.startswith("-----"))


@pytest.mark.parametrize("path", [RECIPE, CURRENT] + UPSTREAM, ids=lambda p: p.name)
def test_every_entry_is_parsed(path):
    p = helptext.parse(path.read_text())
    assert len(p["options"]) == entries(path)
    assert all(f.startswith("-") and " " not in f for f in p["flags"] | p["removed"])


def test_recipe_dialect(recipe):
    assert recipe["dialect"] == "pre-sync"
    for f in ["--draft-block-size", "--draft-max", "--draft-min", "--mtp-head", "-otd", "--override-tensor-draft",
              "-ctkd", "-ctvd", "-ngld", "--n-cpu-moe", "-fa", "--mlock", "--no-mmap", "-np", "-c", "--host", "--port"]:
        assert helptext.accepts(recipe, f), f
    assert not helptext.accepts(recipe, "--spec-draft-n-max")
    assert recipe["removed"] == set()
    assert recipe["values"]["cache_type"] == TURBO
    assert recipe["values"]["cache_type_draft"] == TURBO
    assert recipe["values"]["spec_type"] == ["none", "draft", "mtp", "nextn", "eagle3", "ngram-cache", "ngram-simple",
                                             "ngram-map-k", "ngram-map-k4v", "ngram-mod"]
    assert recipe["values"]["flash_attn"] == ["on", "off", "auto"]


def test_current_dialect(current):
    assert current["dialect"] == "post-sync"
    assert not helptext.accepts(current, "--draft-block-size")
    # removed-argument stubs exit with an error: listed as removed, never as accepted
    assert {"--draft", "--draft-n", "--draft-max", "--draft-min", "--draft-n-min"} <= current["removed"]
    assert not helptext.accepts(current, "--draft-max")
    for f in ["--spec-draft-n-max", "--spec-draft-n-min", "--mtp-head", "--spec-draft-model", "-md", "-ctkd",
              "--spec-draft-type-k", "-ncmoed", "-lv", "--no-log-prefix"]:
        assert helptext.accepts(current, f), f
    assert "draft-mtp" in current["values"]["spec_type"] and "mtp" not in current["values"]["spec_type"]
    assert current["values"]["cache_type"] == TURBO
    o = current["options"][helptext.canonical(current, "-ctk")]
    assert o["env"] == "LLAMA_ARG_CACHE_TYPE_K" and o["arg"] == "TYPE"


def test_underscore_spelling(current):
    assert helptext.accepts(current, "--n_cpu_moe")
    assert not helptext.accepts(current, "--no_such_flag")


@pytest.mark.skipif(not UPSTREAM, reason="no upstream help recorded in tests/data/help")
def test_upstream_dialect():
    p = helptext.parse(UPSTREAM[0].read_text())
    assert p["dialect"] == "upstream"
    assert not any(v.startswith("turbo") for v in p["values"]["cache_type"])
    assert "draft-mtp" in p["values"]["spec_type"]
    assert not helptext.accepts(p, "--mtp-head")


def test_json_round_trip(tmp_path, current):
    f = tmp_path / helptext.FILENAME
    f.write_text(helptext.to_json(current, binary="/opt/x/bin/llama-server", sha="a6f3d363e"))
    back = helptext.load(f)
    assert back["flags"] == current["flags"] and back["removed"] == current["removed"]
    assert back["values"] == current["values"] and back["dialect"] == "post-sync"
    assert back["binary"] == "/opt/x/bin/llama-server"
    # load() also takes a raw help text
    assert helptext.load(CURRENT)["flags"] == current["flags"]


def test_not_a_help_text():
    p = helptext.parse("error: while loading shared libraries: libggml.so: cannot open shared object file\n")
    assert p["flags"] == set() and p["dialect"] == "unknown"
