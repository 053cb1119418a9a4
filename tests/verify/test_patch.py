"""testinfra: step 4 (patch) on the target: the CUDA header carries the patch, the backup of the
original exists, and `rpm -V cuda-crt-12-9` flags that one file only."""

import hashlib
import shlex

import pytest

from provision.steps import patch


@pytest.fixture(scope="module")
def rs(gcfg):
    return patch.rules_for(gcfg)


@pytest.fixture(scope="module")
def header(host, gcfg):
    f = host.file(patch.header_path(gcfg))
    assert f.exists, f"{patch.header_path(gcfg)} is missing: CUDA is not installed (cuda step)"
    return f


def test_header_carries_the_patch(header, rs):
    text = header.content_string
    a = patch.analyze_text(text, rs)
    assert a.satisfied, f"{header.path}: {a.kind} {a.pairs} {a.problems}"
    assert set(a.pairs) == {"rsqrt", "rsqrtf", "sinpi", "sinpif", "cospi", "cospif"}


def test_backup_is_the_unpatched_original(host, header, rs):
    text = header.content_string
    a = patch.analyze_text(text, rs)
    b = host.file(header.path + patch.BACKUP_SUFFIX)
    if a.kind == "patched-recipe" and not b.exists:
        pytest.skip("patched by hand in the recipe's style before gpubox ran: no gpubox backup")
    assert b.exists, f"{b.path} is missing"
    assert b.user == header.user and b.mode == header.mode
    orig = b.content_string
    assert patch.analyze_text(orig, rs).kind in ("unpatched", "partial")
    if a.kind == "patched-gpubox":
        assert patch.transform(orig, rs) == text, "the header is not the backup with gpubox's patch applied"


def test_header_owner_and_mode_are_the_packages(host, header):
    """What the package installed: root-owned, world-readable, not writable by others."""
    assert header.user == "root"
    assert header.mode & 0o004 and not header.mode & 0o002


def test_rpm_verify_flags_only_the_header(host, header):
    if not host.exists("rpm") or host.run("rpm -q cuda-crt-12-9").rc != 0:
        pytest.skip("no rpm package cuda-crt-12-9 on this host (header not installed from the RPM)")
    r = host.run("rpm -V cuda-crt-12-9")
    flagged = [line.split()[-1] for line in r.stdout.splitlines() if line.strip()]
    assert flagged == [header.path], r.stdout
    # ...and it is flagged for its content (size/digest/mtime), not its owner or mode.
    line = r.stdout.splitlines()[0]
    attrs = line.split()[0]
    assert "5" in attrs and "U" not in attrs and "G" not in attrs and "M" not in attrs, line


def test_hpp_is_untouched(host, header):
    """The step changes math_functions.h only (patches/README.md says why not the .hpp)."""
    if not host.exists("rpm") or host.run("rpm -q cuda-crt-12-9").rc != 0:
        pytest.skip("no rpm package cuda-crt-12-9 on this host")
    hpp = header.path[:-2] + ".hpp"
    r = host.run(f"rpm -V cuda-crt-12-9 | grep -F {shlex.quote(hpp)}")
    assert r.rc == 1, r.stdout


def test_header_sha256_matches_what_was_read(host, header):
    """Sanity: the header testinfra read is the one on disk (byte-exact)."""
    out = host.check_output(f"sha256sum {shlex.quote(header.path)}").split()[0]
    assert out == hashlib.sha256(header.content_string.encode()).hexdigest()
