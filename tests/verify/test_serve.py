"""testinfra: the serve step on the target: the unit (or gpubox's supervised process) runs llama-server with the
configured command, the port listens, /health is 200 and /v1/models names the model."""


import contextlib

import pytest

from provision.serve import service, smoke


@pytest.fixture(scope="module")
def home(host, gcfg):
    user = gcfg.get("user") or ""
    return host.user(user).home if user else host.user().home


@pytest.fixture(scope="module")
def server_pid(host, gcfg, home):
    if host.exists("systemctl") and host.file("/run/systemd/system").is_directory:
        unit = host.service(service.UNIT_NAME.removesuffix(".service"))
        assert unit.is_running, f"{service.UNIT_NAME} is not running"
        assert unit.is_enabled
        assert unit.is_valid                                  # systemd-analyze verify: the unit file is sound
        pid = host.check_output(f"systemctl show -p MainPID --value {service.UNIT_NAME}").strip()
    else:
        lay = service.layout(gcfg, home)
        assert host.file(lay.supervisor_pid).exists, "no systemd and no gpubox supervisor pid file"
        sup = host.file(lay.supervisor_pid).content_string.strip()
        assert host.run(f"kill -0 {sup}").rc == 0, "the gpubox supervisor is not running"
        pid = host.file(lay.server_pid).content_string.strip()
    assert pid and pid != "0"
    return pid


def test_llama_server_process(host, server_pid, gcfg, home):
    argv = host.file(f"/proc/{server_pid}/cmdline").content.split(b"\0")
    argv = [a.decode() for a in argv if a]
    assert argv[0].endswith("/bin/llama-server")
    assert argv[argv.index("--port") + 1] == str(gcfg["serve"]["port"])
    assert argv[argv.index("-c") + 1 if "-c" in argv else argv.index("--ctx-size") + 1] == str(gcfg["serve"]["ctx_size"])
    model = gcfg["models"]["files"]["model"]["filename"]
    assert any(a.endswith("/" + model) for a in argv)
    dm, spec = gcfg["serve"].get("draft_model"), gcfg["serve"].get("spec_type", "none")
    if dm and spec != "none":
        # drafting configured: the server runs with the head and a speculative type (mtp / draft-mtp ...)
        head = gcfg["models"]["files"][dm]["filename"]
        assert any(a.endswith("/" + head) for a in argv), f"{head} is not in the server's command line"
        assert "--spec-type" in argv and argv[argv.index("--spec-type") + 1] != "none"


def test_the_listener_is_the_server_process(host, server_pid, gcfg):
    """The process that answers on the port is the unit's MainPID (or the supervisor's server pid)."""
    if not host.exists("ss"):
        pytest.skip("no ss on this host to name the listening process")
    out = host.check_output(f"ss -Hltnp 'sport = :{gcfg['serve']['port']}'")
    assert f"pid={server_pid}," in out, out


def test_port_listens(host, gcfg):
    h, p = smoke.connect_host(gcfg["serve"]), gcfg["serve"]["port"]
    if host.exists("ss"):
        assert host.socket(f"tcp://{h}:{p}").is_listening
    else:  # a host without iproute2: connect with bash instead
        assert host.run(f"timeout 5 bash -c 'exec 3<>/dev/tcp/{h}/{p}'").rc == 0


def test_health_is_200(host, gcfg):
    r = smoke.parse_response(host.check_output(smoke.http_command(gcfg["serve"], "/health")))
    assert r.status == 200 and r.json().get("status") == "ok"


def test_models_names_the_model(host, gcfg):
    # /v1/* needs the key when serve.api_key_file is set; the client reads the 0600 file as root
    with host.sudo() if gcfg["serve"].get("api_key_file") else contextlib.nullcontext():
        r = smoke.parse_response(host.check_output(smoke.http_command(gcfg["serve"], "/v1/models")))
    assert r.status == 200
    ids = [m["id"] for m in r.json()["data"]]
    model = gcfg["models"]["files"]["model"]["filename"]
    assert any(model in i for i in ids), ids
