#!/usr/bin/env bash
# `tollgate up` under a load that leaves no core idle, for longer than its ingest may trail,
# against nginx as a plain reverse proxy in the same run: what it serves once the deferred
# ingest work is due, and how far behind the store falls.
#
# In `tollgate up` the collector and the store run on idle cores until they are
# `collector.yield_until_lag_ms` behind (src/sched.rs). A short closed-loop run (such as
# `bench-gateway.sh`'s 8 s) can end before that bound is reached, so part of its events are
# stored after the run. This script runs DURATION seconds (default 60, twelve times the default
# bound) of wrk -t1 -c64 with 1 KiB answers, first against nginx (two workers, keep-alive
# upstream pool), then against a fresh `tollgate up` per binary given. Every 2 s it reads the
# gateway's requests and the collector's appended events from the query API's /metrics; it
# prints the largest gap ("behind", events not yet in the store), the requests/s of the whole
# run and of its second half (when the bound has been reached), and how long after the load
# the store holds every event.
#
# Usage: DURATION=60 scripts/bench-sustained.sh BINARY...
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
DURATION="${DURATION:-60}"
[ $# -gt 0 ] || { echo "usage: $0 BINARY..." >&2; exit 2; }
. scripts/lib/services.sh
open_loop_tools
WORK="$(mktemp -d)"
cleanup() { end_run up px; }
trap cleanup EXIT
nginx_upstream_and_proxy 1024

# rps: the requests/s of wrk's report on stdin.
rps() { awk '/Requests\/sec/{print $2}'; }
wrk -t1 -c64 -d2s "http://127.0.0.1:$PX/v1/items/1" >/dev/null
nginx_rps=$(wrk -t1 -c64 -d"${DURATION}s" "http://127.0.0.1:$PX/v1/items/1" | rps)
echo "wrk -t1 -c64 -d${DURATION}s, 1 KiB answers; nginx as the proxy: $nginx_rps requests/s"
echo
echo "| binary | requests/s | ratio to nginx | second half requests/s | most events not yet stored | store complete after the load |"
echo "|---|---|---|---|---|---|"
for bin in "$@"; do
  start_up "$bin"
  wrk -t1 -c64 -d2s -H 'x-api-key: bench-key' "http://127.0.0.1:$GW/v1/items/1" >/dev/null
  wrk -t1 -c64 -d"${DURATION}s" -H 'x-api-key: bench-key' "http://127.0.0.1:$GW/v1/items/1" > "$WORK/wrk.txt" &
  load=$!
  start=$(date +%s.%N); : > "$WORK/samples"
  # A sample every 2 s; the end of the load noticed within 0.2 s.
  for ((i = 1; ; i++)); do
    sleep 0.2
    kill -0 "$load" 2>/dev/null || break
    ((i % 10 == 0)) && echo "$(echo "$(date +%s.%N) - $start" | bc) $(served_and_appended "$API")" >> "$WORK/samples"
  done
  ended=$(date +%s.%N)
  wait "$load"
  total=$(rps < "$WORK/wrk.txt")
  # Requests/s over the second half, from the samples around its start and the run's end.
  half=$(awk -v d="$DURATION" '$1 >= d / 2 && !s {s = 1; t0 = $1; r0 = $2} {t1 = $1; r1 = $2} END {if (t1 > t0) printf "%.0f", (r1 - r0) / (t1 - t0)}' "$WORK/samples")
  behind=$(awk '{b = $2 - $3; if (b > m) m = b} END {print m + 0}' "$WORK/samples")
  complete="more than 60 s"
  for _ in $(seq 600); do
    read -r r a < <(served_and_appended "$API")
    if [ "$a" -ge "$r" ]; then complete="$(printf %.1f "$(echo "$(date +%s.%N) - $ended" | bc)") s"; break; fi
    sleep 0.1
  done
  ratio=$(echo "scale=2; $total / $nginx_rps" | bc)
  echo "| $bin | $total | $ratio | $half | $behind | $complete |"
  stop_up
done
