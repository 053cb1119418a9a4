#!/usr/bin/env python3
"""Build benchmark figures (step 5): prints them; asserts nothing. Usable locally and on the GPU machine.

Two sub-commands, standard library only:

  build_bench.py run --label cold --out DIR -- COMMAND...
      runs COMMAND, measures its wall time and the CPU time of all its (waited-for) descendants
      (getrusage RUSAGE_CHILDREN: compilers under ninja under cmake under invoke), writes DIR/LABEL.json
      and exits with COMMAND's status.

  build_bench.py report --out DIR [--build-dir BUILD] [--cores N]
      prints, from DIR/*.json, the step's stamp(s) and Ninja logs:
        efficiency      = CPU s / (wall s x cores) of the cold build          (target >= 0.85)
        speed-up        = CPU s / wall s: the serial (-j1, the recipe's `cmake --build` without -j)
                          build costs about the total CPU time
        no-change       = wall s of a second `invoke build` (and of a bare ninja no-op)  (target <= 5 s)
        warm ccache     = wall of a rebuild after deleting the build dir / cold wall     (target <= 20 %)
      Labels it knows: cold, nochange, ninja-noop, warm (others are listed as they are).
      DIR/cold/ may hold a copy of the cold build's gpubox-stamp.json and .ninja_log (the warm run deletes
      the build directory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def cmd_run(a: argparse.Namespace) -> int:
    argv = a.command[1:] if a.command and a.command[0] == "--" else a.command
    if not argv:
        print("build_bench run: no command given", file=sys.stderr)
        return 2
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    rc = subprocess.call(argv)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rec = {"label": a.label, "command": argv, "rc": rc, "wall_s": round(wall, 3),
           "cpu_user_s": round(after.ru_utime - before.ru_utime, 3),
           "cpu_sys_s": round(after.ru_stime - before.ru_stime, 3),
           "max_rss_mib": round(after.ru_maxrss / 1024, 1), "cores": os.cpu_count(),
           "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    rec["cpu_s"] = round(rec["cpu_user_s"] + rec["cpu_sys_s"], 3)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{a.label}.json").write_text(json.dumps(rec, indent=1) + "\n")
    print(f"[bench] {a.label}: exit {rc}, wall {wall:.1f} s, CPU {rec['cpu_s']:.1f} s "
          f"(user {rec['cpu_user_s']:.1f} + sys {rec['cpu_sys_s']:.1f})", flush=True)
    return rc


def ninja_log(path: Path) -> dict | None:
    """Edges of the last build session in a .ninja_log (v5/v6: start end mtime path hash, ms)."""
    if not path.is_file():
        return None
    edges = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("#"):
            continue
        f = line.split("\t")
        if len(f) >= 4 and f[0].isdigit() and f[1].isdigit():
            edges.append((int(f[0]), int(f[1]), f[3]))
    if not edges:
        return None
    # A new session restarts the clock at 0: keep the entries after the last restart.
    last = 0
    for i in range(1, len(edges)):
        if edges[i][0] < edges[i - 1][0] and edges[i][0] < 1000:
            last = i
    edges = edges[last:]
    durs = sorted(((e - s) / 1000.0, p) for s, e, p in edges)
    span = (max(e for _, e, _ in edges) - min(s for s, _, _ in edges)) / 1000.0
    return {"edges": len(edges), "sum_s": round(sum(d for d, _ in durs), 1), "span_s": round(span, 1),
            "longest": [(round(d, 1), p) for d, p in durs[-5:][::-1]],
            "cuda_edges": sum(1 for _, p in durs if p.endswith(".cu.o"))}


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("  [meets target]" if ok else "  [MISSES target]")


def cmd_report(a: argparse.Namespace) -> int:
    out = Path(a.out)
    runs = {p.stem: load(p) for p in sorted(out.glob("*.json"))}
    runs = {k: v for k, v in runs.items() if isinstance(v, dict) and "wall_s" in v}
    bdir = Path(a.build_dir) if a.build_dir else None
    stamp = load(out / "cold" / "gpubox-stamp.json") or (load(bdir / "gpubox-stamp.json") if bdir else None)
    nlog = ninja_log(out / "cold" / ".ninja_log") or (ninja_log(bdir / ".ninja_log") if bdir else None)
    cold = runs.get("cold")
    cores = a.cores or (cold or {}).get("cores") or os.cpu_count()
    print("=== gpubox build benchmark ===")
    if stamp:
        print(f"commit          {stamp.get('sha')}  ({stamp.get('server_version', '')})")
        print(f"jobs            {stamp.get('jobs')}  ({stamp.get('jobs_why', '')})")
        print(f"targets         {', '.join(stamp.get('targets') or [])}")
        cuda = [x for x in stamp.get("cmake_args", []) if "CUDA_ARCHITECTURES" in x or "GGML_CUDA=" in x]
        print(f"cuda            {' '.join(cuda)}")
        if stamp.get("arch_line"):
            print(f"configure       {stamp['arch_line']}")
        print(f"compilers       {stamp.get('compilers')}")
    print(f"cores           {cores}")
    if cold:
        eff = cold["cpu_s"] / (cold["wall_s"] * cores) if cold["wall_s"] else 0.0
        print(f"cold build      wall {cold['wall_s']:.1f} s ({cold['wall_s'] / 60:.2f} min), CPU {cold['cpu_s']:.1f} s "
              f"({cold['cpu_s'] / 60:.1f} CPU-min), exit {cold['rc']}")
        print(f"efficiency      {eff:.3f} = CPU s / (wall s x {cores} cores), whole `invoke build`"
              + verdict(eff >= 0.85))
        if stamp and stamp.get("build_seconds") and stamp.get("build_cpu_seconds"):
            be = stamp["build_cpu_seconds"] / (stamp["build_seconds"] * cores)
            print(f"  build phase   wall {stamp['build_seconds']:.1f} s, CPU {stamp['build_cpu_seconds']:.1f} s, "
                  f"efficiency {be:.3f} (compile+link only, without clone/configure/record)")
        print(f"speed-up        {cold['cpu_s'] / cold['wall_s']:.1f}x over the serial build "
              f"(serial estimate = total CPU time = {cold['cpu_s'] / 60:.1f} min)")
    if nlog:
        print(f"ninja log       {nlog['edges']} edges ({nlog['cuda_edges']} CUDA), sum of edge times {nlog['sum_s']:.0f} s, "
              f"span {nlog['span_s']:.0f} s, parallelism {nlog['sum_s'] / max(nlog['span_s'], 0.001):.1f}")
        for d, p in nlog["longest"]:
            print(f"  longest       {d:7.1f} s  {p}")
    nc = runs.get("nochange")
    if nc:
        print(f"no-change       `invoke build` again: wall {nc['wall_s']:.2f} s, exit {nc['rc']}" + verdict(nc["wall_s"] <= 5))
    noop = runs.get("ninja-noop")
    if noop:
        print(f"  ninja no-op   `cmake --build` again: wall {noop['wall_s']:.2f} s")
    warm = runs.get("warm")
    if warm:
        line = f"warm ccache     rm -rf build dir + `invoke build`: wall {warm['wall_s']:.1f} s, CPU {warm['cpu_s']:.1f} s"
        if cold and cold["wall_s"]:
            r = warm["wall_s"] / cold["wall_s"]
            line += f", {100 * r:.1f} % of cold" + verdict(r <= 0.20)
        print(line)
    for k, v in runs.items():
        if k not in ("cold", "nochange", "ninja-noop", "warm"):
            print(f"{k:<15} wall {v['wall_s']:.1f} s, CPU {v['cpu_s']:.1f} s, exit {v['rc']}")
    if not runs:
        print(f"(no run records in {out})")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a command and record wall + children CPU time")
    r.add_argument("--label", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("command", nargs=argparse.REMAINDER)
    p = sub.add_parser("report", help="print the figures")
    p.add_argument("--out", required=True)
    p.add_argument("--build-dir")
    p.add_argument("--cores", type=int)
    a = ap.parse_args(argv)
    return cmd_run(a) if a.cmd == "run" else cmd_report(a)


if __name__ == "__main__":
    sys.exit(main())
