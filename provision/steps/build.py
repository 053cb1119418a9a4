"""Step 5: build the llama.cpp fork at a pinned commit, fast and reproducibly.

What it does, in order (apply), each part skipped when already right:

1. Source: clone the configured URL (a git URL, an absolute path or a file:// URL) into build.src_dir
   (a full clone: the build embeds the commit and its count, which a shallow clone gets wrong), fetch
   when the pinned commit is missing, and check out the pinned full SHA detached. A checkout with local
   changes, or whose HEAD is a commit no branch or tag holds, is reported and left alone.
2. Configure with CMake (Ninja when present), every input explicit: compilers, CUDA compiler and host
   compiler, CUDA architectures, ccache launchers. The inputs are recorded in gpubox-configure.json;
   when they change, the cached configuration is deleted first (CMake ignores a changed compiler or
   architecture in an existing CMakeCache.txt).
3. Build only build.targets with a job count bounded by cores and memory (provision.jobs), printing
   Ninja's [n/N] progress; the full compiler output goes to the step's log. An interrupted build
   continues where it stopped (Ninja), because the stamp is removed before and written only after.
4. Record: `llama-server --version` must name the pinned commit; `llama-server --help` is parsed once
   (provision.serve.helptext) and stored as JSON for the serve step; last, the build stamp with the
   sha256 of every file in bin/.

Reproducible: the same pin, compilers and flags give the same bytes in bin/ wherever the source tree and
the build directory are (docs/reproducible-builds.md): prefix maps for every compiler (nvcc's host
compiler included), $ORIGIN-relative RPATHs, SOURCE_DATE_EPOCH from the pinned commit, LC_ALL=C, TZ=UTC
and umask 022 for the compilers, and nvcc's intermediate files named after the object, not a PID.

Files in build.build_dir (the serve step and `invoke verify` read them):
    gpubox-stamp.json      SHA, cmake arguments, compiler versions, targets, timings, the sha256 of
                           every file in bin/ (written last)
    gpubox-configure.json  the inputs of the current CMake configuration
    gpubox-dialect.json    the flag dialect of bin/llama-server (provision.serve.helptext.to_json)
    gpubox-help.txt        the raw `llama-server --help` text it was parsed from
"""

from __future__ import annotations

import datetime as _dt
import json
import posixpath
import re
import shlex
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import config as configmod, lockfile, progress, repro
from ..engine import Change, Check, StepError, run_changes
from ..facts import UNKNOWN, Fact, qpath
from ..host import CommandFailed, cmd, expand_home
from ..jobs import choose_jobs
from ..ops import Cmd, Op, Refuse

NAME = "build"
TITLE = "llama.cpp fork at a pinned commit"

STAMP_FILE = "gpubox-stamp.json"
CONFIGURE_FILE = "gpubox-configure.json"
DIALECT_FILE = "gpubox-dialect.json"      # == provision.serve.helptext.FILENAME
HELP_FILE = "gpubox-help.txt"
STAMP_VERSION = 1
SERVER = "llama-server"

# Ninja: "[12/220] Building CXX object ..."; Makefiles: "[ 45%] Building ...".
NINJA_RE = re.compile(r"^\[(\d+)/(\d+)\]")
MAKE_RE = re.compile(r"^\[\s*(\d+)%\]")
ARCH_LINE_RE = re.compile(r"Using CMAKE_CUDA_ARCHITECTURES=.*")
OOM_RE = re.compile(r"signal:? (9|11)\b|Kill(ed)? signal|cicc terminated|out of memory|std::bad_alloc", re.I)


# --- facts --------------------------------------------------------------------------------------------

def toolchain(cfg: dict) -> dict[str, str]:
    """Where the compilers come from (pure, from config). CPU builds use the host's cc/c++ (from facts).

    CUDA: nvcc is build.nvcc or <cuda.prefix>/bin/nvcc (step 2); the host compiler is build.host_compiler
    or step 3's g++-<major>; C and C++ use the same gcc as nvcc's host compiler, so the whole build has
    one compiler."""
    b = cfg["build"]
    if not b["cuda"]:
        return {"source": "host", "nvcc": "", "host": "", "cc": "", "cxx": ""}
    nvcc = b["nvcc"] or posixpath.join(cfg["cuda"]["prefix"], "bin", "nvcc")
    host = b["host_compiler"] or _steps_host_compiler(cfg)
    source = "config" if (b["nvcc"] or b["host_compiler"]) else "steps 2-3"
    return {"source": source, "nvcc": nvcc, "host": host, "cc": c_compiler_of(host), "cxx": host}


def _steps_host_compiler(cfg: dict) -> str:
    try:
        from . import compiler as compstep
        fn = getattr(compstep, "host_compiler", None)
        if fn is not None:
            return fn(cfg)
    except Exception:  # the compiler helper's module not there or broken: the same value, derived here
        pass
    return f"/usr/bin/g++-{cfg['compiler']['major']}"


def c_compiler_of(cxx: str) -> str:
    """The C driver next to a C++ driver: g++-14 -> gcc-14, g++ -> gcc, clang++ -> clang, c++ -> cc.

    >>> c_compiler_of("/usr/bin/g++-14"), c_compiler_of("/usr/bin/clang++-18"), c_compiler_of("/opt/x")
    ('/usr/bin/gcc-14', '/usr/bin/clang-18', '')
    """
    d, base = posixpath.split(cxx)
    for a, b in (("clang++", "clang"), ("g++", "gcc"), ("c++", "cc")):
        if a in base:
            return posixpath.join(d, base.replace(a, b, 1))
    return ""


def _fact_command(cfg: dict) -> str:
    b = cfg["build"]
    sha = configmod.fork_pin(cfg)["sha"]
    tc = toolchain(cfg)
    kv = "kv() { printf '%s=%s\\n' \"$1\" \"$2\"; }"
    lines = [
        kv,
        f"src={qpath(b['src_dir'])}; bld={qpath(b['build_dir'])}; sha={qpath(sha)}",
        'kv path "$PATH"',
        # git: HEAD, local changes (without taking the index lock: a fact never writes), the origin URL,
        # whether the pinned commit is present, and whether HEAD is held by a branch or tag.
        'if [ -e "$src/.git" ]; then kv src git; g() { git -C "$src" --no-optional-locks "$@"; }; '
        'kv head "$(g rev-parse HEAD)"; '
        'kv dirty "$(g status --porcelain --untracked-files=no | head -n 20 | cut -c4- | tr "\\n" " ")"; '
        'kv origin "$(g config --get remote.origin.url)"; '
        'g cat-file -e "$sha^{commit}" && kv has_sha yes || kv has_sha no; '
        '[ -n "$(g for-each-ref --contains HEAD --count=1 --format=x)" ] && kv head_on_ref yes || kv head_on_ref no; '
        'elif [ -d "$src" ] && [ -z "$(ls -A "$src")" ]; then kv src empty; '
        'elif [ -e "$src" ]; then kv src other; else kv src missing; fi',
        f'[ -f "$bld/{STAMP_FILE}" ] && kv stamp "$(tr -d "\\n" < "$bld/{STAMP_FILE}")"',
        f'[ -f "$bld/{CONFIGURE_FILE}" ] && kv configured "$(tr -d "\\n" < "$bld/{CONFIGURE_FILE}")"',
        '[ -f "$bld/CMakeCache.txt" ] && kv cmakecache yes',
        '{ [ -f "$bld/build.ninja" ] || [ -f "$bld/Makefile" ]; } && kv generated yes',
        f'[ -s "$bld/{DIALECT_FILE}" ] && kv dialect yes',
        # The lock's record of the build (the whole lock on one line: JSON without its newlines).
        f'lock={qpath(lockfile.path(cfg))}; [ -f "$lock" ] && kv lock "$(tr -d "\\n" < "$lock")"',
        'for t in ' + " ".join(qpath(t) for t in b["targets"]) + '; do [ -x "$bld/bin/$t" ] && kv bin "$t"; done',
        # --version prints to stderr; a CUDA build on a box whose driver is not loaded fails here.
        f'if [ -x "$bld/bin/{SERVER}" ]; then v=$(timeout 60 "$bld/bin/{SERVER}" --version 2>&1); kv version_rc $?; '
        'kv version "$(printf "%s" "$v" | grep -m1 "^version")"; '
        'kv version_tail "$(printf "%s" "$v" | tail -n 3 | tr "\\n" " ")"; fi',
        'c=$(command -v ccache) && kv ccache "$c" && kv ccache_version "$(ccache --version | head -n1)"',
        'c=$(command -v cmake) && kv cmake "$c" && kv cmake_version "$(cmake --version | head -n1)"',
        'c=$(command -v ninja || command -v ninja-build) && kv ninja "$c" && kv ninja_version "$("$c" --version)"',
        'c=$(command -v git) && kv git "$c"',
    ]
    if tc["nvcc"]:
        lines.append(f"nv={qpath(tc['nvcc'])}; kv nvcc_path \"$nv\"; "
                     '[ -x "$nv" ] && kv nvcc_version "$("$nv" --version | grep -m1 release)"; '
                     # --objdir-as-tempdir names nvcc's intermediate files after the object instead of a PID
                     # (docs/reproducible-builds.md); asked of this nvcc, not assumed from its version.
                     '[ -x "$nv" ] && "$nv" --help | grep -q -e "--objdir-as-tempdir" && kv nvcc_objtemp yes')
        lines.append(f"cx={qpath(tc['cxx'])}; cc={qpath(tc['cc'] or tc['cxx'])}")
    else:
        lines.append('cx=$(command -v c++ || command -v g++); cc=$(command -v cc || command -v gcc)')
    lines.append('kv cxx_path "$cx"; [ -x "$cx" ] && kv cxx_version "$("$cx" --version | head -n1)"; '
                 'kv cc_path "$cc"; [ -x "$cc" ] && kv cc_version "$("$cc" --version | head -n1)"')
    return "; ".join(lines[:1]) + "\n" + "\n".join(lines[1:]) + "\ntrue"


def parse_fact(out: str, rc: int) -> dict[str, Any]:
    """`key=value` lines -> the build fact. JSON values (stamp, configured) that do not parse are None."""
    d: dict[str, Any] = {"src": "missing", "bins": [], "stamp": None, "configured": None, "dirty": [],
                         "has_sha": False, "head_on_ref": False, "cmakecache": False, "generated": False,
                         "dialect": False, "nvcc_objtemp": False, "lock": None}
    for line in out.splitlines():
        k, sep, v = line.partition("=")
        if not sep:
            continue
        v = v.strip()
        if k == "bin":
            d["bins"].append(v)
        elif k in ("stamp", "configured", "lock"):
            try:
                d[k] = json.loads(v)
            except ValueError:
                d[k] = None
        elif k == "dirty":
            d[k] = v.split()
        elif k in ("has_sha", "head_on_ref", "cmakecache", "generated", "dialect", "nvcc_objtemp"):
            d[k] = v == "yes"
        elif k == "version_rc":
            d[k] = int(v) if v.lstrip("-").isdigit() else 1
        else:
            d[k] = v
    return d


def _helper_facts() -> list[Fact]:
    """Step 3's shim facts (build_env reads the target's PATH from them) and step 4's header fact (the
    build re-checks the patch), so `invoke build` alone gathers what it decides on."""
    out: list[Fact] = []
    try:
        from . import compiler as compstep, patch as patchstep
        out += list(getattr(compstep, "FACTS", [])) + list(getattr(patchstep, "FACTS", []))
    except Exception:  # a helper module that does not import: build decides without it (and says so)
        pass
    return out


FACTS = [Fact("build", _fact_command, parse_fact), *_helper_facts()]


# --- decisions (pure) ---------------------------------------------------------------------------------

def _version_tuple(v: Any) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(v).split("."))
    except ValueError:
        return ()


def architecture(facts: dict, cfg: dict) -> tuple[str, str]:
    """(CMAKE_CUDA_ARCHITECTURES, why). `native` needs a visible GPU; without one the fallback is used."""
    b = cfg["build"]
    want = str(b["cuda_architectures"])
    if want != "native":
        return want, f"build.cuda_architectures = {want} (configured)"
    gpus = facts.get("gpus")
    if isinstance(gpus, list) and gpus:
        archs = sorted({str(g.get("arch")) for g in gpus})
        names = ", ".join(g.get("name", "?") for g in gpus)
        m = re.search(r"(\d+)\.(\d+)", str(_bfact(facts).get("cmake_version") or ""))
        if m and (int(m.group(1)), int(m.group(2))) < (3, 24):
            # `native` needs CMake >= 3.24; nvidia-smi already named the card's architecture.
            return ";".join(archs), (f"CMake {m.group(0)} < 3.24 has no `native`: using the visible GPU's "
                                     f"architecture from nvidia-smi ({names}: {';'.join(archs)})")
        return "native", f"native: the visible GPU(s) ({names}; sm_{','.join(archs)})"
    fb = str(b["fallback_architectures"])
    return fb, (f"no GPU visible (nvidia-smi lists none: a container, or the new driver is not loaded before "
                f"the reboot), so `native` cannot work: using build.fallback_architectures = {fb}")


def gpu_archs(facts: dict) -> list[str]:
    gpus = facts.get("gpus")
    return sorted({str(g.get("arch")) for g in gpus}) if isinstance(gpus, list) else []


def cmake_flags(facts: dict, cfg: dict) -> list[tuple[str, str]]:
    """The -D options with the reason for each (nixpkgs style: no flag without its why)."""
    b = cfg["build"]
    f = _bfact(facts)
    tc = toolchain(cfg)
    flags: list[tuple[str, str]] = [
        ("-DCMAKE_BUILD_TYPE=Release", "optimised code; single-config generators default to an unoptimised build"),
        ("-DLLAMA_BUILD_UI=OFF", "no npm build of the web UI: the build stays offline and reproducible"),
        ("-DLLAMA_USE_PREBUILT_UI=OFF", "no download of the prebuilt web UI from a Hugging Face bucket at build time"),
        ("-DLLAMA_CURL=OFF", "older trees (the recipe's pre-sync trunk) default to libcurl for -hf downloads and "
                             "stop without libcurl-devel; gpubox downloads the models itself (step 6)"),
        ("-DLLAMA_OPENSSL=OFF", "no HTTPS client in the server (models come from step 6), so the result does not "
                                "depend on whether openssl-devel happens to be installed"),
        ("-DLLAMA_BUILD_TESTS=OFF", "test targets are never built here; skipping them shortens configure"),
        (f"-DGGML_CUDA={'ON' if b['cuda'] else 'OFF'}", "the CUDA backend (build.cuda)"),
        # ggml's own hook sets RULE_LAUNCH_COMPILE when it finds ccache; the launchers below are explicit
        # instead, one per language, CUDA included, and absent when ccache is.
        ("-DGGML_CCACHE=OFF", "ccache is set per language below (CUDA included) instead of by ggml's own hook"),
    ]
    ccache = (f.get("ccache") or "") if b["ccache"] else ""
    if ccache:
        flags += [(f"-DCMAKE_C_COMPILER_LAUNCHER={ccache}", "ccache for C"),
                  (f"-DCMAKE_CXX_COMPILER_LAUNCHER={ccache}", "ccache for C++")]
        if b["cuda"]:
            flags.append((f"-DCMAKE_CUDA_COMPILER_LAUNCHER={ccache}",
                          "ccache for nvcc too: the CUDA objects are most of the build time"))
    if b["cuda"]:
        cc, cxx = tc["cc"], tc["cxx"]
    else:
        cc, cxx = f.get("cc_path") or "", f.get("cxx_path") or ""
    if cc:
        flags.append((f"-DCMAKE_C_COMPILER={cc}", "explicit, so a changed compiler is seen and reconfigured"))
    if cxx:
        flags.append((f"-DCMAKE_CXX_COMPILER={cxx}", "explicit, so a changed compiler is seen and reconfigured"))
    if b["cuda"]:
        arch, _ = architecture(facts, cfg)
        flags += [
            (f"-DCMAKE_CUDA_COMPILER={tc['nvcc']}", "this nvcc, not whichever is first on PATH"),
            (f"-DCMAKE_CUDA_HOST_COMPILER={tc['host']}",
             "nvcc's host compiler: CUDA 12.9 rejects gcc 15 (Fedora 42's default), so step 3's gcc-14"),
            (f"-DCMAKE_CUDA_ARCHITECTURES={arch}", "only the card's architecture: a fraction of the all-arch build time"),
        ]
    src, bld = dirs(facts, cfg)
    flags += reproducible_flags(src, bld, cuda=b["cuda"], objtemp=bool(f.get("nvcc_objtemp")))
    for extra in b.get("cmake_extra") or []:
        flags.append((f"-D{extra}", "build.cmake_extra"))
    return flags


# --- reproducibility (docs/reproducible-builds.md) ----------------------------------------------------

# What the source tree and the build directory are called inside the binaries, wherever they really are.
SRC_ALIAS = "/gpubox/src"
BUILD_ALIAS = "/gpubox/build"


def prefix_maps(src: str, bld: str) -> list[tuple[str, str]]:
    """(real prefix, alias) pairs, the longest real prefix LAST.

    GCC and clang try the last -ffile-prefix-map first and match plain string prefixes, so when one
    directory's path starts with the other's (/x/src and /x/src-build, or a build directory inside the
    tree) the longer one must come later to win.

    >>> prefix_maps("/opt/src/llama.cpp", "/opt/src/llama.cpp/build")
    [('/opt/src/llama.cpp', '/gpubox/src'), ('/opt/src/llama.cpp/build', '/gpubox/build')]
    >>> prefix_maps("/a/very/long/source/path", "/b")
    [('/b', '/gpubox/build'), ('/a/very/long/source/path', '/gpubox/src')]
    """
    pairs = [(src.rstrip("/") or "/", SRC_ALIAS), (bld.rstrip("/") or "/", BUILD_ALIAS)]
    return sorted(pairs, key=lambda p: len(p[0]))


def reproducible_flags(src: str, bld: str, *, cuda: bool, objtemp: bool) -> list[tuple[str, str]]:
    """The -D options that make bin/ independent of where the tree and the build directory are."""
    maps = [f"-ffile-prefix-map={old}={new}" for old, new in prefix_maps(src, bld)]
    # Ninja and Make hand CMAKE_<LANG>_FLAGS to /bin/sh: quote each flag (a path may hold a space).
    cflags = " ".join(shlex.quote(m) for m in maps)
    why_map = ("-ffile-prefix-map (= -fmacro-prefix-map + -fdebug-prefix-map): __FILE__ in assertion "
               f"messages and any debug info name {SRC_ALIAS}/... and {BUILD_ALIAS}/..., not the real paths")
    flags = [
        (f"-DCMAKE_C_FLAGS={cflags}", why_map),
        (f"-DCMAKE_CXX_FLAGS={cflags}", why_map),
        # CMake's default build-tree RPATH is the absolute path of bin/ in every executable and library;
        # $ORIGIN says "next to me" (the libraries sit in bin/ beside the executables).
        ("-DCMAKE_BUILD_RPATH_USE_ORIGIN=ON", "RPATH $ORIGIN instead of the absolute build directory"),
    ]
    if cuda:
        # nvcc hands -Xcompiler options to the host compiler for its preprocessing passes and the host
        # object, so __FILE__ in host and device code is mapped too. (-Xcompiler splits on commas: a path
        # with a comma would be cut; gpubox's own paths have none.)
        cuda_flags = [shlex.quote(f"-Xcompiler={m}") for m in maps]
        why = "the host compiler's prefix maps, through nvcc"
        if objtemp:
            # Without it nvcc names its intermediate files /tmp/tmpxft_<pid>_<n>-<k>_<file>; gcc puts that
            # name in the host object's FILE symbol and its _GLOBAL__sub_I_<file> initialiser, so every
            # build of a .cu with a static initialiser differs. With it they are <object>.cudafe1.cpp etc.
            cuda_flags.append("-objtemp")
            why += "; -objtemp: intermediate files named after the object, not nvcc's PID"
        flags.append((f"-DCMAKE_CUDA_FLAGS={' '.join(cuda_flags)}", why))
    return flags


# LC_ALL: the same messages, collation and number formats whatever the login's locale; TZ: dates (CMake's
# string(TIMESTAMP), __DATE__) do not depend on the box's time zone. SOURCE_DATE_EPOCH (the pinned commit's
# time, read by in_build_env when the command runs) replaces "now" in __DATE__/__TIME__ and CMake timestamps.
STABLE_ENV = {"LC_ALL": "C", "TZ": "UTC"}
# File modes of everything written (objects, bin/) do not depend on the login's umask.
UMASK = "022"


def dirs(facts: dict, cfg: dict) -> tuple[str, str]:
    """(source tree, build directory) on the target, ~ expanded when the home is known."""
    b = cfg["build"]
    home = facts.get("home") if isinstance(facts.get("home"), str) and facts.get("home") != UNKNOWN else ""
    if not home:
        return b["src_dir"], b["build_dir"]
    return expand_home(b["src_dir"], home), expand_home(b["build_dir"], home)


def _bfact(facts: dict) -> dict:
    f = facts.get("build")
    return f if isinstance(f, dict) else {}


def plan(facts: dict, cfg: dict) -> dict[str, Any]:
    """Everything apply does, decided from facts and config: paths, cmake arguments, jobs, env."""
    b = cfg["build"]
    f = _bfact(facts)
    home = facts.get("home") if isinstance(facts.get("home"), str) and facts.get("home") != UNKNOWN else ""
    src, bld = dirs(facts, cfg)
    pin = configmod.fork_pin(cfg)
    tc = toolchain(cfg)
    generator = "Ninja" if f.get("ninja") else "Unix Makefiles"
    flags = cmake_flags(facts, cfg)
    args = [a for a, _ in flags]
    compilers = {"cc": f.get("cc_version") or "", "cxx": f.get("cxx_version") or ""}
    if b["cuda"]:
        compilers["nvcc"] = f.get("nvcc_version") or ""
    fingerprint = {"src_dir": src, "generator": generator, "cmake_args": args, "compilers": compilers}
    if b["cuda"] and str(b["cuda_architectures"]) == "native":
        # `native` resolves at configure time: a different card must reconfigure.
        fingerprint["gpu_archs"] = gpu_archs(facts)
    mem = facts.get("mem")
    avail = mem.get("available_mib") if isinstance(mem, dict) else UNKNOWN
    jobs, jobs_why = choose_jobs(facts.get("cores"), avail, b["mem_per_job_gb"], b["jobs"])
    env: dict[str, str] = {}
    if b["cuda"]:
        login_path = f.get("path") or "/usr/local/bin:/usr/bin:/bin"
        first: list[str] = []
        if tc["source"] == "steps 2-3":
            # Step 3's environment: its gcc/g++ shims first on PATH (and CUDAHOSTCXX).
            env.update(_steps_env(facts, cfg))
            parts = (env.get("PATH") or login_path).split(":")
            first, login_path = parts[:1], ":".join(parts[1:])
        # Then nvcc's directory: nvcc finds its own tools (ptxas, fatbinary) and cmake its CUDA through it.
        env["PATH"] = ":".join(dict.fromkeys([*first, posixpath.dirname(tc["nvcc"]), *login_path.split(":")]))
    env.update(STABLE_ENV)
    if not b["ccache"]:
        # No launchers (cmake_flags), and a ccache masquerading as the compiler (Fedora's profile.d puts
        # /usr/lib64/ccache first on PATH) passes straight through: every object is compiled now.
        env["CCACHE_DISABLE"] = "1"
    elif f.get("ccache") and b.get("ccache_dir"):
        # The cache survives deleting the build directory (and, in CI, a sandbox reset): the paths of a
        # rebuild are the same, so its compiler commands hash the same.
        env["CCACHE_DIR"] = expand_home(b["ccache_dir"], home) if home else b["ccache_dir"]
    login = facts.get("user", {}).get("name") if isinstance(facts.get("user"), dict) else ""
    owner = cfg.get("user") or login or ""
    as_user = owner if cfg.get("user") and login and cfg["user"] != login else ""
    arch, arch_why = architecture(facts, cfg) if b["cuda"] else ("", "CPU-only build (build.cuda = false)")
    return {"src": src, "build": bld, "sha": pin["sha"], "profile": pin.get("profile", ""),
            "dialect": pin.get("dialect", ""), "url": b["repo_url"], "targets": list(b["targets"]),
            "generator": generator, "flags": flags, "args": args, "compilers": compilers,
            "fingerprint": fingerprint, "jobs": jobs, "jobs_why": jobs_why, "env": env, "owner": owner,
            "as_user": as_user, "toolchain": tc, "arch": arch, "arch_why": arch_why,
            "lock": lockfile.path(cfg), "lock_data": f.get("lock")}


def _steps_env(facts: dict, cfg: dict) -> dict[str, str]:
    """Step 3's build environment (provision.steps.compiler.build_env: shims first on PATH)."""
    try:
        from . import compiler as compstep
        fn = getattr(compstep, "build_env", None)
        if fn is not None:
            return dict(fn(facts, cfg) or {})
    except Exception:  # not there: the same value, derived from config
        pass
    f = _bfact(facts)
    return {"PATH": cfg["compiler"]["shim_dir"].rstrip("/") + ":" + (f.get("path") or "/usr/local/bin:/usr/bin:/bin")}


def configure_argv(p: dict) -> list[str]:
    return ["cmake", "-S", p["src"], "-B", p["build"], "-G", p["generator"], *p["args"]]


def build_argv(p: dict) -> list[str]:
    return ["cmake", "--build", p["build"], "--target", *p["targets"], "--parallel", str(p["jobs"])]


def names_commit(version_text: str, sha: str) -> bool:
    """Does `--version` output name this commit? ("commit abc1234" in the fork, "(abc1234)" upstream-old.)

    >>> names_commit("version: 1.2.0 (build 10018, commit a6f3d36)", "a6f3d363e4c6a672803d0e6e036f8a75cf43d0ae")
    True
    >>> names_commit("version: 0 (unknown)", "a6f3d363e4c6a672803d0e6e036f8a75cf43d0ae")
    False
    """
    for tok in re.findall(r"\b[0-9a-f]{7,40}\b", version_text or ""):
        if sha.startswith(tok):
            return True
    return False


def stamp_differences(stamp: Any, p: dict) -> list[str]:
    """Why the recorded build is not the wanted one ([] = it is)."""
    if not isinstance(stamp, dict):
        return ["no build stamp (never built by gpubox, or the last build did not finish)"]
    why = []
    if stamp.get("sha") != p["sha"]:
        why.append(f"built from {str(stamp.get('sha'))[:12]}, pinned {p['sha'][:12]}")
    if stamp.get("generator") != p["generator"]:
        why.append(f"generator {stamp.get('generator')} -> {p['generator']}")
    old, new = stamp.get("cmake_args") or [], p["args"]
    if old != new:
        gone = [a for a in old if a not in new]
        added = [a for a in new if a not in old]
        why.append("cmake arguments changed: " + ", ".join([f"-{a}" for a in gone] + [f"+{a}" for a in added])
                   if gone or added else "cmake argument order changed")
    if (stamp.get("compilers") or {}) != p["compilers"]:
        why.append(f"compilers changed: {stamp.get('compilers')} -> {p['compilers']}")
    fp_archs = p["fingerprint"].get("gpu_archs")
    if fp_archs is not None and stamp.get("gpu_archs") != fp_archs:
        why.append(f"native architecture changed: {stamp.get('gpu_archs')} -> {fp_archs}")
    missing = [t for t in p["targets"] if t not in (stamp.get("targets") or [])]
    if missing:
        why.append("targets not built yet: " + ", ".join(missing))
    if not stamp.get("files"):
        why.append("the stamp records no sha256 of bin/ (written by an older gpubox)")
    return why


def build_reasons(f: dict, p: dict) -> list[str]:
    """Why the binaries must be (re)built ([] = the recorded build is the wanted one and runs)."""
    why = stamp_differences(f.get("stamp"), p)
    missing = [t for t in p["targets"] if t not in (f.get("bins") or [])]
    if missing and not why:
        why.append("binaries missing: " + ", ".join(missing))
    if not why and SERVER in p["targets"]:
        if f.get("version_rc", 1) != 0:
            why.append(f"{SERVER} --version fails (exit {f.get('version_rc')}): {f.get('version_tail', '')}".strip())
        elif not names_commit(f.get("version", ""), p["sha"]):
            why.append(f"{SERVER} --version does not name {p['sha'][:12]}: {f.get('version', '')}")
    return why


def lock_difference(f: dict, p: dict) -> str:
    """Why the lock's build record is not this build's stamp ("" = it is)."""
    stamp = f.get("stamp") if isinstance(f.get("stamp"), dict) else {}
    if not stamp.get("files"):
        return ""
    lock = f.get("lock") if isinstance(f.get("lock"), dict) else {}
    have = lock.get("build")
    if not isinstance(have, dict):
        return f"{p['lock']} has no record of the build"
    if have != lockfile.build_entry(stamp, p["build"]):
        return f"{p['lock']} records another build (commit {str(have.get('sha'))[:12]}, {have.get('build_dir')})"
    return ""


def _configured_fp(f: dict) -> Any:
    c = f.get("configured")
    return c.get("fingerprint") if isinstance(c, dict) else None


def fingerprint_differences(old: Any, new: dict) -> list[str]:
    if not isinstance(old, dict):
        return ["no record of the cached configuration's inputs"]
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def patch_state(facts: dict, cfg: dict) -> tuple[bool, str]:
    """(ok to configure a CUDA build, why). glibc >= 2.41 needs step 4's header patch (CUDA 12.9)."""
    glibc = facts.get("glibc")
    needs = _version_tuple(glibc) >= (2, 41)
    if toolchain(cfg)["source"] == "config":
        return True, (f"CUDA from build.nvcc: its header is not step 4's to patch (glibc {glibc}"
                      + (", which CUDA < 13 headers need patched for" if needs else "") + ")")
    if not needs:
        return True, f"glibc {glibc} < 2.41: the CUDA header needs no patch"
    try:
        from . import patch as patchstep
        pc = patchstep.check(facts, cfg)
    except StepError as e:
        return False, f"cannot confirm step 4's header patch ({str(e).splitlines()[0]})"
    except Exception as e:  # a broken helper module is a refusal, not a crash of the plan
        return False, f"cannot confirm step 4's header patch ({type(e).__name__}: {e})"
    if pc.satisfied:
        return True, "step 4: the CUDA header is patched for glibc " + str(glibc)
    return False, (f"step 4: the CUDA header is not patched for glibc {glibc} ("
                   + "; ".join(c.what for c in pc.changes) + ")")


def check(facts: dict, cfg: dict) -> Check:
    f = _bfact(facts)
    p = plan(facts, cfg)
    info: dict[str, Any] = {
        "sha": p["sha"], "profile": p["profile"], "url": p["url"], "src_dir": p["src"], "build_dir": p["build"],
        "targets": p["targets"], "jobs": p["jobs"], "jobs_why": p["jobs_why"], "generator": p["generator"],
        "ccache": f.get("ccache_version") or "not found (every build compiles from scratch)",
        "cuda": "on" if cfg["build"]["cuda"] else "off (build.cuda = false: CPU-only build)",
        "stamp": f"{p['build']}/{STAMP_FILE}", "dialect_file": f"{p['build']}/{DIALECT_FILE}",
    }
    if not f:
        return Check.todo([Change("read the build state", "the build fact could not be read",
                                  [Refuse(f"{NAME}: the build fact could not be read on the target",
                                          "run `gpubox plan` and read the fact script's output in the step log")])],
                          info=info)
    attention, warnings = _toolchain_notes(facts, cfg, p, info)
    changes, src_attention, src_warnings = _source_changes(f, p)
    why = build_reasons(f, p)
    changes += _build_changes(f, p, why)
    stamp = f.get("stamp") if isinstance(f.get("stamp"), dict) else {}
    if stamp:
        info["built"] = {k: stamp.get(k) for k in ("sha", "built_at", "arch_line", "jobs", "build_seconds",
                                                    "build_cpu_seconds", "dialect") if k in stamp}
    if f.get("version"):
        info["version"] = f["version"]
    return Check(not changes, changes, attention + src_attention, warnings + src_warnings, info)


def _toolchain_notes(facts: dict, cfg: dict, p: dict, info: dict) -> tuple[list[str], list[str]]:
    """What the build depends on that other steps (or the user) provide: said in the plan; apply refuses."""
    b, f, tc = cfg["build"], _bfact(facts), p["toolchain"]
    attention: list[str] = []
    warnings: list[str] = []
    if b["cuda"]:
        info["arch"], info["arch_why"] = p["arch"], p["arch_why"]
        info["toolchain"] = (f"{tc['source']}: nvcc {tc['nvcc']} ({f.get('nvcc_version') or 'not found'}), "
                             f"host compiler {tc['host']} ({f.get('cxx_version') or 'not found'})")
        if tc["source"] == "config":
            attention.append(f"CUDA toolchain from config, not steps 2-3: build.nvcc={b['nvcc'] or '(cuda.prefix)'}, "
                             f"build.host_compiler={b['host_compiler'] or '(step 3)'}")
        if p["arch"] != "native" and str(b["cuda_architectures"]) == "native":
            warnings.append(p["arch_why"])
        if "," in p["src"] + p["build"]:
            warnings.append(f"{p['src']} or {p['build']} holds a comma: nvcc's -Xcompiler splits on commas, so "
                            "the host compiler's prefix maps are cut and CUDA objects may name the real paths "
                            "(choose build.src_dir/build.build_dir without commas)")
        if not f.get("nvcc_version"):
            attention.append(f"nvcc not found at {tc['nvcc']}: run step cuda, or set build.nvcc")
        if not f.get("cxx_version"):
            attention.append(f"host compiler {tc['host']} not found: run step compiler, or set build.host_compiler")
        ok, why = patch_state(facts, cfg)
        info["header_patch"] = why
        if not ok:
            attention.append(why + ": the build refuses to configure (run step patch first)")
    for tool in ("git", "cmake"):
        if not f.get(tool):
            attention.append(f"{tool} not found on the host: install it (dnf install git cmake ninja-build ccache)")
    if not f.get("ninja"):
        warnings.append("ninja not found: the Makefile generator is used (install ninja-build for faster builds)")
    return attention, warnings


def _source_changes(f: dict, p: dict) -> tuple[list[Change], list[str], list[str]]:
    """Clone, fetch and check out the pin. Never deletes or overwrites anything: a directory that is not a
    checkout, local changes and a HEAD on no branch or tag are refusals (the plan shows them)."""
    src, sha = p["src"], p["sha"]
    attention: list[str] = []
    warnings: list[str] = []
    state = f.get("src")
    if state in ("missing", "empty"):
        return [Change(f"clone {p['url']} at {sha[:12]}", f"no checkout in {src}",
                       [EnsureDir(posixpath.dirname(src.rstrip("/")) or "/", p), Clone(p), EnsurePin(p),
                        checkout_op(p)])], attention, warnings
    if state == "other":
        attention.append(f"{src} exists and is not a git checkout: gpubox will not overwrite it "
                         "(move it away or set build.src_dir)")
        return [Change(f"check out {sha[:12]} in {src}", "the directory is not a git checkout",
                       [Refuse(f"{NAME}: {src} exists and is not a git checkout; gpubox will not overwrite it",
                               "move it away, or set build.src_dir to another path")])], attention, warnings
    head, dirty = f.get("head", ""), f.get("dirty") or []
    if f.get("origin") and f["origin"] != p["url"]:
        warnings.append(f"origin of {src} is {f['origin']}; gpubox fetches from build.repo_url {p['url']}")
    if dirty:
        note = f"{src} has local changes ({', '.join(dirty[:5])}{' ...' if len(dirty) > 5 else ''})"
        (attention if head != sha else warnings).append(note + ": gpubox does not overwrite them")
    if head == sha:
        return [], attention, warnings
    why = f"HEAD is {head[:12] or 'unknown'}"
    if dirty:
        op = Refuse(f"{NAME}: {src} has local changes ({', '.join(dirty[:5])}); gpubox does not overwrite them",
                    f"commit or stash them (git -C {src} stash), or set build.src_dir to a clean clone")
        return [Change(f"check out {sha[:12]}", why, [op])], attention, warnings
    if head and not f.get("head_on_ref"):
        attention.append(f"HEAD of {src} ({head[:12]}) is on no branch or tag: checking out the pin would orphan "
                         "it, so gpubox refuses")
        op = Refuse(f"{NAME}: HEAD of {src} ({head[:12]}) is on no branch or tag; checking out the pin would orphan "
                    "it", f"keep it on a branch first (git -C {src} branch keep {head[:12]}), then run again")
        return [Change(f"check out {sha[:12]}", why + " (on no branch or tag)", [op])], attention, warnings
    ops = ([] if f.get("has_sha") else [EnsurePin(p)]) + [checkout_op(p)]
    return [Change(f"check out {sha[:12]}", why, ops)], attention, warnings


def _build_changes(f: dict, p: dict, why: list[str]) -> list[Change]:
    """Configure (from scratch when its recorded inputs changed), build, record; or only the records."""
    bld = p["build"]
    if not why:
        out = []
        lock_why = lock_difference(f, p)
        if lock_why:
            out.append(Change(f"record bin/'s sha256 in {p['lock']}", lock_why, [RecordLock(p, f.get("stamp"))]))
        if not f.get("dialect") and SERVER in p["targets"]:
            out.append(Change(f"store {SERVER}'s flag dialect", f"no {DIALECT_FILE} next to the stamp",
                              [Record(p, f)]))
        return out
    if f.get("src") == "git" and f.get("head") == p["sha"] and f.get("dirty"):
        return [Change(f"build {', '.join(p['targets'])}", "; ".join(why), [Refuse(
            f"{NAME}: {p['src']} is at the pinned commit but has local changes ({', '.join(f['dirty'][:5])}): the "
            "binary would not be the pinned commit",
            f"git -C {p['src']} stash (or commit) them, or set build.src_dir to a clean clone")])]
    # No stamp while building: an interrupted build must not look finished.
    unstamp = Cmd(_argv(p, ["rm", "-f", f"{bld}/{STAMP_FILE}"]))
    out = []
    old_fp = _configured_fp(f)
    if f.get("cmakecache") and old_fp != p["fingerprint"]:
        # CMake keeps the compiler, CUDA path and architectures of an existing cache whatever -D says: only
        # a cache deleted first takes the new values. Objects stay; Ninja rebuilds what changed.
        out.append(Change("reconfigure from scratch (delete CMakeCache.txt and CMakeFiles)",
                          "cmake inputs changed: " + "; ".join(fingerprint_differences(old_fp, p["fingerprint"])),
                          [unstamp, Cmd(_argv(p, ["rm", "-rf", f"{bld}/CMakeCache.txt", f"{bld}/CMakeFiles",
                                                  f"{bld}/{CONFIGURE_FILE}"])), EnsureDir(bld, p), Configure(p)]))
    elif not f.get("cmakecache") or not f.get("generated"):
        out.append(Change("configure", "not configured yet", [unstamp, EnsureDir(bld, p), Configure(p)]))
    out.append(Change(f"build {', '.join(p['targets'])} with {p['jobs']} jobs", "; ".join(why),
                      [unstamp, Compile(p), Record(p, f)]))
    return out


# --- apply --------------------------------------------------------------------------------------------

class Progress:
    """Ninja's `[n/N]` (or Make's `[ 45%]`) lines of the build -> provision/progress.py's lines (every
    `every_pct` percent or `every_s` seconds); every line still goes to the step log, FAILED: lines are kept."""

    def __init__(self, echo: Callable[[str], None] = print, log: Callable[[str], None] | None = None,
                 every_pct: int = 10, every_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.log = log
        self.shown = progress.Progress(f"[{NAME}]", unit="edges", echo=echo, every_pct=every_pct, every_s=every_s,
                                       clock=clock)
        self.done = self.total = 0
        self.failed: list[str] = []
        self.lines = 0

    def __call__(self, line: str) -> None:
        self.lines += 1
        if self.log:
            self.log(line)
        if line.startswith("FAILED:"):
            self.failed.append(line)
        m = NINJA_RE.match(line) or MAKE_RE.match(line)
        if not m:
            return
        self.done, self.total = (int(m.group(1)), int(m.group(2))) if m.re is NINJA_RE else (int(m.group(1)), 100)
        self.shown.update(self.done, self.total)


def parse_times(text: str) -> tuple[float, float] | None:
    """The children's (user, sys) seconds from bash's `times` output after a `@@times` marker.

    >>> parse_times("x\\n@@times\\n0m0.010s 0m0.002s\\n12m3.500s 1m2.000s\\n")
    (723.5, 62.0)
    """
    _, sep, tail = text.rpartition("@@times")
    if not sep:
        return None
    rows = re.findall(r"(\d+)m([\d.]+)s\s+(\d+)m([\d.]+)s", tail)
    if len(rows) < 2:
        return None
    u = int(rows[1][0]) * 60 + float(rows[1][1])
    s = int(rows[1][2]) * 60 + float(rows[1][3])
    return round(u, 3), round(s, 3)


def _argv(p: dict, argv: list[str], env: dict[str, str] | None = None) -> list[str]:
    """As the tree's owner (sudo -u) when gpubox.user differs from the login user; env set inside."""
    env = env or {}
    pre = ["env", *[f"{k}={v}" for k, v in env.items()]] if env else []
    if p["as_user"]:
        return ["sudo", "-n", "-u", p["as_user"], "--", *pre, *argv]
    return [*pre, *argv]


def _ensure_dir(host, p: dict, path: str) -> None:
    if host.ok(_argv(p, ["mkdir", "-p", path])):
        return
    # The parent (e.g. /opt/gpubox) is not writable by the tree's owner: create it as root, owned by them.
    host.run(["install", "-d", "-o", p["owner"], path], root=True)


def in_build_env(p: dict, argv: list[str]) -> list[str]:
    """argv with umask 022 and SOURCE_DATE_EPOCH = the pinned commit's committer time, read from the checkout
    when the command runs (unset if git cannot say), so the plan can name the command before the clone."""
    script = (f'umask {UMASK}; e=$(git -C "$1" log -1 --format=%ct "$2" 2>/dev/null) && [ -n "$e" ] && '
              'export SOURCE_DATE_EPOCH="$e"; shift 2; exec "$@"')
    return ["sh", "-c", script, "sh", p["src"], p["sha"], *argv]


def checkout_op(p: dict) -> Cmd:
    sha = p["sha"]
    return Cmd(_argv(p, ["git", "-C", p["src"], "-c", "advice.detachedHead=false", "checkout", "--detach", sha]),
               fail=(f"{NAME}: cannot check out {sha[:12]} in {p['src']}",
                     "untracked files in the way? move them, or use a clean build.src_dir"))


@dataclass
class EnsureDir(Op):
    """mkdir -p as the tree's owner; where the owner cannot (e.g. /opt/gpubox), install -d as root, owned by them."""
    path: str
    p: dict = field(repr=False)

    def text(self) -> str:
        return cmd(_argv(self.p, ["mkdir", "-p", self.path])) + f" (else as root: install -d -o {self.p['owner']})"

    def run(self, host, state: dict):
        _ensure_dir(host, self.p, self.path)


@dataclass
class Clone(Op):
    """A full clone (no --depth): the build embeds the commit and its count, which a shallow clone gets wrong."""
    p: dict = field(repr=False)
    literal = True          # its line is the one command it runs

    def argv(self) -> list[str]:
        return _argv(self.p, ["git", "clone", "--no-checkout", "--", self.p["url"], self.p["src"]])

    def text(self) -> str:
        return cmd(self.argv())

    def run(self, host, state: dict):
        try:
            host.run(self.argv())
        except CommandFailed as e:
            raise _fail(f"{NAME}: cannot clone {self.p['url']} (build.repo_url): " + (e.tail(1) or "git clone failed"),
                        "check build.repo_url (a git URL, an absolute path or a file:// URL) and the network; "
                        "nothing was removed", e) from None


@dataclass
class EnsurePin(Op):
    """The pinned commit in the clone: fetched from build.repo_url unless present, by name if no branch or tag
    holds it (e.g. a pull request's); a commit the URL does not have is an error that changes nothing."""
    p: dict = field(repr=False)

    def _git(self, *args: str) -> list[str]:
        return _argv(self.p, ["git", "-C", self.p["src"], *args])

    def text(self) -> str:
        return (cmd(self._git("fetch", "--tags", "--", self.p["url"], "+refs/heads/*:refs/remotes/gpubox/*"))
                + " (unless the pin is present; then by name)")

    def run(self, host, state: dict):
        sha, url = self.p["sha"], self.p["url"]
        has = lambda: host.ok(self._git("cat-file", "-e", f"{sha}^{{commit}}"))   # noqa: E731
        if has():
            return None
        try:
            host.run(self._git("fetch", "--tags", "--", url, "+refs/heads/*:refs/remotes/gpubox/*"))
        except CommandFailed as e:
            raise _fail(f"{NAME}: cannot fetch from {url} (build.repo_url): " + (e.tail(1) or "git fetch failed"),
                        f"check build.repo_url and the network; the checkout in {self.p['src']} is unchanged, "
                        "nothing was removed", e) from None
        if not has():
            host.run(self._git("fetch", "--", url, sha), check=False)
            if not has():
                raise StepError(f"{NAME}: commit {sha} is not in {url}",
                                "check build.sha / build.profile (a full 40-hex SHA of that repository) and "
                                "build.repo_url; nothing was removed")
        return None


def ensure_source(host, p: dict, f: dict) -> list[str]:
    """Clone/fetch/check out the pin by running the source changes' operations; returns what ran."""
    chk = Check(False, _source_changes(f, p)[0])
    run_changes(host, chk)
    return chk.ran


def _fail(cause: str, fix: str, e: CommandFailed) -> StepError:
    return StepError(cause, fix, command=e.command, exited=e.exited, output=e.tail())


@dataclass
class Configure(Op):
    """cmake's configure, every input explicit; its inputs recorded in gpubox-configure.json."""
    p: dict = field(repr=False)

    def argv(self) -> list[str]:
        return _argv(self.p, in_build_env(self.p, configure_argv(self.p)), self.p["env"])

    def text(self) -> str:
        return cmd(self.argv()) + f" (inputs -> {CONFIGURE_FILE})"

    def run(self, host, state: dict):
        p = self.p
        try:
            res = host.run(self.argv())
        except CommandFailed as e:
            raise _fail(f"{NAME}: cmake configure failed: " + (_first_error(e.stdout + "\n" + e.stderr) or e.tail(1)),
                        "see the output below and the step log; a wrong build.nvcc/build.host_compiler or a missing "
                        "package (cuda, gcc) is the usual cause", e) from None
        m = ARCH_LINE_RE.search((res.stdout or "") + "\n" + (res.stderr or ""))
        rec = {"fingerprint": p["fingerprint"], "arch_line": m.group(0) if m else "",
               "configured_at": _dt.datetime.now().isoformat(timespec="seconds")}
        host.write_file(f"{p['build']}/{CONFIGURE_FILE}", json.dumps(rec, sort_keys=True) + "\n",
                        as_user=p["as_user"] or None)
        if rec["arch_line"]:
            state.get("echo", print)(f"[{NAME}] {rec['arch_line']}")
        state["conf"] = rec


def _first_error(text: str) -> str:
    for line in text.splitlines():
        if "CMake Error" in line or line.startswith("FAILED:") or "error:" in line or "fatal" in line:
            return line.strip()
    return ""


@dataclass
class Compile(Op):
    """Only build.targets, jobs bounded by cores and memory, Ninja's [n/N] as progress; the wall and CPU time
    (bash's `times`) go to the stamp. A failure names the first failed edge (and says when it looks like OOM)."""
    p: dict = field(repr=False)

    def argv(self) -> list[str]:
        script = cmd(build_argv(self.p)) + '; rc=$?; echo "@@times"; times; exit $rc'
        return _argv(self.p, in_build_env(self.p, ["bash", "-c", script]), self.p["env"])

    def text(self) -> str:
        return cmd(self.argv())

    def run(self, host, state: dict):
        p, echo = self.p, state.get("echo", print)
        ninja = Progress(echo=echo, log=getattr(host, "log", None))
        echo(f"[{NAME}] building {', '.join(p['targets'])}: {p['jobs']} jobs ({p['jobs_why']})")
        t0 = time.monotonic()
        try:
            res = host.run(self.argv(), stream=ninja)
        except CommandFailed as e:
            raise _build_failure(p, ninja, e) from None
        wall = time.monotonic() - t0
        times = parse_times(res.stdout or "")
        cpu = round(sum(times), 3) if times else None
        echo(f"[{NAME}] built in {progress.mmss(wall)}" + (f", {cpu / 60:.1f} CPU-minutes" if cpu else "")
             + (f" ({ninja.total} edges)" if ninja.total else " (nothing to do)"))
        state["timing"] = {"build_seconds": round(wall, 3), "build_cpu_seconds": cpu, "edges": ninja.total}


def _build_failure(p: dict, progress: "Progress", e: CommandFailed) -> StepError:
    out = e.stdout + "\n" + e.stderr
    oom = bool(OOM_RE.search(out))
    first = progress.failed[0] if progress.failed else _first_error(out)
    if not progress.total:   # output not streamed (e.g. a runner without out_stream): read it back
        for line in out.splitlines():
            m = NINJA_RE.match(line)
            if m:
                progress.done, progress.total = int(m.group(1)), int(m.group(2))
    fix = ("a compiler was killed (out of memory?): lower build.jobs or raise build.mem_per_job_gb, then run "
           "again; the build continues where it stopped" if oom else
           "see the output below and the step log; after fixing the cause, run again: the build continues")
    lines = [ln for ln in out.splitlines() if "error" in ln.lower() or ln.startswith("FAILED")][-12:]
    return StepError(f"{NAME}: building {', '.join(p['targets'])} failed at {progress.done}/{progress.total}: "
                     f"{first}", fix, command=e.command, exited=e.exited, output="\n".join(lines) or e.tail())


@dataclass
class Record(Op):
    """`--version` must name the pin; `--help` parsed into the dialect file; bin/ hashed; the stamp written
    last, then the lock's build record. Timings and the arch line come from this run's Compile/Configure,
    else from the records already there (storing a missing dialect rebuilds nothing)."""
    p: dict = field(repr=False)
    f: dict = field(repr=False)

    def text(self) -> str:
        bld = self.p["build"]
        return (f"{bld}/bin/{SERVER} --version (must name {self.p['sha'][:12]}) and --help -> {HELP_FILE}, "
                f"{DIALECT_FILE}; sha256 of bin/ -> {STAMP_FILE}, then {self.p['lock']}")

    def run(self, host, state: dict):
        old = self.f.get("stamp") if isinstance(self.f.get("stamp"), dict) else {}
        timing = state.get("timing") or {k: old.get(k) for k in ("build_seconds", "build_cpu_seconds", "edges")
                                         if k in old}
        conf = state.get("conf") or (self.f.get("configured") if isinstance(self.f.get("configured"), dict) else {})
        notes = record(host, self.p, timing, conf)
        return [n for n in notes if not n.startswith(("fetched", "checked out"))]


@dataclass
class RecordLock(Op):
    """The lock's build record for the build that is there (its stamp); the models and the box stay."""
    p: dict = field(repr=False)
    stamp: Any = field(repr=False)
    root: bool = True

    def text(self) -> str:
        return f"write {self.p['lock']} (its build record: bin/'s sha256 from {STAMP_FILE})"

    def run(self, host, state: dict):
        record_lock(host, self.p, self.stamp)


def record(host, p: dict, timing: dict, conf: dict) -> list[str]:
    """--version must name the pin; parse --help into the dialect file; then write the stamp."""
    notes: list[str] = []
    bld = p["build"]
    server = f"{bld}/bin/{SERVER}"
    stamp: dict[str, Any] = {
        "version": STAMP_VERSION, "sha": p["sha"], "profile": p["profile"], "url": p["url"],
        "generator": p["generator"], "cmake_args": p["args"], "compilers": p["compilers"],
        "targets": p["targets"], "jobs": p["jobs"], "jobs_why": p["jobs_why"],
        "arch_line": conf.get("arch_line", ""), "built_at": _dt.datetime.now().isoformat(timespec="seconds"),
        **timing,
    }
    if "gpu_archs" in p["fingerprint"]:
        stamp["gpu_archs"] = p["fingerprint"]["gpu_archs"]
    if SERVER in p["targets"]:
        v = host.run(_argv(p, [server, "--version"]), check=False, timeout=120)
        vtext = ((v.stdout or "") + "\n" + (v.stderr or "")).strip()
        if v.exited != 0:
            raise StepError(f"{NAME}: the built {SERVER} does not run (--version exit {v.exited}): "
                            + (vtext.splitlines()[-1] if vtext else ""),
                            f"ldd {server} shows missing libraries; a CUDA build needs the NVIDIA driver loaded "
                            "(after the reboot of step 1)", output=vtext)
        if not names_commit(vtext, p["sha"]):
            raise StepError(f"{NAME}: the built {SERVER} does not name the pinned commit {p['sha'][:12]}: "
                            + next((ln for ln in vtext.splitlines() if ln.startswith("version")), vtext[:200]),
                            f"the source tree at {p['src']} lost its .git, or was changed; delete {bld} and run again")
        stamp["server_version"] = next((ln for ln in vtext.splitlines() if ln.startswith("version")), "")
        h = host.run(_argv(p, [server, "--help"]), check=False, timeout=120)
        help_text = (h.stdout or "") + (h.stderr or "")
        if "--" not in help_text:
            raise StepError(f"{NAME}: {SERVER} --help printed no options (exit {h.exited})",
                            "run it by hand and look at the output", output=help_text)
        from ..serve import helptext
        parsed = helptext.parse(help_text)
        stamp["dialect"] = parsed.get("dialect")
        if p["dialect"] and parsed.get("dialect") != p["dialect"]:
            notes.append(f"{SERVER} speaks the {parsed.get('dialect')} dialect, profile {p['profile']!r} expects "
                         f"{p['dialect']}: the serve step renders flags for what the binary accepts")
        host.write_file(f"{bld}/{HELP_FILE}", help_text, as_user=p["as_user"] or None)
        host.write_file(f"{bld}/{DIALECT_FILE}", helptext.to_json(parsed, binary=server, sha=p["sha"],
                                                                  version=stamp["server_version"]) + "\n",
                        as_user=p["as_user"] or None)
    stamp["dialect_file"] = f"{bld}/{DIALECT_FILE}"
    stamp.update(hash_bin(host, p))
    host.write_file(f"{bld}/{STAMP_FILE}", json.dumps(stamp, sort_keys=True) + "\n", as_user=p["as_user"] or None)
    record_lock(host, p, stamp)
    return notes


def hash_bin(host, p: dict) -> dict:
    """{"files": {name: {size, sha256}}, "links": {name: target}} of bin/, for the stamp and the lock."""
    bindir = f"{p['build']}/bin"
    r = host.run(_argv(p, repro.manifest_argv(bindir)), check=False, timeout=600)
    m = repro.parse_manifest(r.stdout or "")
    if r.exited != 0 or not m["files"]:
        raise StepError(f"{NAME}: cannot hash the files in {bindir} (exit {r.exited})",
                        "is sha256sum (coreutils) installed? run again after fixing", output=(r.stderr or "")[-2000:])
    return m


def record_lock(host, p: dict, stamp: dict) -> None:
    """The lock's `build` record: this build's files; the models and the box stay as they were."""
    from .models import write_lock
    entry = lockfile.build_entry(stamp, p["build"])
    old = p.get("lock_data") if isinstance(p.get("lock_data"), dict) else None
    if old is not None and old.get("build") == entry:
        return
    write_lock(host, p["lock"], lockfile.dumps(lockfile.with_build(old, entry)))


def apply(host, facts: dict, cfg: dict, check: Check, echo: Callable[[str], None] = print):
    """The check's operations, after refusing what cannot build: git/cmake missing, or for CUDA an absent nvcc
    or host compiler, or a header step 4 has not patched (all read from the facts of this moment)."""
    b, f = cfg["build"], _bfact(facts)
    tc = toolchain(cfg)
    for tool in ("git", "cmake"):
        if not f.get(tool):
            raise StepError(f"{NAME}: {tool} is not installed on {host.name}",
                            "install the build tools: dnf install git cmake ninja-build ccache")
    if b["cuda"]:
        if not f.get("nvcc_version"):
            raise StepError(f"{NAME}: nvcc not found at {tc['nvcc']}",
                            "run step cuda first, or set build.nvcc to the nvcc to use")
        if not f.get("cxx_version"):
            raise StepError(f"{NAME}: the host compiler {tc['host']} is not installed",
                            "run step compiler first, or set build.host_compiler")
        ok, why = patch_state(facts, cfg)
        if not ok:
            raise StepError(f"{NAME}: refusing to configure a CUDA build: {why}",
                            "run step patch first (invoke patch), then build again")
    return run_changes(host, check, {"echo": echo})
