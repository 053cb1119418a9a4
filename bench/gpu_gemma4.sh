#!/usr/bin/env bash
# Gemma 4 on the fork, on the GPU machine (issue 11, with issue 15's CUDA comparison): everything through
# gpubox's own code. Offline; run from the repository root with the Python wheels installed on PYTHONPATH.
#
#   POST_SRC=/path/post POST_SHA=<sha> PRE_SRC=/path/pre PRE_SHA=<sha> G=/tmp/gg bash bench/gpu_gemma4.sh
#
# POST_SRC/PRE_SRC are local git trees of the fork (post-sync b10018-1.2.0 and pre-sync b0e900a28), each at
# the commit named; how they were made is not part of this repository. Phases, each logged under $G/out:
#   1. builds, concurrently: post-sync in $G/post (the tree the runs use), the same pin again from another
#      source path into $G/post2 (the reproducibility comparison), pre-sync in $G/pre. `invoke build` with
#      CUDA on, native architectures, nvcc and the host compiler from config, no ccache;
#   2. the full twin pair (testbed.gemma4): one rigged target and three heads (post-sync rigged, post-sync
#      random, pre-sync rigged);
#   3. the GPU capped to 8 GiB free (bench/vram_holder.py); tune with MTP and without drafting, against an
#      exhaustive sweep (bench/gemma4_tune.py), at 128k context with turbo3 KV for target and head;
#   4. serve, both profiles, with and without the -otd override, load_tensors stanzas and doctor's verdicts
#      (bench/gemma4_serve.py); the MTP speed check at both ends of the acceptance range;
#   5. the file-by-file comparison of the two post-sync builds.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${POST_SRC:?}" "${POST_SHA:?}" "${PRE_SRC:?}" "${PRE_SHA:?}"
G=${G:-/tmp/gg}; O=$G/out; mkdir -p "$O"
export PYTHONUNBUFFERED=1
phase() { echo "[$(date +%T)] == $*" | tee -a "$O/phases.txt"; }
NVCC=${NVCC:-/usr/local/cuda/bin/nvcc}
HOSTCXX=${HOSTCXX:-$(command -v g++)}
CTX=${CTX:-131072}
JOBS=${JOBS:-4}
JOBS_FIRST=${JOBS_FIRST:-8}

build() {  # name src sha profile jobs
  local name=$1 src=$2 sha=$3 profile=$4 jobs=$5
  local t0; t0=$(date +%s)
  CCACHE_DISABLE=1 python3 -m invoke build \
    --set build.profile="$profile" --set build.cuda=true --set build.repo_url="$src" --set build.sha="$sha" \
    --set build.src_dir="$G/$name/src" --set build.build_dir="$G/$name/build" \
    --set build.cuda_architectures=native --set build.nvcc="$NVCC" --set build.host_compiler="$HOSTCXX" \
    --set "build.targets=[llama-server, llama-fit-params]" --set build.jobs="$jobs" \
    --set report_dir="$O/reports-$name" --set state_dir="$G/$name/state" > "$O/build-$name.log" 2>&1
  local rc=$?
  echo "build $name: exit $rc in $(( $(date +%s) - t0 )) s" | tee -a "$O/phases.txt"
  grep -h "Using CMAKE_CUDA_ARCHITECTURES" "$O"/reports-"$name"/*/build.log 2>/dev/null | head -n 1 >> "$O/phases.txt"
  "$G/$name/build/bin/llama-server" --version > "$O/version-$name.txt" 2>&1
  return $rc
}

phase "1. builds (3 concurrent: $JOBS_FIRST, $JOBS, $JOBS jobs) + 2. twin files"
# The second post-sync source path: the same commit cloned elsewhere, so the paths differ everywhere.
git clone -q --no-local "$POST_SRC" "$G/post2-origin" 2>/dev/null || true
# The tree the runs use first gets half the cores, so its tune phase can start while the other two finish.
build post "$POST_SRC" "$POST_SHA" current "$JOBS_FIRST" & b1=$!
build post2 "$G/post2-origin" "$POST_SHA" current "$JOBS" & b2=$!
build pre "$PRE_SRC" "$PRE_SHA" recipe "$JOBS" & b3=$!
M=$G/models; mkdir -p "$M/mtp-rigged" "$M/mtp-random" "$M/presync-rigged"
t0=$(date +%s)
python3 -m testbed.gemma4 "$M/mtp-rigged" --preset full --head mtp --variant rigged > "$O/twin.txt" 2>&1
# The target is one file for all three heads (the head alone decides agreement): linked, not rewritten.
for v in mtp-random:mtp:random presync-rigged:presync:rigged; do
  d=${v%%:*}; rest=${v#*:}
  python3 -m testbed.gemma4 "$M/$d" --preset full --head "${rest%%:*}" --variant "${rest#*:}" --only head >> "$O/twin.txt" 2>&1
  ln -sf "$M/mtp-rigged/gemma-4-26B-A4B-it-Q4_K_M.gguf" "$M/$d/gemma-4-26B-A4B-it-Q4_K_M.gguf"
done
echo "twins written in $(( $(date +%s) - t0 )) s" | tee -a "$O/phases.txt"; ls -la "$M"/* >> "$O/twin.txt"
wait $b1; post_rc=$?
phase "post-sync build done (exit $post_rc)"
[ "$post_rc" = 0 ] || { phase "post-sync build failed: see $O/build-post.log"; tail -n 40 "$O/build-post.log"; }
T=$M/mtp-rigged/gemma-4-26B-A4B-it-Q4_K_M.gguf
H=gemma-4-26B-A4B-it-assistant.Q4_K_M.gguf
BIN=$G/post/build/bin

phase "3. tune on the post-sync fork, full twin, 8 GiB cap, ctx $CTX, turbo3: with MTP and without drafting, vs the sweep"
# Memory only here (the other builds may still be running): the speed checks come after the builds.
python3 bench/tune_bench.py --bin-dir "$BIN" --model "$T" --draft "$M/mtp-rigged/$H" --spec-type mtp \
  --contexts "$CTX" --kv turbo3 --kvd turbo3 --modes mtp,none --sweep window --vocab 262144 --tuner module \
  --no-speed --no-rerun --cap-mib 8192 --budget-s 1500 --deadline-s 1500 --out "$O/tune" > "$O/tune.txt" 2>&1
echo "tune_bench exit $?" | tee -a "$O/phases.txt"
grep -A12 "=== summary" "$O/tune.txt" >> "$O/phases.txt"
CHOICE=$(python3 -c 'import json,sys; r=[x for x in json.load(open(sys.argv[1]))["runs"] if x["drafting"]=="mtp"]; print(r[0]["choice"] if r and r[0]["choice"] is not None else 21)' "$O/tune/tune_bench.json" 2>/dev/null || echo 21)
echo "--n-cpu-moe for the serve runs: $CHOICE" | tee -a "$O/phases.txt"

wait $b2; wait $b3
phase "builds all done"

phase "4a. MTP speed check at both ends of the acceptance range (tuner, learned overhead reused)"
rm -f "$O/holder.ready"
setsid python3 bench/vram_holder.py 8192 "$O/holder.ready" $$ 1200 > "$O/holder.txt" 2>&1 &
holder=$!
trap 'kill "$holder" 2>/dev/null || true' EXIT
for _ in $(seq 120); do [ -s "$O/holder.ready" ] && break; sleep 1; done
echo "holder: $(cat "$O/holder.ready" 2>/dev/null)" | tee -a "$O/phases.txt"
for v in rigged random; do
  st=$G/speed-state-$v; rm -rf "$st"; cp -r "$O/tune/tune-state/${CTX}_mtp" "$st" 2>/dev/null || mkdir -p "$st"
  python3 -m provision.tune --bin-dir "$BIN" --model "$T" --draft "$M/mtp-$v/$H" --spec-type mtp --ctx "$CTX" \
    --ctk turbo3 --ctv turbo3 --ctkd turbo3 --ctvd turbo3 --margin 0 --state-dir "$st" --workdir "$G/speed-$v" \
    --json "$O/speed-$v.json" > "$O/speed-$v.txt" 2>&1
  echo "speed $v: exit $?" | tee -a "$O/phases.txt"; grep -E "^tune: (speed|the MTP|chosen|probe)" "$O/speed-$v.txt" | tee -a "$O/phases.txt"
done

phase "4b. serve, both profiles, with and without -otd, at --n-cpu-moe $CHOICE"
python3 bench/gpu_gemma4_serve.py --build-dir "$G/post/build" --profile current --models-dir "$M/mtp-rigged" \
  --n-cpu-moe "$CHOICE" --ctx "$CTX" --out "$O/serve" > "$O/serve-post.txt" 2>&1
echo "serve post: exit $?" | tee -a "$O/phases.txt"
python3 bench/gpu_gemma4_serve.py --build-dir "$G/pre/build" --profile recipe --models-dir "$M/presync-rigged" \
  --n-cpu-moe "$CHOICE" --ctx "$CTX" --out "$O/serve" > "$O/serve-pre.txt" 2>&1
echo "serve pre: exit $?" | tee -a "$O/phases.txt"
grep -E "^(---|    |  \[|RESULT)" "$O/serve-post.txt" "$O/serve-pre.txt" >> "$O/phases.txt"
kill "$holder" 2>/dev/null

phase "5. reproducibility: post-sync built twice, from two source paths into two build directories"
python3 -m provision.repro compare "$G/post/build/bin" "$G/post2/build/bin" > "$O/repro.txt" 2>&1
echo "repro compare exit $?" | tee -a "$O/phases.txt"; head -n 40 "$O/repro.txt" >> "$O/phases.txt"
phase "all done"
touch "$G/done.all"
