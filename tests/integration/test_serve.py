"""Integration: the serve step for real -- a real llama-server (CPU build of upstream llama.cpp), tiny GGUFs from
testbed.testmodels (a llama MoE target so --n-cpu-moe has experts to move, a dense draft model), real HTTP, the
real log. In the sandbox the server runs as the systemd unit llama-server.service (the sandbox boots systemd):
MainPID, restart after kill -9, the journal, --mlock's capability. On this host (no systemd) it runs under
gpubox's supervisor loop.

Target: GPUBOX_SERVE_TARGET=sandbox runs it in the sandbox (tests/integration/conftest.py's `sandbox`, the
sandbox's gpubox overrides) with the llama-server that the build step built there (build.build_dir): run
`pytest tests/integration/test_build_in_sandbox.py tests/integration/test_serve.py` in one session, since a session resets
the sandbox first. Otherwise (default) on
this host through an Invoke Context with the llama-server that gpubox's build step made here (the `llama_bin`
fixture of tests/conftest.py; GPUBOX_LLAMA_BIN=DIR for your own). Either way the code under test is the same: facts, check,
apply, wait_ready, smoke, logparse, doctor.
"""

from __future__ import annotations

import copy
import os
import re
import socket
import tempfile
import time
from pathlib import Path

import pytest

from provision import config
from provision.engine import CHANGED, OK, Runner, StepError
from provision.facts import gather
from provision.host import Host
from provision.serve import doctor, logparse, service, smoke, step
from testbed.testmodels import write_tiny

pytestmark = pytest.mark.integration

TARGET = os.environ.get("GPUBOX_SERVE_TARGET", "local")
MODE = "systemd" if TARGET == "sandbox" else "supervisor"      # the sandbox boots systemd; this host has none
systemd_only = pytest.mark.skipif(MODE != "systemd", reason="needs the systemd target: GPUBOX_SERVE_TARGET=sandbox")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Target:
    """Where the server runs: an Invoke Context (this host) or a Fabric Connection (the sandbox)."""

    def __init__(self, c, remote_dir: str, build_dir: str, base: dict | None = None):
        self.c, self.dir, self.build_dir = c, remote_dir, build_dir
        self.base = base or config.defaults()["gpubox"]

    def put(self, local: Path, remote: str) -> None:
        if hasattr(self.c, "put"):
            self.c.put(str(local), remote)
        else:
            Path(remote).parent.mkdir(parents=True, exist_ok=True)
            Path(remote).write_bytes(local.read_bytes())

    def cfg(self, name: str, **serve) -> dict:
        g = copy.deepcopy(self.base)
        g["state_dir"] = f"{self.dir}/{name}/state"
        g["report_dir"] = str(Path(os.environ.get("TMPDIR", "/tmp")) / "gpubox-serve-it" / name / "reports")
        g["build"]["build_dir"] = self.build_dir
        g["build"]["cuda"] = False
        g["models"]["dir"] = f"{self.dir}/models"
        g["models"]["files"]["model"]["filename"] = "tiny-moe.gguf"
        g["models"]["files"]["assistant"]["filename"] = "tiny-draft.gguf"
        g["serve"].update(dict(
            port=free_port(), ctx_size=2048, n_cpu_moe=1, n_gpu_layers=99, spec_type="draft-simple", draft_model="assistant",
            cache_type_k="f16", cache_type_v="f16", cache_type_k_draft="f16", cache_type_v_draft="f16",
            override_tensor_draft=[], ready_timeout=120, mlock=True, mmap=False))
        g["serve"].update(serve)
        return config.validate(g)


@pytest.fixture(scope="module")
def target(request, tmp_path_factory):
    local_models = tmp_path_factory.mktemp("models")
    moe = write_tiny(local_models / "tiny-moe.gguf", arch="llama", n_experts=4, seed=0)
    draft = write_tiny(local_models / "tiny-draft.gguf", arch="llama", seed=1)
    broken = write_tiny(local_models / "tiny-unknown-arch.gguf", general_arch="gpubox-no-such-arch", seed=2)
    if TARGET == "sandbox":
        from fabric import Config as FConfig, Connection
        inf = request.getfixturevalue("sandbox")
        fc = FConfig(overrides={"run": {"in_stream": False}}, runtime_ssh_path=inf.ssh_config)
        fc.load_collection(config.defaults())
        fc.load_overrides({"run": {"in_stream": False}, **inf.overrides()})
        conn = Connection("gpubox", config=fc)
        base = config._plain(conn.config.gpubox)
        bd = base["build"]["build_dir"]
        if conn.run(f"test -x {bd}/bin/llama-server", warn=True, hide=True).exited != 0:
            pytest.skip(f"no llama-server built in the sandbox at {bd}/bin: run tests/integration/test_build_in_sandbox.py in "
                        "the same session first (the session resets the sandbox)")
        t = Target(conn, "/var/tmp/gpubox-serve-it", bd, base)
        conn.run(f"rm -rf {t.dir} && mkdir -p {t.dir}/models", hide=True)
    else:
        # This host, with the llama-server that gpubox's build step made here (tests/conftest.py llama_bin).
        server = request.getfixturevalue("llama_bin") / "llama-server"
        from invoke import Config, Context
        c = Context(Config(overrides={"run": {"in_stream": False}}))
        t = Target(c, str(tmp_path_factory.mktemp("serve-target")), str(server.parent.parent))
    for f in (moe, draft, broken):
        t.put(f, f"{t.dir}/models/{f.name}")
    return t


def run_step(t: Target, cfg: dict, plan=False):
    host = Host(t.c)
    rep = Runner(host, cfg, [step], plan=plan, echo=lambda s: None).run()
    return host, rep.steps[0], rep


def facts_of(t: Target, cfg: dict) -> tuple[Host, dict]:
    host = Host(t.c)
    return host, gather(host, cfg, [step])


@pytest.fixture(scope="module")
def served(target):
    cfg = target.cfg("main")
    host, res, rep = run_step(target, cfg)
    yield cfg, res
    h, f = facts_of(target, cfg)
    service.stop(h, cfg, f)


def test_serve_starts_and_proves(target, served):
    cfg, res = served
    assert res.status == CHANGED, res.error
    assert [c["what"] for c in res.changes][-1] == "start llama-server"
    argv = res.info["argv"]
    assert argv[0].endswith("/bin/llama-server") and res.info["dialect"] == "upstream"
    assert "--n-cpu-moe" in argv and "--spec-type" in argv and "draft-simple" in argv
    assert res.info["mode"] == MODE
    assert any("no systemd on this host" in a for a in res.attention) == (MODE == "supervisor")
    host, facts = facts_of(target, cfg)
    assert facts["serve"]["argv"] == argv                                   # the running process IS the command
    r = smoke.smoke(host, cfg["serve"])
    assert r.ok, r.error
    assert r.prompt_n > 0 and r.prompt_per_second > 0 and r.predicted_n > 0 and r.predicted_per_second > 0
    assert r.reply.strip() and r.reply.isprintable()
    assert r.draft_n is not None and r.draft_n > 0                          # the draft model drafted
    print("\n" + r.line())
    assert "tiny-moe.gguf" in " ".join(smoke.models(host, cfg["serve"]))
    log = logparse.parse(service.read_log(host, cfg, facts))
    assert [m.role for m in log.models] == ["target", "draft"]
    assert log.target.path.endswith("tiny-moe.gguf") and log.draft.path.endswith("tiny-draft.gguf")
    assert log.target.model_buffers and log.target.kv_buffers and log.target.compute_buffers
    assert log.ready and log.requests and log.requests[-1].predicted_n == r.predicted_n
    assert log.requests[-1].draft_generated == r.draft_n and log.requests[-1].draft_accepted == r.draft_n_accepted
    findings = doctor.diagnose(log, serve=cfg["serve"], dialect="upstream", facts=facts)
    assert not [f for f in findings if f.severity == "error"], doctor.summary(findings)


def test_second_run_zero_changes(target, served):
    cfg, _ = served
    _, res, rep = run_step(target, cfg)
    assert res.status == OK and res.changes == [] and rep.changed == 0


def test_one_setting_changed_restarts_with_the_new_command(target, served):
    cfg, _ = served
    host, before = facts_of(target, cfg)
    old_pid = before["serve"]["pid"]
    cfg2 = copy.deepcopy(cfg)
    cfg2["serve"]["ctx_size"] = 4096
    _, res, _ = run_step(target, cfg2)
    assert res.status == CHANGED, res.error
    restart = [c for c in res.changes if c["what"].startswith("restart llama-server")]
    assert restart and restart[0]["why"] == "-c 2048 -> 4096"
    _, after = facts_of(target, cfg2)
    assert after["serve"]["pid"] != old_pid
    argv = after["serve"]["argv"]
    assert argv[argv.index("-c") + 1] == "4096"
    assert smoke.http(host, cfg2["serve"], "GET", "/health").status == 200
    # and back, so the module's config is the running one again
    _, res, _ = run_step(target, cfg)
    assert res.status == CHANGED


def listener_pid(host, port) -> str:
    """The pid of the process listening on the port, from `ss -ltnp` on the target."""
    out = host.run(["ss", "-Hltnp", f"sport = :{port}"]).stdout
    m = re.search(r"pid=(\d+)", out)
    assert m, f"nothing listens on port {port}: {out!r}"
    return m.group(1)


def test_a_crashed_server_is_restarted(target, served):
    """kill -9 of the server: systemd (Restart=on-failure) or the supervisor starts it again, with a new pid
    that answers /health."""
    cfg, _ = served
    host, f = facts_of(target, cfg)
    pid = f["serve"]["pid"]
    restarts = int(f["serve"].get("unit_NRestarts") or 0)
    host.run(["kill", "-9", pid], root=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, f2 = facts_of(target, cfg)
        if f2["serve"].get("pid") and f2["serve"]["pid"] != pid and \
                smoke.http(host, cfg["serve"], "GET", "/health").status == 200:
            break
        time.sleep(1)
    else:
        pytest.fail(f"llama-server was not restarted within 30 s ({MODE})")
    print(f"\nkill -9 {pid}: restarted as pid {f2['serve']['pid']} ({MODE})")
    if MODE == "systemd":
        assert f2["serve"]["unit_ActiveState"] == "active" and int(f2["serve"]["unit_NRestarts"]) == restarts + 1
        assert f2["serve"]["unit_MainPID"] == f2["serve"]["pid"] == listener_pid(host, cfg["serve"]["port"])
        unit_log = host.run(["journalctl", "--no-pager", "-u", service.UNIT_NAME], root=True).stdout
        assert "Main process exited, code=killed, status=9/KILL" in unit_log
        assert f2["serve"]["unit_InvocationID"] != f["serve"]["unit_InvocationID"]     # a new start
    else:
        assert "restarting in 5 s" in service.read_log(host, cfg, f2, last=False)


@systemd_only
def test_unit_main_pid_answers_and_the_journal_holds_the_load_lines(target, served):
    cfg, _ = served
    host, f = facts_of(target, cfg)
    assert host.run(["systemctl", "is-active", "llama-server"]).stdout.strip() == "active"
    assert host.run(["systemctl", "is-enabled", "llama-server"]).stdout.strip() == "enabled"
    main = service.main_pid(host)
    assert main == f["serve"]["pid"] == listener_pid(host, cfg["serve"]["port"])
    assert smoke.http(host, cfg["serve"], "GET", "/health").status == 200
    # The journal (all of it, and the current start by its invocation id) holds what doctor parses.
    whole = host.run(["journalctl", "--no-pager", "-o", "cat", "-u", "llama-server"], root=True).stdout
    assert "llama_model_loader: loaded meta data" in whole and service.START_MARKER in whole
    current = service.read_log(host, cfg, f)
    assert current.strip() and current in whole
    assert service.START_MARKER not in current               # cut after this start's marker
    log = logparse.parse(current, target_path=f"{target.dir}/models/tiny-moe.gguf")
    assert log.target and log.target.model_buffers and log.ready
    findings = doctor.diagnose(log, serve=cfg["serve"], dialect="upstream", facts=f)
    assert not [x for x in findings if x.severity == "error"], doctor.summary(findings)


@systemd_only
def test_serve_stop_stops_the_unit_and_the_step_starts_it_again(target, served):
    cfg, _ = served
    host, f = facts_of(target, cfg)
    assert service.stop(host, cfg, f) is True
    assert host.run(["systemctl", "is-active", "llama-server"], check=False).stdout.strip() == "inactive"
    _, f2 = facts_of(target, cfg)
    assert not f2["serve"].get("pid") and f2["serve"]["port"] == "closed"
    assert service.stop(host, cfg, f2) is False                    # nothing was running
    _, res, _ = run_step(target, cfg)
    assert res.status == CHANGED and [c["what"] for c in res.changes] == ["start llama-server"]
    assert service.main_pid(host) == listener_pid(host, cfg["serve"]["port"])


@pytest.mark.parametrize("key,value", [("cache_type_k", "turbo9"), ("ctx_size", 0), ("ctx_size", -4096),
                                       ("ctx_size", "128k"), ("ctx_size", 1.5)])
def test_bad_settings_are_config_errors(key, value):
    g = config.defaults()["gpubox"]
    g["serve"][key] = value
    with pytest.raises(config.ConfigError) as e:
        config.validate(g)
    assert f"gpubox.serve.{key} = {value!r}" in str(e.value)


def _refused(target, cfg, served_cfg) -> str:
    host, before = facts_of(target, served_cfg)
    _, res, _ = run_step(target, cfg)
    _, after = facts_of(target, served_cfg)
    assert res.status == "failed"
    assert after["serve"]["pid"] == before["serve"]["pid"]        # nothing was restarted or started
    return res.error


def test_option_the_binary_lacks_is_an_error_before_start(target, served):
    cfg, _ = served
    bad = copy.deepcopy(cfg)
    bad["serve"]["cache_type_k"] = "turbo3"                       # valid for the fork, not for upstream
    err = _refused(target, bad, cfg)
    assert "serve.cache_type_k = 'turbo3'" in err and "/bin/llama-server" in err and "upstream" in err


def test_missing_model_file_is_an_error_before_start(target, served):
    cfg, _ = served
    bad = copy.deepcopy(cfg)
    bad["models"]["files"]["model"]["filename"] = "no-such-model.gguf"
    err = _refused(target, bad, cfg)
    assert "no-such-model.gguf does not exist" in err and "invoke models" in err


def test_port_in_use_is_an_error_before_start(target, served):
    cfg, _ = served
    if TARGET == "sandbox":
        pytest.skip("the listener would have to run inside the sandbox's namespace")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        bad = copy.deepcopy(cfg)
        bad["serve"]["port"] = s.getsockname()[1]
        err = _refused(target, bad, cfg)
        assert f"port {bad['serve']['port']} on 127.0.0.1 is already in use" in err
    finally:
        s.close()


def test_server_that_exits_during_load_is_reported_with_its_log_lines(target):
    cfg = target.cfg("broken", draft_model="")
    cfg["models"]["files"]["model"]["filename"] = "tiny-unknown-arch.gguf"
    t0 = time.monotonic()
    host, res, _ = run_step(target, cfg)
    took = time.monotonic() - t0
    assert res.status == "failed"
    assert "exited during load" in res.error and "not ready after" not in res.error
    assert "unknown model architecture: 'gpubox-no-such-arch'" in res.error
    assert took < cfg["serve"]["ready_timeout"]
    _, f = facts_of(target, cfg)
    assert not f["serve"].get("pid") and not f["serve"].get("supervisor_pid")   # no restart loop left behind


@systemd_only
def test_mlock_holds_past_the_memlock_limit_and_is_reported_when_it_does_not(target):
    """A model bigger than the 8 MiB memlock limit that the container's systemd cannot raise: the unit's
    AmbientCapabilities=CAP_IPC_LOCK locks it anyway (the kernel's Locked covers the model's host buffer);
    without the capability (a drop-in takes it away) llama.cpp warns, nothing is locked, check() reports it NOT
    locked with that log line, and doctor finds mlock-failed."""
    local = Path(tempfile.mkdtemp(prefix="gpubox-mlock-"))
    big = write_tiny(local / "tiny-big.gguf", arch="llama", n_ff=32768, seed=3)      # ~25 MiB of weights
    target.put(big, f"{target.dir}/models/{big.name}")
    cfg = target.cfg("mlock", draft_model="", mlock=True, mmap=False)
    cfg["models"]["files"]["model"]["filename"] = big.name
    dropin = f"/etc/systemd/system/{service.UNIT_NAME}.d/gpubox-test-no-ipc-lock.conf"
    host = Host(target.c)
    try:
        _, res, _ = run_step(target, cfg)
        assert res.status == CHANGED, res.error
        ml = res.info["mlock"]
        _, f = facts_of(target, cfg)
        limit = int(f["serve"]["memlock_limit"].split()[1])
        assert ml["locked"] and ml["locked_kb"] * 1024 > limit > 0 and ml["locked_kb"] + 8 >= ml["need_kb"] > 0, \
            (ml, limit)
        print(f"\n{ml['line']}")
        host.write_file(dropin, "[Service]\nAmbientCapabilities=\nCapabilityBoundingSet=~CAP_IPC_LOCK\n", root=True)
        host.run(["systemctl", "daemon-reload"], root=True)
        host.run(["systemctl", "restart", service.UNIT_NAME], root=True)
        smoke.wait_ready(host, cfg["serve"], pid=service.main_pid(host), timeout=60,
                         read_log=lambda: "", echo=lambda s: None)
        _, f = facts_of(target, cfg)
        chk = step.check(f, cfg)
        assert chk.info["mlock"]["locked"] is False and chk.info["mlock"]["locked_kb"] == 0
        (w,) = [x for x in chk.warnings if x.startswith("--mlock")]
        assert "NOT (fully) locked" in w and "failed to mlock" in w
        print(w)
        text = service.read_log(host, cfg, f)
        findings = doctor.diagnose(logparse.parse(text), serve=cfg["serve"], dialect="upstream", facts=f)
        assert "mlock-failed" in [x.code for x in findings]
    finally:
        host.run(["rm", "-f", dropin], root=True)
        host.run(["systemctl", "daemon-reload"], root=True)
        _, f = facts_of(target, cfg)
        service.stop(host, cfg, f)
