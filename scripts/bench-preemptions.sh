#!/usr/bin/env bash
# Who takes the proxy's cores: context switches per request of every thread on the machine,
# and which thread took over from each thread that was preempted (left the core while still
# runnable), for `tollgate up` and for nginx as a plain reverse proxy, each in front of one
# nginx upstream answering 1 KiB under `wrk -t1 -c64`. A system-wide `perf record -e
# sched:sched_switch` runs for WINDOW seconds in the middle of DURATION seconds of load; the
# upstream's worker is told from the proxy's nginx workers by its pid.
#
# What it is for: the context switches a request of `scripts/bench.sh` say how many, not why.
# Voluntary switches are a thread with nothing left to run; preemptions say whose wake-up took
# the core (BENCHMARKS.md, thirty-fifth round). Requests in the window are estimated as the load's
# total times WINDOW/DURATION.
#
# With RATE set, the load is the open-loop generator's (examples/open_loop.rs) at RATE requests/s
# over 64 connections instead of wrk's closed loop: how the proxies switch at a given load
# rather than at their maximum.
#
# Usage: DURATION=12 WINDOW=4 [RATE=20000] scripts/bench-preemptions.sh [BINARY]
#   Without a binary, the release build of this tree.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
DURATION="${DURATION:-12}"; WINDOW="${WINDOW:-4}"
. scripts/lib/services.sh
if [ -n "${RATE:-}" ]; then open_loop_tools; else load_tools; fi
bins_or_release "$@"
command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 1; }
WORK="$(mktemp -d)"
TG=""
cleanup() { end_run up px; }
trap cleanup EXIT
UP_WORKERS=1 nginx_upstream_and_proxy 1024
UPSTREAM_WORKERS=$(pgrep -d, -P "$(cat "$WORK/up/nginx.pid")")

# measure NAME URL: the load, the recording and the report for one target.
measure() {
  if [ -n "${RATE:-}" ]; then
    "$OPEN_LOOP" "$2" "$RATE" "$DURATION" 64 "x-api-key: bench-key" > "$WORK/load" &
  else
    wrk -t1 -c64 -d"${DURATION}s" -H 'x-api-key: bench-key' "$2" > "$WORK/load" &
  fi
  local w=$!
  sleep $(( (DURATION - WINDOW) / 2 ))
  perf record -q -e sched:sched_switch -a -o "$WORK/sw.data" -- sleep "$WINDOW" >/dev/null 2>&1
  wait "$w"
  local total
  echo
  if [ -n "${RATE:-}" ]; then
    # open_loop prints: sent ok non2xx errors achieved p50 p90 p99 p99.9 max
    total=$(awk '{print $1}' "$WORK/load")
    echo "### $1: $(awk '{print $5 " requests/s, p50 " $6 " ms, p99 " $8 " ms"}' "$WORK/load")"
  else
    total=$(awk '/requests in/ {print $1}' "$WORK/load")
    echo "### $1: $(awk '/Requests\/sec/ {print $2}' "$WORK/load") requests/s"
  fi
  echo
  perf script -i "$WORK/sw.data" -F trace 2>/dev/null |
    UPSTREAM="$UPSTREAM_WORKERS" REQUESTS=$(( total * WINDOW / DURATION )) python3 -c '
import collections, os, re, sys
upstream = set(os.environ["UPSTREAM"].split(","))
requests = max(1, int(os.environ["REQUESTS"]))
pat = re.compile(r"prev_comm=(\S+) prev_pid=(\d+) .*prev_state=(\S+) ==> next_comm=(\S+) next_pid=(\d+)")
total, voluntary, preempted = collections.Counter(), collections.Counter(), collections.Counter()
for line in sys.stdin:
    m = pat.search(line)
    if not m:
        continue
    prev, prev_pid, state, nxt, next_pid = m.groups()
    prev = "upstream" if prev_pid in upstream else prev
    nxt = "upstream" if next_pid in upstream else nxt
    total[prev] += 1
    if state.startswith("R"):
        preempted[(prev, nxt)] += 1
    else:
        voluntary[prev] += 1
print("| thread | switches a request | voluntary |")
print("|---|---|---|")
for name, n in total.most_common(8):
    print(f"| {name} | {n / requests:.3f} | {voluntary[name] / requests:.3f} |")
print()
print("| preempted | by | a request |")
print("|---|---|---|")
for (prev, nxt), n in preempted.most_common(10):
    print(f"| {prev} | {nxt} | {n / requests:.3f} |")
'
}

GW=$(port); API=$(port)
bench_config "$WORK/tg.yaml" "$GW" "$API"
launch_up "${BINS[0]}" "$WORK/tg.yaml" "$WORK/data" "$WORK/tg.log"
wait_for "curl -sf -H 'x-api-key: bench-key' http://127.0.0.1:$GW/v1/items/1" 60
echo "## Preemptions (\`DURATION=$DURATION WINDOW=$WINDOW scripts/bench-preemptions.sh\`)"
measure "\`tollgate up\` (${BINS[0]})" "http://127.0.0.1:$GW/v1/items/1"
kill "$TG"; wait "$TG" 2>/dev/null || true
measure "nginx as a reverse proxy" "http://127.0.0.1:$PX/v1/items/1"
