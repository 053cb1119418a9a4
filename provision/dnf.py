"""dnf and rpm for the system steps: command forms for dnf5 and dnf4, versionlock, error classes.

Fedora 42's `dnf` is dnf5; a host with the older Python dnf (dnf4) differs in three places the steps
meet: the versionlock store (dnf5: `/etc/dnf/versionlock.toml`; dnf4's plugin,
`python3-dnf-plugin-versionlock`: `/etc/dnf/plugins/versionlock.list`), the error texts, and a few
options. Everything here is pure (facts/text in, argument lists or values out) so the steps stay
testable; the commands run through `Host.run` as argument lists, never pasted strings.

>>> install(["a", "b c"], flavour="dnf5", allowerasing=True, releasever=44)
['dnf5', '-y', 'install', '--allowerasing', '--releasever=44', 'a', 'b c']
>>> install(["a"], flavour="dnf4")
['dnf', '-y', 'install', 'a']
>>> classify("Failed to resolve the transaction:\\nNo match for argument: nosuch\\n").kind
'missing'
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any, Iterable

from .facts import UNKNOWN

DNF5_LOCKS = "/etc/dnf/versionlock.toml"
DNF4_LOCKS = "/etc/dnf/plugins/versionlock.list"
DNF4_LOCK_PLUGIN = "python3-dnf-plugin-versionlock"


# --- command forms ----------------------------------------------------------------------------------

def binary(flavour: str) -> str:
    """The dnf command: `dnf5` where the host has dnf5 (on Fedora 42 `dnf` is the same program), else `dnf`."""
    return "dnf5" if flavour == "dnf5" else "dnf"


def flavour_of(facts: dict) -> str:
    """dnf5 or dnf4 from the facts; an unknown flavour is treated as dnf5 (Fedora 42's)."""
    f = facts.get("dnf")
    return f if f in ("dnf5", "dnf4") else "dnf5"


def _common(flavour: str, releasever: int | str | None, options: Iterable[str]) -> list[str]:
    out = []
    if releasever:
        out.append(f"--releasever={releasever}")
    out.extend(options)
    return out


def install(packages: Iterable[str], *, flavour: str = "dnf5", allowerasing: bool = False,
            releasever: int | str | None = None, options: Iterable[str] = ()) -> list[str]:
    """`dnf -y install [--allowerasing] [--releasever=N] PKG...` (same form for dnf5 and dnf4)."""
    argv = [binary(flavour), "-y", "install"]
    if allowerasing:
        argv.append("--allowerasing")
    return argv + _common(flavour, releasever, options) + list(packages)


def remove(packages: Iterable[str], *, flavour: str = "dnf5", options: Iterable[str] = ()) -> list[str]:
    return [binary(flavour), "-y", "remove", *options, *packages]


def swap(old: str, new: str, *, flavour: str = "dnf5", releasever: int | str | None = None) -> list[str]:
    """The recipe's form, shown in the plan for reference: `dnf swap OLD NEW --allowerasing --releasever=N`."""
    return [binary(flavour), "-y", "swap", old, new, "--allowerasing"] + _common(flavour, releasever, ())


def versionlock_add(packages: Iterable[str], *, flavour: str = "dnf5") -> list[str]:
    """Lock packages at their installed versions (dnf5 looks among installed packages first; the dnf4
    plugin locks the installed version too)."""
    return [binary(flavour), "versionlock", "add", *packages]


def versionlock_delete(packages: Iterable[str], *, flavour: str = "dnf5") -> list[str]:
    return [binary(flavour), "versionlock", "delete", *packages]


def lock_file(flavour: str) -> str:
    return DNF4_LOCKS if flavour == "dnf4" else DNF5_LOCKS


# --- versionlock stores -----------------------------------------------------------------------------

@dataclass
class Lock:
    """One lock entry: a name (or glob) held at `evr` (epoch:version-release; "" = conditions other than =)."""
    name: str
    evr: str = ""
    exclude: bool = False       # dnf4 `!name-...` / dnf5 `!=`: a version kept OUT, not a lock

    def matches(self, package: str) -> bool:
        return fnmatch.fnmatchcase(package, self.name)


def parse_versionlock_toml(text: str) -> list[Lock]:
    """dnf5's /etc/dnf/versionlock.toml -> locks. Unreadable text -> [] (the step then re-adds the locks).

    >>> t = 'version = "1.0"\\n[[packages]]\\nname = "akmod-nvidia-580xx"\\n[[packages.conditions]]\\n'\\
    ...     'key = "evr"\\ncomparator = "="\\nvalue = "3:580.105.08-1.fc44"\\n'
    >>> parse_versionlock_toml(t)
    [Lock(name='akmod-nvidia-580xx', evr='3:580.105.08-1.fc44', exclude=False)]
    """
    if not text.strip():
        return []
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return []
    locks = []
    for p in data.get("packages", []) or []:
        if not isinstance(p, dict) or not p.get("name"):
            continue
        evr, exclude = "", False
        for c in p.get("conditions", []) or []:
            if not isinstance(c, dict) or c.get("key") != "evr":
                continue
            if c.get("comparator") == "=":
                evr = str(c.get("value", ""))
            elif c.get("comparator") == "!=":
                exclude = True
        locks.append(Lock(str(p["name"]), evr, exclude))
    return locks


_NEVRA = re.compile(r"^(?P<name>.+)-(?:(?P<epoch>\d+):)?(?P<version>[^-:]+)-(?P<release>[^-]+?)(?:\.(?P<arch>[^.]+|\*))?$")


def parse_versionlock_list(text: str) -> list[Lock]:
    """dnf4's versionlock.list (`NAME-EPOCH:VERSION-RELEASE.ARCH` per line, `!` = exclude, `#` comments).

    >>> parse_versionlock_list("# added\\nakmod-nvidia-580xx-3:580.105.08-1.fc44.*\\n!foo-0:1-2.*\\n")
    [Lock(name='akmod-nvidia-580xx', evr='3:580.105.08-1.fc44', exclude=False), Lock(name='foo', evr='0:1-2', exclude=True)]
    """
    locks = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = line.startswith("!")
        line = line.lstrip("!")
        m = _NEVRA.match(line)
        if not m:
            locks.append(Lock(line, "", exclude))
            continue
        evr = f"{m.group('epoch') or 0}:{m.group('version')}-{m.group('release')}"
        locks.append(Lock(m.group("name"), evr, exclude))
    return locks


def locks_for(flavour: str, files: dict[str, str]) -> list[Lock]:
    """The locks that apply on a host of this flavour, from the versionlock files' contents."""
    if flavour == "dnf4":
        return parse_versionlock_list(files.get(DNF4_LOCKS, ""))
    return parse_versionlock_toml(files.get(DNF5_LOCKS, ""))


def evr_matches(lock_evr: str, version_release: str) -> bool:
    """Does a lock's `E:V-R` (epoch optional) hold the installed `V-R`?

    >>> evr_matches("3:580.105.08-1.fc44", "580.105.08-1.fc44"), evr_matches("580.1-1", "580.2-1")
    (True, False)
    """
    if not lock_evr:
        return False
    vr = lock_evr.split(":", 1)[1] if ":" in lock_evr else lock_evr
    return vr == version_release


def lock_state(packages: Iterable[str], installed: dict[str, str], locks: list[Lock]) -> dict[str, str]:
    """For each package: "locked" (held at the installed version), "unlocked", or "stale" (a lock on
    another version, e.g. left by an earlier install).

    >>> lock_state(["a", "b", "c"], {"a": "1-1", "b": "2-1", "c": "3-1"},
    ...            [Lock("a", "0:1-1"), Lock("b", "0:1-1")])
    {'a': 'locked', 'b': 'stale', 'c': 'unlocked'}
    """
    out = {}
    for p in packages:
        mine = [lk for lk in locks if not lk.exclude and lk.matches(p)]
        if not mine:
            out[p] = "unlocked"
        elif p in installed and any(evr_matches(lk.evr, installed[p]) for lk in mine):
            out[p] = "locked"
        else:
            out[p] = "stale"
    return out


# --- facts ------------------------------------------------------------------------------------------

def files_snippet(paths: Iterable[str]) -> str:
    """Shell snippet printing each readable file as `@@@file PATH` + contents (missing files: no block)."""
    import shlex
    qs = " ".join(shlex.quote(p) for p in paths)
    return f"for f in {qs}; do if [ -r \"$f\" ]; then echo \"@@@file $f\"; cat \"$f\"; echo; fi; done; true"


def parse_files(out: str, rc: int) -> dict[str, str]:
    """`@@@file PATH` blocks -> {path: contents} (the trailing newline the snippet adds is dropped)."""
    files: dict[str, list[str]] = {}
    cur = None
    for line in out.split("\n"):
        if line.startswith("@@@file "):
            cur = line[8:]
            files[cur] = []
        elif cur is not None:
            files[cur].append(line)
    # `cat; echo` ends each file with one extra newline, which the line split absorbs: joining the
    # lines gives the contents back exactly, with or without a final newline.
    return {k: "\n".join(lines) for k, lines in files.items()}


# --- errors -----------------------------------------------------------------------------------------

@dataclass
class DnfError:
    """What went wrong in a dnf run, in words a user can act on."""
    kind: str                                   # conflict | missing | locked-out | lock-busy | network | gpg | space | other
    detail: str
    packages: list[str] = field(default_factory=list)

    def fix(self) -> str:
        return {
            "missing": "check the package names in the configuration and that the repository providing them is "
                       "enabled (dnf repolist); for RPM Fusion's 580xx family see driver.releasever",
            "conflict": "read dnf's problem text above; a conflicting package may need --allowerasing or removal, "
                        "or a versionlock may hold an older version (dnf versionlock list)",
            "locked-out": "a versionlock excludes the wanted version: dnf versionlock list / delete",
            "lock-busy": "another dnf or rpm is running (e.g. PackageKit); wait for it and run again",
            "network": "a repository could not be reached: check the network/proxy and the repo's baseurl",
            "gpg": "import the repository's signing key (gpgkey=) or check gpgcheck in the repo file",
            "space": "free disk space on the target and run again",
        }.get(self.kind, "see dnf's output above and the step log")


_PATTERNS: list[tuple[str, re.Pattern]] = [
    # dnf5 and dnf4 both print this for an unknown package name.
    ("missing", re.compile(r"No match for argument:\s*(\S+)")),
    ("missing", re.compile(r"Unable to find a match:\s*(.+)")),
    ("missing", re.compile(r"No package (\S+) available")),
    ("locked-out", re.compile(r"(?:excluded by versionlock|filtered out by exclude filtering|is filtered out by versionlock)")),
    ("lock-busy", re.compile(r"(?:Waiting for process with pid|Failed to obtain rpm transaction lock|"
                              r"another copy is running|transaction lock.*held|Cannot acquire)", re.I)),
    ("gpg", re.compile(r"(?:GPG check FAILED|public key .* not installed|Signature verification failed|"
                        r"OpenPGP check for package .* has failed)", re.I)),
    ("network", re.compile(r"(?:Cannot download|Curl error|Failed to download metadata|"
                            r"Cannot find a valid baseurl|Could not resolve host|Status code: 404)", re.I)),
    ("space", re.compile(r"(?:needs \d+\S* more space|No space left on device|Not enough free space)", re.I)),
    # dnf5: "Failed to resolve the transaction:\nProblem: ..."; dnf4: "Error: \n Problem: ...".
    ("conflict", re.compile(r"(?:Failed to resolve the transaction|^\s*Problem( \d+)?:|conflicts with|"
                             r"Error:\s*$\s*Problem)", re.M)),
]


def classify(output: str) -> DnfError:
    """Classify dnf's output (stdout + stderr of a failed run).

    >>> classify("Failed to resolve the transaction:\\nProblem: package akmod-nvidia-580xx conflicts with akmod-nvidia").kind
    'conflict'
    >>> e = classify("No match for argument: nosuch-pkg\\nNo match for argument: other\\n"); e.kind, e.packages
    ('missing', ['nosuch-pkg', 'other'])
    """
    for kind, rx in _PATTERNS:
        found = rx.findall(output)
        if not found:
            continue
        pkgs: list[str] = []
        if kind == "missing":
            for f in found:
                for p in (f if isinstance(f, str) else f[0]).split():
                    if p not in pkgs:
                        pkgs.append(p)
        lines = [ln for ln in output.splitlines() if ln.strip()]
        detail = _problem_text(output) if kind == "conflict" else next(
            (ln.strip() for ln in lines if rx.search(ln)), lines[-1].strip() if lines else "")
        return DnfError(kind, detail, pkgs)
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    return DnfError("other", lines[-1] if lines else "no output")


def _problem_text(output: str) -> str:
    """The `Problem:` paragraph(s) of a resolver failure, joined on one line each."""
    lines = output.splitlines()
    out = []
    grab = False
    for ln in lines:
        s = ln.strip()
        if re.match(r"^Problem( \d+)?:", s):
            grab = True
        if grab and s:
            out.append(s)
        if grab and not s:
            grab = False
    return " / ".join(out[:6]) or next((ln.strip() for ln in lines if "Failed to resolve" in ln), "resolver failure")


def describe_failure(step: str, what: str, argv: list[str], exited: int, output: str):
    """A StepError for a failed dnf command: names the step, what it tried, dnf's reason and the fix."""
    from .engine import StepError
    from .host import cmd
    err = classify(output)
    cause = {
        "missing": f"{step}: {what} failed: the repositories have no package named {', '.join(err.packages) or '?'}",
        "conflict": f"{step}: {what} failed: dnf could not resolve the transaction ({err.detail})",
    }.get(err.kind, f"{step}: {what} failed ({err.kind}: {err.detail})")
    return StepError(cause + "; nothing was installed or removed (dnf transactions are all-or-nothing)",
                     err.fix(), command=cmd(argv), exited=exited, output=output)


def run_transaction(host, step: str, what: str, argv: list[str], *, timeout: float | None = None,
                    stream=None):
    """Run one dnf transaction as root; a failure becomes a StepError that names the step and the cause."""
    res = host.run(argv, root=True, check=False, timeout=timeout, stream=stream)
    if res.exited != 0:
        out = (res.stdout or "") + "\n" + (res.stderr or "")
        raise describe_failure(step, what, argv, res.exited, out)
    return res


def installed(facts: dict) -> dict[str, str]:
    pk = facts.get("packages")
    return pk if isinstance(pk, dict) else {}


def known(value: Any) -> bool:
    return value is not None and value != UNKNOWN
