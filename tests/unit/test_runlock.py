"""The run lock on a real shell with a real flock(1): a second run refuses (lock_wait 0) or waits and goes on;
the holder's line names the first run; a controller killed with SIGKILL leaves no stale lock; ~/ is the
target user's home. (The same lock between two `provision` runs over SSH: tests/integration/test_runlock.py.)"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from invoke import Config, Context

from provision import config, runlock
from provision.host import Host

ROOT = Path(__file__).resolve().parents[2]


def host() -> Host:
    return Host(Context(Config(overrides={"run": {"in_stream": False}})))


@pytest.fixture
def cfg(tmp_path):
    c = config.validate(config.defaults()["gpubox"])
    c["state_dir"] = str(tmp_path / "state dir %h")
    return c


def test_second_run_refuses_at_once_and_names_the_holder(cfg):
    msgs = []
    with runlock.run_lock(host(), cfg, "provision", echo=msgs.append) as where:
        assert where == cfg["state_dir"] + "/gpubox.run.lock"
        assert Path(where).read_text().startswith(f"provision from ")
        t0 = time.monotonic()
        with pytest.raises(runlock.LockBusy) as e:
            with runlock.run_lock(host(), cfg, "models", echo=msgs.append):
                pytest.fail("two runs held the lock")
        assert time.monotonic() - t0 < 5
        assert f"pid {os.getpid()}" in e.value.holder and "provision from" in e.value.holder
        assert "lock_wait is 0" in str(e.value) and "--set lock_wait=" in str(e.value)
    assert msgs and "another gpubox run holds" in msgs[0]
    # released: the next run takes it at once
    with runlock.run_lock(host(), cfg, "provision", echo=msgs.append):
        pass


def test_second_run_waits_then_goes_on(cfg):
    order, msgs = [], []
    first_in = threading.Event()

    def first():
        with runlock.run_lock(host(), cfg, "provision", echo=msgs.append):
            first_in.set()
            time.sleep(1.5)
            order.append("first done")

    t = threading.Thread(target=first)
    t.start()
    assert first_in.wait(30)
    with runlock.run_lock(host(), cfg, "provision", echo=msgs.append, wait=60):
        order.append("second in")
    t.join()
    assert order == ["first done", "second in"]
    assert any("waiting up to 60 s" in m for m in msgs) and any("the other run finished" in m for m in msgs)


def test_wait_runs_out(cfg):
    with runlock.run_lock(host(), cfg, "provision"):
        t0 = time.monotonic()
        with pytest.raises(runlock.LockBusy, match="after waiting"):
            with runlock.run_lock(host(), cfg, "provision", echo=lambda m: None, wait=1):
                pass
        assert 0.9 < time.monotonic() - t0 < 10


def test_a_killed_controller_leaves_no_stale_lock(cfg, tmp_path):
    """SIGKILL of the process holding the lock: the holder's stdin closes, the kernel drops the flock."""
    script = tmp_path / "hold.py"
    script.write_text(
        "import sys, time\n"
        "from invoke import Config, Context\n"
        "from provision import runlock\n"
        "from provision.host import Host\n"
        f"cfg = {{'state_dir': {cfg['state_dir']!r}, 'lock_wait': 0, 'user': ''}}\n"
        "with runlock.run_lock(Host(Context(Config(overrides={'run': {'in_stream': False}}))), cfg, 'provision'):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(runlock.LockBusy):
            with runlock.run_lock(host(), cfg, "provision", echo=lambda m: None):
                pass
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        deadline = time.monotonic() + 20
        while True:
            try:
                with runlock.run_lock(host(), cfg, "provision", echo=lambda m: None):
                    break
            except runlock.LockBusy:
                assert time.monotonic() < deadline, "the lock stayed held after the controller died"
                time.sleep(0.2)
    finally:
        if p.poll() is None:
            p.kill()


def test_tilde_is_the_target_users_home(cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg["state_dir"] = "~/.gpubox"
    with runlock.run_lock(host(), cfg, "provision") as where:
        assert where == str(tmp_path / "home" / ".gpubox" / "gpubox.run.lock")
    assert not Path("~").exists()


def test_a_symlink_at_the_lock_path_is_refused(cfg, tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    Path(cfg["state_dir"]).mkdir(parents=True)
    (Path(cfg["state_dir"]) / "gpubox.run.lock").symlink_to(victim)
    with pytest.raises(runlock.LockError, match="not a regular file"):
        with runlock.run_lock(host(), cfg, "provision"):
            pass
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("task", ["serve", "serve.stop", "serve.start", "tune"])
def test_serve_and_tune_wait_for_a_provision_in_flight(cfg, task, tmp_path, monkeypatch):
    """serve (and start/stop) and tune change the box too (a server started, probes on the GPU): with a
    provision holding the lock they refuse with exit 75 and the holder's name, before gathering a fact.
    tune asks nvidia-smi for a card before it takes the lock (no GPU: it says so and creates nothing); this
    machine has none, so a stand-in nvidia-smi on PATH lists a GTX 1080 for that one question."""
    if task == "tune":
        fake = tmp_path / "bin" / "nvidia-smi"
        fake.parent.mkdir()
        fake.write_text("#!/bin/sh\ncase \"$*\" in *query-gpu*) echo 'NVIDIA GeForce GTX 1080, 6.1, 8192, 7900, "
                        "580.119.02';; esac\n")
        fake.chmod(0o755)
        monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    from invoke import Exit
    from provision.serve import tasks as serve_tasks
    from provision.tune import tasks as tune_tasks
    body = {"serve": serve_tasks.serve_, "serve.stop": serve_tasks.stop, "serve.start": serve_tasks.start,
            "tune": tune_tasks.tune}[task]
    c = Context(Config(overrides={"run": {"in_stream": False}, "gpubox": {}}))
    c.config.load_collection({"gpubox": config.defaults()["gpubox"]})
    sets = [f"state_dir={cfg['state_dir']}", "lock_wait=0"]
    with runlock.run_lock(host(), cfg, "provision", echo=lambda m: None):
        with pytest.raises(Exit) as e:
            body(c, set=sets)
    assert e.value.code == runlock.EXIT_BUSY
    assert "provision from " in str(e.value.message)
