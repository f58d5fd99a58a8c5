#!/usr/bin/env bash
# The benchmark suite, one command: every figure of logq next to a peer measured in
# the same run (fold engine vs native, catch-up vs a plain rdkafka consumer, GET vs
# nginx with wrk, memory per user, start-up). Writes bench/results/latest/results.md
# and PNG charts. Not a test: it takes about 5-10 minutes at the default scale.
#
#   bench/run.sh                                  # 1M events, 100k users
#   bench/run.sh --events 200000 --users 20000    # quicker
#   bench/run.sh --help
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh bench >&2
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --locked --release -p logq -p logq-bench >&2
export LOGQ_BIN="$PWD/target/release/logq"

# Figure 1b: the kit's examples, built from source as a user would (LOGQ_BENCH_KIT=0
# skips them): a Rust reducer written with the SDK and the JavaScript example.
kit=()
if [ "${LOGQ_BENCH_KIT:-1}" != 0 ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  build() { # SLUG NAME DIR: builds DIR into $work/SLUG.wasm; prints NAME=PATH@SECONDS
    local start end
    start=$(date +%s%N)
    "$LOGQ_BIN" reducer build "$3" --out "$work/$1.wasm" >/dev/null
    end=$(date +%s%N)
    printf '%s=%s@%d.%03d' "$2" "$work/$1.wasm" $(((end - start) / 1000000000)) $(((end - start) / 1000000 % 1000))
  }
  kit+=(--kit "$(CARGO_TARGET_DIR="$PWD/target/examples-wasm" build rust-sdk "Rust SDK tweak (examples/display-name)" examples/display-name)")
  mkdir -p "$work/js" && cp examples/lowercase-emails-js/{package.json,reducer.js} "$work/js/"
  kit+=(--kit "$(build js "JavaScript (examples/lowercase-emails-js)" "$work/js")")
fi
target/release/logq-bench "${kit[@]}" "$@"
