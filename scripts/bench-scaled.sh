#!/usr/bin/env bash
# Benchmarks of the scaled deployment (Kafka bus, ClickHouse store), each against a baseline
# measured in the same run:
#   1. ingest: N events already on the topic, drained into ClickHouse by one, then two
#      collectors; baseline: clickhouse-client inserting the same rows from a file;
#   2. freshness: a request's response sent -> counted in /v1/usage (gateway, Kafka, collector,
#      ClickHouse, query API as separate processes), p50 and p99 over SAMPLES requests;
#   3. queries over a day of DAY_EVENTS events: /v1/usage and /v1/latency from the rollups
#      (HTTP round trip), against the same aggregation run by ClickHouse over the raw table.
# Usage: EVENTS=1000000 DAY_EVENTS=10000000 SAMPLES=50 scripts/bench-scaled.sh
#   STAGES="ingest" or STAGES="fresh" runs only part 1, or parts 2 and 3 (default: both);
#   BATCH sets the collectors' batch_max_events (default: the collector's own default);
#   PERF_DIR=DIR records a system-wide `perf record -g` of each ingest run into DIR
#   (PERF_ARGS replaces `-a -g`, e.g. "-a -F 999 --call-graph dwarf").
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS="${EVENTS:-1000000}"
DAY_EVENTS="${DAY_EVENTS:-10000000}"
SAMPLES="${SAMPLES:-50}"
STAGES="${STAGES:-ingest fresh}"
stage() { [[ " $STAGES " == *" $1 "* ]]; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
./scripts/install-test-services.sh
python3 -c 'import confluent_kafka' 2>/dev/null || python3 -m pip install -q confluent-kafka
cargo build --release --locked --features scaled >&2
BIN="${BIN:-$CARGO_TARGET_DIR/release/tollgate}"
WORK="$(mktemp -d)"
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
. scripts/lib/services.sh

# --- services -----------------------------------------------------------------------------------
start_clickhouse
start_tansu

config() { # $1 database, $2 topic, $3 api port, $4 gateway port
  cat > "$WORK/$1.yaml" <<YAML
gateway:
  listen: 127.0.0.1:$4
  admin_listen: 127.0.0.1:$(port)
  upstreams: { app: { targets: ["http://127.0.0.1:$UPSTREAM"] } }
  routes: [ { id: ping, methods: [GET], path: /ping, upstream: app } ]
  auth: { api_key: { header: x-api-key } }
consumers: [ { id: bench, plan: p, api_keys: ["$("$BIN" hash-key bench-key)"] } ]
plans: { p: {} }
bus: { kind: kafka, brokers: "127.0.0.1:$KAFKA", topic: $2, partitions: 12,
       properties: { "session.timeout.ms": "6000", "heartbeat.interval.ms": "500" } }
store: { kind: clickhouse, url: "http://127.0.0.1:$CH_HTTP", database: $1 }
collector: { linger_ms: 20${BATCH:+, batch_max_events: $BATCH} }
query_api: { listen: 127.0.0.1:$3 }
YAML
}

# A trivial upstream for the freshness run.
UPSTREAM=$(port)
python3 - "$UPSTREAM" <<'PY' &
import http.server, socketserver, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"; disable_nagle_algorithm = True
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", "2"); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer): daemon_threads = True
S(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
PY

# --- 1. ingest ----------------------------------------------------------------------------------
if stage ingest; then
echo "generating and producing $EVENTS events" >&2
python3 - "$KAFKA" "$EVENTS" "$WORK/rows.json" <<'PY'
import json, math, os, random, sys, time
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
broker, n, rows_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{broker}"})
admin.create_topics([NewTopic("ingest", 12, 1)])["ingest"].result()
p = Producer({"bootstrap.servers": f"127.0.0.1:{broker}", "enable.idempotence": True, "compression.type": "lz4",
              "linger.ms": 20, "queue.buffering.max.messages": 2000000})
ln_gamma = math.log((1 + 0.005) / (1 - 0.005))
routes = ["orders-list", "orders-get", "search", "checkout"]
t0 = int(time.time() * 1_000_000) - 3_600_000_000
with open(rows_path, "w") as rows:
    for i in range(n):
        ms = (t0 // 1000) + i // 1000
        rnd = random.getrandbits(74)
        h = f"{ms:012x}{(0x7000 | (rnd & 0xfff)):04x}{(0x8000 | ((rnd >> 12) & 0x3fff)):04x}{(rnd >> 26) & ((1 << 48) - 1):012x}"
        uid = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
        ts = t0 + i * 3
        lat = 1000 + (i * 7919) % 200000
        c = f"c{i % 1000}"
        status = 503 if i % 50 == 0 else 200
        ev = {"v": 1, "id": uid, "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts // 1_000_000)) + f".{ts % 1_000_000:06d}Z",
              "gateway": "bench", "route": routes[i % 4], "method": "GET", "path": "/x", "status": status,
              "latency_us": lat, "upstream_latency_us": lat - 100, "req_bytes": 0, "resp_bytes": 100,
              "consumer": c, "plan": "p", "outcome": "ok" if status < 500 else "upstream_error",
              "billable": status < 500, "trace_id": None}
        p.produce("ingest", key=c.encode(), value=json.dumps(ev, separators=(",", ":")).encode())
        if i % 10000 == 0:
            p.poll(0)
        row = dict(ev); row.pop("ts"); row.update({"bus_partition": i % 12, "bus_offset": i, "ts_us": ts,
                   "latency_bucket": math.ceil(math.log(max(lat, 1)) / ln_gamma), "billable": int(status < 500)})
        rows.write(json.dumps(row) + "\n")
p.flush()
PY

ingest_run() { # $1 collectors, $2 database
  config "$2" ingest "$(port)" "$(port)"
  local start first pids=()
  start=$(now_ms)
  for i in $(seq 1 "$1"); do
    TOLLGATE_COLLECTOR__ADMIN_LISTEN="127.0.0.1:$(port)" TOLLGATE_COLLECTOR__GROUP="bench-$2" RUST_LOG=warn \
      "$BIN" collector --config "$WORK/$2.yaml" --data-dir "$WORK/c-$2-$i" 2>>"$WORK/collector.log" & pids+=($!)
  done
  # One poller on one keep-alive connection (a curl per poll cost 3-5 % of the machine).
  coproc COUNT { count_rows "$2" "$EVENTS"; }
  read -r first <&"${COUNT[0]}"
  local perf=""
  if [ -n "${PERF_DIR:-}" ]; then
    perf record ${PERF_ARGS:--a -g} -o "$PERF_DIR/ingest-$1.data" 2>/dev/null & perf=$!
  fi
  local end; read -r end <&"${COUNT[0]}"
  [ -n "$end" ] || { echo "timed out waiting for $EVENTS rows in $2.events" >&2; exit 1; }
  if [ -n "$perf" ]; then kill -INT "$perf"; wait "$perf" 2>/dev/null || true; fi
  local cpu; cpu=$(cpu_ms "${pids[@]}")
  kill "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
  local total; total=$(chq "SELECT count(), uniqExact(id) FROM $2.events" | tr '\t' ' ')
  echo "| $1 collector(s) | $(( EVENTS * 1000 / (end - first) )) events/s | $((end - first)) ms from first row to all ($((first - start)) ms to join the group) | $(( cpu * 1000000 / EVENTS )) ns | count, distinct ids: $total |"
}
# count_rows DB N: prints the time (ms) the first row of DB.events appeared, then the time it
# held N rows; polls every 20 ms on one connection, gives up after 600 s.
count_rows() { python3 - "$CH_HTTP" "$1" "$2" <<'PY'
import http.client, sys, time
port, db, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
conn = http.client.HTTPConnection("127.0.0.1", int(port))
def count():
    conn.request("POST", "/", body=f"SELECT count() FROM {db}.events".encode())
    r = conn.getresponse(); body = r.read()
    return int(body) if r.status == 200 else 0
deadline = time.time() + 600
for goal in (1, n):
    while count() < goal:
        if time.time() > deadline: sys.exit(1)
        time.sleep(0.02)
    print(int(time.time() * 1000), flush=True)
PY
}
# cpu_ms PID...: user + system CPU time the processes used so far, in ms.
cpu_ms() { local t=0 f; for p in "$@"; do f=($(cut -d' ' -f14,15 "/proc/$p/stat")); t=$((t + f[0] + f[1])); done
  echo $((t * 1000 / $(getconf CLK_TCK))); }

# The baseline table is created by the store's own migrations (a query API start), then filled by
# clickhouse-client from the same rows.
API=$(port)
config base none "$API" "$(port)"
RUST_LOG=warn "$BIN" query-api --config "$WORK/base.yaml" --data-dir "$WORK/qb" 2>/dev/null & QB=$!
wait_for "curl -sf http://127.0.0.1:$API/healthz" 60; kill $QB; wait $QB 2>/dev/null || true
s=$(now_ms)
clickhouse-client --port "$CH_TCP" --query "INSERT INTO base.events FORMAT JSONEachRow" < "$WORK/rows.json" & CLIENT=$!
# The client's CPU time, read just before it exits (it parses the JSON rows, as a collector does).
client_cpu=0; while kill -0 $CLIENT 2>/dev/null; do client_cpu=$(cpu_ms $CLIENT 2>/dev/null || echo "$client_cpu"); sleep 0.05; done
wait $CLIENT
e=$(now_ms)
echo
echo "## Ingest: $EVENTS events from the Kafka topic (12 partitions) into ClickHouse"
echo
echo "| run | rate | time | client CPU per event | check |"
echo "|---|---|---|---|---|"
echo "| baseline: clickhouse-client INSERT of the same rows (JSONEachRow) | $(( EVENTS * 1000 / (e - s) )) events/s | $((e - s)) ms | ≥ $(( client_cpu * 1000000 / EVENTS )) ns | $(chq 'SELECT count() FROM base.events') rows |"
ingest_run 1 one
ingest_run 2 two

fi

# --- 2. freshness -------------------------------------------------------------------------------
stage fresh || exit 0
API=$(port); GW=$(port)
config fresh fresh "$API" "$GW"
RUST_LOG=warn "$BIN" query-api --config "$WORK/fresh.yaml" --data-dir "$WORK/fq" 2>>"$WORK/parts.log" &
RUST_LOG=warn "$BIN" collector --config "$WORK/fresh.yaml" --data-dir "$WORK/fc" 2>>"$WORK/parts.log" &
RUST_LOG=warn "$BIN" gateway --config "$WORK/fresh.yaml" --data-dir "$WORK/fg" 2>>"$WORK/parts.log" &
wait_for "curl -sf http://127.0.0.1:$API/readyz" 60
wait_for "curl -sf -H 'x-api-key: bench-key' http://127.0.0.1:$GW/ping" 60
# Wait until the collector has joined the group and stored the warm-up request.
wait_for "curl -sf 'http://127.0.0.1:$API/v1/usage?from=0&group_by=consumer' | grep -q '\"requests\"'" 120
python3 - "$API" "$GW" "$SAMPLES" <<'PY'
import json, sys, time, urllib.request
api, gw, samples = sys.argv[1], sys.argv[2], int(sys.argv[3])
def count():
    with urllib.request.urlopen(f"http://127.0.0.1:{api}/v1/usage?from=0&group_by=consumer") as r:
        return sum(row["requests"] for row in json.load(r)["rows"])
delays = []
for _ in range(samples):
    before = count()
    req = urllib.request.Request(f"http://127.0.0.1:{gw}/ping", headers={"x-api-key": "bench-key"})
    urllib.request.urlopen(req).read()
    sent = time.monotonic()
    while count() <= before:
        time.sleep(0.002)
    delays.append((time.monotonic() - sent) * 1000)
delays.sort()
q = lambda p: delays[min(len(delays) - 1, max(0, int(round(p * len(delays))) - 1))]
print(f"\n## Freshness: response sent -> counted in /v1/usage ({samples} requests, one at a time)\n")
print(f"p50 {q(0.5):.0f} ms, p99 {q(0.99):.0f} ms, max {delays[-1]:.0f} ms (includes this poller's 2 ms period)")
PY

# --- 3. queries over a day ----------------------------------------------------------------------
DAY=$(( ($(date +%s) / 86400 - 1) * 86400 ))
chq "INSERT INTO fresh.events SELECT number % 12, 1000000000 + number, 1, toString(number), ($DAY * 1000000) + intDiv(number * 86400000000, $DAY_EVENTS), 'bench',
  ['orders-list','orders-get','search','checkout'][number % 4 + 1], 'GET', '/x', if(number % 50 = 0, 503, 200),
  1000 + (number * 7919) % 200000, 900 + (number * 7919) % 200000, 0, 100, concat('c', toString(number % 1000)), 'p',
  if(number % 50 = 0, 'upstream_error', 'ok'), toUInt8(number % 50 != 0), NULL,
  toInt16(ceil(log(1000 + (number * 7919) % 200000) / log(1.005 / 0.995))) FROM numbers($DAY_EVENTS)"
FROM=$((DAY * 1000)); TO=$(((DAY + 86400) * 1000))
# The collector's upkeep compacts each route's minutes and hours into one sketch each; wait until
# every minute of the day has one (the query is exact before too, reading buckets instead).
T0=$(date +%s.%N)
DAY_US=$((DAY * 1000000)); NEXT_US=$(((DAY + 86400) * 1000000))
compacted() {
  [ "$(chq "SELECT count() FROM (SELECT DISTINCT route_key, t_us FROM fresh.route_sketch WHERE grain_us = 60000000 AND t_us >= $DAY_US AND t_us < $NEXT_US)")" = \
    "$(chq "SELECT count() FROM (SELECT DISTINCT route_key, minute_us FROM fresh.route_count_1m WHERE minute_us >= $DAY_US AND minute_us < $NEXT_US)")" ]
}
wait_for compacted 300
COMPACTED=$(python3 -c "import time; print(round(time.time() - $T0, 1))")
U=$(median_ms curl -sf "http://127.0.0.1:$API/v1/usage?from=$FROM&to=$TO&group_by=consumer,route")
L=$(median_ms curl -sf "http://127.0.0.1:$API/v1/latency?from=$FROM&to=$TO&step=1m")
LS=$(median_ms curl -sf "http://127.0.0.1:$API/v1/latency?from=$FROM&to=$TO&step=1m&quantiles=0.5,0.95,0.9999")
LH=$(median_ms curl -sf "http://127.0.0.1:$API/v1/latency?from=$FROM&to=$TO&step=1h")
UB=$(median_ms curl -sf "http://127.0.0.1:$CH_HTTP/" --data-binary "SELECT consumer, route, count(), sum(billable), sum(req_bytes), sum(resp_bytes) FROM fresh.events WHERE ts_us >= $((DAY * 1000000)) AND ts_us < $(((DAY + 86400) * 1000000)) GROUP BY consumer, route")
LB=$(median_ms curl -sf "http://127.0.0.1:$CH_HTTP/" --data-binary "SELECT route, intDiv(ts_us, 60000000) AS m, quantiles(0.5, 0.9, 0.99)(latency_us) FROM fresh.events WHERE ts_us >= $((DAY * 1000000)) AND ts_us < $(((DAY + 86400) * 1000000)) AND isNotNull(upstream_latency_us) GROUP BY route, m")
LSB=$(median_ms curl -sf "http://127.0.0.1:$CH_HTTP/" --data-binary "SELECT route, intDiv(ts_us, 60000000) AS m, quantiles(0.5, 0.95, 0.9999)(latency_us) FROM fresh.events WHERE ts_us >= $((DAY * 1000000)) AND ts_us < $(((DAY + 86400) * 1000000)) AND isNotNull(upstream_latency_us) GROUP BY route, m")
LHB=$(median_ms curl -sf "http://127.0.0.1:$CH_HTTP/" --data-binary "SELECT route, intDiv(ts_us, 3600000000) AS h, quantiles(0.5, 0.9, 0.99)(latency_us) FROM fresh.events WHERE ts_us >= $((DAY * 1000000)) AND ts_us < $(((DAY + 86400) * 1000000)) AND isNotNull(upstream_latency_us) GROUP BY route, h")
echo
echo "## Queries over one day of $DAY_EVENTS events (median of 7, HTTP round trip)"
echo
echo "The collector's upkeep had compacted every route-minute of the day $COMPACTED s after the INSERT ended."
echo
echo "| query | tollgate query API (rollups) | ClickHouse over the raw table (baseline) | ratio |"
echo "|---|---|---|---|"
echo "| usage by consumer, route | $U ms | $UB ms | $(python3 -c "print(round($U/$UB, 2))") |"
echo "| latency p50/p90/p99 per route per minute | $L ms | $LB ms | $(python3 -c "print(round($L/$LB, 2))") |"
echo "| latency p50/p95/p99.99 per route per minute (levels not precomputed: read from the sketches) | $LS ms | $LSB ms | $(python3 -c "print(round($LS/$LSB, 2))") |"
echo "| latency p50/p90/p99 per route per hour | $LH ms | $LHB ms | $(python3 -c "print(round($LH/$LHB, 2))") |"
