#!/usr/bin/env bash
# The latency `tollgate up` adds at a fixed request rate, binaries side by side: for each round
# and each binary given, a fresh `tollgate up` (API key, rate limit, quota, one event per
# request) in front of an nginx upstream (one worker, BODY-byte answers), 3 s of wrk to warm
# it, then examples/open_loop.rs at RATE requests/s for DURATION seconds over CONNS
# connections, latency measured from each request's scheduled time (no coordinated omission).
# A fresh process per run keeps one binary's background work (flushes, compaction of what
# earlier runs stored) out of another's measurement, which `bench-gateway.sh` (one long-lived
# process per binary) does not.
# Usage: ROUNDS=3 RATE=18000 DURATION=8 scripts/bench-open-loop.sh BINARY...
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
ROUNDS="${ROUNDS:-3}"; RATE="${RATE:-18000}"; DURATION="${DURATION:-8}"; CONNS="${CONNS:-64}"; BODY="${BODY:-1024}"
[ $# -gt 0 ] || { echo "usage: $0 BINARY..." >&2; exit 2; }
. scripts/lib/services.sh
open_loop_tools
WORK="$(mktemp -d)"
cleanup() { kill $(jobs -p) 2>/dev/null || true; nginx -p "$WORK/up" -c "$WORK/up/nginx.conf" -s stop 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
UP=$(port)
mkdir -p "$WORK/up/logs"
cat > "$WORK/up/nginx.conf" <<NGINX
worker_processes 1; pid $WORK/up/nginx.pid; error_log $WORK/up/logs/error.log;
events {} http { access_log off; server { listen 127.0.0.1:$UP; location / { return 200 '$(printf 'x%.0s' $(seq "$BODY"))'; } } }
NGINX
nginx -p "$WORK/up" -c "$WORK/up/nginx.conf"
echo "open loop at $RATE requests/s for $DURATION s over $CONNS connections, a fresh \`tollgate up\` per run"
echo
echo "| binary | round | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | non-2xx + errors |"
echo "|---|---|---|---|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
  for bin in "$@"; do
    gw=$(port); api=$(port)
    bench_config "$WORK/tg.yaml" "$gw" "$api"
    RUST_LOG=warn "$bin" up --config "$WORK/tg.yaml" --data-dir "$WORK/data-$round" 2>"$WORK/tg.log" &
    pid=$!
    for _ in $(seq 200); do curl -sf -H 'x-api-key: bench-key' "http://127.0.0.1:$gw/v1/items/1" >/dev/null && break; sleep 0.05; done
    wrk -t1 -c"$CONNS" -d3s -H 'x-api-key: bench-key' "http://127.0.0.1:$gw/v1/items/1" >/dev/null
    # sent received non-2xx errors achieved p50 p90 p99 p99.9 max
    read -r _ _ non2xx errors _ p50 p90 p99 p999 max < <("$OPEN_LOOP" "http://127.0.0.1:$gw/v1/items/1" "$RATE" "$DURATION" "$CONNS" "x-api-key: bench-key")
    echo "| $bin | $round | $p50 | $p90 | $p99 | $p999 | $max | $((non2xx + errors)) |"
    kill "$pid"; wait "$pid" 2>/dev/null || true
    rm -rf "$WORK/data-$round"
  done
done
