#!/usr/bin/env bash
# make bench-subscribe: live subscriptions (GET /v1/subscribe, Server-Sent Events) under a write
# load, three scenarios, each on a fresh `keel serve` (temporary store, free loopback port):
#
#   a. 1000 subscribers following everything; the writer at 1,000 items/s open loop, batch 100.
#   b. 100 subscribers following everything; the writer at 10,000 items/s open loop, batch 100.
#   c. 1000 subscribers each following one account (aggregate=account:a<i>); the writer at full
#      speed, batch 1000; the same writer first runs alone on the same server (--baseline).
#
# After a and b, `keel-bench loopback-fanout` moves the same bytes to as many connections at the
# same rate over bare loopback TCP (<name>-floor.*): the latency no server can beat on this host.
#
# Each scenario writes for SUBSCRIBE_DURATION (default 20s). Environment: CARGO_TARGET_DIR,
# BENCH_DATA_ROOT (default $TMPDIR or /tmp), SUBSCRIBE_SCENARIOS (default "a b c"),
# BENCH_KEEP_DATA=1 keeps the stores. Results: bench/results/<UTC stamp>-subscribe/. Loopback
# only; every wait is bounded.
set -euo pipefail

CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}
KEEL_BIN=${KEEL_BIN:-$CARGO_TARGET_DIR/release/keel}
KEEL_BENCH_BIN=${KEEL_BENCH_BIN:-$CARGO_TARGET_DIR/release/keel-bench}
BENCH_DATA_ROOT=${BENCH_DATA_ROOT:-${TMPDIR:-/tmp}}
SUBSCRIBE_DURATION=${SUBSCRIBE_DURATION:-20s}
SUBSCRIBE_SCENARIOS=${SUBSCRIBE_SCENARIOS:-a b c}
HERE=$(cd "$(dirname "$0")" && pwd)
RESULTS=$HERE/results/$(date -u +%Y%m%dT%H%M%SZ)-subscribe

log() { echo "[subscribe] $*" >&2; }

DIR=$(mktemp -d "$BENCH_DATA_ROOT/keel-bench-subscribe.XXXXXX")
SERVER_PID=
cleanup() {
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -9 "$SERVER_PID" 2>/dev/null || true
  fi
  if [[ ${BENCH_KEEP_DATA:-0} != 1 ]]; then
    rm -rf "$DIR"
  else
    log "stores kept in $DIR"
  fi
}
trap cleanup EXIT
mkdir -p "$RESULTS"

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

# run_scenario NAME SUBSCRIBERS -- keel-bench subscribe flags...
run_scenario() {
  local name=$1 subscribers=$2
  shift 3
  local port url store=$DIR/$name
  port=$("$KEEL_BENCH_BIN" free-port)
  url="http://127.0.0.1:$port"
  # Room for every subscriber plus the writer, the setup and the tip read.
  "$KEEL_BIN" serve --data "$store" --listen "127.0.0.1:$port" \
    --connections-max $((subscribers + 64)) --subscribers-max $((subscribers + 16)) \
    >"$RESULTS/$name-server.log" 2>&1 &
  SERVER_PID=$!
  if ! "$KEEL_BENCH_BIN" wait-ready --url "$url" --timeout 60s >/dev/null; then
    tail -n 20 "$RESULTS/$name-server.log" >&2
    log "FAILED: the server did not become ready"
    exit 1
  fi
  local command=("$KEEL_BENCH_BIN" subscribe --url "$url" --subscribers "$subscribers"
    --duration "$SUBSCRIBE_DURATION" --label "$name" --json "$RESULTS/$name.json" "$@")
  log "scenario $name: ${command[*]}"
  echo "${command[*]}" >"$RESULTS/$name.command"
  "${command[@]}" | tee "$RESULTS/$name.txt"
  curl -s "$url/metrics" | grep -E '^keel_(subscribers|subscriber_overflows_total|subscribe_deliveries_total) ' \
    >"$RESULTS/$name-metrics.txt" || true
  stop_server
}

# run_floor NAME CONNECTIONS BATCHES_PER_SEC BATCH: the same fan-out without Keel (keel-bench
# loopback-fanout: bytes straight over loopback TCP, no HTTP, SSE or store), with the bytes per
# delivery the scenario measured and as many rounds as it had batches. What it prints is the
# floor of the scenario's latency on this host.
run_floor() {
  local name=$1 connections=$2 per_sec=$3 batch=$4 shape
  shape=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); b=int(sys.argv[2]); print(round(r["bytes_per_delivery"]*b), min(100000, round(r["duration_s"]*float(sys.argv[3]))))' \
    "$RESULTS/$name.json" "$batch" "$per_sec")
  local command=("$KEEL_BENCH_BIN" loopback-fanout --connections "$connections"
    --bytes "${shape% *}" --rounds-per-sec "$per_sec" --rounds "${shape#* }"
    --json "$RESULTS/$name-floor.json")
  log "scenario $name, its floor: ${command[*]}"
  echo "${command[*]}" >"$RESULTS/$name-floor.command"
  "${command[@]}" | tee "$RESULTS/$name-floor.txt"
}

for scenario in $SUBSCRIBE_SCENARIOS; do
  case $scenario in
    a) run_scenario a 1000 -- --rate 1000 --batch 100
       run_floor a 1000 10 100 ;;
    b) run_scenario b 100 -- --rate 10000 --batch 100
       run_floor b 100 100 100 ;;
    c) run_scenario c 1000 -- --filter-accounts --accounts 1000 --batch 1000 --baseline ;;
    *) log "unknown scenario $scenario (a, b or c)"; exit 2 ;;
  esac
done
log "results in $RESULTS"
