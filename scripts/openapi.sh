#!/usr/bin/env bash
# Writes query-api/openapi.json anew from the API's types (query-api/src/openapi.rs), as the
# test `query-api/tests/openapi.rs` expects it. Review the diff, then commit it.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
UPDATE_OPENAPI=1 cargo test --locked -p tollgate-query-api --features openapi --test openapi -q
git diff --stat -- query-api/openapi.json
