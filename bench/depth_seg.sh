#!/usr/bin/env bash
# The S1 depth + segmentation model (issue 7, point 6): DINOv2 ViT-S/14 with MoE-LoRA FFNs (E 8,
# top-2, rank 8), the DPT depth head and the pyramid BN seg head (150 classes), random weights
# (seed 0), batch 1, at 224x224 and 518x518. vkg (`vkg bench --profile`: latency, and the GPU time
# split into backbone, depth head and seg head by node name) and PyTorch on the CPU (the same
# module, vkg.depth_seg.DepthSegModel with its shared-base MoE-LoRA path, torch.no_grad, one thread
# per CPU), alternating in rounds in one run of this script.
#
# Usage: bash bench/depth_seg.sh [--sizes "224 518"] [--runs N] [--rounds R] [--fp16]
#   --runs N    timed runs per runtime and round (default 3; vkg after 1 warm-up, PyTorch after 1)
#   --rounds R  rounds of (vkg, PyTorch) per size (default 2); each runtime's fastest round is
#               reported (other jobs on a shared CPU slow both down in bursts)
#   --fp16      f16 weights in the vkg graph (default f32, as PyTorch)
# Environment: VKG=path/to/vkg skips the release build. Writes build/bench/depth_seg_*.txt and
# build/bench/depth_seg.json.
set -euo pipefail
cd "$(dirname "$0")/.."
sizes="224 518"
runs=3
rounds=2
fp16=
while [ $# -gt 0 ]; do
  case "$1" in
    --sizes) sizes=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --fp16) fp16=--fp16; shift ;;
    *) echo "usage: bash bench/depth_seg.sh [--sizes \"224 518\"] [--runs N] [--rounds R] [--fp16]" >&2; exit 2 ;;
  esac
done
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$PWD/build/xdg}"
mkdir -p "$XDG_RUNTIME_DIR" build/bench
if [ -z "${VKG:-}" ]; then
  bash scripts/build.sh build/release -DCMAKE_BUILD_TYPE=Release > /dev/null
  VKG=build/release/tools/vkg
fi
py=/usr/bin/python3
wt=$([ -n "$fp16" ] && echo f16 || echo f32)
model_args=(--arch vits14 --experts 8 --top-k 2 --lora-rank 8 --lora-alpha 16 --classes 150 --seg-head pyramid)
for s in $sizes; do
  f=build/bench/depth_seg_vits14_${s}_${wt}.vkg
  if [ ! -f "$f" ]; then
    PYTHONPATH=tools/python $py -m vkg depth-seg random:0 "${model_args[@]}" --image-size "$s" "$s" \
        $fp16 -o "$f.tmp" > /dev/null
    mv "$f.tmp" "$f"
  fi
done
for s in $sizes; do
  for r in $(seq 1 "$rounds"); do
    "$VKG" bench "build/bench/depth_seg_vits14_${s}_${wt}.vkg" --runs "$runs" --warmup 1 --profile \
        > "build/bench/depth_seg_vkg_${s}_${wt}_r$r.txt"
    PYTHONPATH=tools/python $py - "$s" "$runs" > "build/bench/depth_seg_torch_${s}_r$r.txt" <<'EOF'
import os, sys, time
import torch
from vkg import depth_seg
s, runs = int(sys.argv[1]), int(sys.argv[2])
torch.set_num_threads(os.cpu_count())
m = depth_seg.build_model("vits14", seed=0, experts=8, top_k=2, lora_rank=8, lora_alpha=16,
                          classes=150, seg_head="pyramid")
m.set_moe_path(True)    # the shared-base MoE-LoRA algebra: the same function, PyTorch's fastest form
x = torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0))
ts = []
with torch.no_grad():
    m(x)                                   # warm-up
    for _ in range(runs):
        t0 = time.perf_counter()
        m(x)
        ts.append((time.perf_counter() - t0) * 1e3)
ts.sort()
print("torch %s threads %d median_ms %.3f" % (torch.__version__, torch.get_num_threads(), ts[len(ts) // 2]))
EOF
  done
done
$py - "$sizes" "$wt" "$runs" "$rounds" "$VKG" <<'EOF'
import json, re, sys
sizes, wt, runs, rounds, vkg = sys.argv[1].split(), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]

def stage(node):
    """vkg.depth_seg's node names: depth_head.* / depth.*: depth head; seg_head.* / seg_*: seg
    head; the rest (patch embed, blocks, norm, the taps' token slices): backbone."""
    if node.startswith("depth"):
        return "depth_head"
    if node.startswith("seg"):
        return "seg_head"
    return "backbone"

def parse_vkg(path):
    lat, device, split, n = None, "", {"backbone": 0.0, "depth_head": 0.0, "seg_head": 0.0}, 0
    for line in open(path):
        m = re.search(r"latency\s+median\s+([0-9.]+)\s*ms", line)
        if m:
            lat = float(m.group(1))
        m = re.search(r" on (.*): \d+ runs", line)
        if m:
            device = m.group(1)
        m = re.match(r"^(\d+)\s+(\S+)\s+(\S+)\s+([0-9.]+)\s*$", line)
        if m:
            split[stage(m.group(2))] += float(m.group(4)) / 1e3
            n += 1
    return dict(latency_ms=lat, device=device, gpu_ms=split, dispatches=n)

def parse_torch(path):
    m = re.search(r"torch (\S+) threads (\d+) median_ms ([0-9.]+)", open(path).read())
    return dict(version=m.group(1), threads=int(m.group(2)), latency_ms=float(m.group(3)))

res = {"weights": wt, "runs": runs, "rounds": rounds, "vkg": vkg, "sizes": {}}
print("S1 depth + seg (ViT-S/14, MoE-LoRA E8 top-2 r8, DPT, pyramid BN head 150 classes), batch 1, "
      "random weights; vkg %s weights; medians of %d runs, each runtime's fastest of %d rounds"
      % (wt, runs, rounds))
print("%-6s %12s %12s %12s %12s %14s %10s" % ("size", "vkg ms", "backbone", "depth head", "seg head",
                                             "PyTorch CPU ms", "vkg/torch"))
for s in sizes:
    v = [parse_vkg("build/bench/depth_seg_vkg_%s_%s_r%d.txt" % (s, wt, r)) for r in range(1, rounds + 1)]
    t = [parse_torch("build/bench/depth_seg_torch_%s_r%d.txt" % (s, r)) for r in range(1, rounds + 1)]
    bv, bt = min(v, key=lambda x: x["latency_ms"]), min(t, key=lambda x: x["latency_ms"])
    g = bv["gpu_ms"]
    print("%-6s %12.1f %12.1f %12.1f %12.1f %14.1f %10.2f"
          % (s, bv["latency_ms"], g["backbone"], g["depth_head"], g["seg_head"], bt["latency_ms"],
             bv["latency_ms"] / bt["latency_ms"]))
    res["sizes"][s] = dict(vkg=bv, torch=bt, vkg_rounds=v, torch_rounds=t)
dev = res["sizes"][sizes[0]]["vkg"]["device"]
tv = res["sizes"][sizes[0]]["torch"]
print("vkg on %s; PyTorch %s on the CPU with %d threads; backbone / heads: GPU time from the "
      "per-dispatch timestamps (their sum exceeds the latency's share by the timestamps' cost)"
      % (dev, tv["version"], tv["threads"]))
json.dump(res, open("build/bench/depth_seg.json", "w"), indent=1)
EOF
