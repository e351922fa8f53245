#!/usr/bin/env bash
# Shared by up.sh, bench.sh and fetch-results.sh: the VM's ssh address and helpers.
#   KEEL_VM_HOST  the VM's address (required; the scripts never guess one)
#   KEEL_VM_USER  login user (default: ubuntu)
#   KEEL_VM_KEY   private key file (default: ~/.ssh/id_ed25519)
#   KEEL_VM_DIR   checkout directory on the VM, relative to the user's home (default: keel)
# shellcheck disable=SC2034  # variables are used by the scripts that source this file

if [[ -z ${KEEL_VM_HOST:-} ]]; then
  echo "KEEL_VM_HOST is not set: export KEEL_VM_HOST=<the VM's address> (and KEEL_VM_USER, KEEL_VM_KEY)" >&2
  exit 2
fi
KEEL_VM_USER=${KEEL_VM_USER:-ubuntu}
KEEL_VM_KEY=${KEEL_VM_KEY:-$HOME/.ssh/id_ed25519}
KEEL_VM_DIR=${KEEL_VM_DIR:-keel}
if [[ ! -r $KEEL_VM_KEY ]]; then
  echo "KEEL_VM_KEY=$KEEL_VM_KEY is not a readable private key file" >&2
  exit 2
fi
for tool in ssh rsync; do
  command -v "$tool" >/dev/null 2>&1 || { echo "$tool is required on this machine" >&2; exit 2; }
done

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
SSH_OPTS=(-i "$KEEL_VM_KEY" -o BatchMode=yes -o ConnectTimeout=10 -o StrictHostKeyChecking=accept-new
  -o ServerAliveInterval=30 -o ServerAliveCountMax=6)
VM="$KEEL_VM_USER@$KEEL_VM_HOST"

vm_ssh() {
  # shellcheck disable=SC2029  # the remote command is built (and quoted) on this side on purpose
  ssh "${SSH_OPTS[@]}" "$VM" "$@"
}

# The ssh command rsync should use, with every option quoted.
rsync_rsh() {
  printf 'ssh'
  printf ' %q' "${SSH_OPTS[@]}"
}

# Copies the working tree to the VM (no build outputs, no results, no local data).
vm_push_repo() {
  rsync -az --delete \
    --exclude /target/ --exclude /bench/results/ --exclude /data/ --exclude '*.log' \
    -e "$(rsync_rsh)" "$REPO_ROOT/" "$VM:$KEEL_VM_DIR/"
}

# Waits (bounded) until ssh answers.
vm_wait_ssh() {
  local tries=${1:-60}
  for ((i = 1; i <= tries; i++)); do
    if vm_ssh true 2>/dev/null; then
      return 0
    fi
    sleep 5
  done
  echo "no ssh on $VM after $((tries * 5)) s" >&2
  return 1
}
