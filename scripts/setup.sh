#!/usr/bin/env bash
# Installs what building and testing logq needs, idempotently: a second run skips
# everything already present.
#
#   scripts/setup.sh build   # enough to build and run logq (`logq dev`)
#   scripts/setup.sh all     # plus the test broker (nisshi) and docker-compose
#   scripts/setup.sh bench   # plus the benchmark peers and load tools (nginx, wrk, a font)
set -euo pipefail
what="${1:-all}"

have() { command -v "$1" >/dev/null 2>&1; }
log() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif have sudo; then sudo "$@"; else
    log "need root for: $*"; exit 1
  fi
}

apt_updated=""
apt_install() {
  local missing=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# Building: librdkafka is compiled from source (C, with OpenSSL and zlib).
apt_install build-essential pkg-config libssl-dev zlib1g-dev python3 curl

if ! have cargo; then
  log "cargo is missing: install Rust (rustup) first"; exit 1
fi
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  log "rustup target add wasm32-unknown-unknown"
  rustup target add wasm32-unknown-unknown
fi

[ "$what" = build ] && exit 0
case "$what" in all|bench) ;; *) log "unknown target $what (build, all, bench)"; exit 1 ;; esac

# Testing: compose-file validation and a real Kafka-compatible broker (sqlite3 edits
# its catalogue to add a partition while it runs: it has no CreatePartitions API);
# Debian's Chromium and ChromeDriver for the status page's browser tests.
apt_install docker-compose sqlite3 chromium chromium-driver
# JavaScript reducers (`logq reducer build` of a JS project, and its tests) run npm
# and Node.js; these machines have them, Debian's packages stand in elsewhere.
if ! have node || ! have npm; then apt_install nodejs npm; fi

NISSHI_VERSION=0.8.1
if "${NISSHI:-nisshi}" --version 2>/dev/null | grep -q "$NISSHI_VERSION" \
   || "$HOME/.cargo/bin/nisshi" --version 2>/dev/null | grep -q "$NISSHI_VERSION"; then
  :
else
  # nisshi needs Rust >= 1.96: use nightly where rustup has it, else Debian's 1.96.
  args=(install nisshi --version "=$NISSHI_VERSION" --locked --no-default-features --features dynostore,libsql)
  if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    log "building the test broker: cargo +nightly ${args[*]} (15-30 minutes, once per machine)"
    cargo +nightly "${args[@]}"
  else
    apt_install rustc-web cargo-web
    log "building the test broker with Debian's cargo: ${args[*]} (15-30 minutes, once per machine)"
    RUSTC=/usr/bin/rustc /usr/bin/cargo "${args[@]}" --root "$HOME/.cargo"
  fi
fi

[ "$what" = all ] && exit 0

# Benchmarks and soaks (`scripts/setup.sh bench`): the peers (nginx), the load
# generators (wrk for throughput, oha for open-loop latency) and a font for the
# charts.
OHA_VERSION=1.16.0
if [ "$what" = bench ]; then
  apt_install wrk nginx-light fonts-dejavu-core
  if [ "$(oha --version 2>/dev/null)" != "oha $OHA_VERSION" ]; then
    log "building oha $OHA_VERSION from crates.io (about 5 minutes, once per machine)"
    cargo install oha --version "=$OHA_VERSION" --locked
  fi
fi
