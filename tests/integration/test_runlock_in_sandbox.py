"""Two `fab -H gpubox provision` runs at once against the sandbox over real SSH: the run lock on the target.

Run A changes the box (cuda, compiler, patch from a pristine sandbox). Started while A holds the lock:
run B (lock_wait 0) refuses at once with exit status 75, names A as the holder and writes no report;
run C (lock_wait 600) says it waits, goes on when A is done and finds nothing left to change. Every file
the steps wrote is whole (what the templates render), and no temporary file of theirs is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from provision import config
from provision.steps import compiler, cuda

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ONLY = "cuda,compiler,patch"


def fab_argv(inf, report_dir: Path, *sets: str) -> list[str]:
    return [sys.executable, "-m", "fabric", "-S", inf.ssh_config, "-H", "gpubox", "-f", inf.overrides_file,
            "provision", "--only", ONLY, "--set", f"report_dir={report_dir}", *[a for s in sets for a in ("--set", s)]]


def ssh(inf, command: str) -> str:
    r = subprocess.run(["ssh", "-F", inf.ssh_config, "gpubox", command], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


class Run:
    def __init__(self, argv):
        self.p = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.lines: list[str] = []
        self.t = threading.Thread(target=self._read, daemon=True)
        self.t.start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line)

    def wait_for(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(needle in line for line in self.lines):
                return True
            if self.p.poll() is not None:
                self.t.join(5)
                return any(needle in line for line in self.lines)
            time.sleep(0.1)
        return False

    def finish(self, timeout: float) -> int:
        rc = self.p.wait(timeout)
        self.t.join(10)
        return rc

    @property
    def text(self) -> str:
        return "".join(self.lines)


def test_two_provision_runs_at_once(sandbox, reset_sandbox, tmp_path):
    reset_sandbox()
    rd = {n: tmp_path / f"reports-{n}" for n in "ABC"}
    a = Run(fab_argv(sandbox, rd["A"]))
    c = None
    try:
        assert a.wait_for("[cuda] applying", 300), a.text
        # B: lock_wait 0 -> refused at once, nothing run, no report
        t0 = time.monotonic()
        b = subprocess.run(fab_argv(sandbox, rd["B"]), cwd=REPO, capture_output=True, text=True, timeout=120)
        assert b.returncode == 75, b.stdout + b.stderr
        assert time.monotonic() - t0 < 60
        err = b.stdout + b.stderr
        assert "another gpubox run holds /var/lib/gpubox/gpubox.run.lock" in err and f"{ONLY} from " in err, err
        assert "--set lock_wait=" in err
        assert not rd["B"].exists()
        # C: waits for A, then goes on
        c = Run(fab_argv(sandbox, rd["C"], "lock_wait=600"))
        assert c.wait_for("waiting up to 600 s", 60), c.text
        assert c.p.poll() is None
        assert a.finish(900) == 0, a.text
        assert c.finish(300) == 0, c.text
    finally:
        for r in (a, c):
            if r is not None and r.p.poll() is None:
                r.p.kill()
    assert "the other run finished" in c.text and "0 changed" in c.text, c.text
    rep_a = json.loads(next(rd["A"].glob("*-latest.json")).read_text())
    assert [s["status"] for s in rep_a["steps"] if s["name"] in ONLY.split(",")] == ["changed"] * 3

    # Every file whole: what the templates render for the sandbox's config.
    cfg = config.validate(config.merge(config.defaults()["gpubox"], sandbox.overrides()["gpubox"]))
    assert ssh(sandbox, f"cat {cuda.repo_path(cfg)}") == cuda.repo_text(cfg)
    assert ssh(sandbox, f"cat {cfg['cuda']['profile_snippet']}") == cuda.profile_text(cfg)
    links = ssh(sandbox, f"readlink {cfg['compiler']['shim_dir']}/gcc {cfg['compiler']['shim_dir']}/g++").split()
    assert links == list(compiler.targets(cfg).values())
    # no temporary file or directory of gpubox's writers anywhere it wrote (Host.write_file's are
    # `.<name>.gpubox-<16 hex>`; the real /etc/profile.d/gpubox-cuda.sh must not count)
    left = ssh(sandbox, "ls -a /etc/yum.repos.d /etc/profile.d /var/lib/gpubox /var/lib/gpubox/shims "
                        f"{cfg['cuda']['prefix']}/targets/x86_64-linux/include/crt | grep -c '^\\..*\\.gpubox-[0-9a-f]\\{{16\\}}$\\|gpubox-tmp\\|gpubox-new' || true")
    assert left.strip() == "0"
    # the lock file names the last holder (C) and nobody holds it now
    assert ssh(sandbox, "head -n 1 /var/lib/gpubox/gpubox.run.lock").startswith(f"{ONLY} from ")
    assert ssh(sandbox, "flock -n /var/lib/gpubox/gpubox.run.lock echo free").strip() == "free"
