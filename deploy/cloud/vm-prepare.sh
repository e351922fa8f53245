#!/usr/bin/env bash
# The VM half of up.sh, run ON the benchmark machine from the copied checkout:
#   bash deploy/cloud/vm-prepare.sh
# Works on any Debian/Ubuntu host (a VM from cloud-init.yaml, another VM, bare metal, a laptop):
# checks every prerequisite and names the missing ones with the command that installs them,
# checks the data directory, builds the release binaries and prints the machine's facts.
#   BENCH_DATA_ROOT   where the benchmark stores and the preflight go (default /var/lib/keel/bench,
#                     the data disk cloud-init.yaml mounts at /var/lib/keel)
#   KEEL_PREPARE_BUILD=0  check only, do not build
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
BENCH_DATA_ROOT=${BENCH_DATA_ROOT:-/var/lib/keel/bench}
KEEL_PREPARE_BUILD=${KEEL_PREPARE_BUILD:-1}
host=$(hostname 2>/dev/null || echo "this host")

# rustup installs into ~/.cargo; a distro cargo is on PATH already.
if [[ -f $HOME/.cargo/env ]]; then
  # shellcheck disable=SC1091  # rustup's file, present only where rustup ran
  . "$HOME/.cargo/env"
fi

deb_installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -qx 'install ok installed'
}

missing_packages=()
problems=()
# Debian packages checked by exact name (dpkg status), like the Makefile's deps-build.
if command -v dpkg-query >/dev/null 2>&1; then
  for pkg in build-essential libclang-dev make fio rsync git fonts-dejavu-core util-linux; do
    deb_installed "$pkg" || missing_packages+=("$pkg")
  done
else
  problems+=("no dpkg-query: not a Debian/Ubuntu host; install by hand: a C++ compiler, make, libclang, fio, rsync, git, the DejaVu Sans font")
fi

rust_min=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
if ! command -v cargo >/dev/null 2>&1; then
  problems+=("no cargo on PATH (nor ~/.cargo/env): install Rust >= $rust_min with rustup:
      curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal")
else
  rust_have=$(rustc --version 2>/dev/null | awk '{print $2}')
  if [[ -z $rust_have || $(printf '%s\n%s\n' "$rust_min" "$rust_have" | sort -V | head -n 1) != "$rust_min" ]]; then
    problems+=("rustc ${rust_have:-unknown} is older than the workspace's rust-version $rust_min (a distro cargo often is): install rustup (above) or upgrade")
  fi
fi

if [[ ! -d $BENCH_DATA_ROOT ]]; then
  problems+=("BENCH_DATA_ROOT=$BENCH_DATA_ROOT does not exist: mount the data disk at /var/lib/keel (cloud-init.yaml's keel-mount-data-disk does), then
      sudo install -d -o $(id -un) -g $(id -gn) $BENCH_DATA_ROOT
    or pick a directory on the disk to measure with BENCH_DATA_ROOT=...")
elif [[ ! -w $BENCH_DATA_ROOT ]]; then
  problems+=("BENCH_DATA_ROOT=$BENCH_DATA_ROOT is not writable by $(id -un): sudo chown $(id -un) $BENCH_DATA_ROOT")
fi

if ((${#missing_packages[@]} > 0)); then
  problems+=("missing packages: ${missing_packages[*]}
      sudo apt-get update && sudo apt-get install -y ${missing_packages[*]}")
fi
if ((${#problems[@]} > 0)); then
  echo "prepare: $host is not ready for the benchmarks:" >&2
  printf '  - %s\n' "${problems[@]}" >&2
  exit 1
fi

if [[ $KEEL_PREPARE_BUILD == 1 ]]; then
  echo "prepare: building the release binaries on $host (RocksDB's C++ takes a while the first time)" >&2
  make -f bench/bench.mk bench-build
fi

# The facts a result depends on, labelled.
echo "cores: $(nproc)"
echo "kernel: $(uname -r)"
echo "rustc: $(rustc --version 2>/dev/null || echo unknown)"
device=unknown fstype=unknown mount=unknown
read -r device fstype mount < <(findmnt -no SOURCE,FSTYPE,TARGET --target "$BENCH_DATA_ROOT" 2>/dev/null) || true
echo "data disk: $device ($fstype, mounted at $mount) for $BENCH_DATA_ROOT"
if [[ $mount == / ]]; then
  echo "prepare: WARNING: $BENCH_DATA_ROOT is on the root filesystem, not a separate data disk" >&2
fi
