"""Config values with shell metacharacters never reach a shell unquoted: every command here runs in a
REAL shell, and a value that would create a marker file if it were pasted must not create it."""

import pytest
from invoke import Context, Config

from provision import config, facts
from provision.engine import Runner
from provision.host import Host, cmd, sh
from provision.steps import STEPS


def evil_values(marker):
    m = str(marker)
    return [
        f"/tmp/gpubox-q; touch {m}",
        f"/tmp/gpubox-q$(touch {m})",
        f"/tmp/gpubox-q`touch {m}`",
        f"/tmp/gpubox-q' ; touch {m}; echo '",
        f'/tmp/gpubox-q" ; touch {m}; echo "',
        f"/tmp/gpubox q\ntouch {m}\n",
        f"/tmp/gpubox-q && touch {m} || touch {m}",
        f"/tmp/gpubox-q | touch {m}",
        f"~/gpubox-q;touch {m}",
    ]


def ctx():
    return Context(Config(overrides={"run": {"in_stream": False}}))


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "MARKER"
    yield m
    assert not m.exists(), "a config value reached the shell unquoted"


@pytest.mark.parametrize("i", range(9))
def test_cmd_and_sh_quote_everything(marker, i):
    v = evil_values(marker)[i]
    h = Host(ctx())
    out = h.run(cmd(["printf", "%s", v])).stdout
    assert out == v
    out = h.run(sh("printf '%s' {v} | cat", v=v)).stdout
    assert out == v
    assert h.run(sh("test -e {v}", v=v), check=False).exited == 1


@pytest.mark.parametrize("i", range(9))
def test_write_file_path_and_content(marker, tmp_path, i):
    v = evil_values(marker)[i].replace("/tmp/", "").replace("~/", "").replace("\n", "_")
    target = str(tmp_path / v.replace("/", "_"))
    Host(ctx()).write_file(target, f"content $(touch {marker})\n", mode="0600")
    assert open(target).read() == f"content $(touch {marker})\n"


@pytest.mark.parametrize("i", range(9))
def test_fact_gathering_with_evil_config(marker, i):
    """The whole fact script (core + every step's facts) runs for real with evil paths and user name."""
    v = evil_values(marker)[i]
    cfg = config.defaults()["gpubox"]
    cfg["state_dir"] = v
    cfg["cuda"]["prefix"] = v
    cfg["build"]["src_dir"] = v
    cfg["build"]["build_dir"] = v + "/build"
    cfg["models"]["dir"] = v
    cfg["compiler"]["shim_dir"] = v
    cfg["driver"]["packages"] = [v]
    got = facts.gather(Host(ctx()), cfg, STEPS)
    assert isinstance(got["os"], dict) and got["os"]["id"] != facts.UNKNOWN
    if "\n" not in v:  # (newlines split the line-based df fact: unreadable, but never executed)
        assert v.replace("~", got["home"], 1) in got["disk_free_mib"]


def test_plan_with_evil_settings_runs_and_changes_nothing(marker, tmp_path):
    v = evil_values(marker)[1]
    cfg = config.validate(config.apply_sets(config.defaults()["gpubox"], [
        f"build.src_dir={v}", f"models.dir={v}", f"report_dir={tmp_path}"]))
    rep = Runner(Host(ctx()), cfg, STEPS, plan=True, echo=lambda s: None).run()
    assert len(rep.steps) == 6
