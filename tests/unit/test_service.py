"""service + the serve step's pure check(): the files rendered from templates/, and what check() decides from facts
(the recorded post-sync --help stands in for the binary; no commands run)."""

import copy
import shlex
import subprocess
from pathlib import Path

import pytest

from provision import config
from provision.engine import StepError
from provision.serve import render, service, step
from provision import ggufhead, remote

HELP = Path(__file__).resolve().parent.parent / "data" / "help"
_PAIR: dict = {}


def pair_headers(**kw) -> dict:
    """The serve_gguf fact for a REAL mini twin pair (testbed.gemma4), summarized as the target's python3 does."""
    key = tuple(sorted(kw.items()))
    if key not in _PAIR:
        import tempfile
        from testbed import gemma4
        d = tempfile.mkdtemp(prefix="gpubox-twin-")
        t, h = gemma4.write_pair(d, **kw)
        _PAIR[key] = {"target": ggufhead.summary(str(t)), "head": ggufhead.summary(str(h))}
    return copy.deepcopy(_PAIR[key])


@pytest.fixture
def cfg():
    g = config.defaults()["gpubox"]
    g["user"] = "alice"
    return config.validate(g)


def facts(systemd="yes", **serve):
    sf = {"binary": "yes", "model_readable": "yes", "draft_readable": "yes", "port": "closed",
          "help": (HELP / "llama-server-help.current-b10018-1.2.0.txt").read_text()}
    sf.update(serve)
    return {"serve": sf, "home": "/home/alice", "user": {"name": "alice", "uid": 1000}, "systemd": systemd,
            "serve_gguf": pair_headers()}


def wanted_argv(cfg, f):
    return step.wanted(f, cfg)[0].argv


def test_unit_and_launch_files(cfg):
    f = facts()
    r, files, _ = step.wanted(f, cfg)
    unit = files[service.UNIT_PATH]
    for line in ("LimitMEMLOCK=infinity", "Restart=on-failure", "User=alice",
                 "ExecStart=/var/lib/gpubox/serve/llama-server.sh",
                 "EnvironmentFile=/var/lib/gpubox/serve/llama-server.env",
                 "StandardError=append:/var/lib/gpubox/serve/llama-server.log"):
        assert line in unit.splitlines(), line
    env = files["/var/lib/gpubox/serve/llama-server.env"]
    assert 'LD_LIBRARY_PATH="/opt/gpubox/build/llama.cpp/bin:/usr/local/cuda-12.9/lib64"' in env
    launch = files["/var/lib/gpubox/serve/llama-server.sh"]
    exec_line = [l for l in launch.splitlines() if l.startswith("exec ")][0]
    assert shlex.split(exec_line)[1:] == r.argv                     # the regex survives the quoting
    assert r"token_embd\.weight=CUDA0" in r.argv
    assert r.argv[r.argv.index("-m") + 1] == "/home/alice/Models/gemma-4-26B-A4B-it-Q4_K_M.gguf"
    assert "ulimit -l unlimited" in launch
    assert service.layout(cfg).supervise not in files               # systemd host: no supervisor


def test_scripts_are_valid_bash(cfg, tmp_path):
    files = step.wanted(facts(systemd="no"), cfg)[1]
    for path, text in files.items():
        if path.endswith(".sh"):
            p = tmp_path / Path(path).name
            p.write_text(text)
            assert subprocess.run(["bash", "-n", str(p)]).returncode == 0, path


def test_no_systemd_gives_a_supervisor_that_drops_to_the_user(cfg):
    files = step.wanted(facts(systemd="no"), cfg)[1]
    assert service.UNIT_PATH not in files
    sup = files["/var/lib/gpubox/serve/llama-server-supervise.sh"]
    assert "setpriv --reuid=alice --regid=alice --init-groups -- /var/lib/gpubox/serve/llama-server.sh" in sup
    assert "restarting in 5 s" in sup and "giving up" in sup


def test_check_not_running_starts(cfg):
    chk = step.check(facts(), cfg)
    assert not chk.satisfied
    assert [c.what for c in chk.changes][-1] == "start llama-server"
    assert chk.info["dialect"] == "post-sync" and chk.info["mode"] == "systemd"


def test_check_satisfied_when_files_and_process_match(cfg):
    f = facts()
    r, files, _ = step.wanted(f, cfg)
    lay = service.layout(cfg, "/home/alice")
    f["serve"].update(file_launch=service.sha(files[lay.launch]), file_env=service.sha(files[lay.env]),
                      file_unit=service.sha(files[lay.unit]), pid="4242", argv=r.argv, port="open")
    chk = step.check(f, cfg)
    assert chk.satisfied and chk.changes == []
    # one setting changed: restart, and the why says what changed
    cfg2 = copy.deepcopy(cfg)
    cfg2["serve"]["n_cpu_moe"] = 24
    chk = step.check(f, cfg2)
    assert [c.what for c in chk.changes] == ["write /var/lib/gpubox/serve/llama-server.sh",
                                            "restart llama-server with the new command"]
    assert chk.changes[-1].why == "--n-cpu-moe 21 -> 24"


def test_check_refuses_before_start(cfg):
    with pytest.raises(StepError, match="no llama-server at /opt/gpubox/build/llama.cpp/bin/llama-server"):
        step.check(facts(binary=""), cfg)
    with pytest.raises(StepError, match="gemma-4-26B-A4B-it-assistant.Q4_K_M.gguf does not exist"):
        step.check(facts(draft_readable=""), cfg)
    with pytest.raises(StepError, match="port 8080 on 127.0.0.1 is already in use by another process"):
        step.check(facts(port="open"), cfg)
    up = facts()
    up["serve"]["help"] = up["serve"]["help"].replace("turbo2, turbo3, turbo4", "")
    with pytest.raises(StepError, match=r"serve.cache_type_k = 'turbo3'"):
        step.check(up, cfg)


def test_drop_is_reported_as_a_warning(cfg):
    up = facts()
    up["serve"]["help"] = up["serve"]["help"].replace("turbo2, turbo3, turbo4", "")
    cfg["serve"]["on_missing_option"] = "drop"
    chk = step.check(up, cfg)
    assert len(chk.warnings) == 4 and all("left out" in w for w in chk.warnings)
    assert "-ctk" not in chk.info["argv"]


def test_no_draft_model(cfg):
    cfg["serve"]["draft_model"] = ""
    argv = wanted_argv(cfg, facts(draft_readable=""))
    assert "--mtp-head" not in argv and "-ngld" not in argv


def _tuned(cfg, n, **changed):
    """A tune.json document as `invoke tune` writes it, answered for cfg's serve settings (+ changes)."""
    from provision.tune import state
    serve = dict(cfg["serve"], **changed)
    drafting = bool(serve["draft_model"]) and serve["spec_type"] != "none"
    doc = state.empty()
    doc["current"] = {"n_cpu_moe": n, "valid_for": state.valid_for(serve, drafting)}
    return state.parse(state.dumps(doc))


def test_tuned_value_replaces_the_configured_one(cfg):
    f = facts()
    f["tune_state"] = _tuned(cfg, 23)
    r = step.wanted(f, cfg)[0]
    assert r.argv[r.argv.index("--n-cpu-moe") + 1] == "23"
    assert r.notes[0] == "serve.n_cpu_moe 21 -> 23: the value `invoke tune` chose for these settings"


def test_tuned_value_for_other_settings_is_ignored(cfg):
    f = facts()
    f["tune_state"] = _tuned(cfg, 23, ctx_size=32768)      # tuned at another context: stale
    r = step.wanted(f, cfg)[0]
    assert r.argv[r.argv.index("--n-cpu-moe") + 1] == "21"
    f["tune_state"] = {"garbage": True}                   # unreadable state: the config applies
    assert step.wanted(f, cfg)[0].argv == r.argv


def test_mtp_pair_is_checked_before_start(cfg):
    """The serve step's preflight: the pair rules on both GGUF headers, refused with the fix; nothing starts."""
    f = facts()
    f["serve_gguf"] = pair_headers(mismatch="width")
    with pytest.raises(StepError) as e:
        step.check(f, cfg)
    msg = str(e.value)
    assert "cannot be served together by this post-sync llama-server; nothing was started" in msg
    assert "- width: the head" in msg and "fix: use the assistant published with this model" in msg
    f["serve_gguf"] = pair_headers(head="presync")
    with pytest.raises(StepError, match=r"pre-sync assistant \('gemma4_assistant'\) but the built llama-server is "
                                        r"post-sync"):
        step.check(f, cfg)
    f["serve_gguf"] = {}                          # the headers could not be read: refused, not skipped
    with pytest.raises(StepError, match="could not read the GGUF headers"):
        step.check(f, cfg)


def test_no_pair_check_without_the_mtp_head(cfg):
    f = facts()
    f["serve_gguf"] = {}
    cfg["serve"]["spec_type"] = "none"
    assert step.check(f, cfg).changes
    cfg["serve"]["spec_type"], cfg["serve"]["draft_model"] = "mtp", ""
    assert step.check(f, cfg).changes


def test_gguf_fact_reads_both_files_quoted(cfg):
    cmd = step._gguf_fact(cfg)
    argv = shlex.split(cmd.split("|| exit 0; ", 1)[1])
    # provision/remote.py's form: python3 -c BOOT <ggufhead, packed> print_summaries FILE FILE
    assert argv[:5] == remote.argv([ggufhead], "print_summaries")
    assert argv[5:] == ["$GPUBOX_HOME/Models/gemma-4-26B-A4B-it-Q4_K_M.gguf",
                        "$GPUBOX_HOME/Models/gemma-4-26B-A4B-it-assistant.Q4_K_M.gguf"]
    cfg["serve"]["spec_type"] = "none"
    assert step._gguf_fact(cfg) == "true"


def test_api_key_file_is_rendered_as_a_flag_and_checked_first():
    g = config.defaults()["gpubox"]
    g["user"] = "alice"
    g["serve"].update(host="0.0.0.0", api_key_file="/etc/gpubox/api-key")
    cfg = config.validate(g)
    f = facts(api_key_stat="600 alice 65")
    argv = wanted_argv(cfg, f)
    assert argv[argv.index("--api-key-file") + 1] == "/etc/gpubox/api-key" and "--api-key" not in argv
    for stat_, needle in ((None, "does not exist"), ("640 alice 65", "others can read the key"),
                          ("600 root 65", "owned by root"), ("600 alice 0", "is empty")):
        f = facts(**({"api_key_stat": stat_} if stat_ else {}))
        with pytest.raises(StepError, match=needle):
            step.wanted(f, cfg)
    # without a key file on a network address the configuration itself is refused
    g["serve"]["api_key_file"] = ""
    with pytest.raises(config.ConfigError, match="serve.api_key_file"):
        config.validate(g)
