#!/usr/bin/env bash
# What a burst of background CPU on the same two cores does to a proxy's latency, and what
# helps: the evidence behind `tollgate_store::cpu` (background loops offer their core every
# half millisecond). nginx as a reverse proxy (two workers) in front of an nginx upstream (one
# worker, BODY-byte answers), examples/open_loop.rs at RATE requests/s for DURATION seconds
# over 64 connections, beside a Python process that burns BURST_MS of CPU (a fixed amount of
# work) every REST_MS:
#   none      no burst process (the baseline);
#   bursts    each burst in one go, at normal priority;
#   idle      the same at SCHED_IDLE, the lowest scheduling priority;
#   nice19    the same at nice 19;
#   yielding  the same work calling sched_yield() every ~0.5 ms.
# Usage: ROUNDS=2 RATE=19000 DURATION=20 scripts/bench-bursts.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
ROUNDS="${ROUNDS:-2}"; RATE="${RATE:-19000}"; DURATION="${DURATION:-20}"; BODY="${BODY:-1024}"
BURST_MS="${BURST_MS:-8}"; REST_MS="${REST_MS:-50}"
. scripts/lib/services.sh
open_loop_tools
WORK="$(mktemp -d)"
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  for c in up proxy; do nginx -p "$WORK/$c" -c "$WORK/$c/nginx.conf" -s stop 2>/dev/null || true; done
  wait 2>/dev/null || true; rm -rf "$WORK"
}
trap cleanup EXIT
UP=$(port); PROXY=$(port)
mkdir -p "$WORK/up/logs" "$WORK/proxy/logs"
cat > "$WORK/up/nginx.conf" <<NGINX
worker_processes 1; pid $WORK/up/nginx.pid; error_log $WORK/up/logs/error.log;
events {} http { access_log off; server { listen 127.0.0.1:$UP; location / { return 200 '$(printf 'x%.0s' $(seq "$BODY"))'; } } }
NGINX
cat > "$WORK/proxy/nginx.conf" <<NGINX
worker_processes 2; pid $WORK/proxy/nginx.pid; error_log $WORK/proxy/logs/error.log;
events {} http { access_log off; upstream app { server 127.0.0.1:$UP; keepalive 64; }
  server { listen 127.0.0.1:$PROXY; keepalive_requests 1000000;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
NGINX
nginx -p "$WORK/up" -c "$WORK/up/nginx.conf"
nginx -p "$WORK/proxy" -c "$WORK/proxy/nginx.conf"
wait_for "curl -sf http://127.0.0.1:$PROXY/" 10
wrk -t1 -c64 -d2s "http://127.0.0.1:$PROXY/" >/dev/null
# The burst process: the same work per burst whatever else runs (so yielding does not do less).
cat > "$WORK/burst.py" <<'PY'
import os, sys, time
burst_s, rest_s, yielding = float(sys.argv[1]) / 1000, float(sys.argv[2]) / 1000, sys.argv[3] == "1"
def spin(n):
    x = 0
    for i in range(n):
        x += i
    return x
t = time.process_time(); spin(1_000_000); per = (time.process_time() - t) / 1_000_000
n, step = int(burst_s / per), max(1, int(0.0005 / per))
while True:
    done = 0
    while done < n:
        spin(min(step, n - done)); done += step
        if yielding:
            os.sched_yield()
    time.sleep(rest_s)
PY
echo "open loop at $RATE requests/s for $DURATION s over 64 connections through nginx; bursts of $BURST_MS ms of CPU every $REST_MS ms"
echo
echo "| burst process | round | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms |"
echo "|---|---|---|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
  for mode in none bursts idle nice19 yielding; do
    burst=""
    case $mode in
      none) ;;
      bursts) python3 "$WORK/burst.py" "$BURST_MS" "$REST_MS" 0 & burst=$! ;;
      idle) chrt -i 0 python3 "$WORK/burst.py" "$BURST_MS" "$REST_MS" 0 & burst=$! ;;
      nice19) nice -n 19 python3 "$WORK/burst.py" "$BURST_MS" "$REST_MS" 0 & burst=$! ;;
      yielding) python3 "$WORK/burst.py" "$BURST_MS" "$REST_MS" 1 & burst=$! ;;
    esac
    read -r _ _ _ _ _ p50 p90 p99 p999 max < <("$OPEN_LOOP" "http://127.0.0.1:$PROXY/" "$RATE" "$DURATION" 64)
    echo "| $mode | $round | $p50 | $p90 | $p99 | $p999 | $max |"
    if [ -n "$burst" ]; then kill "$burst" 2>/dev/null; wait "$burst" 2>/dev/null || true; fi
  done
done
