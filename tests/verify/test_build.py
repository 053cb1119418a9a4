"""testinfra: step 5 (build) on the target: the binaries of the pinned commit, runnable, every library
resolved (CUDA ones included on a CUDA build), with the stamp and the flag dialect next to them."""

import json
import shlex

import pytest

from provision import config
from provision.steps import build as step


def _home(host, gcfg) -> str:
    user = gcfg.get("user") or host.user().name
    return host.user(user).home


@pytest.fixture(scope="module")
def bdir(host, gcfg):
    b = gcfg["build"]["build_dir"]
    return _home(host, gcfg) + b[1:] if b.startswith("~/") else b


@pytest.fixture(scope="module")
def sha(gcfg):
    return config.fork_pin(gcfg)["sha"]


@pytest.fixture(scope="module")
def targets(gcfg):
    return list(gcfg["build"]["targets"])


def test_binaries_present_and_executable(host, bdir, targets):
    for t in targets:
        f = host.file(f"{bdir}/bin/{t}")
        assert f.is_file, f"{bdir}/bin/{t} missing"
        assert f.mode & 0o111, f"{bdir}/bin/{t} not executable ({oct(f.mode)})"


def test_version_names_the_pinned_commit(host, bdir, sha, targets):
    if step.SERVER not in targets:
        pytest.skip("llama-server is not among build.targets")
    r = host.run(f"{shlex.quote(bdir + '/bin/' + step.SERVER)} --version")
    out = r.stdout + r.stderr
    assert r.rc == 0, out
    line = next((ln for ln in out.splitlines() if ln.startswith("version")), "")
    assert step.names_commit(line, sha), f"--version says {line!r}, pinned {sha}"


def test_every_library_resolves(host, bdir, gcfg, targets):
    for t in targets:
        out = host.check_output(f"ldd {shlex.quote(bdir + '/bin/' + t)}")
        missing = [ln.strip() for ln in out.splitlines() if "not found" in ln]
        assert not missing, f"{t}: {missing}"
        if gcfg["build"]["cuda"] and t == step.SERVER:
            # ggml-cuda links cudart and cublas; both must resolve on a CUDA build.
            assert "libggml-cuda" in out, out
            cuda = host.check_output(f"ldd {shlex.quote(bdir + '/bin/libggml-cuda.so')}")
            assert "libcudart" in cuda and "libcublas" in cuda, cuda
            assert "not found" not in cuda, cuda


def test_stamp_matches_the_pin(host, bdir, sha, targets, gcfg):
    f = host.file(f"{bdir}/{step.STAMP_FILE}")
    assert f.is_file
    stamp = json.loads(f.content_string)
    assert stamp["sha"] == sha
    assert set(targets) <= set(stamp["targets"])
    assert f"-DGGML_CUDA={'ON' if gcfg['build']['cuda'] else 'OFF'}" in stamp["cmake_args"]
    assert stamp["compilers"]["cxx"], stamp["compilers"]


def test_dialect_stored_for_the_serve_step(host, bdir, targets):
    if step.SERVER not in targets:
        pytest.skip("llama-server is not among build.targets")
    from provision.serve import helptext
    f = host.file(f"{bdir}/{step.DIALECT_FILE}")
    assert f.is_file
    d = helptext.from_json(f.content_string)
    assert "--cache-type-k" in d["flags"] and "--port" in d["flags"]
    assert d["values"].get("cache_type"), d["values"]
    assert d["dialect"] in helptext.DIALECTS


def test_source_checkout_is_the_pin_with_history(host, gcfg, sha):
    src = gcfg["build"]["src_dir"]
    src = _home(host, gcfg) + src[1:] if src.startswith("~/") else src
    q = shlex.quote(src)
    assert host.check_output(f"git -C {q} rev-parse HEAD") == sha
    # a full clone: the build number (commit count) is right only with the whole history
    assert host.check_output(f"git -C {q} rev-parse --is-shallow-repository") == "false"


def test_installed_files_match_the_stamp_and_the_lock(host, bdir, gcfg):
    """Every file in bin/ has the size and sha256 the build recorded (stamp and lock agree), and bin/
    holds nothing the build did not record."""
    from provision import lockfile, repro
    stamp = json.loads(host.file(f"{bdir}/{step.STAMP_FILE}").content_string)
    assert stamp.get("files"), "the stamp records no sha256 of bin/ (run invoke build)"
    now = repro.parse_manifest(host.check_output(repro.manifest_command(f"{bdir}/bin")))
    changed = [n for n in stamp["files"] if now["files"].get(n) != stamp["files"][n]]
    assert not changed, f"changed since the build: {changed} (rebuild with invoke build)"
    assert now["links"] == stamp.get("links", {})
    extra = sorted(set(now["files"]) - set(stamp["files"]))
    assert not extra, f"not from this build: {extra}"
    lock = host.file(lockfile.path(gcfg))
    assert lock.is_file, f"no lock file at {lockfile.path(gcfg)}"
    entry = json.loads(lock.content_string).get("build")
    assert entry == lockfile.build_entry(stamp, bdir), \
        f"the lock's build record differs from the stamp: {str(entry)[:300]}"
