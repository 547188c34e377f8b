"""Builder + vkg.reference for the ops attention (plain, packed), patchify, insert_tokens, slice,
checked against PyTorch formulations (docs/graph-format.md op table)."""

import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools",
                                "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vkg import reference  # noqa: E402
from vkg.builder import Builder  # noqa: E402
from vkg.format import read_graph  # noqa: E402


def run(b, inputs):
    return reference.run(read_graph(b.to_bytes()), inputs)


def torch_attention(q, k, v, heads, scale, mask=None, kp=None):
    n, tq, hd = q.shape
    d = hd // heads
    sh = lambda t: t.reshape(n, t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    s = sh(q) @ sh(k).transpose(-1, -2) * scale
    if mask is not None:
        s = s + (mask if mask.dim() == 2 else mask[:, None])
    if kp is not None:
        s = s + kp[:, None, None, :]
    return (s.softmax(-1) @ sh(v)).transpose(1, 2).reshape(n, tq, hd)


class OpsTest(unittest.TestCase):
    def setUp(self):
        self.rng = np.random.default_rng(0)

    def r(self, *shape):
        return self.rng.standard_normal(shape)

    def test_attention_plain_with_masks(self):
        n, tq, tk, heads, d = 2, 5, 7, 3, 4
        q, k, v = self.r(n, tq, heads * d), self.r(n, tk, heads * d), self.r(n, tk, heads * d)
        mask2, mask3, kp = self.r(tq, tk), self.r(n, tq, tk), self.r(n, tk)
        kp[1, 3] = -1e9
        T = torch.from_numpy
        for mask, use_kp, scale in ((None, False, None), (mask2, False, 0.3), (mask3, True, None),
                                    (None, True, 0.7)):
            b = Builder()
            iq = b.input("q", ["batch", tq, heads * d])
            ik = b.input("k", ["batch", tk, heads * d])
            iv = b.input("v", ["batch", tk, heads * d])
            m = None if mask is None else b.constant("mask", mask.astype(np.float32))
            p = b.input("kp", ["batch", tk]) if use_kp else None
            b.output(b.attention(iq, ik, iv, heads, scale=scale, mask=m, key_padding=p), "y")
            ins = {"q": q, "k": k, "v": v}
            if use_kp:
                ins["kp"] = kp
            got = run(b, ins)["y"]
            mask32 = None if mask is None else T(mask.astype(np.float32)).double()
            want = torch_attention(T(q), T(k), T(v), heads, scale or d ** -0.5, mask32,
                                   T(kp) if use_kp else None).numpy()
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)

    def test_attention_packed_matches_plain(self):
        n, t, heads, d = 2, 6, 2, 8
        qkv = self.r(n, t, 3 * heads * d)
        b = Builder()
        x = b.input("qkv", ["batch", t, 3 * heads * d])
        y = b.attention_packed(x, heads, scale=0.25)
        self.assertEqual(y.shape, ("batch", t, heads * d))
        b.output(y, "y")
        got = run(b, {"qkv": qkv})["y"]
        T = torch.from_numpy
        w = heads * d
        want = torch_attention(T(qkv[..., :w]), T(qkv[..., w:2 * w]), T(qkv[..., 2 * w:]), heads,
                               0.25).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        g = read_graph(b.to_bytes())
        self.assertEqual(g.nodes[0].attrs, {"heads": 2, "scale": 0.25, "packed": 1})

    def test_patchify_then_linear_is_conv(self):
        n, c, h, w, p, cout = 2, 3, 28, 42, 14, 5
        x = self.r(n, c, h, w)
        wt = self.r(cout, c, p, p).astype(np.float32)
        bias = self.r(cout).astype(np.float32)
        b = Builder()
        t = b.patchify(b.input("x", ["batch", c, h, w]), p)
        self.assertEqual(t.shape, ("batch", 6, c * p * p))
        y = b.linear(t, b.constant("w", wt.reshape(cout, -1)), b.constant("b", bias))
        b.output(y, "y")
        got = run(b, {"x": x})["y"]
        conv = F.conv2d(torch.from_numpy(x), torch.from_numpy(wt).double(),
                        torch.from_numpy(bias).double(), stride=p)
        want = conv.flatten(2).transpose(1, 2).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)

    def test_insert_tokens(self):
        x, t1, tn = self.r(3, 4, 5), self.r(1, 2, 5), self.r(3, 2, 5)
        for tok, idx in ((t1, 0), (t1, 1), (tn, 4), (tn, 2)):
            b = Builder()
            xi = b.input("x", ["batch", 4, 5])
            ti = b.constant("t", tok.astype(np.float32)) if tok.shape[0] == 1 else \
                b.input("t", ["batch", 2, 5])
            y = b.insert_tokens(xi, ti, idx)
            self.assertEqual(y.shape, ("batch", 6, 5))
            b.output(y, "y")
            ins = {"x": x}
            if tok.shape[0] != 1:
                ins["t"] = tok
            got = run(b, ins)["y"]
            tt = np.broadcast_to(tok.astype(np.float32).astype(np.float64) if tok.shape[0] == 1
                                 else tok, (3, 2, 5))
            want = np.concatenate([x[:, :idx], tt, x[:, idx:]], axis=1)
            np.testing.assert_array_equal(got, want)
        b = Builder()
        with self.assertRaisesRegex(ValueError, "index 5"):
            b.insert_tokens(b.input("x", [1, 4, 5]), b.constant("t", t1.astype(np.float32)), 5)

    def test_slice(self):
        x = self.r(2, 7, 3)
        for axis, s, e in ((1, 0, 1), (1, 1, 5), (1, -6, 7), (-1, 1, -1), (0, 1, 2), (1, 3, 3)):
            b = Builder()
            y = b.slice(b.input("x", [2, 7, 3]), axis, s, e)
            b.output(y, "y")
            got = run(b, {"x": x})["y"]
            idx = [slice(None)] * 3
            idx[axis] = slice(s, e)
            np.testing.assert_array_equal(got, x[tuple(idx)])
            self.assertEqual(tuple(y.shape), got.shape)
        b = Builder()
        with self.assertRaisesRegex(ValueError, "out of range"):
            b.slice(b.input("x", [2, 7, 3]), 1, 2, 8)

    def test_builder_checks(self):
        b = Builder()
        q = b.input("q", [1, 4, 6])
        with self.assertRaisesRegex(ValueError, "multiple of heads"):
            b.attention(q, q, q, heads=4)
        with self.assertRaisesRegex(ValueError, "multiple of patch"):
            b.patchify(b.input("x", [1, 3, 20, 28]), 14)
        with self.assertRaisesRegex(ValueError, "mask"):
            b.attention(q, q, q, heads=2, mask=b.constant("m", np.zeros((4, 5), np.float32)))


if __name__ == "__main__":
    unittest.main()
