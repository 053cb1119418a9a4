"""Step 6: the model GGUF and its MTP assistant head, pinned, verified, resumable, locked.

Facts (fetch.inspect: one python3 run inside the fact script, no network in the steady state):
  * the lock file (<state_dir>/gpubox.lock.json), each file's size/mtime/owner, any partial file,
    free disk at models.dir, whether huggingface_hub is importable;
  * the Hub's metadata (size, commit, sha256) ONLY for files the lock does not describe, or for all
    of them with models.update=true: one HEAD each, bounded by models.metadata_timeout (unreachable ->
    size "unknown"; plan still works offline).

check(): a file is done when the lock describes it (same repo/filename/revision, or revision = its
commit) and its size and mtime are those recorded when it was verified; the hash is then taken from
the lock, not recomputed (`invoke verify --deep` re-hashes). A second provision therefore makes no
request and transfers nothing. The assistant's recorded general.architecture must be the fork
profile's (gemma4_assistant pre-sync, gemma4-assistant post-sync).

apply(): sends provision/fetch.py (with provision/ggufhead.py) on python3's command line and runs it on
the target, where the files belong; it resumes partial files, verifies sha256 while downloading, and reports @@progress lines
that are rendered here (a bar on a terminal, plain lines otherwise). Then the lock is written.

The Hub endpoint and token: HF_ENDPOINT and HF_TOKEN of the controller's environment are passed on
(the token inside the stdin JSON, never on a command line or in a log); without them the target's
own environment / token file applies. models.update=true (--set models.update=true) moves the lock
to what the configured revision points at now.
"""

from __future__ import annotations

import json
import os
import posixpath
import sys
from dataclasses import dataclass, field

from .. import config as cfgmod
from .. import dnf
from .. import fetch as fetchmod
from .. import ggufhead, lockfile, progress, remote
from ..progress import Progress
from ..engine import Change, Check, StepError, require_fedora, run_changes
from ..facts import UNKNOWN, Fact, qpath
from ..ops import Cmd, Dnf, Op, Refuse

NAME = "models"
TITLE = "GGUF model and MTP assistant head"

# What runs on the target (provision/remote.py): fetch.inspect is the fact, fetch.boot the download.
ON_TARGET = [ggufhead, progress, fetchmod]

def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip()


def _owner(cfg: dict) -> str:
    return cfg.get("user") or ""


def _models_fact_cmd(cfg: dict) -> str:
    m = cfg["models"]
    args = {"files": {k: {"repo": f["repo"], "filename": f["filename"], "revision": f["revision"]} for k, f in m["files"].items()},
            "update": bool(m["update"]), "endpoint": _endpoint(), "timeout": m["metadata_timeout"], "owner": _owner(cfg)}
    # One bounded python3 run; the timeout covers the HEAD requests when the lock does not answer.
    limit = 2 * m["metadata_timeout"] * max(1, len(m["files"])) + 5
    return (f"timeout {limit} {remote.snippet(ON_TARGET, 'inspect', json.dumps(args))} "
            f"{qpath(m['dir'])} {qpath(lockfile.path(cfg))}")


def _parse_models(out: str, rc: int):
    if rc != 0:
        return UNKNOWN
    return json.loads(out.strip().splitlines()[-1])


FACTS = [
    Fact("models", _models_fact_cmd, _parse_models),
    Fact("models_fork_head", lambda cfg: f"git -c safe.directory='*' -C {qpath(cfg['build']['src_dir'])} rev-parse HEAD",
         lambda o, rc: o.strip() if rc == 0 and len(o.strip()) == 40 else UNKNOWN),
]


# --- decisions ---------------------------------------------------------------------------------------

def human(n) -> str:
    return progress.human(n) if isinstance(n, int) else "unknown size"


def draft_key(cfg: dict) -> str:
    """The file whose architecture must match the fork build: serve.draft_model, else the file named
    `assistant` (it is downloaded, and checked, even while serving without drafting)."""
    return cfg["serve"].get("draft_model") or ("assistant" if "assistant" in cfg["models"]["files"] else "")


def arch_fix(cfg: dict, actual: str) -> str:
    """Which profile or revision to pick when the assistant's architecture does not match the build."""
    pin = cfgmod.fork_pin(cfg)
    want = pin.get("assistant_arch")
    fitting = [n for n, p in cfg["build"]["profiles"].items() if p.get("assistant_arch") == actual]
    key = draft_key(cfg) or "assistant"
    parts = []
    if fitting:
        parts.append(f"build the fork that reads {actual!r}: --set build.profile={fitting[0]} "
                     f"({cfg['build']['profiles'][fitting[0]].get('dialect')})")
    parts.append(f"or keep build.profile={pin.get('profile')} and pin an assistant revision whose general.architecture is "
                 f"{want!r}: --set models.files.{key}.revision=<commit> (post-sync builds need the regenerated assistant "
                 "published after the fork's b10018 sync; pre-sync builds the earlier one), then run with "
                 "--set models.update=true")
    return "; ".join(parts)


def plan_files(facts: dict, cfg: dict) -> dict:
    """Per configured file: what is there, what the lock says, and what would be done."""
    m = facts.get("models")
    mcfg = cfg["models"]
    pin = cfgmod.fork_pin(cfg)
    lock = m.get("lock") if isinstance(m, dict) else None
    lock_ok = isinstance(lock, dict) and lock.get("format") == lockfile.FORMAT
    models = lock.get("models", {}) if lock_ok else {}
    out = {}
    for key, f in mcfg["files"].items():
        st = (m.get("files") or {}).get(key, {}) if isinstance(m, dict) else {}
        remote = (m.get("remote") or {}).get(key, {}) if isinstance(m, dict) else {}
        e = models.get(key) if lockfile.matches(models.get(key), f) else None
        pinned = (f.get("sha256") or "").lower()
        size = (e or {}).get("size") or remote.get("size") or None
        item = {"key": key, "filename": f["filename"], "repo": f["repo"], "revision": f["revision"], "lock": e,
                "have": st.get("partial", 0) or 0, "size": size, "present": "size" in st, "remote": remote,
                "expect_arch": pin.get("assistant_arch") if key == draft_key(cfg) else ""}
        intact = bool(e and st.get("size") == e.get("size") and st.get("mtime_ns") == e.get("mtime_ns"))
        moved = bool(mcfg["update"] and e and remote.get("commit") and remote["commit"] != e.get("commit"))
        if intact and pinned and pinned != e.get("sha256"):
            item.update(action="verify", why=f"models.files.{key}.sha256 {pinned[:12]}... differs from the lock's {e['sha256'][:12]}...")
        elif intact and e.get("verified") is False and not f.get("allow_unverified"):
            item.update(action="verify", why=f"the lock says verified: false and models.files.{key}.allow_unverified "
                        f"is false: verify it against a known sha256 (pin models.files.{key}.sha256)")
        elif intact and not moved:
            item.update(action="ok")
        elif moved:
            item.update(action="download", why=f"{f['repo']} {f['revision']} moved from {e['commit'][:12]} to "
                        f"{remote['commit'][:12]} (models.update=true)", size=remote.get("size"))
            item["have"] = 0 if item["have"] and not remote.get("size") else item["have"]
        elif e and "size" in st:
            item.update(action="verify", why=f"changed on disk since it was locked (size {st['size']}, "
                        f"locked {e.get('size')}): re-hash against the lock")
        elif "size" in st:
            item.update(action="verify", why=f"present but not in the lock: hash it and compare with the Hub's sha256")
        elif item["have"]:
            item.update(action="resume", why=f"{human(item['have'])} of {human(size)} already in the partial file")
        else:
            item.update(action="download", why="not present")
        if remote.get("error"):
            item["remote_error"] = remote["error"]
        item["uid"] = st.get("uid")
        out[key] = item
    return out


def check(facts: dict, cfg: dict) -> Check:
    m = facts.get("models")
    mcfg = cfg["models"]
    lock_path = lockfile.path(cfg)
    if not isinstance(m, dict):
        items = {k: {"lock": None, "expect_arch": "", "action": "download"} for k in mcfg["files"]}
        return Check.todo([Change("inspect and download the model files",
                                  "the models fact could not be read (is python3 installed on the target?)",
                                  _download_ops(facts, cfg, items))], info={"lock": lock_path})
    items = plan_files(facts, cfg)
    changes = _file_changes(facts, cfg, items)
    warnings = _disk_warnings(facts, cfg, items) + _unverified_warnings(cfg, items)
    changes += _chown_changes(facts, cfg, items)
    if not m.get("hf") and any(it["action"] != "ok" for it in items.values()):
        changes.insert(0, Change(f"install {mcfg['hf_package']}", "huggingface_hub is not importable by the target's "
                                 "python3", [Dnf(dnf.install([mcfg["hf_package"]], flavour=dnf.flavour_of(facts)),
                                                 NAME, "installing huggingface_hub")]))
    lock = m.get("lock")
    if isinstance(lock, dict) and "_error" in lock:
        warnings.append(f"{lock_path} is unreadable ({lock['_error']}): it will be rewritten")
    writes_lock = any(isinstance(o, WriteLock) for c in changes for o in c.ops)
    if not writes_lock and not (isinstance(lock, dict) and lock.get("format") == lockfile.FORMAT
                                and lock.get("box") == lockfile.box(facts, cfg)):
        changes.append(Change(f"record the box in {lock_path}", "the lock is missing or describes another state "
                              "(fork, driver, CUDA, compiler)", [WriteLock(lock_path, _old_lock(m), facts, cfg)]))
    info = {"lock": lock_path, "download_bytes": _to_fetch(items)[0], "unknown_size": _to_fetch(items)[1],
            "files": {k: {"file": f"{mcfg['dir']}/{it['filename']}", "action": it["action"], "size": it["size"],
                          "commit": (it["lock"] or {}).get("commit") or it["remote"].get("commit"),
                          "sha256": (it["lock"] or {}).get("sha256")} for k, it in items.items()}}
    return Check(not changes, changes, warnings=warnings, info=info)


def _to_fetch(items: dict) -> tuple[int, list[str]]:
    """(bytes left to download, files of unknown size)."""
    total, unknown = 0, []
    for it in items.values():
        if it["action"] in ("download", "resume"):
            if isinstance(it["size"], int):
                total += it["size"] - it["have"]
            else:
                unknown.append(it["filename"])
    return total, unknown


def _file_changes(facts: dict, cfg: dict, items: dict) -> list[Change]:
    """One change per file to download, resume or verify, all made by one downloader run (then the lock);
    an intact file whose architecture does not match the fork build stops the step."""
    work = {k: it for k, it in items.items() if it["action"] != "ok"}
    ops = _download_ops(facts, cfg, work) if work else []
    changes = []
    for it in work.values():
        if it["action"] in ("download", "resume"):
            left = (it["size"] - it["have"]) if isinstance(it["size"], int) else None
            changes.append(Change(f"{it['action']} {it['filename']} ({human(left) if left is not None else 'unknown size'})",
                                  it["why"] + (f"; the Hub was not reachable for its size ({it['remote_error']})"
                                               if it.get("remote_error") else ""), ops))
        else:
            changes.append(Change(f"verify {it['filename']} (sha256 of {human(it['size'])})", it["why"], ops))
    for it in items.values():
        if it["action"] == "ok" and it["lock"] and it["expect_arch"] and it["lock"].get("arch") != it["expect_arch"]:
            cause = (f"{NAME}: {it['filename']} has general.architecture {it['lock'].get('arch')!r}, but the fork "
                     f"build ({cfgmod.fork_pin(cfg).get('profile')}) loads {it['expect_arch']!r}; no server started")
            changes.append(Change(f"{it['filename']}: general.architecture {it['lock'].get('arch')!r} does not match "
                                  f"the fork build ({cfgmod.fork_pin(cfg).get('profile')}: {it['expect_arch']!r})",
                                  arch_fix(cfg, it["lock"].get("arch")),
                                  [Refuse(cause, arch_fix(cfg, it["lock"].get("arch")))]))
    return changes


def _unverified_warnings(cfg: dict, items: dict) -> list[str]:
    """Files the Hub gives no sha256 for while models.files.<key>.sha256 is empty: provision refuses them."""
    out = []
    for key, it in items.items():
        f = cfg["models"]["files"][key]
        remote_sha = str(it["remote"].get("sha256") or "")
        if (it["action"] != "ok" and not f.get("sha256") and not f.get("allow_unverified") and "commit" in it["remote"]
                and not (len(remote_sha) == 64 and all(ch in "0123456789abcdef" for ch in remote_sha))):
            out.append(f"the Hub reports no sha256 for {it['repo']}/{it['filename']} and models.files.{key}.sha256 "
                       f"is empty: provision will refuse to put it in place (pin the sha256, or set "
                       f"models.files.{key}.allow_unverified=true)")
    return out


def _chown_changes(facts: dict, cfg: dict, items: dict) -> list[Change]:
    m = facts["models"]
    owner_uid = m.get("owner_uid")
    owner = _owner(cfg)
    out = []
    for it in items.values():
        if it["action"] == "ok" and owner_uid is not None and it["uid"] is not None and it["uid"] != owner_uid:
            path = posixpath.join(m.get("dir") or cfg["models"]["dir"], it["filename"])
            out.append(Change(f"chown {it['filename']} to {owner or 'the login user'}", f"owned by uid {it['uid']}",
                              [Cmd(["chown", f"{owner}:" if owner else str(owner_uid), path], root=True)]))
    return out


def _disk_warnings(facts: dict, cfg: dict, items: dict) -> list[str]:
    mcfg = cfg["models"]
    free = facts["models"].get("free")
    to_fetch = _to_fetch(items)[0]
    reserve = mcfg["reserve_gb"] * 1024 ** 3
    if to_fetch and isinstance(free, int) and to_fetch + reserve > free:
        return [f"not enough disk at {mcfg['dir']}: {human(to_fetch)} to download + {human(reserve)} reserve, "
                f"{human(free)} free: the download would stop before starting"]
    return []


def _old_lock(m: dict) -> dict | None:
    lock = m.get("lock") if isinstance(m, dict) else None
    return lock if isinstance(lock, dict) and "_error" not in lock else None


def _download_ops(facts: dict, cfg: dict, work: dict) -> list:
    """The downloader run on the target for these files, then the lock written from what it verified."""
    m = facts.get("models") if isinstance(facts.get("models"), dict) else {}
    return [Download(spec(facts, cfg, work, None), root=_needs_root(facts, cfg)),
            WriteLock(lockfile.path(cfg), _old_lock(m), facts, cfg)]


# --- apply -------------------------------------------------------------------------------------------

class Render:
    """The target's output: @@progress lines rendered again (provision/progress.py: a bar on a terminal, a
    plain line every interval otherwise), other lines shown, every line kept for @@result/@@error."""

    def __init__(self, interval: float, out=None):
        self.out = out or sys.stdout
        self.tty = hasattr(self.out, "isatty") and self.out.isatty()
        self.interval = interval
        self.files: dict[str, Progress] = {}
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if line.startswith("@@progress "):
            try:
                p = json.loads(line[len("@@progress "):])
            except ValueError:
                return
            pr = self.files.get(p["file"])
            if pr is None:
                pr = self.files[p["file"]] = Progress(f"  [models] {p['file']}", style="bar" if self.tty else "lines",
                                                      every_s=0.0 if self.tty else self.interval, out=self.out)
            pr.update(p["done"], p.get("total") or 0, rate=p.get("rate") or 0, left=p.get("eta"))
        elif not line.startswith("@@"):
            self.out.write(f"  [models] {line}\n")
            self.out.flush()

    def tagged(self, tag: str) -> list[dict]:
        out = []
        for line in self.lines:
            if line.startswith(f"@@{tag} "):
                try:
                    out.append(json.loads(line[len(tag) + 3:]))
                except ValueError:
                    pass
        return out


def spec(facts: dict, cfg: dict, items: dict, token: str | None) -> dict:
    mcfg = cfg["models"]
    pin = cfgmod.fork_pin(cfg)
    files = []
    for key, it in items.items():
        f = mcfg["files"][key]
        e = it["lock"] or {}
        known = {k: e.get(k) for k in ("commit", "sha256", "size", "mtime_ns", "verified") if k in e} if e else {}
        files.append({"key": key, "repo": f["repo"], "filename": f["filename"], "revision": f["revision"],
                      "sha256": (f.get("sha256") or "").lower(), "known": known,
                      "allow_unverified": bool(f.get("allow_unverified")),
                      "update": bool(mcfg["update"]), "expect_arch": it["expect_arch"]})
    fix = arch_fix(cfg, "gemma4_assistant" if pin.get("assistant_arch") == "gemma4-assistant" else "gemma4-assistant")
    return {"dir": mcfg["dir"], "owner": _owner(cfg), "files": files, "reserve_bytes": mcfg["reserve_gb"] * 1024 ** 3,
            "endpoint": _endpoint(), "token": token, "progress": "machine",
            "progress_interval": mcfg["progress_interval"], "metadata_timeout": mcfg["metadata_timeout"],
            "profile": pin.get("profile"), "arch_fix": fix}


def write_lock(host, path: str, text: str) -> None:
    """Atomic write of the lock (temp file + rename). The JSON is an argument, not stdin: Invoke/Fabric
    feed stdin one byte per 10 ms (host.write_file would take ~20 s for this file)."""
    script = ('set -e; p="$1"; d=$(dirname "$p"); mkdir -p "$d"; t=$(mktemp "$d/.gpubox-lock.XXXXXX"); '
              'printf "%s" "$2" > "$t"; chmod 0644 "$t"; mv -f "$t" "$p"')
    host.run(["sh", "-c", script, "gpubox-lock", path, text], root=True)


def _needs_root(facts: dict, cfg: dict) -> bool:
    user = facts.get("user")
    login = user.get("name") if isinstance(user, dict) else None
    return bool(cfg.get("user")) and cfg["user"] != login


def apply(host, facts: dict, cfg: dict, check: Check):
    if any(isinstance(o, Dnf) for o in check.operations()):
        require_fedora(facts, NAME)
    return run_changes(host, check)


@dataclass
class Download(Op):
    """provision/fetch.py sent to the target and run there, where the files belong: it resumes partial files,
    verifies sha256 while downloading and prints @@progress lines (rendered here) and one @@result. Its
    results and errors go to `state` for WriteLock, which writes the lock first and then reports them."""
    spec: dict
    root: bool = False

    def text(self) -> str:
        files = ", ".join(f"{f['repo']}/{f['filename']}@{f['revision']}" for f in self.spec["files"])
        return f"python3 -c <provision/fetch.py boot> {files} -> {self.spec['dir']} (resumed, sha256 verified)"

    def run(self, host, state: dict):
        token = os.environ.get("HF_TOKEN") or None
        sp = dict(self.spec, token_stdin=bool(token))
        render = Render(sp["progress_interval"])
        r = host.run(remote.argv(ON_TARGET, "boot", json.dumps(sp)),
                     stdin=(token + "\n") if token else None, root=self.root, check=False, stream=render)
        found = render.tagged("result")
        state["errors"] = render.tagged("error")
        state["results"] = found[-1]["files"] if found else []
        if not found and not state["errors"]:
            out = "\n".join(line for line in render.lines if not line.startswith("@@progress"))
            raise StepError(f"{NAME}: the downloader on the target exited {r.exited} without a result",
                            "see the output below; python3 and huggingface_hub must work on the target",
                            command="python3 -c <provision/fetch.py boot>", exited=r.exited,
                            output=(out + "\n" + (r.stderr or "")).strip())
        return None


@dataclass
class WriteLock(Op):
    """The lock: the downloader's results + the still-valid old entries + the box as it is now, written
    atomically when it differs; then the downloader's errors, if any, stop the step."""
    path: str
    old: dict | None
    facts: dict = field(repr=False)
    cfg: dict = field(repr=False)
    root: bool = True

    def text(self) -> str:
        return f"write {self.path} (the lock: files, commits, sha256 and the box, when it changed)"

    def run(self, host, state: dict):
        new = lockfile.build(self.old, self.facts, self.cfg, state.get("results", []))
        if new != self.old:
            write_lock(host, self.path, lockfile.dumps(new))
        errors = state.get("errors") or []
        if errors:
            e = errors[0]
            more = "".join(f"\n  also: {x['message']}" for x in errors[1:])
            raise StepError(f"{NAME}: {e['message']}{more}", e.get("fix", ""))
        return None
