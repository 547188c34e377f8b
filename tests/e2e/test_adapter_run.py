"""PEFT LoRA adapter files -> `vkg run --adapter` -> the PyTorch module with the adapter merged.

Run by ctest as `python3 tests/e2e/test_adapter_run.py VKG_BINARY`. A small pre-LN MLP stack with
PyTorch module paths (embed, blocks.N.norm, blocks.N.mlp.fc1, blocks.N.mlp.fc2, head) is exported
with vkg.export; an adapter is written in PEFT's saved format (adapter_model.safetensors with keys
"base_model.model.<module path>.lora_A.weight" (r, in) and ".lora_B.weight" (out, r), and
adapter_config.json with r, lora_alpha and target_modules; PEFT itself is not installed) with random
A and B (trained adapters are not zero), r = 4, lora_alpha = 8, plus a stray key for a module the
model lacks. The reference is the PyTorch module with W + scale * (alpha / r) * B @ A.

Tolerances: fp32 weights as tests/e2e/test_export_run.py, |vkg - torch| <= 1e-5 + 1e-5 |torch| per
element (merged weights differ from PyTorch's fp32 merge by at most an ulp; the kernels accumulate in
fp32 in another order). f16 weights (fp16=True): vkg merges into the f16 weights of the file, in
double, rounded to fp32 and then f16 (docs/EMBEDDING.md); the reference module gets exactly those
weights computed in NumPy, so the fp32 tolerance applies again; against the module merged in fp32
without f16 rounding the outputs are within 2e-2 x RMS, the repo's bound for f16 weights.
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools", "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import vkg  # noqa: E402
from vkg.safetensors import save_safetensors  # noqa: E402

VKG_BIN = None
ATOL, RTOL = 1e-5, 1e-5
R, ALPHA = 4, 8.0
TARGETS = ["fc1", "fc2", "embed"]


class MLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.mlp = MLP(d, hidden)

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Net(nn.Module):
    def __init__(self, d_in=13, d=24, hidden=37, out=5):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList([Block(d, hidden) for _ in range(2)])
        self.head = nn.Linear(d, out)

    def forward(self, x):
        x = self.embed(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def targeted(path):
    return any(path == t or path.endswith("." + t) for t in TARGETS)


def random_adapter(model, seed):
    """{module path: (A (r, in), B (out, r))} for every targeted nn.Linear, float32."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, nn.Linear) and targeted(path):
            a = torch.randn(R, m.in_features, generator=g) * 0.3
            b = torch.randn(m.out_features, R, generator=g) * 0.3
            out[path] = (a, b)
    return out


def write_peft(folder, adapter, stray):
    """adapter_model.safetensors and adapter_config.json as PEFT's save_pretrained writes them."""
    tensors = {}
    for path, (a, b) in list(adapter.items()) + list(stray.items()):
        tensors["base_model.model.%s.lora_A.weight" % path] = a.numpy()
        tensors["base_model.model.%s.lora_B.weight" % path] = b.numpy()
    save_safetensors(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": None, "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0,
              "target_modules": TARGETS, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
              "base_model_name_or_path": None, "inference_mode": True}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def merged(model, adapter, scale, fp16=False):
    """A copy of model with W + scale * alpha / r * B @ A: in fp32 as PEFT's merge, or, for f16
    weights, vkg's documented rule (the f16 weight widened, the update in double, rounded to fp32,
    then to f16)."""
    import copy
    m = copy.deepcopy(model)
    coef = scale * ALPHA / R
    with torch.no_grad():
        for path, mod in m.named_modules():
            if fp16 and isinstance(mod, nn.Linear):
                mod.weight.copy_(mod.weight.half().float())
            if path not in adapter:
                continue
            a, b = adapter[path]
            if fp16:
                w = mod.weight.double().numpy() + np.float64(np.float32(scale)) * (ALPHA / R) * (
                    b.double().numpy() @ a.double().numpy())
                mod.weight.copy_(torch.from_numpy(w.astype(np.float32).astype(np.float16).astype(np.float32)))
            else:
                mod.weight.add_(coef * (b @ a))
    return m


def vkg_run(path, x, folder, extra):
    """`vkg run` with the validation layer on; returns (output, stderr)."""
    xp = os.path.join(folder, "x.npy")
    np.save(xp, x)
    out = os.path.join(folder, "out")
    args = [VKG_BIN, "run", path, "--input", "x=" + xp, "--out", out] + extra
    r = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, VKG_VALIDATION="1"))
    if r.returncode != 0:
        raise AssertionError("vkg run failed (%d): %s%s" % (r.returncode, r.stdout, r.stderr))
    return np.load(os.path.join(out, "output.npy")), r.stderr


class AdapterRun(unittest.TestCase):
    def run_case(self, fp16):
        torch.manual_seed(11)
        model = Net().eval()
        adapter = random_adapter(model, 5)
        self.assertEqual(len(adapter), 5)  # embed and 2 x (fc1, fc2)
        stray = {"blocks.7.mlp.fc1": (torch.randn(R, 24), torch.randn(37, R))}
        x = torch.randn(3, 6, 13)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "net.vkg")
            vkg.export(model, (x,), path, fp16=fp16)
            folder = os.path.join(tmp, "adapter")
            os.mkdir(folder)
            write_peft(folder, adapter, stray)
            for scale in (1.0, 0.5):
                extra = ["--adapter", folder] + ([] if scale == 1.0 else ["--adapter-scale", str(scale)])
                got, err = vkg_run(path, x.numpy(), tmp, extra)
                self.assertIn("5 weights matched, 1 unmatched", err)
                self.assertIn("base_model.model.blocks.7.mlp.fc1.lora_A.weight: the model has no tensor", err)
                with torch.no_grad():
                    want = merged(model, adapter, scale, fp16)(x).numpy()
                    base = (merged(model, {}, 0.0, fp16) if fp16 else model)(x).numpy()
                tag = "%s scale %g" % ("f16" if fp16 else "f32", scale)
                self.assertEqual(got.shape, want.shape)
                e = np.abs(got - want)
                tol = ATOL + RTOL * np.abs(want)
                self.assertTrue((e <= tol).all(), "%s: max error %.3g (worst %.3g of tolerance)"
                                % (tag, e.max(), (e / tol).max()))
                # the adapter changes the outputs far beyond the tolerance
                self.assertGreater(np.abs(want - base).max(), 100 * tol.max(), tag)
                if fp16:
                    with torch.no_grad():
                        loose = merged(model, adapter, scale)(x).numpy()
                    rms = np.sqrt(np.mean(loose ** 2))
                    self.assertLessEqual(np.abs(got - loose).max(), 2e-2 * rms, tag + " vs the fp32 merge")

    def test_fp32_weights(self):
        self.run_case(False)

    def test_fp16_weights(self):
        self.run_case(True)

    def test_refused_config(self):
        torch.manual_seed(12)
        model = Net().eval()
        x = torch.randn(2, 4, 13)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "net.vkg")
            vkg.export(model, (x,), path)
            folder = os.path.join(tmp, "adapter")
            os.mkdir(folder)
            write_peft(folder, random_adapter(model, 6), {})
            cfg = os.path.join(folder, "adapter_config.json")
            with open(cfg) as f:
                c = json.load(f)
            c["fan_in_fan_out"] = True
            with open(cfg, "w") as f:
                json.dump(c, f)
            np.save(os.path.join(tmp, "x.npy"), x.numpy())
            r = subprocess.run([VKG_BIN, "run", path, "--input", "x=" + os.path.join(tmp, "x.npy"), "--out",
                                os.path.join(tmp, "out"), "--adapter", folder], capture_output=True, text=True)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("adapter_config.json: fan_in_fan_out", r.stderr)


if __name__ == "__main__":
    VKG_BIN = sys.argv.pop(1)
    unittest.main(verbosity=2)
