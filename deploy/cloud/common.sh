#!/usr/bin/env bash
# Shared by up.sh, bench.sh and fetch-results.sh: the VM's ssh address and helpers.
#   KEEL_VM_HOST      the VM's address (required; the scripts never guess one)
#   KEEL_VM_USER      login user (default: ubuntu)
#   KEEL_VM_PORT      ssh port (default: 22)
#   KEEL_VM_KEY       private key file (default: ~/.ssh/id_ed25519 when it exists; otherwise ssh's
#                     own choice: agent, ~/.ssh/config)
#   KEEL_VM_SSH_OPTS  more ssh options, split on spaces, e.g. "-o ProxyJump=bastion -o
#                     UserKnownHostsFile=~/.ssh/keel_hosts" (used by ssh and by rsync's ssh)
#   KEEL_VM_DIR       checkout directory on the VM, relative to the user's home or absolute
#                     (default: keel)
# Needed on THIS machine: bash, ssh and rsync (docs/BENCHMARKING.md, "Before you start").
# shellcheck disable=SC2034  # variables are used by the scripts that source this file

if [[ -z ${KEEL_VM_HOST:-} ]]; then
  echo "KEEL_VM_HOST is not set: export KEEL_VM_HOST=<the VM's address> (and KEEL_VM_USER, KEEL_VM_KEY, KEEL_VM_PORT)" >&2
  exit 2
fi
KEEL_VM_USER=${KEEL_VM_USER:-ubuntu}
KEEL_VM_PORT=${KEEL_VM_PORT:-22}
KEEL_VM_DIR=${KEEL_VM_DIR:-keel}
KEEL_VM_SSH_OPTS=${KEEL_VM_SSH_OPTS:-}
if [[ ! $KEEL_VM_PORT =~ ^[0-9]+$ ]] || ((KEEL_VM_PORT < 1 || KEEL_VM_PORT > 65535)); then
  echo "KEEL_VM_PORT=$KEEL_VM_PORT is not a port number (1-65535)" >&2
  exit 2
fi
key_opts=()
if [[ -n ${KEEL_VM_KEY:-} ]]; then
  # A key named explicitly must be there: a typo would otherwise fall back to another identity.
  if [[ ! -r $KEEL_VM_KEY ]]; then
    echo "KEEL_VM_KEY=$KEEL_VM_KEY is not a readable private key file" >&2
    exit 2
  fi
  key_opts=(-i "$KEEL_VM_KEY")
elif [[ -r $HOME/.ssh/id_ed25519 ]]; then
  KEEL_VM_KEY=$HOME/.ssh/id_ed25519
  key_opts=(-i "$KEEL_VM_KEY")
fi

# The local prerequisites, with how to get them (the VM's are checked by vm-prepare.sh).
missing_local_tool() {
  local tool=$1
  echo "$tool is required on this machine (the one you run deploy/cloud/*.sh from) and is not on PATH." >&2
  case $tool in
    ssh) echo "  Debian/Ubuntu: sudo apt-get install openssh-client; Fedora: sudo dnf install openssh-clients; macOS: built in" >&2 ;;
    rsync) echo "  Debian/Ubuntu: sudo apt-get install rsync; Fedora: sudo dnf install rsync; macOS: brew install rsync" >&2 ;;
  esac
  exit 2
}
for tool in ssh rsync; do
  command -v "$tool" >/dev/null 2>&1 || missing_local_tool "$tool"
done

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
extra_ssh_opts=()
if [[ -n $KEEL_VM_SSH_OPTS ]]; then
  read -r -a extra_ssh_opts <<<"$KEEL_VM_SSH_OPTS"
fi
SSH_OPTS=("${key_opts[@]}" -p "$KEEL_VM_PORT" -o BatchMode=yes -o ConnectTimeout=10
  -o StrictHostKeyChecking=accept-new -o ServerAliveInterval=30 -o ServerAliveCountMax=6
  "${extra_ssh_opts[@]}")
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

# The checkout directory quoted for the remote shell: relative paths stay relative to the home.
vm_dir_quoted() {
  printf '%q' "$KEEL_VM_DIR"
}

# Copies the working tree to the VM (no build outputs, no results, no local data).
vm_push_repo() {
  vm_ssh "mkdir -p $(vm_dir_quoted)" </dev/null
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
  echo "no ssh on $VM port $KEEL_VM_PORT after $((tries * 5)) s" >&2
  return 1
}

# The environment a user gave, as a command prefix for the "next step" hints.
vm_env_hint() {
  local hint var
  hint="KEEL_VM_HOST=$(printf '%q' "$KEEL_VM_HOST")"
  for var in KEEL_VM_USER KEEL_VM_PORT KEEL_VM_KEY KEEL_VM_SSH_OPTS KEEL_VM_DIR; do
    case $var in
      KEEL_VM_USER) [[ $KEEL_VM_USER == ubuntu ]] && continue ;;
      KEEL_VM_PORT) [[ $KEEL_VM_PORT == 22 ]] && continue ;;
      KEEL_VM_DIR) [[ $KEEL_VM_DIR == keel ]] && continue ;;
    esac
    [[ -n ${!var:-} ]] && hint+=" $var=$(printf '%q' "${!var}")"
  done
  printf '%s' "$hint"
}
