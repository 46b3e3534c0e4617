#!/usr/bin/env bash
# Load-generator benchmarks of the release build, each against a baseline measured in the same
# run. Prints a Markdown table for BENCHMARKS.md.
#
#  1. Gateway throughput and added latency: wrk against an nginx upstream directly, through nginx
#     as a reverse proxy (the baseline), and through the Tollgate gateway (API key, rate limit
#     and quota checked, event emitted per request), then the same with an RS256 bearer token
#     instead of the API key (built with `--features jwt`).
#  2. Freshness: time from wrk's last response until /v1/usage counts every request.
#  3. Collector throughput: the store is wiped and the collector re-reads the whole bus log;
#     events/s until every event is queryable, and until every event is in Parquet files.
#  4. Queries over those events once in Parquet: the query API's /v1/latency and /v1/usage
#     (HTTP, DataFusion, JSON) against DuckDB running the same aggregations in-process on the
#     same Parquet files (the baseline).
#  5. The gateway against nginx as a plain reverse proxy with requests/s, p50/p99, and system
#     calls and context switches per request (`perf stat`), for `tollgate up` and for the
#     gateway as its own process (`scripts/bench-gateway.sh`, ROUNDS=1, on a build with the
#     `scaled` feature), and against nginx with its access log on as a second baseline
#     (`nginx-log`). GATEWAY=0 leaves it out.
#  6. The same load with CONSUMERS consumers configured (default 100,000, one key each)
#     against one consumer: requests/s, RSS after the load, idle CPU, and a 1,000-request
#     quota under the burst (`scripts/bench-consumers.sh`, CONSUMER_ROUNDS rounds, default 3,
#     with their median: one 10 s round spreads by 15 % on two shared cores). CONSUMERS=0
#     leaves it out.
#
# Needs: wrk, nginx, curl, perf, python3 (installed with apt-get if missing), duckdb (pip);
# step 5 also a Kafka-protocol broker (`scripts/install-test-services.sh`).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
DURATION="${DURATION:-15s}"
CONNS="${CONNS:-32}"

python3 -c 'import duckdb' 2>/dev/null || pip install -q duckdb >&2
cargo build --release --locked --features jwt >&2
WORK="$(mktemp -d)"
# A copy: step 5 builds other features into the same path.
cp "$CARGO_TARGET_DIR/release/tollgate" "$WORK/tollgate"
BIN="$WORK/tollgate"
cleanup() { kill "${TG_PID:-}" 2>/dev/null || true; nginx -p "$WORK" -c "$WORK/nginx.conf" -s stop 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

. scripts/lib/services.sh
load_tools perf=linux-perf
UP=$(port); PROXY=$(port); GW=$(port); API=$(port)
# The baseline: nginx as a reverse proxy with a keep-alive pool in front of the same upstream.
start_nginx_upstream "  upstream app { server 127.0.0.1:$UP; keepalive 256; }
  server { listen 127.0.0.1:$PROXY;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"

# API keys and JWT both on (the test fixture key signs the bench's bearer token).
JWT_PUB=gateway/tests/fixtures/jwt/rsa1.pub bench_config "$WORK/tollgate.yaml" "$GW" "$API"
# One bus segment for the whole run: the embedded log deletes a segment once every group has
# consumed it, and step 3 re-reads the log from its start.
echo "bus: { kind: embedded, segment_bytes: 17179869184 }" >> "$WORK/tollgate.yaml"
TOKEN=$(python3 scripts/lib/jwt_token.py gateway/tests/fixtures/jwt/rsa1.key bench bench bench bench)
RUST_LOG=warn "$BIN" up --config "$WORK/tollgate.yaml" --data-dir "$WORK/data" 2>"$WORK/tollgate.log" &
TG_PID=$!
for _ in $(seq 200); do curl -sf "http://127.0.0.1:$API/readyz" >/dev/null && break; sleep 0.05; done

run_wrk() { # name url [header]
  local out
  if [ -n "${3:-}" ]; then out=$(wrk -t2 -c"$CONNS" -d"$DURATION" --latency -H "$3" "$2"); else out=$(wrk -t2 -c"$CONNS" -d"$DURATION" --latency "$2"); fi
  echo "$out" > "$WORK/wrk-$1.txt"
  echo "$1 $(python3 scripts/lib/wrk_summary.py "$WORK/wrk-$1.txt")"
}

direct=$(run_wrk direct "http://127.0.0.1:$UP/v1/items/1")
nginx_proxy=$(run_wrk nginx "http://127.0.0.1:$PROXY/v1/items/1")
start_ms=$(python3 -c 'import time; print(int(time.time()*1000))')
tollgate=$(run_wrk tollgate "http://127.0.0.1:$GW/v1/items/1" "x-api-key: bench-key")
sent=$(echo "$tollgate" | awk '{print $5}')

# Freshness: last response -> every request counted.
fresh=$(python3 - "$API" "$sent" <<'PY'
import json, sys, time, urllib.request
api, sent = sys.argv[1], int(sys.argv[2])
t0 = time.time()
while time.time() - t0 < 60:
    rows = json.load(urllib.request.urlopen(f"http://127.0.0.1:{api}/v1/usage?from=0&group_by=consumer"))["rows"]
    n = sum(r["requests"] for r in rows if r["consumer"] == "bench")
    if n >= sent:
        print(f"{(time.time()-t0)*1000:.0f} {n}")
        break
    time.sleep(0.01)
else:
    print(f"timeout {n}")
PY
)

# The same load authenticated by a bearer token (RS256) instead of an API key.
tollgate_jwt=$(run_wrk tollgate-jwt "http://127.0.0.1:$GW/v1/items/1" "Authorization: Bearer $TOKEN")
sent_key=$sent
sent=$((sent + $(echo "$tollgate_jwt" | awk '{print $5}')))

# Events the gateway dropped (its queue full): the re-read below can only find the others.
dropped=$(curl -sf "http://127.0.0.1:$API/metrics" | awk '/^tollgate_gateway_events_dropped_total/ {s += $2} END {print s + 0}')

# Peak memory of the whole one-process deployment after the load.
rss_mb=$(awk '/VmHWM/ {printf "%.0f", $2/1024}' "/proc/$TG_PID/status")

# Collector throughput: wipe the store and the collector's offsets, re-read the whole log.
kill "$TG_PID"; wait "$TG_PID" 2>/dev/null || true
rm -rf "$WORK/data/store" "$WORK/data/bus/offsets" "$WORK/data/dead-letter"
t0=$(python3 -c 'import time; print(time.time())')
RUST_LOG=warn "$BIN" up --config "$WORK/tollgate.yaml" --data-dir "$WORK/data" 2>>"$WORK/tollgate.log" &
TG_PID=$!
collect=$(python3 - "$API" "$sent" "$t0" "$WORK/data/store/manifest.json" <<'PY'
import json, os, sys, time, urllib.request
api, sent, t0, manifest = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
queryable = None
while time.time() - t0 < 300:
    try:
        if queryable is None:
            rows = json.load(urllib.request.urlopen(f"http://127.0.0.1:{api}/v1/usage?from=0&group_by=consumer"))["rows"]
            if sum(r["requests"] for r in rows) >= sent:
                queryable = time.time() - t0
        if os.path.exists(manifest):
            files = json.load(open(manifest))["files"]
            if sum(f["rows"] for f in files) >= sent and queryable is not None:
                print(f"{queryable:.2f} {time.time()-t0:.2f}")
                break
    except Exception:
        pass
    time.sleep(0.02)
PY
)

if [ -z "$collect" ]; then
  echo "the collector did not re-read all $sent events within 300 s ($dropped dropped by the gateway); tollgate's log:" >&2
  tail -20 "$WORK/tollgate.log" >&2
  exit 1
fi

# Queries: median of 7 runs each, after one warm-up.
queries=$(python3 - "$API" "$WORK/data/store" <<'PY'
import json, statistics, sys, time, urllib.request, duckdb
api, store = sys.argv[1], sys.argv[2]
def timed(f):
    f()
    runs = []
    for _ in range(7):
        t = time.perf_counter(); f(); runs.append((time.perf_counter() - t) * 1000)
    return statistics.median(runs)
get = lambda path: (lambda: urllib.request.urlopen(f"http://127.0.0.1:{api}{path}").read())
hour_ago = int((time.time() - 3600) * 1000)
tg_lat = timed(get(f"/v1/latency?from={hour_ago}&step=60s&quantiles=0.5,0.9,0.99"))
tg_use = timed(get("/v1/usage?from=0&group_by=consumer,route,day"))
con = duckdb.connect()
files = f"read_parquet('{store}/day=*/part-*.parquet')"
dd_lat = timed(lambda: con.execute(f"SELECT route, time_bucket(INTERVAL 60 SECOND, ts) t, count(*), quantile_cont(latency_us, [0.5, 0.9, 0.99]) FROM {files} GROUP BY ALL").fetchall())
dd_use = timed(lambda: con.execute(f"SELECT consumer, route, CAST(ts AS DATE), count(*), count(*) FILTER (WHERE billable), sum(req_bytes), sum(resp_bytes) FROM {files} GROUP BY ALL").fetchall())
print(f"{tg_lat:.1f} {dd_lat:.1f} {tg_use:.1f} {dd_use:.1f} {duckdb.__version__}")
PY
)

python3 - "$direct" "$nginx_proxy" "$tollgate" "$fresh" "$collect" "$sent" "$CONNS" "$DURATION" "$rss_mb" "$queries" "$tollgate_jwt" "$sent_key" <<'PY'
import sys
d, n, t = (s.split() for s in sys.argv[1:4])
j = sys.argv[11].split()
fresh, collect, sent, conns, dur = sys.argv[4].split(), sys.argv[5].split(), int(sys.argv[6]), sys.argv[7], sys.argv[8]
rps = lambda r: float(r[1]); p50 = lambda r: float(r[2]); p99 = lambda r: float(r[3])
print(f"wrk -t2 -c{conns} -d{dur}, same machine, same run\n")
print("| target | requests/s | p50 ms | p99 ms | non-2xx |")
print("|---|---|---|---|---|")
for name, r in (("nginx upstream, direct", d), ("nginx reverse proxy -> upstream (baseline)", n), ("tollgate gateway -> upstream (API key)", t), ("tollgate gateway -> upstream (JWT, RS256)", j)):
    print(f"| {name} | {rps(r):.0f} | {p50(r):.3f} | {p99(r):.3f} | {r[5]} |")
print()
print(f"- tollgate / nginx-proxy throughput ratio: {rps(t)/rps(n):.2f} with API keys, {rps(j)/rps(n):.2f} with JWT")
print(f"- added p50 latency over the direct upstream: tollgate {p50(t)-p50(d):.3f} ms, nginx proxy {p50(n)-p50(d):.3f} ms")
print(f"- freshness (last response of the API-key run -> all its {sys.argv[12]} requests counted): {fresh[0]} ms")
print(f"- peak RSS of `tollgate up` (gateway, bus, collector, store, query API) after the load: {sys.argv[9]} MB")
q, f = float(collect[0]), float(collect[1])
print(f"- collector re-reading {sent} events from the bus log: all queryable after {q:.2f} s = {sent/q:.0f} events/s (includes process start);")
print(f"  all in Parquet files after {f:.2f} s (bounded below by the 2 s flush interval)")
tl, dl, tu, du, ver = sys.argv[10].split()
print()
print(f"| query over the {sent} events in Parquet (median of 7) | tollgate query API | DuckDB {ver} in-process (baseline) | ratio |")
print("|---|---|---|---|")
print(f"| latency p50/p90/p99 per route per minute | {tl} ms | {dl} ms | {float(tl)/float(dl):.1f} |")
print(f"| usage by consumer, route, day | {tu} ms | {du} ms | {float(tu)/float(du):.1f} |")
PY

# 5 and 6: the scripts that measure them, each against its own baseline from the same run,
# with this script's `tollgate up` stopped so that it takes nothing from theirs.
kill "$TG_PID" 2>/dev/null || true; wait "$TG_PID" 2>/dev/null || true
if [ "${GATEWAY:-1}" != 0 ]; then
  [ -x "$TANSU" ] || scripts/install-test-services.sh >&2
  cargo build --release --locked --features scaled >&2
  cp "$CARGO_TARGET_DIR/release/tollgate" "$WORK/tollgate-scaled"
  echo
  ROUNDS=1 scripts/bench-gateway.sh "$WORK/tollgate-scaled"
fi
CONSUMERS="${CONSUMERS:-100000}"
if [ "$CONSUMERS" != 0 ]; then
  echo
  CONSUMERS="$CONSUMERS" ROUNDS="${CONSUMER_ROUNDS:-3}" scripts/bench-consumers.sh "$BIN"
fi
