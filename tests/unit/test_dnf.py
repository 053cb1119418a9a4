"""provision.dnf: command forms for dnf5/dnf4, versionlock stores of both, and dnf's error texts."""

import pytest
from invoke import Result

from provision import dnf
from provision.engine import StepError
from provision.host import Host
from testbed.testing import mock_context

# What dnf5 (5.4, the sandbox's) and dnf4 print; texts as recorded in docs/testbed.md and
# from runs in the sandbox.
DNF5_CONFLICT = """\
Updating and loading repositories:
Repositories loaded.
Failed to resolve the transaction:
Problem: problem with installed package akmod-nvidia-3:590.48.01-1.fc42.x86_64
  - package akmod-nvidia-580xx-3:580.105.08-1.fc44.x86_64 from rpmfusion-nonfree conflicts with akmod-nvidia-branch provided by akmod-nvidia-3:590.48.01-1.fc42.x86_64 from @System
  - conflicting requests
You can try to add to command line:
  --allowerasing to allow erasing of installed packages to resolve problems
  --skip-broken to skip uninstallable packages
"""
DNF5_MISSING = """\
Updating and loading repositories:
Repositories loaded.
Failed to resolve the transaction:
No match for argument: akmod-nvidia-580xx-nosuch
You can try to add to command line:
  --skip-unavailable to skip unavailable packages
"""
DNF4_MISSING = "Last metadata expiration check: 0:00:01 ago.\nNo match for argument: nosuch\nError: Unable to find a match: nosuch\n"
DNF4_CONFLICT = """\
Error:
 Problem: problem with installed package akmod-nvidia-3:590.48.01-1.fc42.x86_64
  - package akmod-nvidia-580xx-3:580.105.08-1.fc44.x86_64 conflicts with akmod-nvidia-branch provided by akmod-nvidia-3:590.48.01-1.fc42.x86_64
(try to add '--allowerasing' to command line to replace conflicting packages or '--skip-broken' to skip uninstallable packages)
"""

TOML = """\
version = "1.0"

[[packages]]
name = "akmod-nvidia-580xx"
comment = "Added by 'versionlock add' command on 2026-11-28 07:10:01"
[[packages.conditions]]
key = "evr"
comparator = "="
value = "3:580.119.02-1.fc44"

[[packages]]
name = "iftop"
[[packages.conditions]]
key = "evr"
comparator = "!="
value = "0:1.0-0.31.pre4.fc39"

[[packages]]
name = "*nvidia*-libs"
[[packages.conditions]]
key = "evr"
comparator = ">="
value = "3:570"
"""

LIST4 = """\
# Added lock on Fri Nov 28 07:10:01 2026
akmod-nvidia-580xx-3:580.119.02-1.fc44.*
xorg-x11-drv-nvidia-580xx-libs-3:580.119.02-1.fc44.x86_64
!iftop-0:1.0-0.31.pre4.fc39.*
"""


@pytest.mark.parametrize("kw,argv", [
    (dict(flavour="dnf5"), ["dnf5", "-y", "install", "a"]),
    (dict(flavour="dnf4"), ["dnf", "-y", "install", "a"]),
    (dict(flavour="dnf5", allowerasing=True, releasever=44), ["dnf5", "-y", "install", "--allowerasing", "--releasever=44", "a"]),
    (dict(flavour="dnf4", releasever=None, allowerasing=True), ["dnf", "-y", "install", "--allowerasing", "a"]),
])
def test_install_forms(kw, argv):
    assert dnf.install(["a"], **kw) == argv


def test_other_forms():
    assert dnf.remove(["x", "y"], flavour="dnf4") == ["dnf", "-y", "remove", "x", "y"]
    assert dnf.versionlock_add(["a"], flavour="dnf5") == ["dnf5", "versionlock", "add", "a"]
    assert dnf.versionlock_delete(["a"], flavour="dnf4") == ["dnf", "versionlock", "delete", "a"]
    assert dnf.swap("akmod-nvidia", "akmod-nvidia-580xx", releasever=44) == [
        "dnf5", "-y", "swap", "akmod-nvidia", "akmod-nvidia-580xx", "--allowerasing", "--releasever=44"]
    assert dnf.lock_file("dnf5") == "/etc/dnf/versionlock.toml"
    assert dnf.lock_file("dnf4") == "/etc/dnf/plugins/versionlock.list"
    assert dnf.flavour_of({"dnf": "unknown"}) == "dnf5" and dnf.flavour_of({"dnf": "dnf4"}) == "dnf4"


def test_toml_locks():
    locks = dnf.parse_versionlock_toml(TOML)
    assert [(lk.name, lk.evr, lk.exclude) for lk in locks] == [
        ("akmod-nvidia-580xx", "3:580.119.02-1.fc44", False), ("iftop", "", True), ("*nvidia*-libs", "", False)]
    # a glob lock without an exact evr does not count as "held at the installed version"
    st = dnf.lock_state(["akmod-nvidia-580xx", "xorg-x11-drv-nvidia-580xx-libs", "other"],
                        {"akmod-nvidia-580xx": "580.119.02-1.fc44", "xorg-x11-drv-nvidia-580xx-libs": "580.119.02-1.fc44"},
                        locks)
    assert st == {"akmod-nvidia-580xx": "locked", "xorg-x11-drv-nvidia-580xx-libs": "stale", "other": "unlocked"}


def test_bad_toml_reads_as_no_locks():
    assert dnf.parse_versionlock_toml("[[packages]\nname=") == []
    assert dnf.parse_versionlock_toml("") == []


def test_dnf4_list_locks():
    locks = dnf.parse_versionlock_list(LIST4)
    assert [(lk.name, lk.evr, lk.exclude) for lk in locks] == [
        ("akmod-nvidia-580xx", "3:580.119.02-1.fc44", False),
        ("xorg-x11-drv-nvidia-580xx-libs", "3:580.119.02-1.fc44", False),
        ("iftop", "0:1.0-0.31.pre4.fc39", True)]
    files = {dnf.DNF4_LOCKS: LIST4, dnf.DNF5_LOCKS: TOML}
    assert [lk.name for lk in dnf.locks_for("dnf4", files)][:2] == ["akmod-nvidia-580xx", "xorg-x11-drv-nvidia-580xx-libs"]
    assert dnf.lock_state(["akmod-nvidia-580xx"], {"akmod-nvidia-580xx": "580.105.08-1.fc44"},
                          dnf.locks_for("dnf4", files)) == {"akmod-nvidia-580xx": "stale"}


@pytest.mark.parametrize("text,kind,pkgs", [
    (DNF5_CONFLICT, "conflict", []),
    (DNF5_MISSING, "missing", ["akmod-nvidia-580xx-nosuch"]),
    (DNF4_MISSING, "missing", ["nosuch"]),
    (DNF4_CONFLICT, "conflict", []),
    ("Curl error (37): Couldn't read a file:// file for file:///srv/x/repodata/repomd.xml", "network", []),
    ("Error: GPG check FAILED", "gpg", []),
    ("Waiting for process with pid 4242 to finish.", "lock-busy", []),
    ("something else entirely\nlast line", "other", []),
])
def test_classify(text, kind, pkgs):
    e = dnf.classify(text)
    assert e.kind == kind
    assert e.packages == pkgs
    assert e.fix()


def test_conflict_detail_is_the_problem_text():
    e = dnf.classify(DNF5_CONFLICT)
    assert e.detail.startswith("Problem: problem with installed package akmod-nvidia-3:590.48.01")
    assert "conflicts with akmod-nvidia-branch" in e.detail


def test_failed_transaction_is_a_step_error_naming_step_cause_and_fix():
    ctx = mock_context({}, {"dnf5 -y install nosuch": Result(exited=1, stderr=DNF5_MISSING.replace("akmod-nvidia-580xx-nosuch", "nosuch"))})
    host = Host(ctx, is_root=True)
    with pytest.raises(StepError) as ei:
        dnf.run_transaction(host, "driver", "the 580xx driver transaction", ["dnf5", "-y", "install", "nosuch"])
    msg = str(ei.value)
    assert msg.startswith("driver: the 580xx driver transaction failed: the repositories have no package named nosuch")
    assert "nothing was installed or removed" in msg
    assert "fix: check the package names" in msg
    assert "command: dnf5 -y install nosuch" in msg and "exit status: 1" in msg


def test_transaction_runs_as_root_via_sudo_when_not_root():
    ctx = mock_context({}, {"sudo -n sh -c 'dnf5 -y install a'": Result()})
    host = Host(ctx, is_root=False)
    dnf.run_transaction(host, "cuda", "x", ["dnf5", "-y", "install", "a"])
    assert [r.command for r in host.records] == ["sudo -n sh -c 'dnf5 -y install a'"]


def test_files_parser_round_trip():
    out = "@@@file /a\nx\ny\n\n@@@file /b\nno newline\n"
    assert dnf.parse_files(out.rstrip("\n"), 0) == {"/a": "x\ny\n", "/b": "no newline"}
    assert dnf.parse_files("", 0) == {}
