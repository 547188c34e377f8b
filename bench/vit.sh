#!/usr/bin/env bash
# ViT-S/14 (DINOv2, random weights, seed 0) end to end on the default Vulkan device: 224 and 518,
# batch 1 and 4, median latency, GFLOP/s and % of the device's FMA peak measured in the same run.
# Usage: bash bench/vit.sh [--runs N]   (figures go to stdout and build/bench/vit.json)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=5
[ "${1:-}" = "--runs" ] && runs=$2
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$PWD/build/xdg}"
mkdir -p "$XDG_RUNTIME_DIR" build/bench
bash scripts/build.sh build/release -DCMAKE_BUILD_TYPE=Release > /dev/null
vkg=build/release/tools/vkg
for size in 224 518; do
  f=build/bench/vits14_$size.vkg
  [ -f "$f" ] || PYTHONPATH=tools/python /usr/bin/python3 -m vkg dinov2 random:0 --arch vits14 \
      --image-size $size $size --taps 12 --norm -o "$f" > /dev/null
done
peak=$($vkg bench --kernels --reps 5 --json build/bench/peak.json | awk '/fp32 FMA peak/ {print $4}')
echo "device FMA peak (this run): $peak GFLOP/s"
printf '%-6s %-6s %12s %12s %10s %8s\n' size batch "median ms" "p90 ms" "GFLOP/s" "% peak"
json="["
for size in 224 518; do
  for batch in 1 4; do
    r=$runs
    [ $size = 518 ] && [ $batch = 4 ] && r=$(( runs < 3 ? runs : 3 ))
    out=$($vkg bench build/bench/vits14_$size.vkg --dim batch=$batch --runs $r --warmup 1)
    med=$(echo "$out" | awk '/latency/ {print $3}')
    p90=$(echo "$out" | awk '/latency/ {print $6}')
    gf=$(echo "$out" | awk '/throughput/ {print $2}')
    pct=$(awk -v g="$gf" -v p="$peak" 'BEGIN {printf "%.1f", 100 * g / p}')
    printf '%-6s %-6s %12s %12s %10s %8s\n' $size $batch "$med" "$p90" "$gf" "$pct"
    json="$json{\"name\": \"vits14\", \"image\": $size, \"batch\": $batch, \"runs\": $r, \"ms\": $med, \"p90_ms\": $p90, \"gflops\": $gf, \"pct_fma_peak\": $pct, \"fma_peak\": $peak},"
  done
done
echo "${json%,}]" > build/bench/vit.json
