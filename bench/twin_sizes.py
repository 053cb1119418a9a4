"""Benchmark: write the `full` Gemma 4 twin (testbed/gemma4.py) and compare its buffers with the real files'.

    python3 bench/twin_sizes.py [OUTDIR] [--keep] [--variant rigged|random]

Writes the 26B-A4B target (16.8 GB) and both heads (post-sync gemma4-assistant and pre-sync
gemma4_assistant, 310 MB each) to OUTDIR (default: a temporary directory, removed afterwards unless --keep;
needs about 17.5 GB free), prints each file's write time and throughput, then reads the WRITTEN files' tensor
tables back with gguf.GGUFReader and prints the model buffer sizes llama.cpp's loader reports under
--n-cpu-moe 20 and 29 (testbed.gemma4.placement: docs/gemma4-twin.md says which tensor goes where) against
the load lines of the real Q4_K_M files, with the differences. Exit status 1 if any differs by more than
0.1 MiB (0.5 MiB where the real line is rounded to whole MiB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from testbed import gemma4 as g  # noqa: E402

# The real files' load lines (docs/gemma4-twin.md, "Reference buffer sizes"): MiB, and how they were printed.
REAL = {
    20: {"target CPU": (577.50, 0.1), "target CUDA0": (6504.39, 0.1), "target CUDA_Host": (9498.51, 0.1)},
    29: {"target CUDA0": (2103, 0.5), "target CPU + CUDA_Host": (14477, 0.5)},
    "head": {"head CPU": (210.00, 0.1), "head CUDA_Host": (3.09, 0.1), "head CUDA0": (82.24, 0.1)},
}


def written_table(path: Path) -> list[tuple[str, int]]:
    import gguf
    r = gguf.GGUFReader(str(path))
    return [(t.name, int(t.n_bytes)) for t in r.tensors]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", nargs="?")
    ap.add_argument("--keep", action="store_true", help="keep the files (default: remove a temporary outdir)")
    ap.add_argument("--variant", choices=g.VARIANTS, default="rigged")
    a = ap.parse_args(argv)
    tmp = a.outdir is None
    out = Path(a.outdir or tempfile.mkdtemp(prefix="gpubox-twin-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        free = shutil.disk_usage(out).free
        need = g.target_plan("full").nbytes + 2 * g.head_plan("full").nbytes
        if free < need * 1.02:
            print(f"twin_sizes: {out} has {free / 2**30:.1f} GiB free, the full pair needs {need / 2**30:.1f} "
                  "GiB; give an OUTDIR on a larger disk", file=sys.stderr)
            return 2
        print(f"writing the full twin to {out} (python {sys.version.split()[0]}, {os.cpu_count()} CPUs)")
        times = {}
        for role, kw, sub in (("target + post-sync head", dict(head="mtp"), "mtp"),
                              ("pre-sync head", dict(head="presync", only="head"), "presync")):
            d = out / sub
            if sub == "presync":
                d.mkdir(exist_ok=True)
            t0 = time.monotonic()
            g.write_pair(d if sub == "presync" else out, "full", variant=a.variant, log=lambda s: print("  " + s), **kw)
            times[role] = time.monotonic() - t0
        target, head, presync = out / g.TARGET_FILE, out / g.HEAD_FILE, out / "presync" / g.HEAD_FILE
        size = sum(p.stat().st_size for p in (target, head, presync))
        wall = sum(times.values())
        print(f"write time: {wall:.1f} s for {size / 1e9:.2f} GB ({size / 2**20 / wall:.0f} MiB/s)")

        t0 = time.monotonic()
        tt, ht, pt = written_table(target), written_table(head), written_table(presync)
        print(f"read back {len(tt)} + {len(ht)} + {len(pt)} tensor entries in {time.monotonic() - t0:.1f} s")
        bad = 0
        print(f"{'buffer':<36}{'twin MiB':>12}{'real MiB':>12}{'diff':>10}")
        for key, rows in REAL.items():
            if key == "head":
                for name, table in (("post-sync file", ht), ("pre-sync file", pt)):
                    got = g.placement(tt, table, n_cpu_moe=20)
                    for k, (want, tol) in rows.items():
                        bad += line(f"{k} ({name})", got[k], want, tol)
                continue
            got = g.placement(tt, ht, n_cpu_moe=key)
            got["target CPU + CUDA_Host"] = got["target CPU"] + got["target CUDA_Host"]
            for k, (want, tol) in rows.items():
                bad += line(f"{k} @ncmoe {key}", got[k], want, tol)
        print("all within tolerance" if not bad else f"{bad} buffer(s) outside tolerance")
        return 1 if bad else 0
    finally:
        if tmp and not a.keep:
            shutil.rmtree(out, ignore_errors=True)


def line(name: str, got: float, want: float, tol: float) -> int:
    diff = got - want
    flag = "" if abs(diff) <= tol else "  <-- over tolerance"
    print(f"{name:<36}{got:>12.2f}{want:>12.2f}{diff:>+10.2f}{flag}")
    return int(bool(flag))


if __name__ == "__main__":
    sys.exit(main())
