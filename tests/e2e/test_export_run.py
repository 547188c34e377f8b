"""PyTorch module -> vkg.export -> `vkg run` (the C runtime on the Vulkan device) -> same outputs.

Run by ctest as `python3 tests/e2e/test_export_run.py VKG_BINARY`. Models are random-initialized with
fixed seeds. Tolerance: |vkg - torch| <= 1e-5 + 1e-5 * |torch| per element (fp32 on both sides; the
kernels accumulate in fp32 like PyTorch, in a different order).
"""
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
import vkg.reference  # noqa: E402
import vkgrun  # noqa: E402  (tests/e2e/vkgrun.py)

VKG_BIN = None
ATOL, RTOL = 1e-5, 1e-5


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(13, 32)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(32, 17)
        self.fc3 = nn.Linear(17, 5)

    def forward(self, x):
        return self.fc3(nn.functional.gelu(self.fc2(self.act(self.fc1(x)))))


class Squash(nn.Module):
    """tanh and sigmoid as modules, functions and methods, with pre-activations far into saturation
    (naive exp formulas overflow there); the Transfuser heads' shape: tanh * pi on a Linear."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(11, 9)
        self.t, self.s = nn.Tanh(), nn.Sigmoid()

    def forward(self, x):
        y = self.fc(x) * 40.0
        return self.t(y) * 3.1415927 + torch.sigmoid(y) + y.tanh() * self.s(y) + torch.tanh(y).sigmoid()


class Block(nn.Module):
    """Pre-LN residual FFN block with LayerScale, as in DINOv2 (without attention)."""

    def __init__(self, d=24, hidden=40):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x)))) * self.gamma


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.norm = nn.LayerNorm(24)
        self.head = nn.Linear(24, 6)

    def forward(self, tokens):
        for b in self.blocks:
            tokens = b(tokens)
        return self.head(self.norm(tokens)).softmax(-1)


class ExportRun(unittest.TestCase):
    def check(self, module, shape, name):
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.vkg")
            example = torch.randn(*shape)
            vkg.export(module, (example,), path)
            insp = subprocess.run([VKG_BIN, "inspect", path], capture_output=True, text=True)
            self.assertEqual(insp.returncode, 0, insp.stderr)
            self.assertIn(type(module).__name__, insp.stdout)
            self.assertIn("planned peak", insp.stdout)
            for batch in (shape[0], shape[0] + 1):  # the exported batch and another one
                x = torch.randn(batch, *shape[1:])
                with torch.no_grad():
                    want = module(x).numpy()
                got = vkgrun.run(VKG_BIN, path, {name: x.numpy()}, os.path.join(tmp, "out"))["output"][0]
                self.assertEqual(got.shape, want.shape)
                err = np.abs(got - want)
                tol = ATOL + RTOL * np.abs(want)
                self.assertTrue((err <= tol).all(), "batch %d: max error %.3g (worst %.3g of tolerance)"
                                % (batch, err.max(), (err / tol).max()))

    def test_mlp(self):
        torch.manual_seed(1)
        self.check(MLP().eval(), (4, 13), "x")

    def test_tanh_sigmoid(self):
        torch.manual_seed(4)
        self.check(Squash().eval(), (3, 11), "x")

    def test_residual_block(self):
        torch.manual_seed(2)
        self.check(Block().eval(), (2, 7, 24), "x")

    def test_transformer_stack(self):
        torch.manual_seed(3)
        self.check(Stack().eval(), (2, 7, 24), "tokens")

    def test_wrong_input_shape_is_refused(self):
        torch.manual_seed(4)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "m.vkg")
            vkg.export(MLP().eval(), (torch.randn(2, 13),), path)
            p = os.path.join(tmp, "x.npy")
            np.save(p, np.zeros((2, 12), np.float32))
            r = subprocess.run([VKG_BIN, "run", path, "--input", "x=" + p, "--out", tmp], capture_output=True, text=True)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("expects 13", r.stderr)

    def test_attention_column_windows(self):
        """Attention reading K and V as column windows of one wide tensor (k_col, v_col), as the
        Transfuser decoder's fused memory projection does; and a window past the width refused
        with the node named."""
        rng = np.random.default_rng(5)
        q = rng.standard_normal((2, 5, 12), dtype=np.float32)
        kv = rng.standard_normal((2, 7, 40), dtype=np.float32)
        b = vkg.Builder()
        tq = b.input("q", [2, 5, 12])
        tkv = b.input("kv", [2, 7, 40])
        b.output(b.attention(tq, tkv, tkv, 3, k_col=24, v_col=4, name="att"), "y")
        want = vkg.reference.attention_ref(q.astype(np.float64), kv[..., 24:36].astype(np.float64),
                                           kv[..., 4:16].astype(np.float64), 3)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "att.vkg")
            b.save(path)
            out = os.path.join(tmp, "out")
            os.mkdir(out)
            got = vkgrun.run(VKG_BIN, path, {"q": q, "kv": kv}, out)["y"][0]
            err = np.abs(got - want) - (ATOL + RTOL * np.abs(want))
            self.assertLessEqual(err.max(), 0.0)
            with self.assertRaises(ValueError):
                b.attention(tq, tkv, tkv, 3, k_col=30, v_col=0)
            b.nodes[-1]["attrs"]["k_col"] = 30     # past the builder's check, as a bad file would be
            b.save(path)
            r = subprocess.run([VKG_BIN, "run", path, "--input", "q=" + os.path.join(tmp, "q.npy"),
                                "--input", "kv=" + os.path.join(tmp, "kv.npy"), "--out", out],
                               capture_output=True, text=True)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn('"att"', r.stderr)
            self.assertIn("k_col 30", r.stderr)


if __name__ == "__main__":
    VKG_BIN = sys.argv.pop(1)
    unittest.main(verbosity=2)
