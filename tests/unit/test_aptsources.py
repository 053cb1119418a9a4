"""The Debian mirror for debootstrap, read from apt's own sources (both formats) of a made-up root."""

from pathlib import Path

import pytest

from testbed.sandbox import aptsources


def apt_root(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = tmp_path / "etc" / "apt" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


BOOKWORM_822 = """Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
"""


def test_deb822_sources_of_this_kind_of_machine(tmp_path):
    root = apt_root(tmp_path, {"sources.list.d/debian.sources": BOOKWORM_822,
                               "sources.list.d/google-cloud-sdk.list.disabled-by-farm": "deb http://x/apt y main\n"})
    assert aptsources.debian_mirror(root, env={}) == "http://deb.debian.org/debian"


def test_security_first_and_third_party_are_skipped(tmp_path):
    root = apt_root(tmp_path, {
        "sources.list": "# a comment\ndeb http://security.debian.org/debian-security bookworm-security main\n"
                        "deb-src http://src.example/debian bookworm main\n",
        "sources.list.d/nodesource.sources": "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\n"
                                             "Suites: nodistro\nComponents: main\n",
        "sources.list.d/off.sources": "Types: deb\nURIs: http://off.example/debian\nSuites: trixie\n"
                                      "Components: main\nEnabled: no\n",
        "sources.list.d/z-mirror.list": "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian/ trixie main contrib\n",
    })
    assert aptsources.debian_mirror(root, env={}) == "http://mirror.example/debian"


def test_override_wins_and_no_mirror_says_where_it_looked(tmp_path):
    root = apt_root(tmp_path, {"sources.list": "deb http://archive.ubuntu.com/ubuntu noble main\n"})
    assert aptsources.debian_mirror(root, env={"GPUBOX_DEBIAN_MIRROR": "http://my/debian/"}) == "http://my/debian"
    with pytest.raises(aptsources.MirrorError) as e:
        aptsources.debian_mirror(root, env={})
    msg = str(e.value)
    assert "http://archive.ubuntu.com/ubuntu noble" in msg and "GPUBOX_DEBIAN_MIRROR=" in msg


@pytest.mark.parametrize("suite,ok", [("sid", True), ("stable-updates", True), ("trixie-backports", True),
                                      ("bookworm-security", False), ("noble", False), ("nodistro", False)])
def test_debian_suites(suite, ok):
    assert aptsources.is_debian_suite(suite) is ok
