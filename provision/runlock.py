"""One gpubox run at a time per box: a flock on the target, held for the whole run.

`<state_dir>/gpubox.run.lock` is locked with flock(1) by one shell on the TARGET that lives as long as the
run: it takes the lock, writes who holds it into the file (task, controller, pid, user, start time),
prints `@@locked`, then waits for its stdin to close. The controller keeps that stdin open (an unused
pipe) until the run ends; when the run ends, or the controller dies, or the SSH connection drops, stdin
closes, the shell exits and the kernel drops the lock: no stale lock file to clean up, whatever happened.

A second run finds the lock taken, prints who holds it and waits up to `lock_wait` seconds (0: refuses at
once, exit status 75, EX_TEMPFAIL: try again later); nothing of the second run has changed the box.

    with run_lock(host, cfg, "provision"):
        Runner(host, cfg, steps).run()

The lock is taken BEFORE the first facts are gathered (facts read while another run changes the box
would be stale), so the target path's `~/` is resolved by the shell itself, like the fact script does.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import getpass
import os
import queue
import socket
import threading
import time
from typing import Callable, Iterator

from .host import Host, _LineStream, cmd

LOCK_NAME = "gpubox.run.lock"
EXIT_BUSY = 75

# As the login user: resolve ~/ for gpubox.user (as the fact script does), then become root (sudo -n)
# unless already root, and run the holder. $1 holder script, $2 path, $3 info, $4 wait, $5 gpubox.user.
_WRAPPER = r'''s=$1; p=$2; u=$5
case $p in "~"|"~/"*)
  h=; [ -n "$u" ] && h=$(getent passwd "$u" | cut -d: -f6); [ -n "$h" ] || h=$HOME
  p="$h${p#"~"}";;
esac
if [ "$(id -u)" = 0 ]; then exec sh -c "$s" gpubox-lock "$p" "$3" "$4"; fi
exec sudo -n sh -c "$s" gpubox-lock "$p" "$3" "$4"
'''

# As root: $1 lock path, $2 holder info (one line), $3 seconds to wait.
_HOLDER = r'''p=$1; info=$2; wait=$3
mkdir -p "${p%/*}" || { echo "@@error cannot create ${p%/*}"; exit 70; }
if [ -L "$p" ] || { [ -e "$p" ] && [ ! -f "$p" ]; }; then echo "@@error $p is not a regular file"; exit 71; fi
exec 9<>"$p" || { echo "@@error cannot open $p"; exit 71; }
if ! flock -n 9; then
  echo "@@busy $(head -n 1 "$p" | tr -cd '[:print:]' | cut -c1-300)"
  [ "$wait" -gt 0 ] && flock -w "$wait" 9 || exit 75
fi
printf '%s\n' "$info" >&9
echo "@@locked $p"
cat > /dev/null
'''


class LockBusy(Exception):
    """Another run holds the lock (and lock_wait ran out, or is 0)."""

    def __init__(self, path: str, holder: str, waited: int):
        self.path, self.holder, self.waited = path, holder, waited
        how = f"after waiting {waited} s" if waited else "(lock_wait is 0)"
        super().__init__(
            f"another gpubox run holds {path} on this box: {holder or 'holder unknown'}; this run changed "
            f"nothing and stops {how}.\n  fix: run again when it has finished, or let this one wait for it: "
            "--set lock_wait=3600")


class LockError(Exception):
    """The lock could not be taken at all (no sudo, state_dir not writable...)."""


def holder_info(task: str) -> str:
    try:
        user = getpass.getuser()
    except Exception:  # no name for this uid
        user = str(os.getuid())
    stamp = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    text = f"{task} from {socket.gethostname()} pid {os.getpid()} user {user} since {stamp}"
    # Always 300 characters: written over the previous holder's line in place, it leaves nothing of it.
    return "".join(ch for ch in text if ch.isprintable() and ch.isascii())[:300].ljust(300)


@contextlib.contextmanager
def run_lock(host: Host, cfg: dict, task: str, *, echo: Callable[[str], None] = print,
             wait: int | None = None) -> Iterator[str]:
    """Hold the target's run lock for the body; yields the lock's path as the target resolved it."""
    wait = cfg.get("lock_wait", 0) if wait is None else wait
    path = cfg["state_dir"].rstrip("/") + "/" + LOCK_NAME
    lines: queue.Queue = queue.Queue()
    r, w = os.pipe()
    stdin = os.fdopen(r, "r")
    argv = ["sh", "-c", _WRAPPER, "gpubox-lock", _HOLDER, path, holder_info(task), str(int(wait)), cfg.get("user") or ""]
    try:
        promise = host.c.run(cmd(argv), asynchronous=True, in_stream=stdin, out_stream=_LineStream(lines.put),
                             hide="stderr", warn=True, pty=False)
    except BaseException:
        os.close(w)
        stdin.close()
        raise
    done: dict = {}

    def _join():
        try:
            done["result"] = promise.join()
        except Exception as e:  # noqa: BLE001  (reported by the caller)
            done["error"] = e
        lines.put(None)
    joiner = threading.Thread(target=_join, name="gpubox-run-lock", daemon=True)
    joiner.start()
    t0 = time.monotonic()
    holder, where = "", path
    try:
        while True:
            line = lines.get()
            if line is None:
                res = done.get("result")
                exited = getattr(res, "exited", None)
                if exited == EXIT_BUSY:
                    raise LockBusy(where, holder, int(time.monotonic() - t0) if wait else 0)
                why = next((l[8:] for l in (getattr(res, "stdout", "") or "").splitlines() if l.startswith("@@error ")), "")
                err = (getattr(res, "stderr", "") or str(done.get("error") or "")).strip()
                raise LockError(f"could not take the run lock {path} on {host.name} (exit {exited}): "
                                + (why or err.splitlines()[-1] if (why or err) else "no output"))
            if line.startswith("@@busy "):
                holder = line[7:].strip()
                echo(f"[lock] another gpubox run holds {path} on {host.name}: {holder or 'holder unknown'}"
                     + (f"; waiting up to {wait} s (lock_wait)" if wait else ""))
            elif line.startswith("@@locked "):
                where = line[9:].strip()
                if holder:
                    echo(f"[lock] {where}: the other run finished after {time.monotonic() - t0:.0f} s; this run goes on")
                break
        yield where
    finally:
        os.close(w)          # EOF on the holder's stdin: it exits and the kernel drops the lock
        joiner.join(timeout=60)
        stdin.close()
