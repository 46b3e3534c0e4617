#!/usr/bin/env bash
# HTTP/2 from clients: h2load (h2c with prior knowledge, CLIENTS connections of STREAMS
# concurrent streams each) through nginx as an HTTP/2 reverse proxy (the baseline: HTTP/1.1
# keep-alive pool to the upstream, as Tollgate's) and through `tollgate up` built with
# `--features http2` (API key, rate limit, quota, one event per stream), against the same nginx
# upstream, in the same run (nginx's per-connection request limit lifted: by default it ends an
# HTTP/2 connection after 1,000 requests). Prints a Markdown table for BENCHMARKS.md.
# Usage: REQUESTS=200000 CLIENTS=32 STREAMS=8 scripts/bench-h2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
REQUESTS="${REQUESTS:-200000}"
CLIENTS="${CLIENTS:-32}"
STREAMS="${STREAMS:-8}"
cargo build --release --locked --features http2 >&2
BIN="$CARGO_TARGET_DIR/release/tollgate"
WORK="$(mktemp -d)"
cleanup() { kill "${TG_PID:-}" 2>/dev/null || true; nginx -p "$WORK" -c "$WORK/nginx.conf" -s stop 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
. scripts/lib/services.sh
load_tools h2load=nghttp2-client
UP=$(port); PROXY=$(port); GW=$(port); API=$(port)
start_nginx_upstream "  upstream app { server 127.0.0.1:$UP; keepalive 256; }
  server { listen 127.0.0.1:$PROXY http2; keepalive_requests 100000000;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
bench_config "$WORK/tollgate.yaml" "$GW" "$API"
RUST_LOG=warn "$BIN" up --config "$WORK/tollgate.yaml" --data-dir "$WORK/data" 2>"$WORK/tollgate.log" &
TG_PID=$!
wait_for "curl -sf http://127.0.0.1:$API/readyz" 20

# run NAME URL [HEADER]: "requests/s mean_ms max_ms failed" from h2load's summary.
run() {
  local out
  out=$(h2load -n "$REQUESTS" -c "$CLIENTS" -m "$STREAMS" ${3:+-H "$3"} "$2" 2>&1)
  echo "$out" > "$WORK/h2load-$1.txt"
  python3 - "$WORK/h2load-$1.txt" <<'PY'
import re, sys
t = open(sys.argv[1]).read()
rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", t).group(1)
m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", t)
lat = re.search(r"time for request:\s+([\d.]+)(\w+)\s+([\d.]+)(\w+)\s+([\d.]+)(\w+)", t)
ms = lambda v, u: float(v) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[u]
codes = re.search(r"status codes: (\d+) 2xx", t).group(1)
print(f"{float(rps):.0f} {ms(lat.group(5), lat.group(6)):.3f} {ms(lat.group(3), lat.group(4)):.3f} {m.group(2)} {codes}")
PY
}
nginx_h2=$(run nginx "http://127.0.0.1:$PROXY/v1/items/1")
tollgate_h2=$(run tollgate "http://127.0.0.1:$GW/v1/items/1" "x-api-key: bench-key")
python3 - "$nginx_h2" "$tollgate_h2" "$REQUESTS" "$CLIENTS" "$STREAMS" <<'PY'
import sys
n, t = sys.argv[1].split(), sys.argv[2].split()
print(f"h2load -n {sys.argv[3]} -c {sys.argv[4]} -m {sys.argv[5]} (h2c), same machine, same run\n")
print("| target | requests/s | mean ms | max ms | failed | 2xx |")
print("|---|---|---|---|---|---|")
print(f"| nginx HTTP/2 reverse proxy -> upstream (baseline) | {n[0]} | {n[1]} | {n[2]} | {n[3]} | {n[4]} |")
print(f"| tollgate gateway, HTTP/2 (API key) -> upstream | {t[0]} | {t[1]} | {t[2]} | {t[3]} | {t[4]} |")
print(f"\n- tollgate / nginx throughput ratio over HTTP/2: {float(t[0]) / float(n[0]):.2f}")
PY
