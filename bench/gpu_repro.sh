#!/usr/bin/env bash
# Issue 15 on the GPU machine: are clean CUDA builds of one pin, in different directories, the same bytes?
# Clean `invoke build` runs (CUDA on, CMAKE_CUDA_ARCHITECTURES=native, nvcc and host compiler from config,
# targets llama-server + llama-fit-params, no ccache), by default all at the same time with a share of the
# cores each:
#   a  its own clone of SRC_GIT in one source directory, its own build directory
#   b  another clone in another source directory (other depth and length), another build directory
#   c  a's source directory again (the same real path), a third build directory   (SAME_SOURCE=0: skipped)
# then every file of bin/ compared, a with b and a with c: identical or different, with sizes, and for a
# differing ELF file the sections that differ (provision/repro.py), the symbol names and strings only one
# side has, and the embedded CUDA images that differ (cuobjdump, when present). nvcc names anonymous-
# namespace and internal-linkage device code after the source file's real path (docs/reproducible-builds.md),
# so a-b can differ in libggml-cuda where a-c does not: c tells that cause from any other.
# The fork's code is not part of this repository: the source comes from the git path given.
#
# Usage: bench/gpu_repro.sh SRC_GIT SHA
#   SRC_GIT  a git repository (path or file:// URL) holding SHA, e.g. the fork's post-sync checkout
#   SHA      the full 40-hex commit to build
#        bench/gpu_repro.sh --compare BIN_A BIN_B   (only the comparison, of two existing bin/ directories)
# Env: OUT (default .gpu/out-repro), GPUBOX_GPU_WORK (default /tmp/gpubox-repro: the builds go there; it is
#      emptied first, only if this script made it), NVCC (default /usr/local/cuda/bin/nvcc), HOSTCXX
#      (default the machine's g++), TARGETS (default "[llama-server, llama-fit-params]"), SAME_SOURCE=0 to
#      skip build c, SERIAL=1 to build one after the other with every core each, GPU_BUILD_CPU_TEST=1 for the
#      same runs with build.cuda=false (to try the script on a machine without CUDA). Python wheels in .whl/
#      are installed to /tmp/site unless invoke imports.
# Exit status: 0 every compared file identical, 1 some file differs (the report says which), 2 usage or set-up.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
usage() { sed -n '2,28p' "$0" >&2; exit 2; }
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
# The check imports gpubox's own task module, so whatever it needs (invoke, yaml, jinja2, pydantic, ...) is there.
if ! python3 -c 'import invoke, provision.tasks' 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "provision.tasks does not import and there are no wheels in .whl/" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  python3 -c 'import invoke, provision.tasks' || { echo "provision.tasks still does not import: a wheel is missing from .whl/" >&2; exit 2; }
fi
python3 -c 'import invoke; print("python", __import__("sys").version.split()[0], "invoke", invoke.__version__)'

# --- the comparison of two bin/ directories, with what differs inside each differing ELF file -----------
# compare <name> <bin_x> <bin_y>: report in $OUT/compare-<name>.txt, details in $OUT/<name>-<file>/; sets
# $verdict; returns 0 identical, 1 different.
compare() {
  local name=$1 bx=$2 by=$3 same f d x bin first n_a n_b
  set +e +o pipefail    # diagnostics: diff and grep exit 1 for "differs" and "no match"
  log "=== $name: $bx vs $by"
  python3 -m provision.repro compare "$bx" "$by" | tee "$OUT/compare-$name.txt"
  same=${PIPESTATUS[0]}
  [ "$same" -le 1 ] || { echo "the comparison itself failed (exit $same)" >&2; exit 2; }
  mapfile -t differing < <(awk '$2 == "different" && $4 == "/" {print $1}' "$OUT/compare-$name.txt")
  for f in "${differing[@]}"; do
    d=$OUT/$name-$f
    mkdir -p "$d"
    log "--- $name: $f: what differs"
    if command -v readelf >/dev/null; then
      # Section sizes side by side (the list above says which contents differ).
      if diff <(readelf -SW "$bx/$f" | sed -n 's/^ *\[ *[0-9]*\] //p' | awk '{print $1, $5}') \
              <(readelf -SW "$by/$f" | sed -n 's/^ *\[ *[0-9]*\] //p' | awk '{print $1, $5}') > "$d/sections.diff"; then
        log "section sizes: all equal"
      else
        log "section sizes differ:"; head -n 20 "$d/sections.diff"
      fi
      # Symbols: names that only one side has (temp-file names, nvcc module-id hashes show up here).
      diff <(readelf -sW "$bx/$f" | awk 'NR>3 {print $8}' | sort -u) \
           <(readelf -sW "$by/$f" | awk 'NR>3 {print $8}' | sort -u) > "$d/symbols.diff"
      log "symbol names only in x / only in y: $(grep -c '^<' "$d/symbols.diff") / $(grep -c '^>' "$d/symbols.diff")"
      grep -E '^[<>]' "$d/symbols.diff" | head -n 12
    fi
    diff <(strings -a -n 8 "$bx/$f" | sort -u) <(strings -a -n 8 "$by/$f" | sort -u) > "$d/strings.diff"
    log "strings only in x / only in y: $(grep -c '^<' "$d/strings.diff") / $(grep -c '^>' "$d/strings.diff")"
    grep -E '^[<>]' "$d/strings.diff" | cut -c1-200 | head -n 12
    if command -v cuobjdump >/dev/null && readelf -SW "$bx/$f" 2>/dev/null | grep -q '\.nv_fatbin'; then
      # The embedded CUDA images (one cubin per architecture and translation unit, PTX too): which differ.
      for x in x y; do
        mkdir -p "$d/cubin-$x"
        bin=$([ $x = x ] && echo "$bx" || echo "$by")/$f
        (cd "$d/cubin-$x" && cuobjdump -xelf all "$bin" >/dev/null 2>&1; cuobjdump -xptx all "$bin" >/dev/null 2>&1; true)
        (cd "$d/cubin-$x" && find . -type f -print0 | sort -z | xargs -0 -r sha256sum) > "$d/cubins-$x.sha256"
      done
      n_a=$(wc -l < "$d/cubins-x.sha256"); n_b=$(wc -l < "$d/cubins-y.sha256")
      diff "$d/cubins-x.sha256" "$d/cubins-y.sha256" > "$d/cubins.diff"
      log "CUDA images: $n_a in x, $n_b in y, $(grep -c '^<' "$d/cubins.diff") differ (cuobjdump -xelf/-xptx; list in $d/cubins.diff)"
      grep '^<' "$d/cubins.diff" | awk '{print $3}' | head -n 8
      first=$(grep '^<' "$d/cubins.diff" | awk '{print $3}' | head -n 1)
      if [ -n "$first" ]; then
        # One differing image in detail: the symbol names only one side has.
        for x in x y; do readelf -sW "$d/cubin-$x/$first" 2>/dev/null | awk 'NR>3 {print $8}' | sort -u > "$d/first-image-symbols-$x.txt"; done
        diff "$d/first-image-symbols-x.txt" "$d/first-image-symbols-y.txt" | grep -E '^[<>]' | head -n 12
      fi
      rm -rf "$d/cubin-x" "$d/cubin-y"
    fi
  done
  n_files=$(grep -cE '^  \S+ +(identical|different|only-a|only-b) ' "$OUT/compare-$name.txt")
  verdict="$name: $n_files entries compared, $([ "$same" = 0 ] && echo 'every file identical' || echo "${#differing[@]} regular files differ: ${differing[*]}")"
  set -e -o pipefail
  return "$same"
}

if [ "$compare_only" = 1 ]; then
  rc=0; compare x-y "$bin_a" "$bin_b" || rc=$?
  log "$verdict"
  exit "$rc"
fi

# --- tools ------------------------------------------------------------------------------------------
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
HOSTCXX=${HOSTCXX:-$(command -v g++)}
if [ "${GPU_BUILD_CPU_TEST:-0}" = 1 ]; then tools=(git cmake "$HOSTCXX"); cuda=false; else tools=(git cmake "$NVCC" "$HOSTCXX"); cuda=true; fi
for t in "${tools[@]}"; do command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }; done
log "cmake: $(cmake --version | head -n1); nvcc: $("$NVCC" --version 2>/dev/null | grep release || echo none); host: $("$HOSTCXX" --version | head -n1)"
log "ninja: $(ninja --version 2>/dev/null || echo 'not found (Makefiles)'); ccache: off for every build (build.ccache=false); cuobjdump: $(command -v cuobjdump || echo none)"
nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>/dev/null || log "nvidia-smi: none"
cores=$(nproc)
log "cores $cores; $(grep MemAvailable /proc/meminfo)"

# --- the builds -------------------------------------------------------------------------------------
# Different depths and lengths, so that a path that leaks into a binary changes its bytes (and its size).
labels=(a b); [ "${SAME_SOURCE:-1}" = 1 ] && labels+=(c)
declare -A src=([a]=$work/a/src/llama.cpp [b]=$work/second-tree/source/checkout/llama.cpp [c]=$work/a/src/llama.cpp)
declare -A bld=([a]=$work/a/build [b]=$work/b [c]=$work/third/build-directory)
# Every build starts clean. The work directory is emptied only when this script made it (its marker).
if [ -e "$work" ] && [ ! -e "$work/.gpubox-repro" ]; then
  echo "$work exists and was not made by this script: set GPUBOX_GPU_WORK to a new path" >&2; exit 2
fi
rm -rf "$work"
mkdir -p "$work"
touch "$work/.gpubox-repro"
targets=${TARGETS:-"[llama-server, llama-fit-params]"}
if [ "${SERIAL:-0}" = 1 ]; then jobs=$cores; else jobs=$(( cores / ${#labels[@]} > 0 ? cores / ${#labels[@]} : 1 )); fi
common=(--set "build.cuda=$cuda" --set "build.repo_url=$src_git" --set "build.sha=$sha"
        --set build.cuda_architectures=native --set "build.nvcc=$NVCC" --set "build.host_compiler=$HOSTCXX"
        --set build.ccache=false --set "build.targets=$targets" --set "build.jobs=$jobs")
one() {   # one <label>: a clean `invoke build` into that label's directories; its log and wall time in $OUT
  local t0 rc=0
  t0=$(date +%s)
  python3 -m invoke build "${common[@]}" --set "build.src_dir=${src[$1]}" --set "build.build_dir=${bld[$1]}" \
    --set "state_dir=$work/state-$1" --set "report_dir=$OUT/reports-$1" > "$OUT/build-$1.log" 2>&1 || rc=$?
  echo "$(( $(date +%s) - t0 ))" > "$OUT/seconds-$1"
  return $rc
}
for x in "${labels[@]}"; do log "build $x: source ${src[$x]}, build ${bld[$x]}"; done
log "$jobs jobs each, $([ "${SERIAL:-0}" = 1 ] && echo 'one after the other' || echo 'at the same time')"
if [ "${SAME_SOURCE:-1}" = 1 ] && [ "${SERIAL:-0}" != 1 ]; then
  # c builds from a's clone: a clones, checks out and configures first (nothing writes into the source
  # tree after that), then b and c start beside it.
  one a & pid_a=$!
  for _ in $(seq 900); do
    { [ -e "${bld[a]}/build.ninja" ] || [ -e "${bld[a]}/Makefile" ]; } && break
    kill -0 "$pid_a" 2>/dev/null || break
    sleep 1
  done
fi
declare -A rc
if [ "${SERIAL:-0}" = 1 ]; then
  for x in "${labels[@]}"; do rc[$x]=0; one "$x" || rc[$x]=$?; done
else
  declare -A pid
  [ -n "${pid_a:-}" ] && pid[a]=$pid_a
  for x in "${labels[@]}"; do [ -n "${pid[$x]:-}" ] || { one "$x" & pid[$x]=$!; }; done
  for x in "${labels[@]}"; do rc[$x]=0; wait "${pid[$x]}" || rc[$x]=$?; done
fi
for x in "${labels[@]}"; do
  log "build $x: exit ${rc[$x]}, $(cat "$OUT/seconds-$x") s"
  if [ "${rc[$x]}" != 0 ]; then tail -n 25 "$OUT/build-$x.log"; echo "build $x failed: see $OUT/build-$x.log" >&2; exit 2; fi
  cp "${bld[$x]}/gpubox-stamp.json" "$OUT/stamp-$x.json"
done
grep -h "Using CMAKE_CUDA_ARCHITECTURES" "$OUT"/reports-a/*/build.log 2>/dev/null | head -n1 || true
if [ -x "${bld[a]}/bin/llama-server" ]; then "${bld[a]}/bin/llama-server" --version 2>&1 | head -n2 || true; fi

# --- the comparisons --------------------------------------------------------------------------------
status=0
verdicts=()
compare a-b "${bld[a]}/bin" "${bld[b]}/bin" || status=1
verdicts+=("$verdict")
if [ "${SAME_SOURCE:-1}" = 1 ]; then
  compare a-c "${bld[a]}/bin" "${bld[c]}/bin" || status=1
  verdicts+=("$verdict")
fi
times=""; for x in "${labels[@]}"; do times+="build $x $(cat "$OUT/seconds-$x") s, "; done
log "figures: ${times}$jobs jobs each"
for v in "${verdicts[@]}"; do log "$v"; done
log "total $(( $(date +%s) - t_start )) s; builds left in $work"
exit "$status"
