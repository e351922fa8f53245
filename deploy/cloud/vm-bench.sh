#!/usr/bin/env bash
# The VM half of bench.sh, run ON the benchmark machine from the copied checkout:
#   bash deploy/cloud/vm-bench.sh RUN_ID TARGET [VAR=value ...]
# Runs `make -f bench/bench.mk TARGET VAR=value ... BENCH_RUN_ID=RUN_ID` in its own process
# group and records that group in bench/results/.run-RUN_ID.pid, so that the run can be stopped
# as a whole: by `bash deploy/cloud/vm-bench.sh --stop RUN_ID` (bench.sh does this on Ctrl-C),
# and by this script when its standard input closes (the ssh session ended: an interrupted
# bench.sh or a dropped link). A stopped scenario writes an INTERRUPTED verdict.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
mkdir -p bench/results

# Waits (at most 120 s) until process group $1 has no process left.
wait_group() {
  for _ in $(seq 1 1200); do
    kill -0 -- "-$1" 2>/dev/null || return 0
    sleep 0.1
  done
}

# Stops run group $1 (SIGTERM: the scenario writes INTERRUPTED and stops its server), waits for
# it and removes its pid file $2.
stop_run() {
  kill -TERM -- "-$1" 2>/dev/null || true
  wait_group "$1"
  rm -f "$2"
}

if [[ ${1:-} == --stop ]]; then
  run_id=${2:?usage: $0 --stop RUN_ID}
  pidfile=bench/results/.run-$run_id.pid
  if [[ -s $pidfile ]]; then
    pgid=$(cat "$pidfile")
    echo "vm-bench: stopping run $run_id (process group $pgid)" >&2
    # Returns only once the run is gone, so that the caller fetches a stopped run with its
    # INTERRUPTED verdict, and no pid file is left behind.
    stop_run "$pgid" "$pidfile"
  fi
  exit 0
fi

run_id=${1:-}
target=${2:-}
if [[ ! $run_id =~ ^[A-Za-z0-9._-]+$ || -z $target ]]; then
  echo "usage: $0 RUN_ID TARGET [VAR=value ...] | $0 --stop RUN_ID" >&2
  exit 2
fi
shift 2
if [[ -f $HOME/.cargo/env ]]; then
  # shellcheck disable=SC1091  # rustup's file, present only where rustup ran
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || {
  echo "vm-bench: no cargo on $(hostname) (nor ~/.cargo/env): run deploy/cloud/up.sh first" >&2
  exit 2
}

pidfile=bench/results/.run-$run_id.pid
# The ssh session's stdin, for the watchdog below (a background job's stdin is /dev/null).
exec 3<&0
# setsid: the run is a process group of its own (make, the scenario script, keel serve,
# keel-bench), so one signal reaches all of it.
setsid make -f bench/bench.mk "$target" "$@" "BENCH_RUN_ID=$run_id" </dev/null 3<&- &
run_pid=$!
echo "$run_pid" >"$pidfile"
# The watchdog: reads until the ssh session's stdin closes, then stops the run if it still runs
# and removes the pid file itself: the session's end may kill this script before it gets to its
# own clean-up below (seen when the VM's sshd closed bench.sh's `--stop` connection during key
# exchange and the session was cut).
(
  while read -r -u 3 _; do :; done
  if [[ -s $pidfile ]]; then
    echo "vm-bench: the ssh session ended; stopping run $run_id" >&2
    stop_run "$run_pid" "$pidfile"
  fi
) </dev/null >/dev/null 2>&1 &
watchdog_pid=$!
exec 3<&-
status=0
wait "$run_pid" || status=$?
# make exits at once when it is signalled; the scenario then still writes its verdict and stops
# its server. Wait (bounded) for the whole group, so the ssh session, and what bench.sh fetches
# after it, come after that.
wait_group "$run_pid"
rm -f "$pidfile"
kill "$watchdog_pid" 2>/dev/null || true
exit "$status"
