"""testinfra: step 1 (driver) on the target. Run by `invoke verify` / `fab -H HOST verify`
(config from the JSON file named by GPUBOX_CONFIG; the defaults when unset)."""


import pytest



def family(host):
    out = host.check_output("rpm -qa --qf '%{NAME} %{VERSION}\\n' 'akmod-nvidia*' 'xorg-x11-drv-nvidia*'")
    return dict(line.split(" ", 1) for line in out.splitlines() if line.strip())


def test_every_driver_package_is_the_branch(host, gcfg):
    d = gcfg["driver"]
    major = d["branch"][:-2]
    pk = family(host)
    assert pk, "no akmod-nvidia* / xorg-x11-drv-nvidia* package installed"
    off = {n: v for n, v in pk.items() if f"-{d['branch']}" not in n or not v.startswith(major + ".")}
    assert off == {}, f"driver packages not of the {d['branch']} branch: {off}"


def test_the_configured_set_is_installed_and_mainline_gone(host, gcfg):
    for p in gcfg["driver"]["packages"]:
        assert host.package(p).is_installed, p
    for p in gcfg["driver"]["replaces"]:
        assert not host.package(p).is_installed, p


def test_the_branch_is_locked(host, gcfg):
    if not gcfg["driver"]["lock"]:
        pytest.skip("driver.lock is false")
    dnf = "dnf5" if host.exists("dnf5") else "dnf"
    out = host.check_output(f"{dnf} versionlock list")
    for p in gcfg["driver"]["packages"]:
        assert p in out, f"{p} is not in `{dnf} versionlock list`:\n{out}"


def test_kernel_devel_for_the_running_kernel(host):
    # what akmods needs: the provide Fedora's kernel-devel has, or the package owning /usr/src/kernels/$(uname -r)
    r = host.run('k=$(uname -r); rpm -q --qf "%{NAME}\\n" --whatprovides "kernel-devel-uname-r = $k" '
                 '|| rpm -qf --qf "%{NAME}\\n" "/usr/src/kernels/$k"')
    assert r.rc == 0 and r.stdout.strip().splitlines()[-1].startswith("kernel-devel"), r.stdout + r.stderr


def test_the_built_module_is_the_branch(host, gcfg):
    major = gcfg["driver"]["branch"][:-2]
    v = host.check_output("modinfo -F version nvidia").strip()
    assert v.startswith(major + "."), f"modinfo -F version nvidia: {v!r}"


def test_nvidia_smi_where_it_answers(host, gcfg):
    major = gcfg["driver"]["branch"][:-2]
    r = host.run("nvidia-smi --query-gpu=driver_version --format=csv,noheader")
    if r.rc != 0:
        pytest.skip(f"nvidia-smi does not answer (before the reboot, or no GPU): {r.stderr.strip() or r.stdout.strip()}")
    assert r.stdout.strip().splitlines()[0].startswith(major + "."), r.stdout


def test_loaded_module_or_reboot_pending(host, gcfg):
    """Where a module is loaded it must be the branch; none loaded means the reboot is still due (the step says so)."""
    major = gcfg["driver"]["branch"][:-2]
    f = host.file("/proc/driver/nvidia/version")
    if not f.exists:
        pytest.skip("no NVIDIA module loaded: reboot required (reported by the driver step)")
    assert f" {major}." in f.content_string, f.content_string
