"""Bit-identical builds: what bin/ holds, byte for byte, and how two builds of one pin compare.

* `manifest_command(bindir)` / `parse_manifest(text)`: every entry of bin/ as data: a regular file's size
  and sha256, a symbolic link's target. The build step stores it in its stamp and in the lock file;
  `invoke verify` re-hashes the installed files against it.
* `compare(a, b)`: two manifests -> one row per name: identical, different, or present on one side only.
* `SECTIONS_SCRIPT`: a self-contained Python program (stdlib only) run ON the machine that holds the
  files: the size and sha256 of every ELF section, so a difference is named by section (.text, .nv_fatbin,
  .symtab, ...), not only by file.
* `python3 -m provision.repro compare DIR_A DIR_B`: the same comparison for two local bin/ directories
  (bench/gpu_repro.sh); exit status 0 only when every file is identical.

Why builds differ and what gpubox does about it: docs/reproducible-builds.md.

>>> a = parse_manifest("F\\tllama-server\\t10\\t" + "a" * 64 + "\\nL\\tlibggml.so\\tlibggml.so.0\\n")
>>> a["files"]["llama-server"]["size"], a["links"]
(10, {'libggml.so': 'libggml.so.0'})
>>> b = parse_manifest("F\\tllama-server\\t10\\t" + "b" * 64 + "\\nL\\tlibggml.so\\tlibggml.so.0\\n")
>>> [(r["name"], r["status"]) for r in compare(a, b)]
[('libggml.so', 'identical'), ('llama-server', 'different')]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from .facts import qpath

# One line per entry of bin/: "F<TAB>name<TAB>size<TAB>sha256" or "L<TAB>name<TAB>link target".
# Names with a tab or newline are not build outputs; they are skipped rather than misread.
_MANIFEST_SH = r'''cd "$1" || exit 3
for f in * .[!.]*; do
  case "$f" in *"	"*|*"
"*) continue;; esac
  if [ -L "$f" ]; then printf 'L\t%s\t%s\n' "$f" "$(readlink "$f")"
  elif [ -f "$f" ]; then printf 'F\t%s\t%s\t%s\n' "$f" "$(stat -c %s "$f")" "$(sha256sum < "$f" | cut -d" " -f1)"
  fi
done'''


def manifest_argv(bindir: str) -> list[str]:
    return ["sh", "-c", _MANIFEST_SH, "gpubox-manifest", bindir]


def manifest_command(bindir: str) -> str:
    """The same as one shell command line (for testinfra's host.run)."""
    return " ".join(qpath(a) if i else a for i, a in enumerate(manifest_argv(bindir)))


def parse_manifest(text: str) -> dict[str, dict]:
    """{"files": {name: {"size", "sha256"}}, "links": {name: target}} from manifest lines."""
    files: dict[str, dict] = {}
    links: dict[str, str] = {}
    for line in (text or "").splitlines():
        parts = line.split("\t")
        if parts[0] == "F" and len(parts) == 4 and parts[2].isdigit() and len(parts[3]) == 64:
            files[parts[1]] = {"size": int(parts[2]), "sha256": parts[3]}
        elif parts[0] == "L" and len(parts) == 3:
            links[parts[1]] = parts[2]
    return {"files": files, "links": links}


def local_manifest(bindir: str) -> dict[str, dict]:
    """parse_manifest of a local directory, by the same shell program."""
    r = subprocess.run(manifest_argv(bindir), capture_output=True, text=True)
    if r.returncode != 0:
        raise FileNotFoundError(f"cannot read {bindir}: {r.stderr.strip() or 'exit ' + str(r.returncode)}")
    return parse_manifest(r.stdout)


def compare(a: dict, b: dict) -> list[dict[str, Any]]:
    """One row per name in either manifest, sorted: status identical | different | only-a | only-b."""
    rows = []
    fa, fb, la, lb = a.get("files", {}), b.get("files", {}), a.get("links", {}), b.get("links", {})
    for name in sorted(set(fa) | set(fb) | set(la) | set(lb)):
        row: dict[str, Any] = {"name": name, "size_a": (fa.get(name) or {}).get("size"),
                               "size_b": (fb.get(name) or {}).get("size")}
        if name in la or name in lb:
            row["link_a"], row["link_b"] = la.get(name), lb.get(name)
            in_a, in_b = name in la or name in fa, name in lb or name in fb
            same = la.get(name) == lb.get(name) and name in la and name in lb
        else:
            in_a, in_b = name in fa, name in fb
            same = in_a and in_b and fa[name]["sha256"] == fb[name]["sha256"]
        row["status"] = "identical" if same else ("different" if in_a and in_b else ("only-a" if in_a else "only-b"))
        rows.append(row)
    return rows


def differs(rows: list[dict]) -> bool:
    """Not reproduced: a file differs, or one build lacks a file the other has."""
    return any(r["status"] != "identical" for r in rows)


# Run on the machine that holds the files: python3 -c SECTIONS_SCRIPT FILE... -> JSON
# {file: {section: [size, sha256]}} for ELF files ({"_error": ...} for others). Standard library only.
SECTIONS_SCRIPT = r'''
import hashlib, json, struct, sys
def sections(path):
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        return {"_error": "not a 64-bit ELF file"}
    end = "<" if data[5] == 1 else ">"
    shoff, = struct.unpack_from(end + "Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from(end + "HHH", data, 0x3A)
    hdrs = [struct.unpack_from(end + "IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = hdrs[shstrndx][4]
    out = {}
    for h in hdrs[1:]:
        name = data[names + h[0]:data.index(b"\0", names + h[0])].decode("latin-1")
        body = b"" if h[1] == 8 else data[h[4]:h[4] + h[5]]          # SHT_NOBITS (.bss) has no bytes
        key = name
        while key in out:
            key += "'"
        out[key] = [h[5], hashlib.sha256(body).hexdigest()]
    # Bytes outside every section (ELF and program headers, padding) as one pseudo-section.
    spans = sorted([(h[4], h[4] + h[5]) for h in hdrs[1:] if h[1] != 8] + [(shoff, shoff + shnum * shentsize)])
    rest, pos = hashlib.sha256(), 0
    n = 0
    for a, b in spans:
        if a > pos:
            rest.update(data[pos:a])
            n += a - pos
        pos = max(pos, b)
    rest.update(data[pos:])
    n += max(0, len(data) - pos)
    out["(headers and padding)"] = [n, rest.hexdigest()]
    return out
res = {}
for p in sys.argv[1:]:
    try:
        res[p] = sections(p)
    except Exception as e:
        res[p] = {"_error": "%s: %s" % (type(e).__name__, e)}
print(json.dumps(res))
'''


def sections_argv(paths: list[str]) -> list[str]:
    return ["python3", "-c", SECTIONS_SCRIPT, *paths]


def section_diff(sa: dict, sb: dict) -> list[str]:
    """Names of the sections that differ (size or bytes), or that only one file has; in file order of a."""
    if "_error" in sa or "_error" in sb:
        return [f"(no section list: {sa.get('_error') or sb.get('_error')})"]
    out = [n for n in sa if n in sb and sa[n] != sb[n]]
    out += [f"{n} (only in a)" for n in sa if n not in sb]
    out += [f"{n} (only in b)" for n in sb if n not in sa]
    return out


def _size(v: Any) -> str:
    return "-" if v is None else str(v)


def report(rows: list[dict], label_a: str, label_b: str, sections: dict[str, list[str]] | None = None) -> str:
    """The comparison as text: one line per file, then a verdict."""
    sections = sections or {}
    lines = [f"a = {label_a}", f"b = {label_b}"]
    w = max([len(r["name"]) for r in rows] + [4])
    for r in rows:
        if "link_a" in r:
            what = f"-> {r.get('link_a') or '-'}" + ("" if r.get("link_a") == r.get("link_b") else f" | b: -> {r.get('link_b') or '-'}")
        else:
            what = f"{_size(r['size_a'])} / {_size(r['size_b'])} bytes"
        lines.append(f"  {r['name']:<{w}}  {r['status']:<9}  {what}")
        for sec in sections.get(r["name"], []):
            lines.append(f"  {'':<{w}}    section differs: {sec}")
    n_diff = sum(1 for r in rows if r["status"] != "identical")
    lines.append(f"{len(rows)} entries compared: " + ("every file identical" if not n_diff else f"{n_diff} not identical"))
    return "\n".join(lines)


def _local(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {r.returncode}: {r.stderr.strip()[-500:]}")
    return r.stdout


def compare_dirs(dir_a: str, dir_b: str, run=_local) -> tuple[bool, str]:
    """Two bin/ directories -> (identical, report text with section names for differing ELF files).

    `run(argv) -> stdout` runs where the files are: this machine by default, a Host's run otherwise."""
    a, b = parse_manifest(run(manifest_argv(dir_a))), parse_manifest(run(manifest_argv(dir_b)))
    if not a["files"] or not b["files"]:
        empty = dir_a if not a["files"] else dir_b
        return False, f"{empty} holds no files (missing, or the build did not finish)"
    rows = compare(a, b)
    diff_files = [r["name"] for r in rows if r["status"] == "different" and "link_a" not in r]
    secs: dict[str, list[str]] = {}
    if diff_files:
        sa = json.loads(run(sections_argv([f"{dir_a}/{n}" for n in diff_files])))
        sb = json.loads(run(sections_argv([f"{dir_b}/{n}" for n in diff_files])))
        for n in diff_files:
            secs[n] = section_diff(sa[f"{dir_a}/{n}"], sb[f"{dir_b}/{n}"])
    return not differs(rows), report(rows, dir_a, dir_b, secs)


def second_build_sets(src_dir: str, build_dir: str, state_dir: str, *, cuda: bool) -> list[str]:
    """--set values for the check's second build: a second build directory beside the first (the name
    differs in length too), no ccache, so every object is compiled by this build, and a state directory
    of its own, so that the box's lock keeps describing the first build. A CPU build also gets a second
    clone; a CUDA build reuses the first tree, because nvcc names anonymous-namespace and internal device
    code after the source file's real path (docs/reproducible-builds.md): another tree would differ in
    libggml-cuda for that known reason and hide any other.

    >>> second_build_sets("/s", "/b/", "/v", cuda=False)
    ['build.src_dir=/s-repro', 'build.build_dir=/b-repro', 'build.ccache=false', 'state_dir=/v/repro']
    >>> second_build_sets("/s", "/b", "/v", cuda=True)[0]
    'build.src_dir=/s'
    """
    src = src_dir.rstrip("/") + ("" if cuda else "-repro")
    return [f"build.src_dir={src}", f"build.build_dir={build_dir.rstrip('/')}-repro",
            "build.ccache=false", f"state_dir={state_dir.rstrip('/')}/repro"]


def check_build(c, sets=(), extra_sets=(), echo=print) -> tuple[bool, str]:
    """`invoke build --check-reproducible` after the first build: the build step again into a second,
    freshly emptied directory (from a second clone of build.repo_url for a CPU build; second_build_sets,
    then `extra_sets`), then bin/ of both compared file by file on the host. (identical, report)."""
    from . import config, facts as factmod
    from .engine import Runner
    from .host import Host
    from .steps import build as step

    cfg_a = config.load(c, list(sets))
    b = cfg_a["build"]
    second = [*second_build_sets(b["src_dir"], b["build_dir"], cfg_a["state_dir"], cuda=b["cuda"]), *extra_sets]
    cfg_b = config.load(c, [*sets, *second])
    host = Host(c)
    facts = factmod.gather(host, cfg_b, [])
    (src_a, bld_a), (src_b, bld_b) = step.dirs(facts, cfg_a), step.dirs(facts, cfg_b)
    if bld_b.rstrip("/") in ("", "/", bld_a.rstrip("/"), src_a.rstrip("/"), src_b.rstrip("/")):
        raise ValueError(f"the second build needs a build directory of its own: a={src_a}, {bld_a}; b={src_b}, {bld_b}")
    p = step.plan(facts, cfg_b)
    # A clean second build every time: a build directory left from an earlier check would be "done".
    host.run(step._argv(p, ["rm", "-rf", "--", bld_b]))
    echo(f"[repro] second build: source {src_b}" + (" (the same tree: nvcc names device code after its path)"
                                                     if src_b == src_a else "")
         + f", build {bld_b}" + ("" if cfg_b["build"]["ccache"] else ", no ccache"))
    report = Runner(host, cfg_b, [step], echo=echo).run()
    if report.failed:
        res = report.steps[0]
        return False, f"the second build failed: {res.error}"
    return compare_dirs(f"{bld_a}/bin", f"{bld_b}/bin", run=lambda argv: host.run(argv, timeout=1800).stdout)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[0] != "compare":
        print("usage: python3 -m provision.repro compare BIN_DIR_A BIN_DIR_B", file=sys.stderr)
        return 2
    ok, text = compare_dirs(argv[1], argv[2])
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
