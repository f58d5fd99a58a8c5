#!/usr/bin/env bash
# Runs every test: reducer unit and property tests, the wasm-vs-native differential
# tests, host unit tests, and the end-to-end tests against a real broker process.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh all
export PATH="$HOME/.cargo/bin:$PATH"
cargo test --workspace --locked --no-fail-fast "$@"
