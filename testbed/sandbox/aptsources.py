"""The Debian mirror this machine's own apt uses, for debootstrap (the sandbox's sid root, the header test's
trixie chroot), instead of a URL written into the code.

    debian_mirror()                   # GPUBOX_DEBIAN_MIRROR if set, else the host's apt sources
    debian_mirror(root=Path("/x"))    # read <root>/etc/apt/... (tests)

Where apt keeps its sources: the one-line format in /etc/apt/sources.list and sources.list.d/*.list
(`deb [options] URI SUITE COMPONENT...`) and the deb822 format in sources.list.d/*.sources (paragraphs with
`Types:`, `URIs:`, `Suites:`, `Components:`, `Enabled:`), see sources.list(5). The mirror chosen is the first
`deb` entry, enabled, with component `main`, whose suite is a Debian release (a codename such as bookworm, or
stable/testing/unstable, optionally with -updates or -backports) and not the security archive (which carries
only the security suites, so debootstrap cannot fetch sid or trixie from it). Third-party repositories
(another vendor's packages, Ubuntu) do not carry such suites and are skipped.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

ENV = "GPUBOX_DEBIAN_MIRROR"
# Debian's release names (codenames and aliases); a suite `<name>[-updates|-backports|-proposed-updates]`.
DEBIAN_SUITES = {
    "buzz", "rex", "bo", "hamm", "slink", "potato", "woody", "sarge", "etch", "lenny", "squeeze", "wheezy",
    "jessie", "stretch", "buster", "bullseye", "bookworm", "trixie", "forky", "duke", "sid",
    "oldoldstable", "oldstable", "stable", "testing", "unstable", "experimental",
}
SCHEMES = ("http://", "https://", "ftp://", "file:")


class MirrorError(Exception):
    """No usable Debian mirror in the apt sources; the message says where it looked and the fix."""


@dataclass(frozen=True)
class Source:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    origin: str                      # the file it came from


def _one_line(path: Path) -> list[Source]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        # `deb [arch=amd64 signed-by=...] URI SUITE COMPONENTS`: the options are one bracketed group.
        line = re.sub(r"\[[^\]]*\]", " ", line)
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "deb":
            out.append(Source(parts[1], (parts[2],), tuple(parts[3:]), str(path)))
    return out


def _deb822(path: Path) -> list[Source]:
    out = []
    text = "\n".join(l for l in path.read_text(errors="replace").splitlines() if not l.lstrip().startswith("#"))
    for para in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for line in para.splitlines():
            if line[:1].isspace() and key:               # continuation line
                fields[key] += " " + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() in ("no", "false", "0"):
            continue
        for uri in fields.get("uris", "").split():
            out.append(Source(uri, tuple(fields.get("suites", "").split()),
                              tuple(fields.get("components", "").split()), str(path)))
    return out


def sources(root: Path = Path("/")) -> list[Source]:
    """Every `deb` entry of the apt sources under root, in apt's reading order."""
    etc = root / "etc" / "apt"
    found: list[Source] = []
    if (etc / "sources.list").is_file():
        found += _one_line(etc / "sources.list")
    d = etc / "sources.list.d"
    if d.is_dir():
        for f in sorted(d.iterdir()):
            if f.name.endswith(".list") and f.is_file():
                found += _one_line(f)
            elif f.name.endswith(".sources") and f.is_file():
                found += _deb822(f)
    return found


def is_debian_suite(suite: str) -> bool:
    """`bookworm`, `sid`, `stable-updates`, `trixie-backports`: yes; `bookworm-security`, `noble`: no."""
    name, _, rest = suite.partition("-")
    return name in DEBIAN_SUITES and rest in ("", "updates", "backports", "proposed-updates")


def debian_mirror(root: Path = Path("/"), env: dict | None = None) -> str:
    """The Debian mirror URL for debootstrap: $GPUBOX_DEBIAN_MIRROR, else the host's apt sources."""
    env = os.environ if env is None else env
    if env.get(ENV):
        return env[ENV].rstrip("/")
    found = sources(root)
    for s in found:
        if (s.uri.startswith(SCHEMES) and "main" in s.components and any(is_debian_suite(x) for x in s.suites)):
            return s.uri.rstrip("/")
    seen = "; ".join(f"{s.uri} {' '.join(s.suites)} ({s.origin})" for s in found) or "no deb entries"
    raise MirrorError(f"no Debian mirror in the apt sources under {root / 'etc/apt'} (sources.list, "
                      f"sources.list.d/*.list, *.sources; saw: {seen}); fix: add a Debian mirror to the apt "
                      f"sources, or name one: {ENV}=http://<mirror>/debian")
