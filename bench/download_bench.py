#!/usr/bin/env python3
"""Download benchmark for step 6: gpubox's fetch.py (the target-side downloader, real huggingface_hub)
against testbed.hfserver on 127.0.0.1. Prints three figures:

  1. throughput with the server limited to --rate-mib MiB/s, as a fraction of that limit   (target >= 0.95)
  2. bytes transferred twice after a SIGKILL at about 50 %, as a fraction of the file     (target <= 5 %)
  3. verification overhead: the same unthrottled download with and without sha256        (target <= 5 %)
     (best of --repeat interleaved runs each; also shown at the rate limit, where it is what a real link sees)

    python bench/download_bench.py [--size-mib 128] [--rate-mib 32] [--repeat 3] [--json OUT.json]

The file is a tiny GGUF followed by random bytes (incompressible), written once under $GPUBOX_CACHE/bench (~/.cache/gpubox).
The server runs as its own process (python -m testbed.hfserver) so client and server do not share a GIL;
bytes sent are read from its request log, not estimated.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from provision import fetch  # noqa: E402

REPO, NAME = "bench/blob-GGUF", "blob.gguf"
MiB = 1 << 20


def cache_dir() -> Path:
    return Path(os.environ.get("GPUBOX_CACHE", Path.home() / ".cache" / "gpubox")) / "bench"


def make_file(size: int) -> Path:
    root = cache_dir() / f"hf-{size}"
    p = root / REPO / NAME
    if not p.exists() or p.stat().st_size != size:
        p.parent.mkdir(parents=True, exist_ok=True)
        from testbed.testmodels import write_tiny
        head = write_tiny(p.parent / "head.gguf").read_bytes()   # a real GGUF header, then random bytes
        (p.parent / "head.gguf").unlink()
        with open(p, "wb") as f:
            f.write(head)
            left = size - len(head)
            while left:
                n = min(left, 8 * MiB)
                f.write(os.urandom(n))
                left -= n
    return root


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    def __init__(self, root: Path, rate: float = 0):
        self.port = free_port()
        self.log = Path(tempfile.mkstemp(suffix=".jsonl")[1])
        argv = [sys.executable, "-m", "testbed.hfserver", "--root", str(root), "--port", str(self.port),
                "--log", str(self.log)]
        if rate:
            argv += ["--rate", str(rate)]
        self.p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.p.stdout.readline()   # "hfserver: serving ..."
        self.url = f"http://127.0.0.1:{self.port}"

    def sent(self) -> int:
        return sum(json.loads(x)["sent"] for x in self.log.read_text().splitlines() if "/resolve/" in x)

    def close(self):
        self.p.send_signal(signal.SIGTERM)
        self.p.wait(10)
        self.log.unlink(missing_ok=True)


def spec(url: str, dest: Path, hash_: bool = True) -> dict:
    return {"dir": str(dest), "endpoint": url, "progress": "machine", "hash": hash_,
            "files": [{"key": "blob", "repo": REPO, "filename": NAME, "revision": "main"}]}


def download(url: str, dest: Path, hash_: bool = True) -> dict:
    """One fresh download in a subprocess (as on the target); returns fetch's result for the file."""
    import shutil
    shutil.rmtree(dest, ignore_errors=True)
    sp = dest.parent / "spec.json"
    sp.write_text(json.dumps(spec(url, dest, hash_)))
    argv = [sys.executable, "-m", "provision.fetch", "download", "--spec", str(sp)]
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    res = [json.loads(x[9:]) for x in p.stdout.splitlines() if x.startswith("@@result ")]
    if p.returncode or not res:
        raise SystemExit(f"download failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return res[0]["files"][0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-mib", type=int, default=128)
    ap.add_argument("--rate-mib", type=float, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    size, rate = a.size_mib * MiB, a.rate_mib * MiB
    root = make_file(size)
    work = Path(tempfile.mkdtemp(prefix="gpubox-dlbench-"))
    out: dict = {"size_bytes": size, "rate_bytes_per_s": rate}

    # 1. throughput at the rate limit
    srv = Server(root, rate)
    try:
        r = download(srv.url, work / "m")
        out["rate_limited_transfer_s"] = r["transfer_s"]
        out["throughput_fraction_of_limit"] = size / r["transfer_s"] / rate
        out["rate_limited_hash_s"] = r["transfer_s"]
        r2 = download(srv.url, work / "m", hash_=False)
        out["rate_limited_nohash_s"] = r2["transfer_s"]
    finally:
        srv.close()

    # 2. SIGKILL at ~50 %, then resume
    srv = Server(root, rate)
    try:
        dest = work / "k"
        import shutil
        shutil.rmtree(dest, ignore_errors=True)
        sp = work / "spec-kill.json"
        sp.write_text(json.dumps(spec(srv.url, dest)))
        partial = dest / f".{NAME}{fetch.PARTIAL_SUFFIX}"
        p = subprocess.Popen([sys.executable, "-m", "provision.fetch", "download", "--spec", str(sp)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (partial.exists() and partial.stat().st_size >= size // 2):
            if p.poll() is not None:
                raise SystemExit("the download ended before 50 %: raise --size-mib or lower --rate-mib")
            time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
        p.wait()
        killed_at = partial.stat().st_size
        t0 = time.monotonic()
        q = subprocess.run([sys.executable, "-m", "provision.fetch", "download", "--spec", str(sp)], cwd=ROOT,
                           capture_output=True, text=True)
        res = [json.loads(x[9:]) for x in q.stdout.splitlines() if x.startswith("@@result ")][0]["files"][0]
        total_sent = srv.sent()
        out.update(killed_at_fraction=killed_at / size, resumed_from=res["resumed_from"], rehash_s=res["rehash_s"],
                   resume_wall_s=round(time.monotonic() - t0, 3), server_bytes_sent=total_sent,
                   retransferred_bytes=total_sent - size, retransferred_fraction=(total_sent - size) / size,
                   resumed_ok=res["action"] == "resume" and (dest / NAME).stat().st_size == size)
    finally:
        srv.close()

    # 3. verification overhead, unthrottled (worst case: the CPU, not the link, is the limit)
    srv = Server(root, 0)
    try:
        with_h, without = [], []
        for _ in range(a.repeat):
            with_h.append(download(srv.url, work / "m")["transfer_s"])
            without.append(download(srv.url, work / "m", hash_=False)["transfer_s"])
        # min of interleaved runs: on a shared machine other load only ever adds time
        th, tn = min(with_h), min(without)
        out.update(unthrottled_hash_s=with_h, unthrottled_nohash_s=without,
                   unthrottled_mib_per_s=size / tn / MiB, verification_overhead=(th - tn) / tn)
    finally:
        srv.close()
    out["verification_overhead_at_limit"] = (out["rate_limited_hash_s"] - out["rate_limited_nohash_s"]) / out["rate_limited_nohash_s"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    print(f"download bench: {a.size_mib} MiB random file, server limit {a.rate_mib:g} MiB/s, python {sys.version.split()[0]}")
    print(f"  throughput at the limit      : {size / out['rate_limited_transfer_s'] / MiB:8.2f} MiB/s = "
          f"{out['throughput_fraction_of_limit']:.3f} of the limit   (target >= 0.95) {verdict(out['throughput_fraction_of_limit'] >= 0.95)}")
    print(f"  SIGKILL at {100 * out['killed_at_fraction']:.1f} %, resume       : resumed from {out['resumed_from']} B, "
          f"re-hash {out['rehash_s']:.2f} s; bytes sent twice {out['retransferred_bytes']} = "
          f"{100 * out['retransferred_fraction']:.2f} % of the file   (target <= 5 %) {verdict(out['retransferred_fraction'] <= 0.05 and out['resumed_ok'])}")
    print(f"  verification overhead        : unthrottled {100 * out['verification_overhead']:+.2f} % "
          f"(best of {a.repeat}: {min(out['unthrottled_hash_s']):.3f} s with sha256 vs {min(out['unthrottled_nohash_s']):.3f} s without, "
          f"{out['unthrottled_mib_per_s']:.0f} MiB/s)   (target <= 5 %) {verdict(out['verification_overhead'] <= 0.05)}")
    print(f"                                 at the limit {100 * out['verification_overhead_at_limit']:+.2f} %")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    import shutil
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
