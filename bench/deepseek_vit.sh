#!/usr/bin/env bash
# DeepSeek-MoE ViT-H/14 (issue 9, point 5): 224x224 input (257 tokens), batch 1, random weights
# (seed 0). The encoder with the DeepSeek FFN (E 128, w 40, S 4, M 4: 4 shared + 4 of 124 routed
# experts per token) against the same encoder with its dense 5120-wide FFN, both exported and
# benchmarked with `vkg bench --profile` in the same run. Prints latency in total and per block, the
# FFN's GPU time per block, the share of routing + dispatch + combine, and the measured FFN speed-up
# against the 13.3x reduction in FFN arithmetic of model-spec §2.5.
#
# Usage: bash bench/deepseek_vit.sh [--depth L] [--runs N] [--rounds R] [--fp32]
#   --depth L   encoder blocks (default 32, ViT-H's depth)
#   --runs N    timed runs per encoder and round, after one warm-up (default 3)
#   --rounds R  rounds of (DeepSeek, dense), alternating (default 3); each encoder's summary is
#               its fastest round (other jobs on a shared CPU slow lavapipe down in bursts; the
#               attention part, identical in both encoders, is printed per round as a load check)
#   --fp32      f32 weights (default f16 weights: 32 f32 blocks are 2.5 GB, more than lavapipe's
#               2 GiB device heap; the routers, norms and biases are f32 either way)
# Environment: VKG=path/to/vkg skips the release build (default: build/release/tools/vkg, built
# here as bench/vit.sh does). Writes build/bench/deepseek_vit_{moe,dense}_*.txt (the profiles) and
# build/bench/deepseek_vit.json.
#
# Routing + dispatch + combine is read from the profile (GPU timestamps per dispatch; `vkg bench`
# prints each dispatch's node and op): every dispatch of the `moe_router` node (the logits matmul,
# moe_select) and, of each `moe_experts` node's dispatches, the first three (moe_hist, moe_scan,
# moe_scatter) and the last (moe_combine); what is left of that node is the two grouped expert
# matmuls (fc1 with GELU, fc2 times the gates).
set -euo pipefail
cd "$(dirname "$0")/.."
depth=32
runs=3
rounds=3
fp16=--fp16
while [ $# -gt 0 ]; do
  case "$1" in
    --depth) depth=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --fp32) fp16=; shift ;;
    *) echo "usage: bash bench/deepseek_vit.sh [--depth L] [--runs N] [--rounds R] [--fp32]" >&2; exit 2 ;;
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
for ffn in moe dense; do
  f=build/bench/deepseek_vit_h14_${ffn}_d${depth}_${wt}.vkg
  if [ ! -f "$f" ]; then
    t0=$(date +%s)
    PYTHONPATH=tools/python $py -m vkg deepseek-vit random:0 --dim 1280 --depth "$depth" \
        --heads 16 --patch 14 --image-size 224 224 --experts 128 --shared 4 --top-k 4 \
        --ffn $ffn $fp16 -o "$f.tmp" > /dev/null
    mv "$f.tmp" "$f"
    echo "exported $f in $(( $(date +%s) - t0 )) s"
  fi
done
for r in $(seq 1 "$rounds"); do
  for ffn in moe dense; do
    f=build/bench/deepseek_vit_h14_${ffn}_d${depth}_${wt}.vkg
    "$VKG" bench "$f" --runs "$runs" --warmup 1 --profile \
        > "build/bench/deepseek_vit_${ffn}_d${depth}_${wt}_r$r.txt"
  done
done
$py - "$depth" "$wt" "$runs" "$VKG" "$rounds" <<'EOF'
import json, re, sys
depth, wt, runs, vkg, rounds = (int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4],
                                int(sys.argv[5]))
SPEC_REDUCTION = 13.3          # model-spec §2.5: dense FFN 3368.6 M MAC / DeepSeek FFN 252.6 M MAC

def parse(path):
    lat, device, disp = None, "", []
    for line in open(path):
        m = re.search(r"latency\s+median\s+([0-9.]+)\s*ms", line)
        if m:
            lat = float(m.group(1))
        m = re.search(r" on (.*): \d+ runs", line)
        if m:
            device = m.group(1)
        m = re.match(r"^(\d+)\s+(\S+)\s+(\S+)\s+([0-9.]+)\s*$", line)
        if m:
            disp.append((m.group(2), m.group(3), float(m.group(4)) / 1e3))     # ms
    return lat, device, disp

ROUTER_LABELS = ("router matmul", "moe_select", "moe_stats")
EXPERT_LABELS = ("moe_hist", "moe_scan", "moe_scatter")

def label(op, r, n):
    """The kernel behind the r-th of a node's n dispatches (ops_moe.c records them in this
    order: router: matmul, moe_select[, moe_stats]; experts: hist, scan, scatter, the grouped
    matmuls (fc1[, fc3], fc2), combine)."""
    if op == "moe_router":
        return ROUTER_LABELS[min(r, 2)]
    if op == "moe_experts":
        if r < 3:
            return EXPERT_LABELS[r]
        return "moe_combine" if r == n - 1 else ("grouped matmul fc1" if r == 3 else
                                                 "grouped matmul fc2" if r == n - 2 else
                                                 "grouped matmul fc3")
    return op

def classify(disp):
    """per dispatch: 'route' (router, dispatch, combine), 'experts' (grouped matmuls),
    'ffn' (other FFN dispatches: shared MLP / dense fc1, fc2), 'attn', 'other'."""
    out, i = [], 0
    while i < len(disp):
        node, op, _ = disp[i]
        j = i
        while j < len(disp) and disp[j][0] == node:
            j += 1
        n = j - i
        for r in range(n):
            if op == "moe_router":
                c = "route"
            elif op == "moe_experts":
                c = "route" if (r < 3 or r == n - 1) else "experts"
            elif ".mlp." in node:
                c = "ffn"
            elif ".attn" in node or ".norm1" in node:
                c = "attn"
            else:
                c = "other"
            out.append((disp[i + r], c, label(op, r, n)))
        i = j
    return out

def summary(path):
    lat, device, disp = parse(path)
    tot, labels = {}, {}
    for (_, _, ms), c, lab in classify(disp):
        tot[c] = tot.get(c, 0.0) + ms
        if c in ("route", "experts"):
            labels[lab] = labels.get(lab, 0.0) + ms
    return dict(latency_ms=lat, gpu_ms=sum(tot.values()), device=device, labels=labels,
                ffn_ms=tot.get("route", 0) + tot.get("experts", 0) + tot.get("ffn", 0),
                route_ms=tot.get("route", 0.0), experts_ms=tot.get("experts", 0.0),
                attn_ms=tot.get("attn", 0.0), dispatches=len(disp))

per_round = []
for r in range(1, rounds + 1):
    per_round.append({ffn: summary("build/bench/deepseek_vit_%s_d%d_%s_r%d.txt" % (ffn, depth, wt, r))
                      for ffn in ("moe", "dense")})
for r, x in enumerate(per_round, 1):
    print("round %d: latency DeepSeek %.1f ms, dense %.1f ms; FFN GPU %.1f / %.1f ms; attention "
          "part (norm1, qkv, attention, proj) %.1f / %.1f ms per block"
          % (r, x["moe"]["latency_ms"], x["dense"]["latency_ms"], x["moe"]["ffn_ms"],
             x["dense"]["ffn_ms"], x["moe"]["attn_ms"] / depth, x["dense"]["attn_ms"] / depth))
best = {ffn: min(range(rounds), key=lambda i: per_round[i][ffn]["latency_ms"])
        for ffn in ("moe", "dense")}
res = {ffn: per_round[best[ffn]][ffn] for ffn in ("moe", "dense")}
m, d = res["moe"], res["dense"]
print("summary: each encoder's fastest round (DeepSeek: round %d, dense: round %d)"
      % (best["moe"] + 1, best["dense"] + 1))
print("ViT-H/14, 224x224 (257 tokens), batch 1, %d blocks, %s weights, random (seed 0); %d runs "
      "after 1 warm-up, medians; %s" % (depth, wt, runs, m["device"]))
print("%-30s %10s %10s %14s %14s %16s %13s" % ("encoder", "total ms", "ms/block", "attn ms/blk",
                                               "FFN ms/blk", "route+disp+comb", "share (total)"))
for name, r in (("DeepSeek FFN (E128 w40 S4 M4)", m), ("dense FFN (5120)", d)):
    share = "%.1f%%" % (100 * r["route_ms"] / r["gpu_ms"]) if r["route_ms"] else "-"
    rdc = "%.2f ms/blk" % (r["route_ms"] / depth) if r["route_ms"] else "-"
    print("%-30s %10.1f %10.2f %14.2f %14.2f %16s %13s"
          % (name, r["latency_ms"], r["latency_ms"] / depth, r["attn_ms"] / depth,
             r["ffn_ms"] / depth, rdc, share))
ffn_speedup = d["ffn_ms"] / m["ffn_ms"]
enc_speedup = d["latency_ms"] / m["latency_ms"]
print("routing + dispatch + combine: %.1f%% of the DeepSeek FFN's GPU time, %.1f%% of the encoder's"
      % (100 * m["route_ms"] / m["ffn_ms"], 100 * m["route_ms"] / m["gpu_ms"]))
order = list(ROUTER_LABELS) + list(EXPERT_LABELS) + ["moe_combine", "grouped matmul fc1",
                                                      "grouped matmul fc3", "grouped matmul fc2"]
print("  DeepSeek FFN per block: " + ", ".join(
    "%s %.2f ms" % (k, m["labels"][k] / depth) for k in order if k in m["labels"])
    + ", shared MLP %.2f ms" % ((m["ffn_ms"] - m["route_ms"] - m["experts_ms"]) / depth))
print("FFN speed-up dense / DeepSeek (GPU time): %.2fx = %.2f of the %.1fx arithmetic reduction"
      % (ffn_speedup, ffn_speedup / SPEC_REDUCTION, SPEC_REDUCTION))
print("encoder speed-up dense / DeepSeek (latency): %.2fx" % enc_speedup)
res.update(depth=depth, weights=wt, runs=runs, rounds=per_round,
           round_used={k: v + 1 for k, v in best.items()}, vkg=vkg, ffn_speedup=ffn_speedup,
           ffn_speedup_over_arithmetic=ffn_speedup / SPEC_REDUCTION, encoder_speedup=enc_speedup,
           route_share_of_ffn=m["route_ms"] / m["ffn_ms"], route_share_of_total=m["route_ms"] / m["gpu_ms"])
json.dump(res, open("build/bench/deepseek_vit.json", "w"), indent=1)
EOF
