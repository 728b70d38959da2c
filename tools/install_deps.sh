#!/usr/bin/env bash
# Installs the Debian 12 packages flashcpu's build, tests, benchmarks and tools need,
# and only those that are missing (checked with dpkg -s first, so a second run is
# instant and touches nothing). Takes no arguments. Needs root, or sudo.
#
#   bash tools/install_deps.sh
set -euo pipefail

packages=(
  cmake ninja-build g++ pkg-config
  libxsimd-dev catch2 libbenchmark-dev
  libopenblas-dev python3-matplotlib
  clang-14 libomp-14-dev  # the ThreadSanitizer run: clang with LLVM's OpenMP and Archer
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg -s "$p" >/dev/null 2>&1 || ! dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed'; then
    missing+=("$p")
  fi
done

if [ "${#missing[@]}" -eq 0 ]; then
  echo "install_deps: all packages present (${packages[*]})"
  exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    echo "install_deps: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
fi

echo "install_deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update
"${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
echo "install_deps: done"
