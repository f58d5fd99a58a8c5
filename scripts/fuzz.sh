#!/usr/bin/env bash
# Fuzzes record decoding and the fold with cargo fuzz (libFuzzer, nightly), each
# target for a bounded time. Not part of CI.
#
#   scripts/fuzz.sh          # 60 s per target
#   scripts/fuzz.sh 600      # 10 minutes per target
#
# Seeds: the sample data and the hostile-input corpus. A crash leaves its input in
# fuzz/artifacts/<target>/; replay it with `cargo +nightly fuzz run <target> <file>`.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
scripts/setup.sh build >&2
export PATH="$HOME/.cargo/bin:$PATH"
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
cargo fuzz --version >/dev/null 2>&1 || cargo install cargo-fuzz --locked
for target in decode fold; do
  mkdir -p "fuzz/corpus/$target"
  for seed in data/*.json tests/corpus/*.json tests/corpus/*.bin; do
    cp -n "$seed" "fuzz/corpus/$target/" 2>/dev/null || true
  done
  echo "fuzzing $target for ${secs}s" >&2
  cargo +nightly fuzz run "$target" -- -max_total_time="$secs" -max_len=65536 -print_final_stats=1
done
