#!/usr/bin/env bash
# The main job on a fresh machine: install what vkg needs, build it, show the Vulkan device and
# run a short matmul benchmark on it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p build
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$PWD/build/xdg}"
mkdir -p "$XDG_RUNTIME_DIR"
bash scripts/build.sh build/release -DCMAKE_BUILD_TYPE=Release
./build/release/tools/vkg devices
./build/release/tools/vkg bench --kernels --quick --matmul-only
