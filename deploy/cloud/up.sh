#!/usr/bin/env bash
# Brings a benchmark VM to the point where `make bench-*` can run on it:
#   1. (optional) creates it: KEEL_VM_CREATE is a command of your cloud's CLI that starts an
#      Ubuntu VM with deploy/cloud/cloud-init.yaml as user data (examples in docs/BENCHMARKING.md);
#   2. waits for ssh on KEEL_VM_HOST and for cloud-init to finish;
#   3. copies this working tree there and builds the release binaries (make bench-build).
# It never picks an address itself: KEEL_VM_HOST is the VM you created.
set -euo pipefail

if [[ -n ${KEEL_VM_CREATE:-} ]]; then
  echo "up: creating the VM: $KEEL_VM_CREATE" >&2
  bash -c "$KEEL_VM_CREATE"
fi
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

echo "up: waiting for ssh on $VM" >&2
vm_wait_ssh 120
echo "up: waiting for cloud-init" >&2
vm_ssh 'cloud-init status --wait >/dev/null 2>&1 || true; test -f /var/lib/cloud/instance/keel-ready' || {
  echo "up: cloud-init did not finish the Keel setup (see /var/log/cloud-init-output.log on the VM)" >&2
  exit 1
}
echo "up: copying the repository to $VM:$KEEL_VM_DIR" >&2
vm_push_repo
echo "up: building release binaries on the VM (RocksDB's C++ takes a while the first time)" >&2
vm_ssh "cd $(printf '%q' "$KEEL_VM_DIR") && . \"\$HOME/.cargo/env\" && make -f bench/bench.mk bench-build"
vm_ssh 'nproc; uname -r; findmnt -no SOURCE,OPTIONS /var/lib/keel || echo "/var/lib/keel is on the root disk"'
echo "up: ready. Next: KEEL_VM_HOST=$KEEL_VM_HOST deploy/cloud/bench.sh bench-broker" >&2
