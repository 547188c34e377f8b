#!/usr/bin/env bash
# The main job on a fresh machine: install what vkg needs, build it, show the Vulkan device, and run
# the depth + segmentation sample on a bundled image with the bundled model: it writes a depth
# picture and a segmentation overlay and says where they are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p build
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$PWD/build/xdg}"
mkdir -p "$XDG_RUNTIME_DIR"
bash scripts/build.sh build/release -DCMAKE_BUILD_TYPE=Release
./build/release/tools/vkg devices
echo
./build/release/samples/depth_seg/depth_seg samples/depth_seg/images/scene_0.png --out build/depth_seg_out
echo
echo "The pictures are in build/depth_seg_out/: scene_0_depth.png (near is bright) and scene_0_seg.png"
echo "(classes over the image). Any PNG or JPEG works: build/release/samples/depth_seg/depth_seg IMAGE --out DIR"
