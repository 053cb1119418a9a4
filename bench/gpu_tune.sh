#!/usr/bin/env bash
# GPU benchmark of `invoke tune` (issue 8): exhaustive --n-cpu-moe sweep vs the tuner, GPU capped to 8 GiB,
# at a short (576) and a long (32768) context, then a serve + smoke request at the long context.
# Offline; needs python3 with numpy and torch (CUDA), and a CUDA build of llama-server + llama-fit-params.
#
#   LLAMA_BIN=/path/to/build/bin OUT=/path/to/out bash bench/gpu_tune.sh          # about 6-8 minutes
#
# Optional, in a SEPARATE earlier call (about 4-5 min on 16 cores), build the binaries from a source tree:
#   LLAMA_SRC=/path/to/llama.cpp bash bench/gpu_tune.sh build    -> LLAMA_BIN=$LLAMA_SRC/build-cuda/bin
#
# Environment: SYNTH_MODEL (default /tmp/gpubox-synth/synth-30b-a3b.gguf: a 16 GiB sparse file on local
# disk, never under $OUT), extra arguments go to bench/tune_bench.py (--contexts 576,32768 --kv f16
# --cap-mib 8192 --budget-s 510 --tuner auto|invoke|module). Everything is logged to $OUT/bench.log and
# the figures to $OUT/tune_bench.json; the VRAM holder is killed by PID at the end, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"

if [ "${1:-}" = build ]; then
    : "${LLAMA_SRC:?set LLAMA_SRC to a llama.cpp (or fork) source tree}"
    cmake -S "$LLAMA_SRC" -B "$LLAMA_SRC/build-cuda" -G Ninja -DGGML_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_CUDA_ARCHITECTURES=native -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF \
        2>&1 | tail -n 5 | tee "$OUT/cmake.log"
    time cmake --build "$LLAMA_SRC/build-cuda" -j "$(nproc)" --target llama-server llama-fit-params 2>&1 \
        | tail -n 3 | tee "$OUT/build.log"
    ls -l "$LLAMA_SRC/build-cuda/bin/llama-server" "$LLAMA_SRC/build-cuda/bin/llama-fit-params"
    exit 0
fi

: "${LLAMA_BIN:?set LLAMA_BIN to the CUDA build bin directory (llama-server, llama-fit-params)}"
nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c 'import numpy, torch; assert torch.cuda.is_available(), "torch sees no CUDA device"'
SYNTH_MODEL=${SYNTH_MODEL:-/tmp/gpubox-synth/synth-30b-a3b.gguf}
exec python3 bench/tune_bench.py --bin-dir "$LLAMA_BIN" --out "$OUT" --model "$SYNTH_MODEL" "$@"
