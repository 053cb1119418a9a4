"""testinfra: step 6 (models) on the target: both GGUF files present under models.dir, owned by the
configured user, size and sha256 as locked, headers readable, the assistant's architecture the fork
profile's. The sha256 is re-computed only with `invoke verify --deep` (GPUBOX_VERIFY_DEEP=1); otherwise
size and mtime must equal what the lock recorded when the file was verified (16 GB are not re-read)."""

import base64
import os

import pytest

from provision import config, fetch, ggufhead, lockfile


@pytest.fixture(scope="module")
def owner(host, gcfg):
    return gcfg.get("user") or host.user().name


@pytest.fixture(scope="module")
def mdir(host, gcfg, owner):
    d = gcfg["models"]["dir"]
    return host.user(owner).home.rstrip("/") + d[1:] if d.startswith("~/") else d


@pytest.fixture(scope="module")
def lock(host, gcfg):
    f = host.file(lockfile.path(gcfg))
    assert f.exists, f"{lockfile.path(gcfg)} is missing: run `invoke models` (the lock is written after a verified download)"
    return lockfile.parse(f.content_string)


def keys():
    return list(config.defaults()["gpubox"]["models"]["files"])


@pytest.fixture(params=keys())
def key(request, gcfg):
    if request.param not in gcfg["models"]["files"]:
        pytest.skip(f"models.files.{request.param} is not configured")
    return request.param


def test_file_present_owned_and_as_locked(host, gcfg, lock, mdir, owner, key):
    f = gcfg["models"]["files"][key]
    e = lock["models"].get(key)
    assert e, f"the lock has no entry for {key}"
    assert (e["repo"], e["filename"]) == (f["repo"], f["filename"])
    assert f["revision"] in (e["revision"], e["commit"]) and len(e["commit"]) == 40
    if f.get("sha256"):
        assert e["sha256"] == f["sha256"]
    path = f"{mdir}/{f['filename']}"
    fh = host.file(path)
    assert fh.is_file, f"{path} missing"
    assert fh.user == owner
    assert fh.size == e["size"]
    if os.environ.get("GPUBOX_VERIFY_DEEP") == "1":
        assert fh.sha256sum == e["sha256"]
    else:
        st = host.check_output("python3 -c %s %s", "import os,sys; print(os.stat(sys.argv[1]).st_mtime_ns)", path)
        assert int(st) == e["mtime_ns"], "changed since it was verified: run `invoke verify --deep` or `invoke models`"
    # no partial files left behind next to it
    assert not host.file(f"{mdir}/.{f['filename']}{fetch.PARTIAL_SUFFIX}").exists


def test_header_readable_and_architecture(host, gcfg, lock, mdir, key, tmp_path):
    f = gcfg["models"]["files"][key]
    path = f"{mdir}/{f['filename']}"
    head = base64.b64decode(host.check_output("head -c 1048576 %s | base64 -w0", path))
    local = tmp_path / "head.gguf"
    local.write_bytes(head)
    arch = ggufhead.architecture(str(local))
    assert arch == lock["models"][key]["arch"]
    if key == (gcfg["serve"].get("draft_model") or ""):
        want = config.fork_pin(gcfg)["assistant_arch"]
        assert arch == want, (f"{f['filename']} is {arch!r}; the fork profile {config.fork_pin(gcfg)['profile']} loads "
                              f"{want!r}: pick the matching build.profile or assistant revision")


def test_lock_describes_the_box(lock, gcfg):
    assert lock["box"]["fork"]["wanted_sha"] == config.fork_pin(gcfg)["sha"]
    assert set(lock["box"]) >= {"fork", "driver", "cuda", "compiler", "os"}
