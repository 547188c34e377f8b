"""PyTorch modules with convolutions -> vkg.export -> `vkg run` on the Vulkan device -> compared with
PyTorch, once per conv variant (VKG_MATMUL_VARIANT=tiled, then texel where the device has it).

Run by ctest as `python3 tests/e2e/test_conv_run.py VKG_BINARY`. Models are random-initialized with
fixed seeds. Tolerance: |vkg - torch| <= 1e-5 * (1 + max|torch|) per element: both sides accumulate
in fp32 in different orders over up to a few hundred terms per output.
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
import torch.nn.functional as F  # noqa: E402

import vkg  # noqa: E402
import vkgrun  # noqa: E402  (tests/e2e/vkgrun.py)

VKG_BIN = None
TOL = 1e-5


class RCU(nn.Module):
    """Depth Anything's ResidualConvUnit: x + conv2(relu(conv1(relu(x)))), the first ReLU not in place."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(self.act(x))))


class MiniDPT(nn.Module):
    """The DPT head's conv shapes, narrowed: 1x1 projections, k = s = 4 and 2 transposed
    upsampling, a strided 3x3, 3x3 without bias, residual conv units, the output convs."""

    def __init__(self, d=24, oc=(6, 12, 24, 24), f=16):
        super().__init__()
        self.projects = nn.ModuleList([nn.Conv2d(d, o, 1) for o in oc])
        self.resize = nn.ModuleList([nn.ConvTranspose2d(oc[0], oc[0], 4, stride=4),
                                     nn.ConvTranspose2d(oc[1], oc[1], 2, stride=2), nn.Identity(),
                                     nn.Conv2d(oc[3], oc[3], 3, stride=2, padding=1)])
        self.rn = nn.ModuleList([nn.Conv2d(o, f, 3, padding=1, bias=False) for o in oc])
        self.rcu = RCU(f)
        self.out1 = nn.Conv2d(f, f // 2, 3, padding=1)
        self.out2 = nn.Conv2d(f // 2, 8, 3, padding=1)
        self.out3 = nn.Conv2d(8, 1, 1)

    def forward(self, a, b):
        feats = [self.rn[i](self.resize[i](self.projects[i](a if i % 2 else b))) for i in range(4)]
        y = self.rcu(feats[0]) + F.conv_transpose2d(feats[1], torch.ones(16, 1, 2, 2) * 0.25, stride=2,
                                                    groups=16)
        return torch.relu(self.out3(torch.relu(self.out2(self.out1(y))))), self.rcu(feats[3])


class Mixed(nn.Module):
    """The general cases: groups, dilation, asymmetric stride and padding, transposed convs with
    padding and output_padding, a patch embedding (k = s = 14)."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 20, 14, stride=14)
        self.g = nn.Conv2d(20, 12, 3, padding=2, dilation=2, groups=4)
        self.a = nn.Conv2d(12, 9, (2, 3), stride=(1, 2), padding=(0, 1))
        self.t = nn.ConvTranspose2d(9, 10, 3, stride=2, padding=1, output_padding=1)
        self.t2 = nn.ConvTranspose2d(10, 6, 3, stride=(1, 2), padding=(2, 0), dilation=(2, 1), groups=2)

    def forward(self, x):
        return self.t2(self.t(self.a(self.g(self.patch(x)))))


class ConvRun(unittest.TestCase):
    def check(self, module, inputs, fp16=False):
        module = module.eval()
        with torch.no_grad():
            want = module(*inputs)
        want = [want] if isinstance(want, torch.Tensor) else list(want)
        names = list(module.forward.__code__.co_varnames[1:1 + len(inputs)])
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "conv.vkg")
            vkg.export(module, tuple(inputs), path, fp16=fp16)
            if fp16:  # compare with the fp16-rounded weights the file holds
                with torch.no_grad():
                    for m in module.modules():
                        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                            m.weight.copy_(m.weight.half().float())
                    want = module(*inputs)
                want = [want] if isinstance(want, torch.Tensor) else list(want)
            for variant in ("tiled", "texel"):  # texel falls back to tiled where the device lacks it
                out = os.path.join(tmp, "out_" + variant)
                os.mkdir(out)
                before = os.environ.get("VKG_MATMUL_VARIANT")
                os.environ["VKG_MATMUL_VARIANT"] = variant  # vkgrun.run passes the environment on
                try:
                    got = vkgrun.run(VKG_BIN, path, {n: t.numpy() for n, t in zip(names, inputs)}, out)
                finally:
                    if before is None:
                        del os.environ["VKG_MATMUL_VARIANT"]
                    else:
                        os.environ["VKG_MATMUL_VARIANT"] = before
                keys = ["output"] if len(want) == 1 else ["output%d" % i for i in range(len(want))]
                for k, w in zip(keys, want):
                    w = w.numpy()
                    g = got[k][0]
                    self.assertEqual(g.shape, w.shape, "%s %s" % (variant, k))
                    err = np.abs(g - w).max()
                    self.assertLessEqual(err, TOL * (1.0 + np.abs(w).max()),
                                         "%s %s: max error %g" % (variant, k, err))

    def test_mini_dpt(self):
        torch.manual_seed(1)
        self.check(MiniDPT(), [torch.randn(2, 24, 5, 5), torch.randn(2, 24, 5, 5)])

    def test_mixed(self):
        torch.manual_seed(2)
        self.check(Mixed(), [torch.randn(1, 3, 56, 70)])

    def test_fp16_weights(self):
        torch.manual_seed(3)
        self.check(nn.Sequential(nn.Conv2d(5, 16, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(16, 7, 2, stride=2)),
                   [torch.randn(3, 5, 9, 11)], fp16=True)

    def test_bad_graph_is_refused(self):
        b = vkg.Builder()
        x = b.input("x", ["batch", 4, 8, 8])
        b.output(b.conv2d(x, np.ones((6, 4, 3, 3), np.float32), name="conv"), "y")
        b.nodes[-1]["attrs"]["groups"] = 3      # past the builder's check, as a bad file would be
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bad.vkg")
            b.save(path)
            np.save(os.path.join(tmp, "x.npy"), np.ones((1, 4, 8, 8), np.float32))
            r = subprocess.run([VKG_BIN, "run", path, "--input", "x=" + os.path.join(tmp, "x.npy"), "--out", tmp],
                               capture_output=True, text=True)
            self.assertNotEqual(r.returncode, 0)
            self.assertIn('"conv"', r.stderr)
            self.assertIn("groups = 3", r.stderr)


if __name__ == "__main__":
    VKG_BIN = sys.argv.pop(1)
    unittest.main(verbosity=2)
