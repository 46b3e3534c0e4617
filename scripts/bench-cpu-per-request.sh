#!/usr/bin/env bash
# CPU per proxied request at a fixed rate, before against after: each binary given runs as
# `tollgate up` (the benchmark configuration: API-key auth, a rate limit, a quota, one event per
# request) in front of one nginx upstream answering 1 KiB. For ROUNDS rounds, each binary in
# turn (the others paused with SIGSTOP) gets RATE requests/s for DURATION seconds from the
# open-loop generator (examples/open_loop.rs, 64 connections), after 2 s of the same to warm
# up. Reported per run: the CPU time per request of the gateway's worker threads
# (`tollgate-gw-*`) and of every other thread (the pipeline: bus, collector, store, query
# API), from /proc/<pid>/task/*/schedstat (nanoseconds), and the p99 from the schedule.
#
# Why a fixed rate: at saturation the throughput of every process on the two cores moves with
# the others (the upstream and the load generator batch less behind a slower proxy), and
# requests/s from one 8 s run differ by 15 % or more on a shared machine. CPU per request at
# the same offered load moves only with the binary, so small changes show (a few percent);
# the rounds' spread says how far to trust a difference.
#
# Usage: ROUNDS=5 RATE=20000 DURATION=6 scripts/bench-cpu-per-request.sh BINARY...
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
ROUNDS="${ROUNDS:-5}"
RATE="${RATE:-20000}"
DURATION="${DURATION:-6}"
[ $# -gt 0 ] || { echo "usage: $0 BINARY..." >&2; exit 2; }
. scripts/lib/services.sh
open_loop_tools
WORK="$(mktemp -d)"
TG_PIDS=(); TG_PORTS=()
cleanup() {
  for pid in "${TG_PIDS[@]}"; do kill -CONT "$pid" 2>/dev/null || true; done
  kill $(jobs -p) 2>/dev/null || true
  nginx -p "$WORK" -c "$WORK/nginx.conf" -s stop 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
start_nginx_upstream
# The upstream answers 1 KiB, as in bench-gateway.sh.
sed -i "s|return 200 '{\"ok\":true}'|return 200 '$(printf 'x%.0s' $(seq 1024))'|" "$WORK/nginx.conf"
nginx -p "$WORK" -c "$WORK/nginx.conf" -s reload
wait_for "[ \"\$(curl -s http://127.0.0.1:$UP/ | wc -c)\" = 1024 ]" 10

start_ups "$@"

# cpu PID -> "gateway_ns other_ns": CPU time so far of the gateway's workers and of the rest.
cpu() {
  python3 - "$1" <<'PY'
import os, sys
pid = sys.argv[1]
gw = other = 0
for t in os.listdir(f"/proc/{pid}/task"):
    try:
        ns = int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0])
        name = open(f"/proc/{pid}/task/{t}/comm").read().strip()
    except FileNotFoundError:
        continue  # a thread that ended meanwhile (the blocking pool's)
    if name.startswith("tollgate-gw"):
        gw += ns
    else:
        other += ns
print(gw, other)
PY
}

echo
echo "## CPU per request at $RATE requests/s (\`ROUNDS=$ROUNDS RATE=$RATE DURATION=$DURATION scripts/bench-cpu-per-request.sh\`)"
echo
for i in "${!TG_PIDS[@]}"; do echo "- tollgate-$i = \`${@:$((i + 1)):1}\`"; done
echo
echo "| binary | round | gateway workers µs/req | other threads µs/req | p99 ms |"
echo "|---|---|---|---|---|"
declare -A GW OTHER
# The binaries take turns at going first: round r starts with binary r - 1 (modulo their
# number), as in bench-gateway.sh. With a fixed order one binary's median moved by up to
# 0.45 µs between a run where it went first and one where it went last (BENCHMARKS.md,
# twenty-fifth round).
for r in $(seq 1 "$ROUNDS"); do
  for k in "${!TG_PIDS[@]}"; do
    i=$(( (k + r - 1) % ${#TG_PIDS[@]} ))
    for pid in "${TG_PIDS[@]}"; do kill -STOP "$pid"; done
    kill -CONT "${TG_PIDS[$i]}"
    url="http://127.0.0.1:${TG_PORTS[$i]}/v1/items/1"
    "$OPEN_LOOP" "$url" "$RATE" 2 64 'x-api-key: bench-key' >/dev/null
    read -r g0 o0 < <(cpu "${TG_PIDS[$i]}")
    # open_loop prints: sent ok errors non2xx achieved p50 p90 p99 p99.9 max
    read -r _ ok _ _ _ _ _ p99 _ < <("$OPEN_LOOP" "$url" "$RATE" "$DURATION" 64 'x-api-key: bench-key')
    read -r g1 o1 < <(cpu "${TG_PIDS[$i]}")
    read -r g o < <(python3 -c "print(f'{($g1 - $g0) / $ok / 1000:.2f} {($o1 - $o0) / $ok / 1000:.2f}')")
    GW[$i]="${GW[$i]:-} $g"; OTHER[$i]="${OTHER[$i]:-} $o"
    echo "| tollgate-$i | $r | $g | $o | $p99 |"
  done
done
for i in "${!TG_PIDS[@]}"; do
  read -r gm om < <(python3 -c "import statistics as s, sys; g, o = sys.argv[1].split(), sys.argv[2].split(); print(f'{s.median(map(float, g)):.2f} {s.median(map(float, o)):.2f}')" "${GW[$i]}" "${OTHER[$i]}")
  echo "| tollgate-$i | median | **$gm** | **$om** | |"
done
