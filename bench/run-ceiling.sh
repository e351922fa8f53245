#!/usr/bin/env bash
# bench-ceiling: the same scenario at two (or more) batch sizes, one after the other, each on a
# fresh server and audited, then a side-by-side table of the results (compare.txt).
#
# Usage: bench/run-ceiling.sh [RESULTS_DIR]
# Knobs: BENCH_CEILING_BATCHES (default "1000 2000"), and every knob of run-scenario.sh.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}
KEEL_BENCH_BIN=${KEEL_BENCH_BIN:-$CARGO_TARGET_DIR/release/keel-bench}
BASE=${1:-${RESULTS_DIR:-$REPO_ROOT/bench/results/${BENCH_RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)}-ceiling}}
BENCH_CEILING_BATCHES=${BENCH_CEILING_BATCHES:-1000 2000}

read -r -a batches <<<"$BENCH_CEILING_BATCHES"
((${#batches[@]} > 0)) || { echo "BENCH_CEILING_BATCHES is empty" >&2; exit 2; }
mkdir -p "$BASE"
status=0
specs=()
for batch in "${batches[@]}"; do
  [[ $batch =~ ^[0-9]+$ ]] || { echo "batch size '$batch' is not a number" >&2; exit 2; }
  # The result directory is passed explicitly, so RESULTS_DIR must not leak into the child.
  scenario_status=0
  RESULTS_DIR='' BENCH_BATCH=$batch "$REPO_ROOT/bench/run-scenario.sh" "ceiling-batch$batch" "$BASE/batch$batch" ||
    scenario_status=$?
  # 130: the scenario was interrupted (its VERDICT says so); the next batch size must not start.
  if ((scenario_status >= 128)); then
    echo "ceiling: interrupted during batch $batch; the remaining batch sizes did not run" >&2
    exit "$scenario_status"
  fi
  ((scenario_status == 0)) || status=1
  if [[ -f $BASE/batch$batch/result.json ]]; then
    specs+=("batch$batch=$BASE/batch$batch/result.json")
  fi
done
if ((${#specs[@]} > 0)); then
  echo
  "$KEEL_BENCH_BIN" compare "${specs[@]}" | tee "$BASE/compare.txt"
fi
for batch in "${batches[@]}"; do
  cat "$BASE/batch$batch/VERDICT" 2>/dev/null || echo "FAILED: batch $batch left no verdict"
done
exit "$status"
