#!/usr/bin/env bash
# GPU: the tuner against a sweep for a Gemma 4 target + MTP head, on its own (bench/gpu_gemma4.sh runs it as
# one phase of the whole issue-11 run). Offline, on the GPU machine, with a CUDA build of llama-server and
# llama-fit-params (the fork's or upstream's) and python3 with numpy and torch (the 8 GiB cap):
#
#   bash bench/gpu_gemma4_tune.sh BIN_DIR TARGET.gguf HEAD.gguf [CTX] [KV] [KV_HEAD] [SPEC] [OUT]
#   e.g. bash bench/gpu_gemma4_tune.sh /tmp/gg/post/build/bin /tmp/gg/models/mtp-rigged/gemma-4-26B-A4B-it-Q4_K_M.gguf \
#          /tmp/gg/models/mtp-rigged/gemma-4-26B-A4B-it-assistant.Q4_K_M.gguf 131072 turbo3 turbo3 mtp /tmp/gg/out/tune
#
# Defaults: CTX 131072, KV turbo3, KV_HEAD = KV, SPEC mtp (rendered per dialect: --spec-type mtp pre-sync,
# draft-mtp post-sync/upstream; `draft` for a plain draft model, refused on the post-sync fork), OUT ./out/tune.
# For each of "with the head" and "without drafting": the tuner (python -m provision.tune: its choice, real
# probes, fit-params calls, time), then one real probe per --n-cpu-moe value from the tuner's choice + 4 down to
# the first value that does not fit (so the table covers the first OOM up to four above the floor when the
# choice is at the floor, as it must be). The head's GPU share comes from its GGUF header (no KV of its own).
# Figures: OUT/tune_bench.json, the log OUT/bench.log; TUNE_ARGS adds tune_bench.py options (e.g.
# "--budget-s 1500 --deadline-s 1500 --no-speed").
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { sed -n '2,19p' "$0"; exit 2; }
BIN=$1 TARGET=$2 HEAD=$3 CTX=${4:-131072} KV=${5:-turbo3} KVD=${6:-${5:-turbo3}} SPEC=${7:-mtp} OUT=${8:-$PWD/out/tune}
for f in "$BIN/llama-server" "$BIN/llama-fit-params" "$TARGET" "$HEAD"; do
  [ -e "$f" ] || { echo "gpu_gemma4_tune: missing $f" >&2; exit 2; }
done
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The vocabulary size for the probes' prompt token ids: the target's, from its header.
VOCAB=$(python3 -c 'import json,sys; from provision import ggufhead; print(ggufhead.summary(sys.argv[1])["n_vocab"])' "$TARGET")
# shellcheck disable=SC2086  # TUNE_ARGS is a list of options
exec python3 bench/tune_bench.py --bin-dir "$BIN" --model "$TARGET" --draft "$HEAD" --spec-type "$SPEC" \
  --contexts "$CTX" --kv "$KV" --kvd "$KVD" --modes mtp,none --sweep window --vocab "$VOCAB" --tuner module \
  --no-rerun --cap-mib 8192 --out "$OUT" ${TUNE_ARGS:-}
