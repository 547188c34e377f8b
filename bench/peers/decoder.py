"""Decoder peer benchmark (bench/peers.sh --decoder; runs inside build/peers-venv).

The Transfuser decoder shape (3 layers, d_model 256, 8 heads, FFN 1024, 31 queries over 65 memory
tokens), batch 1 and 8: the dense nn.TransformerDecoder in ncnn's Vulkan backend (pnnx-converted, on
lavapipe), onnxruntime CPU and PyTorch CPU (outputs checked against PyTorch), and in the same run vkg's
MoE decoder (E = 4, top-2; `python3 -m vkg transfuser-decoder --random`) and the same dense decoder in
vkg, each through `vkg bench FILE --runs N`: p50, p99, dispatches and barriers per run.
"""
import argparse
import json
import os
import re
import sys

import numpy as np
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import run  # noqa: E402  (shared helpers: run_cmd, err_vs, pct, StepError)

D, HEADS, FFN, LAYERS, Q, S, E, K = 256, 8, 1024, 3, 31, 65, 4, 2


class Dense(nn.Module):
    def __init__(self):
        super().__init__()
        layer = nn.TransformerDecoderLayer(D, HEADS, FFN, dropout=0.0, batch_first=True)
        self.dec = nn.TransformerDecoder(layer, LAYERS)

    def forward(self, tgt, memory):
        return self.dec(tgt, memory)


def pnnx_convert2(module, xs, workdir, stem):
    import pnnx
    pt = os.path.join(workdir, stem + ".pt")
    param, binf = os.path.join(workdir, stem + ".ncnn.param"), os.path.join(workdir, stem + ".ncnn.bin")
    for f in (param, binf):
        if os.path.exists(f):
            os.remove(f)
    with torch.no_grad():
        torch.jit.trace(module, xs).save(pt)
    shapes = ",".join("[" + ",".join(str(s) for s in x.shape) + "]f32" for x in xs)
    out = run.run_cmd([pnnx.EXEC_PATH, os.path.basename(pt), "inputshape=" + shapes, "device=cpu", "fp16=0",
                       "ncnnparam=" + os.path.basename(param), "ncnnbin=" + os.path.basename(binf)],
                      "pnnx conversion", cwd=workdir)
    if not (os.path.exists(param) and os.path.exists(binf)):
        raise run.StepError("pnnx wrote no ncnn model:\n" + out[-3000:])
    with open(param) as f:
        n_layers = int(f.read().split("\n")[1].split()[0])
    return param, binf, n_layers


class Ncnn(run.NcnnVulkan):
    name = "ncnn Vulkan fp32 (dense)"


class Ort:
    name = "onnxruntime CPU (dense)"

    def __init__(self, module, xs, path):
        import onnxruntime as ort
        torch.onnx.export(module, tuple(xs), path, input_names=["tgt", "memory"], output_names=["y"],
                          opset_version=17, do_constant_folding=True)
        self.sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.feed = {"tgt": xs[0].numpy(), "memory": xs[1].numpy()}

    def __call__(self):
        return self.sess.run(None, self.feed)[0]


class Torch:
    name = "PyTorch CPU (dense)"

    def __init__(self, module, xs):
        self.m, self.xs = module, xs

    def __call__(self):
        with torch.no_grad():
            return self.m(*self.xs).numpy()


def vkg_bench(vkg, path, batch, runs):
    out = run.run_cmd([vkg, "bench", path, "--runs", str(runs), "--warmup", "10", "--dim", "batch=%d" % batch],
                      "vkg bench")
    m = re.search(r"median\s+([0-9.]+)\s*ms\s+p90\s+([0-9.]+)\s*ms\s+p99\s+([0-9.]+)\s*ms", out)
    n = re.search(r"(\d+) dispatches, (\d+) barriers", out)
    if not m or not n:
        raise run.StepError("unexpected vkg bench output:\n" + out)
    return {"p50_ms": float(m.group(1)), "p90_ms": float(m.group(2)), "p99_ms": float(m.group(3)),
            "dispatches": int(n.group(1)), "barriers": int(n.group(2)), "runs": runs}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=50, help="interleaved rounds for the peers")
    ap.add_argument("--vkg-runs", type=int, default=1000)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--workdir", default=os.path.join(REPO, "build", "peers"))
    ap.add_argument("--vkg", default=os.path.join(REPO, "build", "release", "tools", "vkg"))
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    torch.manual_seed(args.seed)
    dense = Dense().eval()
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "tools", "python"))
    moe_file = os.path.join(args.workdir, "transfuser_moe_decoder.vkg")
    dense_file = os.path.join(args.workdir, "transfuser_dense_decoder.vkg")
    run.run_cmd([sys.executable, "-m", "vkg", "transfuser-decoder", "--random", str(args.seed), "--d-model", str(D),
                 "--heads", str(HEADS), "--ffn", str(FFN), "--layers", str(LAYERS), "--experts", str(E),
                 "--top-k", str(K), "--activation", "relu", "--queries", str(Q), "--memory", str(S),
                 "-o", moe_file], "vkg MoE decoder export", cwd=REPO, env=env)
    sys.path.insert(0, os.path.join(REPO, "tools", "python"))
    import vkg as vkgpy
    import vkg.transfuser  # noqa: F401  (registers the nn.TransformerDecoder converters)
    vkgpy.export(dense, (torch.randn(1, Q, D), torch.randn(1, S, D)), dense_file)
    result = {"workload": "Transfuser decoder: 3 layers, d 256, 8 heads, FFN 1024, Q 31, S 65; "
                          "vkg MoE: E 4, top-2, ReLU experts", "results": []}
    for batch in [int(b) for b in args.batches.split(",")]:
        xs = [torch.randn(batch, Q, D), torch.randn(batch, S, D)]
        with torch.no_grad():
            ref = dense(*xs).numpy()
        stem = "transfuser_dense_b%d" % batch
        param, binf, nl = pnnx_convert2(dense, xs, args.workdir, stem)
        rts = [Ncnn(param, binf, xs, drop_batch=batch == 1), Ort(dense, xs, os.path.join(args.workdir, stem + ".onnx")), Torch(dense, xs)]
        errs = {}
        for rt in rts:
            y = rt()
            errs[rt.name] = run.err_vs(ref, np.asarray(y).reshape(ref.shape))
        times = run.time_interleaved(rts, args.runs, 3)
        rows = []
        for rt in rts:
            t = sorted(times[rt.name])
            rows.append({"runtime": rt.name, "batch": batch, "p50_ms": run.pct(t, 50), "p99_ms": run.pct(t, 99),
                         "error_vs_pytorch": errs[rt.name]})
        rows[0]["ncnn_layers"] = nl
        for name, path in (("vkg MoE decoder", moe_file), ("vkg dense decoder", dense_file)):
            r = vkg_bench(args.vkg, path, batch, args.vkg_runs)
            r.update({"runtime": name, "batch": batch})
            rows.append(r)
        for r in rows:
            extra = ""
            if "dispatches" in r:
                extra = "  %d dispatches, %d barriers" % (r["dispatches"], r["barriers"])
            if "error_vs_pytorch" in r and r["runtime"] != "PyTorch CPU (dense)":
                extra += "  max|err|/RMS %.2g" % r["error_vs_pytorch"]["max_abs_over_rms"]
            print("batch %d  %-26s p50 %8.3f ms  p99 %8.3f ms%s" % (batch, r["runtime"], r["p50_ms"], r["p99_ms"], extra))
        by = {r["runtime"]: r for r in rows}
        ratio = by["vkg MoE decoder"]["p50_ms"] / by["ncnn Vulkan fp32 (dense)"]["p50_ms"]
        print("batch %d  vkg MoE p50 / ncnn dense p50 = %.3f (required at batch 1: <= 0.5)" % (batch, ratio))
        result["results"] += rows
        result["ratio_b%d" % batch] = ratio
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except run.StepError as e:
        print("peers.sh --decoder: ERROR: %s" % e, file=sys.stderr)
        sys.exit(1)
