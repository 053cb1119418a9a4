# gpubox tune probe: run ONE llama-server configuration through a full prompt batch and a few generated
# tokens, measure the GPU memory it used, and report how it ended. Run as `bash -c "$(cat probe.sh)"` with
# every value as a positional argument (nothing is pasted into this text):
#
#   bash -c SCRIPT gpubox-probe WORKDIR PORT READY_TIMEOUT REQUEST_TIMEOUT GPU REQUEST_PATH REQUEST_BODY -- SERVER ARG...
#
# A load alone is not proof: near the floor a model loads and then dies on its first batch (exit 134), so
# the probe posts REQUEST_BODY (JSON) to REQUEST_PATH: a /completion of a few hundred token ids (one full
# prompt batch) with generated tokens, or a chat request for the speed check. Peak memory = the largest
# `memory.used` nvidia-smi saw (every 100 ms) minus the value just before the server started.
# Output: `@@key value` lines, then the response and the log tail.
set -u
ulimit -c 0 2>/dev/null   # an abort must not dump a core of a 16 GiB mapping
work=$1; port=$2; ready_to=$3; req_to=$4; gpu=$5; rpath=$6; rbody=$7
shift 7
[ "${1:-}" = "--" ] && shift
mkdir -p "$work" || { echo "@@state error"; echo "@@detail cannot create $work"; exit 0; }
log=$work/server.log; mem=$work/mem.csv; resp=$work/response.json; req=$work/request.json
rm -f "$log" "$mem" "$resp" "$req"
now() { date +%s.%N; }
later() { awk -v a="$(now)" -v b="$1" 'BEGIN { exit !(a > b) }'; }

# HTTP: curl where it exists, else python3's urllib (the tuner already needs python3 on the target).
if command -v curl >/dev/null 2>&1; then
    http_get() { curl -s -o /dev/null -m 2 -w '%{http_code}' "http://127.0.0.1:$port$1" 2>/dev/null; }
    http_post() { curl -s -m "$req_to" -o "$resp" -w '%{http_code}' -H 'Content-Type: application/json' \
        --data-binary @"$req" "http://127.0.0.1:$port$1"; }
else
    http_get() { python3 -c 'import sys, urllib.request as u, urllib.error as e
try:
    print(u.urlopen(sys.argv[1], timeout=2).status)
except e.HTTPError as x:
    print(x.code)
except Exception:
    print("000")' "http://127.0.0.1:$port$1"; }
    http_post() { python3 -c 'import sys, urllib.request as u, urllib.error as e
url, body, out, t = sys.argv[1], open(sys.argv[2], "rb").read(), sys.argv[3], float(sys.argv[4])
try:
    r = u.urlopen(u.Request(url, body, {"Content-Type": "application/json"}), timeout=t)
    code, data = r.status, r.read()
except e.HTTPError as x:
    code, data = x.code, x.read()
except Exception:
    code, data = "000", b""
open(out, "wb").write(data)
print(code)' "http://127.0.0.1:$port$1" "$req" "$resp" "$req_to"; }
fi

if [ "$(http_get /health)" != 000 ]; then
    echo "@@state error"
    echo "@@detail port $port on 127.0.0.1 already answers HTTP: another server is running there (set tune.probe_port)"
    exit 0
fi

t0=$(now)
smi=""; base=""
if command -v nvidia-smi >/dev/null 2>&1; then
    base=$(nvidia-smi -i "$gpu" --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n1 | tr -d ' ')
    nvidia-smi -i "$gpu" --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$mem" 2>/dev/null &
    smi=$!
fi

"$@" >"$log" 2>&1 </dev/null &
srv=$!
state=loading
end=$(awk -v t="$t0" -v d="$ready_to" 'BEGIN { printf "%.3f", t + d }')
while :; do
    if ! kill -0 "$srv" 2>/dev/null; then state=exited; break; fi
    code=$(http_get /health)
    if [ "$code" = 200 ]; then state=ready; break; fi
    if later "$end"; then state=timeout; break; fi
    sleep 0.2
done
t_ready=$(now)

http=""
if [ "$state" = ready ]; then
    printf '%s' "$rbody" >"$req"
    http=$(http_post "$rpath")
    sleep 0.3
    if kill -0 "$srv" 2>/dev/null; then
        if [ "$http" = 200 ]; then state=ok; else state=badresponse; fi
    else
        state=died
    fi
fi
t_done=$(now)

if kill -0 "$srv" 2>/dev/null; then
    kill -TERM "$srv" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$srv" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$srv" 2>/dev/null && kill -KILL "$srv" 2>/dev/null
fi
wait "$srv"; rc=$?
if [ -n "$smi" ]; then
    sleep 0.15; kill "$smi" 2>/dev/null; wait "$smi" 2>/dev/null
    # Let the driver hand the memory back before the next probe measures its baseline (at most 3 s).
    for _ in $(seq 30); do
        used=$(nvidia-smi -i "$gpu" --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n1 | tr -d ' ')
        case "$used" in ''|*[!0-9]*) break ;; esac
        case "$base" in ''|*[!0-9]*) break ;; esac
        [ "$used" -le $((base + 16)) ] && break
        sleep 0.1
    done
fi
peak=""
if [ -s "$mem" ]; then peak=$(awk 'BEGIN { m = -1 } /^[0-9]+/ { if ($1 + 0 > m) m = $1 + 0 } END { if (m >= 0) print m }' "$mem"); fi

echo "@@state $state"
echo "@@rc $rc"
echo "@@http $http"
echo "@@base $base"
echo "@@peak $peak"
echo "@@times $t0 $t_ready $t_done $(now)"
echo "@@response"
if [ -s "$resp" ]; then head -c 100000 "$resp"; fi
echo
echo "@@log"
tail -n 120 "$log"
