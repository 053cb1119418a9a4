#!/usr/bin/env bash
# The MTP speed check on the GPU machine, alone (no concurrent builds starving the CPU, as in
# bench/gpu_gemma4.sh's run): the post-sync fork built by `invoke build`, the full Gemma 4 twin pair, the GPU
# capped to 8 GiB free, and the tuner (python -m provision.tune) choosing --n-cpu-moe at 128k context with
# turbo3 KV and then timing a chat request with and without drafting, once with the rigged head (every draft
# accepted: the top of the range) and once with the random head (none accepted: the bottom).
#
#   POST_SRC=/path/post POST_SHA=<sha> G=/tmp/gs bash bench/gpu_gemma4_speed.sh
#
# POST_SRC is a local git tree of the fork (post-sync b10018-1.2.0) at POST_SHA; how it was made is not part
# of this repository. Everything is logged under $G/out (phases.txt is the summary).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${POST_SRC:?}" "${POST_SHA:?}"
G=${G:-/tmp/gs}; O=$G/out; mkdir -p "$O"
export PYTHONUNBUFFERED=1
phase() { echo "[$(date +%T)] == $*" | tee -a "$O/phases.txt"; }
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
HOSTCXX=${HOSTCXX:-$(command -v g++)}
CTX=${CTX:-131072}
JOBS=${JOBS:-$(nproc)}

phase "1. build post-sync ($JOBS jobs) and write the twin pair"
M=$G/models; mkdir -p "$M/rigged" "$M/random"
( python3 -m testbed.gemma4 "$M/rigged" --preset full --head mtp --variant rigged
  python3 -m testbed.gemma4 "$M/random" --preset full --head mtp --variant random --only head ) > "$O/twin.txt" 2>&1 &
tw=$!
t0=$(date +%s)
CCACHE_DISABLE=1 python3 -m invoke build \
  --set build.profile=current --set build.cuda=true --set build.repo_url="$POST_SRC" --set build.sha="$POST_SHA" \
  --set build.src_dir="$G/post/src" --set build.build_dir="$G/post/build" \
  --set build.cuda_architectures=native --set build.nvcc="$NVCC" --set build.host_compiler="$HOSTCXX" \
  --set "build.targets=[llama-server, llama-fit-params]" --set build.jobs="$JOBS" \
  --set report_dir="$O/reports" --set state_dir="$G/post/state" > "$O/build.log" 2>&1
echo "build: exit $? in $(( $(date +%s) - t0 )) s" | tee -a "$O/phases.txt"
grep -h "Using CMAKE_CUDA_ARCHITECTURES" "$O"/reports/*/build.log 2>/dev/null | head -n 1 >> "$O/phases.txt"
wait $tw; echo "twin: exit $?" | tee -a "$O/phases.txt"
T=$M/rigged/gemma-4-26B-A4B-it-Q4_K_M.gguf
H=gemma-4-26B-A4B-it-assistant.Q4_K_M.gguf
ln -sf "$T" "$M/random/gemma-4-26B-A4B-it-Q4_K_M.gguf"

phase "2. GPU capped to 8 GiB free"
rm -f "$O/holder.ready"
setsid python3 bench/vram_holder.py 8192 "$O/holder.ready" $$ 1200 > "$O/holder.txt" 2>&1 &
holder=$!
trap 'kill "$holder" 2>/dev/null || true' EXIT
for _ in $(seq 120); do [ -s "$O/holder.ready" ] && break; sleep 1; done
echo "holder: $(cat "$O/holder.ready" 2>/dev/null)" | tee -a "$O/phases.txt"

for v in rigged random; do
  phase "3. tune + speed check, $v head"
  st=$G/state-$v
  # The random head reuses what the rigged run measured (probes, learned overhead): only the speed differs.
  [ "$v" = random ] && cp -r "$G/state-rigged" "$st" 2>/dev/null
  python3 -m provision.tune --bin-dir "$G/post/build/bin" --model "$T" --draft "$M/$v/$H" --spec-type mtp \
    --ctx "$CTX" --ctk turbo3 --ctv turbo3 --ctkd turbo3 --ctvd turbo3 --state-dir "$st" --workdir "$G/work-$v" \
    --json "$O/speed-$v.json" > "$O/speed-$v.txt" 2>&1
  echo "tune $v: exit $?" | tee -a "$O/phases.txt"
  grep -E "^tune: " "$O/speed-$v.txt" | tee -a "$O/phases.txt"
done
kill "$holder" 2>/dev/null
phase "all done"
touch "$G/done.all"
