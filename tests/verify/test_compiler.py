"""testinfra: step 3 (compiler) on the target: gcc-14 through the build's PATH only."""

import shlex

import pytest



def test_gcc14_packages(host, gcfg):
    for p in gcfg["compiler"]["packages"]:
        assert host.package(p).is_installed, p


def test_shim_dir_is_root_owned_and_not_writable_by_others(host, gcfg):
    d = host.file(gcfg["compiler"]["shim_dir"])
    assert d.is_directory and d.user == "root"
    assert not d.mode & 0o022, oct(d.mode)


@pytest.mark.parametrize("tool", ["gcc", "g++"])
def test_build_path_gives_the_major(host, gcfg, tool):
    major = int(gcfg["compiler"]["major"])
    shim_dir = gcfg["compiler"]["shim_dir"]
    cmd = f"env PATH={shlex.quote(shim_dir)}:\"$PATH\" sh -c 'command -v {tool}; {tool} -dumpversion; {tool} --version'"
    out = host.check_output(cmd).splitlines()
    assert out[0] == f"{shim_dir}/{tool}"
    assert int(out[1].split(".")[0]) == major, out
    assert f" {major}." in out[2], out[2]


@pytest.mark.parametrize("tool", ["gcc", "g++"])
def test_without_the_build_path_the_system_compiler_is_unchanged(host, gcfg, tool):
    shim_dir = gcfg["compiler"]["shim_dir"]
    path = host.check_output("bash -lc 'echo \"$PATH\"'")
    assert shim_dir not in path.split(":")
    found = host.check_output(f"bash -lc 'command -v {tool}'").strip()
    assert not found.startswith(shim_dir)
    if not gcfg["compiler"]["user_shims"]:
        # the system's own gcc answers, as it did before the step
        assert host.check_output(f"bash -lc '{tool} -dumpversion'") == host.check_output(f"/usr/bin/{tool} -dumpversion")
