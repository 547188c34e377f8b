"""Peer benchmark driver (run by bench/peers.sh inside build/peers-venv).

DINOv2 ViT-S/14 at 224x224, batch 1, fp32, random weights from a fixed seed: ncnn Vulkan (pnnx-converted),
onnxruntime CPU, PyTorch CPU and vkg, timed on this machine in one run, outputs checked against PyTorch.
Every failure raises; no figure is printed that was not measured.
"""

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import vit  # noqa: E402


class StepError(Exception):
    pass


def log(msg):
    print(msg, flush=True)


def pct(sorted_t, p):
    """Nearest-rank percentile, the definition `vkg bench` uses."""
    i = int(math.ceil(p / 100.0 * len(sorted_t))) - 1
    return sorted_t[max(0, min(len(sorted_t) - 1, i))]


def err_vs(ref, out):
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64).reshape(ref.shape)
    if not np.all(np.isfinite(out)):
        return {"max_abs": float("nan"), "ref_rms": float(np.sqrt(np.mean(ref ** 2))),
                "max_abs_over_rms": float("nan"), "finite": False}
    mx = float(np.max(np.abs(out - ref)))
    rms = float(np.sqrt(np.mean(ref ** 2)))
    return {"max_abs": mx, "ref_rms": rms, "max_abs_over_rms": mx / rms, "finite": True}


# ---------------------------------------------------------------------------------------- the model

class _LastTokens(torch.nn.Module):
    """vkg.dinov2.DinoV2 -> its last block's final-norm tokens (1, 1+h*w, D), as `--taps 12 --norm`."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m(x, taps=[self.m.depth], norm=True)[0]


def reference_model(arch, seed):
    """(PyTorch reference module, its state dict, description). The switch: vkg.dinov2.build_model
    (the colleague's reference module, the weights `python3 -m vkg dinov2 random:SEED` exports) when
    it exists; bench/peers/vit.py's own random model otherwise (then vkg cannot share its weights)."""
    sys.path.insert(0, os.path.join(REPO, "tools", "python"))
    try:
        import vkg.dinov2 as d
    except ImportError as e:
        if getattr(e, "name", "") != "vkg.dinov2":
            raise StepError("importing vkg.dinov2 failed: %r" % e)
        d = None
    if d is not None and hasattr(d, "build_model"):
        m = d.build_model(arch, "random:%d" % seed)
        return _LastTokens(m).eval(), m.state_dict(), "vkg.dinov2.build_model(%r, 'random:%d')" % (arch, seed)
    if d is not None:
        raise StepError("vkg.dinov2 exists but has no build_model; adapt reference_model() in "
                        "bench/peers/run.py")
    m = vit.random_vit(arch, seed)
    return m, m.state_dict(), "bench/peers/vit.py random_vit(seed=%d) (vkg.dinov2 absent)" % seed


# ---------------------------------------------------------------------------------------- converters

def run_cmd(cmd, what, cwd=None, env=None, timeout=1800):
    p = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout)
    if p.returncode != 0:
        raise StepError("%s failed (exit %d): %s\n%s" % (what, p.returncode, " ".join(cmd),
                                                       p.stdout[-4000:]))
    return p.stdout


def pnnx_convert(module, x, workdir, stem):
    """torch.jit.trace -> pnnx (fp16=0: fp32 weights) -> ncnn param/bin."""
    import pnnx
    pt = os.path.join(workdir, stem + ".pt")
    param, binf = os.path.join(workdir, stem + ".ncnn.param"), os.path.join(workdir, stem + ".ncnn.bin")
    for f in (param, binf):
        if os.path.exists(f):
            os.remove(f)
    with torch.no_grad():
        torch.jit.trace(module, x).save(pt)
    shape = "[" + ",".join(str(s) for s in x.shape) + "]f32"
    out = run_cmd([pnnx.EXEC_PATH, os.path.basename(pt), "inputshape=" + shape, "device=cpu",
                   "fp16=0", "ncnnparam=" + os.path.basename(param), "ncnnbin=" + os.path.basename(binf)],
                  "pnnx conversion", cwd=workdir)
    if not (os.path.exists(param) and os.path.exists(binf)):
        raise StepError("pnnx wrote no ncnn model:\n" + out[-3000:])
    with open(param) as f:
        lines = f.read().split("\n")
    n_layers = int(lines[1].split()[0])
    return param, binf, n_layers


def onnx_export(module, x, path):
    # torch.no_grad() is deliberately not used (nn.MultiheadAttention's fast path breaks the export).
    torch.onnx.export(module, (x,), path, input_names=["x"], output_names=["y"], opset_version=17,
                      do_constant_folding=True)
    if not os.path.exists(path):
        raise StepError("torch.onnx.export wrote nothing")
    return path


# ---------------------------------------------------------------------------------------- runtimes

class NcnnVulkan:
    name = "ncnn Vulkan fp32"

    def __init__(self, param, binf, x, drop_batch=True):
        import ncnn
        if ncnn.get_gpu_count() < 1:
            raise StepError("ncnn found no Vulkan device")
        self.ncnn = ncnn
        self.device = ncnn.get_gpu_info(0).device_name()
        if "llvmpipe" not in self.device.lower():
            raise StepError("ncnn picked %r, not lavapipe (llvmpipe)" % self.device)
        net = ncnn.Net()
        o = net.opt
        o.use_vulkan_compute = True
        o.use_fp16_packed = o.use_fp16_storage = o.use_fp16_arithmetic = False
        o.use_bf16_storage = o.use_bf16_packed = False
        o.use_int8_inference = False
        o.num_threads = os.cpu_count()
        net.set_vulkan_device(0)
        if net.load_param(param) != 0 or net.load_model(binf) != 0:
            raise StepError("ncnn could not load %s / %s" % (param, binf))
        self.net = net
        # pnnx drops the batch dim of the image input; for the 3-D attention input its param file
        # addresses the tensor as ncnn 3-D (c=1, h=257, w=1152), so it is fed whole. Several inputs
        # (a list) are fed as in0, in1, ...
        xs = x if isinstance(x, (list, tuple)) else [x]
        self.ins = [np.ascontiguousarray(t.numpy()[0] if drop_batch else t.numpy()) for t in xs]
        self.options = {k: bool(getattr(o, k)) for k in ("use_vulkan_compute", "use_fp16_packed",
                        "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_storage")}
        if not o.use_vulkan_compute or o.use_fp16_storage or o.use_fp16_arithmetic or o.use_fp16_packed:
            raise StepError("ncnn options did not take: %s" % self.options)

    def __call__(self):
        ex = self.net.create_extractor()
        for i, a in enumerate(self.ins):
            ex.input("in%d" % i, self.ncnn.Mat(a))
        ret, out = ex.extract("out0")
        if ret != 0:
            raise StepError("ncnn extract returned %d" % ret)
        return np.array(out)


class OrtCpu:
    name = "onnxruntime CPU"

    def __init__(self, onnx_path, x):
        import onnxruntime as ort
        so = ort.SessionOptions()
        self.sess = ort.InferenceSession(onnx_path, so, providers=["CPUExecutionProvider"])
        self.feed = {self.sess.get_inputs()[0].name: x.numpy()}

    def __call__(self):
        return self.sess.run(None, self.feed)[0]


class TorchCpu:
    name = "PyTorch CPU"

    def __init__(self, module, x):
        self.m, self.x = module, x

    def __call__(self):
        with torch.no_grad():
            return self.m(self.x).numpy()


class VkgRounds:
    """vkg inside the interleaved rounds: each round is one `vkg bench FILE --runs 1 --warmup W`
    process, and its reported median (= that one run, timed by vkg itself) is the sample."""
    name = "vkg"

    def __init__(self, args, vkg_file):
        self.args, self.file, self.device = args, vkg_file, "?"

    def timed(self):
        med, _, self.device, _ = vkg_bench(self.args, self.file, runs=1)
        return med


def time_interleaved(runtimes, runs, warmup):
    for rt in runtimes:
        if not hasattr(rt, "timed"):
            for _ in range(warmup):
                rt()
    times = {rt.name: [] for rt in runtimes}
    for r in range(runs):
        order = runtimes[r % len(runtimes):] + runtimes[:r % len(runtimes)]
        for rt in order:
            if hasattr(rt, "timed"):
                times[rt.name].append(rt.timed())
                continue
            t0 = time.perf_counter()
            rt()
            times[rt.name].append((time.perf_counter() - t0) * 1e3)
    return times


# ---------------------------------------------------------------------------------------- vkg

def vkg_export(args, vkg_file):
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "tools", "python"))
    run_cmd([sys.executable, "-m", "vkg", "dinov2", "random:%d" % args.seed, "--arch", args.arch,
             "--image-size", "224", "224", "--taps", "12", "--norm", "-o", vkg_file],
            "vkg exporter (python3 -m vkg dinov2)", cwd=REPO, env=env)
    if not os.path.exists(vkg_file):
        raise StepError("the vkg exporter wrote no %s" % vkg_file)


def vkg_check(args, vkg_file, x, ref):
    """vkg run on the same input; each output matched to the reference tokens by shape."""
    txt = run_cmd([args.vkg, "inspect", vkg_file], "vkg inspect")
    sec = txt.split("inputs:")[1].split("outputs:")[0].split()
    if not sec:
        raise StepError("vkg inspect listed no inputs:\n" + txt)
    in_name = sec[0]
    outdir = os.path.join(args.workdir, "vkg-out")
    os.makedirs(outdir, exist_ok=True)
    for f in os.listdir(outdir):
        os.remove(os.path.join(outdir, f))
    xin = os.path.join(args.workdir, "x.npy")
    np.save(xin, x.numpy())
    run_cmd([args.vkg, "run", vkg_file, "--input", "%s=%s" % (in_name, xin), "--out", outdir], "vkg run")
    h = w = 224 // 14
    cands = {ref.shape: ref, ref[:, 1:].shape: ref[:, 1:],
             (1, ref.shape[2], h, w): ref[:, 1:].reshape(1, h, w, -1).transpose(0, 3, 1, 2),
             (1, ref.shape[2]): ref[:, 0]}
    worst, matched = None, []
    for f in sorted(os.listdir(outdir)):
        y = np.load(os.path.join(outdir, f))
        if tuple(y.shape) not in cands:
            continue
        e = err_vs(cands[tuple(y.shape)], y)
        matched.append("%s%s" % (f, tuple(y.shape)))
        if worst is None or not e["finite"] or e["max_abs_over_rms"] > worst["max_abs_over_rms"]:
            worst = e
    if worst is None:
        raise StepError("no vkg output matched the reference shapes: %s" % os.listdir(outdir))
    worst["outputs"] = matched
    return worst


def vkg_bench(args, vkg_file, runs):
    out = run_cmd([args.vkg, "bench", vkg_file, "--runs", str(runs), "--warmup", str(max(1, args.warmup))],
                  "vkg bench")
    m = re.search(r"median\s+([0-9.]+)\s*ms\s+p90\s+([0-9.]+)\s*ms", out)
    if not m:
        raise StepError("no 'median ... p90' line in vkg bench output:\n" + out)
    dev = re.search(r" on (.*): \d+ runs", out)
    return float(m.group(1)), float(m.group(2)), (dev.group(1) if dev else "?"), out


# ---------------------------------------------------------------------------------------- main

def print_table(rows):
    log("\n%-20s %11s %11s %9s %14s %11s" % ("runtime", "median ms", "p90 ms", "GFLOP/s", "max|err|/RMS",
                                            "max|err|"))
    for r in rows:
        e = r.get("error_vs_pytorch")
        es = ("%14.3g %11.3g" % (e["max_abs_over_rms"], e["max_abs"])) if e else "%14s %11s" % ("-", "-")
        log("%-20s %11.2f %11.2f %9.2f %s" % (r["runtime"], r["median_ms"], r["p90_ms"], r["gflop_per_s"], es))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arch", default="vits14")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--workdir", default=os.path.join(REPO, "build", "peers"))
    ap.add_argument("--vkg", default=os.path.join(REPO, "build", "release", "tools", "vkg"))
    ap.add_argument("--peers-only", action="store_true", help="skip vkg (exit 0 without it)")
    ap.add_argument("--vkg-block", action="store_true",
                    help="time vkg as one `vkg bench --runs N` before the rounds instead of one process "
                         "per interleaved round")
    ap.add_argument("--attention", action="store_true",
                    help="time the attention core alone (257 tokens, 6 heads, head dim 64; ncnn, "
                         "onnxruntime, PyTorch) instead of the model")
    args = ap.parse_args()
    if args.runs < 1 or args.warmup < 0:
        raise StepError("--runs must be >= 1 and --warmup >= 0")
    os.makedirs(args.workdir, exist_ok=True)
    import ncnn
    import onnxruntime
    import pnnx
    torch.manual_seed(1234)
    result = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "python": platform.python_version()},
              "versions": {"torch": torch.__version__, "numpy": np.__version__,
                           "onnxruntime": onnxruntime.__version__, "ncnn": ncnn.__version__,
                           "pnnx": getattr(pnnx, "__version__", None) or _dist_version("pnnx")},
              "runs": args.runs, "warmup": args.warmup, "seed": args.seed}

    if args.attention:
        d = vit.ARCHS[args.arch]
        hd = d["embed"] // d["heads"]
        x = torch.randn(1, 257, 3 * d["embed"])    # packed q | k | v, as vkg's `attention` op takes
        export_m = ref_m = vit.AttentionOnly(d["heads"], hd).eval()
        stem = "attn_core_257x%dx%d" % (d["heads"], hd)
        flops = 4 * d["heads"] * 257 * 257 * hd
        result["workload"] = ("attention core softmax(q k^T / 8) v, packed qkv 1x257x1152 -> 1x257x384, "
                              "6 heads, head dim 64 (vkg op `attention`, packed)")
        source = "no weights (input torch.randn, seed 1234)"
    else:
        x = torch.randn(1, 3, 224, 224)
        ref_m, sd, source = reference_model(args.arch, args.seed)
        export_m = vit.export_copy(sd, args.arch, (224, 224))
        stem = "dinov2_%s_224_seed%d" % (args.arch, args.seed)
        n = 257
        dd, hh = vit.ARCHS[args.arch]["embed"], vit.ARCHS[args.arch]["mlp"]
        flops = 2 * 256 * 588 * dd + 12 * (2 * n * dd * (4 * dd + 2 * hh) + 4 * n * n * dd)
        result["workload"] = "DINOv2 %s, 1x3x224x224, final-norm tokens (1,257,384), fp32" % args.arch
    result["weights"] = source
    result["gflop"] = flops * 1e-9
    log("workload: %s\nweights:  %s" % (result["workload"], source))

    with torch.no_grad():
        ref = ref_m(x).numpy()
        e = err_vs(ref, export_m(x).numpy())
    if not e["finite"] or e["max_abs_over_rms"] > 1e-5:
        raise StepError("the export copy disagrees with the PyTorch reference: %s" % e)

    t0 = time.time()
    param, binf, n_layers = pnnx_convert(export_m, x, args.workdir, stem)
    log("pnnx: %s (%d ncnn layers, %.0f s)" % (param, n_layers, time.time() - t0))
    onnx_path = onnx_export(export_m, x, os.path.join(args.workdir, stem + ".onnx"))
    log("onnx: %s" % onnx_path)
    result["ncnn_layers"] = n_layers

    load0 = os.getloadavg()
    result["loadavg_before"] = load0
    if load0[0] > 0.7:
        log("WARNING: 1-min load average %.2f on %d cores before timing: other work competes for the "
            "CPU, figures are inflated" % (load0[0], os.cpu_count()))
    nc = NcnnVulkan(param, binf, x, drop_batch=not args.attention)
    rts = [nc, OrtCpu(onnx_path, x), TorchCpu(ref_m, x)]
    log("ncnn Vulkan device: %s; options %s" % (nc.device, nc.options))
    result["ncnn_device"] = nc.device
    result["ncnn_options"] = nc.options
    errors = {rt.name: err_vs(ref, rt()) for rt in rts}

    vkg_failed, vkg_rt = None, None
    if not args.peers_only and not args.attention:
        vkg_file = os.path.join(args.workdir, stem + ".vkg")
        try:
            if not os.path.exists(args.vkg):
                raise StepError("no vkg binary at %s (build: bash scripts/build.sh build/release "
                                "-DCMAKE_BUILD_TYPE=Release)" % args.vkg)
            vkg_export(args, vkg_file)
            errors["vkg"] = vkg_check(args, vkg_file, x, ref)
            vkg_rt = VkgRounds(args, vkg_file)
            if args.vkg_block:
                med, p90, dev, out = vkg_bench(args, vkg_file, args.runs)
                log(out.strip())
                vkg_block = {"runtime": "vkg", "median_ms": med, "p90_ms": p90, "device": dev,
                             "mode": "one vkg bench process, %d runs" % args.runs,
                             "error_vs_pytorch": errors["vkg"]}
            else:
                rts.append(vkg_rt)
        except (StepError, subprocess.TimeoutExpired) as ex:
            vkg_failed = str(ex)

    log("timing %d warm-up + %d interleaved runs each (%s) ..."
        % (args.warmup, args.runs, ", ".join(rt.name for rt in rts)))
    try:
        times = time_interleaved(rts, args.runs, args.warmup)
    except (StepError, subprocess.TimeoutExpired) as ex:   # only vkg can raise these here
        vkg_failed = "during timing: %s" % ex
        rts = [rt for rt in rts if rt is not vkg_rt]
        times = time_interleaved(rts, args.runs, args.warmup)
    rows = []
    for rt in rts:
        s = sorted(times[rt.name])
        row = {"runtime": rt.name, "median_ms": pct(s, 50), "p90_ms": pct(s, 90), "times_ms": times[rt.name],
               "error_vs_pytorch": None if rt.name == "PyTorch CPU" else errors[rt.name]}
        if rt is vkg_rt:
            row["device"] = rt.device
            row["mode"] = "interleaved: one `vkg bench --runs 1 --warmup %d` process per round" % max(1, args.warmup)
        rows.append(row)
    if vkg_rt is not None and args.vkg_block and not vkg_failed:
        rows.append(vkg_block)

    result["results"] = rows
    result["loadavg_after"] = os.getloadavg()
    for r in rows:
        r["gflop_per_s"] = result["gflop"] / (r["median_ms"] * 1e-3)

    print_table(rows)
    by = {r["runtime"]: r for r in rows}
    if "vkg" in by:
        result["ncnn_vulkan_over_vkg"] = by["ncnn Vulkan fp32"]["median_ms"] / by["vkg"]["median_ms"]
        log("\nncnn_vulkan_median / vkg_median = %.3f" % result["ncnn_vulkan_over_vkg"])
    bad = [r["runtime"] for r in rows if r["error_vs_pytorch"] and
           (not r["error_vs_pytorch"]["finite"] or r["error_vs_pytorch"]["max_abs_over_rms"] > 1e-2)]
    if bad:
        log("WARNING: output disagrees with PyTorch (max|err|/RMS > 1e-2): %s" % ", ".join(bad))
    result["disagreeing"] = bad
    if vkg_failed:
        result["vkg_error"] = vkg_failed
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        log("wrote %s" % args.json)
    if vkg_failed:
        print("\npeers.sh: ERROR: the vkg measurement failed; the table holds the peers only.\n"
              + vkg_failed, file=sys.stderr)
        return 3
    return 4 if bad else 0


def _dist_version(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StepError as e:
        print("peers.sh: ERROR: %s" % e, file=sys.stderr)
        sys.exit(1)
