"""Install and control llama-server: a systemd unit where the host has systemd, else a supervised process.

Files (all from templates/, under <state_dir>/serve/ unless said):

    llama-server.sh             launch script: sources the env file, raises the memlock limit, writes a start
                                marker, then `exec`s the rendered command (so its pid IS the server)
    llama-server.env            LD_LIBRARY_PATH (build dir, CUDA lib64)
    /etc/systemd/system/llama-server.service   (systemd hosts) Restart=on-failure, LimitMEMLOCK=infinity and,
                                with --mlock, AmbientCapabilities=CAP_IPC_LOCK; output to the journal
    llama-server.log            (no systemd) stdout+stderr of every start, appended by the supervisor
    llama-server-supervise.sh   (no systemd, e.g. the GPU machine here) a bash loop started with setsid that runs
                                the same launch script and restarts it on failure; supervisor.pid /
                                llama-server.pid name the processes

The running server is identified by pid (the unit's MainPID, or llama-server.pid) and compared with the wanted
command through /proc/PID/cmdline: same command = nothing to do; different = restart. On systemd hosts the
unit's state comes from `systemctl show` and the log of the current start from the journal
(`journalctl _SYSTEMD_INVOCATION_ID=<the unit's InvocationID>`): a restart, by gpubox or by systemd after a
crash, starts a new invocation. How --mlock is made to hold, and how it is checked: docs/systemd.md.
"""

from __future__ import annotations

import hashlib
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import rendering, resources
from ..facts import qpath
from ..host import cmd, expand_home, sh
from ..engine import StepError
from . import unitfile
from .logparse import START_MARKER

TEMPLATES = resources.TEMPLATES
UNIT_NAME = "llama-server.service"
UNIT_PATH = f"/etc/systemd/system/{UNIT_NAME}"
# What `systemctl show` is asked for (facts, `serve.status`).
UNIT_PROPS = ("ActiveState", "SubState", "Result", "MainPID", "NRestarts", "InvocationID", "UnitFileState",
              "NeedDaemonReload", "LimitMEMLOCK", "ExecMainStartTimestamp")
MLOCK_WARNING = "failed to mlock"      # llama.cpp's warning when mlock() fails (llama-mmap.cpp)


def render_template(name: str, **values: Any) -> str:
    return rendering.render(name, **values)


@dataclass
class Layout:
    dir: str
    launch: str
    env: str
    log: str
    supervise: str
    supervisor_pid: str
    server_pid: str
    unit: str = UNIT_PATH


def layout(cfg: dict, home: str = "") -> Layout:
    d = expand_home(cfg["state_dir"], home).rstrip("/") + "/serve"
    return Layout(dir=d, launch=f"{d}/llama-server.sh", env=f"{d}/llama-server.env", log=f"{d}/llama-server.log",
                  supervise=f"{d}/llama-server-supervise.sh", supervisor_pid=f"{d}/supervisor.pid",
                  server_pid=f"{d}/llama-server.pid")


def mode_of(facts: dict) -> str:
    return "systemd" if facts.get("systemd") == "yes" else "supervisor"


def run_user(cfg: dict, facts: dict) -> str:
    """The user the server runs as: serve.service_user, else gpubox.user, else the login user."""
    user = cfg["serve"].get("service_user") or cfg.get("user") or ""
    if not user and isinstance(facts.get("user"), dict):
        user = facts["user"]["name"]
    return user or "root"


def binary_path(cfg: dict, home: str = "") -> str:
    return expand_home(cfg["build"]["build_dir"], home).rstrip("/") + "/bin/llama-server"


def files(cfg: dict, facts: dict, rendered, *, model_name: str = "") -> dict[str, str]:
    """Wanted file contents by path, for this host's mode."""
    home = facts.get("home") if isinstance(facts.get("home"), str) else ""
    lay = layout(cfg, home)
    bindir = str(Path(rendered.argv[0]).parent)
    cuda_lib = (cfg["cuda"]["prefix"].rstrip("/") + "/lib64") if cfg["build"].get("cuda") else ""
    ld = ":".join(p for p in (bindir, cuda_lib) if p)
    mlock = bool(cfg["serve"].get("mlock"))
    # The env file is read by systemd (EnvironmentFile=) and by the launch script (`.`): one quoting both
    # read alike (unitfile.env_quote). The unit's values are escaped by systemd's rules (unitfile).
    out = {
        lay.env: render_template("llama-server.env.j2", ld_library_path=unitfile.env_quote(ld),
                                 cuda_lib=cuda_lib, extra_env=[]),
        lay.launch: render_template("llama-server.sh.j2", binary=rendered.argv[0], dialect=rendered.dialect,
                                    env_file=lay.env, mlock=mlock, marker=START_MARKER,
                                    command=shlex.join(rendered.argv)),
    }
    user = run_user(cfg, facts)
    if mode_of(facts) == "systemd":
        try:
            out[lay.unit] = render_template(
                "llama-server.service.j2", model_name=unitfile.text_value(model_name or "the model"), user=user,
                group=user, env_file=unitfile.path_value(lay.env), launch_script=unitfile.exec_path(lay.launch),
                mlock=mlock, unit_name=UNIT_NAME)
        except unitfile.UnitValueError as e:
            raise StepError(f"serve: cannot write the systemd unit: {e}",
                            "choose a state_dir without quotes, backslashes or control characters") from None
    else:
        # The supervisor runs as root (sudo when the login user is not root); the server drops to its user.
        prefix = ""
        if user != "root":
            prefix = cmd(["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--"]) + " "
        out[lay.supervise] = render_template("llama-server-supervise.sh.j2", log_file=lay.log,
                                             server_pid=lay.server_pid, supervisor_pid=lay.supervisor_pid,
                                             launch_script=lay.launch, run_prefix=prefix, mlock=mlock)
    return out


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# --- facts -------------------------------------------------------------------------------------------------

def fact_snippet(cfg: dict) -> str:
    """One shell snippet: file hashes, the running server's pid and argv, port state, binary, help, models.

    Prints `key<TAB>value` lines and a `@@help` block at the end."""
    s = cfg["serve"]
    b = cfg["build"]["build_dir"].rstrip("/")
    port_host = "127.0.0.1" if s["host"] in ("0.0.0.0", "") else ("::1" if s["host"] == "::" else s["host"])
    model_files = cfg["models"]["files"]
    mdir = cfg["models"]["dir"].rstrip("/")
    paths = {"model": f"{mdir}/{model_files['model']['filename']}"}
    dm = s.get("draft_model")
    if dm:
        paths["draft"] = f"{mdir}/{model_files[dm]['filename']}"
    # The layout paths live under state_dir (absolute or ~/).
    sd = cfg["state_dir"].rstrip("/") + "/serve"
    lines = ["kv() { printf '%s\\t%s\\n' \"$1\" \"$2\"; }", "d=" + qpath(sd)]
    for key, rel in (("launch", "llama-server.sh"), ("env", "llama-server.env"), ("supervise", "llama-server-supervise.sh")):
        lines.append(f'[ -f "$d/{rel}" ] && kv file_{key} "$(sha256sum < "$d/{rel}" | cut -d" " -f1)"')
    lines.append(f"[ -f {qpath(UNIT_PATH)} ] && kv file_unit \"$(sha256sum < {qpath(UNIT_PATH)} | cut -d' ' -f1)\"")
    lines.append('kv dir "$d"')
    lines.append(f'[ -s "$d/llama-server.log" ] && kv log_size "$(wc -c < "$d/llama-server.log")"')
    # pid: the unit's MainPID on systemd hosts (with the unit's state from `systemctl show`), else the
    # supervisor's pid file.
    lines.append(
        'pid=; inv=; if [ -d /run/systemd/system ]; then '
        'while IFS== read -r k v; do [ -n "$k" ] || continue; kv "unit_$k" "$v"; '
        'case $k in MainPID) [ "$v" != 0 ] && pid=$v;; InvocationID) inv=$v;; esac; '
        'done < <(systemctl show ' + " ".join(f"-p {x}" for x in UNIT_PROPS) + ' ' + UNIT_NAME + ' 2>/dev/null); '
        'else [ -s "$d/llama-server.pid" ] && pid=$(cat "$d/llama-server.pid"); fi; '
        '[ -s "$d/supervisor.pid" ] && sp=$(cat "$d/supervisor.pid") && kill -0 "$sp" 2>/dev/null && kv supervisor_pid "$sp"; '
        'if [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ]; then kv pid "$pid"; '
        'kv cmdline "$(tr "\\0" "\\037" < "/proc/$pid/cmdline")"; '
        # --mlock: how much memory the server holds locked (smaps_rollup's Locked: resident locked pages; VmLck,
        # the size of its locked mappings, where smaps is not readable) and its memlock limit
        'l=$(awk \'/^Locked:/{print $2}\' "/proc/$pid/smaps_rollup" 2>/dev/null); '
        '[ -n "$l" ] && kv locked_kb "$l" || kv locked_kb "$(awk \'/^VmLck:/{print $2}\' "/proc/$pid/status" 2>/dev/null)"; '
        'kv memlock_limit "$(awk \'/^Max locked memory/{print $4 " " $5}\' "/proc/$pid/limits" 2>/dev/null)"; fi')
    # From the log of the current start: llama.cpp's first mlock warning, and the MiB of the models' host-side
    # buffers (what --mlock locks). The journal of the unit's invocation, or the supervisor's log after the
    # last start marker.
    scan = ("awk -v m=" + shlex.quote(START_MARKER) + " '"
            'index($0, m) {w = ""; need = 0} '
            f'index($0, "{MLOCK_WARNING}") && w == "" {{w = $0}} '
            'match($0, /(CPU|CPU_Mapped|CPU_REPACK|CUDA_Host) model buffer size = *[0-9.]+ MiB/) '
            '{s = substr($0, RSTART, RLENGTH); sub(/.*= */, "", s); sub(/ MiB/, "", s); need += s} '
            "END {printf \"%s\\t%s\\n\", need, w}'")
    lines.append(
        'mw=; if [ -n "$inv" ]; then mw=$(journalctl --no-pager -o cat _SYSTEMD_INVOCATION_ID="$inv" 2>/dev/null | '
        + scan + '); elif [ -s "$d/llama-server.log" ]; then mw=$(tail -c 4000000 "$d/llama-server.log" | ' + scan
        + '); fi; if [ -n "$mw" ]; then kv mlock_need_mib "${mw%%$\'\\t\'*}"; kv mlock_warning "${mw#*$\'\\t\'}"; fi')
    lines.append(sh("if (exec 3<>/dev/tcp/{h}/{p}) 2>/dev/null; then kv port open; else kv port closed; fi", h=port_host, p=s["port"]))
    lines.append(sh("command -v ss >/dev/null && kv port_owner \"$(ss -Hltnp \"sport = :{p}\" 2>/dev/null | head -1)\"", p=s["port"]))
    bin_ = qpath(b + "/bin/llama-server")
    lines.append(f"[ -x {bin_} ] && kv binary yes")
    su = s.get("service_user")
    if su:
        lines.append(sh("getent passwd {u} >/dev/null && kv service_user yes", u=su))
    for k, p in paths.items():
        lines.append(f"[ -r {qpath(p)} ] && kv {k}_readable yes; kv {k}_path {qpath(p)}")
    if s.get("api_key_file"):
        # mode owner size of the key file (the key itself is never read here)
        lines.append(f"[ -f {qpath(s['api_key_file'])} ] && kv api_key_stat \"$(stat -c '%a %U %s' {qpath(s['api_key_file'])})\"")
    dj = qpath(b + "/gpubox-dialect.json")
    lines.append(f"echo @@help; if [ -s {dj} ]; then cat {dj}; elif [ -x {bin_} ]; then "
                 f"LD_LIBRARY_PATH={qpath(b + '/bin')} timeout 60 {bin_} --help 2>&1; fi")
    return "\n".join(lines)


def parse_fact(out: str, rc: int) -> dict[str, Any]:
    head, _, help_text = out.partition("@@help\n")
    if not _ and out.rstrip().endswith("@@help"):
        head, help_text = out.rstrip()[:-len("@@help")], ""
    d: dict[str, Any] = {}
    for line in head.splitlines():
        k, sep, v = line.partition("\t")
        if sep:
            d[k] = v
    if "cmdline" in d:
        d["argv"] = [a for a in d["cmdline"].split("\x1f")]
        if d["argv"] and d["argv"][-1] == "":
            d["argv"].pop()
    d["help"] = help_text
    return d


# --- control -----------------------------------------------------------------------------------------------

def install(host, cfg: dict, facts: dict, wanted: dict[str, str]) -> list[str]:
    """Write every wanted file that differs; on systemd hosts daemon-reload when the unit file changed (or
    systemd says it needs one) and enable the unit. Returns the paths written."""
    home = facts.get("home") if isinstance(facts.get("home"), str) else ""
    lay = layout(cfg, home)
    sf = facts.get("serve") or {}
    have = {lay.launch: sf.get("file_launch"), lay.env: sf.get("file_env"), lay.supervise: sf.get("file_supervise"),
            lay.unit: sf.get("file_unit")}
    user = run_user(cfg, facts)
    host.run(["mkdir", "-p", lay.dir], root=True)
    written = []
    for path, content in wanted.items():
        if have.get(path) == sha(content):
            continue
        mode = "0755" if path.endswith(".sh") else "0644"
        host.write_file(path, content, mode=mode, root=True)
        written.append(path)
    if mode_of(facts) == "systemd":
        if lay.unit in written or sf.get("unit_NeedDaemonReload") == "yes":
            host.run(["systemctl", "daemon-reload"], root=True)
        if lay.unit in written or sf.get("unit_UnitFileState") != "enabled":
            host.run(["systemctl", "enable", UNIT_NAME], root=True)
    else:
        # The log must be writable by the server's user (the supervisor appends the server's output to it).
        host.run(sh("touch {log} && chown {u} {log}", log=lay.log, u=user), root=True)
    return written


def start(host, cfg: dict, facts: dict, *, restart: bool = False) -> str:
    """Start (or restart) the server; returns a line saying how it runs."""
    home = facts.get("home") if isinstance(facts.get("home"), str) else ""
    lay = layout(cfg, home)
    if mode_of(facts) == "systemd":
        # A unit that hit its start limit (5 failures in 5 min) refuses `start` until its failure is reset.
        host.run(["systemctl", "reset-failed", UNIT_NAME], root=True, check=False)
        host.run(["systemctl", "restart" if restart else "start", UNIT_NAME], root=True)
        return (f"systemd unit {UNIT_NAME} ({'restarted' if restart else 'started'}; enabled; "
                f"log: journalctl -u {UNIT_NAME})")
    host.run(sh("printf '\\n' >> {log}", log=lay.log), root=True)
    stop(host, cfg, facts)
    host.run(sh("setsid -f bash {s} < /dev/null > /dev/null 2>&1; "
                "for i in $(seq 50); do [ -s {p} ] && exit 0; sleep 0.1; done; echo 'supervisor did not start' >&2; exit 1",
                s=lay.supervise, p=lay.server_pid), root=True)
    return (f"no systemd on this host: llama-server runs under gpubox's supervisor loop ({lay.supervise}, "
            f"started with setsid; pid files in {lay.dir}; log {lay.log})")


def main_pid(host) -> str | None:
    """The unit's MainPID now (None when it has none)."""
    out = host.run(["systemctl", "show", "-p", "MainPID", "--value", UNIT_NAME], check=False).stdout.strip()
    return out if out and out != "0" else None


def unit_show(host, props=UNIT_PROPS) -> dict[str, str]:
    """`systemctl show -p ... llama-server.service` as a dict."""
    r = host.run(["systemctl", "show", *[f"-p{p}" for p in props], UNIT_NAME], check=False)
    out = {}
    for line in (r.stdout or "").splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k] = v
    return out


def stop(host, cfg: dict, facts: dict, timeout: int = 30) -> bool:
    """Stop the server (unit, or supervisor + child). True when something was stopped."""
    home = facts.get("home") if isinstance(facts.get("home"), str) else ""
    lay = layout(cfg, home)
    if mode_of(facts) == "systemd":
        was = host.run(["systemctl", "is-active", UNIT_NAME], check=False).stdout.strip()
        host.run(["systemctl", "stop", UNIT_NAME], root=True, check=False)
        return was in ("active", "activating", "reloading", "deactivating")
    script = sh(
        "stopped=1; for f in {sp} {pp}; do [ -s \"$f\" ] || continue; p=$(cat \"$f\"); "
        "kill -0 \"$p\" 2>/dev/null || continue; kill -TERM \"$p\"; stopped=0; done; "
        "for i in $(seq {n}); do alive=0; for f in {sp} {pp}; do [ -s \"$f\" ] && kill -0 \"$(cat \"$f\")\" 2>/dev/null && alive=1; done; "
        "[ $alive = 0 ] && break; sleep 0.2; done; "
        "for f in {sp} {pp}; do [ -s \"$f\" ] && kill -0 \"$(cat \"$f\")\" 2>/dev/null && kill -KILL \"$(cat \"$f\")\"; rm -f \"$f\"; done; "
        "exit $stopped", sp=lay.supervisor_pid, pp=lay.server_pid, n=timeout * 5)
    return host.run(["bash", "-c", script], root=True, check=False).exited == 0


def pid_alive(host, pid: int | str) -> bool:
    return host.ok(["kill", "-0", str(pid)], root=True)


def read_log(host, cfg: dict, facts: dict, *, last: bool = True, tail_bytes: int = 4_000_000,
             settle: bool = False) -> str:
    """The server's log: on systemd hosts the journal of the unit's current invocation (`last`) or all of the
    unit's journal; else the supervisor's log file after the last start marker (`last`) or all of it.
    `settle`: the server has just died; give journald a moment to read what it wrote last (it reads the
    service's output stream asynchronously)."""
    from .logparse import last_run
    if mode_of(facts) == "systemd":
        if settle:
            time.sleep(0.5)
        inv = unit_show(host, ("InvocationID",)).get("InvocationID", "") if last else ""
        match = [f"_SYSTEMD_INVOCATION_ID={inv}"] if inv else ["-u", UNIT_NAME]
        r = host.run(cmd(["journalctl", "--no-pager", "-o", "cat", *match]) + sh(" | tail -c {n}", n=tail_bytes),
                     root=True, check=False)
        text = r.stdout or ""
        return last_run(text) if last else text
    home = facts.get("home") if isinstance(facts.get("home"), str) else ""
    lay = layout(cfg, home)
    r = host.run(sh("[ -f {log} ] && tail -c {n} {log}", log=lay.log, n=tail_bytes), root=True, check=False)
    text = r.stdout or ""
    return last_run(text) if last else text
