#!/usr/bin/env bash
# Builds Tollgate (release) and starts the embedded demo: gateway, bus, collector, store, query
# API, dashboards, a demo upstream and demo traffic, all in one process.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
exec cargo run --release --locked -- up --demo --data-dir "${TOLLGATE_DATA_DIR:-./data}" "$@"
