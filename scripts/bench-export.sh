#!/usr/bin/env bash
# Billing exports of a month of EVENTS events (default 10 million): the events of last month are
# written to the bus log as gateways would (examples/seed_bus.rs: 1,000 consumers, 4 routes,
# graduated prices), `tollgate up` ingests them, and once the month is complete each format is
# downloaded: the first download publishes the export (computes, prices, renders every format,
# stores), later ones are served from the store. Reports each time, the process's peak RSS during
# the exports (its high-water mark reset first), and /v1/revenue over the month, beside DuckDB
# computing the same lines and amounts from the same Parquet files; and checks that both agree.
# Usage: EVENTS=10000000 scripts/bench-export.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS="${EVENTS:-10000000}"
. scripts/lib/services.sh
seeded_store_setup
read -r START DAYS PERIOD < <(python3 -c '
import datetime as d
t = d.datetime.now(d.timezone.utc).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
last = (t - d.timedelta(days=1)).replace(day=1)
print(int(last.timestamp()), (t - last).days, last.strftime("%Y-%m"))')
s=$(date +%s%3N)
"$CARGO_TARGET_DIR/release/examples/seed_bus" "$WORK/data/bus" "$EVENTS" "$START" "$DAYS"
echo "seeded $EVENTS events over $PERIOD in $(( $(date +%s%3N) - s )) ms" >&2
API=$(port)
cat > "$WORK/tollgate.yaml" <<YAML
gateway: { listen: 127.0.0.1:$(port) }
query_api: { listen: 127.0.0.1:$API }
store: { kind: parquet }
plans:
  p:
    pricing:
      currency: USD
      charges:
        default: { tiers: [ { up_to: 1000, unit_price: "0.002" }, { up_to: null, unit_price: "0.00125" } ] }
YAML
RUST_LOG=warn "$BIN" up --config "$WORK/tollgate.yaml" --data-dir "$WORK/data" 2>"$WORK/up.log" &
PID=$!
total() { curl -sf "http://127.0.0.1:$API/v1/usage?from=0&group_by=consumer" 2>/dev/null \
  | python3 -c 'import json,sys; print(sum(r["requests"] for r in json.load(sys.stdin)["rows"]))' 2>/dev/null || echo 0; }
until [ "$(total)" -ge "$EVENTS" ]; do kill -0 $PID || { tail "$WORK/up.log"; exit 1; }; sleep 1; done
# Complete once the collector has flushed and recorded its progress: ask for the watermark
# without publishing (the list endpoint), so the first export download is the one timed.
until curl -sf "http://127.0.0.1:$API/v1/billing/exports" | python3 -c '
import json, sys, datetime as d
t = json.load(sys.stdin)["complete_through"]
end = d.datetime.strptime(sys.argv[1] + "-01", "%Y-%m-%d").replace(tzinfo=d.timezone.utc)
end = (end + d.timedelta(days=32)).replace(day=1)
sys.exit(0 if t and d.datetime.fromisoformat(t.replace("Z", "+00:00")) >= end else 1)' "$PERIOD"; do
  kill -0 $PID || { tail "$WORK/up.log"; exit 1; }; sleep 1
done
sleep 5 # let compaction settle before the memory window
rss_before=$(awk '/VmRSS/ {print $2}' /proc/$PID/status)
echo 5 > /proc/$PID/clear_refs # resets VmHWM to the current RSS
url() { echo "http://127.0.0.1:$API/v1/billing/export?period=$PERIOD&format=$1"; }
ms() { local s; s=$(date +%s%N); curl -sf "$1" -o "$2"; echo $(( ($(date +%s%N) - s) / 1000000 )); }
PUBLISH=$(ms "$(url csv)" "$WORK/export.csv")
declare -A SERVE
for f in csv jsonl parquet arrow; do SERVE[$f]=$(median_ms curl -sf "$(url $f)" -o "$WORK/export.$f"); done
hwm=$(awk '/VmHWM/ {print $2}' /proc/$PID/status)
FROM=$((START * 1000)); TO=$(( (START + DAYS * 86400) * 1000 ))
REV=$(median_ms curl -sf "http://127.0.0.1:$API/v1/revenue?from=$FROM&to=$TO&group_by=consumer,route")
read -r DUCK_EXPORT DUCK_REV DUCK_TOTAL DUCK_ROWS < <(python3 - "$WORK/data/store" "$WORK" <<'PY'
import duckdb, glob, sys, time
files = glob.glob(sys.argv[1] + "/day=*/part-*.parquet")
con = duckdb.connect()
con.execute(f"CREATE VIEW events AS SELECT * FROM read_parquet({files!r})")
lines = """SELECT consumer, plan, route, sum(billable::INT)::BIGINT AS quantity,
  (least(sum(billable::INT), 1000) * 0.002::DECIMAL(18,6)
   + greatest(sum(billable::INT) - 1000, 0) * 0.00125::DECIMAL(18,6)) AS amount
  FROM events WHERE route IS NOT NULL GROUP BY consumer, plan, route ORDER BY consumer, plan, route"""
def med(f):
    ts = []
    for _ in range(7):
        s = time.monotonic(); f(); ts.append((time.monotonic() - s) * 1000)
    return sorted(ts)[3]
e = med(lambda: con.execute(f"COPY ({lines}) TO '{sys.argv[2]}/duck.csv' (HEADER)"))
r = med(lambda: con.execute(lines).fetchall())
total, rows = con.execute(f"SELECT sum(amount), count(*) FROM ({lines})").fetchone()
print(f"{e:.1f} {r:.1f} {total.normalize() if hasattr(total, 'normalize') else total} {rows}")
PY
)
read -r OUR_TOTAL OUR_ROWS < <(python3 - "$WORK/export.csv" <<'PY'
import csv, decimal, sys
rows = list(csv.DictReader(open(sys.argv[1])))
print(sum(decimal.Decimal(r["amount"]) for r in rows if r["kind"] == "usage").normalize(), len(rows))
PY
)
[ "$(python3 -c "import decimal,sys; print(decimal.Decimal('$OUR_TOTAL') == decimal.Decimal('$DUCK_TOTAL'))")" = True ] \
  || { echo "the export's total $OUR_TOTAL differs from DuckDB's $DUCK_TOTAL" >&2; exit 1; }
[ "$OUR_ROWS" = "$DUCK_ROWS" ] || { echo "the export has $OUR_ROWS lines, DuckDB $DUCK_ROWS" >&2; exit 1; }
echo
echo "## Billing exports of a month of $EVENTS events (\`EVENTS=$EVENTS scripts/bench-export.sh\`, $PERIOD)"
echo
echo "$OUR_ROWS lines, total $OUR_TOTAL USD, the same lines and total as DuckDB's. RSS of \`tollgate up\` before the exports $((rss_before / 1024)) MiB, peak during them $((hwm / 1024)) MiB."
echo
echo "| what | tollgate | DuckDB over the same Parquet files | ratio |"
echo "|---|---|---|---|"
echo "| first download: compute, price, render every format, publish (CSV) | $PUBLISH ms | $DUCK_EXPORT ms (lines priced, written as CSV) | $(python3 -c "print(round($PUBLISH/$DUCK_EXPORT, 2))") |"
for f in csv jsonl parquet arrow; do
  echo "| published export, $f (median of 7) | ${SERVE[$f]} ms | | |"
done
echo "| /v1/revenue over the month by consumer, route (median of 7) | $REV ms | $DUCK_REV ms (lines priced) | $(python3 -c "print(round($REV/$DUCK_REV, 2))") |"
