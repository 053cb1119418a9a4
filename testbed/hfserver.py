"""A local HTTP server speaking the part of Hugging Face's protocol that downloads use.

    python3 -m testbed.hfserver --root DIR [--host H] [--port P] [--rate BYTES_PER_S]
        [--corrupt ORG/NAME/FILE@OFFSET]... [--token T] [--log FILE] [--no-sha] [--no-size]
        [--truncate ORG/NAME/FILE@OFFSET]...

DIR/<org>/<name>/<file> is served under /{org}/{name}/resolve/{revision}/{file} for the revision
``main`` and for the repository's commit (40 hex digits), with the headers huggingface_hub reads
(see docs/downloads.md): X-Repo-Commit, ETag, X-Linked-Etag (the file's sha256, as
the Hub reports for LFS files), X-Linked-Size, Content-Length, Accept-Ranges; ``Range: bytes=N-``
(and N-M, -N) is answered with 206 and Content-Range; a missing file is 404 with
``X-Error-Code: EntryNotFound``, an unknown revision 404 with ``X-Error-Code: RevisionNotFound``, an
unknown repository 401 with ``X-Error-Code: RepoNotFound`` (what the Hub answers).

Also served, for HfApi: GET /api/models/{org}/{name}[/revision/{rev}] (model_info with siblings and
their LFS sha256/size) and POST /api/models/{org}/{name}/paths-info/{rev} (get_paths_info).

The commit of a repository is derived from its content (names and sha256 of its files), so writing a
different file makes a new commit, as a push would; the old commit then answers RevisionNotFound
(the server keeps only the current revision). A file ``DIR/<org>/<name>/.commit`` holding 40 hex
digits overrides the derived commit.

Test knobs: ``--rate`` throttles each response body to BYTES_PER_S (scheduled against the start of
the body, so the average is exact, not drifting); ``--corrupt`` flips one byte of a file as it is
sent while the headers keep advertising the true sha256 (a corrupting mirror or a bad disk);
``--no-sha`` reports no sha256 (an ETag that is not one, no X-Linked-Etag); ``--no-size`` reports no
size (no X-Linked-Size or Content-Length: the body ends when the connection closes, Range is ignored);
``--truncate ORG/NAME/FILE@OFFSET`` ends every body at that byte of the file and closes the connection;
``--token`` requires ``Authorization: Bearer T`` (401 otherwise); ``--log`` appends one JSON line per
request (method, path, status, range, bytes of body sent) so tests can prove what was transferred.
The Authorization header is never logged.

Standard library only (the sandbox runs it with the controller's python3), one thread per request.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HEX40 = re.compile(r"^[0-9a-f]{40}$")
CHUNK = 256 * 1024


class Repo:
    """One repository directory, its files' sha256 (cached by size and mtime) and its commit."""

    def __init__(self, root: str, repo_id: str):
        self.repo_id = repo_id
        self.path = os.path.join(root, *repo_id.split("/"))

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def files(self) -> list[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if f.startswith("."):
                    continue
                out.append(os.path.relpath(os.path.join(dirpath, f), self.path).replace(os.sep, "/"))
        return sorted(out)

    def file_path(self, filename: str) -> str | None:
        parts = filename.split("/")
        if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            return None
        p = os.path.join(self.path, *parts)
        return p if os.path.isfile(p) else None


class Store:
    def __init__(self, root: str):
        self.root = os.path.abspath(root)
        self._lock = threading.Lock()
        self._sha: dict[str, tuple[int, int, str]] = {}

    def repo(self, repo_id: str) -> Repo:
        return Repo(self.root, repo_id)

    def sha256(self, path: str) -> str:
        st = os.stat(path)
        key = (st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._sha.get(path)
            if hit and hit[:2] == key:
                return hit[2]
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                h.update(b)
        digest = h.hexdigest()
        with self._lock:
            self._sha[path] = (key[0], key[1], digest)
        return digest

    def commit(self, repo: Repo) -> str:
        pinned = os.path.join(repo.path, ".commit")
        if os.path.isfile(pinned):
            with open(pinned) as f:
                value = f.read().strip().lower()
            if HEX40.match(value):
                return value
        h = hashlib.sha1(repo.repo_id.encode())
        for name in repo.files():
            h.update(b"\0" + name.encode() + b"\0" + self.sha256(os.path.join(repo.path, *name.split("/"))).encode())
        return h.hexdigest()


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """'bytes=A-B' / 'bytes=A-' / 'bytes=-N' -> (start, end inclusive); None if unsatisfiable/invalid."""
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", value or "")
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None
    if m.group(1) == "":
        n = int(m.group(2))
        if n == 0:
            return None
        return max(0, size - n), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    end = min(end, size - 1)
    if start >= size or end < start:
        return None
    return start, end


class Handler(BaseHTTPRequestHandler):
    server: "HFServer"
    protocol_version = "HTTP/1.1"
    server_version = "gpubox-hfserver/1"

    # --- plumbing ----------------------------------------------------------------------------------
    def log_message(self, fmt, *args):  # the default logs to stderr per request: keep quiet
        pass

    def _record(self, status: int, sent: int, rng: str | None = None, extra: dict | None = None):
        entry = {"t": round(time.time(), 3), "method": self.command, "path": self.path, "status": status,
                 "range": rng, "sent": sent}
        if extra:
            entry.update(extra)
        self.server.record(entry)

    def _send(self, status: int, headers: dict, body: bytes = b"", error_code: str | None = None):
        self.send_response(status)
        if error_code:
            self.send_header("X-Error-Code", error_code)
            self.send_header("X-Error-Message", headers.pop("_message", error_code))
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        sent = 0
        if self.command != "HEAD" and body:
            self.wfile.write(body)
            sent = len(body)
        self._record(status, sent)

    def _json(self, status: int, obj, error_code: str | None = None):
        body = json.dumps(obj).encode()
        self._send(status, {"Content-Type": "application/json"}, body, error_code)

    def _error(self, status: int, code: str, message: str):
        self._send(status, {"Content-Type": "application/json", "_message": message},
                   json.dumps({"error": message}).encode(), code)

    def _authorized(self) -> bool:
        token = self.server.token
        if not token:
            return True
        if self.headers.get("Authorization", "") == f"Bearer {token}":
            return True
        self._error(401, "GatedRepo", "Access to this repository requires a valid token.")
        return False

    # --- routes ------------------------------------------------------------------------------------
    def do_HEAD(self):
        self._route()

    def do_GET(self):
        self._route()

    def do_POST(self):
        self._route()

    def _route(self):
        try:
            path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
            parts = [p for p in path.split("/") if p != ""]
            if not self._authorized():
                return
            if len(parts) >= 2 and parts[0] == "api" and parts[1] == "models":
                return self._api(parts[2:])
            if len(parts) >= 5 and parts[2] == "resolve" and self.command in ("GET", "HEAD"):
                return self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            self._error(404, "EntryNotFound", f"No route for {path}")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _lookup_repo(self, repo_id: str, revision: str):
        repo = self.server.store.repo(repo_id)
        if not repo.exists():
            self._error(401, "RepoNotFound", f"Repository Not Found for url: {self.path}.")
            return None, None
        commit = self.server.store.commit(repo)
        if revision not in ("main", commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None, None
        return repo, commit

    def _resolve(self, repo_id: str, revision: str, filename: str):
        repo, commit = self._lookup_repo(repo_id, revision)
        if repo is None:
            return
        fpath = repo.file_path(filename)
        if fpath is None:
            self._error(404, "EntryNotFound", f"{filename} does not exist on \"{revision}\"")
            return
        size = os.path.getsize(fpath)
        sha = self.server.store.sha256(fpath)
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{sha}"',
            "X-Linked-Etag": f'"{sha}"',
            "X-Linked-Size": size,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'attachment; filename="{os.path.basename(filename)}"',
        }
        if self.server.no_sha:
            # As for a file the Hub does not keep in LFS: an ETag that is no sha256, no X-Linked-Etag.
            headers["ETag"] = f'"{hashlib.sha1(sha.encode()).hexdigest()}"'
            del headers["X-Linked-Etag"]
        if self.server.no_size:
            return self._resolve_unsized(fpath, f"{repo_id}/{filename}", headers)
        rng_header = self.headers.get("Range")
        start, end, status = 0, size - 1, 200
        if rng_header:
            rng = parse_range(rng_header, size)
            if rng is None:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                self._record(416, 0, rng_header)
                return
            start, end = rng
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = end - start + 1 if size else 0
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD":
            self._record(status, 0, rng_header)
            return
        self._sent = 0
        try:
            self._stream(fpath, f"{repo_id}/{filename}", start, length)
        finally:
            # counted as written, so a client killed mid-body still shows what it was sent
            self._record(status, self._sent, rng_header)

    def _resolve_unsized(self, fpath: str, key: str, headers: dict):
        """No size anywhere (no X-Linked-Size, no Content-Length): the body ends when the connection closes,
        from byte 0 whatever Range asks (a server that ignores Range)."""
        del headers["X-Linked-Size"]
        del headers["Accept-Ranges"]
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, str(v))
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        if self.command == "HEAD":
            self._record(200, 0, self.headers.get("Range"))
            return
        self._sent = 0
        try:
            self._stream(fpath, key, 0, os.path.getsize(fpath))
        finally:
            self._record(200, self._sent, self.headers.get("Range"))

    def _stream(self, fpath: str, key: str, start: int, length: int) -> int:
        rate = self.server.rate
        corrupt = self.server.corrupt.get(key, [])
        cut = self.server.truncate.get(key)
        if cut is not None:
            # The body stops at byte `cut` of the file and the connection is closed (a dropped transfer).
            length = max(0, min(length, cut - start))
            self.close_connection = True
        chunk = CHUNK if not rate else max(4096, min(CHUNK, int(rate / 50)))
        t0 = time.monotonic()
        sent = 0
        with open(fpath, "rb") as f:
            f.seek(start)
            while sent < length:
                data = f.read(min(chunk, length - sent))
                if not data:
                    break
                pos = start + sent
                for off in corrupt:
                    if pos <= off < pos + len(data):
                        b = bytearray(data)
                        b[off - pos] ^= 0xFF
                        data = bytes(b)
                if rate:
                    # Schedule each chunk against the start of the body: the average rate is exact.
                    delay = t0 + (sent + len(data)) / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                self.wfile.write(data)
                sent += len(data)
                self._sent = sent
        return sent

    def _siblings(self, repo: Repo, names: list[str] | None = None) -> list[dict]:
        out = []
        for name in (names if names is not None else repo.files()):
            p = repo.file_path(name)
            if p is None:
                continue
            size = os.path.getsize(p)
            sha = self.server.store.sha256(p)
            out.append({"rfilename": name, "path": name, "type": "file", "size": size,
                        "oid": hashlib.sha1(f"blob {size}\0".encode() + sha.encode()).hexdigest(),
                        "lfs": {"sha256": sha, "oid": sha, "size": size, "pointerSize": 134}})
        return out

    def _api(self, rest: list[str]):
        # /api/models/{org}/{name}[/revision/{rev}] and /api/models/{org}/{name}/paths-info/{rev}
        if len(rest) < 2:
            return self._error(404, "EntryNotFound", "No such API route")
        repo_id = f"{rest[0]}/{rest[1]}"
        tail = rest[2:]
        if self.command == "POST" and len(tail) >= 2 and tail[0] == "paths-info":
            repo, commit = self._lookup_repo(repo_id, "/".join(tail[1:]))
            if repo is None:
                return
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n).decode() if n else ""
            ctype = self.headers.get("Content-Type", "")
            if "json" in ctype:
                paths = json.loads(raw or "{}").get("paths", [])
            else:
                paths = urllib.parse.parse_qs(raw).get("paths", [])
            if isinstance(paths, str):
                paths = [paths]
            items = []
            for s in self._siblings(repo, paths):
                items.append({"type": "file", "path": s["path"], "size": s["size"], "oid": s["oid"],
                              "lfs": {"oid": s["lfs"]["sha256"], "size": s["size"], "pointerSize": 134},
                              "lastCommit": {"id": commit, "title": "gpubox hfserver", "date": "2026-01-01T00:00:00.000Z"}})
            return self._json(200, items)
        if self.command not in ("GET", "HEAD"):
            return self._error(404, "EntryNotFound", "No such API route")
        revision = "main"
        if len(tail) >= 2 and tail[0] == "revision":
            revision = "/".join(tail[1:])
        elif tail:
            return self._error(404, "EntryNotFound", "No such API route")
        repo, commit = self._lookup_repo(repo_id, revision)
        if repo is None:
            return
        siblings = self._siblings(repo)
        self._json(200, {"_id": commit[:24], "id": repo_id, "modelId": repo_id, "sha": commit,
                         "private": False, "gated": False, "disabled": False, "tags": ["gguf"],
                         "lastModified": "2026-01-01T00:00:00.000Z",
                         "siblings": [{"rfilename": s["rfilename"], "size": s["size"], "blobId": s["oid"],
                                       "lfs": s["lfs"]} for s in siblings],
                         "usedStorage": sum(s["size"] for s in siblings)})


class HFServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, root: str, rate: float = 0, corrupt: dict | None = None, token: str = "",
                 log: str | None = None, no_sha: bool = False, no_size: bool = False, truncate: dict | None = None):
        self.store = Store(root)
        self.rate = float(rate or 0)
        self.corrupt = corrupt or {}
        self.token = token
        self.no_sha, self.no_size = no_sha, no_size
        self.truncate = truncate or {}
        self.log_path = log
        self.requests: list[dict] = []
        self._log_lock = threading.Lock()
        super().__init__(addr, Handler)

    def record(self, entry: dict):
        with self._log_lock:
            self.requests.append(entry)
            if self.log_path:
                with open(self.log_path, "a") as f:
                    f.write(json.dumps(entry) + "\n")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def bytes_sent(self, path_contains: str = "") -> int:
        with self._log_lock:
            return sum(e["sent"] for e in self.requests if path_contains in e["path"] and "/resolve/" in e["path"])


def parse_corrupt(values: list[str]) -> dict[str, list[int]]:
    """['org/name/file@123', ...] -> {'org/name/file': [123]}"""
    out: dict[str, list[int]] = {}
    for v in values or []:
        key, sep, off = v.rpartition("@")
        if not sep or not key or not off.isdigit() or key.count("/") < 2:
            raise ValueError(f"--corrupt wants ORG/NAME/FILE@OFFSET, got {v!r}")
        out.setdefault(key, []).append(int(off))
    return out


def start(root: str, host: str = "127.0.0.1", port: int = 0, **kw) -> tuple[HFServer, threading.Thread]:
    """Start a server in a background thread (for tests and benchmarks); call srv.shutdown() to stop."""
    srv = HFServer((host, port), root, **kw)
    t = threading.Thread(target=srv.serve_forever, name="hfserver", daemon=True)
    t.start()
    return srv, t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m testbed.hfserver", description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, help="directory holding <org>/<name>/<file>")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 = any free port (printed)")
    ap.add_argument("--rate", type=float, default=0, help="bytes per second per response body (0 = unlimited)")
    ap.add_argument("--corrupt", action="append", default=[], metavar="ORG/NAME/FILE@OFFSET",
                    help="flip the byte at OFFSET of that file when sending it (repeatable)")
    ap.add_argument("--token", default=os.environ.get("GPUBOX_HFSERVER_TOKEN", ""),
                    help="require 'Authorization: Bearer TOKEN' (default: env GPUBOX_HFSERVER_TOKEN)")
    ap.add_argument("--log", default=None, help="append one JSON line per request to this file")
    ap.add_argument("--no-sha", action="store_true", help="report no sha256 (no X-Linked-Etag)")
    ap.add_argument("--no-size", action="store_true", help="report no size (bodies end at connection close)")
    ap.add_argument("--truncate", action="append", default=[], metavar="ORG/NAME/FILE@OFFSET",
                    help="end every body at this byte of the file (repeatable)")
    a = ap.parse_args(argv)
    if not os.path.isdir(a.root):
        print(f"hfserver: --root {a.root} is not a directory", file=sys.stderr)
        return 2
    try:
        corrupt = parse_corrupt(a.corrupt)
    except ValueError as e:
        print(f"hfserver: {e}", file=sys.stderr)
        return 2
    srv = HFServer((a.host, a.port), a.root, rate=a.rate, corrupt=corrupt, token=a.token, log=a.log,
                   no_sha=a.no_sha, no_size=a.no_size,
                   truncate={k: v[0] for k, v in parse_corrupt(a.truncate).items()})
    print(f"hfserver: serving {os.path.abspath(a.root)} on {srv.url}", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
