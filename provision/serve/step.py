"""The serve step: render -> validate -> install -> start; the `serve` task then proves it (smoke.py).

check() is pure (facts in): it renders the command for the binary's dialect (from step 5's
gpubox-dialect.json, else the binary's own --help), refuses bad settings before anything starts (a binary or
model file that is not there, an option the binary lacks, a port another process holds, a target and MTP
head that cannot work together: provision/serve/pair.py on both GGUF headers), and compares the
installed files and the running process's command line with the wanted ones. Nothing differs = satisfied,
zero changes. apply() writes what differs, starts or restarts the server and waits for readiness; a server
that exits while loading is reported with the log lines that say why.
"""

from __future__ import annotations

import json
from typing import Any

from ..engine import Change, Check, StepError
from ..facts import UNKNOWN, Fact, qpath
from ..host import expand_home
from .. import ggufhead, remote
from ..tune import state as tune_state
from . import helptext, logparse, pair, render, service, smoke

MTP_SPECS = ("mtp", "draft-mtp")

NAME = "serve"
TITLE = "llama-server: rendered for the built dialect, installed, running"
def _gguf_fact(cfg: dict) -> str:
    """Both GGUF headers (model, then the head), summarized on the target by provision/ggufhead.py (sent by
    provision/remote.py); only when serving with an MTP head."""
    s = cfg["serve"]
    files = cfg["models"]["files"]
    if not (s.get("draft_model") and s.get("spec_type") in MTP_SPECS and s["draft_model"] in files):
        return "true"
    mdir = cfg["models"]["dir"].rstrip("/")
    model, draft = (f"{mdir}/{files[k]['filename']}" for k in ("model", s["draft_model"]))
    return (f"[ -r {qpath(model)} ] && [ -r {qpath(draft)} ] || exit 0; "
            f"{remote.snippet([ggufhead], 'print_summaries')} {qpath(model)} {qpath(draft)}")


def _parse_gguf(out: str, rc: int):
    if rc != 0:
        return UNKNOWN
    got = []
    for line in out.splitlines():
        try:
            got.append(json.loads(line))
        except ValueError:
            continue
    return {"target": got[0], "head": got[1]} if len(got) == 2 else {}


FACTS = [
    Fact("serve", service.fact_snippet, service.parse_fact),
    Fact("serve_gguf", _gguf_fact, _parse_gguf),
    # `invoke tune`'s result: its --n-cpu-moe replaces serve.n_cpu_moe when it was tuned for these settings.
    Fact("tune_state", lambda cfg: "cat " + qpath(cfg["state_dir"].rstrip("/") + "/" + tune_state.FILENAME),
         lambda out, rc: tune_state.parse(out if rc == 0 else "")),
]


def effective_serve(facts: dict, cfg: dict) -> tuple[dict, list[str]]:
    """cfg["serve"] with the tuned --n-cpu-moe applied (when tune answered for these very settings)."""
    serve = dict(cfg["serve"])
    doc = facts.get("tune_state") if isinstance(facts.get("tune_state"), dict) else None
    drafting = bool(serve.get("draft_model")) and serve.get("spec_type", "none") != "none"
    tuned = tune_state.tuned_n_cpu_moe(doc, serve, drafting=drafting)
    if tuned is None or tuned == serve["n_cpu_moe"]:
        return serve, []
    note = f"serve.n_cpu_moe {serve['n_cpu_moe']} -> {tuned}: the value `invoke tune` chose for these settings"
    serve["n_cpu_moe"] = tuned
    return serve, [note]


def _home(facts: dict) -> str:
    return facts.get("home") if isinstance(facts.get("home"), str) else ""


def model_paths(cfg: dict, home: str) -> tuple[str, str]:
    """(model, draft) paths on the target, `~/` resolved; draft "" when serve.draft_model is ""."""
    files = cfg["models"]["files"]
    mdir = expand_home(cfg["models"]["dir"], home).rstrip("/")
    model = f"{mdir}/{files['model']['filename']}"
    dm = cfg["serve"].get("draft_model")
    return model, (f"{mdir}/{files[dm]['filename']}" if dm else "")


def check_api_key(sf: dict, cfg: dict, user: str) -> None:
    """serve.api_key_file: there, not empty, mode 0600 (no group/other bits), owned by the server's user."""
    path = cfg["serve"].get("api_key_file")
    if not path:
        return
    fix = (f"create it for {user}: (umask 077; openssl rand -hex 32 > {path}) && chown {user} {path}; "
           "clients send the key as Authorization: Bearer <key>")
    st = (sf.get("api_key_stat") or "").split()
    if len(st) != 3:
        raise StepError(f"serve: serve.api_key_file {path} does not exist", fix)
    mode, owner, size = int(st[0], 8), st[1], int(st[2])
    if mode & 0o077:
        raise StepError(f"serve: serve.api_key_file {path} has mode {mode:04o}: others can read the key", f"chmod 0600 {path}")
    if owner not in (user, "root") or (owner == "root" and user != "root"):
        raise StepError(f"serve: serve.api_key_file {path} is owned by {owner}; llama-server runs as {user} and "
                        "could not read it", f"chown {user} {path}")
    if size == 0:
        raise StepError(f"serve: serve.api_key_file {path} is empty", fix)


def wanted(facts: dict, cfg: dict) -> tuple[render.Rendered, dict[str, str], dict]:
    """Render the command and the files, or raise StepError naming the cause and the fix."""
    sf = facts.get("serve")
    if not isinstance(sf, dict):
        raise StepError("serve: could not read the serve facts from the host", "check that bash runs on the target")
    home = _home(facts)
    binary = service.binary_path(cfg, home)
    if sf.get("binary") != "yes":
        raise StepError(f"serve: no llama-server at {binary}", "build it first: invoke build")
    if not sf.get("help", "").strip():
        raise StepError(f"serve: could not read the flags of {binary} (no gpubox-dialect.json and --help printed nothing)",
                        "rebuild (invoke build) so step 5 records the dialect")
    parsed = helptext.from_json(sf["help"]) if sf["help"].lstrip().startswith("{") else helptext.parse(sf["help"])
    if not parsed["flags"]:
        raise StepError(f"serve: {binary} --help lists no flags", "rebuild (invoke build)", output=sf["help"][-2000:])
    model, draft = model_paths(cfg, home)
    missing = []
    if sf.get("model_readable") != "yes":
        missing.append(f"model file {model} does not exist or is not readable")
    if draft and sf.get("draft_readable") != "yes":
        missing.append(f"draft/assistant file {draft} does not exist or is not readable "
                       f"(serve.draft_model={cfg['serve']['draft_model']})")
    if missing:
        raise StepError("serve: " + "; ".join(missing),
                        "download the models (invoke models), or fix models.dir / models.files; "
                        "serve.draft_model=\"\" serves without a draft model")
    if cfg["serve"].get("service_user") and sf.get("service_user") != "yes":
        raise StepError(f"serve: service user {cfg['serve']['service_user']!r} does not exist on the host",
                        f"create it (useradd --system {cfg['serve']['service_user']}) or set serve.service_user=\"\"")
    check_api_key(sf, cfg, service.run_user(cfg, facts))
    serve, tuned_notes = effective_serve(facts, cfg)
    try:
        r = render.render(serve, parsed, binary=binary, model_path=model, draft_path=draft)
    except render.RenderError as e:
        raise StepError(str(e)) from None
    r.notes[:0] = tuned_notes
    check_pair(facts, cfg, serve, r.dialect, model, draft)
    files = service.files(cfg, facts, r, model_name=cfg["models"]["files"]["model"]["filename"])
    return r, files, sf


def check_pair(facts: dict, cfg: dict, serve: dict, dialect: str, model: str, draft: str) -> None:
    """Refuse a target + MTP head that this binary cannot serve together (pair.py), naming the fix."""
    if not (draft and serve.get("spec_type") in MTP_SPECS):
        return
    g = facts.get("serve_gguf")
    if not isinstance(g, dict) or not g:
        raise StepError(f"serve: could not read the GGUF headers of {model} and {draft} on the host (python3 "
                        "with provision/ggufhead.py), so the MTP pair cannot be checked before launch",
                        "check that python3 runs on the target and that both files are GGUF (invoke models)")
    for role, path in (("target", model), ("head", draft)):
        if g[role].get("error"):
            raise StepError(f"serve: {path} is not a readable GGUF file: {g[role]['error']}",
                            "download it again: invoke models --set models.update=true")
    problems = pair.check(g["target"], g["head"], dialect=dialect)
    if problems:
        raise StepError("serve: the model and its MTP head cannot be served together by this "
                        f"{dialect} llama-server; nothing was started:\n"
                        + "\n".join(f"  - {p.rule}: {p.cause}" for p in problems),
                        "; ".join(dict.fromkeys(p.fix for p in problems)))


def _port_of(argv: list[str]) -> str | None:
    for i, a in enumerate(argv[:-1]):
        if a == "--port":
            return argv[i + 1]
    return None


def mlock_state(sf: dict, cfg: dict, mode: str) -> dict | None:
    """With serve.mlock: did the running server really lock its memory? The kernel's answer (Locked in
    /proc/PID/smaps_rollup: resident locked pages) against what --mlock locks (the models' host-side buffers,
    from the log of this start), and llama.cpp's "failed to mlock" warning from that log. The warning alone
    is not the verdict: llama.cpp also warns when the kernel locked the whole buffer and refused only the
    page-rounded range past its end (seen in the sandbox, docs/systemd.md). None when --mlock is off."""
    if not cfg["serve"].get("mlock") or not sf.get("pid"):
        return None

    def num(key: str) -> float:
        try:
            return float(sf.get(key) or 0)
        except ValueError:
            return 0.0
    kb, need_kb = int(num("locked_kb")), int(num("mlock_need_mib") * 1024)
    limit = sf.get("memlock_limit") or "unknown"
    warning = (sf.get("mlock_warning") or "").strip()
    state = {"locked_kb": kb, "need_kb": need_kb, "limit": limit, "warning": warning}
    full = kb > 0 and (kb + 8 >= need_kb if need_kb else not warning)
    if full:
        line = f"--mlock: {kb / 1024:.1f} MiB locked in RAM (pid {sf['pid']}"
        line += f"; the models' host buffers: {need_kb / 1024:.1f} MiB" if need_kb else ""
        line += f"; memlock limit {limit})"
        if warning:
            line += f"; llama.cpp warned `{warning}`, yet the kernel holds all of it locked"
        return {**state, "locked": True, "line": line}
    how = ("the unit sets LimitMEMLOCK=infinity and AmbientCapabilities=CAP_IPC_LOCK; check that they hold: "
           f"`systemctl show -p LimitMEMLOCK {service.UNIT_NAME}`, /proc/{sf['pid']}/limits, and that the "
           "service manager has CAP_SYS_RESOURCE or CAP_IPC_LOCK to give (docs/systemd.md)") \
        if mode == "systemd" else \
        ("the supervisor raises the limit with `ulimit -l unlimited`, which needs root (or a memlock limit in "
         "/etc/security/limits.conf)")
    got = f"{kb / 1024:.1f} of {need_kb / 1024:.1f} MiB locked" if need_kb else f"{kb} kB locked"
    why = f"{got}; log: {warning}" if warning else got
    return {**state, "locked": False,
            "line": f"--mlock: the model is NOT (fully) locked in RAM ({why}; memlock limit {limit} bytes "
                    f"soft/hard): {how}; or set serve.mlock=false"}


def check(facts: dict, cfg: dict) -> Check:
    r, files, sf = wanted(facts, cfg)
    lay = service.layout(cfg, _home(facts))
    have = {lay.launch: sf.get("file_launch"), lay.env: sf.get("file_env"), lay.supervise: sf.get("file_supervise"),
            lay.unit: sf.get("file_unit")}
    changes: list[Change] = []
    for path, content in files.items():
        if have.get(path) != service.sha(content):
            changes.append(Change(f"write {path}", "missing" if not have.get(path) else "content differs",
                                  [f"write {path} from templates/"]))
    running_argv = sf.get("argv") or []
    alive = bool(sf.get("pid"))
    same = alive and running_argv == r.argv
    mode = service.mode_of(facts)
    attention, warnings = [], []
    if mode == "supervisor":
        attention.append("no systemd on this host: llama-server runs under gpubox's supervisor loop "
                         f"({lay.supervise}, setsid, pid files, log {lay.log}), not as a systemd unit")
    warnings += [f"render: {d}" for d in r.dropped]
    port = str(cfg["serve"]["port"])
    if sf.get("port") == "open" and not (alive and _port_of(running_argv) == port):
        owner = sf.get("port_owner") or ""
        raise StepError(f"serve: port {port} on {cfg['serve']['host']} is already in use by another process"
                        + (f" ({owner})" if owner else ""),
                        f"stop that process or choose another port: invoke serve --set serve.port={int(port) + 1}")
    file_changed = bool(changes)
    if mode == "systemd" and not changes:
        # Same files: the unit must still be enabled (starts at boot) and loaded as written.
        if sf.get("unit_UnitFileState") != "enabled":
            changes.append(Change(f"enable {service.UNIT_NAME}", f"unit file state is "
                                  f"{sf.get('unit_UnitFileState') or 'unknown'}: it would not start at boot",
                                  [f"systemctl enable {service.UNIT_NAME}"]))
        if sf.get("unit_NeedDaemonReload") == "yes":
            changes.append(Change("systemctl daemon-reload", f"{service.UNIT_PATH} changed on disk since systemd "
                                  "loaded it", ["systemctl daemon-reload"]))
            file_changed = True
    if not same:
        if alive:
            what = "; ".join(render.diff(running_argv, r.argv)) or "command differs"
            changes.append(Change("restart llama-server with the new command", what, [" ".join(r.argv)]))
        else:
            changes.append(Change("start llama-server", "not running", [" ".join(r.argv)]))
    elif file_changed:
        changes.append(Change("restart llama-server", "its launch files changed", [" ".join(r.argv)]))
    mlock = mlock_state(sf, cfg, mode) if same else None
    if mlock and not mlock["locked"]:
        warnings.append(mlock["line"])
    info = {"argv": r.argv, "dialect": r.dialect, "notes": r.notes, "dropped": r.dropped, "mode": mode,
            "log": f"journalctl -u {service.UNIT_NAME}" if mode == "systemd" else lay.log, "pid": sf.get("pid", ""),
            "unit": {k[5:]: v for k, v in sf.items() if k.startswith("unit_")} if mode == "systemd" else {},
            "mlock": mlock}
    if not changes:
        return Check.done(attention=attention, warnings=warnings, info=info)
    return Check.todo(changes, attention=attention, warnings=warnings, info=info)


def apply(host, facts: dict, cfg: dict, chk: Check, echo=print):
    r, files, sf = wanted(facts, cfg)
    for n in r.notes:
        echo(f"[serve] {n}")
    for d in r.dropped:
        echo(f"[serve] dropped: {d}")
    service.install(host, cfg, facts, files)
    if not any(c.what.startswith(("start", "restart")) for c in chk.changes):
        return [f"{service.UNIT_NAME} enabled"]          # only the unit's enablement was missing
    running = bool(sf.get("pid"))
    how = service.start(host, cfg, facts, restart=running)
    echo(f"[serve] {how}")
    # The new server's pid (the unit's MainPID or the supervisor's pid file).
    lay = service.layout(cfg, _home(facts))
    systemd = service.mode_of(facts) == "systemd"
    if systemd:
        pid = service.main_pid(host)
        if pid is None:
            # It died before its pid could be read (a bad model fails in milliseconds): the unit is already in
            # auto-restart or failed. Report it as wait_ready would, with the log of that start.
            u = service.unit_show(host, ("ActiveState", "SubState", "Result", "ExecMainStatus"))
            lines = logparse.explain_exit(service.read_log(host, cfg, facts, settle=True))
            service.stop(host, cfg, facts)
            raise smoke.ServerExited(
                f"serve: llama-server exited during load right after its start ({service.UNIT_NAME}: "
                f"{u.get('ActiveState')} ({u.get('SubState')}), result {u.get('Result')}, exit status "
                f"{u.get('ExecMainStatus')})", "read the log lines below; `invoke doctor` turns them into a fix",
                output="\n".join(lines))
    else:
        out = host.run(["cat", lay.server_pid], root=True, check=False).stdout.strip()
        pid = out if out and out != "0" else None
    try:
        ready = smoke.wait_ready(host, cfg["serve"], pid=pid, timeout=cfg["serve"]["ready_timeout"],
                                 read_log=lambda: service.read_log(host, cfg, facts, settle=systemd), echo=echo)
    except StepError:
        # Do not leave a restart loop behind a server that cannot load: stop it, report the log lines.
        service.stop(host, cfg, facts)
        raise
    notes = [f"llama-server ready in {ready['seconds']}s ({' -> '.join(ready['states']) or 'at once'})"]
    return notes
