#!/usr/bin/env bash
# Hot-swap benchmark (not a test): time from PUT to active in forward mode, with and
# without the compile cache, the replay rate, and a rollback until every answer is the
# previous reducer's again (p50 of 3, with the memory it takes), against a real broker
# (nisshi).
#
#   bench/hot-swap.sh                 # release build, 1M events over 100k users
#   PROFILE=debug EVENTS=50000 bench/hot-swap.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE="${PROFILE:-release}"
EVENTS="${EVENTS:-1000000}"
scripts/setup.sh all >&2
export PATH="$HOME/.cargo/bin:$PATH"
if [ "$PROFILE" = release ]; then cargo build --locked --release -p logq >&2; else cargo build --locked -p logq >&2; fi
BIN="$PWD/target/$PROFILE/logq"
COMPONENTS="$PWD/target/reducer-wasm/components"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 600); do curl -sf "$1" >/dev/null && return 0; sleep 0.1; done; echo "timeout: $1" >&2; exit 1; }

bport=$(free_port)
(cd "$work" && exec nisshi broker --listener-url "tcp://127.0.0.1:$bport" --advertised-listener-url "tcp://127.0.0.1:$bport" --storage-engine memory://bench/ >"$work/broker.log" 2>&1) &
pids+=($!)
sleep 1
for t in users organizations users.dlq organizations.dlq; do
  (cd "$work" && nisshi topic create "$t" --partitions 3 --broker "tcp://127.0.0.1:$bport" --silent)
done
python3 bench/gen_events.py 42 $((EVENTS / 10)) "$EVENTS" >"$work/users.jsonl"
"$BIN" produce --brokers "127.0.0.1:$bport" -t users "$work/users.jsonl" >&2
"$BIN" produce --brokers "127.0.0.1:$bport" -t organizations data/organizations.json >&2

start_host() { # $1 = extra flags
  hport=$(free_port)
  # shellcheck disable=SC2086
  "$BIN" run --brokers "127.0.0.1:$bport" --listen "127.0.0.1:$hport" --admin-token bench $1 >"$work/host.log" 2>&1 &
  host_pid=$!; pids+=("$host_pid")
  wait_http "http://127.0.0.1:$hport/readyz"
}
put() { # $1 = component, $2 = mode -> seconds from request to answer (the swap is active when it answers)
  curl -s -o "$work/put.json" -w '%{time_total}' -X PUT -H "Authorization: Bearer bench" \
    --data-binary @"$1" "http://127.0.0.1:$hport/admin/reducer?mode=$2"
}

start_host "--no-compile-cache"
no_cache_default=$(put "$COMPONENTS/reducer.wasm" forward)
no_cache_mask=$(put "$COMPONENTS/mask-emails-reducer.wasm" forward)
kill "$host_pid"; wait "$host_pid" 2>/dev/null || true

start_host "--compile-cache-dir $work/cache"
put "$COMPONENTS/mask-emails-reducer.wasm" forward >/dev/null   # fills the cache
cached_default=$(put "$COMPONENTS/reducer.wasm" forward)
cached_mask=$(put "$COMPONENTS/mask-emails-reducer.wasm" forward)

# Rollback: a replay of the previous reducer. Timed from the POST until its swap is
# active (every answer re-rendered); RSS sampled meanwhile. Three runs, each after
# forward swaps to the default then the mask reducer (so the rollback goes back to
# the default one, and every masked answer must change back).
rss() { awk '/^VmRSS/ {print $2}' "/proc/$host_pid/status"; }
admin() { curl -s -H "Authorization: Bearer bench" "http://127.0.0.1:$hport/admin/reducer"; }
rollback_runs=()
for _ in 1 2 3; do
  put "$COMPONENTS/reducer.wasm" forward >/dev/null
  put "$COMPONENTS/mask-emails-reducer.wasm" forward >/dev/null
  before=$(rss); peak=$before
  t0=$(date +%s.%N)
  id=$(curl -s -X POST -H "Authorization: Bearer bench" "http://127.0.0.1:$hport/admin/reducer/rollback" \
       | python3 -c 'import json,sys; print(json.load(sys.stdin)["swap"]["id"])')
  for _ in $(seq 6000); do
    now=$(rss); [ "$now" -gt "$peak" ] && peak=$now
    admin >"$work/admin.json"
    python3 - "$work/admin.json" "$id" <<'PY' && break
import json, sys
d = json.load(open(sys.argv[1]))
swap = next(h for h in d["history"] if h["id"] == int(sys.argv[2]))
ok = swap["outcome"] == "active" and d["active"]["answers"]["share_by_active"] == 1.0
sys.exit(0 if ok else 1)
PY
    sleep 0.05
  done
  t1=$(date +%s.%N)
  after=$(rss)
  rollback_runs+=("$(python3 -c "print('%.2f %d %d %d' % ($t1 - $t0, $before // 1024, $peak // 1024, $after // 1024))")")
done
rollback=$(printf '%s\n' "${rollback_runs[@]}" | sort -n | sed -n 2p)
read -r rb_secs rb_before rb_peak rb_after <<<"$rollback"
answers=$(admin | python3 -c 'import json,sys; a=json.load(sys.stdin)["active"]["answers"]; print("%d answers, %d by the active reducer" % (a["total"], a["by_active"]))')
put "$COMPONENTS/reducer.wasm" replay >/dev/null
for _ in $(seq 1200); do
  curl -s -H "Authorization: Bearer bench" "http://127.0.0.1:$hport/admin/reducer" >"$work/admin.json"
  grep -q '"phase":"done"' "$work/admin.json" && break
  sleep 0.1
done
replay=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))["replay"]; print("%d events in %.2f s = %.0f events/s (%s)" % (r["events_folded"], r["elapsed_seconds"], r["events_per_second"], r["phase"]))' "$work/admin.json")
caught=$(grep -o 'caught up: .*' "$work/host.log" | head -1)

cat <<REPORT
## Hot swap ($PROFILE build, $EVENTS user events, $(nproc) cores)
| figure | value |
|---|---|
| PUT -> active, forward, default reducer, no compile cache | ${no_cache_default} s |
| PUT -> active, forward, mask-emails reducer, no compile cache | ${no_cache_mask} s |
| PUT -> active, forward, default reducer, compile cache hit | ${cached_default} s |
| PUT -> active, forward, mask-emails reducer, compile cache hit | ${cached_mask} s |
| rollback until every answer is the previous reducer's (replay, no recompile), p50 of 3 | ${rb_secs} s (${answers}) |
| RSS during that rollback: before / peak / after | ${rb_before} / ${rb_peak} / ${rb_after} MiB |
| rollback runs (seconds, RSS before/peak/after MiB) | $(printf '%s; ' "${rollback_runs[@]}") |
| replay (default reducer, from earliest) | ${replay} |
| start-up catch-up of the same history | ${caught} |
REPORT
