"""Integration fixtures: one sandbox host `gpubox` per pytest session, shared by every step's tests.

- The session takes an exclusive flock on ``<cache>/sandbox.lock`` for its whole length: several
  pytest sessions (other helpers, CI jobs) on one machine take turns on the single sandbox.
- `sandbox` brings it up (building the cache on first use: minutes), resets it to pristine at the
  session start, and brings it down at the end only if it was not up before the session.
- `conn`: a Fabric Connection to gpubox (Config(runtime_ssh_path=<ssh config>), in_stream off for
  pytest's captured stdin) with the sandbox's gpubox overrides merged into its config, so
  `provision.runs.run_steps(conn, [...])` runs the real steps against it.
- `testinfra_host`: testinfra.get_host("ssh://gpubox", ssh_config=...).
- `reset_sandbox`: call it to go back to pristine (drops the target's writable layer; the persistent
  cache at /var/cache/gpubox-persist, where ccache lives, stays).
- `hf_env`: HF_ENDPOINT for the local Hugging Face server (monkeypatched into os.environ).

Tests here are marked `integration`; without root they are skipped with the reason.
"""

from __future__ import annotations

import fcntl
import os

import pytest

from testbed.sandbox import Paths, runtime

NEEDS_ROOT = "the sandbox needs root (network namespace, overlay mounts, chroot); CI runs these as root"


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def sandbox_paths() -> Paths:
    return Paths.default()


@pytest.fixture(scope="session")
def sandbox_lock(sandbox_paths):
    if os.geteuid() != 0:
        pytest.skip(NEEDS_ROOT)
    sandbox_paths.root.mkdir(parents=True, exist_ok=True)
    fh = open(sandbox_paths.lock, "w")
    fcntl.flock(fh, fcntl.LOCK_EX)   # waits for any other session using the sandbox
    yield sandbox_paths
    fcntl.flock(fh, fcntl.LOCK_UN)
    fh.close()


@pytest.fixture(scope="session")
def sandbox(sandbox_lock) -> runtime.Info:
    p = sandbox_lock
    was_up = runtime.running(p)
    try:
        inf = runtime.up(p)
        runtime.reset(p)
    except runtime.SandboxError as e:
        pytest.fail(f"sandbox.up failed: {e}")
    yield inf
    if not was_up:
        runtime.down(p, log=lambda m: None)


def make_connection(inf: runtime.Info):
    from fabric import Config, Connection
    from provision import config as gcfg

    cfg = Config(overrides={"run": {"in_stream": False}}, runtime_ssh_path=inf.ssh_config)
    # gpubox defaults, then the sandbox's overrides on top (as `fab -f <overrides>` does).
    cfg.load_collection(gcfg.defaults())
    cfg.load_overrides({"run": {"in_stream": False}, **inf.overrides()})
    return Connection("gpubox", config=cfg)


@pytest.fixture
def conn(sandbox):
    c = make_connection(sandbox)
    yield c
    c.close()


@pytest.fixture(scope="session")
def testinfra_host(sandbox):
    import testinfra
    return testinfra.get_host("ssh://gpubox", ssh_config=sandbox.ssh_config)


@pytest.fixture
def reset_sandbox(sandbox_lock):
    """A function that restores the pristine sandbox (call it before or after mutating tests)."""
    def do():
        return runtime.reset(sandbox_lock, log=lambda m: None)
    return do


@pytest.fixture
def hf_env(sandbox, monkeypatch):
    if not sandbox.hf_endpoint:
        pytest.skip("provision/hfserver.py is missing: no local Hugging Face server")
    monkeypatch.setenv("HF_ENDPOINT", sandbox.hf_endpoint)
    return sandbox.hf_endpoint
