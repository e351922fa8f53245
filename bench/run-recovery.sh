#!/usr/bin/env bash
# make bench-recovery: how long a store of RECOVERY_EVENTS committed events (default 10M) takes
# to open and be ready (`GET /readyz` 200) after a clean stop (SIGTERM) and after kill -9 in the
# middle of a load.
#
#   1. make_store (the real sequencer, in process) writes the store; it stops cleanly.
#   2. keel serve starts on it: time to ready (start after a clean stop), then SIGTERM.
#   3. keel serve starts again: time to ready after SIGTERM.
#   4. A load of RECOVERY_LOAD_SECONDS (1 client x batch 1000), kill -9 during it.
#   5. keel serve starts again: time to ready after kill -9 (the log tail after the last
#      checkpoint is replayed), then SIGTERM, and `keel audit` must say INTEGRITY_OK.
#
# Environment: CARGO_TARGET_DIR, BENCH_DATA_ROOT (default $TMPDIR or /tmp), RECOVERY_EVENTS,
# RECOVERY_LOAD_SECONDS (default 5), BENCH_KEEP_DATA=1 keeps the store. Loopback only; every
# wait is bounded.
set -euo pipefail

CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}
KEEL_BIN=${KEEL_BIN:-$CARGO_TARGET_DIR/release/keel}
KEEL_BENCH_BIN=${KEEL_BENCH_BIN:-$CARGO_TARGET_DIR/release/keel-bench}
MAKE_STORE_BIN=${MAKE_STORE_BIN:-$CARGO_TARGET_DIR/release/examples/make_store}
BENCH_DATA_ROOT=${BENCH_DATA_ROOT:-${TMPDIR:-/tmp}}
RECOVERY_EVENTS=${RECOVERY_EVENTS:-10000000}
RECOVERY_LOAD_SECONDS=${RECOVERY_LOAD_SECONDS:-5}
READY_TIMEOUT=${READY_TIMEOUT:-120s}

log() { echo "[recovery] $*" >&2; }
now() { date +%s.%N; }
seconds_since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

DIR=$(mktemp -d "$BENCH_DATA_ROOT/keel-bench-recovery.XXXXXX")
STORE=$DIR/store
SERVER_PID=
cleanup() {
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -9 "$SERVER_PID" 2>/dev/null || true
  fi
  if [[ ${BENCH_KEEP_DATA:-0} != 1 ]]; then
    rm -rf "$DIR"
  else
    log "store kept in $STORE"
  fi
}
trap cleanup EXIT

PORT=$("$KEEL_BENCH_BIN" free-port)
URL="http://127.0.0.1:$PORT"

# Starts keel serve on the store; READY_SECONDS = the seconds until /readyz answered 200.
READY_SECONDS=
start_and_time() {
  local started
  started=$(now)
  "$KEEL_BIN" serve --data "$STORE" --listen "127.0.0.1:$PORT" >>"$DIR/server.log" 2>&1 &
  SERVER_PID=$!
  if ! "$KEEL_BENCH_BIN" wait-ready --url "$URL" --timeout "$READY_TIMEOUT" >/dev/null; then
    tail -n 20 "$DIR/server.log" >&2
    log "FAILED: the server did not become ready"
    exit 1
  fi
  READY_SECONDS=$(seconds_since "$started")
}

stop_server() {
  kill -TERM "$SERVER_PID"
  local waited=0
  while kill -0 "$SERVER_PID" 2>/dev/null; do
    sleep 0.1
    waited=$((waited + 1))
    if ((waited > 600)); then
      log "FAILED: the server did not stop within 60 s of SIGTERM"
      exit 1
    fi
  done
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}

log "writing $RECOVERY_EVENTS events into $STORE"
started=$(now)
"$MAKE_STORE_BIN" "$STORE" "$RECOVERY_EVENTS" >"$DIR/make_store.log" 2>&1
log "store written in $(seconds_since "$started") s ($(du -sh "$STORE" | cut -f1))"

start_and_time
first=$READY_SECONDS
stop_server
start_and_time
after_sigterm=$READY_SECONDS

log "load for $RECOVERY_LOAD_SECONDS s, then kill -9"
"$KEEL_BENCH_BIN" --url "$URL" --workers 1 --batch 1000 --duration "$((RECOVERY_LOAD_SECONDS + 30))s" \
  --label recovery-load >"$DIR/load.log" 2>&1 &
LOAD_PID=$!
sleep "$RECOVERY_LOAD_SECONDS"
kill -9 "$SERVER_PID"
wait "$SERVER_PID" 2>/dev/null || true
SERVER_PID=
# The load stops by itself on its connection errors or its duration; bounded either way.
kill "$LOAD_PID" 2>/dev/null || true
wait "$LOAD_PID" 2>/dev/null || true

start_and_time
after_kill=$READY_SECONDS
replayed=$(grep -o 'replayed_events=[0-9]*' "$DIR/server.log" | tail -n 1 | cut -d= -f2)
stop_server

log "auditing $STORE"
if ! "$KEEL_BIN" audit --data "$STORE" >"$DIR/audit.log" 2>&1; then
  tail -n 20 "$DIR/audit.log" >&2
  echo "FAILED: bench-recovery: the audit did not say INTEGRITY_OK"
  exit 1
fi

events=$(grep -o 'checked *[0-9]* batches, [0-9]* events' "$DIR/audit.log" | grep -o '[0-9]* events' | cut -d' ' -f1)
echo "store                       $events events ($(du -sh "$STORE" | cut -f1)) in $STORE"
echo "ready after a clean start   $first s"
echo "ready after SIGTERM         $after_sigterm s"
echo "ready after kill -9         $after_kill s (log replayed after the checkpoint: ${replayed:-?} events)"
echo "PASSED: bench-recovery (INTEGRITY_OK)"
