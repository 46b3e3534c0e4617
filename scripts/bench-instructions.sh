#!/usr/bin/env bash
# Instructions per proxied request, by thread group, of `tollgate up` (API-key auth, rate limit,
# quota, one event per request): the process runs under valgrind's callgrind, wrk sends
# `-c CONNS` keep-alive connections of requests for DURATION seconds to an nginx upstream
# through it, and each thread's instruction count is divided by the requests the gateway
# counted (its /metrics).
#
# Why instructions: on two shared cores the CPU time a run spends per request moves 5–10 % from
# one run to the next, so a change worth 1–3 % cannot be told from the noise by time within one
# sitting; an instruction count moves by a few hundred in 25,000 (BENCHMARKS.md, twenty-third
# round). It is not time: cache misses, contention and the kernel are not in it, so a change is
# measured in time as well (`scripts/bench-gateway.sh`) before it is called faster.
# valgrind's virtual CPU has no SHA extensions: `sha2` takes its portable path (about 3,500
# instructions of every authenticated request here, about 300 on the real cores).
#
# Prints, per binary: the instructions per request of the gateway's workers, the ingest threads
# (collector and store: the threads that append to and flush the store) and the rest of the
# process (event publisher and log, query API, runtime), and the TOP functions of the workers
# with their inclusive count per request (GROUP=ingest or GROUP=rest shows that group's functions
# instead). Thread names are not in callgrind's files, so a thread is known by the functions it ran.
#
# Usage: DURATION=10 CONNS=8 TOP=40 GROUP=workers scripts/bench-instructions.sh [BINARY...]
#   Without binaries, the release build of this tree. With several (say an older build and the
#   current one), each is measured in turn.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
DURATION="${DURATION:-10}"
CONNS="${CONNS:-8}"
TOP="${TOP:-40}"
GROUP="${GROUP:-workers}"
case "$GROUP" in workers|ingest|rest) ;; *) echo "GROUP must be workers, ingest or rest, not '$GROUP'" >&2; exit 2;; esac
. scripts/lib/services.sh
load_tools valgrind=valgrind
bins_or_release "$@"
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; nginx -p "$WORK" -c "$WORK/nginx.conf" -s stop 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
start_nginx_upstream

for BIN in "${BINS[@]}"; do
  GW=$(port); API=$(port)
  bench_config "$WORK/tg.yaml" "$GW" "$API"
  rm -rf "$WORK/data" "$WORK/cg"; mkdir -p "$WORK/cg"
  RUST_LOG=warn valgrind --tool=callgrind --separate-threads=yes \
    --callgrind-out-file="$WORK/cg/out" "$BIN" up --config "$WORK/tg.yaml" --data-dir "$WORK/data" \
    2>"$WORK/valgrind.log" &
  P=$!
  wait_for "curl -sf -H 'x-api-key: bench-key' http://127.0.0.1:$GW/v1/items/1" 180
  wrk -t1 -c"$CONNS" -d"${DURATION}s" -H "x-api-key: bench-key" "http://127.0.0.1:$GW/v1/items/1" >/dev/null
  requests=$(curl -s "http://127.0.0.1:$API/metrics" | awk '/^tollgate_gateway_requests_total/ {r += $2} END {print r + 0}')
  # callgrind writes its counts when the process exits.
  kill -TERM "$P"; wait "$P" || true
  [ "$requests" -gt 0 ] || { echo "no requests counted; valgrind's log:" >&2; tail -20 "$WORK/valgrind.log" >&2; exit 1; }
  echo "## $BIN: $requests requests (wrk -t1 -c$CONNS -d${DURATION}s under callgrind)"
  python3 - "$WORK/cg" "$requests" "$TOP" "$GROUP" <<'PY'
import collections, os, re, subprocess, sys

folder, requests, top = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
shown_group = {"workers": "gateway workers", "ingest": "ingest (collector, store)",
               "rest": "the rest (publisher, event log, query API, runtime)"}[sys.argv[4]]
groups = collections.Counter()
inclusive = collections.Counter()
for name in sorted(os.listdir(folder)):
    path = os.path.join(folder, name)
    text = open(path, errors="replace").read()
    total = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    count = int(total.group(1)) if total else 0
    # Thread names are not in callgrind's files: a thread is known by what it ran.
    if "tollgate_gateway::proxy::Worker" in text:
        group = "gateway workers"
    elif "EventWriter>::" in text:
        group = "ingest (collector, store)"
    else:
        group = "the rest (publisher, event log, query API, runtime)"
    groups[group] += count
    if group != shown_group:
        continue
    out = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                         capture_output=True, text=True).stdout
    for line in out.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*)$", line)
        if m:
            fn = re.sub(r"^\?\?\?:", "", re.sub(r" \[.*\]$", "", m.group(2)))
            inclusive[fn] += int(m.group(1).replace(",", ""))
print()
print("| threads | instructions per request |")
print("|---|---|")
for group in ("gateway workers", "ingest (collector, store)",
              "the rest (publisher, event log, query API, runtime)"):
    print(f"| {group} | {groups[group] / requests:,.0f} |")
print(f"| the process | {sum(groups.values()) / requests:,.0f} |")
print()
print(f"The {shown_group} threads' {top} largest functions, inclusive, per request:")
print()
shown = 0
for fn, count in inclusive.most_common():
    if fn == "PROGRAM TOTALS" or fn.startswith(("std::", "core::ops::function", "./misc/", "./nptl/")):
        continue
    print(f"{count / requests:9,.0f}  {fn[:140]}")
    shown += 1
    if shown == top:
        break
print()
PY
done
