"""The wheel holds the product and its data, and nothing of the test bench; the product never loads testbed.

- The wheel built from the tracked files holds provision/ with templates/, patches/ and the verify suite mapped
  into it (provision/resources.py finds them there), the `gpubox` console script, and no testbed module.
- `import provision` (every module of it) and `invoke plan` in a clone load no module of testbed/.
"""

from __future__ import annotations

import ast
import configparser
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from provision import resources
from testbed.testing import tracked_copy

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tracked_copy(REPO, tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src),
                        "-w", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = out.glob("gpubox-*.whl")
    return whl


def test_wheel_holds_the_product_and_its_data_only(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"provision"}, tops
    for d, (inside, in_clone) in resources.LAYOUT.items():
        repo_files = {p.relative_to(REPO / in_clone).as_posix() for p in (REPO / in_clone).rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts}
        shipped = {n[len(f"provision/{inside}/"):] for n in names if n.startswith(f"provision/{inside}/")}
        assert repo_files and repo_files == shipped, (d, repo_files ^ shipped)
    assert {"provision/defaults.yaml", "provision/tune/probe.sh", "provision/cli.py", "provision/tasks.py"} <= names
    # Every package directory of provision/ is in the wheel (a new subpackage must be listed in pyproject.toml).
    for init in (REPO / "provision").rglob("__init__.py"):
        assert init.relative_to(REPO).as_posix() in names


def test_wheel_declares_the_gpubox_command(wheel):
    z = zipfile.ZipFile(wheel)
    (ep,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
    cp = configparser.ConfigParser()
    cp.read_string(z.read(ep).decode())
    assert cp["console_scripts"]["gpubox"] == "provision.cli:main"


def test_no_provision_module_imports_testbed():
    """Statically: no import of testbed anywhere in provision/ (not even inside a function)."""
    offenders = []
    for py in (REPO / "provision").rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{py.relative_to(REPO)}: {m}" for m in mods if m.split(".")[0] == "testbed"]
    assert offenders == []


LOADED_TESTBED = ("import atexit, sys\n"
                  "atexit.register(lambda: print('@@testbed', sorted(m for m in sys.modules if m.split('.')[0] "
                  "== 'testbed'), file=sys.stderr))\n")


def _run(code: str, *args: str, cwd: Path = REPO, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_ENDPOINT="http://127.0.0.1:9", HOME=str(tmp))
    return subprocess.run([sys.executable, "-c", LOADED_TESTBED + code, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _testbed_modules(stderr: str) -> list:
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("@@testbed ")]
    return ast.literal_eval(line[len("@@testbed "):])


def test_importing_every_provision_module_loads_no_testbed(tmp_path):
    code = ("import pkgutil, importlib, provision\n"
            "for m in pkgutil.walk_packages(provision.__path__, 'provision.'):\n"
            "    importlib.import_module(m.name)\n"
            "import provision.cli\n")
    r = _run(code, tmp=tmp_path)
    assert r.returncode == 0, r.stderr
    assert _testbed_modules(r.stderr) == []


def test_invoke_plan_in_the_clone_loads_no_testbed(tmp_path):
    """`invoke plan` runs for real on this (non-Fedora) machine: the plan prints, the test bench stays unloaded."""
    code = "import sys\nfrom invoke.main import program\nprogram.run(['invoke'] + sys.argv[1:])\n"
    r = _run(code, "plan", "--set", f"report_dir={tmp_path}/reports", tmp=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "gpubox plan on localhost" in r.stdout
    assert _testbed_modules(r.stderr) == []
    # ... while the sandbox tasks of the clone do load it when they run.
    r = _run(code, "sandbox.status", tmp=tmp_path)
    assert "testbed.sandbox.tasks" in _testbed_modules(r.stderr)
