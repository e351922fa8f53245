#!/usr/bin/env bash
# Makes sure fio is installed for the fsync preflight: installs it with apt-get (Debian, Ubuntu)
# when missing, as root or through sudo. Other systems: install fio with their package manager.
set -euo pipefail

FIO=${FIO:-fio}
if command -v "$FIO" >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "fio is missing and apt-get is not available: install fio with your package manager" >&2
  exit 1
fi
sudo=()
if [[ $(id -u) != 0 ]]; then
  sudo=(sudo)
fi
echo "fio is missing: installing it with apt-get" >&2
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq fio
command -v "$FIO" >/dev/null 2>&1 || { echo "fio is still missing after apt-get install" >&2; exit 1; }
