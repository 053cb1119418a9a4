"""The models step's code that runs ON THE TARGET (the GPU box), not on the controller.

The models step (provision/steps/models.py) sends this file, after provision/ggufhead.py, with
provision/remote.py, because the 16 GB files must land on the GPU box: `inspect` is its fact (what is
on disk, what the lock says, the Hub's metadata only for what the lock does not answer) and `boot` its
download (a JSON spec; the token alone on stdin). It runs there with the target's python3 and
huggingface_hub; the standard library covers the rest. It can also be run by hand, with ggufhead.py
beside it:  python3 fetch.py download --spec spec.json   |   python3 fetch.py header FILE.gguf

What it does for each file of the spec:

* Asks the Hub for the file's metadata with huggingface_hub's own helpers (`hf_hub_url`,
  `get_hf_file_metadata`: resolved commit, size, X-Linked-Etag = the LFS sha256, storage location),
  honouring HF_ENDPOINT and the token (spec, else HF_TOKEN / the token file, as huggingface_hub does).
  The token is never printed: every message is scrubbed of it.
* Checks free disk at the destination against the bytes still to fetch plus models.reserve_gb,
  for all files, before any byte is transferred.
* Downloads into a hidden partial file `.<file>.gpubox-partial` in the destination directory, with a
  sidecar `.<file>.gpubox-partial.json` naming the repo, commit, size and expected sha256.
  WHY our own partial file: huggingface_hub >= 1.18 (2.4.0 included) opens its temporary file with
  "wb" and restarts a killed download from byte 0, leaving the old `.incomplete` behind
  (docs/downloads.md; see `_hf`). We keep the partial ourselves and ask for the rest with
  `Range: bytes=N-` through the library's own HTTP session (`Fetcher._get`, which also reopens a
  connection dropped within one run). A partial whose sidecar names another commit/size/hash is
  discarded, so nothing stray or mixed survives.
* Computes sha256 while bytes arrive (on a worker thread: hashlib releases the GIL, so hashing
  overlaps the network). hashlib cannot serialise a half-finished sha256, so on resume the bytes
  already on disk are re-hashed once, sequentially (about 1-3 s per GB on a local disk: 16 GB at
  ~1 GB/s is ~16 s, against minutes to re-download them; the cost is reported as rehash_s).
  Periodic checkpoints would need a resumable sha256 implementation, not worth it for that saving.
* Expected sha256: the pinned one (config), else the lock's, else the Hub's X-Linked-Etag.
  Mismatch -> the partial is deleted, the file never appears under its final name, and the error
  names both hashes. Only a complete, verified file is renamed to its final name (fsync, rename,
  fsync of the directory), owned by the configured user.
* No sha256 known at all (none pinned, none locked for this commit, none from the Hub): refused before
  any byte is fetched, unless the file opts in (`allow_unverified`); then its size must be known (a
  body cut short is otherwise indistinguishable from a whole file), the bytes received must be exactly
  that size, and the result says `verified: false` (so does the lock). docs/downloads.md.
* A partial is continued only when its sidecar names the same repo, file, commit, size, expected
  sha256 AND ETag as the Hub reports now; anything else starts over from byte 0, so an old prefix is
  never joined to changed bytes.
* Reads `general.architecture` from the GGUF header (provision/ggufhead.py, which stops after that key)
  and checks it against the expected one (the assistant file against the fork profile). A mismatch is
  reported after the verified file is in place and locked,
  so switching the build profile needs no new download.

Progress: "bar" (a \\r progress bar with bytes, rate, ETA, on a terminal), "lines" (a plain line every
`progress_interval` s, for CI logs), "machine" (`@@progress {json}` lines the models step renders on the
controller). Results: one `@@result {json}` line; failures: `@@error {json}` lines and exit status 3.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import queue
import re
import sys
import threading
import time

PARTIAL_SUFFIX = ".gpubox-partial"
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
HEX40_RE = re.compile(r"^[0-9a-f]{40}$")
EXIT_FAILED = 3
CHUNK_SIZE = 1 << 20

class FetchError(Exception):
    def __init__(self, kind: str, message: str, fix: str = "", **extra):
        self.kind, self.message, self.fix, self.extra = kind, message, fix, extra
        super().__init__(message)

    def as_dict(self) -> dict:
        return {"kind": self.kind, "message": self.message, "fix": self.fix, **self.extra}


# --- GGUF header and progress: provision/ggufhead.py, provision/progress.py ---------------------------------------------------------------

try:    # in the provision package (the controller, tests)
    from .ggufhead import GGUFError, architecture, read_header
    from .progress import Progress, human
except ImportError:    # on the target: provision/remote.py ran their sources first, into this namespace
    if "architecture" not in globals():    # run by hand as a script, with ggufhead.py and progress.py beside it
        from ggufhead import GGUFError, architecture, read_header  # type: ignore
        from progress import Progress, human  # type: ignore


# --- hashing and progress -----------------------------------------------------------------------------

class Sha256Worker:
    """sha256 on a worker thread (hashlib releases the GIL for large buffers), fed in order."""

    def __init__(self):
        self._h = hashlib.sha256()
        self._q: queue.Queue = queue.Queue(maxsize=8)
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            if item is _RESET:
                self._h = hashlib.sha256()
            else:
                self._h.update(item)

    def update(self, data: bytes):
        self._q.put(data)

    def reset(self):
        self._q.put(_RESET)

    def hexdigest(self) -> str:
        self._q.put(None)
        self._t.join()
        return self._h.hexdigest()


_RESET = object()


class NoHash:
    """For the benchmark's baseline only (download without hashing)."""

    def update(self, data):
        pass

    def reset(self):
        pass

    def hexdigest(self):
        return ""


class _OwnSide(Exception):
    """An error of the writer (disk, progress output) inside Fetcher._get: not a network error to retry."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class HashingWriter:
    """The file object Fetcher._get writes to: writes, hashes and reports progress.

    _get calls write(); when a server ignores Range and answers 200 it rewinds with
    seek(0) and truncate(): the hash then restarts too."""

    def __init__(self, f, hasher, start: int, progress: Progress | None):
        self.f, self.h, self.pos, self.progress = f, hasher, start, progress
        self.received = 0

    def write(self, data: bytes) -> int:
        self.f.write(data)
        self.h.update(bytes(data))
        self.pos += len(data)
        self.received += len(data)
        if self.progress:
            self.progress.update(self.pos)
        return len(data)

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0 or pos not in (0, self.pos):
            raise OSError("gpubox fetch: unexpected seek while downloading")
        if pos == 0 and self.pos:
            self.h.reset()
            self.pos = 0
        self.f.seek(pos)
        return pos

    def truncate(self, size: int | None = None) -> int:
        return self.f.truncate(self.pos if size is None else size)

    def flush(self):
        self.f.flush()


# --- the download -------------------------------------------------------------------------------------

def _hf():
    """huggingface_hub, imported after HF_* variables are set (it reads them at import).

    Only its public API: hf_hub_url and get_hf_file_metadata (the resolved commit, size, sha256 and storage
    location), build_hf_headers (token, user agent), and utils.http_stream_backoff (its HTTP session with
    retries) for the transfer. Not hf_hub_download: it cannot continue a download across runs. In
    huggingface_hub 2.4.0 (file_download._download_to_tmp_and_move) every call writes to a new
    `<etag>.<uuid4>.incomplete` opened with "wb" and deletes nothing it did not finish, so a killed 16 GB
    download starts again at byte 0 (docs/downloads.md; 1.18 and newer behave so). gpubox keeps its own
    partial file and asks for the rest with `Range: bytes=N-` (Fetcher._get)."""
    try:
        import huggingface_hub as hh  # type: ignore
        from huggingface_hub import utils as hu  # type: ignore
    except ImportError as e:
        raise FetchError("dependency", f"huggingface_hub is not importable by {sys.executable}: {e}",
                         "install it on the target (dnf install python3-huggingface-hub, or pip install --user "
                         "'huggingface_hub>=1.18') and run again")
    hu.disable_progress_bars()  # our own progress (bar / lines / machine), not tqdm's
    return hh, hu


def partial_paths(final: str) -> tuple[str, str]:
    d, name = os.path.split(final)
    p = os.path.join(d, "." + name + PARTIAL_SUFFIX)
    return p, p + ".json"


def sha256_file(path: str, upto: int | None = None, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    left = upto
    with open(path, "rb") as f:
        while left is None or left > 0:
            b = f.read(chunk if left is None else min(chunk, left))
            if not b:
                break
            h.update(b)
            if left is not None:
                left -= len(b)
    return h.hexdigest()


def free_bytes(path: str) -> int:
    p = path
    while not os.path.exists(p):
        p = os.path.dirname(p) or "/"
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


class Fetcher:
    def __init__(self, spec: dict, out=None):
        self.spec = spec
        self.out = out or sys.stdout
        self.token = spec.get("token") or None
        self.mode = spec.get("progress") or "auto"
        if self.mode == "auto":
            self.mode = "bar" if sys.stderr.isatty() else "lines"
        self.interval = float(spec.get("progress_interval") or 10)
        self.hash = spec.get("hash", True)
        self.timeout = float(spec.get("metadata_timeout") or 10)
        self.owner = self._owner(spec.get("owner") or "")
        self.dir = self._expand(spec["dir"])
        self._hf = None

    # -- helpers --
    def scrub(self, text: str) -> str:
        return text.replace(self.token, "***") if self.token else text

    def say(self, line: str):
        self.out.write(self.scrub(line) + "\n")
        self.out.flush()

    def _owner(self, name: str):
        import pwd
        try:
            pw = pwd.getpwnam(name) if name else pwd.getpwuid(os.geteuid())
        except KeyError:
            raise FetchError("config", f"user {name!r} does not exist on this host", "set gpubox.user to an existing user")
        return pw

    def _expand(self, path: str) -> str:
        if path == "~" or path.startswith("~/"):
            return self.owner.pw_dir.rstrip("/") + path[1:]
        return path

    def _chown(self, path: str):
        if os.geteuid() == 0 and (self.owner.pw_uid, self.owner.pw_gid) != (0, 0):
            os.chown(path, self.owner.pw_uid, self.owner.pw_gid)

    def hf(self):
        if self._hf is None:
            ep = self.spec.get("endpoint")
            if ep:
                os.environ["HF_ENDPOINT"] = ep
            # Plain HTTP with ranges is what we continue; the Xet path would bypass our partial file.
            os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
            self._hf = _hf()
        return self._hf

    def endpoint(self) -> str | None:
        return self.spec.get("endpoint") or os.environ.get("HF_ENDPOINT") or None

    def metadata(self, f: dict, revision: str):
        hh, _ = self.hf()
        url = hh.hf_hub_url(f["repo"], f["filename"], revision=revision, endpoint=self.endpoint())
        try:
            try:
                return hh.get_hf_file_metadata(url, token=self.token, timeout=self.timeout, retry_on_errors=True)
            except TypeError:  # huggingface_hub < 1.0 has no retry_on_errors
                return hh.get_hf_file_metadata(url, token=self.token, timeout=self.timeout)
        except Exception as e:
            name = type(e).__name__
            fix = {"RevisionNotFoundError": f"check models.files.{f['key']}.revision (branch, tag or commit)",
                   "EntryNotFoundError": f"check models.files.{f['key']}.filename",
                   "RemoteEntryNotFoundError": f"check models.files.{f['key']}.filename",
                   "RepositoryNotFoundError": f"check models.files.{f['key']}.repo, or set HF_TOKEN for a private repo",
                   "GatedRepoError": "accept the model's terms on the Hub and set HF_TOKEN"}.get(
                name, "check the network and HF_ENDPOINT, then run again (partial files are kept and resumed)")
            raise FetchError("http", f"{f['repo']}/{f['filename']}@{revision}: {name}: {self.scrub(str(e)).splitlines()[0] if str(e) else ''}",
                             fix, file=f["key"])

    # -- per-file plan --
    def prepare(self, f: dict) -> dict:
        """Decide what to do for one file; may ask the Hub for metadata (never for a locked, intact file)."""
        final = os.path.join(self.dir, f["filename"])
        partial, side = partial_paths(final)
        st = os.stat(final) if os.path.exists(final) else None
        known = f.get("known") or {}
        update = bool(f.get("update"))
        pinned = (f.get("sha256") or "").lower()
        locked_sha = (known.get("sha256") or "").lower()
        job = dict(f, final=final, partial=partial, sidecar=side, have=0)
        if (st and not update and known.get("commit") and known.get("size") == st.st_size
                and known.get("mtime_ns") == st.st_mtime_ns and (not pinned or pinned == locked_sha)
                and (known.get("verified") is not False or f.get("allow_unverified"))):
            job.update(action="kept", commit=known["commit"], sha256=locked_sha, size=st.st_size, transfer=0)
            return job
        # Which revision to ask for: the lock's commit (unless updating), else the configured revision.
        revision = f["revision"]
        if known.get("commit") and not update:
            revision = known["commit"]
        meta = self.metadata(f, revision)
        commit = meta.commit_hash or (revision if HEX40_RE.match(revision) else "")
        remote_sha = (meta.etag or "").lower().strip('"')
        remote_sha = remote_sha if SHA256_RE.match(remote_sha) else ""
        if known.get("verified") is False:
            locked_sha = ""          # a hash gpubox computed itself vouches for nothing
        expected = pinned or (locked_sha if known.get("commit") == commit and locked_sha else "") or remote_sha
        source = "config" if pinned else ("lock" if expected and expected == locked_sha else ("hub" if expected else ""))
        if not expected:
            self._unverified(f, commit, meta.size)
        if pinned and remote_sha and pinned != remote_sha:
            raise FetchError(
                "sha256", f"{f['filename']}: the pinned sha256 {pinned} (models.files.{f['key']}.sha256) differs from the "
                f"sha256 the Hub reports for {f['repo']}@{commit[:12]}: {remote_sha}; nothing downloaded",
                f"fix models.files.{f['key']}.sha256 (or set it to \"\" to trust the Hub), or pin the revision that has this hash",
                file=f["key"], expected=pinned, actual=remote_sha)
        etag = (meta.etag or "").strip()
        job.update(commit=commit, expected=expected, expected_from=source, size=meta.size, location=meta.location,
                   etag=etag)
        if st and (meta.size is None or st.st_size == meta.size) and expected:
            job.update(action="verify", transfer=0)
            return job
        have = 0
        if os.path.exists(partial):
            try:
                with open(side) as fh:
                    s = json.load(fh)
            except (OSError, ValueError):
                s = {}
            psize = os.path.getsize(partial)
            same = (s.get("repo") == f["repo"] and s.get("filename") == f["filename"] and s.get("commit") == commit
                    and s.get("size") == meta.size and s.get("expected") == expected and s.get("etag") == etag
                    and (meta.size is None or psize <= meta.size))
            if same:
                have = psize
            else:
                if psize:
                    self.say(f"{f['filename']}: the partial file is for other bytes (commit, size, sha256 or ETag "
                             "changed since it was started): starting over")
                self._discard(partial, side)
        job.update(action="resume" if have else "download", have=have,
                   transfer=(meta.size - have) if meta.size is not None else None)
        return job

    def _unverified(self, f: dict, commit: str, size) -> None:
        """No sha256 known: refuse, unless this file opts in and its size is known."""
        key, where = f["key"], f"{f['repo']}@{(commit or f['revision'])[:12]}"
        if not f.get("allow_unverified"):
            raise FetchError(
                "unverified", f"{f['filename']}: no sha256 is known for {where}: models.files.{key}.sha256 is "
                "empty, the lock has none for this commit, and the Hub reports none; gpubox does not put a file "
                "it cannot verify in place. Nothing was downloaded.",
                f"pin it: --set models.files.{key}.sha256=<the file's sha256 from the model page>, or accept it "
                f"unverified: --set models.files.{key}.allow_unverified=true (the lock then says verified: false)",
                file=key)
        if size is None:
            raise FetchError(
                "unverified", f"{f['filename']}: neither a sha256 nor a size is known for {where}: a download cut "
                "short could not be told from a whole file, so it is refused even with allow_unverified. Nothing "
                "was downloaded.", f"pin models.files.{key}.sha256, or use an endpoint that reports the size",
                file=key)

    def _discard(self, partial: str, side: str):
        for p in (partial, side):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass

    def preflight(self, jobs: list[dict]):
        need = sum(j["transfer"] or 0 for j in jobs if j["action"] in ("download", "resume"))
        unknown = [j["filename"] for j in jobs if j["action"] in ("download", "resume") and j["transfer"] is None]
        reserve = int(self.spec.get("reserve_bytes") or 0)
        free = free_bytes(self.dir)
        if need and need + reserve > free:
            raise FetchError(
                "disk", f"not enough free disk at {self.dir}: {human(need)} to download + {human(reserve)} reserve "
                f"(models.reserve_gb) = {human(need + reserve)}, but only {human(free)} free; nothing downloaded",
                "free space there, set models.dir to a bigger filesystem, or lower models.reserve_gb",
                need=need, reserve=reserve, free=free)
        return {"need": need, "free": free, "reserve": reserve, "unknown_size": unknown}

    # -- transfer --
    def run_job(self, job: dict) -> dict:
        t0 = time.monotonic()
        res = {k: job.get(k) for k in ("key", "repo", "filename", "revision", "commit", "size")}
        res.update(path=job["final"], action=job["action"], transferred=0, resumed_from=0, rehash_s=0.0)
        if job["action"] == "kept":
            res["sha256"] = job["sha256"]
            res["verified"] = (job.get("known") or {}).get("verified", True) is not False
        elif job["action"] == "verify":
            actual = sha256_file(job["final"])
            if actual != job["expected"]:
                # The file under the final name is not the wanted one (another revision, edited, damaged): fetch it.
                self.say(f"{job['filename']}: existing file has sha256 {actual}, expected {job['expected']} "
                         f"({job['expected_from']}): downloading it again")
                job.update(action="download", have=0, transfer=job["size"])
                self._discard(job["partial"], job["sidecar"])
                return self.run_job(job)
            res.update(sha256=actual, verified=True, expected_from=job["expected_from"])
        else:
            res.update(self._transfer(job))
        st = os.stat(job["final"])
        if job["action"] != "kept":
            self._chown(job["final"])
        res.update(size=st.st_size, mtime_ns=st.st_mtime_ns, seconds=round(time.monotonic() - t0, 3))
        try:
            res["arch"] = architecture(job["final"])
        except (OSError, ValueError, GGUFError) as e:
            raise FetchError("header", f"{job['filename']}: the GGUF header cannot be read: {e}",
                             "the file is not a GGUF model: check models.files.*.filename", file=job["key"])
        return res

    def _transfer(self, job: dict) -> dict:
        import fcntl
        _, hu = self.hf()
        os.makedirs(self.dir, exist_ok=True)
        partial, side = job["partial"], job["sidecar"]
        with open(side + ".tmp", "w") as fh:
            json.dump({k: job.get(k) for k in ("repo", "filename", "revision", "commit", "size", "expected", "etag")}, fh)
        os.replace(side + ".tmp", side)
        self._chown(side)
        fh = open(partial, "a+b")
        try:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise FetchError("busy", f"{job['filename']}: another download of this file is running (lock on {partial})",
                                     "wait for it to finish (or end it) and run again", file=job["key"])
                raise
            self._chown(partial)
            have = os.fstat(fh.fileno()).st_size
            if job["size"] is not None and have > job["size"]:
                fh.truncate(0)
                have = 0
            hasher = Sha256Worker() if self.hash else NoHash()
            rehash = 0.0
            if have and self.hash:
                # Resume: hashlib cannot restore a saved sha256 state, so re-hash what is on disk, once.
                r0 = time.monotonic()
                with open(partial, "rb") as rf:
                    left = have
                    while left > 0:
                        b = rf.read(min(8 << 20, left))
                        if not b:
                            break
                        hasher.update(b)
                        left -= len(b)
                rehash = time.monotonic() - r0
            if have:
                self.say(f"{job['filename']}: resuming at {human(have)} of {human(job['size'] or 0)} "
                         f"(re-hashed the partial file in {rehash:.1f}s)")
            fh.seek(have)
            progress = Progress(job["filename"], total=job["size"], style=self.mode, initial=have,
                                every_s={"bar": 0.2, "machine": 0.5}.get(self.mode, self.interval),
                                out=self.out if self.mode != "bar" else None)
            w = HashingWriter(fh, hasher, have, progress)
            headers = hu.build_hf_headers(token=self.token)
            headers["Accept-Encoding"] = "identity"
            t0 = time.monotonic()
            try:
                self._get(job["location"], w, headers, job["size"])
            except Exception as e:
                fh.flush()
                raise FetchError("http", f"{job['filename']}: download interrupted at {human(w.pos)}: "
                                 f"{type(e).__name__}: {self.scrub(str(e)).splitlines()[0] if str(e) else ''}",
                                 "run again: the partial file is kept and resumed", file=job["key"])
            dt = time.monotonic() - t0
            progress.update(w.pos, final=True)
            fh.flush()
            os.fsync(fh.fileno())
            actual = hasher.hexdigest()
            if job["size"] is not None and w.pos != job["size"]:
                # Never final: a short body is kept for the next run to continue, a long one discarded.
                if w.pos > job["size"]:
                    self._discard(partial, side)
                raise FetchError(
                    "size", f"{job['filename']}: received {w.pos} bytes, the Hub reports {job['size']}; the file was "
                    "NOT moved into place", "run again (a short partial file is continued)", file=job["key"])
            if self.hash and not job["expected"] and not job.get("allow_unverified"):
                self._discard(partial, side)
                raise FetchError("unverified", f"{job['filename']}: no sha256 to verify against; the file was NOT "
                                 "moved into place", "pin models.files.*.sha256", file=job["key"])
            if self.hash and job["expected"] and actual != job["expected"]:
                self._discard(partial, side)
                raise FetchError(
                    "sha256", f"{job['filename']}: sha256 of the downloaded bytes is {actual}, expected {job['expected']} "
                    f"(from {job['expected_from']}); the file was NOT moved into place and the partial was deleted",
                    "run again to re-download; if it repeats, the mirror/HF_ENDPOINT serves other bytes than it "
                    f"advertises, or models.files.{job['key']}.sha256 is wrong", file=job["key"],
                    expected=job["expected"], actual=actual)
            os.chmod(partial, 0o644)
            os.replace(partial, job["final"])
        finally:
            fh.close()
        try:
            os.unlink(side)
        except FileNotFoundError:
            pass
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return {"sha256": actual or job["expected"], "transferred": w.received, "resumed_from": have,
                "rehash_s": round(rehash, 3), "transfer_s": round(dt, 3),
                "expected_from": job["expected_from"], "verified": bool(self.hash and job["expected"])}

    def _get(self, url: str, w: "HashingWriter", headers: dict, size: int | None, tries: int = 5) -> None:
        """GET url into w from w.pos on (`Range: bytes=N-`), CHUNK_SIZE bytes per write (what a kill loses, and
        the progress step). A connection dropped mid-body is reopened at the new position, `tries` times in a
        row without progress; a server that ignores Range (200) makes w start over; HTTP errors are raised.
        An error of our own side (writing the partial file, or the progress output: a broken pipe once the
        controller's SSH session is gone) is raised at once, never retried: the downloader then stops with
        the partial file kept, instead of finishing a download nobody is waiting for."""
        hh, hu = self.hf()
        from huggingface_hub.errors import HfHubHTTPError  # type: ignore
        left = tries
        while size is None or w.pos < size:
            h = dict(headers, Range=f"bytes={w.pos}-") if w.pos else dict(headers)
            before = w.pos
            try:
                # retry_on_exceptions=(): an error in the body must come here (to reopen at w.pos), not
                # restart the request from byte 0 inside the library (huggingface_hub's http_get does the same).
                with hu.http_stream_backoff("GET", url, headers=h, timeout=hh.constants.HF_HUB_DOWNLOAD_TIMEOUT,
                                            retry_on_exceptions=(), retry_on_status_codes=(408, 429)) as r:
                    hu.hf_raise_for_status(r)
                    if w.pos and r.status_code == 200:
                        w.seek(0)
                        w.truncate()
                    for chunk in r.iter_bytes(chunk_size=CHUNK_SIZE):
                        if chunk:
                            try:
                                w.write(chunk)
                            except Exception as e:
                                raise _OwnSide(e) from e
                if size is None:
                    return
                if w.pos == before:
                    raise OSError(f"the server sent no bytes at offset {w.pos} of {size}")
            except _OwnSide as e:
                raise e.error from None
            except HfHubHTTPError:
                raise
            except Exception:
                left = tries if w.pos > before else left - 1
                if left <= 0:
                    raise

    def run(self) -> dict:
        created = not os.path.isdir(self.dir)
        os.makedirs(self.dir, exist_ok=True)
        if created:
            self._chown(self.dir)
        jobs = [self.prepare(f) for f in self.spec["files"]]
        disk = self.preflight(jobs)
        for j in jobs:
            if j["action"] != "kept":
                what = {"download": f"downloading {human(j['transfer'] or 0)}", "resume": f"resuming, {human(j['transfer'] or 0)} left",
                        "verify": "verifying the existing file"}[j["action"]]
                self.say(f"{j['filename']}: {what} ({j['repo']}@{(j.get('commit') or '')[:12]})")
        results, errors = [], []
        for j in jobs:
            res = self.run_job(j)
            want = j.get("expect_arch") or ""
            if want and res.get("arch") != want:
                errors.append(FetchError(
                    "arch", f"{j['filename']} has general.architecture {res.get('arch')!r}, but the fork build "
                    f"(profile {self.spec.get('profile', '?')}) loads {want!r}",
                    self.spec.get("arch_fix") or "pick the matching revision or build profile", file=j["key"],
                    expected=want, actual=res.get("arch")).as_dict())
            results.append(res)
        return {"files": results, "disk": disk, "errors": errors}


def run_spec(spec: dict, out=None) -> int:
    """Entry point of the bootstrap: run the spec, print @@result / @@error lines, return the exit status."""
    out = out or sys.stdout
    token = spec.get("token") or ""

    def emit(tag: str, obj):
        text = json.dumps(obj)
        if token:
            text = text.replace(token, "***")
        out.write(f"@@{tag} {text}\n")
        out.flush()

    try:
        f = Fetcher(spec, out=out)
        result = f.run()
    except FetchError as e:
        emit("error", e.as_dict())
        return EXIT_FAILED
    emit("result", result)
    for e in result["errors"]:
        emit("error", e)
    return EXIT_FAILED if result["errors"] else 0


def boot(spec_json: str) -> int:
    """The models step's entry (provision/remote.py): the spec from the command line, the token, when the
    spec says one comes, from the first line of stdin (never on a command line or in a log)."""
    spec = json.loads(spec_json)
    if spec.get("token_stdin"):
        spec["token"] = sys.stdin.readline().strip() or None
    return run_spec(spec)


def inspect(args_json: str, models_dir: str, lock_path: str) -> int:
    """The models step's fact: per configured file its size/mtime/owner and any partial file, the lock, free
    disk at models.dir, whether huggingface_hub imports, and the Hub's metadata (size, commit, sha256) only
    for files the lock does not describe (all of them with update): one JSON line, no download."""
    import pwd
    a = json.loads(args_json)
    out = {"dir": models_dir, "files": {}, "lock": None, "remote": {}, "free": None, "hf": None, "owner_uid": None}
    try:
        out["owner_uid"] = (pwd.getpwnam(a["owner"]) if a["owner"] else pwd.getpwuid(os.geteuid())).pw_uid
    except KeyError:
        pass
    try:
        with open(lock_path) as fh:
            out["lock"] = json.load(fh)
    except FileNotFoundError:
        pass
    except Exception as e:
        out["lock"] = {"_error": "%s: %s" % (type(e).__name__, e)}
    p = models_dir
    while not os.path.exists(p):
        p = os.path.dirname(p) or "/"
    try:
        st = os.statvfs(p)
        out["free"] = st.f_bavail * st.f_frsize
    except OSError:
        pass
    models = (out["lock"] or {}).get("models", {}) if isinstance(out["lock"], dict) else {}
    need = []
    for k, f in a["files"].items():
        final = os.path.join(models_dir, f["filename"])
        e = {}
        try:
            s = os.stat(final)
            e.update(size=s.st_size, mtime_ns=s.st_mtime_ns, uid=s.st_uid)
        except OSError:
            pass
        try:
            e["partial"] = os.stat(partial_paths(final)[0]).st_size
        except OSError:
            pass
        out["files"][k] = e
        le = models.get(k) if isinstance(models.get(k), dict) else {}
        locked = (le.get("repo") == f["repo"] and le.get("filename") == f["filename"]
                  and f["revision"] in (le.get("revision"), le.get("commit")))
        if a["update"] or not locked:
            need.append(k)
    out["hf"], out["remote"] = _remote_metadata(a, need)
    print(json.dumps(out))
    return 0


def _remote_metadata(a: dict, keys: list) -> tuple:
    """(huggingface_hub's version or None, {key: {size, commit, sha256} or {error}}) for these files."""
    if a["endpoint"]:
        os.environ["HF_ENDPOINT"] = a["endpoint"]
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
    try:
        import huggingface_hub as hh
        from huggingface_hub import utils as hu
        hu.disable_progress_bars()
    except Exception:
        return None, {}
    remote = {}
    for k in keys:
        f = a["files"][k]
        try:
            url = hh.hf_hub_url(f["repo"], f["filename"], revision=f["revision"], endpoint=a["endpoint"] or None)
            m = hh.get_hf_file_metadata(url, timeout=a["timeout"])
            remote[k] = {"size": m.size, "commit": m.commit_hash, "sha256": (m.etag or "").strip('"')}
        except Exception as e:
            remote[k] = {"error": type(e).__name__}
    return hh.__version__, remote


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fetch.py", description="gpubox model downloader (runs on the target)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("download", help="download/verify the files of a JSON spec (token from HF_TOKEN)")
    d.add_argument("--spec", required=True, help="JSON file, or - for stdin")
    d.add_argument("--progress", choices=["auto", "bar", "lines", "machine"], default=None)
    d.add_argument("--no-hash", action="store_true", help="benchmark baseline only: skip sha256")
    h = sub.add_parser("header", help="print general.architecture and the first header keys of a GGUF")
    h.add_argument("path")
    a = ap.parse_args(argv)
    if a.cmd == "header":
        hdr = read_header(a.path, stop_at="general.architecture")
        print(json.dumps({"arch": architecture(a.path), "version": hdr["version"], "kv": hdr["metadata"]},
                         default=str))
        return 0
    spec = json.load(sys.stdin if a.spec == "-" else open(a.spec))
    spec.setdefault("token", os.environ.get("HF_TOKEN") or None)
    if a.progress:
        spec["progress"] = a.progress
    if a.no_hash:
        spec["hash"] = False
    return run_spec(spec)


if __name__ == "__main__":
    sys.exit(main())
