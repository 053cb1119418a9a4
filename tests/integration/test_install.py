"""The installed tool: a fresh venv outside the clone, `pip install <clone>` (not editable), then from /tmp:
`gpubox --list`, `gpubox plan` (this machine) and `gpubox -H gpubox -S <sandbox ssh config> provision`
against the sandbox (twice: the second changes nothing), then `gpubox ... serve` (launch files from the
wheel's templates) and `gpubox ... verify` with the testinfra suite the wheel carries.

The venv has no access to the clone: no PYTHONPATH, no system site-packages, its working directory is a
temporary directory; the test checks that `provision` is imported from the venv. pip installs the
dependencies from the package index (pip's cache makes later runs fast) and the clone's files from a copy
of what git tracks, so setuptools' build/ directory of an earlier run cannot leak into the wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.testing import tracked_copy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(root / "v")], check=True, timeout=300)
    src = tracked_copy(REPO, tmp_path_factory.mktemp("clone"))
    r = subprocess.run([str(root / "v/bin/pip"), "install", "-q", str(src)], capture_output=True, text=True,
                       timeout=1200, env=_clean_env(), cwd=str(root))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root / "v"


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(extra)
    return env


def gpubox(venv: Path, cwd: Path, *args: str, timeout: int = 1800, **env) -> subprocess.CompletedProcess:
    r = subprocess.run([str(venv / "bin/gpubox"), *args], cwd=str(cwd), capture_output=True, text=True,
                       timeout=timeout, env=_clean_env(**env))
    print(f"$ gpubox {' '.join(args)}  (exit {r.returncode})\n{r.stdout[-4000:]}\n{r.stderr[-2000:]}")
    return r


def test_installed_package_is_the_venvs_own(venv, tmp_path):
    r = subprocess.run([str(venv / "bin/python"), "-c", "import provision, provision.resources as r, sys; "
                        "print(provision.__file__); print(r.TEMPLATES); print(r.PATCHES); print(r.VERIFY); "
                        "print(any(m.startswith('testbed') for m in sys.modules))"],
                       cwd=str(tmp_path), capture_output=True, text=True, env=_clean_env(), timeout=120)
    lines = r.stdout.split()
    assert r.returncode == 0, r.stderr
    assert all(line.startswith(str(venv)) for line in lines[:4]), lines
    assert lines[4] == "False"
    r = subprocess.run([str(venv / "bin/python"), "-c", "import testbed"], cwd=str(tmp_path),
                       capture_output=True, text=True, env=_clean_env(), timeout=120)
    assert r.returncode != 0 and "No module named 'testbed'" in r.stderr


def test_list_and_local_plan_from_tmp(venv, tmp_path):
    r = gpubox(venv, tmp_path, "--list")
    assert r.returncode == 0, r.stderr
    listed = {line.split()[0] for line in r.stdout.splitlines()[1:] if line.strip()}
    assert {"plan", "provision", "driver", "cuda", "compiler", "patch", "build", "models", "verify", "serve.start",
            "tune", "doctor"} <= listed
    assert not {t for t in listed if t.startswith("sandbox") or t == "demo"}
    r = gpubox(venv, tmp_path, "plan", "--set", f"report_dir={tmp_path}/reports", HF_ENDPOINT="http://127.0.0.1:9",
               HOME=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gpubox plan on localhost" in r.stdout and "not Fedora 42" in r.stdout


def test_provision_and_verify_the_sandbox_over_ssh_from_tmp(venv, sandbox, reset_sandbox, tmp_path):
    reset_sandbox()
    reports = tmp_path / "reports"
    common = ["-S", sandbox.ssh_config, "-H", "gpubox", "-f", sandbox.overrides_file]
    env = {"HF_ENDPOINT": sandbox.hf_endpoint}
    r = gpubox(venv, tmp_path, *common, "provision", "--set", f"report_dir={reports}", **env)
    assert r.returncode == 0, r.stdout + r.stderr
    (latest,) = reports.glob("*-latest.json")
    rep = json.loads(latest.read_text())
    assert rep["mode"] == "provision"
    assert [s["name"] for s in rep["steps"]] == ["driver", "cuda", "compiler", "patch", "build", "models"]
    assert {s["name"]: s["status"] for s in rep["steps"]} == {n: "changed" for n in
                                                              ("driver", "cuda", "compiler", "patch", "build", "models")}
    again = gpubox(venv, tmp_path, *common, "provision", "--set", f"report_dir={reports}", **env)
    assert again.returncode == 0
    rep2 = json.loads(latest.read_text())
    assert {s["status"] for s in rep2["steps"]} == {"ok"}, again.stdout
    # serve renders its launch files from the templates the wheel carries; verify's suite checks it too
    srv = gpubox(venv, tmp_path, *common, "serve", "--set", f"report_dir={reports}", **env)
    try:
        assert srv.returncode == 0, srv.stdout + srv.stderr
        v = gpubox(venv, tmp_path, *common, "verify", "--set", f"report_dir={reports}", **env)
        assert v.returncode == 0, v.stdout + v.stderr
        assert f"{venv}/lib/" in v.stdout and "/provision/verify" in v.stdout   # the wheel's suite, not tests/verify
    finally:
        gpubox(venv, tmp_path, *common, "serve.stop", **env)
        reset_sandbox()
