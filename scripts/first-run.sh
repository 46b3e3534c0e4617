#!/usr/bin/env bash
# Measures what a newcomer waits for: from a clean clone (empty target directory) to the demo's
# query API answering with metered traffic. Usage: scripts/first-run.sh [REPO]
set -euo pipefail
REPO="${1:-$(cd "$(dirname "$0")/.." && pwd)}"
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
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
