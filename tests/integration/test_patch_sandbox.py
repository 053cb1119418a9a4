"""Integration: step 4 (patch) over real SSH against the sandbox host (Fedora-like chroot with real
rpm/dnf5; its fixture RPM cuda-crt-12-9 ships the real 12.9.86 header).

One journey from a pristine sandbox: plan/apply before CUDA is installed (a clear refusal), the cuda
step installs the header, patch changes it, a second run changes nothing, the testinfra suite passes
(rpm -V flags only the header), undo restores the packaged file (rpm -V clean), and a header of
another version is refused and left untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from provision import facts as factmod
from provision.engine import CHANGED, FAILED, OK, PLANNED, Runner
from provision.host import Host
from provision.steps import BY_NAME, patch

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SHA_12986 = "2f2189d1752d862e96122f985484c89e16bd03a485a01e1f114514f738a2ed4f"


def ssh(inf, command: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", "-F", inf.ssh_config, "gpubox", command], capture_output=True, text=True,
                          timeout=300)


def run(conn, cfg, names, plan=False):
    rep = Runner(Host(conn), cfg, [BY_NAME[n] for n in names], plan=plan, echo=lambda s: None).run()
    return rep, {s.name: s for s in rep.steps}


def test_patch_journey_over_ssh(sandbox, conn, reset_sandbox, tmp_path):
    reset_sandbox()
    cfg = sandbox.gpubox_config(tmp_path / "reports")
    h = patch.header_path(cfg)
    try:
        # 1. No CUDA yet: plan says why; provision refuses with the fix.
        _, s = run(conn, cfg, ["patch"], plan=True)
        assert s["patch"].status == PLANNED
        assert s["patch"].changes[0]["what"] == "patch crt/math_functions.h after CUDA is installed"
        _, s = run(conn, cfg, ["patch"])
        assert s["patch"].status == FAILED
        assert "does not exist: CUDA 12.9 is not installed" in s["patch"].error and "invoke cuda" in s["patch"].error

        # 2. The cuda step installs cuda-crt-12-9 (the real header); then patch changes it.
        _, s = run(conn, cfg, ["cuda"])
        assert s["cuda"].status in (CHANGED, OK), s["cuda"].error
        assert ssh(sandbox, f"sha256sum {h}").stdout.split()[0] == SHA_12986
        _, s = run(conn, cfg, ["patch"], plan=True)
        assert s["patch"].status == PLANNED and "12 declarations" in s["patch"].changes[0]["what"]
        _, s = run(conn, cfg, ["patch"])
        assert s["patch"].status == CHANGED, s["patch"].error
        applied = [c["command"] for c in s["patch"].commands if "@@fact" not in c["command"]]
        assert len(applied) == 3, applied       # read, back up, edit+rename (plus the runner's re-gather)
        assert s["patch"].info["state"] == "patched-gpubox"

        # 3. Idempotent: nothing to do, one fact command, no other command.
        rep, s = run(conn, cfg, ["patch"])
        assert s["patch"].status == OK and not s["patch"].changes and rep.fact_commands == 1
        assert s["patch"].commands == []

        # 4. testinfra suite for the step against the sandbox.
        cfgfile = tmp_path / "verify-config.json"
        cfgfile.write_text(json.dumps(cfg))
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                            str(REPO / "tests" / "verify" / "test_patch.py"), "--hosts=ssh://gpubox",
                            f"--ssh-config={sandbox.ssh_config}"], cwd=REPO, capture_output=True, text=True,
                           env=dict(os.environ, GPUBOX_CONFIG=str(cfgfile)), timeout=300)
        assert r.returncode == 0, r.stdout[-3000:]
        assert "skipped" not in r.stdout.splitlines()[-1], r.stdout[-2000:]   # rpm checks ran

        # 5. undo: the packaged file is back, rpm -V is clean, the backup is gone.
        host = Host(conn)
        notes = patch.undo(host, factmod.gather(host, cfg, [patch]), cfg)
        assert notes == [f"restored {h} from {h}.gpubox-orig"]
        v = ssh(sandbox, "rpm -V cuda-crt-12-9")
        assert v.returncode == 0 and v.stdout == "", v.stdout
        assert ssh(sandbox, f"test -e {h}.gpubox-orig").returncode == 1

        # 6. A header of another version: refused, named, untouched, no temp file left.
        assert ssh(sandbox, f"sed -i 's/sinpif(float x);/sinpif(float v);/' {h}").returncode == 0
        before = ssh(sandbox, f"sha256sum {h}").stdout
        _, s = run(conn, cfg, ["patch"])
        assert s["patch"].status == FAILED
        err = s["patch"].error
        assert err.startswith(f"patch: refusing to edit {h}") and "sinpif/device" in err and "fix:" in err
        assert ssh(sandbox, f"sha256sum {h}").stdout == before
        assert ssh(sandbox, f"ls -a {os.path.dirname(h)} | grep -c gpubox").stdout.strip() == "0"
    finally:
        reset_sandbox()
