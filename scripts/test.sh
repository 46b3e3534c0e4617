#!/usr/bin/env bash
# Runs every check of the project: formatting, lints, the API contract check, and the whole test
# suite (unit, property, conformance, end-to-end and browser tests, in the dev profile), with
# every backend compiled in (`--all-features`: Kafka and ClickHouse, tested against a real
# broker and server). One build, shared target directory.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/tollgate-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need cargo; then
  echo "error: cargo is missing; install Rust 1.95 (rustup) first" >&2
  exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest is missing; installing it from crates.io" >&2
  cargo install cargo-nextest --locked
fi

# Real services the tests run against (ClickHouse, a Kafka-protocol broker, Chromium) and the
# C toolchain librdkafka's build needs.
./scripts/install-test-services.sh

echo "== rustfmt" >&2
cargo fmt --all --check
echo "== clippy" >&2
cargo clippy --workspace --all-targets --all-features --locked -- -D warnings
echo "== API contract (schemathesis against /openapi.json)" >&2
cargo build --all-features --locked
./scripts/api-contract.sh "$CARGO_TARGET_DIR/debug/tollgate"
echo "== tests" >&2
cargo nextest run --workspace --all-features --locked --no-fail-fast
