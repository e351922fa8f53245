#!/usr/bin/env bash
# Runs one make benchmark scenario on the VM and brings its results back:
#   deploy/cloud/bench.sh bench-broker        (or bench, bench-ceiling, bench-dense, bench-engine, preflight)
# The load runs ON the VM against the VM's own loopback (keel-bench refuses other targets), with
# the temporary stores on the data disk (BENCH_DATA_ROOT=/var/lib/keel/bench). Every BENCH_*,
# FSYNC_MAX_LAT_US, FIO_RUNTIME and KEEL_SERVE_ARGS variable set here is passed along.
set -euo pipefail

SCENARIO=${1:-}
case $SCENARIO in
  bench | bench-broker | bench-ceiling | bench-dense | bench-engine | preflight) ;;
  *)
    echo "usage: $0 bench|bench-broker|bench-ceiling|bench-dense|bench-engine|preflight" >&2
    exit 2
    ;;
esac
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

make_vars=("BENCH_DATA_ROOT=${BENCH_DATA_ROOT:-/var/lib/keel/bench}")
while IFS='=' read -r name _; do
  case $name in
    BENCH_DATA_ROOT) ;;
    BENCH_* | FSYNC_MAX_LAT_US | FIO_RUNTIME | KEEL_SERVE_ARGS) make_vars+=("$name=${!name}") ;;
  esac
done < <(env)

remote="cd $(printf '%q' "$KEEL_VM_DIR") && . \"\$HOME/.cargo/env\" && make -f bench/bench.mk $SCENARIO"
for var in "${make_vars[@]}"; do
  remote+=" $(printf '%q' "$var")"
done

echo "bench: pushing the working tree to $VM" >&2
vm_push_repo
echo "bench: running on $VM: $remote" >&2
status=0
vm_ssh "$remote" || status=$?
"$(dirname "${BASH_SOURCE[0]}")/fetch-results.sh" || status=1
if [[ $status != 0 ]]; then
  echo "bench: $SCENARIO FAILED on $VM (exit $status); the fetched results say why" >&2
fi
exit "$status"
