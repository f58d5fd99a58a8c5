#!/usr/bin/env bash
# The main job with zero setup: builds logq (and its reducer) and runs `logq dev`:
# an in-memory development broker, the sample data, HTTP on 127.0.0.1:8080.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh build
exec cargo run --locked -p logq -- dev "$@"
