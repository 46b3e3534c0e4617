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
# Each round also runs the same load through nginx as a plain reverse proxy (a worker per core,
# in front of the same upstream; BASELINE=none leaves it out), and every run reports the
# upstream's CPU per request too: a proxy that makes its upstream work harder shows there.
# Compare Tollgate's whole process (workers and the rest) against nginx's workers.
#
# Usage: ROUNDS=5 RATE=20000 DURATION=6 [BASELINE=nginx|none] scripts/bench-cpu-per-request.sh BINARY...
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
  end_run up px
}
trap cleanup EXIT
# The upstream answers 1 KiB, as in bench-gateway.sh; nginx as a proxy in front of it.
nginx_upstream_and_proxy 1024
BASELINE="${BASELINE:-nginx}"

start_ups "$@"

# cpu split|all PID... -> "workers_ns other_ns": CPU time so far of the processes' threads. With
# `split` (a Tollgate process) the gateway's workers (`tollgate-gw-*`) apart from the rest; with
# `all` (nginx) every thread counts as a worker.
cpu() {
  python3 - "$@" <<'PY'
import os, sys
gw = other = 0
for pid in sys.argv[2:]:
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            ns = int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0])
            name = open(f"/proc/{pid}/task/{t}/comm").read().strip()
        except FileNotFoundError:
            continue  # a thread that ended meanwhile (the blocking pool's)
        if sys.argv[1] == "all" or name.startswith("tollgate-gw"):
            gw += ns
        else:
            other += ns
print(gw, other)
PY
}
read -r -a UPSTREAM_PIDS < <(pgrep -d' ' -P "$(cat "$WORK/up/nginx.pid")")
read -r -a PROXY_PIDS < <(pgrep -d' ' -P "$(cat "$WORK/px/nginx.pid")")

# run NAME URL split|all PID...: one measured run through the proxy at URL whose processes are
# PID...; prints its row and leaves its figures in FIGURES ("workers other process upstream").
run() {
  local name=$1 url=$2 g0 o0 g1 o1 u0 u1 ok p99 g o t u; shift 2
  "$OPEN_LOOP" "$url" "$RATE" 2 64 'x-api-key: bench-key' >/dev/null
  read -r g0 o0 < <(cpu "$@")
  read -r u0 _ < <(cpu all "${UPSTREAM_PIDS[@]}")
  # open_loop prints: sent ok non2xx errors achieved p50 p90 p99 p99.9 max
  read -r _ ok _ _ _ _ _ p99 _ < <("$OPEN_LOOP" "$url" "$RATE" "$DURATION" 64 'x-api-key: bench-key')
  read -r g1 o1 < <(cpu "$@")
  read -r u1 _ < <(cpu all "${UPSTREAM_PIDS[@]}")
  read -r g o t u < <(python3 -c "n = $ok * 1000; print(f'{($g1 - $g0) / n:.2f} {($o1 - $o0) / n:.2f} {($g1 - $g0 + $o1 - $o0) / n:.2f} {($u1 - $u0) / n:.2f}')")
  FIGURES="$g $o $t $u"
  echo "| $name | $r | $g | $o | $t | $u | $p99 |"
}

echo
echo "## CPU per request at $RATE requests/s (\`ROUNDS=$ROUNDS RATE=$RATE DURATION=$DURATION scripts/bench-cpu-per-request.sh\`)"
echo
for i in "${!TG_PIDS[@]}"; do echo "- tollgate-$i = \`${@:$((i + 1)):1}\`"; done
echo
echo "| target | round | workers µs/req | other threads µs/req | process µs/req | upstream µs/req | p99 ms |"
echo "|---|---|---|---|---|---|---|"
declare -A FIG
# The binaries take turns at going first: round r starts with binary r - 1 (modulo their
# number), as in bench-gateway.sh. With a fixed order one binary's median moved by up to
# 0.45 µs between a run where it went first and one where it went last (BENCHMARKS.md,
# twenty-fifth round).
for r in $(seq 1 "$ROUNDS"); do
  for pid in "${TG_PIDS[@]}"; do kill -STOP "$pid"; done
  if [ "$BASELINE" = nginx ]; then
    run nginx "http://127.0.0.1:$PX/v1/items/1" all "${PROXY_PIDS[@]}"
    FIG[nginx]="${FIG[nginx]:-}|$FIGURES"
  fi
  for k in "${!TG_PIDS[@]}"; do
    i=$(( (k + r - 1) % ${#TG_PIDS[@]} ))
    for pid in "${TG_PIDS[@]}"; do kill -STOP "$pid"; done
    kill -CONT "${TG_PIDS[$i]}"
    run "tollgate-$i" "http://127.0.0.1:${TG_PORTS[$i]}/v1/items/1" split "${TG_PIDS[$i]}"
    FIG[tollgate-$i]="${FIG[tollgate-$i]:-}|$FIGURES"
  done
done
names=()
[ "$BASELINE" = nginx ] && names+=(nginx)
for i in "${!TG_PIDS[@]}"; do names+=("tollgate-$i"); done
for name in "${names[@]}"; do
  python3 - "$name" "${FIG[$name]}" <<'PY'
import statistics, sys
rows = [list(map(float, r.split())) for r in sys.argv[2].split("|") if r.strip()]
med = [f"**{statistics.median(col):.2f}**" for col in zip(*rows)]
print(f"| {sys.argv[1]} | median | {' | '.join(med)} | |")
PY
done
