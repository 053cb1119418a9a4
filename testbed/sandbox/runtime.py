"""Bring the sandbox up and down: network namespace, overlay root, the chroot's sshd, the HF server.

`up` (root only):
  1. builds what the cache lacks (base rootfs, fixture repos, pristine layer, git mirror, HF content);
  2. creates network namespace `gpubox` with a veth pair (host gpubox0 10.200.0.1/24, target eth0
     10.200.0.2/24);
  3. starts `ip netns exec gpubox unshare --pid --fork --kill-child --mount --uts bash init.sh`: the
     init script (testbed/templates/etc/init.sh.j2), PID 1 of its own PID namespace, mounts
     overlay(lower = pristine:base, upper = instance/upper), /proc, /dev, the repos, the git mirror and
     the persistent cache, sets hostname `gpubox` and runs the chroot's sshd. All of it lives in
     namespaces that die with that one process tree;
  4. starts `python -m testbed.hfserver` on 10.200.0.1 (reachable from the target and the host);
  5. writes the ssh config, the config overrides (invoke.yaml) and state.json (PIDs).
Running it again while up only checks that everything answers.

`down` kills what state.json names (by PID: unshare, whose --kill-child takes the namespace's PID 1 and
with it every process inside, then the HF server), kills any process still in the namespace, closes
the ssh ControlMaster, deletes the namespace; nothing is unmounted on the host because nothing was
mounted there. `reset` restarts the target on an empty upper layer (the persistent cache stays).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from . import fixtures, gitmirror, rootfs
from .paths import (ADDRESS, GIT_MOUNT, HF_PORT, HOST_ADDRESS, HOST_IF, NETNS, PERSIST_MOUNT, PREFIX, REPO_MOUNT,
                    REPO_ROOT, Paths)

CUDA_REPO_BASEURL = f"file://{REPO_MOUNT}/cuda"
# The Hugging Face repositories the sandbox serves: the configured models' names, tiny GGUFs written
# by testbed.testmodels (owned by the serve work). The MoE main model gives --n-cpu-moe experts to move.
HF_MODELS = {
    "model": {"repo": "unsloth/gemma-4-26B-A4B-it-GGUF", "filename": "gemma-4-26B-A4B-it-Q4_K_M.gguf",
              "kwargs": {"arch": "llama", "n_experts": 4, "seed": 1}},
    "assistant": {"repo": "AtomicChat/gemma-4-26B-A4B-it-assistant-GGUF",
                  "filename": "gemma-4-26B-A4B-it-assistant.Q4_K_M.gguf", "kwargs": {"arch": "llama", "seed": 2}},
}
HF_CONTENT_VERSION = 1

_CHILDREN: dict[int, subprocess.Popen] = {}   # Popen objects of this process, reaped by down()


class SandboxError(Exception):
    """Something about the sandbox failed; the message names the cause and the fix."""


@dataclass
class Info:
    ssh_config: str
    host: str
    address: str
    hf_endpoint: str            # as seen from the target (also reachable from the host)
    hf_endpoint_host: str
    git_url: str
    git_sha: str
    cuda_repo_baseurl: str
    overrides_file: str
    persist_mount: str
    fab_command: str
    pids: dict = field(default_factory=dict)

    def overrides(self) -> dict:
        return yaml.safe_load(Path(self.overrides_file).read_text())

    def gpubox_config(self, report_dir: str | Path) -> dict:
        """The validated gpubox config a run against the sandbox uses: defaults, the sandbox's overrides on
        top (one level deep, as Invoke merges them), and the given report_dir."""
        from provision import config
        raw = config.defaults()["gpubox"]
        for k, v in (self.overrides().get("gpubox") or {}).items():
            if isinstance(v, dict) and isinstance(raw.get(k), dict):
                raw[k].update(v)
            else:
                raw[k] = v
        raw["report_dir"] = str(report_dir)
        return config.validate(raw)


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def require_root() -> None:
    if os.geteuid() != 0:
        raise SandboxError("the sandbox needs root (network namespace, overlay mounts, chroot); "
                           "fix: run as root, e.g. sudo -E invoke sandbox.up")


@contextlib.contextmanager
def _lock(p: Paths):
    p.root.mkdir(parents=True, exist_ok=True)
    with open(p.root / ".up.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _run(argv, check=True):
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise SandboxError(f"command failed (exit {r.returncode}): {' '.join(map(str, argv))}: {r.stderr.strip()}")
    return r


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _wait_port(host: str, port: int, seconds: float, pid: int | None = None, what: str = "") -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if _port_open(host, port, 0.2):
            return
        if pid is not None and not _alive(pid):
            break
        time.sleep(0.02)
    raise SandboxError(f"{what} did not answer on {host}:{port} within {seconds:.0f}s")


def netns_exists() -> bool:
    return Path(f"/run/netns/{NETNS}").exists()


# --- build ------------------------------------------------------------------------------------------

def ensure_hf_content(p: Paths, log=_log_default) -> None:
    stamp = p.hf / ".content"
    want = json.dumps({"v": HF_CONTENT_VERSION, "models": HF_MODELS}, sort_keys=True)
    if stamp.exists() and stamp.read_text() == want:
        return
    try:
        from testbed.testmodels import write_tiny
    except ImportError as e:
        raise SandboxError(f"testbed.testmodels is missing ({e}); the sandbox's HF server has nothing to serve") from e
    for m in HF_MODELS.values():
        path = p.hf / m["repo"] / m["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_tiny(path, **m["kwargs"])
    stamp.write_text(want)
    log(f"sandbox: wrote tiny GGUFs for {', '.join(m['repo'] for m in HF_MODELS.values())} into {p.hf}")


def ensure_built(p: Paths | None = None, log=_log_default) -> dict:
    """Build what the cache lacks or what changed; returns {what: built?}. A running sandbox is stopped
    (and its upper layer dropped: it was made over the old layers) before a cached layer is replaced."""
    p = p or Paths.default()
    require_root()
    with _lock(p):
        return _ensure_built(p, log)


def _ensure_built(p: Paths, log) -> dict:

    def before_replace():
        if _state(p) or netns_exists():
            log("sandbox: the recipe changed: stopping the running sandbox before rebuilding")
            _down_locked(p, log)
        _wipe_upper(p)

    require_root()
    p.root.mkdir(parents=True, exist_ok=True)
    for d in (p.persist, p.logs, p.hf):
        d.mkdir(parents=True, exist_ok=True)
    (p.persist / "ccache").mkdir(exist_ok=True)
    rootfs.ensure_key(p, log)
    try:
        built = {"base": rootfs.build_base(p, log, before_replace),
                 "pristine": rootfs.build_pristine(p, log, before_replace)}
    except (rootfs.BuildError, fixtures.FixtureError) as e:
        raise SandboxError(f"building the sandbox root filesystem failed: {e}") from e
    try:
        gitmirror.ensure(p, log)
    except gitmirror.MirrorError as e:
        raise SandboxError(f"llama.cpp mirror: {e}") from e
    ensure_hf_content(p, log)
    return built


# --- up / down --------------------------------------------------------------------------------------

def _write_ssh_config(p: Paths) -> None:
    p.ssh.mkdir(parents=True, exist_ok=True)
    text = fixtures.render("etc/ssh_config.j2", path=p.ssh_config, address=ADDRESS, identity=p.key,
                           control_path=p.ssh / "cm-%C")
    p.ssh_config.write_text(text)


def _overrides(sha: str, url: str, ssh_config: Path) -> dict:
    # ssh_config_path: Fabric loads it (as `fab -S` does) and `verify` hands it to testinfra.
    return {"ssh_config_path": str(ssh_config), "gpubox": {
        "cuda": {"repo_baseurl": CUDA_REPO_BASEURL, "repo_gpgcheck": False},
        "build": {"repo_url": url, "sha": sha, "cuda": False, "profile": "sandbox",
                  "profiles": {"sandbox": {"sha": sha, "dialect": "upstream", "assistant_arch": "llama"}},
                  "ccache_dir": f"{PERSIST_MOUNT}/ccache"},
        # Upstream llama.cpp (no turbo KV types, no MTP head for a llama-arch assistant), CPU-only, tiny models.
        "serve": {"ctx_size": 4096, "cache_type_k": "f16", "cache_type_v": "f16", "cache_type_k_draft": "f16",
                  "cache_type_v_draft": "f16", "draft_model": "", "override_tensor_draft": [], "flash_attn": "auto",
                  "mlock": False, "ready_timeout": 120},
    }}


def _netns_up() -> None:
    if not netns_exists():
        _run(["ip", "netns", "add", NETNS])
    if _run(["ip", "link", "show", HOST_IF], check=False).returncode != 0:
        _run(["ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", "eth0", "netns", NETNS])
        _run(["ip", "addr", "add", f"{HOST_ADDRESS}/{PREFIX}", "dev", HOST_IF])
        _run(["ip", "-n", NETNS, "addr", "add", f"{ADDRESS}/{PREFIX}", "dev", "eth0"])
    _run(["ip", "link", "set", HOST_IF, "up"])
    _run(["ip", "-n", NETNS, "link", "set", "eth0", "up"])
    _run(["ip", "-n", NETNS, "link", "set", "lo", "up"])


def _start_target(p: Paths) -> int:
    """Start the namespace init (sshd inside); returns the PID of `unshare` (its --kill-child parent)."""
    for d in (p.upper, p.work, p.merged):
        d.mkdir(parents=True, exist_ok=True)
    init = fixtures.render("etc/init.sh.j2", netns=NETNS, merged=p.merged, lower=f"{p.pristine}:{p.base}",
                           upper=p.upper, work=p.work, repos=p.repos, git=p.git, persist=p.persist,
                           persist_mount=PERSIST_MOUNT)
    p.init.write_text(init)
    logf = open(p.logs / "target.log", "ab")
    proc = subprocess.Popen(["ip", "netns", "exec", NETNS, "unshare", "--pid", "--fork", "--kill-child=SIGKILL",
                             "--mount", "--uts", "--propagation", "private", "bash", str(p.init)],
                            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    logf.close()
    _CHILDREN[proc.pid] = proc
    try:
        _wait_port(ADDRESS, 22, 15, proc.pid, "the sandbox's sshd")
    except SandboxError as e:
        tail = (p.logs / "target.log").read_text(errors="replace")[-1500:]
        _kill(proc.pid)
        raise SandboxError(f"{e}; target log ({p.logs / 'target.log'}):\n{tail}") from None
    return proc.pid


def _start_hf(p: Paths) -> int | None:
    if not (REPO_ROOT / "testbed" / "hfserver.py").exists():
        return None
    logf = open(p.logs / "hfserver.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "testbed.hfserver", "--root", str(p.hf), "--host", HOST_ADDRESS,
                             "--port", str(HF_PORT), "--log", str(p.logs / "hf-requests.jsonl")],
                            cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                            start_new_session=True)
    logf.close()
    _CHILDREN[proc.pid] = proc
    _wait_port(HOST_ADDRESS, HF_PORT, 10, proc.pid, "the local Hugging Face server")
    return proc.pid


def _kill(pid: int, sig=signal.SIGKILL, wait: float = 5.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    proc = _CHILDREN.pop(pid, None)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
        return
    end = time.monotonic() + wait
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.01)


def _netns_pids() -> list[int]:
    if not netns_exists():
        return []
    r = _run(["ip", "netns", "pids", NETNS], check=False)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def _close_master(p: Paths) -> None:
    if p.ssh_config.exists():
        subprocess.run(["ssh", "-F", str(p.ssh_config), "-O", "exit", "gpubox"], capture_output=True, timeout=10)


def _state(p: Paths) -> dict:
    try:
        return json.loads(p.state.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _info_from_state(p: Paths, st: dict) -> Info:
    return Info(**{k: st[k] for k in Info.__dataclass_fields__})


def info(p: Paths | None = None) -> Info | None:
    p = p or Paths.default()
    st = _state(p)
    return _info_from_state(p, st) if st.get("ssh_config") else None


def running(p: Paths | None = None) -> bool:
    """True when state.json's target and HF server are alive and sshd answers."""
    p = p or Paths.default()
    st = _state(p)
    pids = st.get("pids") or {}
    if not pids.get("target") or not _alive(pids["target"]) or not netns_exists():
        return False
    if pids.get("hfserver") and not _alive(pids["hfserver"]):
        return False
    return _port_open(ADDRESS, 22)


def up(p: Paths | None = None, log=_log_default) -> Info:
    p = p or Paths.default()
    require_root()
    with _lock(p):
        _ensure_built(p, log)
        if running(p):
            return info(p)
        _down_locked(p, log=lambda m: None)
        _netns_up()
        _write_ssh_config(p)
        target = _start_target(p)
        try:
            hf = _start_hf(p)
        except SandboxError:
            _down_locked(p, log=lambda m: None)
            raise
        url, sha = gitmirror.ensure(p, log)
        p.overrides.write_text(yaml.safe_dump(_overrides(sha, url, p.ssh_config), sort_keys=False))
        hf_url = f"http://{HOST_ADDRESS}:{HF_PORT}" if hf else ""
        inf = Info(ssh_config=str(p.ssh_config), host="gpubox", address=ADDRESS, hf_endpoint=hf_url,
                   hf_endpoint_host=hf_url, git_url=url, git_sha=sha, cuda_repo_baseurl=CUDA_REPO_BASEURL,
                   overrides_file=str(p.overrides), persist_mount=PERSIST_MOUNT,
                   fab_command=f"HF_ENDPOINT={hf_url} fab -S {p.ssh_config} -H gpubox -f {p.overrides} provision",
                   pids={"target": target, "hfserver": hf})
        p.state.write_text(json.dumps(asdict(inf), indent=2))
        return inf


def _down_locked(p: Paths, log=_log_default) -> list[str]:
    done = []
    st = _state(p)
    pids = st.get("pids") or {}
    _close_master(p)
    for name in ("target", "hfserver"):
        pid = pids.get(name)
        if pid and _alive(pid):
            _kill(pid)
            done.append(f"stopped {name} (pid {pid})")
    for pid in _netns_pids():    # anything else still in the namespace (left by an earlier crash)
        _kill(pid)
        done.append(f"killed pid {pid} left in netns {NETNS}")
    if _run(["ip", "link", "show", HOST_IF], check=False).returncode == 0:
        _run(["ip", "link", "del", HOST_IF], check=False)
    if netns_exists():
        _run(["ip", "netns", "del", NETNS])
        done.append(f"removed netns {NETNS}")
    for pid in list(_CHILDREN):
        if not _alive(pid):
            _kill(pid)
    p.state.unlink(missing_ok=True)
    for d in p.ssh.glob("cm-*") if p.ssh.exists() else ():
        d.unlink(missing_ok=True)
    for line in done:
        log("sandbox: " + line)
    return done


def down(p: Paths | None = None, log=_log_default) -> list[str]:
    """Stop everything `up` started; harmless when nothing is up. Leaves the cache."""
    p = p or Paths.default()
    require_root()
    with _lock(p):
        return _down_locked(p, log)


def reset(p: Paths | None = None, log=_log_default) -> Info:
    """Back to the pristine state: restart the target on an empty upper layer (the persist mount stays)."""
    p = p or Paths.default()
    require_root()
    with _lock(p):
        st = _state(p)
        if not st or not running(p):
            _wipe_upper(p)
            log("sandbox: reset (not running): upper layer dropped")
            return None
        _close_master(p)
        _kill(st["pids"]["target"])
        for pid in _netns_pids():
            _kill(pid)
        _wipe_upper(p)
        st["pids"]["target"] = _start_target(p)
        p.state.write_text(json.dumps(st, indent=2))
        return _info_from_state(p, st)


def _wipe_upper(p: Paths) -> None:
    for d in (p.upper, p.work):
        if d.exists():
            _run(["rm", "-rf", "--one-file-system", d])


def status(p: Paths | None = None) -> dict:
    p = p or Paths.default()
    st = _state(p)
    return {
        "cache": str(p.root),
        "base": rootfs.is_current(p.base, rootfs.base_hash()),
        "pristine": p.pristine.is_dir(),
        "repos": p.repos.is_dir(),
        "git": (p.git / gitmirror.NAME).is_dir(),
        "netns": netns_exists(),
        "running": running(p) if os.geteuid() == 0 else None,
        "pids": st.get("pids") or {},
        "ssh_config": str(p.ssh_config) if p.ssh_config.exists() else None,
        "hf_endpoint": st.get("hf_endpoint"),
        "git_url": st.get("git_url"), "git_sha": st.get("git_sha"),
        "overrides": str(p.overrides) if p.overrides.exists() else None,
    }
