"""Step 1: the NVIDIA 580xx legacy driver branch (RPM Fusion), locked, with its kernel module built.

A GTX 1080 (Pascal) is supported only up to NVIDIA's 580 series; RPM Fusion's main `akmod-nvidia`
moved to 59x, which ignores the card ("NVRM: No NVIDIA GPU found"). Wanted state:

- every installed `akmod-nvidia*` / `xorg-x11-drv-nvidia*` package is of the configured branch
  (`driver.branch`, 580xx), the configured set (`driver.packages`: the module source AND the userspace of
  the same branch) is installed and none of `driver.replaces` (the mainline set) is left;
- the set is locked with dnf versionlock (dnf5: /etc/dnf/versionlock.toml; dnf4's plugin:
  /etc/dnf/plugins/versionlock.list) at the installed versions, so `dnf upgrade` cannot move it;
- kernel-devel for the running kernel is installed (`kernel-devel-uname-r = $(uname -r)`, what akmods needs);
- the kernel module akmods built for the running kernel is 580.x (`modinfo -F version nvidia`).

Apply: the recipe's `dnf swap akmod-nvidia akmod-nvidia-580xx --allowerasing --releasever=44`, extended to
the whole userspace set as ONE transaction (`dnf install --allowerasing --releasever=N <580xx set>`: the
conflicting mainline packages are erased by the same transaction), then versionlock, then
`akmods --force --kernels <kernel>` bounded by `driver.akmods_timeout`, with its output shown as progress.

The step never claims the driver is active: unless /proc/driver/nvidia/version shows a 580.x module it
ends with the attention "reboot required"; with Secure Boot on and the akmods key not enrolled it gives
the `mokutil --import` command.
"""

from __future__ import annotations

import re
import shlex
import time

from .. import dnf
from ..engine import Change, Check, StepError, require_fedora
from ..facts import UNKNOWN, Fact
from ..host import cmd

NAME = "driver"
TITLE = "NVIDIA 580xx driver branch"

AKMODS_KEY = "/etc/pki/akmods/certs/public_key.der"
FAMILY = ("akmod-nvidia", "xorg-x11-drv-nvidia")
AKMODS_LOGS = "/var/cache/akmods/"


# --- facts ------------------------------------------------------------------------------------------

def parse_loaded(out: str, rc: int):
    """/proc/driver/nvidia/version -> the loaded module's version, "" when no NVIDIA module is loaded.

    >>> parse_loaded("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05  Thu Sep 25 21:25:44 UTC 2025\\n", 0)
    '580.95.05'
    >>> parse_loaded("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  590.44.01  Release Build", 0)
    '590.44.01'
    >>> parse_loaded("", 1)
    ''
    """
    if rc != 0:
        return ""
    m = re.search(r"Kernel Module\b.*?\s(\d{3}\.\d+(?:\.\d+)?)\b", out)
    return m.group(1) if m else UNKNOWN


def parse_module(out: str, rc: int):
    """`modinfo -F version nvidia`: the built module's version; "" when there is none; UNKNOWN without modinfo."""
    if rc == 127:
        return UNKNOWN
    v = out.strip().splitlines()[0].strip() if out.strip() else ""
    return v if rc == 0 else ""


def parse_secure_boot(out: str, rc: int) -> dict:
    """`mokutil --sb-state` then `mokutil --test-key KEY` (after an `@@key` line).

    >>> parse_secure_boot("SecureBoot enabled\\n@@key\\n/etc/pki/akmods/certs/public_key.der is not enrolled\\n", 0)
    {'state': 'enabled', 'key': 'not enrolled'}
    >>> parse_secure_boot("EFI variables are not supported on this system\\n@@key\\nmissing\\n", 0)
    {'state': 'unsupported', 'key': 'missing'}
    """
    sb, _, key = out.partition("@@key")
    state = UNKNOWN
    if re.search(r"SecureBoot enabled", sb):
        state = "enabled"
    elif re.search(r"SecureBoot disabled", sb):
        state = "disabled"
    elif re.search(r"not supported|EFI variables", sb):
        state = "unsupported"
    k = key.strip()
    if "is already enrolled" in k or re.search(r"\benrolled\b", k) and "not enrolled" not in k:
        kstate = "enrolled"
    elif "not enrolled" in k:
        kstate = "not enrolled"
    elif k.startswith("missing"):
        kstate = "missing"
    else:
        kstate = UNKNOWN
    return {"state": state, "key": kstate}


def parse_kernel_devel(out: str, rc: int) -> list[str]:
    """Packages (NAME-VERSION-RELEASE.ARCH) with the running kernel's headers; [] if none."""
    return [ln.strip() for ln in out.splitlines()
            if ln.strip() and not ln.startswith(("no package provides", "package ", "error:", "file "))
            and "not owned by any package" not in ln]


def _locks_cmd(cfg: dict) -> str:
    return dnf.files_snippet([dnf.DNF5_LOCKS, dnf.DNF4_LOCKS])


def _kdevel_cmd(cfg: dict) -> str:
    # Fedora's kernel-devel owns /usr/src/kernels/$(uname -r) (and provides `kernel-devel-uname-r =
    # $(uname -r)`, what akmods requires); asking rpm who owns the directory also works where uname -r
    # has dashes that rpm's version comparison would split on. No directory: no rpm call at all.
    qf = shlex.quote(r"%{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}\n")
    return f'k=$(uname -r); [ -d "/usr/src/kernels/$k" ] && rpm -qf --qf {qf} "/usr/src/kernels/$k"'


def _sb_cmd(cfg: dict) -> str:
    key = shlex.quote(AKMODS_KEY)
    return (f"mokutil --sb-state 2>&1; echo @@key; if [ -e {key} ]; then mokutil --test-key {key} 2>&1; "
            "else echo missing; fi; true")


FACTS = [
    Fact("driver_locks", _locks_cmd, dnf.parse_files),
    Fact("driver_loaded", lambda cfg: "cat /proc/driver/nvidia/version", parse_loaded),
    Fact("driver_module", lambda cfg: "modinfo -F version nvidia", parse_module),
    Fact("driver_secure_boot", _sb_cmd, parse_secure_boot),
    Fact("driver_kernel_devel", _kdevel_cmd, parse_kernel_devel),
]


# --- decisions --------------------------------------------------------------------------------------

def branch_major(cfg: dict) -> str:
    """'580xx' -> '580'."""
    return cfg["driver"]["branch"][:-2]


def in_family(name: str) -> bool:
    return name.startswith(FAMILY)


def off_branch(installed: dict[str, str], cfg: dict) -> list[str]:
    """Installed driver packages that are not of the configured branch (the mainline ones to swap out)."""
    branch = cfg["driver"]["branch"]
    names = {n for n in installed if in_family(n) and f"-{branch}" not in n}
    names |= {n for n in cfg["driver"]["replaces"] if n in installed}
    return sorted(names)


def releasever(facts: dict, cfg: dict):
    rv = cfg["driver"]["releasever"]
    return rv or None


def transaction(facts: dict, cfg: dict, installed: dict[str, str]) -> list[str]:
    """The one swap transaction: install the whole branch set with --allowerasing (the conflicting
    mainline packages are erased by the same transaction)."""
    pkgs = list(cfg["driver"]["packages"])
    fl = dnf.flavour_of(facts)
    if cfg["driver"]["lock"] and fl == "dnf4" and dnf.DNF4_LOCK_PLUGIN not in installed:
        pkgs.append(dnf.DNF4_LOCK_PLUGIN)
    return dnf.install(pkgs, flavour=fl, allowerasing=True, releasever=releasever(facts, cfg))


def kernel_devel_spec(facts: dict) -> str:
    """`kernel-devel-$(uname -r)`: a NEVRA on Fedora (kernel-devel-6.14.5-300.fc42.x86_64)."""
    return f"kernel-devel-{facts.get('kernel')}"


def kernel_devel_install(facts: dict) -> list[str]:
    # No --releasever: the running kernel's headers come from the host's own release.
    return dnf.install([kernel_devel_spec(facts)], flavour=dnf.flavour_of(facts))


def akmods_cmd(facts: dict, cfg: dict) -> list[str]:
    t = int(cfg["driver"]["akmods_timeout"])
    return ["timeout", "--kill-after=15", str(t), "akmods", "--force", "--kernels", str(facts.get("kernel"))]


def lock_files(facts: dict) -> dict[str, str]:
    f = facts.get("driver_locks")
    return f if isinstance(f, dict) else {}


def lock_plan(facts: dict, cfg: dict, installed: dict[str, str]) -> dict[str, str]:
    locks = dnf.locks_for(dnf.flavour_of(facts), lock_files(facts))
    return dnf.lock_state(cfg["driver"]["packages"], installed, locks)


def check(facts: dict, cfg: dict) -> Check:
    d = cfg["driver"]
    branch, major = d["branch"], branch_major(cfg)
    pk = dnf.installed(facts)
    fl = dnf.flavour_of(facts)
    kernel = facts.get("kernel", UNKNOWN)
    changes: list[Change] = []
    attention: list[str] = []
    warnings: list[str] = []

    missing = [p for p in d["packages"] if p not in pk]
    leftovers = off_branch(pk, cfg)
    wrong_version = sorted(n for n in pk if in_family(n) and f"-{branch}" in n and not pk[n].startswith(major + "."))
    info = {"branch": branch, "installed": {n: v for n, v in sorted(pk.items()) if in_family(n)},
            "kernel": kernel, "module": facts.get("driver_module"), "loaded": facts.get("driver_loaded"),
            "secure_boot": facts.get("driver_secure_boot"), "dnf": fl}

    swap_cmd = cmd(transaction(facts, cfg, pk))
    rv = releasever(facts, cfg)
    os_ = facts.get("os") if isinstance(facts.get("os"), dict) else {}
    host_rel = os_.get("version", UNKNOWN)
    if missing or leftovers:
        if missing:
            changes.append(Change(
                "install " + ", ".join(missing),
                f"not installed; the GTX 1080 (Pascal) is supported only by NVIDIA's {major} legacy branch "
                f"({branch}), module and userspace together", [swap_cmd]))
        if leftovers:
            changes.append(Change(
                "remove " + ", ".join(f"{n} {pk[n]}" for n in leftovers),
                f"mainline driver packages: 59x dropped Pascal, and a {major} module with 59x userspace does "
                "not work; erased by the same transaction (--allowerasing)", [swap_cmd]))
        if rv and str(rv) != str(host_rel):
            host_os = ("Fedora" if os_.get("id") == "fedora" else str(os_.get("id", UNKNOWN)).capitalize())
            warnings.append(f"--releasever={rv} installs packages built for Fedora {rv} on this {host_os} {host_rel} "
                            f"host (the recipe's choice: RPM Fusion's {branch} split); later `dnf upgrade` runs do "
                            "not track them, so the lock below holds them")
    if wrong_version:
        warnings.append("packages of the branch with an unexpected version: "
                        + ", ".join(f"{n} {pk[n]}" for n in wrong_version))

    kd = facts.get("driver_kernel_devel")
    if not kd:  # [] = none, UNKNOWN/None = unreadable: install (dnf says "already installed" if present)
        changes.append(Change(
            f"install kernel-devel for the running kernel {kernel}",
            "akmods builds the module against the running kernel's headers",
            [cmd(kernel_devel_install(facts))]))

    if d["lock"]:
        state = lock_plan(facts, cfg, pk)
        unlocked = [p for p, s in state.items() if s != "locked"]
        if unlocked:
            stale = [p for p in unlocked if state[p] == "stale"]
            cmds = []
            if stale:
                cmds.append(cmd(dnf.versionlock_delete(stale, flavour=fl)))
            cmds.append(cmd(dnf.versionlock_add(unlocked, flavour=fl)))
            changes.append(Change(
                "lock " + ", ".join(unlocked) + f" with dnf versionlock ({dnf.lock_file(fl)})",
                "locked at another version" if stale and len(stale) == len(unlocked) else
                "not locked: a `dnf upgrade` could move the driver off the branch", cmds))
        info["locks"] = state

    module = facts.get("driver_module")
    branch_ok = not missing and not leftovers
    if module == UNKNOWN or module is None:
        attention.append("cannot read the built module's version (modinfo missing); check with "
                         "`modinfo -F version nvidia` after the step")
    elif not str(module).startswith(major + "."):
        changes.append(Change(
            f"build the nvidia kernel module with akmods for {kernel}",
            f"the module for the running kernel is {module or 'not built'}, not {major}.x",
            [cmd(akmods_cmd(facts, cfg))]))

    loaded = facts.get("driver_loaded")
    if branch_ok:
        if not (isinstance(loaded, str) and loaded.startswith(major + ".")):
            attention.append(
                f"reboot required: the loaded NVIDIA kernel module is {loaded or 'none'}, the installed one is "
                f"{module if module not in (None, UNKNOWN, '') else major + '.x'}; after the reboot confirm with "
                "`nvidia-smi` and `cat /proc/driver/nvidia/version`")
    else:
        warnings.append("the new kernel module loads only after a reboot (the step will say so)")

    sb = facts.get("driver_secure_boot")
    if isinstance(sb, dict) and sb.get("state") == "enabled" and sb.get("key") != "enrolled":
        attention.append(
            "Secure Boot is on and the akmods signing key is " + ("not created yet" if sb.get("key") == "missing"
                                                                   else "not enrolled")
            + ": the kernel refuses the unsigned module ('Required key not available'). Enrol it: "
            f"`sudo mokutil --import {AKMODS_KEY}`, reboot, and confirm the key in the MOK manager")

    gpus = facts.get("gpus")
    if isinstance(gpus, list) and gpus:
        info["nvidia_smi_driver"] = gpus[0].get("driver")

    return Check(not changes, changes, attention=attention, warnings=warnings, info=info)


# --- apply ------------------------------------------------------------------------------------------

def _say(host, line: str) -> None:
    print(f"[{NAME}] {line}", flush=True)
    if host.log:
        host.log(f"# {line}")


def apply(host, facts: dict, cfg: dict, chk: Check):
    require_fedora(facts, NAME)
    d = cfg["driver"]
    major = branch_major(cfg)
    pk = dnf.installed(facts)
    fl = dnf.flavour_of(facts)
    missing = [p for p in d["packages"] if p not in pk]
    leftovers = off_branch(pk, cfg)
    need_kdevel = not facts.get("driver_kernel_devel")
    swapped = False

    if need_kdevel and (missing or leftovers):
        # Resolve the kernel-devel transaction first without changing anything (download only), so a
        # failure there cannot leave the driver swapped with no headers to build its module.
        argv = kernel_devel_install(facts)
        dnf.run_transaction(host, NAME, "resolving kernel-devel for the running kernel",
                            argv[:3] + ["--downloadonly"] + argv[3:])

    if missing or leftovers:
        argv = transaction(facts, cfg, pk)
        _say(host, "installing the " + d["branch"] + " set in one transaction: " + cmd(argv))
        dnf.run_transaction(host, NAME, f"the {d['branch']} driver transaction", argv)
        swapped = True
        # Mainline packages that did not conflict with the branch set (so --allowerasing kept them).
        if leftovers:
            res = host.run(["rpm", "-q", "--qf", "%{NAME}\\n", *leftovers], check=False)
            still = [ln.strip() for ln in (res.stdout or "").splitlines()
                     if ln.strip() in leftovers]
            if still:
                dnf.run_transaction(host, NAME, "removing the remaining mainline driver packages",
                                    dnf.remove(still, flavour=fl))

    if need_kdevel:
        dnf.run_transaction(host, NAME, "installing kernel-devel for the running kernel", kernel_devel_install(facts))

    if d["lock"]:
        installed_now = _query_installed(host, d["packages"]) if swapped else pk
        state = lock_plan(facts, cfg, installed_now)
        todo = [p for p, s in state.items() if s != "locked"]
        stale = [p for p in todo if state[p] == "stale"]
        if stale:
            host.run(dnf.versionlock_delete(stale, flavour=fl), root=True)
        if todo:
            host.run(dnf.versionlock_add(todo, flavour=fl), root=True)

    module = _module_version(host)
    if not module.startswith(major + "."):
        module = _build_module(host, facts, cfg, module)
    _say(host, f"kernel module for {facts.get('kernel')}: nvidia {module}")
    return []


def _query_installed(host, names) -> dict[str, str]:
    res = host.run(["rpm", "-q", "--qf", "%{NAME}\\t%{VERSION}-%{RELEASE}\\n", *names], check=False)
    out = {}
    for ln in (res.stdout or "").splitlines():
        n, sep, v = ln.partition("\t")
        if sep:
            out[n] = v
    return out


def _module_version(host) -> str:
    res = host.run(["modinfo", "-F", "version", "nvidia"], check=False)
    return (res.stdout or "").strip() if res.exited == 0 else ""


def _build_module(host, facts: dict, cfg: dict, before: str) -> str:
    """Run akmods for the running kernel, bounded by driver.akmods_timeout, its output as progress."""
    major = branch_major(cfg)
    limit = int(cfg["driver"]["akmods_timeout"])
    argv = akmods_cmd(facts, cfg)
    _say(host, f"building the nvidia kernel module with akmods (up to {limit}s; was {before or 'none'})")
    t0 = time.monotonic()
    res = host.run(argv, root=True, check=False, timeout=limit + 60,
                   stream=lambda line: _say(host, f"akmods: {line}") if line.strip() else None)
    dt = time.monotonic() - t0
    out = (res.stdout or "") + "\n" + (res.stderr or "")
    if res.exited in (124, 137):
        raise StepError(f"{NAME}: akmods did not finish within {limit}s (driver.akmods_timeout)",
                        f"raise driver.akmods_timeout, or read the build log under {AKMODS_LOGS} and run the step again",
                        command=cmd(argv), exited=res.exited, output=out)
    if res.exited == 127:
        raise StepError(f"{NAME}: akmods is not installed (it comes with akmod-nvidia-{cfg['driver']['branch']})",
                        "install akmods (dnf install akmods) and run the step again", command=cmd(argv),
                        exited=res.exited, output=out)
    module = _module_version(host)
    if res.exited != 0 or not module.startswith(major + "."):
        raise StepError(f"{NAME}: akmods could not build the {major} kernel module for {facts.get('kernel')} "
                        f"(module now: {module or 'none'})",
                        f"read the failed build log under {AKMODS_LOGS} (kernel-devel must match `uname -r` exactly), "
                        "fix it and run the step again", command=cmd(argv), exited=res.exited, output=out)
    _say(host, f"akmods built nvidia {module} in {dt:.1f}s")
    return module
