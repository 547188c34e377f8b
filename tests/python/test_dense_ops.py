"""The dense-head ops in Python (no GPU): Builder shape inference and checks, vkg.reference against
PyTorch, and the exporter's mappings of interpolate / Upsample / adaptive pooling / BatchNorm /
cat / permute / transpose / argmax.

Tolerances: the references compute in float64 (bilinear source coordinates in float32, as ATen
does), PyTorch in float32: |ref - torch| <= 4 ulp of the largest |x| for pooling and batch norm (a
few float32 roundings of values of that size); bilinear adds 2 ulp of the largest source coordinate
times the spread of x, since ATen's vectorized build may contract ratio * (o + 0.5) - 0.5 into an
fma (one ulp apart); layout ops and argmax are exact.
"""

import math
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
from vkg.errors import ExportError  # noqa: E402

ULP = float(np.finfo(np.float32).eps)


def close(test, got, want, x, what, ulps=4.0):
    tol = ulps * ULP * max(float(np.abs(x).max()) if x.size else 0.0, 1e-30)
    err = float(np.abs(np.asarray(got, np.float64) - want).max()) if want.size else 0.0
    test.assertEqual(got.shape, want.shape, what)
    test.assertLessEqual(err, tol, "%s: max error %.3g > %.3g" % (what, err, tol))


def run_graph(b, inputs):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "g.vkg")
        b.save(path)
        return reference.run(vkg.read_graph(path), inputs)


RESIZE_CASES = [  # (n, c, h, w, size, scale, align_corners)
    (1, 1, 1, 1, (5, 5), None, False), (1, 1, 1, 1, (5, 5), None, True),
    (2, 1, 5, 5, (1, 1), None, False), (2, 1, 5, 5, (1, 1), None, True),
    (1, 3, 37, 37, None, (0.5, 0.5), False), (1, 3, 37, 37, None, (0.5, 0.5), True),
    (2, 1, 10, 13, None, (1.7, 1.7), False), (2, 1, 10, 13, None, (1.7, 1.7), True),
    (2, 3, 7, 9, (16, 20), None, False), (2, 3, 7, 9, (16, 20), None, True),
    (1, 4, 31, 29, (8, 11), None, False), (3, 1, 6, 7, (6, 7), None, True),
    (1, 2, 37, 37, None, (4.0, 4.0), False), (2, 2, 16, 16, None, (2.0, 2.0), True),
    (1, 1, 20, 20, None, (0.3, 0.3), False), (1, 2, 3, 11, None, (2.5, 0.75), False),
    (2, 2, 10, 10, None, (1.05, 1.05), False), (0, 3, 4, 4, (8, 8), None, False),
]


class DenseReference(unittest.TestCase):
    def test_resize_bilinear_matches_torch(self):
        rng = np.random.default_rng(0)
        for n, c, h, w, size, scale, ac in RESIZE_CASES:
            x = rng.uniform(-2, 2, (n, c, h, w)).astype(np.float32)
            want = F.interpolate(torch.from_numpy(x), size=size, scale_factor=scale,
                                 mode="bilinear", align_corners=ac).numpy()
            got = reference.resize_bilinear_ref(x.astype(np.float64), size, scale, ac)
            close(self, got, want, x, "resize %s size=%s scale=%s ac=%s" % (x.shape, size, scale, ac),
                  4.0 + 4.0 * max(h, w))
            if (h, w) == tuple(got.shape[2:]):
                np.testing.assert_array_equal(got, x)  # same size: the identity

    def test_resize_through_a_graph(self):
        rng = np.random.default_rng(1)
        for n, c, h, w, size, scale, ac in RESIZE_CASES[:12]:
            b = Builder()
            x = b.input("x", ["batch", c, h, w])
            y = b.resize_bilinear(x, size=size, scale=scale, align_corners=ac)
            b.output(y, "y")
            want_hw = size or tuple(int(math.floor(d * s)) for d, s in zip((h, w), scale))
            self.assertEqual(y.shape, ("batch", c) + tuple(want_hw))
            xv = rng.uniform(-2, 2, (n + 1, c, h, w)).astype(np.float32)
            want = F.interpolate(torch.from_numpy(xv), size=size, scale_factor=scale,
                                 mode="bilinear", align_corners=ac).numpy()
            close(self, run_graph(b, [xv])["y"], want, xv, "graph resize %s" % (xv.shape,),
                  4.0 + 4.0 * max(h, w))

    def test_adaptive_avg_pool2d_matches_torch(self):
        rng = np.random.default_rng(2)
        for shape, size in [((1, 2, 37, 37), (18, 18)), ((2, 1, 5, 5), (1, 1)), ((2, 3, 1, 1), (5, 5)),
                            ((1, 2, 7, 9), (4, 4)), ((1, 1, 13, 11), (3, 7)), ((0, 2, 4, 4), (2, 2)),
                            ((1, 1, 5, 7), (9, 11))]:
            x = rng.uniform(-2, 2, shape).astype(np.float32)
            got = reference.adaptive_avg_pool2d_ref(x.astype(np.float64), size)
            close(self, got, F.adaptive_avg_pool2d(torch.from_numpy(x), size).numpy(), x,
                  "pool %s -> %s" % (shape, size))
            if shape[0]:  # F.interpolate(mode='area') is the same pooling
                close(self, got, F.interpolate(torch.from_numpy(x), size=size, mode="area").numpy(),
                      x, "area %s -> %s" % (shape, size))

    def test_batchnorm_matches_torch(self):
        rng = np.random.default_rng(3)
        for shape, affine in [((2, 3, 5, 7), True), ((4, 6), True), ((1, 16, 3, 3), False),
                              ((2, 5, 11), True), ((0, 3, 2, 2), True)]:
            c = shape[1]
            x = rng.uniform(-3, 3, shape).astype(np.float32)
            mean, var = rng.uniform(-1, 1, c).astype(np.float32), rng.uniform(0, 2, c).astype(np.float32)
            w, bias = rng.uniform(-1.5, 1.5, (2, c)).astype(np.float32)
            t = [torch.from_numpy(v) for v in (x, mean, var, w, bias)]
            want = F.batch_norm(t[0], t[1], t[2], t[3] if affine else None, t[4] if affine else None,
                                training=False, eps=1e-5).numpy()
            got = reference.batchnorm_ref(*(v.astype(np.float64) for v in (x, mean, var)),
                                          w.astype(np.float64) if affine else None,
                                          bias.astype(np.float64) if affine else None, 1e-5)
            scale = np.abs(x).max(initial=0) * np.abs(w / np.sqrt(var + 1e-5)).max() + 3
            self.assertLessEqual(np.abs(got - want).max(initial=0), 8 * ULP * scale, str(shape))

    def test_argmax_ties_and_nan(self):
        x = np.array([[[1.0, 3.0], [np.nan, 3.0], [3.0, np.nan]],
                      [[-np.inf, 0.0], [-np.inf, -0.0], [-np.inf, 0.0]]], np.float32)
        for axis in (0, 1, 2, -1):
            want = torch.argmax(torch.from_numpy(x), dim=axis).numpy()
            np.testing.assert_array_equal(reference.argmax_ref(x, axis), want)
        rng = np.random.default_rng(4)
        v = np.floor(rng.uniform(-4, 4, (3, 17, 13)) * 2).astype(np.float32) / 2
        v.flat[::37] = np.nan
        np.testing.assert_array_equal(reference.argmax_ref(v, 1), torch.argmax(torch.from_numpy(v), 1).numpy())

    def test_concat_and_permute_through_a_graph(self):
        rng = np.random.default_rng(5)
        for rank in range(1, 6):
            shape = [2, 3, 1, 4, 2][:rank]
            for axis in range(-rank, rank):
                b = Builder()
                shapes = [list(shape) for _ in range(3)]
                for i, s in enumerate(shapes):
                    s[axis] = i + 1
                ins = [b.input("x%d" % i, s) for i, s in enumerate(shapes)]
                b.output(b.concat(ins, axis), "y")
                vals = [rng.standard_normal(s).astype(np.float32) for s in shapes]
                np.testing.assert_array_equal(run_graph(b, vals)["y"], np.concatenate(vals, axis))
        for dims, perm in [((7, 13), (1, 0)), ((2, 5, 7, 24), (0, 3, 1, 2)), ((2, 24, 5, 7), (0, 2, 3, 1)),
                           ((2, 3, 1, 4, 5), (4, 2, 0, 3, 1)), ((2, 3, 2, 1, 3, 2), (5, 4, 3, 2, 1, 0)),
                           ((3, 4), (-1, 0))]:
            b = Builder()
            x = b.input("x", list(dims))
            y = b.permute(x, perm)
            b.output(y, "y")
            v = rng.standard_normal(dims).astype(np.float32)
            want = torch.from_numpy(v).permute(*perm).numpy()
            self.assertEqual(y.shape, want.shape)
            np.testing.assert_array_equal(run_graph(b, [v])["y"], want)


class DenseBuilder(unittest.TestCase):
    def test_shapes_with_a_symbolic_batch(self):
        b = Builder()
        x = b.input("x", ["batch", 384, 37, 37])
        self.assertEqual(b.resize_bilinear(x, scale=4.0).shape, ("batch", 384, 148, 148))
        self.assertEqual(b.resize_bilinear(x, size=518, align_corners=True).shape, ("batch", 384, 518, 518))
        self.assertEqual(b.adaptive_avg_pool2d(x, (18, 18)).shape, ("batch", 384, 18, 18))
        y = b.concat([x, x, x, x], axis=1)
        self.assertEqual(y.shape, ("batch", 1536, 37, 37))
        self.assertEqual(b.concat([x, x], axis=0).shape, (None, 384, 37, 37))
        self.assertEqual(b.concat([x] * 11, axis=-3).shape, ("batch", 384 * 11, 37, 37))  # chained
        m = b.constant("m", np.zeros(1536, np.float32))
        self.assertEqual(b.batchnorm(y, m, m, bias=m).shape, y.shape)
        lab = b.argmax(y)
        self.assertEqual((lab.shape, lab.dtype), (("batch", 37, 37), "i32"))
        self.assertEqual(b.permute(y, (0, 2, 3, 1)).shape, ("batch", 37, 37, 1536))
        bn = [n for n in b.nodes if n["op"] == "batchnorm"][0]
        self.assertEqual(bn["inputs"][3], None)  # absent weight before a present bias

    def test_bad_arguments_name_the_node(self):
        b = Builder()
        x = b.input("x", ["batch", 3, 37, 8])
        t = b.input("t", [2, 5])
        m = b.constant("m", np.zeros(4, np.float32))
        cases = [
            (lambda: b.resize_bilinear(x, name="r1"), "r1", "exactly one of size and scale"),
            (lambda: b.resize_bilinear(x, size=4, scale=2.0, name="r2"), "r2", "exactly one"),
            (lambda: b.resize_bilinear(x, size=(0, 4), name="r3"), "r3", "expected sizes 1..2^30"),
            (lambda: b.resize_bilinear(x, scale=0.01, name="r4"), "r4", "takes H = 37 to 0"),
            (lambda: b.resize_bilinear(t, size=4, name="r5"), "r5", "must be f32 (N, C, H, W)"),
            (lambda: b.adaptive_avg_pool2d(x, (1, 2, 3), name="p1"), "p1", "one value or two"),
            (lambda: b.batchnorm(x, m, m, name="b1"), "b1", "C = 3"),
            (lambda: b.concat([x], 1, name="c1"), "c1", "2 or more tensors"),
            (lambda: b.concat([x, t], 1, name="c2"), "c2", "one rank"),
            (lambda: b.concat([t, b.input("u", [3, 5])], 1, name="c3"), "c3", "differ in dim 0"),
            (lambda: b.concat([t, t], 2, name="c4"), "c4", "axis 2 outside"),
            (lambda: b.permute(x, (0, 1, 1, 2), name="q1"), "q1", "not a permutation"),
            (lambda: b.permute(x, (0, 1), name="q2"), "q2", "not a permutation"),
            (lambda: b.argmax(x, 4, name="a1"), "a1", "axis 4 outside"),
            (lambda: b.argmax(b.input("e", [2, 0, 3]), name="a2"), "a2", "which is empty"),
        ]
        for fn, node, msg in cases:
            with self.assertRaises(ExportError) as cm:
                fn()
            self.assertIsInstance(cm.exception, ValueError)
            self.assertIn("node %r" % node, str(cm.exception))
            self.assertIn(msg, str(cm.exception))


class SegHead(nn.Module):
    """The BN segmentation head's dense part (model-spec 1.5) on tokens: tokens -> NCHW, the
    pyramid resizes, concat, BatchNorm, logits resized to the image, labels."""

    def __init__(self, d=8):
        super().__init__()
        self.bn = nn.BatchNorm2d(4 * d)
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.pool = nn.AdaptiveAvgPool2d((3, None))

    def forward(self, t0, t1):
        n, d = t0.shape[0], t0.shape[2]
        a = t0.reshape(n, 5, 7, d).permute(0, 3, 1, 2)
        b = t1.transpose(1, 2).reshape(n, d, 5, 7)
        maps = [F.interpolate(a, scale_factor=4, mode="bilinear", align_corners=False), self.up(b),
                a, F.interpolate(b, scale_factor=0.5, mode="area")]
        size = maps[0].shape[2:]
        maps = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
        y = self.bn(torch.cat(maps, dim=1))  # (conv_seg would make class logits of it)
        up = F.interpolate(y, size=(23, 31), mode="bilinear", align_corners=True)
        return up, torch.argmax(up, dim=1), self.pool(y), torch.permute(y, (0, 2, 3, 1))


def randomize_bn(bn, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1, generator=g)
        bn.running_var.uniform_(0.2, 2, generator=g)
        bn.weight.uniform_(-1.5, 1.5, generator=g)
        bn.bias.uniform_(-1, 1, generator=g)


class DenseExport(unittest.TestCase):
    def export(self, module, example):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.vkg")
            vkg.export(module, example, path)
            return vkg.read_graph(path)

    def check(self, module, example, batches=(2, 3), ulps=16.0):
        g = self.export(module, example)
        for bs in batches:
            ins = [torch.randn(bs, *t.shape[1:]) for t in example]
            with torch.no_grad():
                want = module(*ins)
            want = [want] if isinstance(want, torch.Tensor) else list(want)
            got = reference.run(g, [t.numpy() for t in ins])
            for (k, v), w in zip(got.items(), want):
                w = w.numpy()
                if v.dtype == np.int32:
                    np.testing.assert_array_equal(v, w, err_msg=k)
                else:
                    close(self, v, w, np.abs(w) + max(float(np.abs(i.numpy()).max()) for i in ins), k, ulps)
        return g

    def test_seg_head(self):
        torch.manual_seed(0)
        m = SegHead().eval()
        randomize_bn(m.bn, 1)
        g = self.check(m, (torch.randn(2, 35, 8), torch.randn(2, 35, 8)))
        ops = [n.op for n in g.nodes]
        for op in ("resize_bilinear", "adaptive_avg_pool2d", "batchnorm", "concat", "permute", "argmax"):
            self.assertIn(op, ops)
        self.assertEqual(g.tensors[g.outputs[1]].dtype, "i32")

    def test_interpolate_forms(self):
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.u1 = nn.Upsample(size=(9, 4), mode="bilinear")
                self.u2 = nn.UpsamplingBilinear2d(scale_factor=2)
                self.u3 = nn.Upsample(scale_factor=1.7, mode="bilinear", recompute_scale_factor=True)

            def forward(self, x):
                return (self.u1(x), self.u2(x), self.u3(x), F.interpolate(x, scale_factor=(1.3, 0.6), mode="bilinear"),
                        F.interpolate(x, size=5, mode="area"), F.adaptive_avg_pool2d(x, 4))

        torch.manual_seed(2)
        g = self.check(M().eval(), (torch.randn(2, 3, 7, 10),))
        rs = [n for n in g.nodes if n.op == "resize_bilinear"]
        self.assertEqual([("scale" in n.attrs, n.attrs.get("align_corners", 0)) for n in rs],
                         [(False, 0), (True, 1), (False, 0), (True, 0)])

    def test_batchnorm_forms(self):
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.bn = nn.BatchNorm2d(4)
                self.bn1 = nn.BatchNorm1d(4, affine=False)

            def forward(self, x):
                y = self.bn(x)
                z = F.batch_norm(x, self.bn.running_mean, self.bn.running_var, self.bn.weight, None,
                                 False, 0.1, 1e-3)
                return y, z, self.bn1(x.flatten(2))

        torch.manual_seed(3)
        m = M().eval()
        randomize_bn(m.bn, 4)
        with torch.no_grad():
            m.bn1.running_var.uniform_(0.5, 2)
        self.check(m, (torch.randn(2, 4, 5, 3),))

    def test_layout_forms(self):
        class M(nn.Module):
            def forward(self, x, y):
                a = torch.cat([x, y], 1)
                b = torch.concat((x, x * 2.0, x), dim=-1)
                c = torch.cat([x] * 10, 2)
                return (a.permute(0, 2, 1, 3), torch.permute(b, (3, 1, 0, 2)), c.transpose(1, 3),
                        torch.transpose(a, 0, 2), a.argmax(1), torch.argmax(b, dim=-1))

        torch.manual_seed(5)
        self.check(M().eval(), (torch.randn(2, 3, 4, 5), torch.randn(2, 2, 4, 5)))

    def test_unsupported_forms_are_named(self):
        class Nearest(nn.Module):
            def forward(self, x):
                return F.interpolate(x, scale_factor=2, mode="nearest")

        class Train(nn.Module):
            def __init__(self):
                super().__init__()
                self.norm = nn.BatchNorm2d(3)

            def forward(self, x):
                return self.norm(x)

        class NoDim(nn.Module):
            def forward(self, x):
                return x.argmax()

        class KeepDim(nn.Module):
            def forward(self, x):
                return torch.argmax(x, 1, keepdim=True)

        x = torch.randn(2, 3, 4, 5)
        for m, msg in [(Nearest(), "mode='nearest'"), (Train().train(), "training mode"),
                       (NoDim(), "argmax without dim"), (KeepDim(), "keepdim=True")]:
            with self.assertRaises(ExportError) as cm:
                vkg.export(m, (x,))
            self.assertIn(msg, str(cm.exception))
        with self.assertRaises(ExportError) as cm:
            vkg.export(Train().train(), (x,))
        self.assertIn("module 'norm' (BatchNorm2d)", str(cm.exception))


if __name__ == "__main__":
    unittest.main()
