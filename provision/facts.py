"""Facts: what the steps decide on, gathered in ONE command on the target.

A fact is a shell snippet plus a parser (as in pyinfra). `gather` joins the snippets of the core
facts and of every step's `FACTS` into one bash script, runs it once, splits the output into
blocks and parses each block. A fact that cannot be read is UNKNOWN ("unknown"), never a crash.

Snippets are built from configuration with `host.sh`/`qpath` (every value quoted). Paths that start
with `~/` are resolved on the target against `$GPUBOX_HOME`, the home of `gpubox.user` (or of the
login user), which the script sets first.

>>> parse_blocks("@@fact a\\nx\\n@@rc 0\\n@@fact b\\n@@rc 3\\n")
{'a': ('x', 0), 'b': ('', 3)}
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from typing import Any, Callable, Iterable

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Fact:
    name: str
    command: Callable[[dict], str]          # cfg -> shell snippet (quote every config value!)
    parse: Callable[[str, int], Any]         # (output, exit status) -> value; raise/return UNKNOWN if unreadable


def qpath(path: str) -> str:
    """Quote a target path for a snippet; `~/x` becomes "$GPUBOX_HOME"/'x'."""
    if path == "~":
        return '"$GPUBOX_HOME"'
    if path.startswith("~/"):
        return '"$GPUBOX_HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


# --- parsers ------------------------------------------------------------------------------------------

def text_if_ok(out: str, rc: int) -> Any:
    return out.strip() if rc == 0 and out.strip() else UNKNOWN


def int_if_ok(out: str, rc: int) -> Any:
    return int(out.strip()) if rc == 0 else UNKNOWN


def kv_lines(out: str, rc: int) -> dict[str, str]:
    """KEY=VALUE lines (os-release style, quotes removed)."""
    d = {}
    for line in out.splitlines():
        k, sep, v = line.partition("=")
        if sep and k.strip():
            d[k.strip()] = v.strip().strip('"').strip("'")
    return d


def parse_os(out: str, rc: int) -> dict[str, str]:
    d = kv_lines(out, rc)
    return {"id": d.get("ID", UNKNOWN), "version": d.get("VERSION_ID", UNKNOWN),
            "pretty": d.get("PRETTY_NAME", UNKNOWN)}


def parse_glibc(out: str, rc: int) -> Any:
    m = re.search(r"(\d+\.\d+)", out)
    return m.group(1) if rc == 0 and m else UNKNOWN


def parse_dnf(out: str, rc: int) -> Any:
    """`dnf5` when dnf5 is present, `dnf4` for the Python dnf, else UNKNOWN."""
    first = out.strip().splitlines()[0] if out.strip() else ""
    if first.startswith("dnf5"):
        return "dnf5"
    if first.startswith("dnf4"):
        return "dnf4"
    return UNKNOWN


def parse_packages(out: str, rc: int) -> dict[str, str]:
    """`NAME\\tVERSION-RELEASE` lines from rpm -q/-qa --qf -> {name: version-release}. Lines for packages
    that are not installed ("package X is not installed") are ignored."""
    pk = {}
    for line in out.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0] and not line.startswith("package "):
            pk[parts[0]] = parts[1]
    return pk


def parse_gpus(out: str, rc: int) -> Any:
    """nvidia-smi --query-gpu=name,compute_cap,memory.total,memory.free,driver_version csv,noheader,nounits."""
    if rc != 0:
        return []
    gpus = []
    for line in out.strip().splitlines():
        f = [x.strip() for x in line.split(",")]
        if len(f) < 5:
            continue
        try:
            gpus.append({"name": f[0], "compute_cap": f[1], "arch": f[1].replace(".", ""),
                         "vram_mib": int(float(f[2])), "free_mib": int(float(f[3])), "driver": f[4]})
        except ValueError:
            continue
    return gpus


def parse_meminfo(out: str, rc: int) -> dict[str, int]:
    d = {}
    for line in out.splitlines():
        m = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if m:
            d[m.group(1)] = int(m.group(2)) // 1024  # MiB
    return {"total_mib": d.get("MemTotal", 0), "available_mib": d.get("MemAvailable", 0)}


def parse_df(out: str, rc: int) -> dict[str, int]:
    """Lines `PATH\\tAVAILABLE_KIB` -> {path: free MiB}."""
    d = {}
    for line in out.splitlines():
        p, sep, kb = line.rpartition("\t")
        if sep and kb.strip().isdigit():
            d[p] = int(kb) // 1024
    return d


def parse_sha256(out: str, rc: int) -> Any:
    m = re.match(r"^([0-9a-f]{64})\b", out.strip())
    return m.group(1) if rc == 0 and m else UNKNOWN


def parse_gcc_majors(out: str, rc: int) -> dict[str, Any]:
    """`default MAJOR` and one `path MAJOR` line per gcc-N found."""
    d: dict[str, Any] = {"default": UNKNOWN, "available": []}
    for line in out.splitlines():
        k, _, v = line.partition(" ")
        if not v.strip().isdigit():
            continue
        if k == "default":
            d["default"] = int(v)
        else:
            d["available"].append(int(v))
    d["available"] = sorted(set(d["available"]))
    return d


def parse_nvcc(out: str, rc: int) -> dict[str, Any]:
    m = re.search(r"release (\d+\.\d+), V([\d.]+)", out)
    path = out.splitlines()[0].strip() if out.strip() else ""
    return {"path": path if path.startswith("/") else UNKNOWN,
            "version": m.group(1) if m else UNKNOWN, "build": m.group(2) if m else UNKNOWN}


# --- the core facts -----------------------------------------------------------------------------------

def _pkg_query(cfg: dict) -> str:
    names = sorted(set(cfg["driver"]["packages"]) | set(cfg["driver"]["replaces"]) | set(cfg["cuda"]["packages"])
                   | set(cfg["compiler"]["packages"]) | {"fedora-release", "dnf5-plugins", "python3-dnf-plugin-versionlock"})
    globs = ["akmod-nvidia*", "xorg-x11-drv-nvidia*", "nvidia-driver*", "cuda*", "libcublas*", "gcc*",
             "kernel-devel*", "kernel-core*", "fedora-release*"]
    qf = r"%{NAME}\t%{VERSION}-%{RELEASE}\n"
    return (f"rpm -qa --qf {shlex.quote(qf)} " + " ".join(shlex.quote(g) for g in globs)
            + f"; rpm -q --qf {shlex.quote(qf)} " + " ".join(shlex.quote(n) for n in names) + " 2>/dev/null; true")


def _df(cfg: dict) -> str:
    paths = [cfg["state_dir"], cfg["cuda"]["prefix"], cfg["build"]["src_dir"], cfg["build"]["build_dir"], cfg["models"]["dir"]]
    # df needs an existing path: walk up to the nearest existing parent, print the configured path.
    return ("for p in " + " ".join(qpath(p) for p in paths) + "; do q=$p; while [ ! -e \"$q\" ]; do q=$(dirname \"$q\"); done; "
            "printf '%s\\t%s\\n' \"$p\" \"$(df -Pk \"$q\" | awk 'NR==2{print $4}')\"; done")


def _gcc(cfg: dict) -> str:
    return ("echo default $(gcc -dumpversion 2>/dev/null | cut -d. -f1); "
            "for g in /usr/bin/gcc-[0-9]*; do [ -x \"$g\" ] && echo \"$g\" $(\"$g\" -dumpversion | cut -d. -f1); done")


def _nvcc(cfg: dict) -> str:
    nv = qpath(cfg["cuda"]["prefix"] + "/bin/nvcc")
    return f"if [ -x {nv} ]; then echo {nv}; {nv} --version; elif command -v nvcc; then nvcc --version; fi"


CORE_FACTS: list[Fact] = [
    Fact("user", lambda cfg: 'echo "$(id -un) $(id -u)"',
         lambda o, rc: {"name": o.split()[0], "uid": int(o.split()[1])}),
    Fact("home", lambda cfg: 'echo "$GPUBOX_HOME"', text_if_ok),
    Fact("hostname", lambda cfg: "hostname", text_if_ok),
    Fact("os", lambda cfg: "cat /etc/os-release", parse_os),
    Fact("kernel", lambda cfg: "uname -r", text_if_ok),
    Fact("glibc", lambda cfg: "getconf GNU_LIBC_VERSION", parse_glibc),
    Fact("dnf", lambda cfg: "if command -v dnf5 >/dev/null; then dnf5 --version; "
                            "elif command -v dnf >/dev/null; then echo dnf4; fi", parse_dnf),
    Fact("packages", _pkg_query, parse_packages),
    Fact("sudo", lambda cfg: "[ \"$(id -u)\" = 0 ] && echo root || (sudo -n true && echo yes || echo no)", text_if_ok),
    Fact("gcc", _gcc, parse_gcc_majors),
    Fact("nvcc", _nvcc, parse_nvcc),
    Fact("gpus", lambda cfg: "nvidia-smi --query-gpu=name,compute_cap,memory.total,memory.free,driver_version "
                             "--format=csv,noheader,nounits", parse_gpus),
    Fact("mem", lambda cfg: "cat /proc/meminfo", parse_meminfo),
    Fact("cores", lambda cfg: "nproc", int_if_ok),
    Fact("disk_free_mib", _df, parse_df),
    Fact("systemd", lambda cfg: "[ -d /run/systemd/system ] && echo yes || echo no", text_if_ok),
]


# --- gathering ----------------------------------------------------------------------------------------

def script(cfg: dict, facts: Iterable[Fact]) -> str:
    """The one bash script that prints every fact as a `@@fact NAME` block ending in `@@rc N`."""
    user = cfg.get("user") or ""
    lines = [
        "export LC_ALL=C",
        # The home that `~/` paths in the configuration refer to.
        (f"GPUBOX_HOME=$(getent passwd {shlex.quote(user)} | cut -d: -f6); " if user else "GPUBOX_HOME=; ")
        + '[ -n "$GPUBOX_HOME" ] || GPUBOX_HOME=$HOME',
    ]
    for f in facts:
        lines.append(f"echo '@@fact {f.name}'; ( {f.command(cfg)} ) 2>/dev/null; echo \"@@rc $?\"")
    return "\n".join(lines) + "\n"


def parse_blocks(out: str) -> dict[str, tuple[str, int]]:
    blocks: dict[str, tuple[str, int]] = {}
    name, buf = None, []
    for line in out.splitlines():
        if line.startswith("@@fact "):
            name, buf = line[7:].strip(), []
        elif line.startswith("@@rc ") and name is not None:
            try:
                rc = int(line[5:].strip())
            except ValueError:
                rc = 1
            blocks[name] = ("\n".join(buf), rc)
            name = None
        elif name is not None:
            buf.append(line)
    return blocks


def parse(out: str, facts: Iterable[Fact]) -> dict[str, Any]:
    blocks = parse_blocks(out)
    result: dict[str, Any] = {}
    for f in facts:
        if f.name not in blocks:
            result[f.name] = UNKNOWN
            continue
        text, rc = blocks[f.name]
        try:
            result[f.name] = f.parse(text, rc)
        except Exception:  # a fact that cannot be read is "unknown", never a crash
            result[f.name] = UNKNOWN
    return result


def all_facts(step_modules: Iterable[Any] = ()) -> list[Fact]:
    facts = list(CORE_FACTS)
    seen = {f.name for f in facts}
    for m in step_modules:
        for f in getattr(m, "FACTS", ()):
            if f.name not in seen:
                facts.append(f)
                seen.add(f.name)
    return facts


def gather(host, cfg: dict, step_modules: Iterable[Any] = ()) -> dict[str, Any]:
    """Run the fact script once on the host and parse it."""
    facts = all_facts(step_modules)
    result = host.run(["bash", "-c", script(cfg, facts)], check=False)
    parsed = parse(result.stdout or "", facts)
    user = parsed.get("user")
    if isinstance(user, dict):
        host.is_root = user["uid"] == 0
    return parsed


def is_fedora(facts: dict, version: str | None = "42") -> bool:
    os_ = facts.get("os")
    if not isinstance(os_, dict) or os_.get("id") != "fedora":
        return False
    return version is None or os_.get("version") == version
