"""Step 3 (compiler): gcc14 packages, build-only shims (root-owned dir), opt-in user shims, undo, build_env."""

import os
import subprocess

import pytest
from invoke import Context, Result

from provision import config, facts as factmod
from provision.engine import NotFedora
from provision.host import Host
from provision.steps import compiler
from testbed.testing import mock_context

GCC14 = {"gcc14": "14.2.1-8.fc42", "gcc14-c++": "14.2.1-8.fc42"}
GOOD = {"dir": {"uid": 0, "mode": 0o755}, "parent": {"uid": 0, "mode": 0o755},
        "links": {"gcc": "/usr/bin/gcc-14", "g++": "/usr/bin/g++-14"}, "user_links": {},
        "tools": {"/usr/bin/gcc-14": 14, "/usr/bin/g++-14": 14}, "path": "/usr/local/bin:/usr/bin"}


@pytest.fixture
def cfg():
    return config.validate(config.defaults()["gpubox"])


def fx(packages=GCC14, shims=None, os_id="fedora", **kw):
    s = dict(GOOD)
    s.update(shims or {})
    return {"os": {"id": os_id, "version": "42", "pretty": "x"}, "dnf": "dnf5", "packages": dict(packages),
            "compiler_shims": s, "gcc": {"default": 15, "available": [14, 15]}, "home": "/home/u",
            "user": {"name": "u", "uid": 1000}, **kw}


def test_fresh_host(cfg):
    chk = compiler.check(fx({}, {"dir": None, "links": {}, "tools": {}}), cfg)
    assert [c.what for c in chk.changes] == [
        "install gcc14, gcc14-c++", "create /var/lib/gpubox/shims (root-owned, mode 0755)",
        "link /var/lib/gpubox/shims/gcc -> /usr/bin/gcc-14", "link /var/lib/gpubox/shims/g++ -> /usr/bin/g++-14"]
    assert "the system gcc is 15" in chk.changes[0].why
    assert chk.changes[0].commands == ["dnf5 -y install gcc14 gcc14-c++"]


def test_done(cfg):
    chk = compiler.check(fx(), cfg)
    assert chk.satisfied and chk.warnings == []
    assert chk.info["host_compiler"] == "/usr/bin/g++-14"


@pytest.mark.parametrize("d,expect", [
    ({"uid": 1000, "mode": 0o755}, "owner uid 1000, mode 0755"),
    ({"uid": 0, "mode": 0o777}, "owner uid 0, mode 0777"),
    ({"uid": 0, "mode": 0o775}, "owner uid 0, mode 0775"),
])
def test_unsafe_shim_dir(cfg, d, expect):
    chk = compiler.check(fx(shims={"dir": d}), cfg)
    assert [c.what for c in chk.changes] == ["make /var/lib/gpubox/shims root-owned and not group/world-writable"]
    assert chk.changes[0].why.startswith(expect)


def test_wrong_link_target(cfg):
    chk = compiler.check(fx(shims={"links": {"gcc": "/usr/bin/gcc-15", "g++": "/usr/bin/g++-14"}}), cfg)
    assert [(c.what, c.why) for c in chk.changes] == [("link /var/lib/gpubox/shims/gcc -> /usr/bin/gcc-14",
                                                      "points to /usr/bin/gcc-15")]


def test_packages_there_but_tool_missing_is_a_reinstall(cfg):
    chk = compiler.check(fx(shims={"tools": {"/usr/bin/gcc-14": 14}}), cfg)
    assert [c.what for c in chk.changes] == ["reinstall gcc14, gcc14-c++"]
    assert chk.changes[0].why == "/usr/bin/g++-14 missing"


def test_user_shims_opt_in_and_leak_warning(cfg):
    cfg["compiler"]["user_shims"] = True
    chk = compiler.check(fx(), cfg)
    assert [c.what for c in chk.changes] == ["link ~/.local/bin/gcc -> /usr/bin/gcc-14", "link ~/.local/bin/g++ -> /usr/bin/g++-14"]
    cfg["compiler"]["user_shims"] = False
    chk = compiler.check(fx(shims={"user_links": {"gcc": "/usr/bin/gcc-14", "g++": "/usr/bin/g++-14"}}), cfg)
    assert chk.satisfied
    assert chk.warnings and chk.warnings[0].startswith("~/.local/bin/gcc/g++ point to gcc-14 (the recipe's shims)")


def test_build_env_and_host_compiler(cfg):
    env = compiler.build_env(fx(shims={"path": "/var/lib/gpubox/shims:/usr/local/bin:/usr/bin"}), cfg)
    assert env == {"PATH": "/var/lib/gpubox/shims:/usr/local/bin:/usr/bin", "CUDAHOSTCXX": "/usr/bin/g++-14"}
    assert compiler.build_env({}, cfg)["PATH"] == "/var/lib/gpubox/shims:/usr/local/bin:/usr/bin:/bin"
    assert compiler.host_compiler(cfg) == "/usr/bin/g++-14"
    cfg["build"]["host_compiler"] = "/opt/gcc/bin/g++"
    assert compiler.host_compiler(cfg) == "/opt/gcc/bin/g++"


def test_apply_commands(cfg):
    f = fx({}, {"dir": None, "links": {}, "tools": {}})
    ctx = mock_context({}, {"dnf5 -y install gcc14 gcc14-c++": Result(),
                            __import__("re").compile(r"^sh -c 'set -e; install -d"): Result()})
    host = Host(ctx, is_root=True)
    compiler.apply(host, f, cfg, compiler.check(f, cfg))
    cmds = [r.command for r in host.records]
    assert cmds[0] == "dnf5 -y install gcc14 gcc14-c++"
    assert cmds[1].startswith("sh -c 'set -e; install -d -m 0755 -o 0 -g 0 /var/lib/gpubox/shims;")
    assert len(cmds) == 2


def test_apply_refuses_non_fedora(cfg):
    host = Host(mock_context({}), is_root=True)
    with pytest.raises(NotFedora, match="^compiler: this host is debian"):
        compiler.apply(host, fx(os_id="debian"), cfg, compiler.check(fx(os_id="debian"), cfg))
    assert host.records == []


def test_shim_script_and_fact_for_real(cfg, tmp_path):
    """The shim script and the fact snippet run for real (local shell): links swap atomically, the fact reads
    them back, and gcc through the shim dir is the target compiler."""
    d = tmp_path / "state" / "shims"
    target = tmp_path / "fake-gcc-14"
    target.write_text("#!/bin/sh\necho 14\n")
    target.chmod(0o755)
    links = {"gcc": str(target), "g++": str(target)}
    script = compiler.shim_script(str(d), links, owner=None, mode="0755")
    subprocess.run(["sh", "-c", script], check=True)
    subprocess.run(["sh", "-c", script], check=True)   # idempotent: a second run swaps the same links in
    assert sorted(os.listdir(d)) == ["g++", "gcc"]
    assert os.readlink(d / "gcc") == str(target)
    cfg["compiler"]["shim_dir"] = str(d)
    out = subprocess.run(["bash", "-c", factmod.script(cfg, compiler.FACTS)], capture_output=True, text=True).stdout
    got = factmod.parse(out, compiler.FACTS)["compiler_shims"]
    assert got["links"] == links and got["dir"]["mode"] == 0o755
    env = compiler.build_env({"compiler_shims": got}, cfg)
    assert subprocess.run(["gcc"], env=env, capture_output=True, text=True).stdout.strip() == "14"


def test_undo_removes_only_gpubox_links(cfg):
    f = fx(shims={"user_links": {"gcc": "/usr/bin/gcc-14"}})
    ctx = mock_context({}, {"rm -f -- /var/lib/gpubox/shims/gcc /var/lib/gpubox/shims/g++": Result(),
                            "rmdir -- /var/lib/gpubox/shims": Result()})
    host = Host(ctx, is_root=True)
    assert compiler.undo(host, f, cfg) == ["/var/lib/gpubox/shims/gcc", "/var/lib/gpubox/shims/g++", "/var/lib/gpubox/shims"]
    # the user's own ~/.local/bin/gcc (user_shims off) is theirs: left alone
    assert not any(".local" in r.command for r in host.records)
    cfg["compiler"]["user_shims"] = True
    ctx = mock_context({}, {"rm -f -- /var/lib/gpubox/shims/gcc /var/lib/gpubox/shims/g++": Result(),
                            "rmdir -- /var/lib/gpubox/shims": Result(exited=1), "rm -f -- /home/u/.local/bin/gcc": Result()})
    host = Host(ctx, is_root=True)
    assert compiler.undo(host, f, cfg)[-1] == "/home/u/.local/bin/gcc"
