"""`gpubox provision` on the box itself, as the mission's `invoke provision` means: inside the sandbox, the wheel
installed with the box's own python3 (pip from its own wheel: the box has no pip and no index), then run there
locally (an Invoke Context, no -H, no SSH from gpubox). It reaches the same end state as `fab -H gpubox
provision` over SSH from a pristine sandbox, and a second local run changes nothing.

The sandbox has no network: gpubox's dependencies go in as wheels for its python (3.14), downloaded once on this
machine with pip (cached under ${GPUBOX_CACHE}/tool-wheels-py<version>). Its python3 carries Debian's
EXTERNALLY-MANAGED marker, hence --break-system-packages (the sandbox is reset afterwards).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from testbed.sandbox.fixtures import pip_download
from testbed.sandbox.paths import cache_root
from testbed.testing import tracked_copy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STEPS = ["driver", "cuda", "compiler", "patch", "build", "models"]
ON_BOX = "/root/gpubox-tool"
# pip --target: the packages and their console scripts under ON_BOX/lib, found through PYTHONPATH.
GPUBOX = f"PYTHONPATH={ON_BOX}/lib {ON_BOX}/lib/bin/gpubox"


def ssh(inf, command: str, check: bool = True, stdin: bytes | None = None, timeout: int = 1800):
    r = subprocess.run(["ssh", "-F", inf.ssh_config, "gpubox", command], input=stdin, capture_output=True,
                       timeout=timeout)
    out, err = r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    if check and r.returncode != 0:
        raise AssertionError(f"ssh gpubox {command!r} exited {r.returncode}:\n{out[-4000:]}\n{err[-3000:]}")
    return out


def end_state(inf) -> dict:
    """What the six steps own on the target, without times (the lock's mtimes and timestamps differ by run)."""
    out = ssh(inf, "rpm -qa --qf '%{NAME}-%{VERSION}-%{RELEASE}\\n' | sort; echo @@; "
                   "grep -v '^comment' /etc/dnf/versionlock.toml; echo @@; "
                   "cat /etc/yum.repos.d/cuda-*.repo /etc/profile.d/gpubox-cuda.sh; echo @@; "
                   "ls -l /var/lib/gpubox/shims | awk 'NR>1{print $1, $3, $9, $10, $11}'; echo @@; "
                   "modinfo -F version nvidia; echo @@; "
                   "sha256sum /usr/local/cuda-12.9/targets/x86_64-linux/include/crt/math_functions.h; echo @@; "
                   "git -C /opt/gpubox/src/llama.cpp rev-parse HEAD; echo @@; "
                   "cat /opt/gpubox/build/llama.cpp/gpubox-stamp.json; echo @@; cat /var/lib/gpubox/gpubox.lock.json")
    parts = out.split("@@\n")
    stamp, lock = json.loads(parts[7]), json.loads(parts[8])
    return {"text": parts[:7], "bin": {"files": stamp["files"], "links": stamp["links"]},
            "models": {k: {f: v for f, v in e.items() if f not in ("mtime_ns", "verified_at", "seconds")}
                       for k, e in lock["models"].items()},
            "box": lock["box"], "build": lock.get("build")}


@pytest.fixture(scope="module")
def wheels(sandbox, tmp_path_factory) -> Path:
    """gpubox's wheel (from the clone's files) and its dependencies (and pip) as wheels for the box's python3."""
    pyver = ".".join(ssh(sandbox, "python3 -c 'import sys; print(*sys.version_info[:2])'").split())
    dest = cache_root() / f"tool-wheels-py{pyver}"
    src = tracked_copy(REPO, tmp_path_factory.mktemp("clone"))
    own = tmp_path_factory.mktemp("own")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(own)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = own.glob("gpubox-*.whl")
    reqs = subprocess.run([sys.executable, "-c", "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); "
                           "m = [n for n in z.namelist() if n.endswith('METADATA')][0]; "
                           "print('\\n'.join(l.split(':', 1)[1].strip() for l in z.read(m).decode().splitlines() "
                           "if l.startswith('Requires-Dist:') and 'extra ==' not in l))", str(whl)],
                          capture_output=True, text=True, check=True).stdout.split("\n")
    stamp = dest / ".complete"
    want = "\n".join(sorted(r for r in reqs if r)) + "\npip\n"
    if not (stamp.exists() and stamp.read_text() == want):
        for req in [*[r for r in reqs if r], "pip"]:
            pip_download(req, dest, python_version=pyver, log=lambda m: None)
        stamp.write_text(want)
    out = tmp_path_factory.mktemp("wheels")
    for w in [*dest.glob("*.whl"), whl]:
        (out / w.name).write_bytes(w.read_bytes())
    return out


def fab(inf, task: str, report_dir: Path) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "fabric", "-S", inf.ssh_config, "-H", "gpubox", "-f", inf.overrides_file, task,
            "--set", f"report_dir={report_dir}"]
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_ENDPOINT": inf.hf_endpoint})


def local_provision(inf) -> tuple[str, dict]:
    """gpubox provision run by the box's own python3, on the box (reports in the box's own report dir)."""
    out = ssh(inf, f"cd /tmp && HF_ENDPOINT={inf.hf_endpoint} {GPUBOX} -f {ON_BOX}/overrides.yaml "
                   f"provision --set report_dir={ON_BOX}/reports; echo @@rc=$?")
    rc = int(out.rsplit("@@rc=", 1)[1])
    latest = json.loads(ssh(inf, f"cat {ON_BOX}/reports/localhost-latest.json"))
    assert rc == 0, out[-5000:]
    return out, {s["name"]: s for s in latest["steps"]}


@pytest.fixture(scope="module")
def runs(sandbox, sandbox_lock, wheels, tmp_path_factory):
    from testbed.sandbox import runtime

    def reset():
        runtime.reset(sandbox_lock, log=lambda m: None)

    reset()
    r = fab(sandbox, "provision", tmp_path_factory.mktemp("ssh"))
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    over_ssh = end_state(sandbox)
    reset()
    tar = subprocess.run(["tar", "-C", str(wheels), "-cf", "-", "."], capture_output=True, check=True).stdout
    ssh(sandbox, f"mkdir -p {ON_BOX}/wheels && tar -C {ON_BOX}/wheels -xf -", stdin=tar)
    # The sandbox's settings, less the controller's own ssh_config_path (a file of this machine, not the box's).
    overrides = {k: v for k, v in sandbox.overrides().items() if k != "ssh_config_path"}
    ssh(sandbox, f"cat > {ON_BOX}/overrides.yaml", stdin=yaml.safe_dump(overrides).encode())
    pip = f"python3 $(ls {ON_BOX}/wheels/pip-*.whl)/pip"
    install = ssh(sandbox, f"{pip} install -q --no-index --find-links {ON_BOX}/wheels --break-system-packages "
                           f"--root-user-action=ignore --target {ON_BOX}/lib gpubox 2>&1; echo @@rc=$?")
    assert install.rstrip().endswith("@@rc=0"), install[-4000:]
    first = local_provision(sandbox)
    on_box = end_state(sandbox)
    second = local_provision(sandbox)
    where = ssh(sandbox, f"cd /tmp && {GPUBOX} --version; PYTHONPATH={ON_BOX}/lib python3 -c "
                         "'import provision; print(provision.__file__)'")
    yield {"over_ssh": over_ssh, "on_box": on_box, "first": first, "second": second, "where": where,
           "site": f"{ON_BOX}/lib"}
    reset()


def test_the_installed_tool_is_the_boxs_own(runs):
    assert runs["where"].startswith("gpubox 0.1.0")
    assert runs["where"].strip().endswith(f"{runs['site']}/provision/__init__.py")


def test_local_run_changes_all_six_steps_and_reaches_the_ssh_runs_end_state(runs):
    out, steps = runs["first"]
    assert "gpubox provision on localhost" in out
    assert [steps[n]["status"] for n in STEPS] == ["changed"] * 6, out[-3000:]
    assert runs["on_box"] == runs["over_ssh"]


def test_second_local_run_changes_nothing(runs):
    out, steps = runs["second"]
    assert [steps[n]["status"] for n in STEPS] == ["ok"] * 6, out[-3000:]
    assert all(steps[n]["ran"] == [] and steps[n]["changes"] == [] for n in STEPS)
    assert "0 changed" in out
