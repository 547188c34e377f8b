"""vkg.models.DeepSeekViT (DeepSeek-MoE ViT encoder, issue 9) exported with vkg.deepseek_vit and run
by `vkg run` on the Vulkan device, against the PyTorch reference module.

Run by ctest as `python3 tests/e2e/test_deepseek_vit_run.py VKG_BINARY [CASE ...]`. Cases: a small
configuration (D 160, 4 blocks, 4 heads of 40, E 16, w 40, S 2, M 2, 56x56 images) and ViT-H's
real widths (D 1280, 16 heads of 80: the attention kernel's general path, E 128, w 40, S 4, M 4)
with 2 blocks on 56x56 images, in fp32 and with f16 weights; every router variant; a zero router
(ties to the lower experts); the upcycling identity (routers bypassed through graph inputs, every
expert on at weight 1 = the dense ViT); and the command-line path (upcycle, then export).

Tolerances (the issue's): fp32 max |vkg - torch| <= 1e-4 x RMS(torch) for `output` and every tap;
f16 weights <= 2e-2 x RMS against the module whose weights are rounded where the graph stores f16
(the routers stay f32; also reported against the fp32 module). ids must be equal; every random case
first checks that no block's top-M decision is within 1e-5 of a tie (float64 logits).
"""
import os
import subprocess
import sys
import tempfile
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
PYDIR = os.path.join(HERE, "..", "..", "tools", "python")
sys.path.insert(0, PYDIR)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vkg import deepseek_vit as dv  # noqa: E402
import vkgrun  # noqa: E402  (tests/e2e/vkgrun.py)

VKG_BIN = None
SMALL = dict(dim=160, depth=4, heads=4, patch=14, experts=16, shared=2, top_m=2, hidden=640)
VIT_H2 = dv.vit_h_config(depth=2)


def rms(a):
    return float(np.sqrt(np.mean(np.square(np.asarray(a, dtype=np.float64)))))


router_margin = dv.router_margin


def image(batch, h, w, seed):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def vkg_run(path, inputs, tmp):
    """`vkg run` with the validation layer; returns {output name: array}."""
    t0 = time.time()
    res = vkgrun.run(VKG_BIN, path, inputs, os.path.join(tmp, "out"))
    print("  vkg run %s: %.1f s" % (os.path.basename(path), time.time() - t0))
    return {n: v[0] for n, v in res.items()}


def upcycled_pair(cfg, seed):
    dense = dv.init_random(dv.DeepSeekViT(**dict(cfg, ffn="dense")), seed).eval()
    moe = dv.DeepSeekViT(**cfg).eval()
    dv.load_checkpoint(moe, dv.upcycle_state_dict(dense.state_dict(), moe.n_experts,
                                                  moe.n_shared, router_cols=moe.router_cols))
    return dense, moe


class DeepSeekViTRun(unittest.TestCase):
    def compare(self, what, got, want, bound):
        self.assertEqual(got.shape, want.shape, what)
        err = float(np.abs(got.astype(np.float64) - want).max())
        r = rms(want)
        print("  %s: max err %.3g = %.3g x RMS (bound %g)" % (what, err, err / r, bound))
        self.assertLessEqual(err, bound * r, "%s: max err %.3g > %g x RMS %.3g"
                             % (what, err, bound, r))

    def check(self, model, size, batch=1, seed=0, taps=(), fp16=False, ties_ok=False):
        """Exports model (routing outputs on), runs it, compares output, taps and every block's
        ids / gates with PyTorch."""
        x = image(batch, size[0], size[1], seed)
        ref = dv.round_weights_f16(model) if fp16 else model
        if not ties_ok:
            self.assertGreater(router_margin(ref, x), 1e-5, "test data too close to a tie")
        with torch.no_grad():
            want, want_taps = ref.forward_features(x, taps=taps)
        bound = 2e-2 if fp16 else 1e-4
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "deepseek_vit.vkg")
            dv.export_deepseek_vit(model, size, taps, fp16=fp16, routing=True, path=path)
            got = vkg_run(path, {"image": x.numpy()}, tmp)
        tag = "%dx%d batch %d%s" % (size[0], size[1], batch, " fp16" if fp16 else "")
        self.compare(tag + " output", got["output"], want.numpy(), bound)
        for t in taps:
            self.compare(tag + " block%d" % t, got["block%d" % t], want_taps[t].numpy(), bound)
        if fp16:
            with torch.no_grad():
                want32 = model(x).numpy()
            self.compare(tag + " output against the fp32 module", got["output"], want32, bound)
        for i, blk in enumerate(ref.blocks):
            ids, gates = blk.mlp.last_routing
            self.assertEqual(got["blocks.%d.mlp.ids" % i].dtype, np.int32)
            np.testing.assert_array_equal(got["blocks.%d.mlp.ids" % i], ids.numpy(),
                                          "block %d ids" % i)
            np.testing.assert_allclose(got["blocks.%d.mlp.gates" % i], gates.numpy(),
                                       rtol=1e-3 if fp16 else 1e-5, atol=1e-6)
        return got

    # -- the two configurations --
    def test_small(self):
        m = dv.build_model("random:1", **dict(SMALL, layerscale=True))
        self.check(m, (56, 56), batch=2, seed=2, taps=[2])

    def test_small_fp16(self):
        m = dv.build_model("random:3", **dict(SMALL, layerscale=True))
        self.check(m, (56, 56), batch=2, seed=4, fp16=True)

    def test_vit_h_widths(self):
        m = dv.build_model("random:5", **VIT_H2)
        self.check(m, (56, 56), seed=6, taps=[1])

    def test_vit_h_widths_fp16(self):
        m = dv.build_model("random:7", **VIT_H2)
        self.check(m, (56, 56), seed=8, fp16=True)

    # -- router variants (softmax / sigmoid, all / routed columns, renorm, scale) --
    def variant(self, seed, **kw):
        m = dv.build_model("random:%d" % seed, **dict(SMALL, depth=2, **kw))
        self.check(m, (42, 56), seed=seed + 1)

    def test_router_softmax_all(self):
        self.variant(10)

    def test_router_sigmoid_all(self):
        self.variant(11, score="sigmoid")

    def test_router_softmax_routed(self):
        self.variant(12, router_cols="routed")

    def test_router_sigmoid_routed_renorm(self):
        self.variant(13, score="sigmoid", router_cols="routed", renorm=True)

    def test_router_renorm_scale_swiglu(self):
        self.variant(14, renorm=True, scale=2.5, activation="swiglu")

    def test_zero_router_ties(self):
        """All router logits 0: every token takes the lowest routed experts (global 2 and 3)."""
        m = dv.build_model("random:15", **dict(SMALL, depth=2))
        with torch.no_grad():
            for blk in m.blocks:
                blk.mlp.router.weight.zero_()
        got = self.check(m, (28, 28), batch=2, seed=16, ties_ok=True)
        for i in range(2):
            self.assertTrue((got["blocks.%d.mlp.ids" % i] == np.array([0, 1])).all())

    # -- the upcycling identity, in vkg --
    def identity(self, cfg, seed, size):
        dense, moe = upcycled_pair(cfg, seed)
        x = image(1, size[0], size[1], seed + 1)
        t = 1 + (size[0] // moe.patch) * (size[1] // moe.patch)
        with torch.no_grad():
            want = dense(x).numpy()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bypass.vkg")
            dv.export_deepseek_vit(moe, size, bypass=True, path=path)
            got = vkg_run(path, dict(dv.all_on_inputs(moe, 1, t), image=x.numpy()), tmp)
        self.compare("upcycled, routers bypassed, all experts on", got["output"], want, 1e-4)

    def test_upcycle_identity_small(self):
        self.identity(dict(SMALL, layerscale=True), 20, (56, 56))

    def test_upcycle_identity_vit_h_widths(self):
        # 124 routed experts at weight 1: two chained moe_experts nodes (64 + 60 slots) per block
        self.identity(VIT_H2, 21, (56, 56))

    # -- the command line: dense .pth -> upcycle -> deepseek-vit -> vkg run --
    def test_cli(self):
        dense = dv.init_random(dv.DeepSeekViT(**dict(SMALL, depth=2, ffn="dense")), 22)
        py = [sys.executable, "-m", "vkg"]
        env = dict(os.environ, PYTHONPATH=PYDIR)
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "dense.pth")
            torch.save(dense.state_dict(), src)
            moe_st = os.path.join(tmp, "moe.safetensors")
            out = os.path.join(tmp, "m.vkg")
            for args in (["upcycle", src, "--experts", "16", "--shared", "2", "--router-init",
                          "normal", "--seed", "3", "-o", moe_st],
                         ["deepseek-vit", moe_st, "--dim", "160", "--depth", "2", "--heads", "4",
                          "--patch", "14", "--image-size", "56", "56", "--experts", "16",
                          "--shared", "2", "--top-k", "2", "-o", out]):
                r = subprocess.run(py + args, capture_output=True, text=True, env=env)
                self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            m = dv.build_model(moe_st, **dict(SMALL, depth=2))
            x = image(1, 56, 56, 23)
            self.assertGreater(router_margin(m, x), 1e-5)
            with torch.no_grad():
                want = m(x).numpy()
            got = vkg_run(out, {"image": x.numpy()}, tmp)
        self.compare("CLI upcycled model", got["output"], want, 1e-4)


if __name__ == "__main__":
    VKG_BIN = sys.argv.pop(1)
    unittest.main(verbosity=2)
