"""vkg.moe modules -> vkg.export -> `vkg run` (the C runtime on the Vulkan device) -> same outputs.

Run by ctest as `python3 tests/e2e/test_moe_run.py VKG_BINARY`. Covers the three MoE FFNs of
tools/python/vkg/moe.py (MoE-LoRA shared-base and naive graphs, DeepSeekMoE with GELU and SwiGLU,
the Transfuser MoE FFN), the router alone with its statistics, skewed routing (experts without
tokens), T = 1, f16 weights, moe_experts fed ids/gates as i32/f32 graph inputs (the upcycled
DeepSeek FFN with every expert on equals the dense FFN), and that two runs give bit-identical
files. Models are random-initialized with fixed seeds.

Tolerances: f32 weights |vkg - torch| <= 1e-5 + 1e-5 |torch| per element (as
tests/e2e/test_export_run.py); f16 weights max |vkg - torch| <= 2e-2 RMS(torch) for the FFN
output (routers stay f32). ids and counts must be equal; every random case first checks that no
top-k decision is within 1e-5 of a tie, so a different fp32 summation order cannot flip it.
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
from vkg import moe  # noqa: E402
import vkgrun  # noqa: E402  (tests/e2e/vkgrun.py)

VKG_BIN = None
ATOL, RTOL = 1e-5, 1e-5
F16_REL = 2e-2
STATS = moe.STAT_NAMES


def routing_margin(m, x):
    """Smallest gap between the k-th and (k+1)-th selectable logit over the tokens (float64)."""
    with torch.no_grad():
        f = x.reshape(-1, x.shape[-1]).double()
        if isinstance(m, moe.TopKRouter):
            w, b, first, k, t = m.weight, m.bias, m.first, m.k, m.temperature
        elif isinstance(m, moe.DeepSeekMoEFFN):
            w, b, first, k, t = m.router.weight, None, m.first, m.top_m, 1.0
        else:
            w, b, first, k = m.router.weight, m.router.bias, 0, m.top_k
            t = getattr(m, "temperature", 1.0)
        z = F.linear(f, w.double(), None if b is None else b.double())[:, first:] / t
        if k >= z.shape[1]:
            return float("inf")
        s = torch.sort(z, dim=-1, descending=True).values
        return float((s[:, k - 1] - s[:, k]).min())


def rms(a):
    return float(np.sqrt(np.mean(np.square(a.astype(np.float64)))))


class Block(nn.Module):
    """Pre-LN residual block around an FFN (how the models use them)."""

    def __init__(self, ffn, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = ffn

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class MoERun(unittest.TestCase):
    def close(self, got, want, what, fp16=False):
        self.assertEqual(got.shape, want.shape, what)
        err = np.abs(got.astype(np.float64) - want)
        if fp16:
            self.assertLessEqual(err.max(), F16_REL * rms(want), "%s: max error %.3g, RMS %.3g"
                                 % (what, err.max(), rms(want)))
        else:
            tol = ATOL + RTOL * np.abs(want)
            self.assertTrue((err <= tol).all(), "%s: max error %.3g (worst %.3g of tolerance)"
                            % (what, err.max(), (err / tol).max()))

    def check(self, module, shape, batches=None, fp16=False, variant=None, path_prefix="",
              ties_ok=False, router_input=None):
        """Exports module with its statistics and routing as outputs, runs it on the device at
        the export batch and another, compares with PyTorch, and checks a second run is
        bit-identical. path_prefix: the MoE module's path inside module ('' = the root);
        router_input(x): what the MoE module sees (default x)."""
        moe_mod = module.get_submodule(path_prefix.rstrip(".")) if path_prefix else module
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.vkg")
            example = torch.randn(*shape)
            b = vkg.export(module, (example,), path, fp16=fp16, moe_stats=True,
                           moe_routing=not isinstance(moe_mod, moe.TopKRouter),
                           moe_variant=variant)
            names = [b.tensors[i].name for i in b.outputs]
            insp = subprocess.run([VKG_BIN, "inspect", path], capture_output=True, text=True)
            self.assertEqual(insp.returncode, 0, insp.stdout + insp.stderr)
            self.assertIn(type(module).__name__, insp.stdout)
            for bi, batch in enumerate(batches or (shape[0], shape[0] + 1)):
                x = torch.randn(batch, *shape[1:])
                if not ties_ok:
                    inner = x if router_input is None else router_input(x)
                    self.assertGreater(routing_margin(moe_mod, inner), 1e-5,
                                       "test data too close to a routing tie")
                with torch.no_grad():
                    want = module(x)
                outs = []
                for rep in range(2 if bi == 0 else 1):      # twice at the first batch
                    res = vkgrun.run(VKG_BIN, path, {"x": x.numpy()}, os.path.join(tmp, "out%d" % rep))
                    outs.append({n: res[n] for n in names})
                if len(outs) > 1:
                    for n in names:
                        self.assertEqual(outs[0][n][1], outs[1][n][1],
                                         "output %s differs between two runs" % n)
                got = {n: v[0] for n, v in outs[0].items()}
                what = "%s batch %d" % (type(moe_mod).__name__, batch)
                if isinstance(moe_mod, moe.TopKRouter):
                    ids, gates = want
                    self.assertEqual(got["output0"].dtype, np.int32)
                    np.testing.assert_array_equal(got["output0"], ids.numpy(), what + " ids")
                    self.close(got["output1"], gates.numpy(), what + " gates")
                else:
                    self.close(got["output"], want.numpy(), what + " output", fp16)
                    ids, gates = moe_mod.last_routing
                    p = path_prefix
                    self.assertEqual(got[p + "ids"].dtype, np.int32)
                    np.testing.assert_array_equal(got[p + "ids"], ids.numpy(), what + " ids")
                    self.close(got[p + "gates"], gates.numpy(), what + " gates")
                p = path_prefix
                np.testing.assert_array_equal(got[p + "counts"],
                                              moe_mod.last_stats["counts"].numpy(),
                                              what + " counts")
                for s in STATS[1:]:
                    self.close(got[p + s], moe_mod.last_stats[s].numpy(), what + " " + s)

    # -- the router alone --
    def test_router_stats(self):
        torch.manual_seed(1)
        self.check(moe.TopKRouter(24, 8, 2).eval(), (5, 24))
        torch.manual_seed(2)
        self.check(moe.TopKRouter(24, 12, 3, bias=False, first=4, score="sigmoid",
                                  gates="score", renorm=True, scale=2.0,
                                  temperature=0.5).eval(), (3, 7, 24))

    def test_router_ties(self):
        torch.manual_seed(3)
        m = moe.TopKRouter(24, 6, 3).eval()
        with torch.no_grad():
            m.weight.zero_()
            m.bias.zero_()
        self.check(m, (4, 24), ties_ok=True)

    # -- S3: MoE FFN --
    def test_moe_ffn(self):
        torch.manual_seed(4)
        self.check(moe.MoEFFN(32, 64, 4, 2).eval(), (2, 31, 32))
        torch.manual_seed(5)
        self.check(moe.MoEFFN(32, 48, 6, 1, activation="gelu", temperature=0.7).eval(),
                   (1, 32), batches=(1, 9))
        torch.manual_seed(6)
        self.check(moe.MoEFFN(32, 48, 4, 4, activation="gelu").eval(), (3, 32))

    def test_moe_ffn_skewed(self):
        torch.manual_seed(7)
        m = moe.MoEFFN(32, 64, 6, 2).eval()
        with torch.no_grad():
            m.router.bias.copy_(torch.tensor([0.0, 0.0, 1000.0, 0.0, 990.0, 0.0]))
        self.check(m, (2, 9, 32))

    def test_moe_ffn_fp16(self):
        torch.manual_seed(8)
        self.check(moe.MoEFFN(32, 64, 4, 2, activation="gelu").eval(), (2, 5, 32), fp16=True)

    # -- S2: DeepSeekMoE FFN --
    def test_deepseek_gelu(self):
        torch.manual_seed(9)
        self.check(moe.DeepSeekMoEFFN(32, 16, 8, 2, 4).eval(), (2, 17, 32))

    def test_deepseek_swiglu_routed_sigmoid(self):
        torch.manual_seed(10)
        self.check(moe.DeepSeekMoEFFN(32, 16, 8, 2, 3, score="sigmoid", router_cols="routed",
                                      renorm=True, scale=2.5, act="swiglu").eval(), (2, 9, 32))

    def test_deepseek_no_shared_single_token(self):
        torch.manual_seed(11)
        self.check(moe.DeepSeekMoEFFN(32, 8, 8, 0, 2).eval(), (1, 32), batches=(1, 5))

    def test_deepseek_fp16(self):
        torch.manual_seed(12)
        self.check(moe.DeepSeekMoEFFN(32, 16, 8, 2, 4, act="swiglu").eval(), (2, 9, 32),
                   fp16=True)

    def test_deepseek_upcycled_all_on_is_dense(self):
        """moe_experts with ids/gates as graph inputs (i32 / f32): every expert at weight 1."""
        g = torch.Generator().manual_seed(13)
        d, h, e, s = 32, 96, 8, 2
        w1, b1 = torch.randn(h, d, generator=g) / 5, torch.randn(h, generator=g) / 5
        w2, b2 = torch.randn(d, h, generator=g) / 8, torch.randn(d, generator=g) / 5
        sd = moe.upcycle_ffn(w1, b1, w2, b2, e, s)
        bd = vkg.Builder()
        x = bd.input("x", ["batch", d])
        ids = bd.input("ids", ["batch", e - s], dtype="i32")
        gates = bd.input("gates", ["batch", e - s])
        c = {k: bd.constant(k, v.numpy()) for k, v in sd.items() if k != "router.weight"}
        sh = bd.linear(bd.linear(x, c["shared.fc1.weight"], c["shared.fc1.bias"], activation=2),
                       c["shared.fc2.weight"], c["shared.fc2.bias"])
        bd.output(bd.moe_experts(x, ids, gates, c["experts.w1"], c["experts.w2"],
                                 c["experts.b1"], residual=sh, activation="gelu"), "y")
        xx = torch.randn(7, d)
        with torch.no_grad():
            want = F.linear(F.gelu(F.linear(xx, w1, b1)), w2, b2).numpy()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "upcycled.vkg")
            bd.save(path)
            ins = {"x": xx.numpy(), "ids": np.tile(np.arange(e - s, dtype=np.int32), (7, 1)),
                   "gates": np.ones((7, e - s), np.float32)}
            got = vkgrun.run(VKG_BIN, path, ins, os.path.join(tmp, "out"))["y"][0]
        self.close(got, want, "upcycled, all experts on")

    # -- S1: MoE-LoRA FFN --
    def lora(self, seed, **kw):
        torch.manual_seed(seed)
        args = dict(experts=8, top_k=2, rank=4, alpha=8)
        args.update(kw)
        return moe.randomize_lora(moe.MoELoRAFFN(32, 64, **args),
                                  generator=torch.Generator().manual_seed(seed)).eval()

    def test_moe_lora_shared_base(self):
        self.check(self.lora(14), (2, 17, 32))
        self.check(self.lora(15, top_k=1, act="relu"), (1, 32), batches=(1, 6))

    def test_moe_lora_naive(self):
        self.check(self.lora(16), (2, 17, 32), variant="naive")
        self.check(self.lora(17, top_k=8), (3, 32), variant="naive")

    def test_moe_lora_skewed(self):
        m = self.lora(18)
        with torch.no_grad():
            m.router.bias.copy_(torch.tensor([0, 0, 0, 0, 0, 1000.0, 0, 990.0]))
        for variant in ("shared_base", "naive"):
            self.check(m, (2, 9, 32), variant=variant)

    def test_moe_lora_fp16(self):
        for variant in ("shared_base", "naive"):
            self.check(self.lora(19), (2, 9, 32), fp16=True, variant=variant)

    def test_moe_lora_in_a_block(self):
        torch.manual_seed(20)
        blk = Block(self.lora(20), 32).eval()
        self.check(blk, (2, 9, 32), path_prefix="mlp.", router_input=lambda x: blk.norm(x))


if __name__ == "__main__":
    VKG_BIN = sys.argv.pop(1)
    unittest.main(verbosity=2)
