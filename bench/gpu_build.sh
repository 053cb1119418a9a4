#!/usr/bin/env bash
# Step 5 on the GPU machine (H100/H200, CUDA 13, Ubuntu, 16 cores, no internet): `invoke build` with CUDA on,
# CMAKE_CUDA_ARCHITECTURES=native, nvcc and host compiler from config (not steps 2-3), from a local source
# path; then the figures of bench/build_bench.py: efficiency, speed-up over the serial build, no-change
# rebuild, rebuild after deleting the build directory with a warm ccache. Logs and records go to $OUT.
# The built binaries stay in $GPUBOX_GPU_WORK/build/bin (default /tmp/gpubox-gpu) for the serve script.
#
# Carried (bench/pack_llama_src.sh makes .gpu/): .gpu/llama-src.tar.gz + .gpu/llama-src.sha (the sandbox
# mirror's commit), .gpu/debs/ccache + libhiredis0.14 (used only when `command -v ccache` finds none),
# and the Python wheels in .whl/ (installed to /tmp/site unless invoke imports already).
# Env: OUT (default .gpu/out), GPUBOX_GPU_WORK, NVCC (default /usr/local/cuda/bin/nvcc), HOSTCXX (default
# the machine's g++), BUILD_TARGETS (default the config's three), SKIP_WARM=1 to skip the warm rebuild.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
OUT=${OUT:-$here/.gpu/out}
work=${GPUBOX_GPU_WORK:-/tmp/gpubox-gpu}
mkdir -p "$OUT" "$work"
log() { echo "[gpu_build] $*"; }
t_start=$(date +%s)

# --- Python: invoke, fabric, jinja2, pyyaml from the carried wheels --------------------------------------
export PYTHONPATH=/tmp/site:$here${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c 'import invoke, yaml, jinja2' 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no invoke/yaml/jinja2 and no wheels in .whl/" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
fi
python3 -c 'import invoke, yaml, jinja2; print("python", __import__("sys").version.split()[0], "invoke", invoke.__version__)'

# --- tools ------------------------------------------------------------------------------------------
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
HOSTCXX=${HOSTCXX:-$(command -v g++)}
# GPU_BUILD_CPU_TEST=1: the same runs with build.cuda=false, to try the script on a machine without CUDA.
cpu_test=${GPU_BUILD_CPU_TEST:-0}
if [ "$cpu_test" = 1 ]; then tools=(git cmake "$HOSTCXX"); else tools=(git cmake "$NVCC" "$HOSTCXX"); fi
for t in "${tools[@]}"; do command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }; done
if ! command -v ccache >/dev/null; then
  # Debian bookworm's ccache 4.7.5 + libhiredis0.14 (its one library Ubuntu lacks), unpacked, behind a
  # wrapper that sets the library path for ccache alone (not for the compilers it runs).
  root=$work/ccache-root
  rm -rf "$root"; mkdir -p "$root" "$work/bin"
  for d in .gpu/debs/*.deb; do dpkg -x "$d" "$root"; done
  cat > "$work/bin/ccache" <<W
#!/bin/sh
LD_LIBRARY_PATH=$root/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH} exec $root/usr/bin/ccache "\$@"
W
  chmod +x "$work/bin/ccache"
  export PATH=$work/bin:$PATH
  log "ccache: carried Debian bookworm build ($("$work/bin/ccache" --version | head -n1))"
else
  log "ccache: $(command -v ccache) ($(ccache --version | head -n1))"
fi
command -v ninja >/dev/null && log "ninja $(ninja --version)" || log "ninja: not found (Makefiles)"
log "cmake: $(cmake --version | head -n1); nvcc: $("$NVCC" --version 2>/dev/null | grep release || echo none); host: $("$HOSTCXX" --version | head -n1)"
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader || true
log "cores $(nproc); $(grep MemAvailable /proc/meminfo)"

# --- source: the stripped tarball, committed like the sandbox mirror (same SHA) -------------------------
seed=$work/llama.cpp-seed
want=$(cat .gpu/llama-src.sha)
if [ "$(git -C "$seed" rev-parse HEAD 2>/dev/null)" != "$want" ]; then
  rm -rf "$seed"; mkdir -p "$seed"
  tar -xzf .gpu/llama-src.tar.gz -C "$seed"
  python3 - "$seed" <<'PY'
import os, subprocess, sys
from testbed.sandbox.gitmirror import GIT_ENV
env = dict(os.environ, **GIT_ENV)
for a in (["init", "-q", "-b", "master", "."], ["add", "-A", "."],
          ["commit", "-q", "-m", "llama.cpp as vendored by llama-cpp-python 0.3.36 (gpubox sandbox mirror)"]):
    subprocess.run(["git", *a], cwd=sys.argv[1], env=env, check=True)
PY
fi
sha=$(git -C "$seed" rev-parse HEAD)
[ "$sha" = "$want" ] || { echo "source commit $sha != packed $want" >&2; exit 2; }
log "source $seed at $sha"

# --- the runs ---------------------------------------------------------------------------------------
# A fresh ccache directory: the cold build must really be cold.
rm -rf "$work/ccache" "$work/src" "$work/build"
export CCACHE_MAXSIZE=20G
targets=${BUILD_TARGETS:-"[llama-server, llama-bench, llama-fit-params]"}
cuda=true; [ "$cpu_test" = 1 ] && cuda=false
sets=(--set "build.cuda=$cuda" --set "build.repo_url=$seed" --set "build.sha=$sha"
      --set "build.src_dir=$work/src" --set "build.build_dir=$work/build"
      --set build.cuda_architectures=native --set "build.nvcc=$NVCC" --set "build.host_compiler=$HOSTCXX"
      --set "build.ccache_dir=$work/ccache" --set "build.targets=$targets" --set "report_dir=$OUT/reports")
bench() { python3 bench/build_bench.py run --out "$OUT" --label "$1" -- "${@:2}"; }

log "cold build"
bench cold python3 -m invoke build "${sets[@]}" 2>&1 | tee "$OUT/cold.log"
mkdir -p "$OUT/cold"
cp "$work/build/gpubox-stamp.json" "$work/build/gpubox-configure.json" "$work/build/gpubox-dialect.json" \
   "$work/build/.ninja_log" "$OUT/cold/" 2>/dev/null || true
grep -h "Using CMAKE_CUDA_ARCHITECTURES" "$OUT"/reports/*/build.log | head -n1 | tee "$OUT/arch-line.txt" || true
CCACHE_DIR=$work/ccache ccache -s > "$OUT/ccache-after-cold.txt" 2>&1 || true

log "no-change rebuild"
bench nochange python3 -m invoke build "${sets[@]}" 2>&1 | tee "$OUT/nochange.log"
built=$(python3 -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))["targets"]))' "$work/build/gpubox-stamp.json")
# shellcheck disable=SC2086  # the target names are plain words
bench ninja-noop cmake --build "$work/build" --target $built 2>&1 | tail -n 3

if [ "${SKIP_WARM:-0}" != 1 ]; then
  log "rm -rf the build directory, rebuild with the warm ccache"
  rm -rf "$work/build"
  CCACHE_DIR=$work/ccache ccache -z >/dev/null 2>&1 || true
  bench warm python3 -m invoke build "${sets[@]}" 2>&1 | tee "$OUT/warm.log"
  CCACHE_DIR=$work/ccache ccache -s > "$OUT/ccache-after-warm.txt" 2>&1 || true
  cat "$OUT/ccache-after-warm.txt"
fi

"$work/build/bin/llama-server" --version 2>&1 | tee "$OUT/version.txt" || true
ldd "$work/build/bin/llama-server" "$work/build/bin/libggml-cuda.so" > "$OUT/ldd.txt" 2>&1 || true
grep -E "libcudart|libcublas|not found" "$OUT/ldd.txt" || true
python3 bench/build_bench.py report --out "$OUT" --build-dir "$work/build" --cores "$(nproc)" | tee "$OUT/figures.txt"
log "binaries left in $work/build/bin for the serve script; total $(( $(date +%s) - t_start )) s"
