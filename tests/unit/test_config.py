"""Configuration: defaults validate; every bad value is an error naming key, value and what is allowed;
exit status 2 with no command run on the host."""

import re

import pytest
from invoke import Exit, MockContext, Config

from provision import config

from provision import tasks


def cfg():
    return config.defaults()["gpubox"]


def test_defaults_are_valid_and_pinned():
    c = config.validate(cfg())
    pin = config.fork_pin(c)
    assert pin["sha"] == "a6f3d363e4c6a672803d0e6e036f8a75cf43d0ae"
    assert pin["dialect"] == "post-sync" and pin["assistant_arch"] == "gemma4-assistant"
    assert c["cuda"]["version"] == "12.9" and c["compiler"]["major"] == 14 and c["driver"]["branch"] == "580xx"


def test_recipe_profile_pins_pre_sync():
    c = config.apply_sets(cfg(), ["build.profile=recipe"])
    pin = config.fork_pin(config.validate(c))
    assert pin["sha"].startswith("b0e900a28") and pin["dialect"] == "pre-sync"


def test_explicit_sha_overrides_profile():
    sha = "1" * 40
    c = config.validate(config.apply_sets(cfg(), [f"build.sha={sha}"]))
    assert config.fork_pin(c)["sha"] == sha


# (--set override, key named in the error, words of what is allowed)
BAD = [
    ("serve.n_cpu_moe=-1", "serve.n_cpu_moe", "integer >= 0"),
    ("serve.n_gpu_layers=lots", "serve.n_gpu_layers", "integer"),
    ("models.files.model.sha256=abc123", "models.files.model.sha256", "64 lowercase hex"),
    ("serve.cache_type_k=turbo9", "serve.cache_type_k", "one of: f32"),
    ("models.dir=Models", "models.dir", "absolute path"),
    ("build.src_dir=relative/src", "build.src_dir", "absolute path"),
    ("build.cuda_architectures=sm_61", "build.cuda_architectures", "'native' or CUDA architecture numbers"),
    ("build.fallback_architectures=native", "build.fallback_architectures", "explicit numbers"),
    ("build.sha=main", "build.sha", "40-hex"),
    ("build.profile=nightly", "build.profile", "one of: recipe, current"),
    ("serve.ctx_size=0", "serve.ctx_size", "integer >= 1"),
    ("serve.port=70000", "serve.port", "between 1 and 65535"),
    ("serve.flash_attn=yes", "serve.flash_attn", "one of: on, off, auto"),
    ("cuda.packages=[cuda-nvcc-12-9, cuda]", "cuda.packages", "pulls NVIDIA's driver"),
    ("driver.lock=maybe", "driver.lock", "true or false"),
    ("build.jobs=-3", "build.jobs", "integer between 0"),
    ("models.files.assistant.repo=not a repo", "models.files.assistant.repo", "repo id"),
    ("serve.spec_type=telepathy", "serve.spec_type", "one of"),
    ("cuda.repo_baseurl=ftp://x y", "cuda.repo_baseurl", "URL"),
    ("serve.draft_model=nothere", "serve.draft_model", "one of models.files"),
]


@pytest.mark.parametrize("override,key,allowed", BAD, ids=[b[1] for b in BAD])
def test_bad_value_names_key_value_and_allowed(override, key, allowed):
    with pytest.raises(config.ConfigError) as e:
        config.validate(config.apply_sets(cfg(), [override]))
    msg = str(e.value)
    assert f"gpubox.{key} = " in msg
    assert override.split("=", 1)[1].split(",")[0].strip("[") in msg  # the value is shown
    assert allowed in msg
    assert e.value.exit_code == 2


def test_unknown_set_key_is_an_error():
    with pytest.raises(config.ConfigError, match="unknown key 'jbos'"):
        config.apply_sets(cfg(), ["build.jbos=3"])
    with pytest.raises(config.ConfigError, match="expected KEY=VALUE"):
        config.apply_sets(cfg(), ["build.jobs"])


def test_unknown_step_name():
    with pytest.raises(config.ConfigError, match="step name 'drivers' is unknown: allowed are driver, cuda"):
        config.select_steps("drivers", None)
    assert config.select_steps("build,driver", None) == ["driver", "build"]
    assert config.select_steps(None, ["models", "driver"]) == ["cuda", "compiler", "patch", "build"]


def test_several_problems_reported_together():
    with pytest.raises(config.ConfigError) as e:
        config.validate(config.apply_sets(cfg(), ["serve.port=0", "build.jobs=-1", "models.dir=x"]))
    assert len(e.value.problems) == 3


def _ctx():
    c = Config(overrides={"run": {"in_stream": False}})
    c.load_collection(tasks.ns.configuration())
    # MockContext with no prepared results: ANY command raises NotImplementedError.
    return MockContext(config=c, run={}, sudo={})


@pytest.mark.parametrize("override", [b[0] for b in BAD])
def test_task_exits_2_and_runs_nothing(override):
    c = _ctx()
    with pytest.raises(Exit) as e:
        tasks.plan(c, set=[override])
    assert e.value.code == 2
    assert c.run.call_count == 0 and c.sudo.call_count == 0


def test_task_bad_step_name_exits_2_and_runs_nothing():
    c = _ctx()
    with pytest.raises(Exit) as e:
        tasks.provision(c, only="drivr")
    assert e.value.code == 2 and c.run.call_count == 0


def test_invoke_yaml_layer_overrides_defaults(tmp_path):
    """Users override through Invoke's own files: a project invoke.yaml beats the defaults."""
    (tmp_path / "invoke.yaml").write_text("gpubox:\n  build:\n    jobs: 6\n  serve:\n    port: 9090\n")
    c = Config(project_location=str(tmp_path))
    c.load_collection(tasks.ns.configuration())
    c.load_project()
    got = config.load(MockContext(config=c))
    assert got["build"]["jobs"] == 6 and got["serve"]["port"] == 9090
    assert got["build"]["targets"] == ["llama-server", "llama-bench", "llama-fit-params"]


def test_env_var_layer(monkeypatch):
    monkeypatch.setenv("INVOKE_GPUBOX_BUILD_JOBS", "5")
    c = Config()
    c.load_collection(tasks.ns.configuration())
    c.load_shell_env()
    assert config.load(MockContext(config=c))["build"]["jobs"] == 5
