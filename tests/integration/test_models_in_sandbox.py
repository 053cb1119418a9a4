"""Step 6 against the sandbox host over real SSH (Fabric), with the real huggingface_hub on the target and
testbed.hfserver on the sandbox's host address: fresh download, already present (no transfer), SSH
session killed mid-transfer then resumed, corrupted byte, wrong pinned hash, disk preflight, assistant
architecture mismatch. Each test uses its own models.dir and state_dir on the target."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from invoke import Exit

from provision import runs
from provision import config, fetch
from testbed.sandbox.paths import HOST_ADDRESS
from testbed import gemma4

ROOT = Path(__file__).resolve().parents[2]
FILES = config.defaults()["gpubox"]["models"]["files"]


def free_port() -> int:
    s = socket.socket()
    s.bind((HOST_ADDRESS, 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Hub:
    """Our own hfserver process on the sandbox's host address (reachable from the target)."""

    def __init__(self, root: Path, *extra: str):
        self.port = free_port()
        self.log = root / "requests.jsonl"
        self.p = subprocess.Popen([sys.executable, "-m", "testbed.hfserver", "--root", str(root), "--host", HOST_ADDRESS,
                                   "--port", str(self.port), "--log", str(self.log), *extra],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.p.stdout.readline()
        self.url = f"http://{HOST_ADDRESS}:{self.port}"

    def requests(self) -> list[dict]:
        return [json.loads(x) for x in self.log.read_text().splitlines()] if self.log.exists() else []

    def gets(self) -> list[dict]:
        return [r for r in self.requests() if r["method"] == "GET" and "/resolve/" in r["path"]]

    def close(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(10)


@pytest.fixture(scope="module")
def content(tmp_path_factory):
    # The mini Gemma 4 twin pair (the sandbox's own content): a gemma4 target and its gemma4-assistant head.
    root = tmp_path_factory.mktemp("hf")
    t, h = gemma4.write_pair(root / "twin")
    for key, p in (("model", t), ("assistant", h)):
        dst = root / FILES[key]["repo"] / FILES[key]["filename"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        p.rename(dst)
    return root


@pytest.fixture
def hub(content, sandbox, monkeypatch):
    servers = []

    def start(*extra):
        h = Hub(content, *extra)
        servers.append(h)
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        h.log.unlink(missing_ok=True)
        return h
    yield start
    for h in servers:
        h.close()


@pytest.fixture
def dirs():
    tag = uuid.uuid4().hex[:8]
    return {"models.dir": f"/root/Models-{tag}", "state_dir": f"/var/lib/gpubox-it-{tag}"}


def sets(dirs, *more):
    return tuple(f"{k}={v}" for k, v in dirs.items()) + more


def latest_report(conn) -> dict:
    cfg = config.load(conn)
    # Reports are named after the connection's host, which Fabric takes from the ssh config (10.200.0.2).
    return json.loads((Path(os.path.expanduser(cfg["report_dir"])) / f"{conn.host}-latest.json").read_text())


def on_target(conn, command: str) -> str:
    return conn.run(command, hide=True, warn=True, in_stream=False).stdout


def test_fresh_download_then_present_without_transfer(conn, hub, dirs, content):
    h = hub()
    rep = runs.run_steps(conn, ["models"], sets=sets(dirs))
    assert rep.steps[0].status == "changed"
    lock = json.loads(on_target(conn, f"cat {dirs['state_dir']}/gpubox.lock.json"))
    for key in ("model", "assistant"):
        f = FILES[key]
        got = on_target(conn, f"sha256sum {dirs['models.dir']}/{f['filename']}").split()[0]
        assert got == lock["models"][key]["sha256"]
        import hashlib
        assert got == hashlib.sha256((content / f["repo"] / f["filename"]).read_bytes()).hexdigest()
    assert on_target(conn, f"ls -A {dirs['models.dir']}").split() == sorted(f["filename"] for f in FILES.values())
    n = len(h.requests())
    rep2 = runs.run_steps(conn, ["models"], sets=sets(dirs))
    assert rep2.steps[0].status == "ok" and rep2.changed == 0
    assert len(h.requests()) == n                     # not even a HEAD
    assert rep2.steps[0].seconds <= 1.0


def test_ssh_session_killed_mid_transfer_then_resumed(conn, hub, dirs, sandbox):
    h = hub("--rate", "300000")                         # the model (~9.5 MB) takes ~32 s; killed after 1 MB
    model = FILES["model"]["filename"]
    partial = f"{dirs['models.dir']}/.{model}{fetch.PARTIAL_SUFFIX}"
    code = ("import sys; from provision import runs; sys.path.insert(0, 'tests/integration'); from conftest import make_connection; "
            "from testbed.sandbox import runtime; c = make_connection(runtime.info()); "
            f"runs.run_steps(c, ['models'], sets={sets(dirs, 'models.progress_interval=1')!r})")
    p = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, HF_ENDPOINT=h.url),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    have = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = on_target(conn, f"stat -c %s {partial} 2>/dev/null").strip()
        have = int(out) if out.isdigit() else 0
        if have >= 1_000_000:
            break
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)                        # the controller dies: the SSH session is gone
    p.wait()
    # The target's downloader notices the lost session only at its next progress line (broken pipe, up to
    # models.progress_interval s later) and writes on until then: wait until it is gone, then read the size.
    for _ in range(300):
        if not on_target(conn, f"pgrep -f {dirs['models.dir']}").strip():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the target's downloader outlived the killed session by 30 s")
    have = int(on_target(conn, f"stat -c %s {partial}").strip())
    assert 0 < have, "nothing was downloaded before the kill"
    assert on_target(conn, f"test -e {dirs['models.dir']}/{model} && echo yes").strip() == ""
    first = sum(r["sent"] for r in h.gets() if model in r["path"])
    rep = runs.run_steps(conn, ["models"], sets=sets(dirs))
    assert rep.steps[0].status == "changed"
    resumed = [r for r in h.gets() if model in r["path"]][-1]
    assert resumed["range"] == f"bytes={have}-"
    size = int(on_target(conn, f"stat -c %s {dirs['models.dir']}/{model}"))
    assert first + resumed["sent"] - size <= 0.05 * size + (1 << 20)
    assert not on_target(conn, f"ls -A {dirs['models.dir']} | grep gpubox-partial").strip()


def test_corrupted_byte_is_rejected(conn, hub, dirs):
    f = FILES["model"]
    hub("--corrupt", f"{f['repo']}/{f['filename']}@5000")
    with pytest.raises(Exit):
        runs.run_steps(conn, ["models"], sets=sets(dirs))
    err = latest_report(conn)["steps"][0]["error"]
    assert "sha256 of the downloaded bytes is" in err and "NOT moved into place" in err
    assert on_target(conn, f"ls -A {dirs['models.dir']}").split().count(f["filename"]) == 0


def test_wrong_pinned_hash_is_rejected(conn, hub, dirs):
    hub()
    with pytest.raises(Exit):
        runs.run_steps(conn, ["models"], sets=sets(dirs, "models.files.model.sha256=" + "0" * 64))
    err = latest_report(conn)["steps"][0]["error"]
    assert "0" * 64 in err and "differs from the sha256 the Hub reports" in err


def test_disk_preflight_refuses_before_any_byte(conn, hub, dirs):
    h = hub()
    with pytest.raises(Exit):
        runs.run_steps(conn, ["models"], sets=sets(dirs, "models.reserve_gb=1000000"))
    err = latest_report(conn)["steps"][0]["error"]
    assert "not enough free disk" in err and "models.reserve_gb" in err
    assert h.gets() == []


def test_assistant_architecture_mismatch_names_the_fix(conn, hub, dirs):
    hub()
    # the sandbox's assistant is a post-sync head (gemma4-assistant); the `recipe` profile (pre-sync) loads
    # gemma4_assistant
    with pytest.raises(Exit):
        runs.run_steps(conn, ["models"], sets=sets(dirs, "build.profile=recipe"))
    err = latest_report(conn)["steps"][0]["error"]
    assert "'gemma4-assistant'" in err and "'gemma4_assistant'" in err and "models.files.assistant.revision" in err
