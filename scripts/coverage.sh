#!/usr/bin/env bash
# Line coverage of the whole test run (`cargo test --workspace`, the end-to-end
# tests included: the `logq` processes they start are built instrumented and write
# their own profiles), with cargo-llvm-cov. Installs what it needs once
# (`rustup component add llvm-tools`, `cargo install cargo-llvm-cov`), then prints
# the per-file table and a per-crate summary, and writes an HTML report to
# target/coverage/llvm-cov/html/. Not part of CI: an instrumented build of everything and
# the whole suite take about 20 minutes here.
#
#   scripts/coverage.sh
#   scripts/coverage.sh -p logq-abi      # one crate's tests (cargo test arguments)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh all
export PATH="$HOME/.cargo/bin:$PATH"
LLVM_COV_VERSION=0.9.1
if ! rustup component list --installed 2>/dev/null | grep -q '^llvm-tools'; then
  echo "coverage: rustup component add llvm-tools" >&2
  rustup component add llvm-tools
fi
if [ "$(cargo llvm-cov --version 2>/dev/null)" != "cargo-llvm-cov $LLVM_COV_VERSION" ]; then
  echo "coverage: cargo install cargo-llvm-cov $LLVM_COV_VERSION (a few minutes, once per machine)" >&2
  cargo install cargo-llvm-cov --version "=$LLVM_COV_VERSION" --locked
fi
# The tests build `logq` with a nested cargo (tests/src/lib.rs, logq_bin): the
# environment that cargo-llvm-cov exports (a rustc wrapper that instruments the
# workspace's crates) makes that build instrumented too. Its own target directory,
# so the next plain build is not a rebuild.
export CARGO_TARGET_DIR="$PWD/target/coverage"
source <(cargo llvm-cov show-env --export-prefix)
cargo llvm-cov clean --workspace
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--workspace)
cargo test --locked --no-fail-fast "${args[@]}" || echo "coverage: some tests failed; the report covers what ran" >&2
report=target/coverage/summary.txt
cargo llvm-cov report --ignore-filename-regex '(/tests/|/bench/|/fuzz/|test_triggers)' | tee "$report"
cargo llvm-cov report --html --ignore-filename-regex '(/tests/|/bench/|/fuzz/|test_triggers)' >/dev/null
# Per crate: the lines of its files, summed.
awk '
  $1 ~ /^(abi|reducer|host|sdk|examples)\// {
    split($1, p, "/"); crate = (p[1] == "examples") ? p[1] "/" p[2] : p[1]
    lines[crate] += $8; missed[crate] += $9
  }
  END {
    printf "\n%-28s %8s %8s %7s\n", "crate", "lines", "missed", "cover"
    for (c in lines) printf "%-28s %8d %8d %6.1f%%\n", c, lines[c], missed[c], 100 * (lines[c] - missed[c]) / lines[c]
  }' "$report" | sort
echo "coverage: HTML in target/coverage/llvm-cov/html/index.html" >&2
