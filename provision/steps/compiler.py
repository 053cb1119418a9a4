"""Step 3: gcc-14 as nvcc's host compiler, through build-only gcc/g++ shims.

CUDA 12.9 rejects gcc > 14 (`#error -- unsupported GNU version!`), and Fedora 42's gcc is 15. nvcc runs
`gcc`/`g++` from PATH unless told otherwise, so the recipe puts `gcc -> gcc-14` and `g++ -> g++-14` shims
first on PATH. gpubox keeps them in its own directory (`compiler.shim_dir`, root-owned, not group- or
world-writable) which only the build puts first on PATH (`build_env`); the build also passes
`CMAKE_CUDA_HOST_COMPILER=host_compiler(cfg)` so nvcc's choice does not depend on PATH alone. The user's
shell is untouched unless `compiler.user_shims` opts in to the recipe's `~/.local/bin` placement.

Wanted state: `compiler.packages` (gcc14, gcc14-c++) installed, /usr/bin/gcc-14 and /usr/bin/g++-14 report
major 14, the two shims are symlinks to them in the shim directory. `undo` removes the shims (not gcc14).

For the build step:

    build_env(facts, cfg) -> {"PATH": "<shim_dir>:<the target's PATH>", "CUDAHOSTCXX": "/usr/bin/g++-14"}
    host_compiler(cfg)    -> "/usr/bin/g++-14"  (build.host_compiler when set)
"""

from __future__ import annotations

import shlex

from .. import dnf
from ..engine import Change, Check, require_fedora, run_changes
from ..facts import UNKNOWN, Fact, qpath
from ..host import expand_home, sh
from ..ops import Cmd, Dnf, Refuse

NAME = "compiler"
TITLE = "gcc-14 host compiler shims"

USER_BIN = "~/.local/bin"
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
SHIMS = ("gcc", "g++")


def tool(cfg: dict, name: str) -> str:
    """/usr/bin/gcc-14, /usr/bin/g++-14 for compiler.major 14."""
    return f"/usr/bin/{name}-{cfg['compiler']['major']}"


def targets(cfg: dict) -> dict[str, str]:
    return {n: tool(cfg, n) for n in SHIMS}


def host_compiler(cfg: dict) -> str:
    """The C++ host compiler for nvcc (CMAKE_CUDA_HOST_COMPILER): build.host_compiler, else /usr/bin/g++-<major>."""
    override = (cfg.get("build") or {}).get("host_compiler") or ""
    return override or tool(cfg, "g++")


def build_env(facts: dict, cfg: dict) -> dict[str, str]:
    """Environment for the build only: the shim directory first on the target's PATH, and CUDAHOSTCXX."""
    sh_ = facts.get("compiler_shims") if isinstance(facts.get("compiler_shims"), dict) else {}
    base = sh_.get("path") or DEFAULT_PATH
    shim_dir = cfg["compiler"]["shim_dir"].rstrip("/")
    parts = [p for p in base.split(":") if p and p != shim_dir]
    return {"PATH": ":".join([shim_dir, *parts]), "CUDAHOSTCXX": host_compiler(cfg)}


# --- facts ------------------------------------------------------------------------------------------

def _shims_cmd(cfg: dict) -> str:
    d = qpath(cfg["compiler"]["shim_dir"].rstrip("/"))
    u = qpath(USER_BIN)
    tools = " ".join(shlex.quote(t) for t in targets(cfg).values())
    return (
        f"d={d}; u={u}; "
        'p=$(dirname "$d"); [ -d "$p" ] && stat -c "parent %u %a" "$p"; '
        'if [ -d "$d" ]; then stat -c "dir %u %a" "$d"; fi; '
        'for n in gcc g++; do if [ -L "$d/$n" ]; then echo "link $n $(readlink "$d/$n")"; '
        'elif [ -e "$d/$n" ]; then echo "link $n !notalink"; fi; '
        'if [ -L "$u/$n" ]; then echo "user $n $(readlink "$u/$n")"; '
        'elif [ -e "$u/$n" ]; then echo "user $n !notalink"; fi; done; '
        f'for t in {tools}; do [ -x "$t" ] && echo "tool $t $("$t" -dumpversion)"; done; '
        'echo "path $PATH"; true')


def parse_shims(out: str, rc: int) -> dict:
    """The shim directory's owner/mode, its links, the user's links, gcc-N/g++-N majors and PATH.

    >>> parse_shims("parent 0 755\\ndir 0 755\\nlink gcc /usr/bin/gcc-14\\ntool /usr/bin/gcc-14 14\\npath /usr/bin:/bin\\n", 0)
    {'dir': {'uid': 0, 'mode': 493}, 'parent': {'uid': 0, 'mode': 493}, 'links': {'gcc': '/usr/bin/gcc-14'}, 'user_links': {}, 'tools': {'/usr/bin/gcc-14': 14}, 'path': '/usr/bin:/bin'}
    """
    d: dict = {"dir": None, "parent": None, "links": {}, "user_links": {}, "tools": {}, "path": ""}
    for line in out.splitlines():
        kind, _, rest = line.partition(" ")
        if kind in ("dir", "parent"):
            uid, mode = rest.split()
            d[kind] = {"uid": int(uid), "mode": int(mode, 8)}
        elif kind in ("link", "user"):
            n, _, target = rest.partition(" ")
            d["links" if kind == "link" else "user_links"][n] = target
        elif kind == "tool":
            path, _, ver = rest.partition(" ")
            try:
                d["tools"][path] = int(ver.strip().split(".")[0])
            except ValueError:
                d["tools"][path] = UNKNOWN
        elif kind == "path":
            d["path"] = rest.strip()
    return {"dir": d["dir"], "parent": d["parent"], "links": d["links"], "user_links": d["user_links"],
            "tools": d["tools"], "path": d["path"]}


FACTS = [Fact("compiler_shims", _shims_cmd, parse_shims)]


# --- decisions --------------------------------------------------------------------------------------

def _shims(facts: dict) -> dict:
    s = facts.get("compiler_shims")
    return s if isinstance(s, dict) else {"dir": None, "parent": None, "links": {}, "user_links": {}, "tools": {},
                                          "path": ""}


def _safe(entry) -> bool:
    """Root-owned and not writable by group or others."""
    return isinstance(entry, dict) and entry["uid"] == 0 and not entry["mode"] & 0o022


def check(facts: dict, cfg: dict) -> Check:
    c = cfg["compiler"]
    major = int(c["major"])
    pk = dnf.installed(facts)
    fl = dnf.flavour_of(facts)
    s = _shims(facts)
    shim_dir = c["shim_dir"].rstrip("/")
    changes: list[Change] = []
    warnings: list[str] = []

    missing = [p for p in c["packages"] if p not in pk]
    if missing:
        gcc = facts.get("gcc") if isinstance(facts.get("gcc"), dict) else {}
        changes.append(Change("install " + ", ".join(missing),
                              f"CUDA 12.9 accepts gcc up to 14; the system gcc is {gcc.get('default', UNKNOWN)}",
                              [Dnf(dnf.install(missing, flavour=fl), NAME, f"installing gcc-{major}")]))
    else:
        bad_tools = [t for t in targets(cfg).values() if s["tools"].get(t) != major]
        if bad_tools:
            changes.append(Change("reinstall " + ", ".join(c["packages"]),
                                  ", ".join(f"{t} " + ("missing" if t not in s["tools"] else f"reports {s['tools'][t]}")
                                            for t in bad_tools),
                                  [Dnf([dnf.binary(fl), "-y", "reinstall", *c["packages"]], NAME,
                                       f"reinstalling gcc-{major}")]))

    want = targets(cfg)
    # One root command makes the directory (root-owned, 0755) and swaps each link in atomically (a
    # temporary link renamed over the old one), so a build never sees a missing shim. Every shim
    # difference below is fixed by that one operation.
    fix = Cmd(["sh", "-c", shim_script(shim_dir, want)], root=True)
    todo = _shim_dir_todo(s, shim_dir) + [(f"link {shim_dir}/{n} -> {t}", "missing" if s["links"].get(n) is None
                                           else f"points to {s['links'][n]}")
                                          for n, t in want.items() if s["links"].get(n) != t]
    changes += [Change(what, why, [fix]) for what, why in todo]
    if s["parent"] is not None and not _safe(s["parent"]) and s["dir"] is not None:
        warnings.append(f"the parent of {shim_dir} is writable by others (mode {s['parent']['mode']:04o}, "
                        f"uid {s['parent']['uid']}): choose a shim_dir under a root-owned directory")

    if c["user_shims"]:
        changes += _user_shim_changes(facts, cfg, s, want)
    else:
        leaked = [n for n, t in want.items() if s["user_links"].get(n) == t]
        if leaked:
            warnings.append(f"{USER_BIN}/{'/'.join(leaked)} point to gcc-{major} (the recipe's shims): every build "
                            f"of this user then uses gcc-{major}; remove them unless wanted (gpubox's build does not "
                            "need them)")

    info = {"shim_dir": shim_dir, "host_compiler": host_compiler(cfg), "build_path_first": shim_dir,
            "tools": s["tools"]}
    return Check(not changes, changes, warnings=warnings, info=info)


def _shim_dir_todo(s: dict, shim_dir: str) -> list[tuple[str, str]]:
    if s["dir"] is None:
        return [(f"create {shim_dir} (root-owned, mode 0755)", "missing")]
    if not _safe(s["dir"]):
        return [(f"make {shim_dir} root-owned and not group/world-writable",
                 f"owner uid {s['dir']['uid']}, mode {s['dir']['mode']:04o}: anyone who can write there chooses the "
                 "compiler of the build")]
    return []


def _user_shim_changes(facts: dict, cfg: dict, s: dict, want: dict[str, str]) -> list[Change]:
    """compiler.user_shims: the recipe's gcc/g++ links in ~/.local/bin, owned by the target user."""
    wrong = {n: t for n, t in want.items() if s["user_links"].get(n) != t}
    if not wrong:
        return []
    home = facts.get("home") if isinstance(facts.get("home"), str) else ""
    if not home or home == UNKNOWN:
        op = Refuse(f"{NAME}: the target user's home is unknown, so {USER_BIN} cannot be resolved",
                    "check gpubox.user and that `getent passwd USER` works")
    else:
        user_bin = expand_home(USER_BIN, home)
        login = facts.get("user", {}).get("name") if isinstance(facts.get("user"), dict) else None
        owner = cfg.get("user") or login
        script = shim_script(user_bin, want, owner=None, mode=None)
        if owner and owner != login:
            op = Cmd(["sh", "-c", script + "; " + sh("chown -h {o} {d}/gcc {d}/g++", o=owner, d=user_bin)],
                     root=True)
        else:
            op = Cmd(["sh", "-c", script])
    return [Change(f"link {USER_BIN}/{n} -> {t}", "compiler.user_shims is on (the recipe's placement): "
                   + ("missing" if s["user_links"].get(n) is None else f"points to {s['user_links'][n]}"), [op])
            for n, t in wrong.items()]


# --- apply ------------------------------------------------------------------------------------------

def apply(host, facts: dict, cfg: dict, chk: Check):
    require_fedora(facts, NAME)
    return run_changes(host, chk)


def shim_script(directory: str, links: dict[str, str], *, owner: str | None = "0:0", mode: str | None = "0755") -> str:
    """sh: create the directory and swap each link in atomically (ln to a temp name, mv -T over).

    >>> print(shim_script("/var/lib/gpubox/shims", {"gcc": "/usr/bin/gcc-14"}))
    set -e; install -d -m 0755 -o 0 -g 0 /var/lib/gpubox/shims; chown 0:0 /var/lib/gpubox/shims; chmod 0755 /var/lib/gpubox/shims; ln -sfn /usr/bin/gcc-14 /var/lib/gpubox/shims/.gcc.gpubox-new; mv -Tf /var/lib/gpubox/shims/.gcc.gpubox-new /var/lib/gpubox/shims/gcc
    """
    parts = ["set -e"]
    if owner:
        uid, _, gid = owner.partition(":")
        parts.append(sh("install -d -m {m} -o {u} -g {g} {d}", m=mode or "0755", u=uid, g=gid or uid, d=directory))
        parts.append(sh("chown {o} {d}", o=owner, d=directory))
    else:
        parts.append(sh("mkdir -p {d}", d=directory))
    if mode:
        parts.append(sh("chmod {m} {d}", m=mode, d=directory))
    for n, t in links.items():
        tmp = f"{directory}/.{n}.gpubox-new"
        parts.append(sh("ln -sfn {t} {tmp}", t=t, tmp=tmp))
        parts.append(sh("mv -Tf {tmp} {dst}", tmp=tmp, dst=f"{directory}/{n}"))
    return "; ".join(parts)


def undo(host, facts: dict, cfg: dict) -> list[str]:
    """Remove the shims gpubox made (links that point to gcc-N/g++-N only; anything else is left) and the
    shim directory when it is then empty. gcc14 itself stays installed. Returns what was removed."""
    require_fedora(facts, NAME)
    s = _shims(facts)
    want = targets(cfg)
    shim_dir = cfg["compiler"]["shim_dir"].rstrip("/")
    removed = []
    gone = [f"{shim_dir}/{n}" for n, t in want.items() if s["links"].get(n) == t]
    if gone:
        host.run(["rm", "-f", "--", *gone], root=True)
        removed += gone
    if s["dir"] is not None:
        if host.run(["rmdir", "--", shim_dir], root=True, check=False).exited == 0:
            removed.append(shim_dir)
    home = facts.get("home") if isinstance(facts.get("home"), str) else ""
    # ~/.local/bin links only when gpubox made them (user_shims on); the recipe's own are the user's.
    if cfg["compiler"]["user_shims"] and home and home != UNKNOWN:
        ub = expand_home(USER_BIN, home)
        mine = [f"{ub}/{n}" for n, t in want.items() if s["user_links"].get(n) == t]
        if mine:
            host.run(["rm", "-f", "--", *mine], root=True)
            removed += mine
    return removed
