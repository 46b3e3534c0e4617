#!/usr/bin/env bash
# The gateway against nginx as a plain reverse proxy, same machine, same load, same run.
#
# wrk (THREADS threads, CONNS keep-alive connections, DURATION per run) against:
#   - nginx as a reverse proxy (worker_processes auto, keep-alive upstream pool, no access log):
#     the baseline;
#   - the same nginx with its access log on, as nginx ships it (`nginx-log`; LOGGED=0 leaves it
#     out): a proxy that keeps a record of every request, as the gateway does with its events;
#   - `tollgate up` with API-key auth, a rate limit, a quota and one event per request, for each
#     binary given (say the last commit's build and this tree's), so before and after are
#     measured side by side;
#   - the last binary as `tollgate gateway`, the gateway as its own process (target `gateway`):
#     the same configuration, its events produced to a Kafka-protocol broker (tansu, memory
#     storage, on the same cores), no collector, store or query API running (quota state from
#     the configuration). That binary must be built with `--features scaled`; STANDALONE=0
#     leaves this target out.
# The upstream is a separate nginx (one worker; UP_WORKERS=auto, one per core) answering BODY
# bytes. Runs alternate (baseline, then each binary) for ROUNDS rounds, nothing attached to the
# processes. Then one more run per target (`-counted`) with `perf stat` counting the system
# calls, context switches and CPU of the proxy's processes (nginx's workers, Tollgate's
# process) per request.
# Then one run per target with a quarter of the connections: latency under a lighter load.
# Last, the latency each proxy adds at a fixed rate: examples/open_loop.rs sends RATE requests/s
# (default: half the last Tollgate target's median requests/s above) on a schedule, to nginx and
# to every target, and measures from each request's scheduled time (no coordinated omission);
# "added p99" is a target's p99 minus nginx's at the same rate, in each of OPEN_ROUNDS rounds
# (default 3), and their median.
# While one target (or nginx) is measured, every other Tollgate process is paused (SIGSTOP), so
# that none's background work lands in another's figures.
#
# Usage: ROUNDS=3 DURATION=10s scripts/bench-gateway.sh [BINARY...]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
DURATION="${DURATION:-10s}"
CONNS="${CONNS:-64}"
THREADS="${THREADS:-1}"
ROUNDS="${ROUNDS:-3}"
BODY="${BODY:-1024}"
. scripts/lib/services.sh
load_tools perf=linux-perf
bins_or_release "$@"
cargo build --release --locked --example open_loop >&2
OPEN_LOOP="$CARGO_TARGET_DIR/release/examples/open_loop"
WORK="$(mktemp -d)"
cleanup() {
  for pid in "${TG_PIDS[@]}"; do kill -CONT "$pid" 2>/dev/null || true; done
  [ -s "$WORK/gw.log" ] && { echo "tollgate gateway's log:" >&2; tail -5 "$WORK/gw.log" >&2; }
  end_run up px pxl
}
trap cleanup EXIT

nginx_upstream_and_proxy "$BODY"
proxy_pids() { pgrep -d, -P "$(cat "$WORK/${1:-px}/nginx.pid")"; }
# With LOGGED=1 (the default), a second baseline: the same nginx proxy with its access log on
# as nginx ships it (`combined`, one write per request), the record of each request a plain
# nginx keeps. `nginx` (no log at all) stays the baseline of every ratio; the last table line
# sets the Tollgate targets against this one.
LOGGED="${LOGGED:-1}"
if [ "$LOGGED" = 1 ]; then
  nginx_logged_proxy
fi
# baselines [-suffix]: runs each nginx baseline once (see `run`; COUNT passes through).
baselines() {
  run "nginx${1:-}" "http://127.0.0.1:$PX/v1/items/1" "$(proxy_pids)" "$CONNS"
  if [ "$LOGGED" = 1 ]; then
    : > "$WORK/pxl/logs/access.log"
    run "nginx-log${1:-}" "http://127.0.0.1:$PXL/v1/items/1" "$(proxy_pids pxl)" "$CONNS"
  fi
}

# One `tollgate up` per binary, each on its own ports and data directory.
TG_PORTS=(); TG_PIDS=(); TG_APIS=()
start_ups "${BINS[@]}"
TARGETS=(); for i in "${!BINS[@]}"; do TARGETS+=("tollgate-$i"); done
if [ "${STANDALONE:-1}" = 1 ]; then
  start_tansu
  start_gateway "${BINS[-1]}"
  TG_PIDS+=("$TG"); TG_PORTS+=("$GW"); TARGETS+=("gateway")
fi

# focus I: only Tollgate target I (an index into TARGETS; -1 for none, when nginx is measured)
# runs; the other Tollgate processes are paused (SIGSTOP) until their turn. Otherwise their
# background work (flushes, rollups, compaction of what earlier runs stored) takes the cores
# from whichever target is measured: the last target's open-loop tail was 2–8 times the
# first's in every run before this. `focus all` resumes every one.
focus() {
  for j in "${!TG_PIDS[@]}"; do
    if [ "$1" = all ] || [ "$j" = "$1" ]; then kill -CONT "${TG_PIDS[$j]}"; else kill -STOP "${TG_PIDS[$j]}"; fi
  done
}

# warm I: 2 s of load on Tollgate target I, just resumed, before it is measured. A process
# resumed from SIGSTOP first runs the background work that fell due while it was paused
# (flushes, the quota state, compaction); the warm-up lets that pass outside the measurement.
warm() {
  wrk -t"$THREADS" -c"$CONNS" -d2s -H "x-api-key: bench-key" "http://127.0.0.1:${TG_PORTS[$1]}/v1/items/1" >/dev/null
}

# The machine's CPU ticks so far (`/proc/stat`): idle + iowait, all states, user + nice,
# system + irq + softirq; and its context switches so far.
cpu_ticks() {
  awk '/^cpu / {t = $5 + $6 " " $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 " " $2 + $3 " " $4 + $7 + $8}
       /^ctxt / {c = $2}
       END {print t, c}' /proc/stat
}

# run NAME URL PIDS CONNS [HEADER]: one wrk run; appends a result line
# "name rps p50_ms p99_ms requests non2xx syscalls_per_req cs_per_req cpu_us_per_req idle_pct
# machine_user_us machine_system_us machine_cs" to $WORK/results. idle_pct is the share of the
# machine's CPU time left idle during the run: in a closed loop with requests always in flight,
# idle cores mean the threads that had work queued on one core while another sat idle
# (BENCHMARKS.md, "Workers bound to their cores"). The machine_ fields are the whole machine's
# CPU time in user and in kernel mode (system, interrupts) and its context switches, per
# request: the load generator and the upstream share the cores, so this total is what decides
# how many requests a second the closed loop gets, and it shows in which mode a proxy costs
# more (BENCHMARKS.md, twenty-eighth round).
# With COUNT=1, `perf stat` counts PIDS' system calls, context switches and CPU during the
# run; otherwise those three are "-". Counting slows what it counts (the syscall
# tracepoint and a counter switched at every context switch): with it attached, one build
# measured 3–8 % faster than another without it and the same with it, so requests/s come from
# runs without it, and the counts from one run of their own per target.
run() {
  local name=$1 url=$2 pids=$3 conns=$4 header=${5:-} perf=""
  if [ "${COUNT:-0}" = 1 ]; then
    perf stat -e raw_syscalls:sys_enter,context-switches,task-clock -x, -o "$WORK/perf.txt" -p "$pids" &
    perf=$!
    sleep 0.2
  fi
  local ticks0 ticks1
  ticks0=$(cpu_ticks)
  if [ -n "$header" ]; then
    wrk -t"$THREADS" -c"$conns" -d"$DURATION" --latency -H "$header" "$url" > "$WORK/wrk.txt"
  else
    wrk -t"$THREADS" -c"$conns" -d"$DURATION" --latency "$url" > "$WORK/wrk.txt"
  fi
  ticks1=$(cpu_ticks)
  local summary per_request="- - -" machine
  summary=$(python3 scripts/lib/wrk_summary.py "$WORK/wrk.txt")
  # idle_pct and the machine_ fields; the requests are wrk's whole run's, the ticks were read
  # just around it.
  machine=$(awk -v a="$ticks0" -v b="$ticks1" -v n="$(cut -d' ' -f4 <<<"$summary")" -v hz="$(getconf CLK_TCK)" 'BEGIN {
    split(a, x, " "); split(b, y, " "); t = y[2] - x[2]; us = 1e6 / hz / (n > 0 ? n : 1)
    printf "%.1f %.2f %.2f %.3f", (t > 0 ? 100 * (y[1] - x[1]) / t : 0), (y[3] - x[3]) * us, (y[4] - x[4]) * us, (y[5] - x[5]) / (n > 0 ? n : 1) }')
  if [ -n "$perf" ]; then
  kill -INT "$perf"; wait "$perf" 2>/dev/null || true
  # System calls and context switches per request (the 4th field is the request count).
  per_request=$(python3 - "$(cut -d' ' -f4 <<<"$summary")" "$WORK/perf.txt" <<'PY'
import sys
total, perf = int(sys.argv[1]), open(sys.argv[2]).read()
# task-clock is in milliseconds: CPU microseconds per request.
def count(line):
    f = line.split(",")
    try:
        return f[2], float(f[0])
    except (IndexError, ValueError):
        return None
counts = dict(c for c in map(count, perf.splitlines()) if c)
print(f"{counts.get('raw_syscalls:sys_enter', 0) / total:.2f} {counts.get('context-switches', 0) / total:.2f} {counts.get('task-clock', 0) * 1000 / total:.1f}")
PY
)
  fi
  echo "$name $summary $per_request $machine" >> "$WORK/results"
}

# The Tollgate targets take turns at going first after nginx: round r starts with target
# r - 1 (modulo their number). With a fixed order the same binary measured first after nginx
# in every round served 4–12 % less than when measured second, in runs of the same two builds
# with the order swapped (BENCHMARKS.md, twenty-fifth round); rotating spreads that over all.
for r in $(seq 1 "$ROUNDS"); do
  echo "round $r of $ROUNDS" >&2
  focus -1
  baselines
  for k in "${!TARGETS[@]}"; do
    i=$(( (k + r - 1) % ${#TARGETS[@]} ))
    focus "$i"; warm "$i"
    run "${TARGETS[$i]}" "http://127.0.0.1:${TG_PORTS[$i]}/v1/items/1" "${TG_PIDS[$i]}" "$CONNS" "x-api-key: bench-key"
  done
done
# The counts: one run per target with `perf stat` attached (see `run`).
focus -1
COUNT=1 baselines -counted
for i in "${!TARGETS[@]}"; do
  focus "$i"; warm "$i"
  COUNT=1 run "${TARGETS[$i]}-counted" "http://127.0.0.1:${TG_PORTS[$i]}/v1/items/1" "${TG_PIDS[$i]}" "$CONNS" "x-api-key: bench-key"
done
# Latency at a lighter load: a quarter of the connections.
light=$((CONNS / 4 > 0 ? CONNS / 4 : 1))
focus -1
run nginx-light "http://127.0.0.1:$PX/v1/items/1" "$(proxy_pids)" "$light"
for i in "${!TARGETS[@]}"; do
  focus "$i"; warm "$i"
  run "${TARGETS[$i]}-light" "http://127.0.0.1:${TG_PORTS[$i]}/v1/items/1" "${TG_PIDS[$i]}" "$light" "x-api-key: bench-key"
done

# Open loop at half the last target's maximum.
RATE="${RATE:-$(python3 - "$WORK/results" "${TARGETS[-1]}" <<'PY'
import statistics, sys
rps = [float(l.split()[1]) for l in open(sys.argv[1]) if l.split()[0] == sys.argv[2]]
print(int(statistics.median(rps) / 2))
PY
)}"
secs="${DURATION%s}"
# OPEN_ROUNDS rounds (default 3), nginx first in each: on two shared cores one 8 s run's p99
# moves by milliseconds from one run to the next, nginx's own included (BENCHMARKS.md,
# twenty-third round), so the added p99 is the median of the rounds' differences.
for r in $(seq 1 "${OPEN_ROUNDS:-3}"); do
  focus -1
  "$OPEN_LOOP" "http://127.0.0.1:$PX/v1/items/1" "$RATE" "$secs" "$CONNS" > "$WORK/open-nginx.$r"
  for i in "${!TARGETS[@]}"; do
    focus "$i"; warm "$i"
    # A `tollgate up` stores what the warm-up left behind (ingest waits for idle cores) before
    # the run, so the run measures the steady state at RATE rather than that catch-up.
    if [ -n "${TG_APIS[$i]:-}" ]; then wait_stored "${TG_APIS[$i]}"; fi
    "$OPEN_LOOP" "http://127.0.0.1:${TG_PORTS[$i]}/v1/items/1" "$RATE" "$secs" "$CONNS" "x-api-key: bench-key" > "$WORK/open-${TARGETS[$i]}.$r"
  done
done
focus all

echo
echo "wrk -t$THREADS -c$CONNS -d$DURATION, $BODY-byte responses, $ROUNDS alternating rounds (light load: -c$light), upstream workers: ${UP_WORKERS:-1}"
for i in "${!BINS[@]}"; do echo "tollgate-$i = ${BINS[$i]} (tollgate up)"; done
[ "${STANDALONE:-1}" = 1 ] && echo "gateway = ${BINS[-1]} (tollgate gateway, events to tansu)"
echo
python3 - "$WORK/results" <<'PY'
import collections, statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
by = collections.defaultdict(list)
for r in rows:
    by[r[0]].append(r)
nginx = statistics.median(float(r[1]) for r in by["nginx"])
print("| target | requests/s (median) | each run | ratio to nginx | p50 ms | p99 ms | syscalls/req | context switches/req | CPU µs/req | non-2xx | cores idle % (least–most) | machine µs/req, user + kernel | machine context switches/req |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for name, rs in by.items():
    med = statistics.median(float(r[1]) for r in rs)
    mid = sorted(rs, key=lambda r: float(r[1]))[len(rs) // 2]
    kind = next((k for k in ("light", "counted") if name.endswith(k)), None)
    base = nginx if kind is None else statistics.median(float(r[1]) for r in by[f"nginx-{kind}"])
    idle = sorted(float(r[9]) for r in rs)
    idle = f"{idle[0]:.1f}" if len(idle) == 1 else f"{idle[0]:.1f}–{idle[-1]:.1f}"
    # The machine's figures: medians over the target's runs.
    user, kernel, cs = (statistics.median(float(r[k]) for r in rs) for k in (10, 11, 12))
    print(f"| {name} | {med:.0f} | {', '.join(r[1] for r in rs)} | {med / base:.2f} | {mid[2]} | {mid[3]} | {mid[6]} | {mid[7]} | {mid[8]} | {sum(int(r[5]) for r in rs)} | {idle} | {user:.2f} + {kernel:.2f} | {cs:.2f} |")
# Against nginx with its access log (LOGGED=1): each Tollgate target's median over that one's.
if "nginx-log" in by:
    logged = statistics.median(float(r[1]) for r in by["nginx-log"])
    mine = [n for n in by if not n.startswith("nginx") and not n.endswith(("-light", "-counted"))]
    print("\nagainst nginx with its access log on (nginx-log, " + f"{logged / nginx:.2f} of nginx): "
          + ", ".join(f"{n} {statistics.median(float(r[1]) for r in by[n]) / logged:.2f}" for n in mine))
# Each Tollgate target against the nginx run of the same round (the i-th run of a name is round
# i's): single rounds move with the machine by more than the difference between proxies
# (nginx alone ranged over ±15 % in runs minutes apart), so the paired ratios, their median, and
# a 95 % interval for that median (bootstrap over the rounds, 4,000 resamples, fixed seed) say
# how far the median can be trusted. Many short rounds (ROUNDS=16 DURATION=3s) narrow it.
sys.path.insert(0, "scripts/lib")
from bootstrap import interval
mine = [n for n in by if not n.startswith("nginx") and not n.endswith(("-light", "-counted"))]
for n in mine:
    ratios = [float(b[1]) / float(a[1]) for a, b in zip(by["nginx"], by[n])]
    lo, hi = interval(ratios)
    print(f"\n{n} against nginx, round by round: at or above it in {sum(r >= 1 for r in ratios)} of {len(ratios)}, "
          f"median ratio {statistics.median(ratios):.3f} (95 % interval {lo:.3f}–{hi:.3f})")
# The last `tollgate up` against the first, round by round (the same round's runs are the
# closest in time): in how many rounds it served more, and the median of the ratios.
ups = [n for n in by if n.startswith("tollgate-") and not n.endswith(("-light", "-counted"))]
if len(ups) >= 2:
    first, last = ups[0], ups[-1]
    pairs = [float(b[1]) / float(a[1]) for a, b in zip(by[first], by[last])]
    print(f"\n{last} against {first}, round by round: higher in {sum(p > 1 for p in pairs)} of {len(pairs)}, median ratio {statistics.median(pairs):.3f}")
PY

echo
echo "open loop at $RATE requests/s for ${secs} s over $CONNS connections (examples/open_loop.rs), latency from the scheduled time, ${OPEN_ROUNDS:-3} rounds (each target's run with the median p99 shown; added p99: the median of the rounds' differences to nginx, each round's in brackets):"
echo
python3 - "$WORK" "${OPEN_ROUNDS:-3}" nginx "${TARGETS[@]}" <<'PY'
import statistics, sys
work, rounds, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
runs = {n: [open(f"{work}/open-{n}.{r}").read().split() for r in range(1, rounds + 1)] for n in names}
print("| target | sent | achieved requests/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | non-2xx + errors | added p99 ms |")
print("|---|---|---|---|---|---|---|---|---|---|")
for n in names:
    rs = runs[n]
    r = sorted(rs, key=lambda r: float(r[7]))[len(rs) // 2]
    errors = sum(int(x[2]) + int(x[3]) for x in rs)
    added = ""
    if n != "nginx":
        diffs = [float(a[7]) - float(b[7]) for a, b in zip(rs, runs["nginx"])]
        added = f"{statistics.median(diffs):.3f} ({', '.join(f'{d:.2f}' for d in diffs)})"
    print(f"| {n} | {r[0]} | {r[4]} | {r[5]} | {r[6]} | {r[7]} | {r[8]} | {r[9]} | {errors} | {added} |")
PY
