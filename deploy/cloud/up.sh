#!/usr/bin/env bash
# Brings a benchmark machine to the point where `make bench-*` can run on it:
#   1. (optional) creates it: KEEL_VM_CREATE is a command of your cloud's CLI that starts an
#      Ubuntu VM with deploy/cloud/cloud-init.yaml as user data (examples in docs/BENCHMARKING.md);
#   2. waits for ssh on KEEL_VM_HOST and, where cloud-init runs, for it to finish;
#   3. copies this working tree there and runs deploy/cloud/vm-prepare.sh on it: every
#      prerequisite checked (with the command that installs what is missing), the data directory
#      checked, the release binaries built, the machine's facts printed.
# Any Debian/Ubuntu host reachable over ssh works: a VM from cloud-init.yaml, another VM, bare
# metal, a laptop. It never picks an address itself: KEEL_VM_HOST is the machine you chose.
set -euo pipefail

if [[ -n ${KEEL_VM_CREATE:-} ]]; then
  echo "up: creating the VM: $KEEL_VM_CREATE" >&2
  bash -c "$KEEL_VM_CREATE"
fi
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

echo "up: waiting for ssh on $VM port $KEEL_VM_PORT" >&2
vm_wait_ssh 120
# cloud-init installs the packages and mounts the data disk; on a host without it, there is
# nothing to wait for. A failed cloud-init is reported, and the checks below say what is missing.
if vm_ssh 'command -v cloud-init >/dev/null 2>&1' </dev/null; then
  echo "up: waiting for cloud-init" >&2
  vm_ssh 'cloud-init status --wait >/dev/null 2>&1' </dev/null ||
    echo "up: WARNING: cloud-init reports an error (see /var/log/cloud-init-output.log on $KEEL_VM_HOST); checking the prerequisites anyway" >&2
fi
if ! vm_ssh 'command -v rsync >/dev/null 2>&1' </dev/null; then
  echo "up: rsync is missing on $KEEL_VM_HOST (needed to copy the tree there): ssh in and run" >&2
  echo "      sudo apt-get update && sudo apt-get install -y rsync" >&2
  exit 1
fi
echo "up: copying the repository to $VM:$KEEL_VM_DIR" >&2
vm_push_repo
data_root=${BENCH_DATA_ROOT:-/var/lib/keel/bench}
vm_ssh "cd $(vm_dir_quoted) && BENCH_DATA_ROOT=$(printf '%q' "$data_root") bash deploy/cloud/vm-prepare.sh" </dev/null
echo "up: ready. Next: $(vm_env_hint) deploy/cloud/bench.sh bench-broker" >&2
