#!/usr/bin/env bash
# GPU check of gpubox's serve step. Offline; run on the GPU machine from the repository root:
#
#   OUT=/some/dir bench/gpu_serve.sh /path/to/build/bin/llama-server
#
# Needs python3 with invoke, jinja2, pyyaml, numpy and gguf (pip install -e .[test]). Writes tiny GGUFs, starts
# the server through provision.serve (render -> install -> start -> /health) at -lv 4 on the GPU, sends the smoke
# chat completion, prints the load_tensors lines (CUDA0 buffers) and doctor's findings, then shows doctor's
# draft-embedding-on-cpu finding on a real log by forcing the draft model's token embedding to the CPU.
# Logs, the binary's --help, launch files and results.json go to $OUT.
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: OUT=dir $0 /path/to/llama-server" >&2; exit 2; fi
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out-gpu-serve}
mkdir -p "$OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv | tee "$OUT/nvidia-smi.csv" || echo "no nvidia-smi"
exec "${PYTHON:-python3}" bench/gpu_serve.py "$1" --out "$OUT" "${@:2}"
