#!/usr/bin/env bash
# Runs one HTTP benchmark scenario end to end and reports PASSED or FAILED:
#   fio preflight of the data disk -> fresh `keel serve` on a temporary data directory and a free
#   loopback port -> wait for /readyz -> keel-bench load (JSON, CSV, plots) -> SIGTERM and wait
#   for a clean stop -> `keel audit --data DIR` must end with INTEGRITY_OK.
# Everything lands in RESULTS_DIR (default bench/results/<BENCH_RUN_ID or UTC date>-<NAME>/).
# The VERDICT file is the run's outcome: PASSED or FAILED with the disk measured, or INTERRUPTED
# (a signal stopped the run: whatever else the folder holds is not a result). A folder without
# a VERDICT is a run that is still going or was killed outright.
#
# With BENCH_KIND=engine the server and HTTP are left out: `keel-bench engine` drives the
# sequencer and RocksDB in-process on DATA_DIR, and the audit runs on that store.
#
# With BENCH_DOMAIN=FILE (HTTP only) the server is started with `--domain FILE` and keel-bench
# sends the mix's commands to that declared domain (`--domain FILE`: `<domain>.<command>`); the
# file is copied into RESULTS_DIR as domain.toml. Empty: the built-in ledger and inventory.
#
# Usage: bench/run-scenario.sh NAME [RESULTS_DIR]
# Knobs (environment, all optional; docs/BENCHMARKING.md explains each):
#   BENCH_WORKERS BENCH_BATCH BENCH_DURATION BENCH_ACCOUNTS BENCH_SKUS BENCH_MIX
#   BENCH_PAYLOAD_BYTES BENCH_RATE BENCH_ATOMIC BENCH_REJECT_RATIO BENCH_SEED BENCH_IDS
#   BENCH_SAMPLE_INTERVAL BENCH_MAX_REQUESTS BENCH_DATA_ROOT BENCH_PREFLIGHT FSYNC_MAX_LAT_US
#   FIO_RUNTIME BENCH_KEEP_DATA BENCH_STOP_TIMEOUT_S BENCH_KIND BENCH_IN_FLIGHT KEEL_SERVE_ARGS
#   BENCH_DOMAIN KEEL_BIN KEEL_BENCH_BIN BENCH_RUN_ID
set -euo pipefail

usage() {
  echo "usage: $0 NAME [RESULTS_DIR]" >&2
  exit 2
}

NAME=${1:-}
[[ -n $NAME ]] || usage
[[ $NAME =~ ^[A-Za-z0-9._-]+$ ]] || { echo "scenario name '$NAME': letters, digits, . _ - only" >&2; exit 2; }

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}
KEEL_BIN=${KEEL_BIN:-$CARGO_TARGET_DIR/release/keel}
KEEL_BENCH_BIN=${KEEL_BENCH_BIN:-$CARGO_TARGET_DIR/release/keel-bench}
BENCH_RUN_ID=${BENCH_RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)}
RESULTS_DIR=${2:-${RESULTS_DIR:-$REPO_ROOT/bench/results/$BENCH_RUN_ID-$NAME}}

BENCH_WORKERS=${BENCH_WORKERS:-1}
BENCH_BATCH=${BENCH_BATCH:-1000}
BENCH_DURATION=${BENCH_DURATION:-15s}
BENCH_ACCOUNTS=${BENCH_ACCOUNTS:-10000}
BENCH_SKUS=${BENCH_SKUS:-1000}
BENCH_MIX=${BENCH_MIX:-ledger}
BENCH_PAYLOAD_BYTES=${BENCH_PAYLOAD_BYTES:-0}
BENCH_RATE=${BENCH_RATE:-}
BENCH_ATOMIC=${BENCH_ATOMIC:-0}
BENCH_REJECT_RATIO=${BENCH_REJECT_RATIO:-0}
BENCH_SEED=${BENCH_SEED:-42}
BENCH_IDS=${BENCH_IDS:-counter}
BENCH_SAMPLE_INTERVAL=${BENCH_SAMPLE_INTERVAL:-2s}
BENCH_MAX_REQUESTS=${BENCH_MAX_REQUESTS:-50000000}
BENCH_DATA_ROOT=${BENCH_DATA_ROOT:-${TMPDIR:-/tmp}}
BENCH_PREFLIGHT=${BENCH_PREFLIGHT:-1}
BENCH_KEEP_DATA=${BENCH_KEEP_DATA:-0}
BENCH_STOP_TIMEOUT_S=${BENCH_STOP_TIMEOUT_S:-60}
FSYNC_MAX_LAT_US=${FSYNC_MAX_LAT_US:-5000}
FIO_RUNTIME=${FIO_RUNTIME:-10s}
KEEL_SERVE_ARGS=${KEEL_SERVE_ARGS:-}
BENCH_KIND=${BENCH_KIND:-http}
BENCH_IN_FLIGHT=${BENCH_IN_FLIGHT:-4}
BENCH_DOMAIN=${BENCH_DOMAIN:-}
case $BENCH_KIND in
  http | engine) ;;
  *) echo "BENCH_KIND must be http or engine, not '$BENCH_KIND'" >&2; exit 2 ;;
esac
if [[ -n $BENCH_DOMAIN ]]; then
  if [[ $BENCH_KIND == engine ]]; then
    echo "BENCH_DOMAIN is for HTTP scenarios; the engine bench runs the built-in ledger only" >&2
    exit 2
  fi
  # A path relative to the repository (examples/domains/ledger.toml) works from anywhere.
  if [[ ! -e $BENCH_DOMAIN && $BENCH_DOMAIN != /* && -f $REPO_ROOT/$BENCH_DOMAIN ]]; then
    BENCH_DOMAIN=$REPO_ROOT/$BENCH_DOMAIN
  fi
  if [[ ! -f $BENCH_DOMAIN || ! -r $BENCH_DOMAIN ]]; then
    echo "BENCH_DOMAIN=$BENCH_DOMAIN: no such readable file (a domain definition, docs/DOMAINS.md)" >&2
    exit 2
  fi
fi

log() { printf '[%s] %s\n' "$NAME" "$*" >&2; }

for bin in "$KEEL_BIN" "$KEEL_BENCH_BIN"; do
  if [[ ! -x $bin ]]; then
    echo "missing $bin: build it with 'cargo build --release -p keel-ingress -p keel-bench'" \
      "(CARGO_TARGET_DIR=$CARGO_TARGET_DIR) or run the make target, which builds first" >&2
    exit 2
  fi
done

mkdir -p "$RESULTS_DIR" "$BENCH_DATA_ROOT"
RESULTS_DIR=$(cd "$RESULTS_DIR" && pwd)
failures=()
SERVER_PID=
DATA_DIR=

# The disk the stores and the preflight are on, so that a wrong disk shows in every result.
data_disk() {
  local source fstype target
  if read -r source fstype target < <(findmnt -no SOURCE,FSTYPE,TARGET --target "$BENCH_DATA_ROOT" 2>/dev/null); then
    DATA_DISK_DEVICE=$source DATA_DISK_FSTYPE=$fstype DATA_DISK_MOUNT=$target
  else
    DATA_DISK_DEVICE=unknown DATA_DISK_FSTYPE=unknown DATA_DISK_MOUNT=unknown
  fi
  DATA_DISK="$DATA_DISK_DEVICE ($DATA_DISK_FSTYPE, mounted at $DATA_DISK_MOUNT) for $BENCH_DATA_ROOT"
}
data_disk

# Writes the VERDICT file (first line: PASSED, FAILED or INTERRUPTED) and shows it. It names no
# path of this machine: the folder is copied elsewhere (deploy/cloud/fetch-results.sh).
# The file comes first: when the run is stopped from afar, the terminal (an ssh channel) may be
# gone already, and the verdict must still be written.
verdict() {
  printf '%s\n' "$@" >"$RESULTS_DIR/VERDICT"
  if [[ $1 == PASSED* ]]; then
    cat "$RESULTS_DIR/VERDICT" || true
  else
    cat "$RESULTS_DIR/VERDICT" >&2 || true
  fi
  echo "[$NAME] results in $RESULTS_DIR" >&2 || true
}

# Stops the server if it still runs and removes the temporary data directory.
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
  local status=$?
  if [[ ! -s $RESULTS_DIR/VERDICT ]]; then
    # 128+N: a step died of signal N (the run's process group was stopped) before this shell's
    # own trap could run; it is an interruption like any other.
    if ((status > 128 && status < 160)); then
      interrupted_verdict "$(kill -l $((status - 128)) 2>/dev/null || echo "signal $((status - 128))")"
    else
      verdict "FAILED: $NAME stopped (exit $status) before a verdict; not a result"
    fi
  fi
  if [[ -n $SERVER_PID ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
  if [[ -n $DATA_DIR && -d $DATA_DIR && $BENCH_KEEP_DATA != 1 ]]; then
    rm -rf -- "$DATA_DIR"
  fi
}
trap cleanup EXIT
# shellcheck disable=SC2317  # invoked by the signal traps
interrupted_verdict() {
  # A closed stdout/stderr must not kill this shell before the verdict and the cleanup.
  trap '' PIPE
  log "interrupted by SIG$1" || true
  verdict "INTERRUPTED: $NAME stopped by SIG$1 before its end; its numbers are not a result (not audited)" \
    "  data disk: $DATA_DISK"
}
# shellcheck disable=SC2317  # invoked by the signal traps
interrupted() {
  interrupted_verdict "$1"
  exit 130
}
for signal in INT TERM HUP; do
  # shellcheck disable=SC2064  # the signal name is fixed when the trap is set, on purpose
  trap "interrupted $signal" "$signal"
done

# Records what ran, so the directory explains itself.
{
  echo "scenario=$NAME"
  echo "date_utc=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host=$(hostname 2>/dev/null || echo unknown)"
  echo "nproc=$(nproc 2>/dev/null || echo unknown)"
  echo "kernel=$(uname -r)"
  echo "data_disk_device=$DATA_DISK_DEVICE"
  echo "data_disk_fstype=$DATA_DISK_FSTYPE"
  echo "data_disk_mount=$DATA_DISK_MOUNT"
  echo "git_commit=$(git -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
  for var in BENCH_WORKERS BENCH_BATCH BENCH_DURATION BENCH_ACCOUNTS BENCH_SKUS BENCH_MIX \
    BENCH_PAYLOAD_BYTES BENCH_RATE BENCH_ATOMIC BENCH_REJECT_RATIO BENCH_SEED BENCH_SAMPLE_INTERVAL \
    BENCH_MAX_REQUESTS BENCH_DATA_ROOT BENCH_PREFLIGHT FSYNC_MAX_LAT_US FIO_RUNTIME KEEL_SERVE_ARGS \
    BENCH_KIND BENCH_IN_FLIGHT BENCH_DOMAIN BENCH_RUN_ID BENCH_IDS; do
    echo "$var=${!var}"
  done
} >"$RESULTS_DIR/scenario.env"
# The definition the server decided under, beside the numbers it produced.
if [[ -n $BENCH_DOMAIN ]]; then
  cp -- "$BENCH_DOMAIN" "$RESULTS_DIR/domain.toml"
fi

# 1. Preflight: refuse a disk whose fsync is too slow to say anything about Keel.
preflight_args=()
if [[ $BENCH_PREFLIGHT == 1 ]]; then
  "$REPO_ROOT/bench/ensure-fio.sh"
  log "preflight: fio fsync latency of $DATA_DISK (FSYNC_MAX_LAT_US=$FSYNC_MAX_LAT_US)"
  preflight_status=0
  "$KEEL_BENCH_BIN" --preflight --dir "$BENCH_DATA_ROOT" --fsync-max-lat-us "$FSYNC_MAX_LAT_US" \
    --fio-runtime "$FIO_RUNTIME" --json "$RESULTS_DIR/preflight.json" \
    | tee "$RESULTS_DIR/preflight.txt" || preflight_status=$?
  if [[ $preflight_status != 0 ]]; then
    verdict "FAILED: preflight of $NAME (exit $preflight_status): the data disk is too slow or fio failed; see preflight.txt" \
      "  data disk: $DATA_DISK"
    exit 3
  fi
  preflight_args=(--preflight-json "$RESULTS_DIR/preflight.json")
else
  log "preflight SKIPPED (BENCH_PREFLIGHT=$BENCH_PREFLIGHT): the disk's fsync latency is unknown"
  echo "preflight skipped by BENCH_PREFLIGHT=$BENCH_PREFLIGHT" >"$RESULTS_DIR/preflight.txt"
fi

# 2-4 (engine): the in-process benchmark on a fresh store in DATA_DIR, no server, no HTTP.
run_engine() {
  DATA_DIR=$(mktemp -d "$BENCH_DATA_ROOT/keel-bench-$NAME.XXXXXX")
  log "engine: batch $BENCH_BATCH x $BENCH_IN_FLIGHT in flight for $BENCH_DURATION, store in $DATA_DIR"
  local status=0
  "$KEEL_BENCH_BIN" engine --store "$DATA_DIR" --batch "$BENCH_BATCH" --duration "$BENCH_DURATION" \
    --accounts "$BENCH_ACCOUNTS" --in-flight "$BENCH_IN_FLIGHT" --payload-bytes "$BENCH_PAYLOAD_BYTES" \
    --seed "$BENCH_SEED" --ids "$BENCH_IDS" --label "$NAME" --json "$RESULTS_DIR/result.json" \
    "${preflight_args[@]}" \
    | tee "$RESULTS_DIR/summary.txt" || status=$?
  [[ $status == 0 ]] || failures+=("engine bench exited $status")
}

run_http() {
  # 2. A fresh server on a temporary data directory and a free loopback port.
  DATA_DIR=$(mktemp -d "$BENCH_DATA_ROOT/keel-bench-$NAME.XXXXXX")
  PORT=$("$KEEL_BENCH_BIN" free-port)
  URL="http://127.0.0.1:$PORT"
  serve_extra=()
  if [[ -n $KEEL_SERVE_ARGS ]]; then
    read -r -a serve_extra <<<"$KEEL_SERVE_ARGS"
  fi
  domain_args=()
  if [[ -n $BENCH_DOMAIN ]]; then
    domain_args=(--domain "$BENCH_DOMAIN")
  fi
  log "starting keel serve on $URL, data in $DATA_DIR${BENCH_DOMAIN:+, domain file $BENCH_DOMAIN}"
  "$KEEL_BIN" serve --data "$DATA_DIR" --listen "127.0.0.1:$PORT" "${domain_args[@]}" "${serve_extra[@]}" \
    >"$RESULTS_DIR/server.log" 2>&1 &
  SERVER_PID=$!
  echo "$SERVER_PID" >"$RESULTS_DIR/server.pid"
  if ! "$KEEL_BENCH_BIN" wait-ready --url "$URL" --timeout 60s; then
    tail -n 20 "$RESULTS_DIR/server.log" >&2 || true
    verdict "FAILED: $NAME: the server did not become ready; see server.log" "  data disk: $DATA_DISK"
    exit 1
  fi

  # 3. The load.
  load_args=(
    --url "$URL" --workers "$BENCH_WORKERS" --batch "$BENCH_BATCH" --duration "$BENCH_DURATION"
    --accounts "$BENCH_ACCOUNTS" --skus "$BENCH_SKUS" --mix "$BENCH_MIX"
    --payload-bytes "$BENCH_PAYLOAD_BYTES" --reject-ratio "$BENCH_REJECT_RATIO" --seed "$BENCH_SEED"
    --ids "$BENCH_IDS" --max-requests "$BENCH_MAX_REQUESTS" --label "$NAME"
    --json "$RESULTS_DIR/result.json" --sample-metrics "$RESULTS_DIR/metrics.csv"
    --sample-interval "$BENCH_SAMPLE_INTERVAL" --server-pid "$SERVER_PID" --plot-dir "$RESULTS_DIR"
    --data-dir "$DATA_DIR" "${domain_args[@]}"
  )
  if [[ -n $BENCH_RATE ]]; then
    load_args+=(--rate "$BENCH_RATE")
  fi
  if [[ $BENCH_ATOMIC == 1 ]]; then
    load_args+=(--atomic)
  fi
  log "load: $BENCH_WORKERS worker(s) x batch $BENCH_BATCH for $BENCH_DURATION"
  load_status=0
  "$KEEL_BENCH_BIN" "${load_args[@]}" "${preflight_args[@]}" \
    2> >(tee "$RESULTS_DIR/progress.log" >&2) | tee "$RESULTS_DIR/summary.txt" || load_status=$?
  [[ $load_status == 0 ]] || failures+=("load exited $load_status")

  # 4. Stop the server the way an operator would, and wait for it to drain and close the store.
  log "stopping the server (SIGTERM)"
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  stopped=0
  for _ in $(seq 1 $((BENCH_STOP_TIMEOUT_S * 10))); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      stopped=1
      break
    fi
    sleep 0.1
  done
  server_status=0
  if [[ $stopped == 1 ]]; then
    wait "$SERVER_PID" || server_status=$?
    [[ $server_status == 0 ]] || failures+=("keel serve exited $server_status after SIGTERM")
  else
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    failures+=("keel serve did not stop within ${BENCH_STOP_TIMEOUT_S}s of SIGTERM (killed)")
  fi
  SERVER_PID=
}

if [[ $BENCH_KIND == engine ]]; then
  run_engine
else
  run_http
fi

# 5. The audit: the run only counts when the store proves itself.
log "auditing $DATA_DIR"
audit_status=0
"$KEEL_BIN" audit --data "$DATA_DIR" >"$RESULTS_DIR/audit.txt" 2>&1 || audit_status=$?
audit_last=$(tail -n 1 "$RESULTS_DIR/audit.txt" | tr -d '[:space:]')
if [[ $audit_status != 0 || $audit_last != INTEGRITY_OK ]]; then
  failures+=("audit: exit $audit_status, last line '${audit_last:-<none>}' (see audit.txt)")
fi

# 6. The verdict.
if ((${#failures[@]} == 0)); then
  verdict "PASSED: $NAME (INTEGRITY_OK) on $DATA_DISK"
  exit 0
fi
verdict "FAILED: $NAME on $DATA_DISK" "${failures[@]/#/  - }"
exit 1
