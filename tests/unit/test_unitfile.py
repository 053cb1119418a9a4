"""The systemd unit rendered from hostile-but-valid paths passes `systemd-analyze verify` (Debian's systemd
package; no systemd as PID 1 needed), which also checks that ExecStart='s program exists at the path the
unit names: so the escaping resolves to the real file, not to a split or %-expanded one. The unescaped
rendering of the same paths fails it (the control). The env file reads back the same in sh."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from provision import config
from provision.engine import StepError
from provision.serve import service, step, unitfile

HELP = Path(__file__).resolve().parent.parent / "data" / "help"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed (scripts/setup installs "
                                                           "Debian's systemd package)")

# Valid for the schema (no quote, backslash or control character), hostile for a unit file and a shell.
HOSTILE_DIRS = [
    "gpu box %h",
    "%i %n %% %U $HOME ${PATH} $$",
    "semi;colon & pipe| <in >out (sub) [glob]* ?{a,b} !bang ~tilde #hash =eq ,comma :colon",
    "utf8 é 中文 ∆",
    "two  spaces and a percent at the end %",
]


def facts(tmp: Path) -> dict:
    sf = {"binary": "yes", "model_readable": "yes", "draft_readable": "yes", "port": "closed",
          "help": (HELP / "llama-server-help.current-b10018-1.2.0.txt").read_text()}
    from tests.unit.test_service import pair_headers
    return {"serve": sf, "home": str(tmp / "home"), "user": {"name": "root", "uid": 0}, "systemd": "yes",
            "serve_gguf": pair_headers()}


def render(tmp: Path, name: str) -> tuple[dict, dict, service.Layout]:
    state = tmp / "srv" / name.strip()
    g = config.defaults()["gpubox"]
    g["state_dir"] = str(state)
    g["build"]["build_dir"] = str(tmp / "build dir %b $X")
    cfg = config.validate(g)
    f = facts(tmp)
    r, files, _ = step.wanted(f, cfg)
    return cfg, files, service.layout(cfg, f["home"])


def materialize(files: dict, lay: service.Layout, tmp: Path) -> Path:
    """The files at the paths the unit names (the launch script executable), and the unit itself."""
    Path(lay.dir).mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        if path == service.UNIT_PATH:
            continue
        Path(path).write_text(text)
        if path.endswith(".sh"):
            Path(path).chmod(0o755)
    unit = tmp / service.UNIT_NAME
    unit.write_text(files[service.UNIT_PATH])
    return unit


def verify(unit: Path) -> subprocess.CompletedProcess:
    return subprocess.run([ANALYZE, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=120)


@needs_analyze
@pytest.mark.parametrize("name", HOSTILE_DIRS, ids=range(len(HOSTILE_DIRS)))
def test_unit_from_hostile_paths_passes_systemd_analyze_verify(tmp_path, name):
    cfg, files, lay = render(tmp_path, name)
    unit = materialize(files, lay, tmp_path)
    r = verify(unit)
    assert r.returncode == 0, files[service.UNIT_PATH] + r.stdout + r.stderr
    # nothing at all said about our unit (a warning would be a misread line)
    ours = [l for l in (r.stdout + r.stderr).splitlines() if service.UNIT_NAME in l or str(unit) in l]
    assert ours == [], ours
    lines = files[service.UNIT_PATH].splitlines()
    exec_line = next(l for l in lines if l.startswith("ExecStart="))
    assert "%%" in exec_line or "%" not in lay.launch


@needs_analyze
def test_the_unescaped_unit_fails_verify(tmp_path):
    """The control: the same paths pasted as they are (what the template did before) do not verify."""
    cfg, files, lay = render(tmp_path, "gpu box %h")
    materialize(files, lay, tmp_path)
    raw = service.render_template("llama-server.service.j2", model_name="m", user="root", group="root",
                                  env_file=lay.env, launch_script=lay.launch, mlock=True,
                                  unit_name=service.UNIT_NAME)
    unit = tmp_path / "raw" / service.UNIT_NAME
    unit.parent.mkdir()
    unit.write_text(raw)
    r = verify(unit)
    assert r.returncode != 0 and "is not executable" in r.stdout + r.stderr


@pytest.mark.parametrize("name", HOSTILE_DIRS, ids=range(len(HOSTILE_DIRS)))
def test_env_file_reads_back_the_same_in_sh(tmp_path, name):
    cfg, files, lay = render(tmp_path, name)
    env = files[lay.env]
    want = next(l for l in env.splitlines() if l.startswith("LD_LIBRARY_PATH="))
    p = tmp_path / "env"
    p.write_text(env)
    out = subprocess.run(["sh", "-c", '. "$1"; printf %s "$LD_LIBRARY_PATH"', "sh", str(p)], capture_output=True,
                         text=True).stdout
    assert out == str(tmp_path / "build dir %b $X") + "/bin:/usr/local/cuda-12.9/lib64", want


def test_values_systemd_would_refuse_are_refused_not_rendered():
    for bad in ('/srv/o"q/x.sh', "/srv/o'q/x.sh", "/srv/back\\slash/x.sh", "/srv/new\nline/x.sh", "rel/x.sh"):
        with pytest.raises(unitfile.UnitValueError):
            unitfile.exec_path(bad)
    for bad in ("/srv/x\n[Service]", " /srv/x", "/srv/x\t"):
        with pytest.raises(unitfile.UnitValueError):
            unitfile.path_value(bad)
    with pytest.raises(unitfile.UnitValueError):
        unitfile.env_quote("a\nb")


def test_a_home_with_a_quote_stops_the_serve_step_with_the_fix(tmp_path):
    """state_dir ~/... resolved against a home with a quote: the schema cannot see it, the renderer can."""
    g = config.defaults()["gpubox"]
    g["state_dir"] = "/srv/o'brien/gpubox"   # (refused by the schema; forced past it here)
    cfg = config.validate(config.defaults()["gpubox"])
    cfg["state_dir"] = g["state_dir"]
    with pytest.raises(StepError, match="systemd refuses quotes"):
        step.wanted(facts(tmp_path), cfg)
