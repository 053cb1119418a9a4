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
    for line in ("LimitMEMLOCK=infinity", "AmbientCapabilities=CAP_IPC_LOCK", "Restart=on-failure", "User=alice",
                 "ExecStart=/var/lib/gpubox/serve/llama-server.sh",
                 "EnvironmentFile=/var/lib/gpubox/serve/llama-server.env",
                 "SyslogIdentifier=llama-server", "LogRateLimitIntervalSec=0"):
        assert line in unit.splitlines(), line
    assert service.UNIT_PATH == "/etc/systemd/system/llama-server.service"
    assert "StandardOutput" not in unit and "StandardError" not in unit       # the journal keeps the log
    env = files["/var/lib/gpubox/serve/llama-server.env"]
    assert 'LD_LIBRARY_PATH="/opt/gpubox/build/llama.cpp/bin:/usr/local/cuda-12.9/lib64"' in env
    launch = files["/var/lib/gpubox/serve/llama-server.sh"]
    exec_line = [l for l in launch.splitlines() if l.startswith("exec ")][0]
    assert shlex.split(exec_line)[1:] == r.argv                     # the regex survives the quoting
    assert r"token_embd\.weight=CUDA0" in r.argv
    assert r.argv[r.argv.index("-m") + 1] == "/home/alice/Models/gemma-4-26B-A4B-it-Q4_K_M.gguf"
    assert "ulimit -l unlimited" in launch
    assert service.layout(cfg).supervise not in files               # systemd host: no supervisor
    # without --mlock the server gets no capability
    cfg["serve"]["mlock"] = False
    unit = step.wanted(f, cfg)[1][service.UNIT_PATH]
    assert "AmbientCapabilities" not in unit and "LimitMEMLOCK=infinity" in unit.splitlines()


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
                      file_unit=service.sha(files[lay.unit]), pid="4242", argv=r.argv, port="open",
                      unit_UnitFileState="enabled", unit_NeedDaemonReload="no", locked_kb="2048",
                      mlock_need_mib="2.00", memlock_limit="unlimited unlimited")
    chk = step.check(f, cfg)
    assert chk.satisfied and chk.changes == [] and chk.warnings == []
    assert chk.info["mlock"]["locked"] and chk.info["mlock"]["line"].startswith("--mlock: 2.0 MiB locked in RAM")
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


def _satisfied_facts(cfg, systemd="yes"):
    f = facts(systemd=systemd)
    r, files, _ = step.wanted(f, cfg)
    lay = service.layout(cfg, "/home/alice")
    f["serve"].update({"file_" + k: service.sha(files[p]) for k, p in
                       (("launch", lay.launch), ("env", lay.env), ("unit", lay.unit), ("supervise", lay.supervise))
                       if p in files})
    f["serve"].update(pid="4242", argv=r.argv, port="open", unit_UnitFileState="enabled",
                      unit_NeedDaemonReload="no", locked_kb="2048", mlock_need_mib="2.00",
                      memlock_limit="unlimited unlimited")
    return f


def test_systemd_unit_disabled_or_stale_is_a_change(cfg):
    f = _satisfied_facts(cfg)
    f["serve"]["unit_UnitFileState"] = "disabled"
    f["serve"]["unit_NeedDaemonReload"] = "yes"
    chk = step.check(f, cfg)
    assert [c.what for c in chk.changes] == ["enable llama-server.service", "systemctl daemon-reload",
                                            "restart llama-server"]
    assert "would not start at boot" in chk.changes[0].why
    f["serve"]["unit_NeedDaemonReload"] = "no"                 # only disabled: enable, no restart
    assert [c.what for c in step.check(f, cfg).changes] == ["enable llama-server.service"]


def test_mlock_not_held_is_reported_with_the_log_line(cfg):
    f = _satisfied_facts(cfg)
    warn = ("warning: failed to mlock 73400320-byte buffer (after previously locking 0 bytes): "
            "Cannot allocate memory")
    f["serve"].update(locked_kb="0", mlock_need_mib="70.00", memlock_limit="8388608 8388608", mlock_warning=warn)
    chk = step.check(f, cfg)
    assert chk.satisfied                                       # the server runs: a warning, not a change
    (w,) = chk.warnings
    assert w.startswith("--mlock: the model is NOT (fully) locked in RAM (0.0 of 70.0 MiB locked; log: " + warn)
    assert "8388608 8388608" in w and "AmbientCapabilities=CAP_IPC_LOCK" in w
    assert chk.info["mlock"]["locked"] is False
    # part of it locked (a second buffer refused): still not locked
    f["serve"]["locked_kb"] = str(8 * 1024)
    assert "8.0 of 70.0 MiB locked" in step.check(f, cfg).warnings[0]
    # no buffer sizes in the log, no warning, nothing locked: not locked
    f["serve"].update(locked_kb="0", mlock_need_mib="0", mlock_warning="")
    assert "(0 kB locked;" in step.check(f, cfg).warnings[0]
    # the supervisor's fix names ulimit
    fs = _satisfied_facts(cfg, systemd="no")
    fs["serve"].update(locked_kb="0", mlock_warning=warn)
    assert "ulimit -l unlimited" in step.check(fs, cfg).warnings[0]
    # --mlock not asked for: nothing to say
    cfg["serve"]["mlock"] = False
    f2 = _satisfied_facts(cfg)
    f2["serve"]["locked_kb"] = "0"
    chk = step.check(f2, cfg)
    assert chk.info["mlock"] is None and chk.warnings == []


def test_llama_cpp_warning_with_everything_locked_is_locked_with_the_warning_named(cfg):
    """llama.cpp rounds the range it locks up to whole pages past its buffer; the kernel may lock the buffer's
    mapping and refuse the rest (ENOMEM): Locked covers the buffers, so it is locked, and the report says both."""
    f = _satisfied_facts(cfg)
    warn = "warning: failed to mlock 25313280-byte buffer (after previously locking 0 bytes): Cannot allocate memory"
    f["serve"].update(locked_kb="24720", mlock_need_mib="24.14", mlock_warning=warn)
    chk = step.check(f, cfg)
    assert chk.warnings == [] and chk.info["mlock"]["locked"] is True
    assert "24.1 MiB locked in RAM" in chk.info["mlock"]["line"] and warn in chk.info["mlock"]["line"]


def test_fact_snippet_reads_the_supervisors_pid_locked_memory_and_the_last_starts_mlock_lines(cfg, tmp_path):
    """The fact snippet run for real by bash on this machine (no systemd here: the supervisor branch)."""
    cfg["state_dir"] = str(tmp_path)
    d = tmp_path / "serve"
    d.mkdir()
    proc = subprocess.Popen(["sleep", "30"])
    try:
        (d / "llama-server.pid").write_text(f"{proc.pid}\n")
        marker = service.START_MARKER
        (d / "llama-server.log").write_text(
            f"{marker} 2026-01-01T00:00:00Z pid 1 uid 0\nwarning: failed to mlock 1-byte buffer: old start\n"
            "load_tensors:          CPU model buffer size =    99.00 MiB\n"
            f"{marker} 2026-01-01T00:01:00Z pid 2 uid 0\nload_tensors: loading\n"
            "warning: failed to mlock 73400320-byte buffer (after previously locking 0 bytes): Cannot allocate memory\n"
            "warning: failed to mlock 5-byte buffer: a later line of the same start\n"
            "load_tensors:          CPU model buffer size =    24.14 MiB\n"
            "load_tensors:   CPU_Mapped model buffer size =     1.50 MiB\n"
            "load_tensors:        CUDA0 model buffer size =  1000.00 MiB\n")
        r = subprocess.run(["bash", "-c", service.fact_snippet(cfg)], capture_output=True, text=True)
        got = service.parse_fact(r.stdout, r.returncode)
    finally:
        proc.kill()
        proc.wait()
    assert got["pid"] == str(proc.pid) and got["argv"] == ["sleep", "30"]
    assert got["locked_kb"] == "0"
    assert float(got["mlock_need_mib"]) == pytest.approx(25.64)          # host-side buffers only, this start
    assert got["memlock_limit"].split()[0] in ("unlimited",) or got["memlock_limit"].split()[0].isdigit()
    assert got["mlock_warning"].startswith("warning: failed to mlock 73400320-byte buffer")
    assert "unit_ActiveState" not in got                        # no systemd on this machine
