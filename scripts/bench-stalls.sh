#!/usr/bin/env bash
# Where the open loop's tail comes from: for each target (the upstream itself, nginx as a plain
# reverse proxy, `tollgate up`), RATE requests/s from examples/open_loop.rs for DURATION seconds
# over 64 connections, with every answer's time kept (OPEN_LOOP_SAMPLES) and a system-wide
# `perf record` of the scheduler's switches and wake-ups over the same run, on the same clock.
# scripts/lib/stalls.py then finds the stalls (stretches where answers of 1 ms or more came one
# after another), says how many of the slow answers fell in them, and splits the cores' time
# in the stalls by who ran: the proxy, the upstream, the generator, the machine's kernel
# threads, other processes, or nobody. It also counts wake-ups that waited over 1 ms for a core
# that was idle: time the guest's scheduler did not spend, so the host's.
#
# What it is for: the added p99 of scripts/bench-open-loop.sh says how much, not why
# (BENCHMARKS.md, thirty-eighth round). A tail made of stalls in which every target's answers
# wait alike is the machine's; one made of the proxy's own threads is the proxy's.
#
# Usage: ROUNDS=2 RATE=19500 DURATION=8 scripts/bench-stalls.sh [BINARY]
#   Without a binary, the release build of this tree.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
ROUNDS="${ROUNDS:-2}"; RATE="${RATE:-19500}"; DURATION="${DURATION:-8}"
. scripts/lib/services.sh
open_loop_tools perf=linux-perf
bins_or_release "$@"
WORK="$(mktemp -d)"
TG=""
cleanup() { end_run up px; }
trap cleanup EXIT
nginx_upstream_and_proxy 1024
ps -e -o pid=,ppid= | awk '$1 == 2 || $2 == 2 {print $1}' > "$WORK/kernel.tids"
pgrep -P "$(cat "$WORK/up/nginx.pid")" > "$WORK/upstream.tids"

# run NAME URL WORKER_TIDS_FILE OTHER_TIDS_FILE: one recorded open-loop run and its row; the
# files list the proxy's worker threads and its other threads.
run() {
  perf record -q -k CLOCK_MONOTONIC -e sched:sched_switch -e sched:sched_wakeup -a \
    -o "$WORK/sched.data" -- env OPEN_LOOP_SAMPLES="$WORK/samples" \
    "$OPEN_LOOP" "$2" "$RATE" "$DURATION" 64 "x-api-key: bench-key" > "$WORK/load" 2>"$WORK/perf.log" ||
    { cat "$WORK/perf.log" >&2; exit 1; }
  python3 scripts/lib/stalls.py "$WORK/samples" "$WORK/sched.data" "$3" "$4" "$WORK/upstream.tids" \
    "$WORK/kernel.tids" "$1"
}

echo "## Stalls at $RATE requests/s (\`ROUNDS=$ROUNDS RATE=$RATE DURATION=$DURATION scripts/bench-stalls.sh\`)"
echo
python3 scripts/lib/stalls.py --header
: > "$WORK/none.tids"
for round in $(seq "$ROUNDS"); do
  wrk -t1 -c64 -d2s "http://127.0.0.1:$UP/v1/items/1" >/dev/null
  run "direct, round $round" "http://127.0.0.1:$UP/v1/items/1" "$WORK/none.tids" "$WORK/none.tids"
  pgrep -P "$(cat "$WORK/px/nginx.pid")" > "$WORK/px.tids"
  wrk -t1 -c64 -d2s "http://127.0.0.1:$PX/v1/items/1" >/dev/null
  run "nginx, round $round" "http://127.0.0.1:$PX/v1/items/1" "$WORK/px.tids" "$WORK/none.tids"
  start_up "${BINS[0]}"
  wrk -t1 -c64 -d3s -H 'x-api-key: bench-key' "http://127.0.0.1:$GW/v1/items/1" >/dev/null
  wait_stored "$API"
  : > "$WORK/tg.tids"; : > "$WORK/tg-other.tids"
  for t in /proc/"$TG"/task/*; do
    case "$(cat "$t/comm")" in tollgate-gw-*) echo "${t##*/}" >> "$WORK/tg.tids" ;; *) echo "${t##*/}" >> "$WORK/tg-other.tids" ;; esac
  done
  run "\`tollgate up\`, round $round" "http://127.0.0.1:$GW/v1/items/1" "$WORK/tg.tids" "$WORK/tg-other.tids"
  stop_up
done
