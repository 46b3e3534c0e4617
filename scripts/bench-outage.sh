#!/usr/bin/env bash
# A broker outage under steady load, on the scaled deployment (gateway, collector and query API
# as separate processes, Kafka-protocol broker, ClickHouse): wrk drives the gateway for PHASE
# seconds, then for OUTAGE seconds while the broker is frozen (SIGSTOP: connections stay open,
# nothing answers, as with a hung broker or a partition), then for PHASE seconds after it is
# back. Prints each phase's throughput and latency (the gateway must not slow down while the
# broker is away: events go to the disk spool) and then reconciles: every request the gateway
# answered is in ClickHouse exactly once, and nothing was dropped.
# The baseline is the same gateway's "before" phase, measured in the same run.
# Usage: OUTAGE=60 PHASE=20 CONNS=32 scripts/bench-outage.sh
# BIN=path runs another build of `tollgate` (with the `scaled` feature); RECONCILE_S bounds the
# wait for every answered request to be stored (default 900); SPOOL_BYTES sets the gateway's
# spool size (default its own, 1 GiB: an outage longer than about a minute at full load fills
# it, and the events past it are dropped and counted).
set -euo pipefail
cd "$(dirname "$0")/.."
OUTAGE="${OUTAGE:-60}"; PHASE="${PHASE:-20}"; CONNS="${CONNS:-32}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
./scripts/install-test-services.sh
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked --features scaled >&2
  BIN="$CARGO_TARGET_DIR/release/tollgate"
fi
WORK="$(mktemp -d)"
cleanup() {
  [ -n "${TANSU_PID:-}" ] && kill -CONT "$TANSU_PID" 2>/dev/null
  nginx -p "$WORK" -c "$WORK/nginx.conf" -s stop 2>/dev/null || true
  kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"
}
trap cleanup EXIT
. scripts/lib/services.sh
load_tools
start_clickhouse
start_tansu

GW=$(port); GW_ADMIN=$(port); C_ADMIN=$(port); API=$(port)
start_nginx_upstream

cat > "$WORK/tollgate.yaml" <<YAML
gateway:
  listen: 127.0.0.1:$GW
  admin_listen: 127.0.0.1:$GW_ADMIN
  upstreams: { app: { targets: ["http://127.0.0.1:$UP"] } }
  routes: [ { id: items, methods: [GET], path: "/v1/items/{id}", upstream: app } ]
  auth: { api_key: { header: x-api-key } }
  spool: { max_bytes: ${SPOOL_BYTES:-1073741824} }
consumers: [ { id: bench, plan: p, api_keys: ["$("$BIN" hash-key bench-key)"] } ]
plans: { p: {} }
bus: { kind: kafka, brokers: "127.0.0.1:$KAFKA", topic: outage, partitions: 12 }
store: { kind: clickhouse, url: "http://127.0.0.1:$CH_HTTP", database: outage }
collector: { admin_listen: "127.0.0.1:$C_ADMIN" }
query_api: { listen: 127.0.0.1:$API }
YAML
RUST_LOG=warn "$BIN" query-api --config "$WORK/tollgate.yaml" --data-dir "$WORK/q" 2>>"$WORK/parts.log" &
wait_for "curl -sf http://127.0.0.1:$API/readyz" 60
RUST_LOG=warn "$BIN" collector --config "$WORK/tollgate.yaml" --data-dir "$WORK/c" 2>>"$WORK/parts.log" &
RUST_LOG=warn "$BIN" gateway --config "$WORK/tollgate.yaml" --data-dir "$WORK/g" 2>>"$WORK/parts.log" &
wait_for "curl -sf -H 'x-api-key: bench-key' http://127.0.0.1:$GW/v1/items/0" 60
# The collector has joined its group once the warm-up request is stored.
wait_for "[ \"\$(chq 'SELECT count() FROM outage.events')\" -gt 0 ]" 120

metric() { # sum of a gateway metric's samples whose line matches $1
  curl -sf "http://127.0.0.1:$GW_ADMIN/metrics" | awk -v m="$1" '$0 ~ m && $1 !~ /^#/ { s += $NF } END { printf "%.0f", s }'
}
phase() { # name seconds
  wrk -t2 -c"$CONNS" -d"$2s" --latency -H "x-api-key: bench-key" "http://127.0.0.1:$GW/v1/items/1" > "$WORK/wrk-$1.txt"
}
phase before "$PHASE"
kill -STOP "$TANSU_PID"
phase outage "$OUTAGE"
SPOOLED=$(metric 'tollgate_gateway_spool_events_total\{result="spooled"')
SPOOL_BYTES=$(metric '^tollgate_gateway_spool_bytes ')
kill -CONT "$TANSU_PID"
phase after "$PHASE"

python3 - "$WORK" <<'PY'
import re, sys
work = sys.argv[1]
def ms(v, u): return float(v) / 1000 if u == "us" else float(v) * 1000 if u == "s" else float(v)
rows = {}
for name in ["before", "outage", "after"]:
    t = open(f"{work}/wrk-{name}.txt").read()
    lat = {p: ms(*re.search(r"^\s+%s%%\s+([\d.]+)(us|ms|s)" % p, t, re.M).groups()) for p in ("50", "99")}
    mx = ms(*re.search(r"Latency\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)", t).groups())
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1))
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", t)) else 0
    errors = re.search(r"Socket errors: (.*)", t)
    rows[name] = (rps, lat["50"], lat["99"], mx, non2xx, errors.group(1) if errors else "none")
print("| phase | requests/s | p50 ms | p99 ms | max ms | non-2xx | socket errors |")
print("|---|---|---|---|---|---|---|")
for name, (rps, p50, p99, mx, bad, err) in rows.items():
    print(f"| {name} | {rps:.0f} | {p50:.3f} | {p99:.3f} | {mx:.1f} | {bad} | {err} |")
b, o = rows["before"], rows["outage"]
print(f"\noutage / before: throughput {o[0] / b[0]:.2f}, p50 {o[1] / b[1]:.2f}, p99 {o[2] / b[2]:.2f}")
PY
echo "events through the disk spool during the outage: $SPOOLED (spool at its end: $SPOOL_BYTES bytes)"

# Reconcile: every request the gateway answered, exactly once, nothing dropped.
ANSWERED=$(metric '^tollgate_gateway_requests_total\{')
PUBLISHED=$(metric '^tollgate_gateway_events_published_total ')
DROPPED=$(( $(metric '^tollgate_gateway_events_dropped_total\{') + $(metric 'tollgate_gateway_spool_events_total\{result="dropped"') ))
s=$(now_ms)
deadline=$((SECONDS + ${RECONCILE_S:-900}))
# (What was dropped, counted, is not waited for.)
until [ "$(chq 'SELECT count() FROM outage.events')" -ge $((ANSWERED - DROPPED)) ] || [ $SECONDS -ge $deadline ]; do
  sleep 0.1
done
e=$(now_ms)
sleep 2 # a late duplicate would show up now; the counts below must still be equal
read -r COUNT IDS POSITIONS <<<"$(chq 'SELECT count(), uniqExact(id), uniqExact(bus_partition, bus_offset) FROM outage.events')"
USAGE=$(curl -sf "http://127.0.0.1:$API/v1/usage?from=0&group_by=consumer" | python3 -c 'import json,sys; print(sum(r["requests"] for r in json.load(sys.stdin)["rows"]))')
echo "gateway answered $ANSWERED requests, published $PUBLISHED events, dropped $DROPPED"
echo "ClickHouse: $COUNT rows, $IDS distinct ids, $POSITIONS distinct bus positions; /v1/usage: $USAGE; all stored $((e - s)) ms after the load ended"
if [ "$COUNT" = "$ANSWERED" ] && [ "$IDS" = "$ANSWERED" ] && [ "$USAGE" = "$ANSWERED" ] && [ "$DROPPED" = 0 ]; then
  echo "reconciled: every answered request stored exactly once"
else
  echo "NOT reconciled" >&2; tail -20 "$WORK/parts.log" >&2; exit 1
fi
