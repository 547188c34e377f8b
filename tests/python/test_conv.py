"""conv2d and conv_transpose2d without a GPU: Builder shape inference and checks, vkg.reference
against PyTorch, and the exporter's mappings (nn.Conv2d, nn.ConvTranspose2d, F.conv2d,
F.conv_transpose2d) read back and evaluated.

Tolerance: rtol=1e-5, atol=1e-5 between PyTorch's float32 output and vkg.reference (float64).
"""

import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools",
                                "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vkg  # noqa: E402
from vkg import reference  # noqa: E402
from vkg.builder import Builder  # noqa: E402

RTOL = ATOL = 1e-5


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


# (C, O, kernel, stride, padding, dilation, groups, H, W)
CONV_CASES = [
    (1, 1, 1, 1, 0, 1, 1, 1, 1),
    (7, 13, 1, 1, 0, 1, 1, 5, 9),
    (5, 11, 3, 1, 1, 1, 1, 17, 23),
    (6, 9, 3, 2, 1, 1, 1, 15, 10),
    (6, 4, 3, 1, 1, 1, 2, 9, 8),
    (3, 6, (2, 3), (1, 2), (0, 1), 1, 3, 7, 11),
    (4, 5, 3, 1, 2, 2, 1, 12, 9),
    (3, 4, 3, 1, (3, 2), 1, 1, 5, 6),
    (3, 8, 14, 14, 0, 1, 1, 28, 42),
]
# (C, O, kernel, stride, padding, output_padding, dilation, groups, H, W)
CONVT_CASES = [
    (5, 7, 2, 2, 0, 0, 1, 1, 6, 5),
    (12, 8, 4, 4, 0, 0, 1, 1, 3, 4),
    (6, 4, 2, 2, 0, 0, 1, 2, 4, 6),
    (6, 5, 3, 2, 1, 1, 1, 1, 7, 5),
    (4, 6, 3, 2, 0, 0, 1, 2, 5, 3),
    (3, 4, 2, 3, (2, 1), (1, 2), 2, 1, 4, 5),
    (2, 3, 2, 1, 3, 0, 1, 1, 9, 9),
]


def run_graph(b, inputs):
    return reference.run(b.to_bytes(), inputs)


class BuilderReference(unittest.TestCase):
    def test_conv2d_against_torch(self):
        rng = np.random.default_rng(1)
        for i, (c, o, k, s, p, d, g, h, w) in enumerate(CONV_CASES):
            for act, use_res, f16 in ((None, False, False), ("relu", True, i % 2 == 0)):
                k2 = pair(k)
                wt = rng.standard_normal((o, c // g) + k2).astype(np.float32)
                bias = rng.standard_normal(o).astype(np.float32)
                if f16:
                    wt = wt.astype(np.float16)
                x = rng.standard_normal((2, c, h, w)).astype(np.float32)
                want = F.conv2d(torch.tensor(x), torch.tensor(wt.astype(np.float32)),
                                torch.tensor(bias), pair(s), pair(p), pair(d), g)
                if act:
                    want = torch.relu(want)
                bld = Builder()
                xi = bld.input("x", ["batch", c, h, w])
                res = None
                if use_res:
                    r = rng.standard_normal(tuple(want.shape)).astype(np.float32)
                    res = bld.input("r", ["batch"] + list(want.shape[1:]))
                    want = want + torch.tensor(r)
                y = bld.conv2d(xi, wt, bias, stride=s, padding=p, dilation=d, groups=g,
                               activation=act, residual=res, name="conv")
                self.assertEqual(y.shape, ("batch",) + tuple(want.shape[1:]))
                bld.output(y, "y")
                ins = {"x": x, "r": r} if use_res else {"x": x}
                got = run_graph(bld, ins)["y"]
                np.testing.assert_allclose(got, want.numpy(), rtol=RTOL, atol=ATOL,
                                           err_msg="case %d act=%s" % (i, act))

    def test_conv_transpose2d_against_torch(self):
        rng = np.random.default_rng(2)
        for i, (c, o, k, s, p, op, d, g, h, w) in enumerate(CONVT_CASES):
            wt = rng.standard_normal((c, o // g) + pair(k)).astype(np.float32)
            bias = rng.standard_normal(o).astype(np.float32) if i % 2 == 0 else None
            x = rng.standard_normal((3, c, h, w)).astype(np.float32)
            want = F.conv_transpose2d(torch.tensor(x), torch.tensor(wt),
                                      None if bias is None else torch.tensor(bias), pair(s), pair(p),
                                      pair(op), g, pair(d))
            bld = Builder()
            xi = bld.input("x", ["batch", c, h, w])
            y = bld.conv_transpose2d(xi, wt, bias, stride=s, padding=p, output_padding=op,
                                     dilation=d, groups=g)
            self.assertEqual(y.shape, ("batch",) + tuple(want.shape[1:]))
            bld.output(y, "y")
            got = run_graph(bld, {"x": x})["y"]
            np.testing.assert_allclose(got, want.numpy(), rtol=RTOL, atol=ATOL,
                                       err_msg="case %d" % i)

    def test_symbolic_spatial_dims(self):
        bld = Builder()
        x = bld.input("x", ["batch", 3, "h", "w"])
        y = bld.conv2d(x, np.ones((4, 3, 3, 3), np.float32), stride=2, padding=1)
        self.assertEqual(y.shape, ("batch", 4, None, None))
        z = bld.conv_transpose2d(y, np.ones((4, 2, 2, 2), np.float32), stride=2)
        self.assertEqual(z.shape, ("batch", 2, None, None))
        bld.output(z, "z")
        out = run_graph(bld, {"x": np.ones((1, 3, 10, 6), np.float32)})["z"]
        self.assertEqual(out.shape, (1, 2, 10, 6))

    def test_refusals_name_the_node(self):
        bld = Builder()
        x = bld.input("x", [1, 4, 8, 8])
        cases = [
            (lambda: bld.conv2d(x, np.ones((4, 3, 3, 3), np.float32), name="c1"), "expected C=3"),
            (lambda: bld.conv2d(x, np.ones((3, 2, 3, 3), np.float32), groups=2, name="c2"),
             "not a multiple of groups=2"),
            (lambda: bld.conv2d(x, np.ones((4, 4, 9, 9), np.float32), name="c3"), "<= 0"),
            (lambda: bld.conv2d(x, np.ones((4, 4, 3, 3), np.float32), stride=0, name="c4"),
             "stride [0, 0] outside 1..65535"),
            (lambda: bld.conv2d(x, np.ones((4, 4, 3, 3), np.float32), activation="gelu",
                                name="c5"), "activation 'gelu'"),
            (lambda: bld.conv2d(x, np.ones((4, 4, 3, 3), np.float32), np.ones(5), name="c6"),
             "must have shape (4)"),
            (lambda: bld.conv2d(x, np.ones((4, 4, 3, 3), np.float32), padding=(1, 2, 3), name="c7"),
             "is not an int or a pair"),
            (lambda: bld.conv_transpose2d(x, np.ones((3, 2, 2, 2), np.float32), name="t1"),
             "expected C=3"),
            (lambda: bld.conv_transpose2d(x, np.ones((4, 2, 2, 2), np.float32), stride=2,
                                          output_padding=2, name="t2"), "must be smaller"),
            (lambda: bld.conv_transpose2d(x, np.ones((4, 2, 2, 2), np.float32), groups=3,
                                          name="t3"), "not a multiple of groups=3"),
            (lambda: bld.conv_transpose2d(x, np.ones((4, 2, 1, 1), np.float32), padding=5,
                                          name="t4"), "gives an output H of -2"),
        ]
        for fn, msg in cases:
            with self.assertRaises(vkg.ExportError) as cm:
                fn()
            self.assertIsInstance(cm.exception, ValueError)
            self.assertIn(msg, str(cm.exception))
            self.assertIn("node '", str(cm.exception))


class Net(nn.Module):
    """A DPT-like chain: 1x1 projection, transposed upsampling (k = s), 3x3 without bias, a
    residual conv unit, a strided conv, a general transposed conv, functional forms."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(6, 8, 1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.rn = nn.Conv2d(8, 5, 3, padding=1, bias=False)
        self.c1 = nn.Conv2d(5, 5, 3, padding=1)
        self.down = nn.Conv2d(5, 7, 3, stride=2, padding=1, groups=1)
        self.gen = nn.ConvTranspose2d(7, 4, 3, stride=2, padding=1, output_padding=1)
        self.same = nn.Conv2d(4, 4, 3, padding="same", dilation=2, groups=2)
        self.fw = nn.Parameter(torch.randn(3, 4, 1, 1))
        self.tw = nn.Parameter(torch.randn(3, 2, 2, 2))

    def forward(self, x):
        y = self.rn(self.up(self.proj(x)))
        y = y + self.c1(torch.relu(y))
        y = self.same(self.gen(self.down(y)))
        y = F.conv2d(y, self.fw, None, 1, 0)
        return F.conv_transpose2d(y, self.tw, stride=2)


class Export(unittest.TestCase):
    def test_export_matches_torch(self):
        torch.manual_seed(0)
        net = Net().eval()
        ex = torch.randn(2, 6, 5, 7)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "conv.vkg")
            vkg.export(net, (ex,), path)
            g = vkg.read_graph(path)
        ops = [n.op for n in g.nodes]
        self.assertEqual(ops.count("conv2d"), 6)
        self.assertEqual(ops.count("conv_transpose2d"), 3)
        for bs in (2, 3):
            x = torch.randn(bs, 6, 5, 7)
            with torch.no_grad():
                want = net(x).numpy()
            got = reference.run(g, [x.numpy()])["output"]
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

    def test_fp16_weights(self):
        torch.manual_seed(1)
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(4, 2, 2, stride=2))
        b = vkg.export(net.eval(), (torch.randn(1, 3, 6, 6),), None, fp16=True)
        dts = {t.name: t.dtype for t in b.tensors if t.role == "constant"}
        self.assertEqual(dts["0.weight"], "f16")
        self.assertEqual(dts["0.bias"], "f32")
        self.assertEqual(dts["1.weight"], "f16")

    def test_batchnorm_folded_into_conv(self):
        """Conv2d -> BatchNorm2d (eval): the BN is folded into the conv's weight and bias; a BN
        whose conv output is also used elsewhere, or after a non-conv, stays a batchnorm node."""

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.c1, self.bn1 = nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
                self.c2, self.bn2 = nn.Conv2d(5, 4, 1), nn.BatchNorm2d(4)
                self.bn3 = nn.BatchNorm2d(4)

            def forward(self, x):
                y = torch.relu(self.bn1(self.c1(x)))
                z = self.c2(y)
                return self.bn3(torch.relu(self.bn2(z))) + z

        torch.manual_seed(3)
        net = Net()
        for bn in (net.bn1, net.bn2, net.bn3):
            with torch.no_grad():
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.2, 2)
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.5, 0.5)
        net.eval()
        x = torch.randn(2, 3, 7, 6)
        g = vkg.read_graph(vkg.export(net, (x,), None).to_bytes())
        ops = [n.op for n in g.nodes]
        # bn1 folded into c1 (its only user); c2's output feeds bn2 and the residual: not folded
        self.assertEqual(ops.count("batchnorm"), 2, ops)
        with torch.no_grad():
            want = net(x).numpy()
        got = reference.run(g, [x.numpy()])["output"]
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)

    def test_padding_mode_refused(self):
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
        with self.assertRaises(vkg.ExportError) as cm:
            vkg.export(net, (torch.randn(1, 3, 6, 6),), None)
        self.assertIn("padding_mode='reflect'", str(cm.exception))
        self.assertIn("module '0'", str(cm.exception))

    def test_asymmetric_same_refused(self):
        net = nn.Sequential(nn.Conv2d(3, 4, 2, padding="same"))
        with self.assertRaises(vkg.ExportError) as cm:
            vkg.export(net, (torch.randn(1, 3, 6, 6),), None)
        self.assertIn("pads asymmetrically", str(cm.exception))


if __name__ == "__main__":
    unittest.main()
