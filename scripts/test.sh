#!/usr/bin/env bash
# Runs every check of the project: formatting, lints, the API contract check, and the whole test
# suite (unit, property, conformance, end-to-end and browser tests, in the dev profile). One
# build, shared target directory.
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

# The dashboard test drives a real headless browser.
if [ ! -x /usr/bin/chromium ]; then
  echo "chromium is missing; installing it with apt-get (needed by tests/dashboard.rs)" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium >/dev/null
fi
if ! command -v curl >/dev/null; then
  echo "curl is missing; installing it with apt-get (needed by tests/dashboard.rs)" >&2
  apt-get update -qq && apt-get install -y -qq curl >/dev/null
fi

echo "== rustfmt" >&2
cargo fmt --all --check
echo "== clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== API contract (schemathesis against /openapi.json)" >&2
cargo build --locked
./scripts/api-contract.sh "$CARGO_TARGET_DIR/debug/tollgate"
echo "== tests" >&2
cargo nextest run --workspace --locked --no-fail-fast
