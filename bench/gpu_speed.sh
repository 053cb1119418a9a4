#!/usr/bin/env bash
# GPU: `tune` with a draft model, so its speed check runs: generation and prompt tokens/s at the chosen
# --n-cpu-moe with and without drafting, and the draft acceptance. Offline, on the GPU machine:
#
#   OUT=/some/dir bash bench/gpu_speed.sh        # about 7 minutes on 16 cores (most of it the CUDA build)
#
# Builds llama-server + llama-fit-params with bench/gpu_build.sh (no warm rebuild), writes the synthetic
# 30B-A3B-shaped target (bench/synth_moe.py, 16 GiB sparse) and a 2-layer draft with the same vocabulary,
# caps the GPU to 8 GiB with bench/vram_holder.py and runs `python -m provision.tune` at context 4096.
# The draft is a plain draft model (--spec-type draft; upstream serves it, the post-sync fork aborts on it): the
# speed check's code path is the same, the speed-up figure is not MTP's.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.gpu/out}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=$OUT/build SKIP_WARM=1 BUILD_TARGETS="[llama-server, llama-fit-params]" bash bench/gpu_build.sh > "$OUT/build.txt" 2>&1 \
  || { tail -n 30 "$OUT/build.txt"; exit 1; }
grep -E "cold build|jobs|configure" "$OUT/build/figures.txt" || true
bin=${GPUBOX_GPU_WORK:-/tmp/gpubox-gpu}/build/bin
d=/tmp/gpubox-synth; mkdir -p "$d"
python3 bench/synth_moe.py "$d/synth-30b-a3b.gguf" > "$OUT/synth.txt" 2>&1
python3 bench/synth_moe.py "$d/synth-draft-2l.gguf" --layers 2 >> "$OUT/synth.txt" 2>&1
rm -f "$OUT/holder.ready"
setsid python3 bench/vram_holder.py 8192 "$OUT/holder.ready" $$ 600 > "$OUT/holder.txt" 2>&1 &
holder=$!
trap 'kill "$holder" 2>/dev/null || true' EXIT
for _ in $(seq 120); do [ -s "$OUT/holder.ready" ] && break; sleep 1; done
echo "holder: $(cat "$OUT/holder.ready")"
python3 -m provision.tune --bin-dir "$bin" --model "$d/synth-30b-a3b.gguf" --draft "$d/synth-draft-2l.gguf" \
  --spec-type draft --ctx 4096 --margin 0 --state-dir /tmp/gpubox-speed-state --workdir /tmp/gpubox-speed \
  --json "$OUT/speed.json" --plot "$OUT/speed.png" 2>&1 | tee "$OUT/tune.txt"
