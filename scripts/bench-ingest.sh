#!/usr/bin/env bash
# What the pipeline behind the gateway costs per event, binaries side by side: EVENTS events
# (default 2 million) of 1,000 consumers and four routes, spread over SPAN seconds (default 60,
# as a burst at about 33,000 requests/s would leave them), are written once to an embedded bus
# log (examples/seed_bus.rs); then for each round and each binary given, a fresh `tollgate up`
# on a copy of that log reads, decodes and stores them (Parquet files, rollups, sketches). The
# figure is the process's CPU time (user + system, from /proc) once the query API counts every
# event, divided by the events: start-up and the count's own queries included, the same for
# every binary.
# Usage: ROUNDS=3 EVENTS=2000000 SPAN=60 scripts/bench-ingest.sh BINARY...
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
ROUNDS="${ROUNDS:-3}"; EVENTS="${EVENTS:-2000000}"; SPAN="${SPAN:-60}"
[ $# -gt 0 ] || { echo "usage: $0 BINARY..." >&2; exit 2; }
. scripts/lib/services.sh
cargo build --release --locked --example seed_bus >&2
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT
DAY=$(( ($(date +%s) / 86400 - 1) * 86400 ))
SEED_SPAN_S="$SPAN" "$CARGO_TARGET_DIR/release/examples/seed_bus" "$WORK/seed/bus" "$EVENTS" "$DAY"
total() { curl -sf "http://127.0.0.1:$1/v1/usage?from=0&group_by=consumer" 2>/dev/null \
  | python3 -c 'import json,sys; print(sum(r["requests"] for r in json.load(sys.stdin)["rows"]))' 2>/dev/null || echo 0; }
echo "$EVENTS events over $SPAN s, ingested by a fresh \`tollgate up\` per run"
echo
echo "| binary | round | seconds until all counted | events/s | CPU µs per event |"
echo "|---|---|---|---|---|"
for round in $(seq "$ROUNDS"); do
  for bin in "$@"; do
    rm -rf "$WORK/data"; mkdir -p "$WORK/data"; cp -r "$WORK/seed/bus" "$WORK/data/bus"
    api=$(port)
    printf 'gateway: { listen: 127.0.0.1:%s }\nquery_api: { listen: 127.0.0.1:%s }\n' "$(port)" "$api" > "$WORK/t.yaml"
    start=$(date +%s%3N)
    RUST_LOG=warn "$bin" up --config "$WORK/t.yaml" --data-dir "$WORK/data" 2>"$WORK/up.log" &
    pid=$!
    until [ "$(total "$api")" -ge "$EVENTS" ]; do
      kill -0 "$pid" 2>/dev/null || { tail "$WORK/up.log" >&2; exit 1; }
      [ $(( $(date +%s%3N) - start )) -lt 300000 ] || { echo "not all $EVENTS events counted within 300 s" >&2; exit 1; }
      sleep 0.2
    done
    ms=$(( $(date +%s%3N) - start ))
    ticks=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    python3 -c "
hz = $(getconf CLK_TCK)
print(f'| $bin | $round | {$ms/1000:.2f} | {$EVENTS*1000/$ms:,.0f} | {$ticks/hz*1e6/$EVENTS:.2f} |')"
  done
done
