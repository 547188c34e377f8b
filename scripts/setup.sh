#!/usr/bin/env bash
# Installs, idempotently, every Debian package that building, testing and the samples need.
# Safe to run again: packages already present are skipped without touching apt's lists.
set -euo pipefail

PKGS=(
  build-essential cmake ninja-build clang libclang-rt-14-dev pkg-config
  libvulkan-dev vulkan-tools mesa-vulkan-drivers
  glslang-tools spirv-tools vulkan-validationlayers
  python3 python3-numpy python3-torch
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#PKGS[@]} packages present"
  exit 0
fi

echo "setup: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
