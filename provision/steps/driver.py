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

On a systemd host akmods.service (enabled by Fedora's preset) builds the module at boot for a kernel that
has none yet, which is what makes the "reboot required" below safe after a kernel update: the step enables
it when it is disabled (docs/systemd.md). Without systemd nothing rebuilds the module at boot, and the step
says so.

The step never claims the driver is active: unless /proc/driver/nvidia/version shows a 580.x module it
ends with the attention "reboot required"; with Secure Boot on and the akmods key not enrolled it gives
the `mokutil --import` command.
"""

from __future__ import annotations

import re
import shlex
import time
from dataclasses import dataclass

from .. import dnf
from ..engine import Change, Check, StepError, require_fedora, run_changes
from ..facts import UNKNOWN, Fact
from ..host import cmd
from ..ops import Cmd, Dnf, Op

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


AKMODS_UNIT = "akmods.service"


def parse_unit_state(out: str, rc: int) -> str:
    """`systemctl is-enabled akmods.service` -> enabled/disabled/masked/..., "not-found", or "no-systemd".

    >>> parse_unit_state("disabled\\n", 1), parse_unit_state("no-systemd\\n", 0)
    ('disabled', 'no-systemd')
    >>> parse_unit_state("Failed to get unit file state for akmods.service: No such file or directory\\n", 1)
    'not-found'
    """
    first = out.strip().splitlines()[0].strip() if out.strip() else ""
    if not first or " " in first:
        return "not-found"
    return first


def _akmods_unit_cmd(cfg: dict) -> str:
    return (f"[ -d /run/systemd/system ] || {{ echo no-systemd; exit 0; }}; "
            f"systemctl is-enabled {AKMODS_UNIT} 2>&1; true")


FACTS = [
    Fact("driver_akmods_unit", _akmods_unit_cmd, parse_unit_state),
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


# Packages of `driver.replaces` the branch transaction did not erase (no conflict, so --allowerasing
# kept them): removed by one more transaction, with only the names rpm still finds installed.
_REMOVE_LEFT = ('left=; for p in "$@"; do rpm -q --quiet -- "$p" && left="$left $p"; done; '
                '[ -z "$left" ] || exec {dnf} -y remove $left')


def check(facts: dict, cfg: dict) -> Check:
    d = cfg["driver"]
    pk = dnf.installed(facts)
    info = {"branch": d["branch"], "installed": {n: v for n, v in sorted(pk.items()) if in_family(n)},
            "kernel": facts.get("kernel", UNKNOWN), "module": facts.get("driver_module"),
            "loaded": facts.get("driver_loaded"), "secure_boot": facts.get("driver_secure_boot"),
            "dnf": dnf.flavour_of(facts)}
    changes, warnings = _branch_changes(facts, cfg)
    changes += _kernel_devel_changes(facts)
    if d["lock"]:
        lock_changes, info["locks"] = _lock_changes(facts, cfg)
        changes += lock_changes
    module_changes, attention = _module_changes(facts, cfg)
    changes += module_changes
    unit_changes, unit_attention, unit_warnings = _akmods_unit(facts, cfg)
    changes += unit_changes
    attention += unit_attention
    warnings += unit_warnings
    info["akmods_unit"] = facts.get("driver_akmods_unit")
    if not any(p not in pk for p in d["packages"]) and not off_branch(pk, cfg):
        attention += _reboot_attention(facts, cfg)
    else:
        warnings.append("the new kernel module loads only after a reboot (the step will say so)")
    attention += _secure_boot_attention(facts)
    gpus = facts.get("gpus")
    if isinstance(gpus, list) and gpus:
        info["nvidia_smi_driver"] = gpus[0].get("driver")
    return Check(not changes, changes, attention=attention, warnings=warnings, info=info)


def _branch_changes(facts: dict, cfg: dict) -> tuple[list[Change], list[str]]:
    """The branch set: one install transaction with --allowerasing, then the leftovers it kept."""
    d = cfg["driver"]
    branch, major = d["branch"], branch_major(cfg)
    pk = dnf.installed(facts)
    fl = dnf.flavour_of(facts)
    missing = [p for p in d["packages"] if p not in pk]
    leftovers = off_branch(pk, cfg)
    warnings = []
    odd = sorted(n for n in pk if in_family(n) and f"-{branch}" in n and not pk[n].startswith(major + "."))
    if odd:
        warnings.append("packages of the branch with an unexpected version: " + ", ".join(f"{n} {pk[n]}" for n in odd))
    if not missing and not leftovers:
        return [], warnings
    ops = []
    if not facts.get("driver_kernel_devel"):
        # Resolve the kernel-devel transaction first without changing anything (download only), so a
        # failure there cannot leave the driver swapped with no headers to build its module.
        argv = kernel_devel_install(facts)
        ops.append(Dnf(argv[:3] + ["--downloadonly"] + argv[3:], NAME, "resolving kernel-devel for the running kernel"))
    ops.append(Dnf(transaction(facts, cfg, pk), NAME, f"the {branch} driver transaction"))
    if leftovers:
        ops.append(Dnf(["sh", "-c", _REMOVE_LEFT.format(dnf=dnf.binary(fl)), "sh", *leftovers], NAME,
                       "removing the remaining mainline driver packages"))
    changes = []
    if missing:
        changes.append(Change("install " + ", ".join(missing),
                              f"not installed; the GTX 1080 (Pascal) is supported only by NVIDIA's {major} legacy "
                              f"branch ({branch}), module and userspace together", ops))
    if leftovers:
        changes.append(Change("remove " + ", ".join(f"{n} {pk[n]}" for n in leftovers),
                              f"mainline driver packages: 59x dropped Pascal, and a {major} module with 59x userspace "
                              "does not work; erased by the same transaction (--allowerasing)", ops))
    rv = releasever(facts, cfg)
    os_ = facts.get("os") if isinstance(facts.get("os"), dict) else {}
    host_rel = os_.get("version", UNKNOWN)
    if rv and str(rv) != str(host_rel):
        host_os = "Fedora" if os_.get("id") == "fedora" else str(os_.get("id", UNKNOWN)).capitalize()
        warnings.append(f"--releasever={rv} installs packages built for Fedora {rv} on this {host_os} {host_rel} "
                        f"host (the recipe's choice: RPM Fusion's {branch} split); later `dnf upgrade` runs do "
                        "not track them, so the lock below holds them")
    return changes, warnings


def _kernel_devel_changes(facts: dict) -> list[Change]:
    if facts.get("driver_kernel_devel"):   # [] = none, UNKNOWN/None = unreadable: install (dnf says if present)
        return []
    return [Change(f"install kernel-devel for the running kernel {facts.get('kernel', UNKNOWN)}",
                   "akmods builds the module against the running kernel's headers",
                   [Dnf(kernel_devel_install(facts), NAME, "installing kernel-devel for the running kernel")])]


def _lock_changes(facts: dict, cfg: dict) -> tuple[list[Change], dict[str, str]]:
    """versionlock for the branch set, decided before the transaction runs: a package it installs while a
    lock names it gets the locked version (dnf installs nothing else of it), so that lock will hold."""
    fl = dnf.flavour_of(facts)
    pk = dnf.installed(facts)
    state = lock_plan(facts, cfg, pk)
    unlocked = [p for p, st in state.items() if st == "unlocked" or (st == "stale" and p in pk)]
    if not unlocked:
        return [], state
    stale = [p for p in unlocked if state[p] == "stale"]
    ops = [Cmd(dnf.versionlock_delete(stale, flavour=fl), root=True)] if stale else []
    ops.append(Cmd(dnf.versionlock_add(unlocked, flavour=fl), root=True))
    why = ("locked at another version" if stale and len(stale) == len(unlocked) else
           "not locked: a `dnf upgrade` could move the driver off the branch")
    return [Change("lock " + ", ".join(unlocked) + f" with dnf versionlock ({dnf.lock_file(fl)})", why, ops)], state


def _module_changes(facts: dict, cfg: dict) -> tuple[list[Change], list[str]]:
    major = branch_major(cfg)
    module, kernel = facts.get("driver_module"), facts.get("kernel", UNKNOWN)
    if module == UNKNOWN or module is None:
        return [], ["cannot read the built module's version (modinfo missing); check with "
                    "`modinfo -F version nvidia` after the step"]
    if str(module).startswith(major + "."):
        return [], []
    return [Change(f"build the nvidia kernel module with akmods for {kernel}",
                   f"the module for the running kernel is {module or 'not built'}, not {major}.x",
                   [Akmods(akmods_cmd(facts, cfg), str(kernel), int(cfg["driver"]["akmods_timeout"]), major,
                           cfg["driver"]["branch"])])], []


# Enable the unit if the transaction that installs akmods leaves it disabled (Fedora's preset enables it).
_ENABLE_IF_DISABLED = ('[ "$(systemctl is-enabled {u} 2>/dev/null)" != disabled ] || systemctl enable {u}'
                       .format(u=AKMODS_UNIT))


def _akmods_unit(facts: dict, cfg: dict) -> tuple[list[Change], list[str], list[str]]:
    """akmods.service on systemd hosts: what rebuilds the module at boot for a new kernel."""
    unit = facts.get("driver_akmods_unit")
    pk = dnf.installed(facts)
    if unit == "no-systemd":
        return [], [f"no systemd on this host: nothing rebuilds the nvidia module at boot ({AKMODS_UNIT}); "
                    "after a kernel update run `sudo akmods --force` before rebooting"], []
    if unit == "disabled":
        return [Change(f"enable {AKMODS_UNIT}", "it is disabled; it builds the nvidia module at boot for a new "
                       "kernel that has none (Fedora's preset enables it)",
                       [Cmd(["systemctl", "enable", AKMODS_UNIT], root=True)])], [], []
    if unit == "masked":
        return [], [f"{AKMODS_UNIT} is masked: after a kernel update nothing rebuilds the nvidia module at boot; "
                    f"`sudo systemctl unmask {AKMODS_UNIT}` (gpubox leaves a mask alone)"], []
    if unit == "not-found":
        if "akmods" in pk:
            return [], [], [f"akmods is installed but systemd has no {AKMODS_UNIT}: the module is not rebuilt at boot"]
        if any(p not in pk for p in cfg["driver"]["packages"]):    # akmods comes with the transaction
            return [Change(f"enable {AKMODS_UNIT} if the driver transaction leaves it disabled",
                           "akmods and its unit come with the transaction",
                           [Cmd(["sh", "-c", _ENABLE_IF_DISABLED], root=True)])], [], []
    return [], [], []


def _reboot_attention(facts: dict, cfg: dict) -> list[str]:
    major = branch_major(cfg)
    loaded, module = facts.get("driver_loaded"), facts.get("driver_module")
    if isinstance(loaded, str) and loaded.startswith(major + "."):
        return []
    return [f"reboot required: the loaded NVIDIA kernel module is {loaded or 'none'}, the installed one is "
            f"{module if module not in (None, UNKNOWN, '') else major + '.x'}; after the reboot confirm with "
            "`nvidia-smi` and `cat /proc/driver/nvidia/version`"]


def _secure_boot_attention(facts: dict) -> list[str]:
    sb = facts.get("driver_secure_boot")
    if not (isinstance(sb, dict) and sb.get("state") == "enabled" and sb.get("key") != "enrolled"):
        return []
    return ["Secure Boot is on and the akmods signing key is " + ("not created yet" if sb.get("key") == "missing"
                                                                 else "not enrolled")
            + ": the kernel refuses the unsigned module ('Required key not available'). Enrol it: "
            f"`sudo mokutil --import {AKMODS_KEY}`, reboot, and confirm the key in the MOK manager"]


# --- apply ------------------------------------------------------------------------------------------

def apply(host, facts: dict, cfg: dict, chk: Check):
    require_fedora(facts, NAME)
    return run_changes(host, chk)


def _say(host, line: str) -> None:
    print(f"[{NAME}] {line}", flush=True)
    if host.log:
        host.log(f"# {line}")


def _module_version(host) -> str:
    res = host.run(["modinfo", "-F", "version", "nvidia"], check=False)
    return (res.stdout or "").strip() if res.exited == 0 else ""


@dataclass
class Akmods(Op):
    """`akmods --force --kernels K` bounded by driver.akmods_timeout, its output shown as progress; then the
    built module must be of the branch (`modinfo -F version nvidia`), or the step fails with akmods' log."""
    argv: list[str]
    kernel: str
    limit: int
    major: str
    branch: str
    root: bool = True

    def text(self) -> str:
        return cmd(self.argv)

    def run(self, host, state: dict):
        _say(host, f"building the nvidia kernel module with akmods (up to {self.limit}s)")
        t0 = time.monotonic()
        res = host.run(self.argv, root=True, check=False, timeout=self.limit + 60,
                       stream=lambda line: _say(host, f"akmods: {line}") if line.strip() else None)
        out = (res.stdout or "") + "\n" + (res.stderr or "")
        fail = dict(command=cmd(self.argv), exited=res.exited, output=out)
        if res.exited in (124, 137):
            raise StepError(f"{NAME}: akmods did not finish within {self.limit}s (driver.akmods_timeout)",
                            f"raise driver.akmods_timeout, or read the build log under {AKMODS_LOGS} and run the step "
                            "again", **fail)
        if res.exited == 127:
            raise StepError(f"{NAME}: akmods is not installed (it comes with akmod-nvidia-{self.branch})",
                            "install akmods (dnf install akmods) and run the step again", **fail)
        module = _module_version(host)
        if res.exited != 0 or not module.startswith(self.major + "."):
            raise StepError(f"{NAME}: akmods could not build the {self.major} kernel module for {self.kernel} "
                            f"(module now: {module or 'none'})",
                            f"read the failed build log under {AKMODS_LOGS} (kernel-devel must match `uname -r` "
                            "exactly), fix it and run the step again", **fail)
        _say(host, f"akmods built nvidia {module} in {time.monotonic() - t0:.1f}s")
        return None
