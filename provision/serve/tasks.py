"""Invoke tasks: `invoke serve` (render, validate, install, start, prove) and serve.start|stop|status|logs, doctor.

    invoke serve                       # idempotent: a second run with nothing changed makes zero changes
    invoke serve --set serve.ctx_size=65536   # one setting changed: restarts with the new command
    invoke serve --plan                # what would change, nothing done
    invoke serve.status / serve.logs -n 100 / serve.stop / serve.start
                                       # systemd hosts: status from `systemctl show`, logs from the journal
    invoke doctor                      # findings from the latest server log
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from invoke import Collection, Exit, task

from ..runs import locked, run_runner, settings
from .. import facts as factmod
from ..engine import Runner, StepError, write_atomic
from ..host import Host
from . import doctor as doctormod
from . import logparse, service, smoke, step

SET_HELP = {"set": "override a setting, KEY=VALUE (repeatable), e.g. --set serve.ctx_size=65536"}


def _facts(host: Host, cfg: dict) -> dict:
    return factmod.gather(host, cfg, [step])


def _save(cfg: dict, host: Host, name: str, data: dict) -> Path:
    d = Path(os.path.expanduser(cfg["report_dir"]))
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{host.name}-{name}.json"
    write_atomic(p, json.dumps(data, indent=2, default=str))
    return p


def prove(host: Host, cfg: dict, facts: dict, echo=print) -> dict:
    """The smoke request, then the log parsed for the same run. Raises Exit(1) when the request fails (a server
    that aborted in the middle of it is reported as such, with its log lines)."""
    res = smoke.smoke(host, cfg["serve"], read_log=lambda: service.read_log(host, cfg, facts, last=False))
    model, draft = step.model_paths(cfg, facts.get("home") if isinstance(facts.get("home"), str) else "")
    text = service.read_log(host, cfg, facts)
    log = logparse.parse(text, target_path=model, draft_path=draft or None)
    if res.ok:
        smoke.attach_log(res, log)
    echo(res.line())
    for mb in log.models:
        bufs = ", ".join(f"{k} {v:.2f} MiB" for k, v in mb.model_buffers.items()) or "no load_tensors lines"
        off = f", offloaded {mb.offloaded[0]}/{mb.offloaded[1]} layers" if mb.offloaded else ""
        echo(f"log: {mb.role} {mb.path} ({mb.arch or '?'}): {bufs}{off}")
    if log.requests:
        r = log.requests[-1]
        echo(f"log: last request: prompt {r.prompt_n} tokens {r.prompt_per_second:.1f} t/s, "
             f"eval {r.predicted_n} tokens {r.predicted_per_second:.1f} t/s"
             + (f", draft acceptance {r.draft_acceptance:.3f}" if r.draft_acceptance is not None else ""))
    data = {"smoke": res.to_dict(), "log": log.to_dict()}
    path = _save(cfg, host, "serve-proof", data)
    echo(f"proof: {path}")
    if res.aborted:
        raise Exit("serve: llama-server aborted in the middle of the smoke request (log lines above); "
                   "`invoke doctor` names the fix", code=1)
    if not res.ok:
        raise Exit("serve: the smoke request failed; see `invoke doctor` and `invoke serve.logs`", code=1)
    return data


@task(name="serve", default=True, iterable=["set"],
      help=dict(SET_HELP, plan="check only: print what would change", no_prove="skip the smoke request"))
def serve_(c, set=None, plan=False, no_prove=False):
    """Render the llama-server command for the built dialect, install the service, start it, prove it."""
    cfg = settings(c, set)
    host = Host(c)
    # one gpubox run at a time per box (a provision in flight may be rebuilding the binary); a plan takes no lock
    report = run_runner(Runner(host, cfg, [step], plan=plan), "serve")
    print(report.table())
    res = report.steps[0]
    for n in res.info.get("notes", []):
        print(f"  note: {n}")
    if (res.info.get("mlock") or {}).get("locked"):
        print(f"  note: {res.info['mlock']['line']}")
    if res.info.get("argv"):
        print("  command: " + " ".join(res.info["argv"]))
    if report.failed:
        raise Exit(code=1)
    if plan or no_prove:
        return report
    prove(host, cfg, _facts(host, cfg))
    return report


@task(iterable=["set"], help=SET_HELP)
def start(c, set=None):
    """Start llama-server with the installed launch files (run `invoke serve` to install or change them)."""
    cfg = settings(c, set)
    host = Host(c)
    with locked(host, cfg, "serve.start"):
        facts = _facts(host, cfg)
        if facts["serve"].get("pid"):
            print(f"llama-server already running (pid {facts['serve']['pid']})")
            return
        lay = service.layout(cfg, facts.get("home") or "")
        if not facts["serve"].get("file_launch"):
            raise Exit(f"serve.start: nothing installed at {lay.launch}; run `invoke serve` first", code=1)
        print(service.start(host, cfg, facts))


@task(iterable=["set"], help=SET_HELP)
def stop(c, set=None):
    """Stop llama-server (the unit, or the supervisor and its server)."""
    cfg = settings(c, set)
    host = Host(c)
    with locked(host, cfg, "serve.stop"):
        facts = _facts(host, cfg)
        print("stopped" if service.stop(host, cfg, facts) else "llama-server was not running")


@task(iterable=["set"], help=SET_HELP)
def status(c, set=None):
    """Is it running, with which command, in which mode; /health and /v1/models."""
    cfg = settings(c, set)
    host = Host(c)
    facts = _facts(host, cfg)
    sf = facts["serve"]
    mode = service.mode_of(facts)
    if mode == "systemd":
        u = service.unit_show(host)
        print(f"mode: systemd (unit {service.UNIT_NAME}: {u.get('ActiveState', '?')} ({u.get('SubState', '?')}), "
              f"{u.get('UnitFileState') or 'not installed'})")
        print(f"unit: MainPID {u.get('MainPID', '?')}, started {u.get('ExecMainStartTimestamp') or '-'}, "
              f"restarts {u.get('NRestarts', '?')}, last result {u.get('Result', '?')}, "
              f"invocation {u.get('InvocationID') or '-'}, LimitMEMLOCK {u.get('LimitMEMLOCK', '?')}")
    else:
        print(f"mode: {mode} (supervisor pid {sf.get('supervisor_pid', '-')})")
    if not sf.get("pid"):
        print("llama-server: not running")
        raise Exit(code=3)
    print(f"llama-server: pid {sf['pid']}: {' '.join(sf.get('argv', []))}")
    ml = step.mlock_state(sf, cfg, mode)
    if ml:
        print(ml["line"])
    h = smoke.http(host, cfg["serve"], "GET", "/health")
    print(f"/health: {h.status} {h.body.strip()[:120]}")
    print(f"/v1/models: {', '.join(smoke.models(host, cfg['serve'])) or '-'}")
    try:
        chk = step.check(facts, cfg)
        print("config: " + ("the running command is the configured one" if chk.satisfied else
                            "differs: " + "; ".join(f"{x.what} ({x.why})" for x in chk.changes)))
    except StepError as e:
        print(f"config: {e}")


@task(iterable=["set"], help=dict(SET_HELP, lines="how many lines", all="the whole file, not only the last start"))
def logs(c, set=None, lines=60, all=False):
    """The server log since the last start (systemd hosts: the journal of the unit's current invocation)."""
    cfg = settings(c, set)
    host = Host(c)
    facts = _facts(host, cfg)
    text = service.read_log(host, cfg, facts, last=not all)
    print("\n".join(text.splitlines()[-int(lines):]))


@task(iterable=["set"], help=dict(SET_HELP, log="a log file on this machine instead of the server's",
                                   dialect="pre-sync/post-sync/upstream for a --log file"))
def doctor(c, set=None, log=None, dialect=None):
    """Findings from the latest llama-server log: embedding on CPU, OOM, mlock, GPU visibility."""
    cfg = settings(c, set)
    host = Host(c)
    facts = _facts(host, cfg)
    if log:
        text = logparse.last_run(Path(log).read_text(errors="replace"))
        d = dialect or "unknown"
    else:
        text = service.read_log(host, cfg, facts)
        d = dialect or "unknown"
        try:
            d = step.wanted(facts, cfg)[0].dialect
        except StepError:
            pass
    if not text.strip():
        raise Exit("doctor: the server log is empty; start it with `invoke serve`", code=1)
    model, draft = step.model_paths(cfg, facts.get("home") if isinstance(facts.get("home"), str) else "")
    parsed = logparse.parse(text, target_path=model, draft_path=draft or None)
    g = facts.get("serve_gguf") if isinstance(facts.get("serve_gguf"), dict) else {}
    findings = doctormod.diagnose(parsed, serve=cfg["serve"], dialect=d, facts=facts,
                                  expect_gpu=bool(cfg["build"]["cuda"]) and not log, head=g.get("head"))
    print(doctormod.summary(findings))
    _save(cfg, host, "doctor", {"dialect": d, "findings": [f.to_dict() for f in findings]})
    if any(f.severity == "error" for f in findings):
        raise Exit(code=1)


ns = Collection("serve")
ns.add_task(serve_, default=True)
ns.add_task(start)
ns.add_task(stop)
ns.add_task(status)
ns.add_task(logs)
