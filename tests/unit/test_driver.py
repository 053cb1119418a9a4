"""Step 1 (driver): decisions from facts, and the commands apply runs (MockContext: facts in, commands out)."""

import re

import pytest
from invoke import Result

from provision import config, dnf, facts as factmod
from provision.engine import NotFedora, StepError
from provision.host import Host
from provision.steps import driver
from testbed.testing import FEDORA42_OS, mock_context

KERNEL = "6.14.5-300.fc42.x86_64"
MAINLINE = {n: "590.48.01-1.fc42" for n in ["akmod-nvidia", "xorg-x11-drv-nvidia", "xorg-x11-drv-nvidia-cuda",
                                            "xorg-x11-drv-nvidia-libs", "xorg-x11-drv-nvidia-cuda-libs"]}
BRANCH = {n: "580.119.02-1.fc44" for n in ["akmod-nvidia-580xx", "xorg-x11-drv-nvidia-580xx",
                                           "xorg-x11-drv-nvidia-580xx-cuda", "xorg-x11-drv-nvidia-580xx-libs",
                                           "xorg-x11-drv-nvidia-580xx-cuda-libs"]}


def toml_for(pkgs: dict) -> str:
    out = ['version = "1.0"']
    for n, vr in pkgs.items():
        out += ["[[packages]]", f'name = "{n}"', "[[packages.conditions]]", 'key = "evr"', 'comparator = "="',
                f'value = "3:{vr}"']
    return "\n".join(out) + "\n"


@pytest.fixture
def cfg():
    return config.validate(config.defaults()["gpubox"])


def fedora(packages, *, locks="", module="", loaded="", sb=None, kdevel=True, flavour="dnf5", os_version="42"):
    return {
        "os": {"id": "fedora", "version": os_version, "pretty": "Fedora Linux 42"},
        "kernel": KERNEL, "dnf": flavour, "packages": dict(packages), "user": {"name": "root", "uid": 0},
        "driver_locks": {dnf.lock_file(flavour): locks} if locks else {},
        "driver_module": module, "driver_loaded": loaded,
        "driver_secure_boot": sb or {"state": "disabled", "key": "enrolled"},
        "driver_kernel_devel": [f"kernel-devel-{KERNEL}"] if kdevel else [],
        "gpus": [],
    }


def whats(chk):
    return [c.what for c in chk.changes]


def remove_left(names):
    return ("sh -c 'left=; for p in \"$@\"; do rpm -q --quiet -- \"$p\" && left=\"$left $p\"; done; "
            "[ -z \"$left\" ] || exec dnf5 -y remove $left' sh " + " ".join(names))


def test_mainline_host_plans_the_swap_lock_and_module(cfg):
    chk = driver.check(fedora(MAINLINE, module="590.48.01"), cfg)
    assert not chk.satisfied
    w = whats(chk)
    assert w[0] == "install " + ", ".join(cfg["driver"]["packages"])
    assert w[1].startswith("remove akmod-nvidia 590.48.01-1.fc42, xorg-x11-drv-nvidia 590.48.01-1.fc42")
    assert w[2].startswith("lock akmod-nvidia-580xx") and "/etc/dnf/versionlock.toml" in w[2]
    assert w[3] == f"build the nvidia kernel module with akmods for {KERNEL}"
    # One transaction for install + removal: the recipe's swap extended to the userspace set.
    swap = "dnf5 -y install --allowerasing --releasever=44 " + " ".join(cfg["driver"]["packages"])
    # ... and the mainline packages it kept (no conflict) go in one more transaction: the same operations
    # fix both changes and run once.
    left = remove_left(sorted(driver.off_branch(MAINLINE, cfg)))
    assert chk.changes[0].commands == [swap, left] and chk.changes[1].commands == [swap, left]
    assert chk.changes[0].ops[0] is chk.changes[1].ops[0]
    assert chk.planned[:2] == ["# " + swap, "# " + left]
    assert "59x dropped Pascal" in chk.changes[1].why
    assert any("--releasever=44 installs packages built for Fedora 44 on this Fedora 42" in x for x in chk.warnings)
    assert chk.changes[3].commands == [f"timeout --kill-after=15 900 akmods --force --kernels {KERNEL}"]
    # not claimed active, not yet "reboot required" either (the swap has not happened)
    assert not any("reboot required" in a for a in chk.attention)


def test_done_host_is_satisfied_but_says_reboot_required(cfg):
    chk = driver.check(fedora(BRANCH, locks=toml_for(BRANCH), module="580.119.02", loaded="590.48.01"), cfg)
    assert chk.satisfied, whats(chk)
    assert chk.changes == []
    assert chk.attention == [
        "reboot required: the loaded NVIDIA kernel module is 590.48.01, the installed one is 580.119.02; after the "
        "reboot confirm with `nvidia-smi` and `cat /proc/driver/nvidia/version`"]
    assert chk.warnings == []
    assert chk.info["locks"] == {p: "locked" for p in BRANCH}


def test_loaded_580_means_no_reboot_note(cfg):
    chk = driver.check(fedora(BRANCH, locks=toml_for(BRANCH), module="580.119.02", loaded="580.119.02"), cfg)
    assert chk.satisfied and chk.attention == []


def test_nothing_loaded_says_none(cfg):
    chk = driver.check(fedora(BRANCH, locks=toml_for(BRANCH), module="580.119.02", loaded=""), cfg)
    assert "loaded NVIDIA kernel module is none" in chk.attention[0]


@pytest.mark.parametrize("extra,expect", [
    # a 59x leftover that is not in `replaces` still has to go
    ({"xorg-x11-drv-nvidia-power": "590.48.01-1.fc42"}, "remove xorg-x11-drv-nvidia-power 590.48.01-1.fc42"),
    ({"akmod-nvidia": "590.48.01-1.fc42"}, "remove akmod-nvidia 590.48.01-1.fc42"),
])
def test_any_off_branch_family_package_is_a_change(cfg, extra, expect):
    pk = dict(BRANCH, **extra)
    chk = driver.check(fedora(pk, locks=toml_for(BRANCH), module="580.119.02"), cfg)
    assert not chk.satisfied and whats(chk)[0] == expect


def test_one_missing_package_of_the_set(cfg):
    pk = dict(BRANCH)
    del pk["xorg-x11-drv-nvidia-580xx-cuda"]
    chk = driver.check(fedora(pk, locks=toml_for(pk), module="580.119.02"), cfg)
    assert whats(chk)[0] == "install xorg-x11-drv-nvidia-580xx-cuda"


@pytest.mark.parametrize("locked,why", [
    ({}, "not locked: a `dnf upgrade` could move the driver off the branch"),
    ({n: "580.105.08-1.fc44" for n in BRANCH}, "locked at another version"),
])
def test_lock_missing_or_stale(cfg, locked, why):
    chk = driver.check(fedora(BRANCH, locks=toml_for(locked) if locked else "", module="580.119.02"), cfg)
    assert len(chk.changes) == 1 and chk.changes[0].why == why
    if locked:
        assert chk.changes[0].commands[0].startswith("dnf5 versionlock delete akmod-nvidia-580xx")
    assert chk.changes[0].commands[-1] == "dnf5 versionlock add " + " ".join(cfg["driver"]["packages"])


def test_lock_off(cfg):
    cfg["driver"]["lock"] = False
    assert driver.check(fedora(BRANCH, module="580.119.02"), cfg).satisfied


def test_dnf4_host_uses_the_plugin_list_and_installs_the_plugin(cfg):
    lines = "".join(f"{n}-3:{v}.*\n" for n, v in BRANCH.items())
    chk = driver.check(fedora(BRANCH, locks=lines, module="580.119.02", flavour="dnf4"), cfg)
    assert chk.satisfied, whats(chk)
    chk = driver.check(fedora(MAINLINE, module="590.48.01", flavour="dnf4"), cfg)
    assert chk.changes[0].commands[0].startswith("dnf -y install --allowerasing --releasever=44 akmod-nvidia-580xx")
    assert chk.changes[0].commands[0].endswith(" python3-dnf-plugin-versionlock")
    assert "/etc/dnf/plugins/versionlock.list" in whats(chk)[2]


def test_kernel_devel_missing(cfg):
    chk = driver.check(fedora(BRANCH, locks=toml_for(BRANCH), module="580.119.02", kdevel=False), cfg)
    assert whats(chk) == [f"install kernel-devel for the running kernel {KERNEL}"]
    assert chk.changes[0].commands == [f"dnf5 -y install kernel-devel-{KERNEL}"]


def test_module_of_the_old_branch_or_none_is_a_change(cfg):
    for module, why in (("590.48.01", "is 590.48.01, not 580.x"), ("", "is not built, not 580.x")):
        chk = driver.check(fedora(BRANCH, locks=toml_for(BRANCH), module=module), cfg)
        assert whats(chk) == [f"build the nvidia kernel module with akmods for {KERNEL}"]
        assert why in chk.changes[0].why


def test_unreadable_module_is_attention_not_a_fake_success_or_endless_change(cfg):
    chk = driver.check(fedora(BRANCH, locks=toml_for(BRANCH), module="unknown"), cfg)
    assert chk.satisfied
    assert any("cannot read the built module's version" in a for a in chk.attention)


def test_akmods_unit_on_systemd_and_without_it(cfg):
    def chk_for(unit, pk=BRANCH):
        f = fedora(pk, locks=toml_for(BRANCH), module="580.119.02", loaded="580.119.02")
        f["driver_akmods_unit"] = unit
        return driver.check(f, cfg)
    on = chk_for("enabled")
    assert on.satisfied and on.attention == [] and on.info["akmods_unit"] == "enabled"
    off = chk_for("disabled")
    assert whats(off) == ["enable akmods.service"] and off.changes[0].commands == ["systemctl enable akmods.service"]
    assert "builds the nvidia module at boot" in off.changes[0].why
    masked = chk_for("masked")
    assert masked.satisfied and "`sudo systemctl unmask akmods.service`" in masked.attention[0]
    none = chk_for("no-systemd")
    assert none.satisfied and none.attention == [
        "no systemd on this host: nothing rebuilds the nvidia module at boot (akmods.service); after a kernel "
        "update run `sudo akmods --force` before rebooting"]
    lost = chk_for("not-found", dict(BRANCH, akmods="0.6.1-1.fc42"))
    assert lost.satisfied and "systemd has no akmods.service" in lost.warnings[0]


def test_apply_enables_akmods_service(cfg):
    f = fedora(BRANCH, locks=toml_for(BRANCH), module="580.119.02")
    f["driver_akmods_unit"] = "disabled"
    cmds, _ = apply_with(cfg, f, {"systemctl enable akmods.service": Result()})
    assert cmds == ["systemctl enable akmods.service"]
    f["driver_akmods_unit"] = "no-systemd"                # no systemd: no systemctl at all
    cmds, _ = apply_with(cfg, f, {})
    assert cmds == []
    # akmods not installed yet: its unit comes with the transaction; enabled afterwards unless it is
    m = fedora(MAINLINE, module="590.48.01")
    m["driver_akmods_unit"] = "not-found"
    chk = driver.check(m, cfg)
    (c,) = [c for c in chk.changes if "akmods.service" in c.what]
    assert c.what == "enable akmods.service if the driver transaction leaves it disabled"
    assert c.commands == [
        "sh -c '[ \"$(systemctl is-enabled akmods.service 2>/dev/null)\" != disabled ] || systemctl enable "
        "akmods.service'"]


@pytest.mark.parametrize("sb,expect", [
    ({"state": "enabled", "key": "not enrolled"}, "not enrolled"),
    ({"state": "enabled", "key": "missing"}, "not created yet"),
])
def test_secure_boot_needs_the_key(cfg, sb, expect):
    chk = driver.check(fedora(BRANCH, locks=toml_for(BRANCH), module="580.119.02", loaded="580.119.02", sb=sb), cfg)
    assert chk.satisfied
    assert len(chk.attention) == 1 and expect in chk.attention[0]
    assert "`sudo mokutil --import /etc/pki/akmods/certs/public_key.der`" in chk.attention[0]


def test_secure_boot_enrolled_or_off_is_quiet(cfg):
    for sb in ({"state": "enabled", "key": "enrolled"}, {"state": "disabled", "key": "not enrolled"},
               {"state": "unknown", "key": "unknown"}):
        chk = driver.check(fedora(BRANCH, locks=toml_for(BRANCH), module="580.119.02", loaded="580.119.02", sb=sb), cfg)
        assert chk.attention == []


def test_releasever_zero_or_own_release_has_no_flag_or_warning(cfg):
    cfg["driver"]["releasever"] = 0
    chk = driver.check(fedora(MAINLINE, module="590.48.01"), cfg)
    assert "--releasever" not in chk.changes[0].commands[0]
    assert not any("releasever" in w for w in chk.warnings)
    cfg["driver"]["releasever"] = 42
    assert not any("releasever" in w for w in driver.check(fedora(MAINLINE), cfg).warnings)


def test_check_is_pure_and_quiet_on_a_debian_host(cfg):
    f = {"os": {"id": "debian", "version": "12", "pretty": "Debian"}, "kernel": "6.1.0", "dnf": "unknown",
         "packages": {}, "driver_locks": "unknown", "driver_module": "unknown", "driver_loaded": "",
         "driver_secure_boot": "unknown", "driver_kernel_devel": "unknown", "gpus": []}
    chk = driver.check(f, cfg)
    assert not chk.satisfied and whats(chk)[0].startswith("install akmod-nvidia-580xx")


def test_apply_refuses_a_host_that_is_not_fedora(cfg):
    ctx = mock_context({})
    host = Host(ctx, is_root=True)
    f = fedora(MAINLINE)
    f["os"] = {"id": "debian", "version": "12", "pretty": "Debian GNU/Linux 12"}
    with pytest.raises(NotFedora, match=r"^driver: this host is debian 12, not Fedora 42"):
        driver.apply(host, f, cfg, driver.check(f, cfg))
    assert host.records == []


# --- fact parsers on real texts ------------------------------------------------------------------------

def test_fact_parsers_through_the_fact_script(cfg):
    from testbed.testing import facts_stdout
    out = facts_stdout({
        "driver_loaded": "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.119.02  Wed Dec  3 2025\n"
                         "GCC version:  gcc version 15.2.1 20250808 (Red Hat 15.2.1-1) (GCC)",
        "driver_module": "580.119.02",
        "driver_secure_boot": "SecureBoot enabled\n@@key\n/etc/pki/akmods/certs/public_key.der is already enrolled",
        "driver_kernel_devel": f"kernel-devel-{KERNEL}",
        "driver_locks": "@@@file /etc/dnf/versionlock.toml\n" + toml_for({"akmod-nvidia-580xx": "580.119.02-1.fc44"}),
    })
    got = factmod.parse(out, driver.FACTS)
    assert got["driver_loaded"] == "580.119.02"
    assert got["driver_module"] == "580.119.02"
    assert got["driver_secure_boot"] == {"state": "enabled", "key": "enrolled"}
    assert got["driver_kernel_devel"] == [f"kernel-devel-{KERNEL}"]
    assert dnf.parse_versionlock_toml(got["driver_locks"]["/etc/dnf/versionlock.toml"])[0].evr == "3:580.119.02-1.fc44"
    none = factmod.parse(facts_stdout({"driver_loaded": ("", 1), "driver_module": ("", 1),
                                       "driver_kernel_devel": ("no package provides kernel-devel-uname-r = x\nerror: file /usr/src/kernels/x: No such file or directory", 1)}),
                         driver.FACTS)
    assert none["driver_loaded"] == "" and none["driver_module"] == "" and none["driver_kernel_devel"] == []
    assert factmod.parse(facts_stdout({"driver_module": ("", 127)}), driver.FACTS)["driver_module"] == "unknown"


# --- apply: commands out -------------------------------------------------------------------------------

def apply_with(cfg, f, responses):
    ctx = mock_context({}, responses)
    host = Host(ctx, is_root=True)
    extra = driver.apply(host, f, cfg, driver.check(f, cfg))
    return [r.command for r in host.records], extra


def test_apply_swaps_in_one_transaction_locks_and_builds(cfg, capsys):
    pk_after = "".join(f"{n}\t{v}\n" for n, v in BRANCH.items())
    swap = "dnf5 -y install --allowerasing --releasever=44 " + " ".join(cfg["driver"]["packages"])
    left = remove_left(sorted(driver.off_branch(MAINLINE, cfg)))
    cmds, extra = apply_with(cfg, fedora(MAINLINE, module="590.48.01"), {
        swap: Result(),
        left: Result(),
        "dnf5 versionlock add " + " ".join(cfg["driver"]["packages"]): Result(),
        "modinfo -F version nvidia": Result(stdout="580.119.02\n"),
        f"timeout --kill-after=15 900 akmods --force --kernels {KERNEL}":
            Result(stdout="Building and installing nvidia-580xx-580.119.02 for x  [  OK  ]\n"),
    })
    # Exactly the check's operations, in order (akmods' own check of the result after it).
    assert cmds == [
        swap,
        left,
        "dnf5 versionlock add " + " ".join(cfg["driver"]["packages"]),
        f"timeout --kill-after=15 900 akmods --force --kernels {KERNEL}",
        "modinfo -F version nvidia",
    ]
    out = capsys.readouterr().out
    assert "[driver] building the nvidia kernel module with akmods (up to 900s)" in out
    assert "[driver] akmods built nvidia 580.119.02" in out


def test_apply_removes_mainline_packages_the_transaction_kept(cfg):
    pk = dict(MAINLINE, **{"xorg-x11-drv-nvidia-power": "590.48.01-1.fc42"})
    swap = "dnf5 -y install --allowerasing --releasever=44 " + " ".join(cfg["driver"]["packages"])
    left = remove_left(sorted(driver.off_branch(pk, cfg)))
    assert "xorg-x11-drv-nvidia-power" in left
    cmds, _ = apply_with(cfg, fedora(pk, module="580.119.02", locks=toml_for(BRANCH)), {
        swap: Result(),
        left: Result(),
    })
    assert cmds == [swap, left]
    assert not any("versionlock" in c for c in cmds)   # already held at these versions


def test_apply_resolves_kernel_devel_before_the_swap(cfg):
    f = fedora(MAINLINE, module="580.119.02", locks=toml_for(BRANCH), kdevel=False)
    kd_dry = f"dnf5 -y install --downloadonly kernel-devel-{KERNEL}"
    ctx = mock_context({}, {kd_dry: Result(exited=1, stderr=f"Failed to resolve the transaction:\nNo match for argument: kernel-devel-{KERNEL}\n")})
    host = Host(ctx, is_root=True)
    with pytest.raises(StepError, match="driver: resolving kernel-devel for the running kernel failed"):
        driver.apply(host, f, cfg, driver.check(f, cfg))
    # nothing was changed: only the download-only resolution ran
    assert [r.command for r in host.records] == [kd_dry]


def test_failed_swap_is_a_clear_error_and_nothing_else_runs(cfg):
    cfg["driver"]["packages"] = ["akmod-nvidia-580xx", "no-such-package"]
    f = fedora(MAINLINE, module="590.48.01")
    swap = "dnf5 -y install --allowerasing --releasever=44 akmod-nvidia-580xx no-such-package"
    ctx = mock_context({}, {swap: Result(exited=1, stderr="Failed to resolve the transaction:\nNo match for argument: no-such-package\n")})
    host = Host(ctx, is_root=True)
    with pytest.raises(StepError) as ei:
        driver.apply(host, f, cfg, driver.check(f, cfg))
    assert str(ei.value).startswith("driver: the 580xx driver transaction failed: the repositories have no package named no-such-package")
    assert [r.command for r in host.records] == [swap]


@pytest.mark.parametrize("exited,out,match", [
    (124, "", r"driver: akmods did not finish within 900s \(driver.akmods_timeout\)"),
    (1, "Building and installing nvidia-580xx [FAILED]", r"driver: akmods could not build the 580 kernel module"),
    (127, "", r"driver: akmods is not installed"),
])
def test_akmods_failures(cfg, exited, out, match):
    f = fedora(BRANCH, locks=toml_for(BRANCH), module="")
    ctx = mock_context({}, {"modinfo -F version nvidia": Result(exited=1),
                            f"timeout --kill-after=15 900 akmods --force --kernels {KERNEL}": Result(exited=exited, stdout=out)})
    with pytest.raises(StepError, match=match):
        driver.apply(Host(ctx, is_root=True), f, cfg, driver.check(f, cfg))
