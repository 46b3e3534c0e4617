#!/usr/bin/env bash
# The embedded store at scale: EVENTS events of one day (default 10 million) written to the bus
# log as gateways would (examples/seed_bus.rs), then `tollgate up` ingests and compacts them.
# Reports the time to ingest, peak RSS of the process while it ingests and compacts, and the
# query API's /v1/usage and /v1/latency over the day (median of 7 HTTP round trips), beside
# DuckDB running the same aggregations over the same Parquet files (the baseline).
# Usage: EVENTS=10000000 scripts/bench-embedded.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS="${EVENTS:-10000000}"
. scripts/lib/services.sh
seeded_store_setup
DAY=$(( ($(date +%s) / 86400 - 1) * 86400 ))
s=$(date +%s%3N)
"$CARGO_TARGET_DIR/release/examples/seed_bus" "$WORK/data/bus" "$EVENTS" "$DAY"
echo "seeded $EVENTS events in $(( $(date +%s%3N) - s )) ms ($(du -sh "$WORK/data/bus" | cut -f1) of bus log)" >&2
API=$(port)
cat > "$WORK/tollgate.yaml" <<YAML
gateway: { listen: 127.0.0.1:$(port) }
query_api: { listen: 127.0.0.1:$API }
store: { kind: parquet, compact_min_files: 8 }
YAML
start=$(date +%s%3N)
RUST_LOG=warn "$BIN" up --config "$WORK/tollgate.yaml" --data-dir "$WORK/data" 2>"$WORK/up.log" &
PID=$!
total() { curl -sf "http://127.0.0.1:$API/v1/usage?from=0&group_by=consumer" 2>/dev/null \
  | python3 -c 'import json,sys; print(sum(r["requests"] for r in json.load(sys.stdin)["rows"]))' 2>/dev/null || echo 0; }
until [ "$(total)" -ge "$EVENTS" ]; do
  kill -0 $PID || { tail "$WORK/up.log"; exit 1; }
  sleep 1
done
ingested=$(( $(date +%s%3N) - start ))
# Let two compaction rounds run (they come every minute), then read the peak.
sleep 130
hwm=$(awk '/VmHWM/ {print $2}' /proc/$PID/status)
rss=$(awk '/VmRSS/ {print $2}' /proc/$PID/status)
FROM=$((DAY * 1000)); TO=$(((DAY + 86400) * 1000))
U=$(median_ms curl -sf "http://127.0.0.1:$API/v1/usage?from=$FROM&to=$TO&group_by=consumer,route")
L=$(median_ms curl -sf "http://127.0.0.1:$API/v1/latency?from=$FROM&to=$TO&step=1m")
LH=$(median_ms curl -sf "http://127.0.0.1:$API/v1/latency?from=$FROM&to=$TO&step=1h")
read -r UB LB LHB < <(python3 - "$WORK/data/store" "$DAY" <<'PY'
import duckdb, glob, sys, time
files = glob.glob(sys.argv[1] + "/day=*/part-*.parquet")
con = duckdb.connect()
con.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet({files!r})")
def med(sql):
    ts = []
    for _ in range(7):
        s = time.monotonic(); con.execute(sql).fetchall(); ts.append((time.monotonic() - s) * 1000)
    return sorted(ts)[3]
u = med("SELECT consumer, route, count(*), sum(billable::INT), sum(req_bytes), sum(resp_bytes) FROM events GROUP BY consumer, route")
l = med("SELECT route, date_trunc('minute', ts) AS m, quantile_cont(latency_us, [0.5, 0.9, 0.99]) FROM events WHERE upstream_latency_us IS NOT NULL GROUP BY route, m")
lh = med("SELECT route, date_trunc('hour', ts) AS h, quantile_cont(latency_us, [0.5, 0.9, 0.99]) FROM events WHERE upstream_latency_us IS NOT NULL GROUP BY route, h")
print(f"{u:.1f} {l:.1f} {lh:.1f}")
PY
)
files=$(find "$WORK/data/store" -name '*.parquet' | wc -l)
echo
echo "## The embedded store with $EVENTS events of one day (\`EVENTS=$EVENTS scripts/bench-embedded.sh\`)"
echo
echo "- ingest (collector reading the bus log into Parquet, all counted in /v1/usage): $ingested ms = $(( EVENTS * 1000 / ingested )) events/s"
echo "- peak RSS of \`tollgate up\` while ingesting and two compaction rounds: $((hwm / 1024)) MiB (now $((rss / 1024)) MiB); $files Parquet files"
echo
echo "| query over the day (median of 7) | tollgate query API (rollups, HTTP) | DuckDB in-process over the raw files (baseline) | ratio |"
echo "|---|---|---|---|"
echo "| usage by consumer, route | $U ms | $UB ms | $(python3 -c "print(round($U/$UB, 2))") |"
echo "| latency p50/p90/p99 per route per minute | $L ms | $LB ms | $(python3 -c "print(round($L/$LB, 2))") |"
echo "| latency p50/p90/p99 per route per hour | $LH ms | $LHB ms | $(python3 -c "print(round($LH/$LHB, 2))") |"
