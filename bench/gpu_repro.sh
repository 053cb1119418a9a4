#!/usr/bin/env bash
# Issue 15 on the GPU machine: are two clean CUDA builds of one pin, in two different directories, the
# same bytes? Two `invoke build` runs (CUDA on, CMAKE_CUDA_ARCHITECTURES=native, nvcc and host compiler
# from config, targets llama-server + llama-fit-params, no ccache), each from its own clone of SRC_GIT
# into its own source and build directory (different depths and lengths), by default at the same time
# with half the cores each; then every file of both bin/ directories compared: identical or different,
# with sizes, and for a differing ELF file the sections that differ (provision/repro.py), the embedded
# CUDA images that differ (cuobjdump, when present), and the first differing symbols and strings.
# The fork's code is not part of this repository: the source comes from the git path given.
#
# Usage: bench/gpu_repro.sh SRC_GIT SHA
#   SRC_GIT  a git repository (path or file:// URL) holding SHA, e.g. the fork's post-sync checkout
#   SHA      the full 40-hex commit to build
#        bench/gpu_repro.sh --compare BIN_A BIN_B   (only the comparison, of two existing bin/ directories)
# Env: OUT (default .gpu/out-repro), GPUBOX_GPU_WORK (default /tmp/gpubox-repro: the builds go there),
#      NVCC (default /usr/local/cuda/bin/nvcc), HOSTCXX (default the machine's g++),
#      TARGETS (default "[llama-server, llama-fit-params]"), SERIAL=1 to build one after the other with
#      every core each, GPU_BUILD_CPU_TEST=1 for the same runs with build.cuda=false (to try the script on
#      a machine without CUDA). Python wheels in .whl/ are installed to /tmp/site unless invoke imports.
# Exit status: 0 every file identical, 1 some file differs (the report says which), 2 usage or set-up.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
usage() { sed -n '2,24p' "$0" >&2; exit 2; }
compare_only=0
if [ "${1:-}" = --compare ]; then
  [ $# -eq 3 ] || usage
  compare_only=1; bin_a=$(cd "$2" && pwd); bin_b=$(cd "$3" && pwd)
else
  [ $# -eq 2 ] || usage
  src_git=$1
  sha=$2
  [[ "$sha" =~ ^[0-9a-f]{40}$ ]] || { echo "SHA must be a full 40-hex commit, got: $sha" >&2; exit 2; }
  git -C "${src_git#file://}" cat-file -e "$sha^{commit}" 2>/dev/null || { echo "$sha is not a commit in $src_git" >&2; exit 2; }
fi
OUT=${OUT:-$here/.gpu/out-repro}
work=${GPUBOX_GPU_WORK:-/tmp/gpubox-repro}
mkdir -p "$OUT"
log() { echo "[gpu_repro] $*"; }
t_start=$(date +%s)

# --- Python: invoke, fabric, jinja2, pyyaml from the carried wheels (as bench/gpu_build.sh) -------------
export PYTHONPATH=/tmp/site:$here${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c 'import invoke, yaml, jinja2' 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no invoke/yaml/jinja2 and no wheels in .whl/" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
python3 -c 'import invoke; print("python", __import__("sys").version.split()[0], "invoke", invoke.__version__)'

if [ "$compare_only" = 0 ]; then
# --- tools ------------------------------------------------------------------------------------------
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
HOSTCXX=${HOSTCXX:-$(command -v g++)}
cpu_test=${GPU_BUILD_CPU_TEST:-0}
if [ "$cpu_test" = 1 ]; then tools=(git cmake "$HOSTCXX"); cuda=false; else tools=(git cmake "$NVCC" "$HOSTCXX"); cuda=true; fi
for t in "${tools[@]}"; do command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }; done
log "cmake: $(cmake --version | head -n1); nvcc: $("$NVCC" --version 2>/dev/null | grep release || echo none); host: $("$HOSTCXX" --version | head -n1)"
log "ninja: $(ninja --version 2>/dev/null || echo 'not found (Makefiles)'); ccache: off for both builds (build.ccache=false)"
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null || log "nvidia-smi: none"
cores=$(nproc)
log "cores $cores; $(grep MemAvailable /proc/meminfo)"

# --- the two builds ---------------------------------------------------------------------------------
# Different depths and lengths, so that a path that leaks into a binary changes its bytes (and its size).
src_a=$work/a/src/llama.cpp;                      bld_a=$work/a/build
src_b=$work/second-tree/source/checkout/llama.cpp; bld_b=$work/b
# Both builds start clean. The work directory is emptied only when this script made it (its marker).
if [ -e "$work" ] && [ ! -e "$work/.gpubox-repro" ]; then
  echo "$work exists and was not made by this script: set GPUBOX_GPU_WORK to a new path" >&2; exit 2
fi
rm -rf "$work"
mkdir -p "$work"
touch "$work/.gpubox-repro"
targets=${TARGETS:-"[llama-server, llama-fit-params]"}
if [ "${SERIAL:-0}" = 1 ]; then jobs=$cores; else jobs=$(( cores / 2 > 0 ? cores / 2 : 1 )); fi
common=(--set "build.cuda=$cuda" --set "build.repo_url=$src_git" --set "build.sha=$sha"
        --set build.cuda_architectures=native --set "build.nvcc=$NVCC" --set "build.host_compiler=$HOSTCXX"
        --set build.ccache=false --set "build.targets=$targets" --set "build.jobs=$jobs")
one() {   # one <label> <src> <build>: a clean `invoke build`, its log and wall time in $OUT
  local t0 rc=0
  t0=$(date +%s)
  python3 -m invoke build "${common[@]}" --set "build.src_dir=$2" --set "build.build_dir=$3" \
    --set "state_dir=$work/state-$1" --set "report_dir=$OUT/reports-$1" > "$OUT/build-$1.log" 2>&1 || rc=$?
  echo "$(( $(date +%s) - t0 ))" > "$OUT/seconds-$1"
  return $rc
}
log "build a: $src_a -> $bld_a; build b: $src_b -> $bld_b; $jobs jobs each, $([ "${SERIAL:-0}" = 1 ] && echo 'one after the other' || echo 'at the same time')"
rc_a=0; rc_b=0
if [ "${SERIAL:-0}" = 1 ]; then
  one a "$src_a" "$bld_a" || rc_a=$?
  one b "$src_b" "$bld_b" || rc_b=$?
else
  one a "$src_a" "$bld_a" & pid_a=$!
  one b "$src_b" "$bld_b" & pid_b=$!
  wait "$pid_a" || rc_a=$?
  wait "$pid_b" || rc_b=$?
fi
log "build a: exit $rc_a, $(cat "$OUT/seconds-a") s; build b: exit $rc_b, $(cat "$OUT/seconds-b") s"
for x in a b; do
  r=$([ $x = a ] && echo $rc_a || echo $rc_b)
  if [ "$r" != 0 ]; then tail -n 25 "$OUT/build-$x.log"; echo "build $x failed: see $OUT/build-$x.log" >&2; exit 2; fi
done
cp "$bld_a/gpubox-stamp.json" "$OUT/stamp-a.json"
cp "$bld_b/gpubox-stamp.json" "$OUT/stamp-b.json"
grep -h "Using CMAKE_CUDA_ARCHITECTURES" "$OUT"/reports-a/*/build.log 2>/dev/null | head -n1 || true
if [ -x "$bld_a/bin/llama-server" ]; then "$bld_a/bin/llama-server" --version 2>&1 | head -n2 || true; fi
bin_a=$bld_a/bin; bin_b=$bld_b/bin

fi

# --- the comparison ---------------------------------------------------------------------------------
set +e
python3 -m provision.repro compare "$bin_a" "$bin_b" | tee "$OUT/compare.txt"
same=${PIPESTATUS[0]}
[ "$same" -le 1 ] || { echo "the comparison itself failed (exit $same)" >&2; exit 2; }

# Differing regular ELF files: what inside differs, with the tools this machine has. Diagnostics only:
# no `set -e` from here (diff and grep exit 1 for "differs" and "no match").
set +o pipefail
mapfile -t differing < <(awk '$2 == "different" && $4 == "/" {print $1}' "$OUT/compare.txt")
for f in "${differing[@]}"; do
  d=$OUT/diff-$f
  mkdir -p "$d"
  log "--- $f: what differs"
  if command -v readelf >/dev/null; then
    # Section sizes side by side (the section list above says which contents differ).
    if diff <(readelf -SW "$bin_a/$f" | sed -n 's/^ *\[ *[0-9]*\] //p' | awk '{print $1, $5}') \
            <(readelf -SW "$bin_b/$f" | sed -n 's/^ *\[ *[0-9]*\] //p' | awk '{print $1, $5}') > "$d/sections.diff"; then
      log "section sizes: all equal"
    else
      log "section sizes differ:"; head -n 20 "$d/sections.diff"
    fi
    # Symbols: names that only one side has (temp-file names, anonymous-namespace hashes show up here).
    diff <(readelf -sW "$bin_a/$f" | awk 'NR>3 {print $8}' | sort -u) \
         <(readelf -sW "$bin_b/$f" | awk 'NR>3 {print $8}' | sort -u) > "$d/symbols.diff"
    log "symbol names only in a / only in b: $(grep -c '^<' "$d/symbols.diff") / $(grep -c '^>' "$d/symbols.diff")"
    grep -E '^[<>]' "$d/symbols.diff" | head -n 12
  fi
  diff <(strings -a -n 8 "$bin_a/$f" | sort -u) <(strings -a -n 8 "$bin_b/$f" | sort -u) > "$d/strings.diff"
  log "strings only in a / only in b: $(grep -c '^<' "$d/strings.diff") / $(grep -c '^>' "$d/strings.diff")"
  grep -E '^[<>]' "$d/strings.diff" | cut -c1-200 | head -n 12
  if command -v cuobjdump >/dev/null && readelf -SW "$bin_a/$f" 2>/dev/null | grep -q '\.nv_fatbin'; then
    # The embedded CUDA images (one cubin per architecture and translation unit, PTX too): which differ.
    for x in a b; do
      mkdir -p "$d/cubin-$x"
      bin=$([ $x = a ] && echo "$bin_a" || echo "$bin_b")/$f
      (cd "$d/cubin-$x" && cuobjdump -xelf all "$bin" >/dev/null 2>&1; cuobjdump -xptx all "$bin" >/dev/null 2>&1; true)
      (cd "$d/cubin-$x" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum) > "$d/cubins-$x.sha256"
    done
    n_a=$(wc -l < "$d/cubins-a.sha256"); n_b=$(wc -l < "$d/cubins-b.sha256")
    diff "$d/cubins-a.sha256" "$d/cubins-b.sha256" > "$d/cubins.diff"
    log "CUDA images: $n_a in a, $n_b in b, $(grep -c '^<' "$d/cubins.diff") differ (cuobjdump -xelf/-xptx; names in $d/cubins.diff)"
    grep '^<' "$d/cubins.diff" | awk '{print $3}' | head -n 8
    first=$(grep '^<' "$d/cubins.diff" | awk '{print $3}' | head -n 1)
    if [ -n "$first" ]; then
      # One differing image in detail: its own sections and symbols.
      for x in a b; do readelf -sW "$d/cubin-$x/$first" 2>/dev/null | awk 'NR>3 {print $8}' | sort -u > "$d/first-cubin-symbols-$x.txt" || true; done
      diff "$d/first-cubin-symbols-a.txt" "$d/first-cubin-symbols-b.txt" | grep -E '^[<>]' | head -n 12 || true
    fi
    rm -rf "$d/cubin-a" "$d/cubin-b"
  fi
done

n_files=$(grep -cE '^  \S+ +(identical|different|only-a|only-b) ' "$OUT/compare.txt" || true)
verdict="$n_files entries compared; $([ "$same" = 0 ] && echo 'every file identical' || echo "${#differing[@]} regular files differ: ${differing[*]}")"
if [ "$compare_only" = 0 ]; then
  log "figures: build a $(cat "$OUT/seconds-a") s, build b $(cat "$OUT/seconds-b") s ($jobs jobs each); $verdict"
  log "total $(( $(date +%s) - t_start )) s; builds left in $work"
else
  log "$verdict"
fi
exit "$same"
