"""vkg.deepseek_vit (vkg.models.DeepSeekViT): the reference module's names and pieces, upcycling a
dense ViT (function and `python3 -m vkg upcycle`), and the exported graph run through
vkg.reference (float64 NumPy) against the PyTorch module (float32). No GPU.

Tolerances (issue 9): fp32 max|graph - torch| <= 1e-4 x RMS(torch); f16 weights <= 2e-2 x RMS
against the module whose weights are rounded where the graph stores f16. Every random routed case
first checks that no block's top-M decision is within 1e-5 of a tie (logits in float64), so the
reference's different rounding cannot flip one.
"""

import io
import os
import sys
import tempfile
import unittest
from contextlib import redirect_stderr, redirect_stdout

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools",
                                "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vkg  # noqa: E402
from vkg import deepseek_vit as dv  # noqa: E402
from vkg import dinov2, reference  # noqa: E402
from vkg.__main__ import main as vkg_main  # noqa: E402
from vkg.format import read_graph  # noqa: E402
from vkg.safetensors import load_safetensors, save_safetensors  # noqa: E402

SMALL = dict(dim=160, depth=4, heads=4, patch=14, experts=16, shared=2, top_m=2, hidden=640)
VIT_H2 = dv.vit_h_config(depth=2)


def rms(a):
    return float(np.sqrt(np.mean(np.square(np.asarray(a, dtype=np.float64)))))


router_margin = dv.router_margin


def image(batch, h, w, seed):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def upcycled_pair(cfg, seed, **kw):
    """(dense DeepSeekViT with random weights, the MoE one loaded from its upcycled state_dict)."""
    moe_cfg = dict(cfg, **kw)
    dense = dv.init_random(dv.DeepSeekViT(**dict(moe_cfg, ffn="dense")), seed).eval()
    moe = dv.DeepSeekViT(**moe_cfg).eval()
    dv.load_checkpoint(moe, dv.upcycle_state_dict(dense.state_dict(), moe.n_experts,
                                                  moe.n_shared, router_cols=moe.router_cols))
    return dense, moe


class ModuleTest(unittest.TestCase):
    def test_state_dict_names(self):
        m = dv.DeepSeekViT(**dict(SMALL, depth=2, layerscale=True))
        sd = m.state_dict()
        want = {"cls_token": (1, 1, 160), "pos_embed": (1, 257, 160),
                "patch_embed.proj.weight": (160, 3, 14, 14), "patch_embed.proj.bias": (160,),
                "norm.weight": (160,), "norm.bias": (160,)}
        for i in range(2):
            p = "blocks.%d." % i
            want.update({p + "norm1.weight": (160,), p + "norm1.bias": (160,),
                         p + "attn.qkv.weight": (480, 160), p + "attn.qkv.bias": (480,),
                         p + "attn.proj.weight": (160, 160), p + "attn.proj.bias": (160,),
                         p + "ls1.gamma": (160,), p + "norm2.weight": (160,),
                         p + "norm2.bias": (160,), p + "ls2.gamma": (160,),
                         p + "mlp.router.weight": (16, 160),
                         p + "mlp.shared.fc1.weight": (80, 160), p + "mlp.shared.fc1.bias": (80,),
                         p + "mlp.shared.fc2.weight": (160, 80), p + "mlp.shared.fc2.bias": (160,),
                         p + "mlp.experts.w1": (14, 40, 160), p + "mlp.experts.b1": (14, 40),
                         p + "mlp.experts.w2": (14, 160, 40)})
        self.assertEqual({k: tuple(v.shape) for k, v in sd.items()}, want)
        self.assertIs(vkg.models.DeepSeekViT, dv.DeepSeekViT)

    def test_variant_names(self):
        m = dv.DeepSeekViT(**dict(SMALL, depth=1, activation="swiglu", router_cols="routed"))
        keys = {k[len("blocks.0.mlp."):]: tuple(v.shape) for k, v in m.state_dict().items()
                if k.startswith("blocks.0.mlp.")}
        self.assertEqual(keys, {"router.weight": (14, 160), "shared.fc1.weight": (80, 160),
                                "shared.fc3.weight": (80, 160), "shared.fc2.weight": (160, 80),
                                "experts.w1": (14, 40, 160), "experts.w2": (14, 160, 40),
                                "experts.w3": (14, 40, 160)})
        self.assertFalse(any("ls1" in k for k in m.state_dict()))
        dense = dv.DeepSeekViT(**dict(SMALL, depth=1, ffn="dense"))
        self.assertEqual({k: tuple(v.shape) for k, v in dense.state_dict().items()
                          if ".mlp." in k},
                         {"blocks.0.mlp.fc1.weight": (640, 160), "blocks.0.mlp.fc1.bias": (640,),
                          "blocks.0.mlp.fc2.weight": (160, 640), "blocks.0.mlp.fc2.bias": (160,)})
        dsw = dv.DeepSeekViT(**dict(SMALL, depth=1, ffn="dense", activation="swiglu"))
        self.assertEqual(sorted(k for k in dsw.state_dict() if ".mlp." in k),
                         ["blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight",
                          "blocks.0.mlp.fc3.weight"])
        with self.assertRaisesRegex(ValueError, "do not divide"):
            dv.DeepSeekViT(**dict(SMALL, experts=15))

    def test_build_model_reads_the_checkpoint(self):
        """pos grid, LayerScale, activation, router columns and FFN widths come from the
        checkpoint (here H = 320 = 8 x 40, not 4 D; a 5 x 5 table without a cls row)."""
        src = dv.init_random(dv.DeepSeekViT(**dict(SMALL, depth=1, experts=8, hidden=320,
                                                   pos_grid=5, layerscale=True,
                                                   activation="swiglu", router_cols="routed")), 1)
        sd = dict(src.state_dict())
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
        args = dict(dim=160, depth=1, heads=4, patch=14, experts=8, shared=2, top_m=2)
        m = dv.build_model(sd, **args)
        self.assertEqual((m.width, m.hidden, m.pos_grid, m.layerscale, m.activation,
                          m.router_cols), (40, 320, 5, True, "swiglu", "routed"))
        self.assertTrue(torch.equal(m.pos_embed[:, 0], torch.zeros(1, 160)))
        dense = dv.init_random(dv.DeepSeekViT(**dict(args, hidden=320, ffn="dense")), 2)
        m = dv.build_model(dense.state_dict(), **args)           # upcycled on load
        self.assertEqual((m.width, m.hidden, m.ffn), (40, 320, "moe"))
        self.assertTrue(torch.equal(m.blocks[0].mlp.router.weight, torch.zeros(8, 160)))

    def test_pos_embed_is_dinov2s(self):
        self.assertIs(dv.DeepSeekViT.interpolate_pos_encoding,
                      dinov2.DinoV2.interpolate_pos_encoding)
        for antialias in (False, True):
            m = dv.init_random(dv.DeepSeekViT(**dict(SMALL, depth=1, dim=384, heads=6,
                                                     pos_grid=37, interpolate_antialias=antialias,
                                                     interpolate_offset=0.0 if antialias
                                                     else 0.1)), 2)
            ref = dinov2.DinoV2("vits14_reg" if antialias else "vits14", depth=1)
            with torch.no_grad():
                ref.pos_embed.copy_(m.pos_embed)
            for h, w in ((4, 4), (16, 16), (37, 28), (37, 37)):
                self.assertTrue(torch.equal(m.interpolate_pos_encoding(h, w),
                                            ref.interpolate_pos_encoding(h, w)), (h, w))

    def test_forward_matches_block_by_block(self):
        # the block written out by hand (model-spec §1.2.2, §2.3) with LayerScale
        m = dv.build_model("random:3", **dict(SMALL, depth=2, layerscale=True))
        x = image(2, 56, 42, 4)
        with torch.no_grad():
            got, taps = m.forward_features(x, taps=[1, 2])
            t = m.prepare_tokens(x)
            for blk in m.blocks:
                a = blk.norm1(t)
                b, n, c = a.shape
                qkv = F.linear(a, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(
                    b, n, 3, 4, 40).permute(2, 0, 3, 1, 4)
                att = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / np.sqrt(40), -1) @ qkv[2]
                t = t + blk.ls1.gamma * F.linear(att.transpose(1, 2).reshape(b, n, c),
                                                 blk.attn.proj.weight, blk.attn.proj.bias)
                t = t + blk.ls2.gamma * blk.mlp(blk.norm2(t))
            want = F.layer_norm(t, (160,), m.norm.weight, m.norm.bias, 1e-6)
        self.assertEqual(tuple(got.shape), (2, 1 + 4 * 3, 160))
        self.assertLess(float((got - want).abs().max()), 1e-5)
        self.assertLess(float((taps[2] - t).abs().max()), 1e-5 * rms(t.numpy()) * 10)


class UpcycleTest(unittest.TestCase):
    def check_identity(self, cfg, seed, size, **kw):
        dense, moe = upcycled_pair(cfg, seed, **kw)
        x = image(1, size, size, seed + 1)
        with torch.no_grad():
            want = dense(x)
            got = moe.forward_features(x, bypass="all")[0]
            routed = moe(x)
        err = float((got - want).abs().max()) / rms(want)
        self.assertLess(err, 1e-5, err)
        # with real top-M routing the layer is not the dense one (only S + M slices run)
        self.assertGreater(float((routed - want).abs().max()) / rms(want), 1e-3)
        return dense, moe

    def test_identity_small(self):
        self.check_identity(SMALL, 1, 56)
        self.check_identity(SMALL, 2, 28, layerscale=True, router_cols="routed")
        self.check_identity(SMALL, 3, 28, activation="swiglu")

    def test_identity_vit_h_widths(self):
        _, moe = self.check_identity(VIT_H2, 4, 28)
        self.assertEqual(tuple(moe.blocks[0].mlp.experts.w1.shape), (124, 40, 1280))

    def test_slices_and_permutation(self):
        cfg = dict(SMALL, depth=2)
        dense = dv.init_random(dv.DeepSeekViT(**dict(cfg, ffn="dense")), 5)
        sd = dense.state_dict()
        perm = np.stack([np.random.default_rng(i).permutation(640) for i in range(2)])
        up = dv.upcycle_state_dict(sd, 16, 2, permutation=perm)
        for i in range(2):
            p = "blocks.%d.mlp." % i
            w1, b1, w2 = sd[p + "fc1.weight"], sd[p + "fc1.bias"], sd[p + "fc2.weight"]
            pi = torch.from_numpy(perm[i])
            self.assertTrue(torch.equal(up[p + "shared.fc1.weight"], w1[pi[:80]]))
            self.assertTrue(torch.equal(up[p + "shared.fc2.bias"], sd[p + "fc2.bias"]))
            e = 5                                  # routed expert 5 = global expert 7
            rows = pi[(2 + e) * 40:(3 + e) * 40]
            self.assertTrue(torch.equal(up[p + "experts.w1"][e], w1[rows]))
            self.assertTrue(torch.equal(up[p + "experts.b1"][e], b1[rows]))
            self.assertTrue(torch.equal(up[p + "experts.w2"][e], w2[:, rows]))
            self.assertTrue(torch.equal(up[p + "router.weight"], torch.zeros(16, 160)))
        self.assertTrue(torch.equal(up["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.weight"]))
        moe = dv.DeepSeekViT(**cfg)
        dv.load_checkpoint(moe, up)
        x = image(1, 42, 56, 6)
        with torch.no_grad():
            want, got = dense(x), moe.forward_features(x, bypass="all")[0]
        self.assertLess(float((got - want).abs().max()) / rms(want), 1e-5)
        # one (H,) permutation for every block, and a normal router from a seed
        a = dv.upcycle_state_dict(sd, 16, 2, permutation=perm[0], router_init="normal", seed=7)
        b = dv.upcycle_state_dict(sd, 16, 2, permutation=perm[0], router_init="normal", seed=7)
        c = dv.upcycle_state_dict(sd, 16, 2, permutation=perm[0], router_init="normal", seed=8)
        self.assertTrue(torch.equal(a["blocks.1.mlp.router.weight"],
                                    b["blocks.1.mlp.router.weight"]))
        self.assertFalse(torch.equal(a["blocks.1.mlp.router.weight"],
                                     c["blocks.1.mlp.router.weight"]))
        self.assertFalse(torch.equal(a["blocks.0.mlp.router.weight"],
                                     a["blocks.1.mlp.router.weight"]))
        self.assertAlmostEqual(float(a["blocks.0.mlp.router.weight"].std()), 160 ** -0.5,
                               delta=0.01)

    def test_refusals_name_block_and_tensor(self):
        sd = dv.init_random(dv.DeepSeekViT(**dict(SMALL, depth=3, ffn="dense")), 0).state_dict()
        sd = dict(sd)
        sd["blocks.1.mlp.fc1.weight"] = sd["blocks.1.mlp.fc1.weight"][:600]
        sd["blocks.1.mlp.fc1.bias"] = sd["blocks.1.mlp.fc1.bias"][:600]
        sd["blocks.1.mlp.fc2.weight"] = sd["blocks.1.mlp.fc2.weight"][:, :600]
        with self.assertRaisesRegex(dv.CheckpointError,
                                    r"block 1: blocks\.1\.mlp\.fc1\.weight has a hidden width "
                                    r"H=600 that 16 experts do not divide"):
            dv.upcycle_state_dict(sd, 16, 2)
        good = dv.init_random(dv.DeepSeekViT(**dict(SMALL, depth=2, ffn="dense")), 0).state_dict()
        with self.assertRaisesRegex(dv.CheckpointError,
                                    r"block 0: blocks\.0\.mlp\.fc1\.weight: shared=17 outside "
                                    r"0\.\.16"):
            dv.upcycle_state_dict(good, 16, 17)
        bad = np.arange(640)
        bad[3] = 4
        for perm, pattern in ((bad, r"block 0 \(blocks\.0\.mlp\.fc1\.weight\): permutation "
                                    r"given is not a permutation of 0\.\.639"),
                              (np.arange(639), "not a permutation"),
                              (np.arange(640.0), "dtype float64"),
                              (np.stack([np.arange(640)] * 3), "3 rows for 2 blocks"),
                              (np.stack([np.arange(640), bad]),
                               r"block 1 \(blocks\.1\.mlp\.fc1\.weight\): permutation given row "
                               r"1 is not a permutation")):
            with self.assertRaisesRegex(dv.CheckpointError, pattern):
                dv.upcycle_state_dict(good, 16, 2, permutation=perm)
        with self.assertRaisesRegex(dv.CheckpointError, "already a MoE checkpoint"):
            dv.upcycle_state_dict(dv.DeepSeekViT(**dict(SMALL, depth=1)).state_dict(), 16, 2)

    def test_checkpoint_layouts(self):
        """timm / official DINOv2 (mask_token, LayerScale, prefixed, wrapped) / Hugging Face
        Dinov2 names, .pth and .safetensors: all upcycle to the same tensors."""
        cfg = dict(SMALL, dim=384, heads=6, depth=2, hidden=1536, experts=32, layerscale=True)
        dense = dv.init_random(dv.DeepSeekViT(**dict(cfg, ffn="dense")), 8)
        sd = dense.state_dict()
        want = dv.upcycle_state_dict(sd, 32, 2)
        official = dict(sd, mask_token=torch.zeros(1, 384))
        with tempfile.TemporaryDirectory() as tmp:
            pth = os.path.join(tmp, "official.pth")
            torch.save({"teacher": {"backbone." + k: v for k, v in official.items()}}, pth)
            st = os.path.join(tmp, "hf.safetensors")
            save_safetensors(dinov2.to_hf_state_dict(sd), st)
            timm = os.path.join(tmp, "timm.pth")
            torch.save(dinov2.to_timm_state_dict(sd), timm)
            for src in (pth, st, timm):
                got = dv.upcycle_state_dict(src, 32, 2)
                got.pop("mask_token", None)
                self.assertEqual(list(got), list(want), src)
                for k in want:
                    self.assertTrue(torch.equal(got[k].float(), want[k]), (src, k))

    def test_dinov2_packed_swiglu(self):
        """DINOv2's mlp.w12 = [gate; up] / mlp.w3, with zero biases, slices as SwiGLU; non-zero
        biases are refused by name."""
        cfg = dict(SMALL, depth=1, activation="swiglu")
        dense = dv.init_random(dv.DeepSeekViT(**dict(cfg, ffn="dense")), 9)
        sd = dict(dense.state_dict())
        p = "blocks.0.mlp."
        packed = {k: v for k, v in sd.items() if not k.startswith(p)}
        packed[p + "w12.weight"] = torch.cat([sd[p + "fc1.weight"], sd[p + "fc3.weight"]])
        packed[p + "w12.bias"] = torch.zeros(1280)
        packed[p + "w3.weight"] = sd[p + "fc2.weight"]
        packed[p + "w3.bias"] = torch.zeros(160)
        packed["mask_token"] = torch.zeros(1, 160)
        a, b = dv.upcycle_state_dict(sd, 16, 2), dv.upcycle_state_dict(packed, 16, 2)
        b.pop("mask_token")
        self.assertEqual(list(a), list(b))
        for k in a:
            self.assertTrue(torch.equal(a[k], b[k]), k)
        packed[p + "w3.bias"] = torch.full((160,), 0.5)
        with self.assertRaisesRegex(dv.CheckpointError, r"blocks\.0\.mlp\.w3\.bias is not zero"):
            dv.upcycle_state_dict(packed, 16, 2)

    def test_cli(self):
        dense = dv.init_random(dv.DeepSeekViT(**dict(SMALL, depth=2, ffn="dense")), 10)
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "dense.pth")
            torch.save({"state_dict": dense.state_dict()}, src)
            perm = os.path.join(tmp, "perm.npy")
            np.save(perm, np.random.default_rng(0).permutation(640))
            out = os.path.join(tmp, "moe.safetensors")
            with redirect_stdout(io.StringIO()) as so:
                rc = vkg_main(["upcycle", src, "--experts", "16", "--shared", "2",
                               "--permutation", perm, "--router-init", "normal", "--seed", "4",
                               "-o", out])
            self.assertEqual(rc, 0)
            self.assertIn("2 blocks upcycled to 16 experts (2 shared)", so.getvalue())
            got = load_safetensors(out)
            want = dv.upcycle_state_dict(dense.state_dict(), 16, 2, np.load(perm),
                                         router_init="normal", seed=4)
            self.assertEqual(sorted(got), sorted(want))
            for k, v in want.items():
                np.testing.assert_array_equal(got[k], v.numpy(), k)
            for args, msg in ((["--experts", "24", "--shared", "2"],
                               "blocks.0.mlp.fc1.weight has a hidden width H=640 that 24"),
                              (["--experts", "16", "--shared", "20"], "shared=20 outside"),
                              (["--experts", "16", "--shared", "2", "--permutation",
                                os.path.join(tmp, "missing.npy")], "missing.npy")):
                with redirect_stderr(io.StringIO()) as se:
                    rc = vkg_main(["upcycle", src] + args + ["-o", out + "2"])
                self.assertEqual(rc, 1)
                self.assertIn(msg, se.getvalue())
                self.assertFalse(os.path.exists(out + "2"))


class ExportTest(unittest.TestCase):
    def run_graph(self, model, size, batch=2, seed=0, taps=(), fp16=False, routing=True,
                  bound=1e-4, want_model=None, check_margin=True):
        """Exports model, runs the graph with vkg.reference, compares output and taps (and the
        routing outputs when routing) with want_model (default model). Returns the graph."""
        x = image(batch, size[0], size[1], seed)
        want_model = want_model or model
        if check_margin:
            self.assertGreater(router_margin(want_model, x), 1e-5, "test data too close to a tie")
        with torch.no_grad():
            want, want_taps = want_model.forward_features(x, taps=taps)
        b = dv.export_deepseek_vit(model, size, taps, fp16=fp16, routing=routing)
        g = read_graph(b.to_bytes())
        got = reference.run(g, {"image": x.numpy()})
        r = rms(want.numpy())
        self.assertEqual(got["output"].shape, tuple(want.shape))
        err = np.abs(got["output"] - want.numpy()).max()
        self.assertLessEqual(err, bound * r, "output: max err %.3g = %.3g x RMS" % (err, err / r))
        for t in taps:
            w = want_taps[t].numpy()
            self.assertLessEqual(np.abs(got["block%d" % t] - w).max(), bound * rms(w), t)
        if routing:
            for i, blk in enumerate(want_model.blocks):
                if not isinstance(blk.mlp, vkg.DeepSeekMoEFFN) or not blk.mlp.n_routed:
                    continue
                ids, gates = blk.mlp.last_routing
                np.testing.assert_array_equal(got["blocks.%d.mlp.ids" % i], ids.numpy())
                np.testing.assert_allclose(got["blocks.%d.mlp.gates" % i], gates.numpy(),
                                           rtol=1e-5 if not fp16 else 1e-3, atol=1e-6)
        return g, got

    def test_small(self):
        m = dv.build_model("random:11", **dict(SMALL, layerscale=True))
        g, _ = self.run_graph(m, (56, 56), taps=[1, 3], seed=12)
        self.assertEqual(g.output_names[:3], ["output", "block1", "block3"])
        self.assertEqual(g.tensors[g.inputs[0]].shape, ["batch", 3, 56, 56])
        ops = [n.op for n in g.nodes]
        for op, n in (("attention", 4), ("moe_router", 4), ("moe_experts", 4), ("add", 1),
                      ("layernorm", 9), ("patchify", 1), ("insert_tokens", 1)):
            self.assertEqual(ops.count(op), n, op)
        nodes = {n.name: n for n in g.nodes}
        # LayerScale and the residual: shared fc2's epilogue (scale, residual), experts' w2 rows
        fc2 = nodes["blocks.2.mlp.shared.fc2"]
        self.assertEqual(len(fc2.inputs), 5)
        self.assertEqual(g.tensors[fc2.inputs[4]].name, "blocks.2.attn.proj")
        ex = nodes["blocks.2.mlp.experts"]
        self.assertEqual(ex.inputs[8], fc2.outputs[0])
        w2 = g.tensors[ex.inputs[5]].data
        gamma = m.blocks[2].ls2.gamma.detach().double().numpy()
        np.testing.assert_allclose(
            w2, (m.blocks[2].mlp.experts.w2.detach().double().numpy()
                 * gamma[None, :, None]).astype(np.float32))
        self.assertEqual(nodes["blocks.2.mlp.router"].attrs, {"k": 2, "first": 2,
                                                              "gates": "score"})
        self.assertEqual(g.metadata["model_name"], "deepseek_vit")

    def test_no_layerscale_taps_norm(self):
        m = dv.build_model("random:13", **dict(SMALL, depth=2))
        x = image(1, 28, 42, 14)
        b = dv.export_deepseek_vit(m, (28, 42), [1], norm_taps=True)
        got = reference.run(read_graph(b.to_bytes()), {"image": x.numpy()})
        with torch.no_grad():
            out, taps = m.forward_features(x, taps=[1])
            want = m.norm(taps[1]).numpy()
        self.assertLess(np.abs(got["block1"] - want).max(), 1e-4 * rms(want))
        self.assertLess(np.abs(got["output"] - out.numpy()).max(), 1e-4 * rms(out.numpy()))
        nodes = {n["name"]: n for n in b.nodes}
        self.assertEqual(len(nodes["blocks.0.mlp.shared.fc2"]["inputs"]), 5)   # bias, -, residual
        self.assertIsNone(nodes["blocks.0.mlp.shared.fc2"]["inputs"][3])

    def test_vit_h_widths(self):
        m = dv.build_model("random:15", **VIT_H2)
        g, _ = self.run_graph(m, (28, 28), batch=1, seed=16, taps=[1])
        nodes = {n.name: n for n in g.nodes}
        self.assertEqual(nodes["blocks.0.attn"].attrs["heads"], 16)
        self.assertEqual(g.tensors[nodes["blocks.0.mlp.experts"].inputs[3]].shape,
                         [124, 40, 1280])

    def test_fp16(self):
        m = dv.build_model("random:17", **dict(SMALL, layerscale=True))
        rounded = dv.round_weights_f16(m)
        g, got = self.run_graph(m, (56, 56), seed=18, fp16=True, bound=2e-2, want_model=rounded)
        kinds = {}
        for n in g.nodes:
            if n.op in ("linear", "moe_experts", "moe_router"):
                kinds.setdefault(n.op, set()).add(g.tensors[n.inputs[3 if n.op == "moe_experts"
                                                                      else 1]].dtype)
        self.assertEqual(kinds, {"linear": {"f16"}, "moe_experts": {"f16"},
                                 "moe_router": {"f32"}})
        with torch.no_grad():
            ref32 = m(image(2, 56, 56, 18)).numpy()
        self.assertLess(np.abs(got["output"] - ref32).max(), 2e-2 * rms(ref32))

    # -- router variants (one test each) --
    def variant(self, seed, **kw):
        m = dv.build_model("random:%d" % seed, **dict(SMALL, depth=2, **kw))
        self.run_graph(m, (42, 56), seed=seed + 1)
        return m

    def test_router_softmax_all(self):
        m = self.variant(20)
        self.assertEqual(tuple(m.blocks[0].mlp.router.weight.shape), (16, 160))

    def test_router_sigmoid_all(self):
        self.variant(21, score="sigmoid")

    def test_router_softmax_routed(self):
        m = self.variant(22, router_cols="routed")
        self.assertEqual(tuple(m.blocks[0].mlp.router.weight.shape), (14, 160))

    def test_router_sigmoid_routed_renorm(self):
        m = self.variant(23, score="sigmoid", router_cols="routed", renorm=True)
        g = m.blocks[1].mlp.last_routing[1]
        self.assertTrue(torch.allclose(g.sum(-1), torch.ones(())))

    def test_router_renorm_scale(self):
        m = self.variant(24, renorm=True, scale=2.5)
        g = m.blocks[0].mlp.last_routing[1]
        self.assertTrue(torch.allclose(g.sum(-1), torch.full((), 2.5)))

    def test_router_swiglu(self):
        self.variant(25, activation="swiglu", score="sigmoid", scale=0.5)

    def test_tie_goes_to_lower_experts(self):
        m = dv.build_model("random:26", **dict(SMALL, depth=2))
        with torch.no_grad():
            for blk in m.blocks:
                blk.mlp.router.weight.zero_()
        _, got = self.run_graph(m, (28, 28), seed=27, check_margin=False)
        for i in range(2):
            ids = got["blocks.%d.mlp.ids" % i]
            self.assertTrue((ids == np.array([0, 1], np.int32)).all())     # global experts 2, 3
            np.testing.assert_allclose(got["blocks.%d.mlp.gates" % i], 1.0 / 16, rtol=1e-6)

    # -- the upcycling identity in the graph: routers bypassed, every expert on at weight 1 --
    def bypass_identity(self, cfg, seed, size, chunks):
        dense, moe = upcycled_pair(cfg, seed)
        x = image(1, size[0], size[1], seed + 1)
        b = dv.export_deepseek_vit(moe, size, bypass=True)
        g = read_graph(b.to_bytes())
        self.assertEqual([n.op for n in g.nodes].count("moe_router"), 0)
        self.assertEqual([g.tensors[i].name for i in g.inputs],
                         ["image"] + [n for c in range(chunks) for n in ("ids%d" % c,
                                                                        "gates%d" % c)])
        t = 1 + (size[0] // moe.patch) * (size[1] // moe.patch)
        got = reference.run(g, dict(dv.all_on_inputs(moe, 1, t), image=x.numpy()))["output"]
        with torch.no_grad():
            want = dense(x).numpy()
        self.assertLess(np.abs(got - want).max(), 1e-4 * rms(want))
        # and the dense graph of the same weights
        dg = read_graph(dv.export_deepseek_vit(dense, size).to_bytes())
        self.assertEqual(dg.metadata["model_name"], "deepseek_vit_dense")
        got_d = reference.run(dg, {"image": x.numpy()})["output"]
        self.assertLess(np.abs(got_d - want).max(), 1e-4 * rms(want))

    def test_bypass_identity_small(self):
        self.bypass_identity(dict(SMALL, layerscale=True), 28, (56, 42), 1)

    def test_bypass_identity_vit_h_widths(self):
        # 124 routed experts: two moe_experts nodes per block (64 + 60 slots), chained
        self.bypass_identity(VIT_H2, 29, (28, 28), 2)

    def test_cli(self):
        dense = dv.init_random(dv.DeepSeekViT(**dict(SMALL, depth=2, ffn="dense",
                                                     layerscale=True)), 30)
        common = ["--dim", "160", "--depth", "2", "--heads", "4", "--patch", "14",
                  "--image-size", "56", "42", "--experts", "16", "--shared", "2", "--top-k", "2"]
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "dense.pth")
            torch.save(dense.state_dict(), src)
            moe_st = os.path.join(tmp, "moe.safetensors")
            with redirect_stdout(io.StringIO()):
                self.assertEqual(vkg_main(["upcycle", src, "--experts", "16", "--shared", "2",
                                           "--router-init", "normal", "--seed", "1", "-o",
                                           moe_st]), 0)
                out = os.path.join(tmp, "m.vkg")
                self.assertEqual(vkg_main(["deepseek-vit", moe_st] + common +
                                          ["--taps", "1", "--routing", "-o", out]), 0)
            g = read_graph(out)
            self.assertEqual(g.output_names, ["output", "block1", "blocks.0.mlp.ids",
                                              "blocks.0.mlp.gates", "blocks.1.mlp.ids",
                                              "blocks.1.mlp.gates"])
            m = dv.build_model(moe_st, **{k: v for k, v in SMALL.items() if k != "depth"},
                               depth=2)
            self.assertTrue(m.layerscale)
            x = image(1, 56, 42, 31)
            self.assertGreater(router_margin(m, x), 1e-5)
            with torch.no_grad():
                want = m(x).numpy()
            got = reference.run(g, {"image": x.numpy()})["output"]
            self.assertLess(np.abs(got - want).max(), 1e-4 * rms(want))
            # a dense checkpoint exports too: upcycled on load, or as the dense encoder
            with redirect_stdout(io.StringIO()):
                self.assertEqual(vkg_main(["deepseek-vit", src] + common + ["-o", out]), 0)
                self.assertEqual(vkg_main(["deepseek-vit", src] + common +
                                          ["--ffn", "dense", "--fp16", "-o", out]), 0)
            g = read_graph(out)
            self.assertIn("dense FFN 640 wide", g.metadata["description"])
            # a checkpoint that does not fit names the keys
            with redirect_stderr(io.StringIO()) as se:
                rc = vkg_main(["deepseek-vit", moe_st] + common[:2] + ["--depth", "3"] +
                              common[4:] + ["-o", out])
            self.assertEqual(rc, 1)
            self.assertIn("missing keys (18): blocks.2.attn.proj.bias", se.getvalue())
            with redirect_stdout(io.StringIO()):
                self.assertEqual(vkg_main(["deepseek-vit", "random:3"] + common +
                                          ["--score", "sigmoid", "--router-cols", "routed",
                                           "--renorm", "--scale", "2", "--activation", "swiglu",
                                           "--stats", "-o", out]), 0)
            g = read_graph(out)
            r = [n for n in g.nodes if n.op == "moe_router"][0]
            self.assertEqual(r.attrs, {"k": 2, "score": "sigmoid", "gates": "score",
                                       "renorm": 1, "scale": 2.0})
            self.assertIn("blocks.1.mlp.load_balance", g.output_names)


if __name__ == "__main__":
    unittest.main()
