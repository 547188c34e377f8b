"""The attention op in the C runtime against torch.nn.MultiheadAttention.

A graph is built with the Builder the way a converter would lower nn.MultiheadAttention: q, k, v
projections (separate Linears, from in_proj_weight) -> attention -> out_proj; run by `vkg run` on the
Vulkan device. Lengths 1, 7, 31, 65, 257, 1370, batch > 1, cross-attention (Tq != Tk), an additive
float attn_mask and a boolean key_padding_mask (lowered to an additive -inf mask).
Run by ctest as `python3 tests/e2e/test_attention_mha.py VKG_BINARY`. Tolerance: max |vkg - torch| <=
2e-6 x (1 + max |torch|) per case (fp32 both sides, different summation orders).
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

from vkg import Builder  # noqa: E402

VKG_BIN = None


def run_case(tq, tk, batch, d, heads, mask=False, padding=False, seed=0):
    torch.manual_seed(seed)
    mha = torch.nn.MultiheadAttention(d, heads, batch_first=True).eval()
    q_in, kv_in = torch.randn(batch, tq, d), torch.randn(batch, tk, d)
    attn_mask = torch.randn(tq, tk) if mask else None
    kpm = None
    if padding:
        kpm = torch.zeros(batch, tk, dtype=torch.bool)
        kpm[:, tk // 2 + 1:] = True  # pad the second half of the keys (never all of them)
    with torch.no_grad():
        want, _ = mha(q_in, kv_in, kv_in, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=False)
    w, bias = mha.in_proj_weight.detach().numpy(), mha.in_proj_bias.detach().numpy()
    b = Builder()
    xq = b.input("query", ["batch", tq, d])
    xkv = b.input("keys", ["batch", tk, d])
    proj = []
    for i, (src, nm) in enumerate(((xq, "q"), (xkv, "k"), (xkv, "v"))):
        proj.append(b.linear(src, b.constant(nm + "_proj.weight", w[i * d:(i + 1) * d]),
                             b.constant(nm + "_proj.bias", bias[i * d:(i + 1) * d]), name=nm + "_proj"))
    m = b.constant("attn_mask", attn_mask.numpy()) if mask else None
    kp = None
    inputs = {"query": q_in.numpy(), "keys": kv_in.numpy()}
    if padding:
        kp = b.input("key_padding", ["batch", tk])
        inputs["key_padding"] = np.where(kpm.numpy(), -np.inf, 0.0).astype(np.float32)
    o = b.attention(proj[0], proj[1], proj[2], heads, mask=m, key_padding=kp, name="attn")
    o = b.linear(o, b.constant("out_proj.weight", mha.out_proj.weight.detach().numpy()),
                 b.constant("out_proj.bias", mha.out_proj.bias.detach().numpy()), name="out_proj")
    b.output(o, "output")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mha.vkg")
        b.save(path)
        args = [VKG_BIN, "run", path, "--out", os.path.join(tmp, "out")]
        for name, arr in inputs.items():
            p = os.path.join(tmp, name + ".npy")
            np.save(p, arr)
            args += ["--input", "%s=%s" % (name, p)]
        r = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, VKG_VALIDATION="1"))
        if r.returncode != 0:
            raise AssertionError("vkg run failed: %s%s" % (r.stdout, r.stderr))
        got = np.load(os.path.join(tmp, "out", "output.npy"))
    want = want.numpy()
    return got, want


class MultiheadAttention(unittest.TestCase):
    def check(self, *args, **kw):
        got, want = run_case(*args, **kw)
        self.assertEqual(got.shape, want.shape)
        err = float(np.abs(got - want).max())
        bound = 2e-6 * (1.0 + float(np.abs(want).max()))
        print("tq=%d tk=%d batch=%d d=%d heads=%d %s: max err %.3g (bound %.3g)"
              % (args[0], args[1], args[2], args[3], args[4], kw, err, bound))
        self.assertLessEqual(err, bound)

    def test_self_lengths(self):
        for t in (1, 7, 31, 65, 257):
            self.check(t, t, 2, 64, 4, seed=t)

    def test_self_1370_vit_heads(self):
        self.check(1370, 1370, 1, 384, 6, seed=5)

    def test_cross_attention(self):
        self.check(31, 65, 3, 256, 8, seed=6)     # the decoder's shape: 31 queries, 65 keys, head dim 32
        self.check(7, 257, 2, 96, 3, seed=7)

    def test_masks(self):
        self.check(31, 31, 2, 64, 2, mask=True, seed=8)
        self.check(7, 65, 3, 64, 2, padding=True, seed=9)
        self.check(65, 31, 2, 128, 1, mask=True, padding=True, seed=10)


if __name__ == "__main__":
    VKG_BIN = sys.argv.pop(1)
    unittest.main(verbosity=2)
