#!/usr/bin/env bash
# Where each thread's time goes per proxied request, binaries side by side: for ROUNDS rounds,
# each binary in turn runs fresh as MODE (`up`: `tollgate up`, its pipeline in the process;
# `gateway`: `tollgate gateway` producing its events to a Kafka-protocol broker, tansu, on
# this machine), and with BASELINE=nginx nginx as a plain reverse proxy (the baseline) takes its
# turn too, with the benchmark configuration (scripts/lib/services.sh, bench_config) in
# front of one nginx upstream answering 1 KiB, and takes `wrk -t1 -c64` (or WRK) for DURATION seconds
# after 3 s of the same to warm up. Reported per thread name (summed over the threads of that
# name) of the proxy's process, of the broker and of the upstream: CPU µs per request (from
# /proc/<pid>/task/*/schedstat) and voluntary and involuntary context switches per request
# (/proc/<pid>/task/*/status), over the requests wrk counted, and the share of that CPU time
# spent in the kernel (`stime` against `utime` in /proc/<pid>/task/*/stat, counted in clock
# ticks: about 1 % at these durations). Threads under 1 % of the time are left out.
#
# What it is for: a change that moves work between threads, or wakes one more or less often,
# shows there when the requests/s of single runs (which move by 5–10 % on two shared cores)
# cannot tell it.
#
# WRK sets wrk's threads and connections (`-t1 -c64` unless set): `WRK="-t2 -c256"`, say.
#
# Usage: MODE=up|gateway BASELINE=nginx ROUNDS=2 DURATION=6 [WRK="-t1 -c64"] scripts/bench-threads.sh BINARY...
# (MODE=gateway needs a build with the `scaled` feature, and tansu: scripts/install-test-services.sh.)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
MODE="${MODE:-up}"; ROUNDS="${ROUNDS:-2}"; DURATION="${DURATION:-6}"; WRK="${WRK:--t1 -c64}"
[ $# -gt 0 ] || { echo "usage: MODE=up|gateway $0 BINARY..." >&2; exit 2; }
case "$MODE" in up|gateway) ;; *) echo "MODE is up or gateway, not $MODE" >&2; exit 2 ;; esac
. scripts/lib/services.sh
load_tools
[ "$MODE" = up ] || [ -x "$TANSU" ] || { echo "tansu not found at $TANSU: run scripts/install-test-services.sh" >&2; exit 1; }
WORK="$(mktemp -d)"
TG=""; TANSU_PID=""
cleanup() { end_run up px; }
trap cleanup EXIT
UP_WORKERS=1 nginx_upstream_and_proxy 1024
PROXY_MASTER=$(cat "$WORK/px/nginx.pid"); UPSTREAM_MASTER=$(cat "$WORK/up/nginx.pid")
UPSTREAM=$(pgrep -d' ' -P "$UPSTREAM_MASTER")

# start BINARY: a fresh Tollgate process of MODE, answering; sets GW, TG, TANSU_PID (empty
# when none), PIDS (the processes whose threads are counted) and STARTED (those `stop` ends).
# BINARY `nginx`: the proxy started above, as it is.
start() {
  TG=""; TANSU_PID=""
  if [ "$1" = nginx ]; then
    GW=$PX
    PIDS="$(pgrep -d' ' -P "$PROXY_MASTER") $UPSTREAM"
    STARTED=""
    return
  fi
  GW=$(port); local api; api=$(port)
  bench_config "$WORK/tg.yaml" "$GW" "$api"
  rm -rf "$WORK/data"
  if [ "$MODE" = up ]; then
    launch_up "$1" "$WORK/tg.yaml" "$WORK/data" "$WORK/tg.log"
  else
    start_tansu
    launch_gateway "$1" "$WORK/tg.yaml" "$WORK/data" "$WORK/tg.log"
  fi
  STARTED=$(echo "$TG" "$TANSU_PID")
  PIDS="$STARTED $UPSTREAM"
  wait_for "curl -sf -H 'x-api-key: bench-key' http://127.0.0.1:$GW/v1/items/1" 60
}
stop() {
  [ -n "$STARTED" ] || return 0
  kill $STARTED 2>/dev/null || true
  wait $STARTED 2>/dev/null || true
}

# snap: "process:thread voluntary involuntary cpu_ns utime stime" for every thread of PIDS.
snap() {
  local p t
  for p in $PIDS; do
    local name; name=$(tr ' ' _ < "/proc/$p/comm")
    local parent; parent=$(awk '/^PPid/{print $2}' "/proc/$p/status")
    [ "$parent" = "$PROXY_MASTER" ] && name=nginx-proxy
    [ "$parent" = "$UPSTREAM_MASTER" ] && name=upstream
    [ "$p" = "$TG" ] && name=tollgate
    [ "$p" = "$TANSU_PID" ] && name=tansu
    for t in /proc/"$p"/task/*; do
      echo "$name:$(tr ' ' _ < "$t/comm" 2>/dev/null || echo gone) $(awk '/^voluntary_ctxt/{v=$2} /^nonvoluntary_ctxt/{n=$2} END{print v+0, n+0}' "$t/status" 2>/dev/null || echo 0 0) $(awk '{print $1}' "$t/schedstat" 2>/dev/null || echo 0) $(sed 's/.*) //' "$t/stat" 2>/dev/null | awk '{print $12, $13}' || echo 0 0)"
    done
  done
}

echo "## Threads per request (\`MODE=$MODE ROUNDS=$ROUNDS DURATION=$DURATION WRK=\"$WRK\" scripts/bench-threads.sh\`)"
echo
for i in $(seq 1 $#); do echo "- tollgate-$((i - 1)) = \`${!i}\` (\`tollgate $MODE\`)"; done
[ "${BASELINE:-}" = nginx ] && echo "- nginx = nginx as a reverse proxy, a worker per core, in front of the same upstream"
echo
echo "| binary | round | requests/s | thread | CPU µs/req | in the kernel | voluntary cs/req | involuntary cs/req |"
echo "|---|---|---|---|---|---|---|---|"
BINS=("$@")
[ "${BASELINE:-}" = nginx ] && BINS+=(nginx)
for r in $(seq 1 "$ROUNDS"); do
  for k in "${!BINS[@]}"; do
    i=$(( (k + r - 1) % ${#BINS[@]} ))
    start "${BINS[$i]}"
    label="tollgate-$i"; [ "${BINS[$i]}" = nginx ] && label=nginx
    url="http://127.0.0.1:$GW/v1/items/1"
    wrk $WRK -d3s -H 'x-api-key: bench-key' "$url" >/dev/null
    snap > "$WORK/before"
    wrk $WRK -d"${DURATION}s" -H 'x-api-key: bench-key' "$url" > "$WORK/wrk"
    snap > "$WORK/after"
    stop
    python3 - "$WORK/before" "$WORK/after" "$WORK/wrk" "$label" "$r" <<'PY'
import collections, re, sys
def read(path):
    d = collections.defaultdict(lambda: [0] * 5)
    for line in open(path):
        name, *counts = line.split()
        counts += ["0"] * (5 - len(counts))  # a thread that ended between the reads
        for j, c in enumerate(counts):
            d[name][j] += int(c)
    return d
before, after = read(sys.argv[1]), read(sys.argv[2])
wrk = open(sys.argv[3]).read()
requests = int(re.search(r"(\d+) requests in", wrk).group(1))
rate = float(re.search(r"Requests/sec:\s+([\d.]+)", wrk).group(1))
total = sum(after[n][2] - before[n][2] for n in after)
first = True
for name in sorted(after, key=lambda n: -(after[n][2] - before[n][2])):
    vol, invol, ns, user, system = (after[name][j] - before[name][j] for j in range(5))
    if ns < total / 100:
        continue
    head = f"| {sys.argv[4]} | {sys.argv[5]} | {rate:,.0f} |" if first else "| | | |"
    first = False
    kernel = f"{100 * system / (user + system):.0f} %" if user + system else ""
    print(f"{head} {name} | {ns / 1e3 / requests:.3f} | {kernel} | {vol / requests:.4f} | {invol / requests:.4f} |")
print(f"| | | | all threads | {total / 1e3 / requests:.3f} | | | |")
PY
  done
done
