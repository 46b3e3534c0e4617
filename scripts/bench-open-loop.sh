#!/usr/bin/env bash
# The latency `tollgate up` adds at a fixed request rate, against baselines measured in the same
# rounds. One nginx upstream (one worker, BODY-byte answers) serves every target; per round, in
# turn, examples/open_loop.rs sends RATE requests/s for DURATION seconds over CONNS keep-alive
# connections (latency from each request's scheduled time: no coordinated omission) to:
#   - `direct`: the upstream itself, the floor every proxy adds to;
#   - `nginx`: nginx as a plain reverse proxy (auto workers, keep-alive upstream pool);
#   - each binary given, as a fresh `tollgate up` (API key, rate limit, quota, one event per
#     request) after 3 s of wrk to warm it, once the store has caught up with the warm-up
#     (the steady state at RATE, not the catch-up after a burst that saturated the cores).
# "added p99" is a target's p99 minus `direct`'s p99 of the same round: what the proxy adds at
# the tail, on the same two cores, with the same generator. For tollgate the script also reads
# the run's own events once they are stored (Parquet, through DuckDB) and reports the p99 and
# p99.9 of `latency_us - upstream_latency_us`: the time the request spent in the gateway itself
# (parsing, auth, limits, rewriting, writing), without the upstream leg and without the time
# the kernel took to hand the request to the gateway or the answer to the client.
#
# Without RATE, the rate is half of the first binary's maximum: wrk -t1 -c$CONNS for 8 s against
# a fresh `tollgate up` (the issue's "half of the gateway's own maximum rate").
# A fresh process per run keeps one binary's background work (flushes, compaction) out of
# another's measurement.
# TG_SESSION=own starts each `tollgate up` in a session of its own (scripts/lib/services.sh).
# LAYOUT=split runs the generator, wrk and the upstream on core 0 and the proxy under test on
# core 1 (scripts/lib/services.sh): the proxy's own added latency, without the generator
# queued on its core. This machine's scheduler packs threads onto one core while the other
# idles (BENCHMARKS.md, "What a switch and a wake-up cost here"), so in the shared layout
# (the default) the tail at half load measures that packing as much as any proxy. The maximum
# rate (without RATE) is measured in the same layout.
# STANDALONE=1 adds the last binary as `tollgate gateway` (target `gateway`, a fresh process per
# round): the gateway as its own process, its events produced to a Kafka-protocol broker (tansu,
# memory storage, on the same cores) and no collector, store or query API beside it, as in the
# scaled deployment. That binary must be built with `--features scaled`.
#
# LOGGED=1 adds `nginx-log`: the same nginx proxy with its access log on, as nginx ships it (one
# `combined` line written per request), after nginx in each round: a proxy that keeps a record of
# every request, as Tollgate's events do, on the same cores. The log is emptied before each run.
#
# After the rounds, a summary per target: in how many rounds its added p99 was under 1 ms, the
# median added p99 with a 95 % interval (bootstrap over the rounds), and, round by round, the
# difference to nginx's added p99 in the same round with its median and interval. One round's
# p99 moves by milliseconds with the machine, nginx's and the upstream's own included
# (BENCHMARKS.md, thirty-eighth round), so the paired difference says whether a proxy or the
# machine made a round's tail; ROUNDS=8 or more narrows the intervals.
# Usage: ROUNDS=3 [RATE=25000] DURATION=15 [TG_SESSION=own] [STANDALONE=1] [LOGGED=1] scripts/bench-open-loop.sh BINARY...
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
ROUNDS="${ROUNDS:-3}"; DURATION="${DURATION:-15}"; CONNS="${CONNS:-64}"; BODY="${BODY:-1024}"
[ $# -gt 0 ] || { echo "usage: $0 BINARY..." >&2; exit 2; }
. scripts/lib/services.sh
open_loop_tools
python3 -c 'import duckdb' 2>/dev/null || python3 -m pip install -q duckdb >&2
WORK="$(mktemp -d)"
cleanup() { end_run up px pxl; }
trap cleanup EXIT
nginx_upstream_and_proxy "$BODY"
if [ "${LOGGED:-0}" = 1 ]; then
  nginx_logged_proxy
fi
[ "${STANDALONE:-0}" = 1 ] && start_tansu

if [ -z "${RATE:-}" ]; then
  start_up "$1"
  "${ON_LOAD[@]}" wrk -t1 -c"$CONNS" -d2s -H 'x-api-key: bench-key' "http://127.0.0.1:$GW/v1/items/1" >/dev/null
  max=$("${ON_LOAD[@]}" wrk -t1 -c"$CONNS" -d8s -H 'x-api-key: bench-key' "http://127.0.0.1:$GW/v1/items/1" | awk '/Requests\/sec/{printf "%d", $2}')
  stop_up
  RATE=$((max / 2))
  echo "maximum of $1: $max requests/s (wrk -t1 -c$CONNS, 8 s); half of it: $RATE"
fi

# The machine's steal time so far, in clock ticks (`/proc/stat`): time the hypervisor ran
# something else while one of this guest's virtual cores had work. It counts the host's pauses
# of the machine, which no process here can prevent, in every run's row.
steal_ticks() { awk '/^cpu / {print $9}' /proc/stat; }

# open_loop NAME URL [HEADER]: one run; leaves its row in ROW, its p99 in P99 and the steal time
# during it (ms a second) in STEAL.
open_loop() {
  local name=$1 url=$2 header=${3:-"x-bench: 1"} sent ok non2xx errors achieved p50 p90 p999 max s0 s1
  s0=$(steal_ticks)
  read -r sent ok non2xx errors achieved p50 p90 P99 p999 max < <("${ON_LOAD[@]}" "$OPEN_LOOP" "$url" "$RATE" "$DURATION" "$CONNS" "$header")
  s1=$(steal_ticks)
  STEAL=$(awk -v t=$((s1 - s0)) -v hz="$(getconf CLK_TCK)" -v d="$DURATION" 'BEGIN {printf "%.1f", t * 1000 / hz / d}')
  ROW="| $name | $round | $p50 | $p90 | $P99 | $p999 | $max | $((non2xx + errors)) | $STEAL"
}

# added NAME: the row's added p99 (P99 less this round's `direct`), printed and kept in
# $WORK/added for the summary ("name round added_ms steal_ms_per_s").
added() {
  local a
  a=$(echo "$P99 - $floor" | bc -l | xargs printf %.3f)
  echo "$1 $round $a $STEAL" >> "$WORK/added"
  printf %s "$a"
}

# gateway_share: p99 and p99.9 (ms) of latency_us - upstream_latency_us over the events stored
# since $SINCE_US, once every request the gateway counted is in the store.
gateway_share() {
  wait_stored "$API"
  stop_up
  python3 - "$WORK/data" "$SINCE_US" <<'PY'
import duckdb, glob, sys
files = [f for f in glob.glob(sys.argv[1] + "/store/**/part-*.parquet", recursive=True)]
q = f"""select quantile_cont(latency_us - upstream_latency_us, [0.99, 0.999]) from read_parquet({files!r})
        where epoch_us(ts) >= {sys.argv[2]} and upstream_latency_us is not null"""
share = duckdb.connect().execute(q).fetchall()[0][0] if files else None
print(" ".join(f"{v / 1000:.3f}" for v in share) if share else "none none")
PY
}

echo "open loop at $RATE requests/s for $DURATION s over $CONNS connections, $BODY-byte answers; a fresh \`tollgate up\` per run"
echo "layout: ${LAYOUT:-shared} ($([ "${LAYOUT:-shared}" = split ] && echo "generator and upstream on core 0, the proxy on core 1" || echo "every process on both cores"))"
echo "\`tollgate up\` runs $([ "${TG_SESSION:-}" = own ] && echo "in a session of its own (TG_SESSION=own)" || echo "in the load generator's session (TG_SESSION=own: its own)")"
echo
echo "| target | round | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | non-2xx + errors | steal ms/s | added p99 ms | in the gateway p99 / p99.9 ms |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
  "${ON_LOAD[@]}" wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$UP/v1/items/1" >/dev/null
  open_loop direct "http://127.0.0.1:$UP/v1/items/1"; floor=$P99
  echo "$ROW | | |"
  "${ON_LOAD[@]}" wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$PX/v1/items/1" >/dev/null
  open_loop nginx "http://127.0.0.1:$PX/v1/items/1"
  echo "$ROW | $(added nginx) | |"
  if [ "${LOGGED:-0}" = 1 ]; then
    : > "$WORK/pxl/logs/access.log"
    "${ON_LOAD[@]}" wrk -t1 -c"$CONNS" -d2s "http://127.0.0.1:$PXL/v1/items/1" >/dev/null
    open_loop nginx-log "http://127.0.0.1:$PXL/v1/items/1"
    echo "$ROW | $(added nginx-log) | |"
  fi
  for bin in "$@"; do
    start_up "$bin"
    "${ON_LOAD[@]}" wrk -t1 -c"$CONNS" -d3s -H 'x-api-key: bench-key' "http://127.0.0.1:$GW/v1/items/1" >/dev/null
    # The warm-up saturates the cores, so the store trails it (ingest waits for idle cores);
    # the measured run starts once that backlog is stored, not while it is.
    wait_stored "$API"
    SINCE_US=$(date +%s%6N)
    open_loop "$bin" "http://127.0.0.1:$GW/v1/items/1" "x-api-key: bench-key"
    read -r own99 own999 < <(gateway_share)
    echo "$ROW | $(added "$bin") | $own99 / $own999 |"
  done
  if [ "${STANDALONE:-0}" = 1 ]; then
    # A fresh `tollgate gateway` per round (its spool in an empty directory), warmed as above;
    # with no store beside it there is nothing to wait for and no share of its own to read.
    start_gateway "${@: -1}"
    "${ON_LOAD[@]}" wrk -t1 -c"$CONNS" -d3s -H 'x-api-key: bench-key' "http://127.0.0.1:$GW/v1/items/1" >/dev/null
    open_loop gateway "http://127.0.0.1:$GW/v1/items/1" "x-api-key: bench-key"
    stop_up
    echo "$ROW | $(added gateway) | |"
  fi
done

echo
python3 - "$WORK/added" <<'PY'
import collections, statistics, sys
sys.path.insert(0, "scripts/lib")
from bootstrap import interval
by = collections.defaultdict(dict)
steals = []
for line in open(sys.argv[1]):
    name, rnd, ms, steal = line.split()
    by[name][int(rnd)] = float(ms)
    steals.append(float(steal))
print("| target | rounds under 1 ms | added p99, median (95 % interval), ms | less nginx's in the same round: median (95 % interval), ms | at or below nginx's |")
print("|---|---|---|---|---|")
for name, rounds in by.items():
    xs = list(rounds.values())
    lo, hi = interval(xs)
    row = f"| {name} | {sum(x < 1 for x in xs)} of {len(xs)} | {statistics.median(xs):.3f} ({lo:.3f}–{hi:.3f}) |"
    if name == "nginx":
        print(row + " | |")
        continue
    diffs = [x - by["nginx"][r] for r, x in rounds.items()]
    dlo, dhi = interval(diffs)
    print(row + f" {statistics.median(diffs):+.3f} ({dlo:+.3f}–{dhi:+.3f}) | {sum(d <= 0 for d in diffs)} of {len(diffs)} |")
print(f"\nsteal time in the proxies' runs: {min(steals):.1f}–{max(steals):.1f} ms a second (median {statistics.median(steals):.1f}) of the two cores' 2,000")
PY
