"""Integration: the serve step for real -- a real llama-server (CPU build of upstream llama.cpp) serving the mini
Gemma 4 twin pair from testbed.gemma4 (a gemma4 MoE target, so --n-cpu-moe has experts to move, and its
gemma4-assistant MTP head) with --spec-type draft-mtp, real HTTP, the real log. In the sandbox the server runs
as the systemd unit llama-server.service (the sandbox boots systemd): MainPID, restart after kill -9, the
journal, --mlock's capability. On this host (no systemd) it runs under gpubox's supervisor loop. A rigged
head makes draft acceptance 1.0 on purpose, a random one 0; mismatched pairs are refused before launch; a
server killed with SIGABRT in the middle of the smoke request is reported as an abort with its log lines.

Targets (both by default; GPUBOX_SERVE_TARGET=local or =sandbox for one): `sandbox`, the sandbox over SSH
(tests/integration/conftest.py's `sandbox`, its gpubox overrides) with the llama-server that gpubox's build step
built there (built here first when an earlier module of the session has not); `local`, this host through an
Invoke Context with the llama-server that gpubox's build step made here (the `llama_bin` fixture of
tests/conftest.py; GPUBOX_LLAMA_BIN=DIR for your own). Either way the code under test is the same: facts, check,
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
from testbed import gemma4
from testbed.testmodels import write_tiny

pytestmark = pytest.mark.integration

# Where the server runs: both by default (this host: gpubox's supervisor loop; the sandbox: its systemd runs the
# unit), or the one named by GPUBOX_SERVE_TARGET.
TARGETS = [t for t in os.environ.get("GPUBOX_SERVE_TARGET", "local,sandbox").split(",") if t]


def systemd_only(t) -> None:
    if t.mode != "systemd":
        pytest.skip("needs a host that runs systemd (the sandbox target)")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Target:
    """Where the server runs: an Invoke Context (this host) or a Fabric Connection (the sandbox)."""

    def __init__(self, c, remote_dir: str, build_dir: str, base: dict | None = None, mode: str = "supervisor"):
        self.c, self.dir, self.build_dir, self.mode = c, remote_dir, build_dir, mode
        self.base = base or config.defaults()["gpubox"]

    def put(self, local: Path, remote: str) -> None:
        if hasattr(self.c, "put"):
            self.c.put(str(local), remote)
        else:
            Path(remote).parent.mkdir(parents=True, exist_ok=True)
            Path(remote).write_bytes(local.read_bytes())

    def cfg(self, name: str, models: str = "models", **serve) -> dict:
        """Settings for a run named `name` over the pair in models dir `models` (see PAIRS)."""
        g = copy.deepcopy(self.base)
        g["state_dir"] = f"{self.dir}/{name}/state"
        g["report_dir"] = str(Path(os.environ.get("TMPDIR", "/tmp")) / "gpubox-serve-it" / name / "reports")
        g["build"]["build_dir"] = self.build_dir
        g["build"]["cuda"] = False
        g["models"]["dir"] = f"{self.dir}/{models}"
        g["serve"].update(dict(
            port=free_port(), ctx_size=2048, n_cpu_moe=1, n_gpu_layers=99, spec_type="mtp", draft_model="assistant",
            cache_type_k="f16", cache_type_v="f16", cache_type_k_draft="f16", cache_type_v_draft="f16",
            override_tensor_draft=[], ready_timeout=120, mlock=True, mmap=False))
        g["serve"].update(serve)
        return config.validate(g)


# Model dirs on the target: the mini twin pair (real file names) in several variants, and a broken file.
PAIRS = {"models": {}, "random": {"variant": "random"}, "width": {"mismatch": "width"},
         "pattern": {"mismatch": "pattern"}, "presync": {"head": "presync"}}


@pytest.fixture(scope="module", params=TARGETS)
def target(request, tmp_path_factory):
    local = tmp_path_factory.mktemp("models")
    files = {}
    for d, kw in PAIRS.items():
        t, h = gemma4.write_pair(local / d, **kw)
        files.update({f"{d}/{t.name}": t, f"{d}/{h.name}": h})
    files["broken/tiny-unknown-arch.gguf"] = write_tiny(local / "tiny-unknown-arch.gguf",
                                                        general_arch="gpubox-no-such-arch", seed=2)
    if request.param == "sandbox":
        from fabric import Config as FConfig, Connection
        inf = request.getfixturevalue("sandbox")
        fc = FConfig(overrides={"run": {"in_stream": False}}, runtime_ssh_path=inf.ssh_config)
        fc.load_collection(config.defaults())
        fc.load_overrides({"run": {"in_stream": False}, **inf.overrides()})
        conn = Connection("gpubox", config=fc)
        base = config._plain(conn.config.gpubox)
        bd = base["build"]["build_dir"]
        if conn.run(f"test -x {bd}/bin/llama-server", warn=True, hide=True).exited != 0:
            # Not built by an earlier module of this session (a reset drops it): gpubox's own build step builds
            # it (the persistent ccache makes that a few minutes).
            from provision.steps import build as build_step
            bcfg = config.load(conn, ["build.targets=[llama-server]",
                                      f"report_dir={tmp_path_factory.mktemp('serve-build-reports')}"])
            res = Runner(Host(conn), bcfg, [build_step], echo=lambda s: None).run().steps[0]
            assert res.status in (CHANGED, OK), res.error
        t = Target(conn, "/var/tmp/gpubox-serve-it", bd, base, mode="systemd")   # the sandbox boots systemd
        # One unit per host: an earlier module (the demo) may have left it running with its own settings.
        conn.run(f"systemctl stop {service.UNIT_NAME}; rm -rf {t.dir} && mkdir -p {t.dir}", hide=True, warn=True)
    else:
        # This host, with the llama-server that gpubox's build step made here (tests/conftest.py llama_bin).
        server = request.getfixturevalue("llama_bin") / "llama-server"
        from invoke import Config, Context
        c = Context(Config(overrides={"run": {"in_stream": False}}))
        t = Target(c, str(tmp_path_factory.mktemp("serve-target")), str(server.parent.parent))
    for rel, f in files.items():
        if hasattr(t.c, "put"):
            t.c.run(f"mkdir -p {t.dir}/{Path(rel).parent}", hide=True)
        t.put(f, f"{t.dir}/{rel}")
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


MODEL, HEAD = gemma4.TARGET_FILE, gemma4.HEAD_FILE


def test_serve_starts_and_proves(target, served):
    cfg, res = served
    assert res.status == CHANGED, res.error
    assert [c["what"] for c in res.changes][-1] == "start llama-server"
    argv = res.info["argv"]
    assert argv[0].endswith("/bin/llama-server") and res.info["dialect"] == "upstream"
    assert "--n-cpu-moe" in argv
    # the MTP head, as upstream spells it: --spec-draft-model (no --mtp-head) and --spec-type draft-mtp
    assert argv[argv.index("--spec-type") + 1] == "draft-mtp"
    assert argv[argv.index("--spec-draft-model") + 1].endswith(f"/models/{HEAD}")
    assert res.info["mode"] == target.mode
    assert any("no systemd on this host" in a for a in res.attention) == (target.mode == "supervisor")
    host, facts = facts_of(target, cfg)
    assert facts["serve"]["argv"] == argv                                   # the running process IS the command
    assert facts["serve_gguf"]["head"]["arch"] == "gemma4-assistant"      # read on the target before launch
    r = smoke.smoke(host, cfg["serve"])
    assert r.ok, r.error
    assert r.prompt_n > 0 and r.prompt_per_second > 0 and r.predicted_n > 0 and r.predicted_per_second > 0
    assert r.reply.strip() and r.reply.isprintable()
    # the rigged head always drafts the target's own pick: every drafted token is accepted
    assert r.draft_n and r.draft_n > 0 and r.draft_n_accepted == r.draft_n and r.draft_acceptance == 1.0
    assert MODEL in " ".join(smoke.models(host, cfg["serve"]))
    log = logparse.parse(service.read_log(host, cfg, facts))
    smoke.attach_log(r, log)
    print("\n" + r.line())
    assert [(m.role, m.arch) for m in log.models] == [("target", "gemma4"), ("draft", "gemma4-assistant")]
    assert log.target.path.endswith(MODEL) and log.draft.path.endswith(HEAD)
    assert log.target.model_buffers and log.target.kv_buffers and log.target.compute_buffers
    assert log.draft.kv_shared                                            # the head views the target's cache
    assert log.spec_impls == ["draft-mtp"]
    assert log.ready and log.requests and log.requests[-1].predicted_n == r.predicted_n
    q = log.requests[-1]
    assert (q.draft_generated, q.draft_accepted, q.draft_acceptance) == (r.draft_n, r.draft_n_accepted, 1.0)
    assert log.spec_stats and log.spec_stats[-1]["type"] == "draft-mtp"
    assert log.spec_stats[-1]["acc_tokens"] == log.spec_stats[-1]["gen_tokens"] > 0
    line = r.line()
    assert f"draft acceptance {r.draft_n}/{r.draft_n} = 100.0% (timings)" in line
    assert "log: draft acceptance = 1.00000" in line and "statistics draft-mtp:" in line
    findings = doctor.diagnose(log, serve=cfg["serve"], dialect="upstream", facts=facts,
                               head=facts["serve_gguf"]["head"])
    assert not [f for f in findings if f.severity == "error"], doctor.summary(findings)
    assert {f.code for f in findings} == {"draft-acceptance"}, doctor.summary(findings)


def test_prove_prints_the_smoke_line_with_draft_acceptance(target, served):
    """`invoke serve`'s proof (what `invoke demo` prints): the smoke line with acceptance from timings and log."""
    from provision.serve import tasks as serve_tasks
    cfg, _ = served
    host, facts = facts_of(target, cfg)
    lines = []
    data = serve_tasks.prove(host, cfg, facts, echo=lines.append)
    assert lines[0].startswith("smoke: prompt ") and "(timings)" in lines[0] and "log: draft acceptance = 1.00000" in lines[0]
    assert data["smoke"]["draft_acceptance"] == 1.0 and data["smoke"]["spec_type"] == "draft-mtp"
    assert any(l.startswith("log: draft ") and "(gemma4-assistant)" in l for l in lines)


def restore(target, cfg: dict) -> None:
    """Serve the module's main settings again: on a systemd host there is one unit, which a test with other
    settings took over (on this host each settings' state dir has its own supervisor: nothing to do)."""
    _, res, _ = run_step(target, cfg)
    assert res.status in (OK, CHANGED), res.error


def test_random_head_is_never_accepted(target, served):
    """The same target with a head that always drafts a token the target never picks: acceptance 0."""
    cfg = target.cfg("random", models="random")
    host, res, _ = run_step(target, cfg)
    try:
        assert res.status == CHANGED, res.error
        r = smoke.smoke(host, cfg["serve"])
        assert r.ok, r.error
        assert r.draft_n and r.draft_n > 0 and r.draft_n_accepted == 0 and r.draft_acceptance == 0.0
        _, facts = facts_of(target, cfg)
        log = logparse.parse(service.read_log(host, cfg, facts))
        smoke.attach_log(r, log)
        print("\n" + r.line())
        assert log.requests[-1].draft_accepted == 0 and log.requests[-1].draft_generated == r.draft_n
        assert log.spec_stats[-1]["acc_tokens"] == 0 and log.spec_stats[-1]["gen_tokens"] > 0
        assert "log: draft acceptance = 0.00000 (0 accepted" in r.line()
        codes = {f.code for f in doctor.diagnose(log, serve=cfg["serve"], dialect="upstream")}
        assert "draft-never-accepted" in codes
    finally:
        h, f = facts_of(target, cfg)
        service.stop(h, cfg, f)
        restore(target, served[0])


@pytest.mark.parametrize("models,rule,words", [
    ("width", "width", ["was made for a target 768 wide", "is 512 wide", "models.files.assistant"]),
    ("pattern", "pattern", ["ends with layers [full, sliding]", "models.files.model"]),
    ("presync", "arch", ["pre-sync assistant ('gemma4_assistant')", "upstream", "models.files.assistant.revision"]),
])
def test_mismatched_pair_is_refused_before_launch(target, served, models, rule, words):
    cfg, _ = served
    bad = target.cfg("bad-" + models, models=models)
    err = _refused(target, bad, cfg)
    assert "cannot be served together" in err and "nothing was started" in err and f"- {rule}: " in err
    assert "fix: " in err
    for w in words:
        assert w in err, (w, err)


def test_abort_in_the_middle_of_the_smoke_request_is_reported(target, served):
    """A real server killed with SIGABRT while it generates (what an assertion does): the smoke request gets no
    answer and reports an abort with the log lines of the run that died; the supervisor or systemd restarts the server."""
    import threading
    cfg, _ = served
    host, facts = facts_of(target, cfg)
    pid = facts["serve"]["pid"]
    before = service.read_log(host, cfg, facts, last=False).count("processing task")
    out = {}
    t = threading.Thread(target=lambda: out.update(r=smoke.smoke(
        host, cfg["serve"], max_tokens=1900, read_log=lambda: service.read_log(host, cfg, facts, last=False))))
    t.start()
    deadline = time.monotonic() + 30
    while service.read_log(host, cfg, facts, last=False).count("processing task") == before:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)
    host.run(["kill", "-ABRT", pid])
    t.join(60)
    r = out["r"]
    assert not r.ok and r.aborted, r
    assert any("processing task" in l for l in r.log_lines)
    if target.mode == "supervisor":
        assert r.log_lines[-1].startswith("gpubox-supervisor: llama-server exited with status 134")
    else:                                       # systemd's own line about the unit, in the unit's journal
        assert re.search(r"Main process exited, code=(dumped|killed), status=6/ABRT", r.log_lines[-1]), r.log_lines
    print("\n" + r.line())
    deadline = time.monotonic() + 60
    while smoke.http(host, cfg["serve"], "GET", "/health").status != 200:
        assert time.monotonic() < deadline, f"the server was not restarted ({target.mode})"
        time.sleep(1)


def test_api_key_file_guards_v1_and_the_proof_sends_the_key(target, served):
    """serve.api_key_file: llama-server gets --api-key-file (the key never on its command line); a request
    without the key gets 401 from /v1/*, /health stays open, and gpubox's own proof (smoke, models) reads the
    key on the target and passes."""
    cfg, _ = served
    keyed = target.cfg("keyed", api_key_file=f"{target.dir}/keyed/api.key")
    host, facts = facts_of(target, keyed)
    user = service.run_user(keyed, facts)
    host.run(["mkdir", "-p", f"{target.dir}/keyed"], root=True)
    host.write_file(keyed["serve"]["api_key_file"], "gpubox-test-key-" + os.urandom(8).hex() + "\n",
                    mode="0600", owner=user, root=True)
    _, res, _ = run_step(target, keyed)
    try:
        assert res.status == CHANGED, res.error
        argv = res.info["argv"]
        assert argv[argv.index("--api-key-file") + 1] == keyed["serve"]["api_key_file"]
        assert not [a for a in argv if a.startswith("gpubox-test-key-")]
        bare = dict(keyed["serve"], api_key_file="")              # the same server, asked without the key
        assert smoke.http(host, bare, "GET", "/health").status == 200
        assert smoke.http(host, bare, "GET", "/v1/models").status == 401
        assert smoke.http(host, keyed["serve"], "GET", "/v1/models").status == 200
        r = smoke.smoke(host, keyed["serve"])
        assert r.ok and r.predicted_n > 0, r.error
        assert MODEL in " ".join(smoke.models(host, keyed["serve"]))
    finally:
        _, f = facts_of(target, keyed)
        service.stop(host, keyed, f)
        restore(target, cfg)


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
        pytest.fail(f"llama-server was not restarted within 30 s ({target.mode})")
    print(f"\nkill -9 {pid}: restarted as pid {f2['serve']['pid']} ({target.mode})")
    if target.mode == "systemd":
        assert f2["serve"]["unit_ActiveState"] == "active" and int(f2["serve"]["unit_NRestarts"]) == restarts + 1
        assert f2["serve"]["unit_MainPID"] == f2["serve"]["pid"] == listener_pid(host, cfg["serve"]["port"])
        unit_log = host.run(["journalctl", "--no-pager", "-u", service.UNIT_NAME], root=True).stdout
        assert "Main process exited, code=killed, status=9/KILL" in unit_log
        assert f2["serve"]["unit_InvocationID"] != f["serve"]["unit_InvocationID"]     # a new start
    else:
        assert "restarting in 5 s" in service.read_log(host, cfg, f2, last=False)


def test_unit_main_pid_answers_and_the_journal_holds_the_load_lines(target, served):
    systemd_only(target)
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
    log = logparse.parse(current, target_path=f"{target.dir}/models/{MODEL}")
    assert log.target and log.target.model_buffers and log.ready
    findings = doctor.diagnose(log, serve=cfg["serve"], dialect="upstream", facts=f)
    assert not [x for x in findings if x.severity == "error"], doctor.summary(findings)


def test_serve_stop_stops_the_unit_and_the_step_starts_it_again(target, served):
    systemd_only(target)
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
    if target.mode == "systemd":
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
    cfg = target.cfg("broken", models="broken", draft_model="")
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


def test_mlock_holds_past_the_memlock_limit_and_is_reported_when_it_does_not(target):
    """A model bigger than the 8 MiB memlock limit that the container's systemd cannot raise: the unit's
    AmbientCapabilities=CAP_IPC_LOCK locks it anyway (the kernel's Locked covers the model's host buffer);
    without the capability (a drop-in takes it away) llama.cpp warns, nothing is locked, check() reports it NOT
    locked with that log line, and doctor finds mlock-failed."""
    systemd_only(target)
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
