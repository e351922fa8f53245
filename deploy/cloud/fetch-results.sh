#!/usr/bin/env bash
# Copies the VM's bench/results/ into bench/results/cloud-<host>/ here (never deletes anything).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

DEST="$REPO_ROOT/bench/results/cloud-${KEEL_VM_HOST//[^A-Za-z0-9._-]/_}"
mkdir -p "$DEST"
if ! vm_ssh "test -d $(printf '%q' "$KEEL_VM_DIR/bench/results")"; then
  echo "fetch: $VM has no $KEEL_VM_DIR/bench/results yet" >&2
  exit 1
fi
rsync -az -e "$(rsync_rsh)" "$VM:$KEEL_VM_DIR/bench/results/" "$DEST/"
echo "fetch: results in $DEST" >&2
# The three newest verdicts.
while read -r _ verdict; do
  cat "$verdict"
done < <(find "$DEST" -name VERDICT -printf '%T@ %p\n' | sort -n | tail -n 3)
