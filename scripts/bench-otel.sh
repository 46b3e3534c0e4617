#!/usr/bin/env bash
# What exporting request spans costs the request path: wrk (1 thread, CONNS connections,
# DURATION per run) against two `tollgate up` processes built with `--features otel`, alike
# but for `telemetry.otlp` (every span recorded, SAMPLE_RATIO=1.0 by default, posted to an
# nginx that answers 200), runs alternating for ROUNDS rounds, in front of the same nginx
# upstream. Prints requests/s, p50 and p99 of each run.
# Usage: ROUNDS=3 DURATION=8s scripts/bench-otel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
ROUNDS="${ROUNDS:-3}"; DURATION="${DURATION:-8s}"; CONNS="${CONNS:-64}"; SAMPLE_RATIO="${SAMPLE_RATIO:-1.0}"
cargo build --release --locked --features otel --bin tollgate >&2
BIN="$CARGO_TARGET_DIR/release/tollgate"
. scripts/lib/services.sh
load_tools
WORK="$(mktemp -d)"
cleanup() { kill $(jobs -p) 2>/dev/null || true; nginx -p "$WORK/up" -c "$WORK/up/nginx.conf" -s stop 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
UP=$(port); OTLP=$(port)
mkdir -p "$WORK/up/logs"
cat > "$WORK/up/nginx.conf" <<NGINX
worker_processes 1; pid $WORK/up/nginx.pid; error_log $WORK/up/logs/error.log;
events {} http { access_log off; client_body_buffer_size 1m;
  server { listen 127.0.0.1:$UP; location / { return 200 'hello'; } }
  server { listen 127.0.0.1:$OTLP; location / { return 200 ''; } } }
NGINX
nginx -p "$WORK/up" -c "$WORK/up/nginx.conf"
declare -A GW
for target in off spans; do
  gw=$(port); api=$(port)
  bench_config "$WORK/$target.yaml" "$gw" "$api"
  [ "$target" = spans ] && echo "telemetry: { otlp: { endpoint: \"http://127.0.0.1:$OTLP\", sample_ratio: $SAMPLE_RATIO } }" >> "$WORK/$target.yaml"
  RUST_LOG=warn "$BIN" up --config "$WORK/$target.yaml" --data-dir "$WORK/data-$target" 2>"$WORK/$target.log" &
  for _ in $(seq 200); do curl -sf -H 'x-api-key: bench-key' "http://127.0.0.1:$gw/v1/items/1" >/dev/null && break; sleep 0.05; done
  GW[$target]=$gw
done
echo "wrk -t1 -c$CONNS -d$DURATION, \`tollgate up\` --features otel, spans: telemetry.otlp with sample_ratio $SAMPLE_RATIO"
echo
echo "| round | target | requests/s | p50 ms | p99 ms |"
echo "|---|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
  for target in off spans; do
    wrk -t1 -c"$CONNS" -d"$DURATION" --latency -H 'x-api-key: bench-key' "http://127.0.0.1:${GW[$target]}/v1/items/1" > "$WORK/wrk.txt"
    echo "| $round | $target | $(python3 scripts/lib/wrk_summary.py "$WORK/wrk.txt" | awk '{print $1" | "$2" | "$3}') |"
  done
done
