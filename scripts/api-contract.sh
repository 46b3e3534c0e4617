#!/usr/bin/env bash
# Contract test of the query API against its own OpenAPI spec: schemathesis generates requests
# from /openapi.json and checks every answer (no 5xx, documented status codes, content types and
# response schemas, 400 for schema-violating input, auth rules). Requests that the schema allows
# but a cross-parameter rule refuses (from >= to, a step too small for the window) are 400 by
# design, so that one check (positive_data_acceptance) is left out. Fixed seed: reproducible.
#
# Usage: scripts/api-contract.sh PATH/TO/tollgate
set -euo pipefail
BIN="$1"
# schemathesis lives in its own virtualenv, whichever python3 the machine has.
VENV="${TOLLGATE_VENV:-$HOME/.cache/tollgate-venv}"
ST="$VENV/bin/st"
if [ ! -x "$ST" ]; then
  echo "installing schemathesis into $VENV" >&2
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    rm -rf "$VENV"
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q schemathesis >&2
fi
[ -x "$ST" ] || { echo "error: $ST is missing after installing schemathesis" >&2; exit 1; }
WORK="$(mktemp -d)"
cleanup() { kill "${PID:-}" 2>/dev/null || true; wait "${PID:-}" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
API=$(port); GW=$(port)
TOKEN="contract-test-token-0123456789"
TOLLGATE_QUERY_API__LISTEN="127.0.0.1:$API" TOLLGATE_GATEWAY__LISTEN="127.0.0.1:$GW" \
TOLLGATE_QUERY_API__ADMIN_TOKENS="[\"$TOKEN\"]" RUST_LOG=warn \
  "$BIN" up --demo --data-dir "$WORK/data" 2>"$WORK/tollgate.log" &
PID=$!
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$API/readyz" >/dev/null && break; sleep 0.05; done
curl -sf "http://127.0.0.1:$API/readyz" >/dev/null || { cat "$WORK/tollgate.log" >&2; echo "tollgate did not start" >&2; exit 1; }
# Run from the temp dir: schemathesis keeps a cache folder in its working directory.
cd "$WORK"
"$ST" run "http://127.0.0.1:$API/openapi.json" --url "http://127.0.0.1:$API" \
  -H "Authorization: Bearer $TOKEN" \
  --exclude-checks positive_data_acceptance \
  --max-examples "${CONTRACT_EXAMPLES:-60}" --seed 20261127 --no-color
