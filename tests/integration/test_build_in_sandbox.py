"""Integration: step 5 for real, inside the sandbox over SSH -- a CPU-only build (build.cuda=false, the
sandbox's overrides) of llama-server from the sandbox's llama.cpp mirror, with ccache under the
persistent mount (a sandbox reset keeps it: a rerun is mostly cache hits). Then: the testinfra
verification, a tiny GGUF served and /health answered, a second build with zero changes, a new SHA
rebuilding, an unreachable URL and an unknown SHA failing clearly with nothing removed, and a second
clean build of the pin in other directories giving the same bytes for every file in bin/.

Cold, on 2 cores, the llama-server build takes about 26 minutes; warm (ccache) a few minutes. The
reproducibility check adds a second build of the same size (its own ccache: cold once, then warm).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision import config, repro
from provision.engine import CHANGED, FAILED, OK, Runner
from provision.host import Host
from provision.steps import build as step

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TARGETS = "build.targets=[llama-server]"   # what the serve step needs; keeps CI within its budget


def run(c, *sets: str, report_dir: Path):
    cfg = config.load(c, [TARGETS, f"report_dir={report_dir}", *sets])
    report = Runner(Host(c), cfg, [step], echo=lambda s: None).run()
    return report, report.steps[0], cfg


def sh(c, command: str) -> str:
    return c.run(command, hide=True).stdout.strip()


def connect(inf):
    """A Fabric Connection to the sandbox with its gpubox overrides (as conftest's `conn`, module-scoped)."""
    from fabric import Config, Connection
    cfg = Config(overrides={"run": {"in_stream": False}}, runtime_ssh_path=inf.ssh_config)
    cfg.load_collection(config.defaults())
    cfg.load_overrides({"run": {"in_stream": False}, **inf.overrides()})
    return Connection("gpubox", config=cfg)


@pytest.fixture(scope="module")
def built(sandbox, tmp_path_factory):
    """Build once per module (the sandbox is reset at session start; ccache survives the reset)."""
    c = connect(sandbox)
    reports = tmp_path_factory.mktemp("build-reports")
    report, res, cfg = run(c, report_dir=reports)
    assert res.status in (CHANGED, OK), res.error + "\n" + Path(res.log).read_text()[-3000:] if res.log else res.error
    yield c, cfg, res, reports
    c.close()


def test_cpu_build_in_the_sandbox(built, sandbox):
    c, cfg, res, _ = built
    b = cfg["build"]
    assert cfg["build"]["sha"] == sandbox.git_sha and not b["cuda"]
    assert res.info["sha"] == sandbox.git_sha
    bdir = b["build_dir"]
    out = c.run(f"{bdir}/bin/llama-server --version", hide=True, warn=True)
    assert out.exited == 0, out.stderr
    assert step.names_commit(out.stdout + out.stderr, sandbox.git_sha), out.stderr
    stamp = json.loads(sh(c, f"cat {bdir}/{step.STAMP_FILE}"))
    assert stamp["sha"] == sandbox.git_sha and "-DGGML_CUDA=OFF" in stamp["cmake_args"]
    assert stamp["generator"] == "Ninja"
    assert any(a.startswith("-DCMAKE_CXX_COMPILER_LAUNCHER=") for a in stamp["cmake_args"])
    dialect = json.loads(sh(c, f"cat {bdir}/{step.DIALECT_FILE}"))
    assert dialect["dialect"] == "upstream" and "--cache-type-k" in dialect["flags"]
    # a full clone, detached at the pin, .git kept
    assert sh(c, f"git -C {b['src_dir']} rev-parse HEAD") == sandbox.git_sha
    assert sh(c, f"git -C {b['src_dir']} rev-parse --is-shallow-repository") == "false"
    # ccache lives under the persistent mount
    assert "gpubox-persist" in sh(c, "ccache -k cache_dir")


def test_testinfra_verification_passes(built, sandbox, tmp_path):
    c, cfg, _, _ = built
    cfgfile = tmp_path / "verify-config.json"
    cfgfile.write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                        str(REPO / "tests" / "verify" / "test_build.py"), "--hosts=ssh://gpubox",
                        f"--ssh-config={sandbox.ssh_config}"],
                       cwd=str(REPO), env=dict(os.environ, GPUBOX_CONFIG=str(cfgfile)), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout


def test_built_server_answers_health(built, tmp_path):
    from testbed.testmodels import write_tiny
    c, cfg, _, _ = built
    gguf = write_tiny(tmp_path / "tiny.gguf")
    c.put(str(gguf), "/tmp/gpubox-build-tiny.gguf")
    server = f"{cfg['build']['build_dir']}/bin/llama-server"
    port = 18431
    c.run(f"nohup {server} -m /tmp/gpubox-build-tiny.gguf --host 127.0.0.1 --port {port} -c 256 -t 1 "
          f"> /tmp/gpubox-build-server.log 2>&1 & echo $! > /tmp/gpubox-build-server.pid", hide=True)
    try:
        probe = ("import json,time,urllib.request\n"
                 "for i in range(120):\n"
                 "    try:\n"
                 f"        r=urllib.request.urlopen('http://127.0.0.1:{port}/health',timeout=2); print(r.status, r.read().decode()); break\n"
                 "    except Exception as e:\n"
                 "        time.sleep(0.5)\n")
        out = c.run("python3 -", in_stream=__import__("io").StringIO(probe), hide=True, warn=True).stdout
        assert out.startswith("200") and '"ok"' in out, out + sh(c, "tail -n 20 /tmp/gpubox-build-server.log")
    finally:
        c.run("kill $(cat /tmp/gpubox-build-server.pid) 2>/dev/null; true", hide=True, warn=True)


def test_second_build_has_zero_changes(built):
    c, _, _, reports = built
    report, res, _ = run(c, report_dir=reports)
    assert res.status == OK, (res.status, res.changes, res.error)
    assert res.changes == [] and report.changed == 0


def test_unreachable_url_and_unknown_sha_fail_clearly_and_remove_nothing(built):
    c, cfg, _, reports = built
    b = cfg["build"]
    before = sh(c, f"stat -c %Y {b['build_dir']}/bin/llama-server; git -C {b['src_dir']} rev-parse HEAD")
    # unreachable URL, source dir not yet there: a clone is needed and fails
    _, res, _ = run(c, "build.repo_url=file:///srv/git/no-such-repo.git", "build.src_dir=/opt/gpubox/src/other",
                    report_dir=reports)
    assert res.status == FAILED
    assert "cannot clone file:///srv/git/no-such-repo.git" in res.error and "nothing was removed" in res.error
    assert c.run("test -e /opt/gpubox/src/other", warn=True, hide=True).exited != 0
    # unknown SHA in the existing clone: fetch finds nothing, checkout unchanged
    _, res, _ = run(c, "build.sha=" + "1" * 40, report_dir=reports)
    assert res.status == FAILED and f"commit {'1' * 40} is not in" in res.error, res.error
    after = sh(c, f"stat -c %Y {b['build_dir']}/bin/llama-server; git -C {b['src_dir']} rev-parse HEAD")
    assert after == before
    assert sh(c, f"test -f {b['build_dir']}/{step.STAMP_FILE} && echo yes") == "yes"


def test_new_sha_rebuilds_then_back(built, sandbox):
    """A second commit (a README edit) in a repository inside the target: the step fetches it, checks it
    out and rebuilds (only build-info and the links: ccache + Ninja), and --version names it."""
    c, cfg, _, reports = built
    b = cfg["build"]
    c.run("rm -rf /tmp/llama2 && git clone -q /srv/git/llama.cpp.git /tmp/llama2 && cd /tmp/llama2 && "
          "echo >> README.md && git -c user.name=t -c user.email=t@t commit -qam 'second commit'", hide=True)
    new = sh(c, "git -C /tmp/llama2 rev-parse HEAD")
    _, res, _ = run(c, "build.repo_url=/tmp/llama2", f"build.sha={new}", report_dir=reports)
    assert res.status == CHANGED, res.error
    assert any(ch["what"].startswith("build llama-server") and "pinned " + new[:12] in ch["why"] for ch in res.changes)
    out = c.run(f"{b['build_dir']}/bin/llama-server --version", hide=True, warn=True)
    assert step.names_commit(out.stderr + out.stdout, new)
    # and back to the mirror's commit: rebuilt again, zero changes after that
    _, res, _ = run(c, report_dir=reports)
    assert res.status == CHANGED, res.error
    _, res, _ = run(c, report_dir=reports)
    assert res.status == OK and res.changes == []


# The second build's places: another clone, another build directory, both at other depths and lengths
# than /opt/gpubox/src/llama.cpp and /opt/gpubox/build/llama.cpp.
REPRO_SRC = "/srv/gpubox-repro/second-source-tree/llama.cpp"
REPRO_BUILD = "/var/tmp/b"


def test_second_clean_build_elsewhere_is_bit_identical(built, sandbox, capsys):
    """Issue 15: the pin built again from a second clone into a second, emptied build directory
    (`repro.check_build`, what `invoke build --check-reproducible` runs) gives the same bytes for every
    file in bin/: the executable, each shared library, each symbolic link.

    The second build has a ccache of its own (CCACHE_DIR=<persist>/ccache-repro, never shared with the
    first build's), so that a warm CI run stays short. What each run proves:
    - cold (first run, or after the cache is emptied or a compiler flag changes): two builds, every
      object compiled twice, at different times, by different processes, in different directories,
      give identical bytes: path independence AND run-to-run determinism of the compilers.
    - warm: the objects of each side come from that side's own earlier compilation in its own
      directory (ccache keys hold the command line, which names the directories, so a hit can never
      hand one side's object to the other); linking, build-info and the stamp are redone. It proves
      again that the two directories' objects are identical and that linking is deterministic; it does
      NOT re-prove that today's compiler runs give the bytes the cached ones did (the cold run did).
    `invoke build --check-reproducible` itself builds its second copy with no ccache at all."""
    c, cfg, _, reports = built
    t0 = time.monotonic()
    same, text = repro.check_build(c, [TARGETS, f"report_dir={reports}"], extra_sets=[
        f"build.src_dir={REPRO_SRC}", f"build.build_dir={REPRO_BUILD}", "build.ccache=true",
        "build.ccache_dir=/var/cache/gpubox-persist/ccache-repro"], echo=lambda s: None)
    seconds = time.monotonic() - t0
    with capsys.disabled():
        print(f"\n[repro] second build + comparison: {seconds:.0f} s\n{text}")
    assert same, text
    stamp_a = json.loads(sh(c, f"cat {cfg['build']['build_dir']}/{step.STAMP_FILE}"))
    stamp_b = json.loads(sh(c, f"cat {REPRO_BUILD}/{step.STAMP_FILE}"))
    assert stamp_a["files"] == stamp_b["files"] and stamp_a["links"] == stamp_b["links"]
    names = set(stamp_b["files"])
    assert "llama-server" in names and any(n.startswith("libllama.so") for n in names), names
    assert any(n.startswith("libggml-base.so") for n in names) and any(n.startswith("libggml-cpu.so") for n in names)
    assert f"{len(stamp_b['files']) + len(stamp_b['links'])} entries compared: every file identical" in text
    # and neither build's real directories are named inside any file of bin/
    for d in (cfg["build"]["src_dir"], cfg["build"]["build_dir"], REPRO_SRC, REPRO_BUILD):
        found = sh(c, f"grep -rlF {d} {REPRO_BUILD}/bin {cfg['build']['build_dir']}/bin || true")
        assert found == "", f"{d} is embedded in: {found}"
    # the second build really ran in its own place, and the RPATH is $ORIGIN, not a directory
    assert sh(c, f"git -C {REPRO_SRC} rev-parse HEAD") == sandbox.git_sha
    dyn = sh(c, f"readelf -d {REPRO_BUILD}/bin/llama-server | grep -E 'RPATH|RUNPATH' || true")
    assert "$ORIGIN" in dyn and "/var/tmp" not in dyn, dyn
