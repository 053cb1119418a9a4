"""Bring the sandbox up and down: network namespace, overlay root, systemd booted by systemd-nspawn, the HF server.

`up` (root only):
  1. builds what the cache lacks (base rootfs, fixture repos, pristine layer, git mirror, HF content);
  2. creates network namespace `gpubox` with a veth pair (host gpubox0 10.200.0.1/24, target eth0
     10.200.0.2/24): names and addresses come from paths.TARGET;
  3. makes the sandbox's own cgroup in every cgroup hierarchy and starts
     `unshare --mount --propagation private bash nspawn.sh` (testbed/templates/etc/nspawn.sh.j2): it joins
     that cgroup, mounts overlay(lower = pristine:base, upper = instance/upper) in its private mount
     namespace and execs `systemd-nspawn --boot` on it, in the network namespace, with hostname `gpubox`,
     the repos, the git mirror and the persistent cache bound in. systemd is PID 1 of the container; sshd
     is its ssh.service. `up` returns once sshd answers and `systemctl is-system-running` says running;
  4. starts `python -m testbed.hfserver` on 10.200.0.1 (reachable from the target and the host);
  5. writes the ssh config, the config overrides (invoke.yaml) and state.json (PIDs).
Running it again while up only checks that everything answers.

`down` sends SIGTERM to systemd-nspawn (the container's systemd powers off: units stop, mounts go), kills
what is still in the sandbox's cgroup or network namespace after a grace period, stops the HF server,
closes the ssh ControlMaster, deletes the veth pair, the namespace, the cgroups and what nspawn leaves
under /run/systemd/nspawn. Nothing is mounted on the host. `leftovers()` lists whatever of that remains.
`reset` powers the target off, drops its upper layer and boots it again (the persistent cache stays).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from . import fixtures, gitmirror, rootfs
from .paths import (GIT_MOUNT, HF_PORT, MAX_FLEET, PERSIST_MOUNT, REPO_MOUNT, REPO_ROOT, TARGET, Paths, Target,
                    fleet_targets)

T = TARGET
ADDRESS, HOST_ADDRESS, NETNS = T.address, T.host_address, T.netns
CGROUP_FS = Path("/sys/fs/cgroup")
NSPAWN_RUN = Path("/run/systemd/nspawn")
BOOT_TIMEOUT = 60        # seconds for sshd to answer and systemd to reach `running`
STOP_TIMEOUT = 15        # seconds for the container's systemd to power off before what is left is killed

CUDA_REPO_BASEURL = f"file://{REPO_MOUNT}/cuda"
# The Hugging Face repositories the sandbox serves under the configured models' names: the mini Gemma 4 twin
# pair written by testbed.gemma4 (a `gemma4` MoE target, so --n-cpu-moe has experts to move, and its
# `gemma4-assistant` MTP head; `rigged`: the head always agrees with the target, so drafting is accepted).
HF_MODELS = {
    "model": {"repo": "unsloth/gemma-4-26B-A4B-it-GGUF", "filename": "gemma-4-26B-A4B-it-Q4_K_M.gguf"},
    "assistant": {"repo": "AtomicChat/gemma-4-26B-A4B-it-assistant-GGUF",
                  "filename": "gemma-4-26B-A4B-it-assistant.Q4_K_M.gguf"},
}
HF_TWIN = {"preset": "mini", "head": "mtp", "variant": "rigged"}
HF_CONTENT_VERSION = 2

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


def netns_exists(t: Target = T) -> bool:
    return Path(f"/run/netns/{t.netns}").exists()


# --- build ------------------------------------------------------------------------------------------

def ensure_hf_content(p: Paths, log=_log_default) -> None:
    stamp = p.hf / ".content"
    want = json.dumps({"v": HF_CONTENT_VERSION, "models": HF_MODELS, "twin": HF_TWIN}, sort_keys=True)
    if stamp.exists() and stamp.read_text() == want:
        return
    try:
        from testbed import gemma4
    except ImportError as e:
        raise SandboxError(f"testbed.gemma4 is missing ({e}); the sandbox's HF server has nothing to serve") from e
    tmp = p.hf / ".twin"
    target, head = gemma4.write_pair(tmp, **HF_TWIN)
    for key, written in (("model", target), ("assistant", head)):
        m = HF_MODELS[key]
        path = p.hf / m["repo"] / m["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(written, path)
    stamp.write_text(want)
    log(f"sandbox: wrote the mini Gemma 4 twin pair ({HF_TWIN['variant']} head) for "
        f"{', '.join(m['repo'] for m in HF_MODELS.values())} into {p.hf}")


def ensure_built(p: Paths | None = None, log=_log_default) -> dict:
    """Build what the cache lacks or what changed; returns {what: built?}. A running sandbox is stopped
    (and its upper layer dropped: it was made over the old layers) before a cached layer is replaced."""
    p = p or Paths.default()
    require_root()
    with _lock(p):
        return _ensure_built(p, log)


def _ensure_built(p: Paths, log) -> dict:

    def before_replace():
        # Only this cache's own sandbox (state.json): another cache's sandbox may hold the namespace.
        if _state(p) or _fleet_state(p):
            log("sandbox: the recipe changed: stopping the running sandbox before rebuilding")
            _down_locked(p, log)
        _wipe_upper(p)
        for t in _fleet_dirs(p):
            _wipe_upper(p, t)

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

def _write_ssh_config(p: Paths, fleet: list[Target] | None = None) -> None:
    """One ssh config for every host of this sandbox: `gpubox`, and gpubox1..N while a fleet is up
    (fleet=None: the hosts fleet.json lists)."""
    p.ssh.mkdir(parents=True, exist_ok=True)
    if fleet is None:
        fleet = _fleet_targets_of(_fleet_state(p))
    # One block per host from the one-host template (the templates are part of the root's recipe hash:
    # a change there would rebuild the shared pristine layer).
    text = "\n".join(fixtures.render("etc/ssh_config.j2", path=p.ssh_config, name=t.name, address=t.address,
                                      identity=p.key, control_path=p.ssh / "cm-%C") for t in [T, *fleet])
    tmp = p.ssh_config.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, p.ssh_config)


def _overrides(sha: str, url: str, ssh_config: Path) -> dict:
    # ssh_config_path: Fabric loads it (as `fab -S` does) and `verify` hands it to testinfra.
    return {"ssh_config_path": str(ssh_config), "gpubox": {
        "cuda": {"repo_baseurl": CUDA_REPO_BASEURL, "repo_gpgcheck": False},
        "build": {"repo_url": url, "sha": sha, "cuda": False, "profile": "sandbox",
                  "profiles": {"sandbox": {"sha": sha, "dialect": "upstream", "assistant_arch": "gemma4-assistant"}},
                  "ccache_dir": f"{PERSIST_MOUNT}/ccache"},
        # Upstream llama.cpp (CPU-only; no turbo KV types, no --mtp-head) serving the mini Gemma 4 pair with the
        # MTP head for real: --spec-draft-model + --spec-type draft-mtp (the defaults' spec_type mtp, as upstream
        # spells it). The head's embedding needs no -otd on this format (docs/serve-mtp.md).
        "serve": {"ctx_size": 4096, "cache_type_k": "f16", "cache_type_v": "f16", "cache_type_k_draft": "f16",
                  "cache_type_v_draft": "f16", "draft_model": "assistant", "spec_type": "mtp",
                  "override_tensor_draft": [], "flash_attn": "auto", "mlock": False, "ready_timeout": 120},
    }}


def _netns_up(t: Target = T, hf_address: str | None = None) -> None:
    """The target's network namespace and veth pair. `hf_address`: a host-side address on another veth (the
    fleet's HF server) the target reaches through its own gateway: the host delivers a packet for any of its
    own addresses locally, so no forwarding between namespaces is turned on."""
    if not netns_exists(t):
        _run(["ip", "netns", "add", t.netns])
    if _run(["ip", "link", "show", t.host_if], check=False).returncode != 0:
        _run(["ip", "link", "add", t.host_if, "type", "veth", "peer", "name", "eth0", "netns", t.netns])
        _run(["ip", "addr", "add", f"{t.host_address}/{t.prefix}", "dev", t.host_if])
        _run(["ip", "-n", t.netns, "addr", "add", f"{t.address}/{t.prefix}", "dev", "eth0"])
    _run(["ip", "link", "set", t.host_if, "up"])
    _run(["ip", "-n", t.netns, "link", "set", "eth0", "up"])
    _run(["ip", "-n", t.netns, "link", "set", "lo", "up"])
    if hf_address and hf_address != t.host_address:
        _run(["ip", "-n", t.netns, "route", "replace", f"{hf_address}/32", "via", t.host_address, "dev", "eth0"])


# --- cgroups: nspawn runs in one of its own, in every hierarchy this machine mounts -------------------

def cgroup_roots() -> list[Path]:
    """The hierarchies a process's cgroup must be set in: on a hybrid host (cgroup v1 with a `name=systemd`
    tree plus cgroup2 at /sys/fs/cgroup/unified, as here) both; on a cgroup2-only host /sys/fs/cgroup."""
    if (CGROUP_FS / "unified" / "cgroup.procs").exists():
        return [r for r in (CGROUP_FS / "systemd", CGROUP_FS / "unified") if (r / "cgroup.procs").exists()]
    if (CGROUP_FS / "cgroup.controllers").exists():
        return [CGROUP_FS]
    raise SandboxError("no cgroup2 hierarchy on this machine (neither /sys/fs/cgroup/unified nor a cgroup2 "
                       "/sys/fs/cgroup): the sandbox's systemd refuses cgroup v1; fix: boot the host with cgroup2 "
                       "(systemd.unified_cgroup_hierarchy=1) or mount one")


def cgroups(t: Target = T) -> list[Path]:
    return [r / t.cgroup for r in cgroup_roots()]


def _cgroup_pids(cg: Path) -> list[int]:
    pids: list[int] = []
    if not cg.is_dir():
        return pids
    for procs in cg.rglob("cgroup.procs"):
        with contextlib.suppress(OSError):
            pids += [int(x) for x in procs.read_text().split()]
    return pids


def _rm_cgroup(cg: Path) -> bool:
    """rmdir the cgroup and its children, deepest first (a cgroup with processes cannot go). True if gone."""
    if not cg.is_dir():
        return True
    for d in sorted((x for x in cg.rglob("*") if x.is_dir()), key=lambda x: len(x.parts), reverse=True):
        with contextlib.suppress(OSError):
            d.rmdir()
    with contextlib.suppress(OSError):
        cg.rmdir()
    return not cg.is_dir()


def _nspawn_leftovers(names: list[str] | None = None) -> list[Path]:
    """What systemd-nspawn leaves under /run/systemd/nspawn once the containers are gone: the propagation
    directory of each of the named machines (`machinectl bind`; default: `gpubox`), image lock files no process
    holds (_stale_lock), and the directories locks/ and propagate/ (and nspawn/) themselves when that empties
    them, i.e. when no other container on this machine uses them."""
    out = []
    props = [NSPAWN_RUN / "propagate" / n for n in (names or [T.name])]
    out += [x for x in props if x.exists()]
    locks = NSPAWN_RUN / "locks"
    if locks.is_dir():
        out += [x for x in sorted(locks.iterdir()) if _stale_lock(x)]
    for d in (locks, NSPAWN_RUN / "propagate"):
        if d.is_dir() and not [x for x in d.iterdir() if x not in props and x not in out]:
            out.append(d)
    if NSPAWN_RUN.is_dir() and not [x for x in NSPAWN_RUN.iterdir() if x not in out]:
        out.append(NSPAWN_RUN)
    return out


def _stale_lock(path: Path) -> bool:
    """An image lock file of nspawn (locks/inode-<dev>:<ino>) that no process holds: left by an nspawn that was
    killed (a normal exit removes it). nspawn may hold it as a BSD flock or an open-file-description lock,
    which do not conflict with each other on Linux: a file is stale only when both can be taken."""
    if not path.is_file() or not path.name.startswith("inode-"):
        return False
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)          # closing drops whatever this probe took


# --- the target: systemd under systemd-nspawn ------------------------------------------------------

def _ppid_and_nspid(pid: int) -> tuple[int, list[str]]:
    with open(f"/proc/{pid}/status") as fh:
        ppid, nspid = -1, []
        for line in fh:
            if line.startswith("PPid:"):
                ppid = int(line.split()[1])
            elif line.startswith("NSpid:"):
                nspid = line.split()[1:]
        return ppid, nspid


def container_init(nspawn_pid: int) -> int | None:
    """The host PID of the container's PID 1 (systemd): nspawn's child whose PID in its own namespace is 1."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError):
            ppid, nspid = _ppid_and_nspid(int(d.name))
            if ppid == nspawn_pid and len(nspid) > 1 and nspid[-1] == "1":
                return int(d.name)
    return None


def nsenter(init_pid: int, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run a command inside the target (all of its namespaces), e.g. systemctl, without ssh."""
    return subprocess.run(["nsenter", "-t", str(init_pid), "-m", "-u", "-i", "-n", "-p", "-C", "--", *argv],
                          capture_output=True, text=True, timeout=timeout)


def _target_log_tail(p: Paths, t: Target = T) -> str:
    with contextlib.suppress(FileNotFoundError):
        return p.instance(t).log.read_text(errors="replace")[-1500:]
    return ""


def _prepare_upper(p: Paths, t: Target = T) -> None:
    """Per-host files written into the upper layer before boot: hostname and machine id (derived from the
    name: stable across resets, distinct per host; systemd would otherwise treat every boot as a first boot)."""
    inst = p.instance(t)
    for d in (inst.upper, inst.work, inst.merged):
        d.mkdir(parents=True, exist_ok=True)
    etc = inst.upper / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "hostname").write_text(t.name + "\n")
    (etc / "machine-id").write_text(hashlib.md5(f"gpubox-sandbox:{t.name}".encode()).hexdigest() + "\n")


def _start_target(p: Paths, log=_log_default, t: Target = T) -> tuple[int, int]:
    """Boot the target; returns (pid of systemd-nspawn, host pid of the container's systemd)."""
    return _await_target(p, _spawn_target(p, t), t)


def _spawn_target(p: Paths, t: Target = T) -> subprocess.Popen:
    """Start the target's systemd-nspawn (its own cgroup, overlay upper layer and network namespace)."""
    if not shutil.which("systemd-nspawn"):
        raise SandboxError("systemd-nspawn is not installed; fix: apt-get install --no-install-recommends "
                           "systemd-container (scripts/setup does)")
    _prepare_upper(p, t)
    inst = p.instance(t)
    cgs = cgroups(t)
    for cg in cgs:
        if _cgroup_pids(cg):
            raise SandboxError(f"cgroup {cg} still has processes (an earlier sandbox?); fix: invoke sandbox.down")
        _rm_cgroup(cg)
        cg.mkdir(parents=True, exist_ok=True)
    script = fixtures.render("etc/nspawn.sh.j2", name=t.name, netns=t.netns, cgroups=[str(c) for c in cgs],
                             merged=inst.merged, lower=f"{p.pristine}:{p.base}", upper=inst.upper, work=inst.work,
                             repos=p.repos, repo_mount=REPO_MOUNT, git=p.git, git_mount=GIT_MOUNT,
                             persist=p.persist, persist_mount=PERSIST_MOUNT)
    inst.start.write_text(script)
    logf = open(inst.log, "ab")
    proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", str(inst.start)],
                            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    logf.close()
    _CHILDREN[proc.pid] = proc
    return proc


def _await_target(p: Paths, proc: subprocess.Popen, t: Target = T) -> tuple[int, int]:
    """Wait for a spawned target: sshd answers and systemd says running; (nspawn pid, container systemd pid)."""
    try:
        _wait_port(t.address, 22, BOOT_TIMEOUT, proc.pid, f"{t.name}'s sshd (ssh.service)")
        init = container_init(proc.pid)
        if init is None:
            raise SandboxError("systemd-nspawn runs but its container has no PID 1")
        r = nsenter(init, "systemctl", "is-system-running", "--wait", timeout=BOOT_TIMEOUT)
        state = r.stdout.strip()
        if state != "running":
            failed = nsenter(init, "systemctl", "--failed", "--no-legend", "--plain").stdout.strip()
            raise SandboxError(f"{t.name}'s systemd is {state or r.stderr.strip()!r}, not running; failed units:\n"
                               f"{failed or '(none listed)'}\nfix: read `journalctl -b` in the target "
                               f"(ssh -F {p.ssh_config} {t.name} journalctl -b)")
    except (SandboxError, subprocess.TimeoutExpired) as e:
        _stop_target(proc.pid, log=lambda m: None, t=t)
        raise SandboxError(f"{e}; target log ({p.instance(t).log}):\n{_target_log_tail(p, t)}") from None
    return proc.pid, init


def _stop_target(nspawn_pid: int | None, log=_log_default, t: Target = T) -> list[str]:
    """Power the target off (SIGTERM to nspawn: the container's systemd shuts down), then kill whatever is
    still in its cgroup, and remove the cgroups and nspawn's leftovers."""
    done = []
    if nspawn_pid and _alive(nspawn_pid):
        t0 = time.monotonic()
        _kill(nspawn_pid, signal.SIGTERM, wait=STOP_TIMEOUT)
        if _alive(nspawn_pid):
            _kill(nspawn_pid, signal.SIGKILL)
            done.append(f"killed the target (pid {nspawn_pid}): it did not stop within {STOP_TIMEOUT}s of SIGTERM")
        else:
            done.append(f"powered off the target (systemd-nspawn pid {nspawn_pid}) in {time.monotonic() - t0:.1f}s")
    roots = cgroup_roots() if CGROUP_FS.is_dir() else []
    for cg in (r / t.cgroup for r in roots):
        for _ in range(50):
            pids = _cgroup_pids(cg)
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)
        for pid in _cgroup_pids(cg):
            _kill(pid)
        if cg.exists():
            if _rm_cgroup(cg):
                done.append(f"removed cgroup {cg}")
            else:
                done.append(f"could not remove cgroup {cg} (processes: {_cgroup_pids(cg)})")
    for path in _nspawn_leftovers([t.name]):   # deepest first: the machine's directory, stale locks, locks/, ...
        with contextlib.suppress(OSError):
            path.unlink() if path.is_file() else path.rmdir()
    return done


def _start_hf(p: Paths, address: str = T.host_address, name: str = "hfserver") -> int | None:
    if not (REPO_ROOT / "testbed" / "hfserver.py").exists():
        return None
    logf = open(p.logs / f"{name}.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "testbed.hfserver", "--root", str(p.hf), "--host", address,
                             "--port", str(HF_PORT), "--log", str(p.logs / "hf-requests.jsonl")],
                            cwd=str(REPO_ROOT), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                            start_new_session=True)
    logf.close()
    _CHILDREN[proc.pid] = proc
    _wait_port(address, HF_PORT, 10, proc.pid, "the local Hugging Face server")
    return proc.pid


def _kill(pid: int, sig=signal.SIGKILL, wait: float = 5.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    proc = _CHILDREN.pop(pid, None)
    if proc is not None:
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            _CHILDREN[pid] = proc        # still running: keep it to reap later
        return
    end = time.monotonic() + wait
    while _alive(pid) and time.monotonic() < end:
        time.sleep(0.01)


def _netns_pids(t: Target = T) -> list[int]:
    if not netns_exists(t):
        return []
    r = _run(["ip", "netns", "pids", t.netns], check=False)
    return [int(x) for x in r.stdout.split() if x.isdigit()]


def _close_master(p: Paths, t: Target = T) -> None:
    if p.ssh_config.exists():
        subprocess.run(["ssh", "-F", str(p.ssh_config), "-O", "exit", t.name], capture_output=True, timeout=10)


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


def _in_netns(pid: int, t: Target = T) -> bool:
    """Is the process in the target's network namespace (not another one of the same name's past)?"""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{t.netns}").st_ino
    except OSError:
        return False


def _target_up(pids: dict, t: Target = T) -> bool:
    """One target is up: its nspawn alive with the namespace there, its systemd alive in that namespace (not
    another one of the same name's past), sshd answering."""
    return bool(pids.get("target") and _alive(pids["target"]) and netns_exists(t)
                and pids.get("init") and _alive(pids["init"]) and _in_netns(pids["init"], t)
                and _port_open(t.address, 22))


def running(p: Paths | None = None) -> bool:
    """True when state.json's target (nspawn, and its systemd in the sandbox's network namespace) and HF server
    are alive and sshd answers."""
    p = p or Paths.default()
    pids = _state(p).get("pids") or {}
    if pids.get("hfserver") and not _alive(pids["hfserver"]):
        return False
    return _target_up(pids)


def up(p: Paths | None = None, log=_log_default) -> Info:
    p = p or Paths.default()
    require_root()
    with _lock(p):
        _ensure_built(p, log)
        if running(p):
            inf = info(p)
            # The overrides are this tree's (another checkout may have started the sandbox with its own).
            p.overrides.write_text(yaml.safe_dump(_overrides(inf.git_sha, inf.git_url, p.ssh_config), sort_keys=False))
            return inf
        _down_single_locked(p, log=lambda m: None)
        _netns_up()
        _write_ssh_config(p)
        try:
            target, init = _start_target(p, log)
            hf = _start_hf(p)
        except SandboxError:
            _down_single_locked(p, log=lambda m: None)
            raise
        url, sha = gitmirror.ensure(p, log)
        p.overrides.write_text(yaml.safe_dump(_overrides(sha, url, p.ssh_config), sort_keys=False))
        hf_url = f"http://{T.host_address}:{HF_PORT}" if hf else ""
        inf = Info(ssh_config=str(p.ssh_config), host=T.name, address=T.address, hf_endpoint=hf_url,
                   hf_endpoint_host=hf_url, git_url=url, git_sha=sha, cuda_repo_baseurl=CUDA_REPO_BASEURL,
                   overrides_file=str(p.overrides), persist_mount=PERSIST_MOUNT,
                   fab_command=f"HF_ENDPOINT={hf_url} fab -S {p.ssh_config} -H {T.name} -f {p.overrides} provision",
                   pids={"target": target, "init": init, "hfserver": hf})
        p.state.write_text(json.dumps(asdict(inf), indent=2))
        return inf


def _down_single_locked(p: Paths, log=_log_default) -> list[str]:
    """Stop the single host `gpubox` and its HF server (a fleet of this cache stays up)."""
    done = []
    st = _state(p)
    pids = st.get("pids") or {}
    _close_master(p)
    done += _stop_target(pids.get("target"), log)
    hf = pids.get("hfserver")
    if hf and _alive(hf):
        _kill(hf)
        done.append(f"stopped hfserver (pid {hf})")
    done += _netns_down(T)
    _reap_children()
    p.state.unlink(missing_ok=True)
    if not _fleet_state(p):
        _remove_control_sockets(p)
    for line in done:
        log("sandbox: " + line)
    return done


def _reap_children() -> None:
    """Collect this process's exited children (Popen objects up() keeps) so none stays a zombie."""
    for pid in list(_CHILDREN):
        if not _alive(pid):
            _kill(pid)


def _remove_control_sockets(p: Paths) -> None:
    """ssh's ControlMaster sockets (ssh/cm-*): only once neither the host nor a fleet uses the ssh config."""
    for d in p.ssh.glob("cm-*") if p.ssh.exists() else ():
        d.unlink(missing_ok=True)


def _netns_down(t: Target) -> list[str]:
    done = []
    for pid in _netns_pids(t):    # anything else still in the namespace (left by an earlier crash)
        _kill(pid)
        done.append(f"killed pid {pid} left in netns {t.netns}")
    if _run(["ip", "link", "show", t.host_if], check=False).returncode == 0:
        _run(["ip", "link", "del", t.host_if], check=False)
    if netns_exists(t):
        _run(["ip", "netns", "del", t.netns])
        done.append(f"removed netns {t.netns}")
    return done


def _down_locked(p: Paths, log=_log_default) -> list[str]:
    return _down_fleet_locked(p, log) + _down_single_locked(p, log)


def down(p: Paths | None = None, log=_log_default) -> list[str]:
    """Stop everything `up` and `up --hosts N` started; harmless when nothing is up. Leaves the cache."""
    p = p or Paths.default()
    require_root()
    with _lock(p):
        return _down_locked(p, log)


def reset(p: Paths | None = None, log=_log_default) -> Info:
    """Back to the pristine state: power the target off, drop its upper layer, boot it again (the persist
    mount stays)."""
    p = p or Paths.default()
    require_root()
    with _lock(p):
        st = _state(p)
        if not st or not running(p):
            _wipe_upper(p)
            log("sandbox: reset (not running): upper layer dropped")
            return None
        _close_master(p)
        _stop_target(st["pids"]["target"], log)
        for pid in _netns_pids():
            _kill(pid)
        _wipe_upper(p)
        try:
            st["pids"]["target"], st["pids"]["init"] = _start_target(p, log)
        except SandboxError:
            _down_single_locked(p, log=lambda m: None)
            raise
        p.state.write_text(json.dumps(st, indent=2))
        return _info_from_state(p, st)


# --- a fleet: gpubox1 ... gpubox<N>, each its own target, sharing the layers, repos, mirror and HF content ---

@dataclass
class FleetInfo:
    ssh_config: str
    hosts: list[str]
    addresses: dict
    hf_endpoint: str            # the fleet's HF server, on gpubox1's host side; every host has a route to it
    git_url: str
    git_sha: str
    cuda_repo_baseurl: str
    overrides_file: str
    fab_command: str
    pids: dict = field(default_factory=dict)    # host -> {"target": nspawn pid, "init": systemd pid}
    hfserver: int | None = None

    def overrides(self) -> dict:
        return yaml.safe_load(Path(self.overrides_file).read_text())

    def gpubox_config(self, report_dir: str | Path) -> dict:
        return Info.gpubox_config(self, report_dir)     # the same overrides as the single host's


def _fleet_state(p: Paths) -> dict:
    try:
        return json.loads(p.fleet_state.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _fleet_targets_of(st: dict) -> list[Target]:
    return fleet_targets(len(st.get("hosts") or []))


def _fleet_dirs(p: Paths) -> list[Target]:
    """Every fleet host this cache has a writable layer for (instances/gpubox<k>)."""
    d = p.root / "instances"
    ks = sorted(int(x.name[6:]) for x in d.iterdir() if x.name[6:].isdigit()) if d.is_dir() else []
    return [fleet_targets(k)[-1] for k in ks if 1 <= k <= MAX_FLEET]


def fleet_info(p: Paths | None = None) -> FleetInfo | None:
    p = p or Paths.default()
    st = _fleet_state(p)
    return FleetInfo(**{k: st[k] for k in FleetInfo.__dataclass_fields__}) if st.get("hosts") else None


def fleet_running(p: Paths | None = None) -> bool:
    """Every host of fleet.json is up (nspawn and its systemd alive in the host's namespace, sshd answers) and
    the fleet's HF server lives."""
    p = p or Paths.default()
    st = _fleet_state(p)
    if not st.get("hosts"):
        return False
    if st.get("hfserver") and not _alive(st["hfserver"]):
        return False
    return all(_target_up((st.get("pids") or {}).get(t.name) or {}, t) for t in _fleet_targets_of(st))


def up_fleet(n: int, p: Paths | None = None, log=_log_default) -> FleetInfo:
    """Hosts gpubox1..gpubox<n>, booted together: each its own namespace, veth, cgroup, overlay upper layer
    (instances/<name>) and nspawn machine; one ssh config names them all (and `gpubox`). Running again with
    the same n while they are up only checks them; another n replaces the fleet."""
    p = p or Paths.default()
    require_root()
    if not 1 <= n <= MAX_FLEET:
        raise SandboxError(f"--hosts {n}: the sandbox makes 1 to {MAX_FLEET} hosts")
    with _lock(p):
        _ensure_built(p, log)
        st = _fleet_state(p)
        if len(st.get("hosts") or []) == n and fleet_running(p):
            inf = fleet_info(p)
            p.overrides.write_text(yaml.safe_dump(_overrides(inf.git_sha, inf.git_url, p.ssh_config), sort_keys=False))
            return inf
        _down_fleet_locked(p, log=lambda m: None)
        ts = fleet_targets(n)
        hf_addr = ts[0].host_address
        for t in ts:
            _netns_up(t, hf_address=hf_addr)
        _write_ssh_config(p, ts)
        # fleet.json first: a failure from here on leaves what `down` needs to find
        state = {"hosts": [t.name for t in ts], "pids": {}, "hfserver": None}
        p.fleet_state.write_text(json.dumps(state))
        try:
            _boot_together(p, ts, state["pids"], saved=lambda: p.fleet_state.write_text(json.dumps(state)))
            state["hfserver"] = _start_hf(p, hf_addr, name="hfserver-fleet")
        except SandboxError:
            p.fleet_state.write_text(json.dumps(state))
            _down_fleet_locked(p, log=lambda m: None)
            raise
        url, sha = gitmirror.ensure(p, log)
        p.overrides.write_text(yaml.safe_dump(_overrides(sha, url, p.ssh_config), sort_keys=False))
        hf_url = f"http://{hf_addr}:{HF_PORT}" if state["hfserver"] else ""
        hosts = ",".join(state["hosts"])
        inf = FleetInfo(ssh_config=str(p.ssh_config), hosts=state["hosts"], addresses={t.name: t.address for t in ts},
                        hf_endpoint=hf_url, git_url=url, git_sha=sha, cuda_repo_baseurl=CUDA_REPO_BASEURL,
                        overrides_file=str(p.overrides),
                        fab_command=f"HF_ENDPOINT={hf_url} fab -S {p.ssh_config} -f {p.overrides} fleet --hosts {hosts}",
                        pids=state["pids"], hfserver=state["hfserver"])
        p.fleet_state.write_text(json.dumps(asdict(inf), indent=2))
        return inf


def _boot_together(p: Paths, ts: list[Target], pids: dict, saved: Callable[[], Any] | None = None) -> None:
    """Start every target's nspawn at once, then wait for each to boot: pids[name] = {"target", "init"}.
    The nspawn pids are in `pids` (and `saved()` is called) before the first wait, so a boot that fails
    leaves what `down` needs to find."""
    procs = [(t, _spawn_target(p, t)) for t in ts]
    for t, proc in procs:
        pids[t.name] = {"target": proc.pid, "init": None}
    if saved is not None:
        saved()
    for t, proc in procs:
        target, init = _await_target(p, proc, t)
        pids[t.name] = {"target": target, "init": init}


def _stray_fleet_targets() -> list[Target]:
    """Fleet hosts whose namespace, veth or cgroup exists on this machine (fleet.json or not: an earlier crash)."""
    roots = cgroup_roots() if CGROUP_FS.is_dir() else []
    return [t for t in fleet_targets(MAX_FLEET)
            if netns_exists(t) or Path("/sys/class/net", t.host_if).exists() or any((r / t.cgroup).exists() for r in roots)]


def _down_fleet_locked(p: Paths, log=_log_default) -> list[str]:
    st = _fleet_state(p)
    ts = _fleet_targets_of(st)
    ts += [t for t in _stray_fleet_targets() if t not in ts]
    done = []
    for t in ts:
        _close_master(p, t)
    for t in ts:   # SIGTERM to every nspawn first: the containers power off together
        pid = ((st.get("pids") or {}).get(t.name) or {}).get("target")
        if pid and _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    for t in ts:
        done += _stop_target(((st.get("pids") or {}).get(t.name) or {}).get("target"), log, t)
        done += _netns_down(t)
    hf = st.get("hfserver")
    if hf and _alive(hf):
        _kill(hf)
        done.append(f"stopped the fleet's hfserver (pid {hf})")
    _reap_children()
    if st:
        p.fleet_state.unlink(missing_ok=True)
        _write_ssh_config(p, [])
        if not _state(p):
            _remove_control_sockets(p)
    for line in done:
        log("sandbox: " + line)
    return done


def down_fleet(p: Paths | None = None, log=_log_default) -> list[str]:
    """Stop the fleet's hosts and its HF server (the single host `gpubox`, if up, stays)."""
    p = p or Paths.default()
    require_root()
    with _lock(p):
        return _down_fleet_locked(p, log)


def reset_fleet(p: Paths | None = None, log=_log_default) -> FleetInfo | None:
    """Every fleet host back to pristine: all power off, their upper layers go, all boot again together."""
    p = p or Paths.default()
    require_root()
    with _lock(p):
        st = _fleet_state(p)
        if not st.get("hosts") or not fleet_running(p):
            for t in _fleet_dirs(p):
                _wipe_upper(p, t)
            return None
        ts = _fleet_targets_of(st)
        for t in ts:
            _close_master(p, t)
            with contextlib.suppress(ProcessLookupError):
                os.kill(st["pids"][t.name]["target"], signal.SIGTERM)
        for t in ts:
            _stop_target(st["pids"][t.name]["target"], log, t)
            for pid in _netns_pids(t):
                _kill(pid)
            _wipe_upper(p, t)
        try:
            _boot_together(p, ts, st["pids"])
        except SandboxError:
            p.fleet_state.write_text(json.dumps(st, indent=2))
            _down_fleet_locked(p, log=lambda m: None)
            raise
        p.fleet_state.write_text(json.dumps(st, indent=2))
        return fleet_info(p)


def _wipe_upper(p: Paths, t: Target = T) -> None:
    inst = p.instance(t)
    for d in (inst.upper, inst.work):
        if d.exists():
            _run(["rm", "-rf", "--one-file-system", d])


def leftovers(p: Paths | None = None) -> list[str]:
    """What of a sandbox is still on this machine: processes in its cgroups or network namespaces, mounts of
    its cache or namespaces, its cgroups, veths, namespaces, nspawn's run-time files; for `gpubox` and every
    possible fleet host gpubox1..gpubox{MAX_FLEET}. [] after `down`."""
    p = p or Paths.default()
    left = []
    ts = [T, *fleet_targets(MAX_FLEET)]
    roots = cgroup_roots() if CGROUP_FS.is_dir() else []
    for t in ts:
        for cg in (r / t.cgroup for r in roots):
            if cg.exists():
                left.append(f"cgroup {cg}" + (f" (pids {_cgroup_pids(cg)})" if _cgroup_pids(cg) else ""))
        left += [f"pid {pid} in netns {t.netns}" for pid in _netns_pids(t)]
        if netns_exists(t):
            left.append(f"netns {t.netns}")
        if Path("/sys/class/net", t.host_if).exists():
            left.append(f"veth {t.host_if}")
    netns_paths = {f"/run/netns/{t.netns}" for t in ts}
    with open("/proc/self/mountinfo") as fh:
        left += [f"mount {l.split()[4]}" for l in fh if str(p.root) in l or l.split()[4] in netns_paths]
    left += [f"nspawn leftover {x}" for x in _nspawn_leftovers([t.name for t in ts])]
    for pid in (_state(p).get("pids") or {}).values():
        if pid and _alive(pid):
            left.append(f"pid {pid} of state.json still running")
    fst = _fleet_state(p)
    for name, pids in (fst.get("pids") or {}).items():
        for what, pid in (pids or {}).items():
            if pid and _alive(pid):
                left.append(f"{name} {what} pid {pid} of fleet.json still running")
    if fst.get("hfserver") and _alive(fst["hfserver"]):
        left.append(f"fleet hfserver pid {fst['hfserver']} still running")
    return left


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
        "cgroups": [str(c) for c in cgroups() if c.exists()] if CGROUP_FS.is_dir() else [],
        "ssh_config": str(p.ssh_config) if p.ssh_config.exists() else None,
        "hf_endpoint": st.get("hf_endpoint"),
        "git_url": st.get("git_url"), "git_sha": st.get("git_sha"),
        "overrides": str(p.overrides) if p.overrides.exists() else None,
        "fleet": {"hosts": _fleet_state(p).get("hosts") or [],
                  "running": fleet_running(p) if os.geteuid() == 0 else None,
                  "pids": _fleet_state(p).get("pids") or {}},
    }
