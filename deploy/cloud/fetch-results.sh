#!/usr/bin/env bash
# Copies the VM's bench/results/ into bench/results/cloud-<host>/ here (never deletes anything)
# and prints verdicts:
#   deploy/cloud/fetch-results.sh           every result folder's verdict, oldest first
#   deploy/cloud/fetch-results.sh RUN_ID    only the folders of that run (bench.sh passes its own)
# A result folder (one holding scenario.env) without a VERDICT is flagged: its scenario was
# interrupted before it could write one, or still runs; its numbers are not a result. The exit
# status is 1 when a reported folder has no VERDICT or when RUN_ID has no folder.
set -euo pipefail
RUN_ID=${1:-}
if [[ -n $RUN_ID && ! $RUN_ID =~ ^[A-Za-z0-9._-]+$ ]]; then
  echo "usage: $0 [RUN_ID]" >&2
  exit 2
fi
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# KEEL_FETCH_DIR: where the copy goes (default bench/results/cloud-<host>).
DEST=${KEEL_FETCH_DIR:-$REPO_ROOT/bench/results/cloud-${KEEL_VM_HOST//[^A-Za-z0-9._-]/_}}
mkdir -p "$DEST"
if ! vm_ssh "test -d $(vm_dir_quoted)/bench/results" </dev/null; then
  echo "fetch: $VM has no $KEEL_VM_DIR/bench/results yet" >&2
  exit 1
fi
rsync -az --exclude '.run-*.pid' -e "$(rsync_rsh)" "$VM:$KEEL_VM_DIR/bench/results/" "$DEST/"
echo "fetch: results in $DEST" >&2

# The folders to report: this run's, or all of them; a ceiling run nests one per batch size.
folders=()
while IFS= read -r -d '' env_file; do
  folders+=("$(dirname "$env_file")")
done < <(
  if [[ -n $RUN_ID ]]; then
    find "$DEST" -mindepth 2 -maxdepth 3 -path "$DEST/$RUN_ID-*" -name scenario.env -print0
  else
    find "$DEST" -mindepth 2 -maxdepth 3 -name scenario.env -print0
  fi | sort -z
)
if ((${#folders[@]} == 0)); then
  if [[ -n $RUN_ID ]]; then
    echo "fetch: run $RUN_ID left no result folder on $VM (it stopped before its scenario started)" >&2
    exit 1
  fi
  echo "fetch: no result folders yet" >&2
  exit 0
fi
status=0
for folder in "${folders[@]}"; do
  if [[ -s $folder/VERDICT ]]; then
    printf '%s\n  (local copy: %s)\n' "$(cat "$folder/VERDICT")" "$folder"
  else
    echo "NO VERDICT: $folder: the scenario did not finish (interrupted or still running); not a result"
    status=1
  fi
done
exit "$status"
