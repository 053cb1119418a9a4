"""fetch.py (the target-side downloader) run locally against a real hfserver with the real huggingface_hub:
fresh download, already present, SIGKILL mid-transfer then resume, corrupted byte, wrong pinned hash,
disk preflight, architecture mismatch, token never printed, header readers."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from provision import fetch, remote
from provision.steps import models as models_step
from testbed import hfserver
from testbed.testmodels import write_tiny

REPO = "AtomicChat/tiny-assistant-GGUF"
NAME = "tiny-assistant.Q4_K_M.gguf"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    p = write_tiny(root / REPO / NAME, general_arch="gemma4-assistant", n_embd=256, n_layers=4, n_ff=512)
    return root, p.read_bytes()


def serve(root, **kw):
    return hfserver.start(str(root), **kw)[0]


def spec(srv, dest, **file_kw):
    f = {"key": "assistant", "repo": REPO, "filename": NAME, "revision": "main", **file_kw}
    return {"dir": str(dest), "endpoint": srv.url, "progress": "machine", "files": [f]}


def run(sp):
    out = io.StringIO()
    rc = fetch.run_spec(sp, out=out)
    lines = out.getvalue().splitlines()
    tagged = {t: [json.loads(x.split(" ", 1)[1]) for x in lines if x.startswith(f"@@{t} ")] for t in ("result", "error")}
    return rc, tagged, out.getvalue()


def gets(srv):
    return [r for r in srv.requests if r["method"] == "GET" and "/resolve/" in r["path"]]


def leftovers(dest):
    return sorted(p.name for p in Path(dest).iterdir() if p.name.startswith("."))


def test_fresh_download_then_present_means_no_transfer(models, tmp_path):
    root, data = models
    srv = serve(root)
    try:
        rc, t, _ = run(spec(srv, tmp_path / "m"))
        assert rc == 0, t
        (r,) = t["result"][0]["files"]
        assert r["sha256"] == hashlib.sha256(data).hexdigest() and r["verified"] and r["expected_from"] == "hub"
        assert r["arch"] == "gemma4-assistant" and r["transferred"] == len(data) and len(r["commit"]) == 40
        assert (tmp_path / "m" / NAME).read_bytes() == data and leftovers(tmp_path / "m") == []
        # With what the lock would hold: no request at all.
        srv.requests.clear()
        known = {k: r[k] for k in ("commit", "sha256", "size", "mtime_ns")}
        rc, t, _ = run(spec(srv, tmp_path / "m", known=known))
        assert rc == 0 and t["result"][0]["files"][0]["action"] == "kept" and srv.requests == []
        # Without a lock: HEAD + hash of the existing file, still no GET.
        rc, t, _ = run(spec(srv, tmp_path / "m"))
        assert rc == 0 and t["result"][0]["files"][0]["action"] == "verify" and gets(srv) == []
    finally:
        srv.shutdown()


def test_sigkill_mid_transfer_then_resume_from_the_partial(models, tmp_path):
    root, data = models
    size = len(data)
    srv = serve(root, rate=size / 3)          # ~3 s for the whole file
    dest = tmp_path / "m"
    sp = spec(srv, dest, known={})
    sp_file = tmp_path / "spec.json"
    sp_file.write_text(json.dumps(sp))
    partial = dest / f".{NAME}.gpubox-partial"
    try:
        p = subprocess.Popen([sys.executable, "-m", "provision.fetch", "download", "--spec", str(sp_file)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (partial.exists() and partial.stat().st_size >= size // 2):
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        have = partial.stat().st_size
        assert size // 2 <= have < size, (have, size)
        assert not (dest / NAME).exists()                     # never visible under the final name
        assert (dest / f".{NAME}.gpubox-partial.json").exists()
        first = sum(r["sent"] for r in gets(srv))
        rc, t, out = run(sp)
        assert rc == 0, t
        (r,) = t["result"][0]["files"]
        assert r["action"] == "resume" and r["resumed_from"] == have and r["transferred"] == size - have
        resumed = gets(srv)[-1]
        assert resumed["range"] == f"bytes={have}-" and resumed["status"] == 206
        # bytes sent twice: only what the killed process received but had not written yet
        assert first + resumed["sent"] - size <= 0.05 * size
        assert (dest / NAME).read_bytes() == data and leftovers(dest) == []
        assert f"resuming at" in out
    finally:
        srv.shutdown()


def test_a_partial_for_another_commit_is_discarded(models, tmp_path):
    root, data = models
    srv = serve(root)
    dest = tmp_path / "m"
    dest.mkdir()
    (dest / f".{NAME}.gpubox-partial").write_bytes(b"x" * 1000)
    (dest / f".{NAME}.gpubox-partial.json").write_text(json.dumps({"repo": REPO, "filename": NAME, "commit": "f" * 40}))
    try:
        rc, t, _ = run(spec(srv, dest))
        assert rc == 0 and t["result"][0]["files"][0]["action"] == "download"
        assert gets(srv)[-1]["range"] is None and (dest / NAME).read_bytes() == data and leftovers(dest) == []
    finally:
        srv.shutdown()


def test_corrupted_byte_is_rejected_and_nothing_lands(models, tmp_path):
    root, data = models
    srv = serve(root, corrupt={f"{REPO}/{NAME}": [len(data) // 2]})
    dest = tmp_path / "m"
    try:
        rc, t, _ = run(spec(srv, dest))
        assert rc == fetch.EXIT_FAILED
        (e,) = t["error"]
        good = hashlib.sha256(data).hexdigest()
        assert e["kind"] == "sha256" and e["expected"] == good and e["actual"] != good
        assert good in e["message"] and e["actual"] in e["message"]
        assert not (dest / NAME).exists() and leftovers(dest) == []
    finally:
        srv.shutdown()


def test_wrong_pinned_hash_is_rejected_before_downloading(models, tmp_path):
    root, data = models
    srv = serve(root)
    try:
        rc, t, _ = run(spec(srv, tmp_path / "m", sha256="0" * 64))
        (e,) = t["error"]
        assert rc == fetch.EXIT_FAILED and e["kind"] == "sha256"
        assert "0" * 64 in e["message"] and hashlib.sha256(data).hexdigest() in e["message"]
        assert gets(srv) == [] and not (tmp_path / "m" / NAME).exists()
    finally:
        srv.shutdown()


def test_disk_preflight_refuses_before_any_byte(models, tmp_path):
    root, _ = models
    srv = serve(root)
    try:
        sp = spec(srv, tmp_path / "m")
        sp["reserve_bytes"] = fetch.free_bytes(str(tmp_path)) + 1
        rc, t, _ = run(sp)
        (e,) = t["error"]
        assert rc == fetch.EXIT_FAILED and e["kind"] == "disk" and "reserve_gb" in e["message"]
        assert e["free"] < e["need"] + e["reserve"]
        assert gets(srv) == []
    finally:
        srv.shutdown()


def test_architecture_mismatch_is_an_error_that_names_both(models, tmp_path):
    root, _ = models
    srv = serve(root)
    try:
        sp = spec(srv, tmp_path / "m", expect_arch="gemma4_assistant")
        sp["arch_fix"] = "--set build.profile=current"
        rc, t, _ = run(sp)
        assert rc == fetch.EXIT_FAILED
        (e,) = t["error"]
        assert e["kind"] == "arch" and e["expected"] == "gemma4_assistant" and e["actual"] == "gemma4-assistant"
        assert e["fix"] == "--set build.profile=current"
        # the verified file is in place and reported, so the lock can record it (a profile switch needs no download)
        assert t["result"][0]["files"][0]["arch"] == "gemma4-assistant"
    finally:
        srv.shutdown()


def test_token_is_sent_but_never_printed(models, tmp_path):
    root, _ = models
    srv = serve(root, token="hf_SeCrEt123")
    try:
        sp = spec(srv, tmp_path / "m")
        sp["token"] = "hf_SeCrEt123"
        rc, t, out = run(sp)
        assert rc == 0 and "hf_SeCrEt123" not in out
        sp = spec(srv, tmp_path / "n")
        sp["token"] = "hf_WrOnG456"
        rc, t, out = run(sp)
        assert rc == fetch.EXIT_FAILED and t["error"][0]["kind"] == "http" and "hf_WrOnG456" not in out
    finally:
        srv.shutdown()


def test_bootstrap_runs_the_packed_source_with_the_token_on_stdin(models, tmp_path):
    root, data = models
    srv = serve(root, token="hf_T0k3n")
    try:
        sp = dict(spec(srv, tmp_path / "m"), token_stdin=True)
        argv = remote.argv(models_step.ON_TARGET, "boot", json.dumps(sp))
        p = subprocess.run([sys.executable, *argv[1:]],
                           input="hf_T0k3n\n", capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stdout + p.stderr
        assert "@@progress " in p.stdout and "@@result " in p.stdout and "hf_T0k3n" not in p.stdout + p.stderr
        assert (tmp_path / "m" / NAME).read_bytes() == data
    finally:
        srv.shutdown()


def test_progress_lines_and_bar():
    out = io.StringIO()
    p = fetch.Progress("f.gguf", total=1000, style="lines", every_s=0.0, out=out)
    p.update(500)
    p.update(1000, final=True)
    text = out.getvalue()
    assert "f.gguf:  50.0%" in text and "100.0%" in text and "/s, ETA" in text
    out = io.StringIO()
    b = fetch.Progress("f.gguf", total=1000, style="bar", every_s=0.0, out=out)
    b.update(250)
    assert out.getvalue().startswith("\r") and "[######" in out.getvalue() and "ETA" in out.getvalue()


# --- nothing unverified under a final name ---------------------------------------------------------------

def final_and_partials(dest):
    d = Path(dest)
    return (d / NAME).exists(), leftovers(d) if d.exists() else []


def test_no_sha256_known_is_refused_before_any_byte(models, tmp_path):
    root, _ = models
    srv = serve(root, no_sha=True)
    try:
        rc, t, _ = run(spec(srv, tmp_path / "m"))
        (e,) = t["error"]
        assert rc == fetch.EXIT_FAILED and e["kind"] == "unverified"
        assert "no sha256 is known" in e["message"] and "allow_unverified=true" in e["fix"]
        assert "models.files.assistant.sha256" in e["fix"]
        assert gets(srv) == [] and final_and_partials(tmp_path / "m") == (False, [])
    finally:
        srv.shutdown()


def test_no_sha256_with_the_opt_in_is_placed_and_marked_unverified(models, tmp_path):
    root, data = models
    srv = serve(root, no_sha=True)
    try:
        rc, t, _ = run(spec(srv, tmp_path / "m", allow_unverified=True))
        assert rc == 0, t
        (r,) = t["result"][0]["files"]
        assert r["verified"] is False and r["expected_from"] == "" and r["sha256"] == hashlib.sha256(data).hexdigest()
        assert (tmp_path / "m" / NAME).read_bytes() == data and leftovers(tmp_path / "m") == []
        # kept on the next run with what the lock holds: still unverified, no request
        srv.requests.clear()
        known = {k: r[k] for k in ("commit", "sha256", "size", "mtime_ns", "verified")}
        rc, t, _ = run(spec(srv, tmp_path / "m", allow_unverified=True, known=known))
        (r2,) = t["result"][0]["files"]
        assert rc == 0 and r2["action"] == "kept" and r2["verified"] is False and srv.requests == []
        # without the opt-in the lock's own hash vouches for nothing: refused, the file stays as it is
        rc, t, _ = run(spec(srv, tmp_path / "m", known=known))
        assert rc == fetch.EXIT_FAILED and t["error"][0]["kind"] == "unverified" and gets(srv) == []
    finally:
        srv.shutdown()


def test_a_body_cut_short_with_no_size_known_never_becomes_final(models, tmp_path):
    """No Content-Length, no X-Linked-Size, the connection closed half-way: the client sees a clean end."""
    root, data = models
    srv = serve(root, no_size=True, truncate={f"{REPO}/{NAME}": len(data) // 2})
    try:
        rc, t, _ = run(spec(srv, tmp_path / "m"))          # the Hub's sha256 is known
        (e,) = t["error"]
        assert rc == fetch.EXIT_FAILED and e["kind"] == "sha256" and e["expected"] == hashlib.sha256(data).hexdigest()
        assert gets(srv)[-1]["sent"] == len(data) // 2
        assert final_and_partials(tmp_path / "m") == (False, [])
    finally:
        srv.shutdown()
    srv = serve(root, no_size=True, no_sha=True, truncate={f"{REPO}/{NAME}": len(data) // 2})
    try:                                                   # nothing known at all: refused even opted in
        rc, t, _ = run(spec(srv, tmp_path / "n", allow_unverified=True))
        (e,) = t["error"]
        assert rc == fetch.EXIT_FAILED and e["kind"] == "unverified" and "neither a sha256 nor a size" in e["message"]
        assert gets(srv) == [] and final_and_partials(tmp_path / "n") == (False, [])
    finally:
        srv.shutdown()


def test_a_body_cut_short_with_the_size_known_is_kept_as_partial_only(models, tmp_path):
    root, data = models
    srv = serve(root, no_sha=True, truncate={f"{REPO}/{NAME}": len(data) // 3})
    try:
        rc, t, _ = run(spec(srv, tmp_path / "m", allow_unverified=True))
        (e,) = t["error"]
        assert rc == fetch.EXIT_FAILED and e["kind"] in ("http", "size")
        assert final_and_partials(tmp_path / "m")[0] is False
        # what arrived, up to the cut (http_get writes in 1 MiB chunks: a part-chunk may be lost)
        have = (tmp_path / "m" / f".{NAME}.gpubox-partial").stat().st_size
        assert 0 < have <= len(data) // 3
    finally:
        srv.shutdown()
    srv = serve(root, no_sha=True)                         # the same bytes, whole now: continued
    try:
        rc, t, _ = run(spec(srv, tmp_path / "m", allow_unverified=True))
        (r,) = t["result"][0]["files"]
        assert rc == 0 and r["resumed_from"] == have and r["verified"] is False
        assert (tmp_path / "m" / NAME).read_bytes() == data
    finally:
        srv.shutdown()


@pytest.mark.parametrize("known_sha", [True, False], ids=["hub-sha256", "unverified"])
def test_a_resume_whose_bytes_changed_starts_over(tmp_path, known_sha):
    """Killed half-way; then the file changes on the server under the SAME commit (pinned .commit) and size.
    The old prefix must not be joined to the new bytes: the ETag differs, so the download starts over."""
    root = tmp_path / "hf"
    old = write_tiny(root / REPO / NAME, general_arch="gemma4-assistant", n_embd=256, n_layers=4, n_ff=512).read_bytes()
    (root / REPO / ".commit").write_text("c" * 40 + "\n")
    size = len(old)
    srv = serve(root, rate=size / 3, no_sha=not known_sha)
    dest = tmp_path / "m"
    sp = spec(srv, dest, allow_unverified=not known_sha)
    sp_file = tmp_path / "spec.json"
    sp_file.write_text(json.dumps(sp))
    partial = dest / f".{NAME}.gpubox-partial"
    try:
        p = subprocess.Popen([sys.executable, "-m", "provision.fetch", "download", "--spec", str(sp_file)],
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (partial.exists() and partial.stat().st_size >= size // 2):
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        assert size // 2 <= partial.stat().st_size < size
        new = bytearray(old)
        for i in range(size // 2, size, 4096):     # other bytes after the prefix, same size, same commit
            new[i] ^= 0x5A
        (root / REPO / NAME).write_bytes(bytes(new))
        srv.rate = 0
        rc, t, out = run(sp)
        assert rc == 0, t
        (r,) = t["result"][0]["files"]
        assert r["action"] == "download" and r["resumed_from"] == 0 and r["transferred"] == size
        assert r["commit"] == "c" * 40 and "starting over" in out
        assert (dest / NAME).read_bytes() == bytes(new) and leftovers(dest) == []
        assert gets(srv)[-1]["range"] is None
    finally:
        srv.shutdown()


class _Flaky(__import__("http.server").server.BaseHTTPRequestHandler):
    """Serves DATA; the first GET dies after CUT bytes (a dropped connection); IGNORE_RANGE answers 200 to all."""
    DATA, CUT, IGNORE_RANGE, seen = b"", 0, False, []

    def log_message(self, *a):
        pass

    def do_GET(self):
        cls = type(self)
        rng = self.headers.get("Range")
        cls.seen.append(rng)
        start = int(rng[len("bytes="):].rstrip("-")) if rng and not cls.IGNORE_RANGE else 0
        body = cls.DATA[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(cls.DATA) - 1}/{len(cls.DATA)}")
        self.end_headers()
        if len(cls.seen) == 1 and cls.CUT:
            self.wfile.write(body[:cls.CUT])
            self.wfile.flush()
            self.connection.shutdown(2)   # the peer goes away mid-body
            return
        self.wfile.write(body)


# The cut is past the first CHUNK_SIZE write: the bytes of an unfinished chunk are lost with the connection.
@pytest.mark.parametrize("cut, ignore_range", [(1_500_000, False), (1_500_000, True)])
def test_get_reopens_a_dropped_connection_and_survives_a_server_that_ignores_range(tmp_path, cut, ignore_range):
    import http.server
    import threading
    data = os.urandom(3_000_000)
    handler = type("H", (_Flaky,), {"DATA": data, "CUT": cut, "IGNORE_RANGE": ignore_range, "seen": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        f = fetch.Fetcher({"dir": str(tmp_path), "files": [], "endpoint": "http://127.0.0.1:9"}, out=io.StringIO())
        out = io.BytesIO()
        hasher = fetch.Sha256Worker()
        w = fetch.HashingWriter(out, hasher, 0, None)
        f._get(f"http://127.0.0.1:{srv.server_port}/blob", w, {}, len(data))
        assert out.getvalue() == data and hasher.hexdigest() == hashlib.sha256(data).hexdigest()
        assert handler.seen == [None, f"bytes={fetch.CHUNK_SIZE}-"]
    finally:
        srv.shutdown()


def test_get_does_not_retry_an_error_of_its_own_writer(tmp_path):
    """The controller's SSH session gone: the progress output raises BrokenPipeError. _get must stop there (the
    partial file stays for the next run), not treat it as a dropped connection and finish the download."""
    import http.server
    import threading
    data = os.urandom(3_000_000)
    handler = type("H", (_Flaky,), {"DATA": data, "CUT": 0, "IGNORE_RANGE": False, "seen": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()

    class GonePipe(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    try:
        f = fetch.Fetcher({"dir": str(tmp_path), "files": [], "endpoint": "http://127.0.0.1:9"}, out=io.StringIO())
        out = io.BytesIO()
        progress = fetch.Progress("f", total=len(data), style="machine", every_s=0.0, out=GonePipe())
        w = fetch.HashingWriter(out, fetch.NoHash(), 0, progress)
        with pytest.raises(BrokenPipeError):
            f._get(f"http://127.0.0.1:{srv.server_port}/blob", w, {}, len(data))
        assert handler.seen == [None]                  # one request: not reopened
        assert len(out.getvalue()) == fetch.CHUNK_SIZE  # the first chunk written, then it stopped
    finally:
        srv.shutdown()
