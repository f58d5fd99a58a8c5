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
exec target/release/logq-bench "$@"
