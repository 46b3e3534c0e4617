#!/usr/bin/env bash
# Measures what a newcomer waits for: from a clean clone (empty target directory) to the demo's
# query API answering with metered traffic. Usage: scripts/first-run.sh [REPO]
set -euo pipefail
REPO="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
# A demo already answering (say, one still shutting down) would be measured instead of this one.
if curl -sf http://127.0.0.1:9090/healthz >/dev/null 2>&1; then
  echo "error: something already answers on 127.0.0.1:9090; stop it first" >&2
  exit 1
fi
start=$(date +%s)
git clone -q "$REPO" "$WORK/tollgate"
cd "$WORK/tollgate"
CARGO_TARGET_DIR="$WORK/target" TOLLGATE_DATA_DIR="$WORK/data" ./scripts/demo.sh >"$WORK/demo.log" 2>&1 &
until curl -sf 'http://127.0.0.1:9090/v1/usage?group_by=consumer' | grep -q '"requests"'; do
  if ! kill -0 $! 2>/dev/null; then tail -20 "$WORK/demo.log"; exit 1; fi
  sleep 1
done
end=$(date +%s)
echo "clean clone -> demo answering with metered traffic: $((end - start)) s"
# Stop the demo (cargo's child too) and wait until its port is free, so that a run right after
# this one measures its own demo.
pkill -TERM -f "$WORK/target/release/tollgate" 2>/dev/null || true
for _ in $(seq 100); do curl -sf http://127.0.0.1:9090/healthz >/dev/null 2>&1 || break; sleep 0.2; done
