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


def test_assistant_architecture_follows_the_dialect():
    """pre-sync builds load gemma4_assistant, post-sync and upstream gemma4-assistant; a profile that names another
    (the sandbox's old `llama` stand-in) is a config error."""
    c = cfg()
    c["build"]["profiles"]["up"] = {"sha": "2" * 40, "dialect": "upstream", "assistant_arch": "gemma4-assistant"}
    c["build"]["profile"] = "up"
    assert config.fork_pin(config.validate(c))["assistant_arch"] == "gemma4-assistant"
    c["build"]["profiles"]["up"]["assistant_arch"] = "llama"
    with pytest.raises(config.ConfigError) as e:
        config.validate(c)
    assert "gpubox.build.profiles.up.assistant_arch = 'llama'" in str(e.value) and "'gemma4-assistant'" in str(e.value)
    c["build"]["profiles"]["up"]["assistant_arch"] = "gemma4_assistant"
    with pytest.raises(config.ConfigError, match="the upstream dialect loads an MTP head of architecture .gemma4-assistant."):
        config.validate(c)


def test_explicit_sha_overrides_profile():
    sha = "1" * 40
    c = config.validate(config.apply_sets(cfg(), [f"build.sha={sha}"]))
    assert config.fork_pin(c)["sha"] == sha


# (--set override, key named in the error, words of what is allowed)
BAD = [
    ("serve.n_cpu_moe=-1", "serve.n_cpu_moe", "integer between 0 and 1000"),
    ("serve.n_gpu_layers=lots", "serve.n_gpu_layers", "integer"),
    ("models.files.model.sha256=abc123", "models.files.model.sha256", "64 lowercase hex"),
    ("serve.cache_type_k=turbo9", "serve.cache_type_k", "one of: f32"),
    ("models.dir=Models", "models.dir", "absolute path"),
    ("build.src_dir=relative/src", "build.src_dir", "absolute path"),
    ("build.cuda_architectures=sm_61", "build.cuda_architectures", "'native' or CUDA architecture numbers"),
    ("build.fallback_architectures=native", "build.fallback_architectures", "explicit numbers"),
    ("build.sha=main", "build.sha", "40-hex"),
    ("build.profile=nightly", "build.profile", "one of: recipe, current"),
    ("serve.ctx_size=0", "serve.ctx_size", "integer between 1 and 16777216"),
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
    with pytest.raises(config.ConfigError, match="unknown key 'jbos' in build; did you mean build.jobs"):
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


# --- one list of keys: defaults.yaml and the schema ------------------------------------------------------

def _schema_keys(model, prefix=""):
    from provision import schema
    out = set()
    for name, f in model.model_fields.items():
        key = prefix + name
        sub = schema.model_at(tuple(key.split(".")))
        if schema.is_model(sub):
            out |= _schema_keys(schema._bare(sub), key + ".")
        elif schema.is_map(sub):
            out.add(key + ".*")
        else:
            out.add(key)
    return out


def _defaults_keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        key = prefix + k
        if key in ("build.profiles", "models.files"):
            names = {n for e in v.values() for n in _defaults_keys(e)}
            out.add(key + ".*")
            out |= {f"{key}.*.{n}" for n in names}
        elif isinstance(v, dict):
            out |= _defaults_keys(v, key + ".")
        else:
            out.add(key)
    return out


def test_every_defaults_key_is_in_the_schema_and_back():
    from provision import schema
    have = _defaults_keys(cfg())
    want = _schema_keys(schema.Gpubox)
    for m, key in ((schema.Profile, "build.profiles.*"), (schema.ModelFile, "models.files.*")):
        want |= {f"{key}.{n}" for n in m.model_fields}
    assert have == want, (sorted(have - want), sorted(want - have))
    # and every entry of the two maps carries every key (the schema has no defaults of its own)
    for e in list(cfg()["build"]["profiles"].values()) + list(cfg()["models"]["files"].values()):
        assert set(e) in (set(schema.Profile.model_fields), set(schema.ModelFile.model_fields))


def test_the_schema_has_no_defaults_and_forbids_extra():
    from provision import schema
    for m in (schema.Gpubox, schema.Driver, schema.Cuda, schema.Compiler, schema.Patch, schema.Build,
              schema.Profile, schema.ModelFile, schema.Models, schema.Serve, schema.Tune):
        assert m.model_config["extra"] == "forbid" and m.model_config["strict"] is True
        assert all(f.is_required() for f in m.model_fields.values()), m


def test_target_path_keys_are_all_the_path_keys():
    """on_target resolves every path the target uses; a new path key must be listed there."""
    from provision import schema
    paths = set()
    for key in _schema_keys(schema.Gpubox):
        *head, name = key.split(".")
        model = schema._bare(schema.model_at(tuple(head))) if head else schema.Gpubox
        f = model.model_fields.get(name) if schema.is_model(model) else None
        if f is not None and any(getattr(getattr(m, "func", None), "is_path", False) for m in f.metadata):
            paths.add(tuple(key.split(".")))
    assert paths == set(config.TARGET_PATHS) | set(config.CONTROLLER_PATHS)


# --- layers: environment, files ------------------------------------------------------------------------

def _loaded(tmp_path=None, yaml_text=None, env=None, monkeypatch=None):
    c = Config(project_location=str(tmp_path) if tmp_path else None)
    c.load_collection(tasks.ns.configuration())
    if yaml_text is not None:
        (tmp_path / "invoke.yaml").write_text(yaml_text)
        c.load_project()
    return MockContext(config=c)


def test_env_values_are_yaml_booleans_and_numbers():
    env = {"INVOKE_GPUBOX_BUILD_CUDA": "false", "INVOKE_GPUBOX_MODELS_UPDATE": "no",
           "INVOKE_GPUBOX_BUILD_JOBS": "6", "INVOKE_GPUBOX_SERVE_FLASH_ATTN": "off",
           "INVOKE_GPUBOX_CUDA_PACKAGES": "[cuda-nvcc-12-9]", "INVOKE_GPUBOX_MODELS_FILES_MODEL_REVISION": "v2"}
    got = config.load(_loaded(), environ=env)
    assert got["build"]["cuda"] is False and got["models"]["update"] is False and got["build"]["jobs"] == 6
    assert got["serve"]["flash_attn"] == "off" and got["cuda"]["packages"] == ["cuda-nvcc-12-9"]
    assert got["models"]["files"]["model"]["revision"] == "v2"


def test_env_bad_and_unknown_names_exit_2():
    with pytest.raises(config.ConfigError) as e:
        config.load(_loaded(), environ={"INVOKE_GPUBOX_BUILD_JOBS": "abc"})
    assert "gpubox.build.jobs = 'abc' (from INVOKE_GPUBOX_BUILD_JOBS): must be an integer between 0 and 1024" in str(e.value)
    with pytest.raises(config.ConfigError, match="INVOKE_GPUBOX_BUILD_JBOS: no such gpubox setting; did you mean "
                                                 "INVOKE_GPUBOX_BUILD_JOBS"):
        config.load(_loaded(), environ={"INVOKE_GPUBOX_BUILD_JBOS": "3"})
    # another program's prefix is not ours
    assert config.load(_loaded(), environ={"FABRIC_GPUBOX_BUILD_JBOS": "3"})["build"]["jobs"] == 0


def test_fabric_reads_its_own_prefix():
    from fabric import Config as FConfig
    c = FConfig()
    assert config.env_prefix(c) == "FABRIC_"
    got = config.load(MockContext(config=c), environ={"FABRIC_GPUBOX_BUILD_CUDA": "false", "INVOKE_GPUBOX_BUILD_JOBS": "x"})
    assert got["build"]["cuda"] is False


def test_precedence_files_then_env_then_set(tmp_path):
    c = _loaded(tmp_path, "gpubox:\n  build:\n    jobs: 2\n    mem_per_job_gb: 3\n  serve:\n    port: 9000\n")
    got = config.load(c, ["serve.port=9100"], environ={"INVOKE_GPUBOX_BUILD_JOBS": "4", "INVOKE_GPUBOX_SERVE_PORT": "9050"})
    assert (got["build"]["jobs"], got["build"]["mem_per_job_gb"], got["serve"]["port"]) == (4, 3, 9100)


@pytest.mark.parametrize("text,needle", [
    ("gpubox:\n  state_dir: ~\n", "gpubox.state_dir = None: must be a normalized absolute path"),
    ("gpubox:\n  build: {jobs: [1\n", "is not a config file gpubox reads"),
    ("gpubox: [1, 2]\n", "gpubox = [1, 2] (from the config files): must be a mapping"),
    ("gpubox:\n  stat_dir: /x\n", "gpubox.stat_dir = '/x': unknown key; did you mean state_dir?"),
    ("- a\n- b\n", "must hold a mapping at its top, not list"),
    ("gpubox: {build: {jobs: true}}\n", "gpubox.build.jobs = True: must be an integer"),
    ("gpubox: {models: {files: {model: {sha256: null}}}}\n", 'gpubox.models.files.model.sha256 = None: must be "" or 64'),
    ("gpubox: {models: {files: {extra: {repo: a/b}}}}\n", "gpubox.models.files.extra.filename is missing"),
    ("gpubox:\n  state_dir: \"/srv/x\\n\"\n", "control character"),
    ("gpubox: " + "[" * 200 + "]" * 200 + "\n", "nests deeper than"),
])
def test_bad_invoke_yaml_is_an_error_not_a_traceback(tmp_path, text, needle):
    with pytest.raises(config.ConfigError) as e:
        config.load(_loaded(tmp_path, text), environ={})
    assert needle in str(e.value)


def test_alias_bomb_is_refused_fast(tmp_path):
    import time
    bomb = "a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))
    assert len(bomb) < 400
    t0 = time.monotonic()
    with pytest.raises(config.ConfigError, match="aliases expand to more than"):
        config.load(_loaded(tmp_path, bomb + "gpubox: {}\n"), environ={})
    assert time.monotonic() - t0 < 2
    with pytest.raises(config.ConfigError, match="refers to the node that contains it"):
        config.load(_loaded(tmp_path, "gpubox: &g {x: *g}\n"), environ={})


def test_a_config_file_larger_than_the_limit(tmp_path):
    with pytest.raises(config.ConfigError, match="larger than"):
        config.load(_loaded(tmp_path, "#" * (config.MAX_YAML_BYTES + 10) + "\ngpubox: {}\n"), environ={})


def test_set_text_values_are_taken_as_written():
    got = config.validate(config.apply_sets(cfg(), ["serve.flash_attn=on", "build.sha=" + "1" * 40,
                                                    "models.dir='/srv/my models'"]))
    assert got["serve"]["flash_attn"] == "on" and got["build"]["sha"] == "1" * 40
    assert got["models"]["dir"] == "/srv/my models"
    # YAML would fold the newline into a space: the value is kept and refused instead
    with pytest.raises(config.ConfigError, match="control character"):
        config.validate(config.apply_sets(cfg(), ["models.dir=/srv/a\nb"]))


def test_on_target_resolves_home_and_rechecks():
    c = config.validate(config.apply_sets(cfg(), ["compiler.shim_dir=~/bin", "state_dir=~/.gpubox"]))
    t = config.on_target(c, "/home/u")
    assert t["models"]["dir"] == "/home/u/Models" and t["compiler"]["shim_dir"] == "/home/u/bin"
    assert t["state_dir"] == "/home/u/.gpubox" and t["report_dir"] == c["report_dir"]   # controller side stays
    with pytest.raises(config.ConfigError, match=r"gpubox.compiler.shim_dir = '~/bin' is /bin on the target"):
        config.on_target(c, "/")
    with pytest.raises(config.ConfigError, match="home is not known"):
        config.on_target(c, "unknown")
    with pytest.raises(config.ConfigError, match="quote"):
        config.on_target(c, "/home/o'brien")
