#!/usr/bin/env bash
# Runs one make benchmark scenario on the VM and brings its results back:
#   deploy/cloud/bench.sh bench-broker        (or bench, bench-ceiling, bench-dense, bench-engine, preflight)
# The load runs ON the VM against the VM's own loopback (keel-bench refuses other targets), with
# the temporary stores and the preflight on the data disk (BENCH_DATA_ROOT, default
# /var/lib/keel/bench). Every non-empty BENCH_*, FSYNC_MAX_LAT_US, FIO_RUNTIME and KEEL_SERVE_ARGS
# variable set here is passed along.
#
# Ctrl-C (or SIGTERM, or a lost terminal) stops the run ON THE VM too: the remote run is a process
# group that deploy/cloud/vm-bench.sh stops on request and when the ssh session ends; the
# scenario then writes an INTERRUPTED verdict, which is fetched and printed. The exit status is
# 130 after an interrupt.
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

# The VM's data disk unless the user named another directory. Empty variables (the make path
# exports every knob, set or not) are not forwarded: the scenario's defaults apply.
make_vars=("BENCH_DATA_ROOT=${BENCH_DATA_ROOT:-/var/lib/keel/bench}")
while IFS='=' read -r name _; do
  case $name in
    BENCH_DATA_ROOT | BENCH_RUN_ID) ;;
    BENCH_* | FSYNC_MAX_LAT_US | FIO_RUNTIME | KEEL_SERVE_ARGS)
      [[ -n ${!name:-} ]] && make_vars+=("$name=${!name}")
      ;;
  esac
done < <(env)

# One id per run: its result folders on the VM are <RUN_ID>-<scenario>, and only their verdicts
# are reported below.
RUN_ID=$(date -u +%Y%m%dT%H%M%SZ)-$$
remote="cd $(vm_dir_quoted) && bash deploy/cloud/vm-bench.sh $RUN_ID $SCENARIO"
for var in "${make_vars[@]}"; do
  remote+=" $(printf '%q' "$var")"
done

interrupted=
trap 'interrupted=1' INT TERM HUP

echo "bench: pushing the working tree to $VM" >&2
status=0
vm_push_repo || status=$?
if [[ -n $interrupted ]]; then
  echo "bench: interrupted before the run started; nothing ran on $VM" >&2
  exit 130
fi
if [[ $status != 0 ]]; then
  echo "bench: copying the working tree to $VM failed (exit $status)" >&2
  exit "$status"
fi

echo "bench: run $RUN_ID on $VM: $remote" >&2
# ssh's stdin is a pipe that stays open while this script runs: the VM side stops the run when it
# closes (this script killed, the link dropped). A background job, so that a signal here is
# handled at once (the trap) instead of after ssh returns.
exec {keepalive}< <(exec sleep 2147483647)
keepalive_pid=$!
vm_ssh "$remote" <&"$keepalive" &
ssh_pid=$!
status=
while [[ -z $status ]]; do
  if [[ -n $interrupted ]]; then
    echo "bench: interrupted: stopping run $RUN_ID on $VM" >&2
    # Up to 3 tries: a new connection made while the first session is being torn down can be
    # closed by the VM's sshd during key exchange (seen on a quiet machine); the VM side also
    # stops the run by itself when the session ends, but only a stop that returned means the
    # run is gone.
    for attempt in 1 2 3; do
      vm_ssh "cd $(vm_dir_quoted) && bash deploy/cloud/vm-bench.sh --stop $RUN_ID" </dev/null && break
      echo "bench: stop request $attempt of 3 failed; retrying" >&2
      sleep 1
    done
    # The scenario writes its INTERRUPTED verdict and stops its server; bounded wait.
    for _ in $(seq 1 600); do
      kill -0 "$ssh_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill "$ssh_pid" 2>/dev/null || true
    wait "$ssh_pid" 2>/dev/null || true
    status=130
  elif wait "$ssh_pid" 2>/dev/null; then
    status=0
  else
    rc=$?
    # A trapped signal also ends `wait` (status > 128) while ssh still runs: loop to the branch above.
    kill -0 "$ssh_pid" 2>/dev/null || status=$rc
  fi
done
kill "$keepalive_pid" 2>/dev/null || true
exec {keepalive}<&-

"$(dirname "${BASH_SOURCE[0]}")/fetch-results.sh" "$RUN_ID" || { [[ $status != 0 ]] || status=1; }
if [[ -n $interrupted ]]; then
  echo "bench: $SCENARIO INTERRUPTED on $VM: the run was stopped; its results are not a benchmark" >&2
  exit 130
fi
if [[ $status != 0 ]]; then
  echo "bench: $SCENARIO FAILED on $VM (exit $status); the fetched results say why" >&2
fi
exit "$status"
