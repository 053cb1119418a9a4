"""render: gpubox's serve settings -> the argv of the built binary's dialect, checked against REAL --help texts.

The `recipe` profile (build.profile=recipe, the pre-sync fork, provision/defaults.yaml serve:) must render
exactly the recipe's command (tests/data/recipe-command.txt, reconstructed from the reference facts), compared
flag by flag."""

import copy
import shlex
from pathlib import Path

import pytest

from provision import config
from provision.serve import helptext, render

DATA = Path(__file__).resolve().parent.parent / "data"
HELP = DATA / "help"
UPSTREAM = sorted(HELP.glob("llama-server-help.upstream-*.txt"))
MODEL = "~/Models/gemma-4-26B-A4B-it-Q4_K_M.gguf"
ASSISTANT = "~/Models/gemma-4-26B-A4B-it-assistant.Q4_K_M.gguf"


def recipe_command() -> list[str]:
    lines = [l for l in (DATA / "recipe-command.txt").read_text().splitlines() if l.strip() and not l.startswith("#")]
    assert len(lines) == 1
    return shlex.split(lines[0])


def pairs(argv):
    """argv[1:] as (flag, value-or-None) pairs: flags start with '-', values never do in these commands."""
    out, i = [], 1
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            out.append((argv[i], argv[i + 1]))
            i += 2
        else:
            out.append((argv[i], None))
            i += 1
    return out


@pytest.fixture
def cfg():
    return config.validate(config.defaults()["gpubox"])


@pytest.fixture(scope="module")
def pre():
    return helptext.load(HELP / "llama-server-help.recipe-b0e900a28.txt")


@pytest.fixture(scope="module")
def post():
    return helptext.load(HELP / "llama-server-help.current-b10018-1.2.0.txt")


def test_recipe_profile_renders_the_recipe_command_flag_by_flag(cfg, pre):
    cfg["build"]["profile"] = "recipe"
    assert config.fork_pin(cfg)["dialect"] == "pre-sync" == pre["dialect"]
    r = render.render(cfg["serve"], pre, binary="llama-server", model_path=MODEL, draft_path=ASSISTANT)
    want = recipe_command()
    got_pairs, want_pairs = pairs(r.argv), pairs(want)
    for i, (g, w) in enumerate(zip(got_pairs, want_pairs)):
        assert g == w, f"flag #{i}: rendered {g}, recipe {w}"
    assert len(got_pairs) == len(want_pairs)
    assert r.argv == want
    assert r.notes == [] and r.dropped == []


def test_post_sync_translation(cfg, post):
    r = render.render(cfg["serve"], post, binary="/opt/gpubox/build/llama.cpp/bin/llama-server",
                      model_path=MODEL, draft_path=ASSISTANT)
    p = dict(pairs(r.argv))
    assert p["--spec-draft-n-max"] == "2"            # block size 3 drafts 2 tokens
    assert p["--spec-draft-n-min"] == "0"
    assert p["--spec-type"] == "draft-mtp"           # the name this binary's --help lists
    assert p["--mtp-head"] == ASSISTANT
    assert p["-lv"] == "4"                           # load_tensors lines need trace level on this dialect
    for gone in ("--draft-block-size", "--draft-max", "--draft-min"):
        assert gone not in p
    assert any("draft_max" in n and "no equivalent" in n for n in r.notes)
    assert all(helptext.accepts(post, f) for f, _ in r.pairs)
    assert p["-ctk"] == p["-ctvd"] == "turbo3" and p["--n-cpu-moe"] == "21"


def test_every_rendered_flag_is_checked(cfg, post):
    crippled = copy.deepcopy(post)
    crippled["flags"].discard("--mlock")
    with pytest.raises(render.RenderError) as e:
        render.render(cfg["serve"], crippled, binary="/b/llama-server", model_path=MODEL, draft_path=ASSISTANT)
    assert "serve.mlock" in str(e.value) and "/b/llama-server" in str(e.value)


def test_value_not_allowed_by_this_binary(cfg, pre):
    cfg["serve"]["flash_attn"] = "auto"
    narrow = copy.deepcopy(pre)
    narrow["values"]["flash_attn"] = ["on", "off"]
    with pytest.raises(render.RenderError, match=r"serve.flash_attn = 'auto'.*allowed: on, off"):
        render.render(cfg["serve"], narrow, binary="x", model_path=MODEL, draft_path=ASSISTANT)


def test_no_draft_model_renders_no_draft_flags(cfg, post):
    cfg["serve"]["draft_model"] = ""
    r = render.render(cfg["serve"], post, binary="x", model_path=MODEL, draft_path="")
    flags = [f for f, _ in r.pairs]
    assert not [f for f in flags if "draft" in f or f in ("--mtp-head", "--spec-type", "-ctkd", "-ctvd", "-ngld")]


def test_setting_change_shows_in_diff(cfg, post):
    a = render.render(cfg["serve"], post, binary="x", model_path=MODEL, draft_path=ASSISTANT).argv
    cfg["serve"]["ctx_size"] = 8192
    cfg["serve"]["mlock"] = False
    b = render.render(cfg["serve"], post, binary="x", model_path=MODEL, draft_path=ASSISTANT).argv
    assert render.diff(a, b) == ["-c 131072 -> 8192", "- --mlock"]
    assert render.diff(a, a) == []


def test_explicit_verbosity(cfg, pre):
    cfg["serve"]["log_verbosity"] = 4
    r = render.render(cfg["serve"], pre, binary="x", model_path=MODEL, draft_path=ASSISTANT)
    assert r.argv[-2:] == ["-lv", "4"]


@pytest.mark.skipif(not UPSTREAM, reason="no upstream help recorded in tests/data/help")
class TestUpstream:
    @pytest.fixture
    def up(self):
        return helptext.load(UPSTREAM[0])

    def test_turbo3_is_an_error_naming_option_and_binary(self, cfg, up):
        with pytest.raises(render.RenderError) as e:
            render.render(cfg["serve"], up, binary="/srv/llama-server", model_path=MODEL, draft_path=ASSISTANT)
        msg = str(e.value)
        assert "serve.cache_type_k = 'turbo3'" in msg and "/srv/llama-server" in msg and "upstream" in msg
        assert "on_missing_option=drop" in msg

    def test_drop_leaves_turbo_out_and_says_so(self, cfg, up):
        cfg["serve"]["on_missing_option"] = "drop"
        r = render.render(cfg["serve"], up, binary="/srv/llama-server", model_path=MODEL, draft_path=ASSISTANT)
        flags = [f for f, _ in r.pairs]
        assert "-ctk" not in flags and "-ctkd" not in flags
        assert len(r.dropped) == 4 and all("turbo3" in d and "left out" in d for d in r.dropped)
        p = dict(r.pairs)
        assert p["--spec-type"] == "draft-mtp" and p["--spec-draft-n-max"] == "2"
        assert "--mtp-head" not in p and p["--spec-draft-model"] == ASSISTANT   # upstream has no --mtp-head
        assert all(helptext.accepts(up, f) for f in flags)

    def test_supported_cache_type_renders(self, cfg, up):
        for k in ("cache_type_k", "cache_type_v", "cache_type_k_draft", "cache_type_v_draft"):
            cfg["serve"][k] = "q8_0"
        r = render.render(cfg["serve"], up, binary="x", model_path=MODEL, draft_path=ASSISTANT)
        assert dict(r.pairs)["-ctk"] == "q8_0" and r.dropped == []

    def test_mlock_and_no_mmap_become_load_mode(self, cfg, up):
        # upstream (llama-cpp-python 0.3.36's llama.cpp) replaced --mlock/--no-mmap with --load-mode
        for k in ("cache_type_k", "cache_type_v", "cache_type_k_draft", "cache_type_v_draft"):
            cfg["serve"][k] = "f16"
        r = render.render(cfg["serve"], up, binary="x", model_path=MODEL, draft_path=ASSISTANT)
        p = dict(r.pairs)
        assert p["--load-mode"] == "mlock" and "--mlock" not in p and "--no-mmap" not in p
        cfg["serve"]["mmap"] = True
        assert dict(render.render(cfg["serve"], up, binary="x", model_path=MODEL, draft_path=ASSISTANT).pairs)[
            "--load-mode"] == "mmap+mlock"
        cfg["serve"]["mlock"] = False
        assert "--load-mode" not in dict(render.render(cfg["serve"], up, binary="x", model_path=MODEL,
                                                       draft_path=ASSISTANT).pairs)


@pytest.mark.parametrize("spec", ["draft-simple", "draft"])
def test_post_sync_refuses_a_plain_draft_with_the_reason(cfg, post, spec):
    """The post-sync fork aborts every request with --spec-type draft-simple (tests/data/logs/
    fork-postsync-b10018-draft-simple-assert.log): refused before launch, the reason and the fix named."""
    cfg["serve"]["spec_type"] = spec
    with pytest.raises(render.RenderError) as e:
        render.render(cfg["serve"], post, binary="/b/llama-server", model_path=MODEL, draft_path=ASSISTANT)
    msg = str(e.value)
    assert f"serve.spec_type = {spec!r}" in msg and "aborts every request" in msg
    assert "GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max)" in msg and "serve.spec_type=mtp" in msg
    assert "post-sync" in msg


def test_plain_draft_still_renders_where_it_works(cfg, pre):
    cfg["serve"]["spec_type"] = "draft"
    p = dict(render.render(cfg["serve"], pre, binary="x", model_path=MODEL, draft_path=ASSISTANT).pairs)
    assert p["--spec-type"] == "draft" and p["--model-draft"] == ASSISTANT


@pytest.mark.skipif(not UPSTREAM, reason="no upstream help recorded in tests/data/help")
def test_upstream_draft_mtp_with_f16_caches_as_the_sandbox_serves(cfg):
    up = helptext.load(UPSTREAM[0])
    for k in ("cache_type_k", "cache_type_v", "cache_type_k_draft", "cache_type_v_draft"):
        cfg["serve"][k] = "f16"
    cfg["serve"]["override_tensor_draft"] = []
    r = render.render(cfg["serve"], up, binary="x", model_path=MODEL, draft_path=ASSISTANT)
    p = dict(r.pairs)
    assert p["--spec-type"] == "draft-mtp" and p["--spec-draft-model"] == ASSISTANT
    cfg["serve"]["spec_type"] = "draft-simple"                  # upstream serves a plain draft: not refused
    assert dict(render.render(cfg["serve"], up, binary="x", model_path=MODEL, draft_path=ASSISTANT).pairs)[
        "--spec-type"] == "draft-simple"
