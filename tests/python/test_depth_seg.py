"""vkg.depth_seg: the reference module (DINOv2 + MoE-LoRA FFN + DPT depth head + BN seg head,
model-spec §1), its state_dict layout and checkpoint loading, the exported graph run through
vkg.reference (float64 NumPy) against the PyTorch module (float32), and `python3 -m vkg
depth-seg`. No GPU.

Tolerances (the ViT issue's): fp32 weights max|graph - torch| <= 1e-4 x RMS(torch); f16 weights
<= 2e-2 x RMS. Routed cases first check that no block's top-k decision is within 1e-5 of a tie
(logits in float64), so the reference's different rounding cannot flip one; the f16 case uses
top_k = experts (no routing decision at all).
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

from vkg import depth_seg as ds  # noqa: E402
from vkg import dinov2, reference  # noqa: E402
from vkg.__main__ import main as vkg_main  # noqa: E402
from vkg.format import read_graph  # noqa: E402
from vkg.moe import STAT_NAMES, MoELoRAFFN  # noqa: E402
from vkg.safetensors import save_safetensors  # noqa: E402

# a tiny model that still has every piece: 4 blocks (taps 1-4 for both heads), D 32
TINY = dict(classes=5, depth=4, embed_dim=32, heads=2, experts=4, top_k=2, lora_rank=2,
            lora_alpha=4, img_size=56, features=16, out_channels=(8, 16, 24, 32))


def rms(a):
    return float(np.sqrt(np.mean(np.square(np.asarray(a, dtype=np.float64)))))


def image(batch, h, w, seed):
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def tiny(seed=1, **kw):
    return ds.build_model("vits14-mini", None, seed=seed, **dict(TINY, **kw))


def run_graph(b, x):
    return reference.run(read_graph(b.to_bytes()), {"image": x.numpy()})


class ModuleTest(unittest.TestCase):
    def test_spec_sizes_and_names(self):
        m = ds.DepthSegModel("vits14", classes=150)
        sd = m.state_dict()
        stats = ("running_mean", "running_var", "num_batches_tracked")
        count = lambda pre: sum(v.numel() for k, v in sd.items()    # noqa: E731
                                if k.startswith(pre) and not k.endswith(stats))
        self.assertEqual(count(""), 28004791)                        # model-spec §1.6
        self.assertEqual(count("depth_head."), 2728513)              # §1.4
        self.assertEqual(count("seg_head."), 233622)                 # §1.5, C = 150
        self.assertEqual({k.split(".")[0] for k in sd}, {"pretrained", "depth_head", "seg_head"})
        want = {
            "pretrained.blocks.11.mlp.fc1.weight": (1536, 384),
            "pretrained.blocks.11.mlp.fc2.bias": (384,),
            "pretrained.blocks.0.mlp.router.weight": (8, 384),
            "pretrained.blocks.0.mlp.router.bias": (8,),
            "pretrained.blocks.0.mlp.experts.7.fc1.lora_A.weight": (8, 384),   # (r, in)
            "pretrained.blocks.0.mlp.experts.7.fc1.lora_B.weight": (1536, 8),  # (out, r)
            "pretrained.blocks.0.mlp.experts.7.fc2.lora_A.weight": (8, 1536),
            "pretrained.blocks.0.mlp.experts.7.fc2.lora_B.weight": (384, 8),
            "pretrained.pos_embed": (1, 1370, 384), "pretrained.norm.weight": (384,),
            "depth_head.projects.3.weight": (384, 384, 1, 1),
            "depth_head.resize_layers.0.weight": (48, 48, 4, 4),
            "depth_head.resize_layers.1.weight": (96, 96, 2, 2),
            "depth_head.resize_layers.3.weight": (384, 384, 3, 3),
            "depth_head.scratch.layer1_rn.weight": (64, 48, 3, 3),
            "depth_head.scratch.refinenet4.resConfUnit1.conv1.weight": (64, 64, 3, 3),
            "depth_head.scratch.refinenet1.out_conv.bias": (64,),
            "depth_head.scratch.output_conv1.weight": (32, 64, 3, 3),
            "depth_head.scratch.output_conv2.0.weight": (32, 32, 3, 3),
            "depth_head.scratch.output_conv2.2.weight": (1, 32, 1, 1),
            "seg_head.bn.running_var": (1536,), "seg_head.bn.num_batches_tracked": (),
            "seg_head.conv_seg.weight": (150, 1536, 1, 1),
        }
        for k, shape in want.items():
            self.assertEqual(tuple(sd[k].shape), shape, k)
        self.assertNotIn("depth_head.resize_layers.2.weight", sd)          # Identity
        self.assertFalse(any(".mlp.experts.0.fc1.weight" in k for k in sd))  # shared base only
        self.assertEqual((m.depth_taps, m.seg_taps), ([3, 6, 9, 12], [9, 10, 11, 12]))
        self.assertIsInstance(m.pretrained.blocks[0].mlp, MoELoRAFFN)

    def test_mini_fits_the_budget(self):
        m = ds.DepthSegModel("vits14-mini", classes=5, lora_rank=4)
        n = sum(p.numel() for p in m.parameters())
        self.assertLess(2 * n, 20e6)             # f16 weights of the bundled graph
        self.assertEqual(m.pretrained.depth, 12)
        self.assertEqual((m.depth_taps, m.seg_taps), ([3, 6, 9, 12], [9, 10, 11, 12]))

    def test_forward_shapes_and_stats(self):
        m = tiny()
        with torch.no_grad():
            out = m(image(2, 56, 70, 0), routing_stats=True)
        self.assertEqual(tuple(out["depth"].shape), (2, 56, 70))
        self.assertEqual(tuple(out["seg_logits"].shape), (2, 5, 56, 70))
        self.assertGreaterEqual(float(out["depth"].min()), 0.0)
        tokens = 2 * (1 + 4 * 5)
        for i in range(4):
            self.assertEqual(float(out["blocks.%d.mlp.counts" % i].sum()), tokens * 2)
        self.assertEqual(len(out), 2 + 4 * len(STAT_NAMES))

    def test_shared_base_path_is_the_literal_one(self):
        m = tiny().double()
        x = image(2, 56, 70, 1).double()
        with torch.no_grad():
            a = m(x)
            b = m.set_moe_path(True)(x)
        for k in a:
            self.assertLess(float((a[k] - b[k]).abs().max()), 1e-10 * max(rms(a[k]), 1.0), k)

    def test_zero_lora_b_is_the_dense_backbone(self):
        # model-spec §6: with every LoRA B = 0 (PEFT's init) and renormalized gates, MoE-LoRA
        # is the dense DINOv2 Mlp for any router
        m = tiny().double()
        with torch.no_grad():
            for blk in m.moe_blocks:
                for ex in blk.experts:
                    ex.fc1.lora_B.weight.zero_()
                    ex.fc2.lora_B.weight.zero_()
        dense = dinov2.DinoV2("mini", config=ds.arch_config("vits14-mini") | dict(
            embed_dim=32, depth=4, heads=2), img_size=56).double()
        sd = {k[len("pretrained."):]: v for k, v in m.state_dict().items()
              if k.startswith("pretrained.") and ".mlp.router." not in k
              and ".mlp.experts." not in k}
        dense.load_state_dict(sd)
        x = image(1, 56, 42, 2).double()
        with torch.no_grad():
            want = dense(x, taps=[1, 2, 3, 4], norm=True)
            got = m.pretrained(x, taps=[1, 2, 3, 4], norm=True)
        for a, b in zip(want, got):
            self.assertLess(float((a - b).abs().max()), 1e-10)


class CheckpointTest(unittest.TestCase):
    def setUp(self):
        self.model = tiny(seed=3)
        self.sd = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.x = image(1, 56, 56, 4)
        with torch.no_grad():
            self.want = self.model(self.x)

    def assert_same(self, model):
        with torch.no_grad():
            got = model(self.x)
        for k in ("depth", "seg_logits"):
            self.assertTrue(torch.equal(got[k], self.want[k]), k)

    def test_pth_wrapped_prefixed_and_safetensors(self):
        with tempfile.TemporaryDirectory() as d:
            pth = os.path.join(d, "m.pth")
            torch.save({"state_dict": {"module." + k: v for k, v in self.sd.items()}}, pth)
            self.assert_same(ds.build_model("vits14-mini", pth, **dict(TINY, img_size=None)))
            st = os.path.join(d, "m.safetensors")
            save_safetensors({k: v for k, v in self.sd.items()
                              if not k.endswith("num_batches_tracked")}, st)
            m = ds.build_model("vits14-mini", st, **dict(TINY, classes=None, experts=None,
                                                         lora_rank=None, img_size=None))
            self.assert_same(m)
            self.assertEqual((m.n_classes, m.n_experts, m.lora_rank, m.img_size), (5, 4, 2, 56))

    def test_per_expert_frozen_copies(self):
        sd = dict(self.sd)
        for i in range(4):
            for e in range(4):
                for proj in ("fc1", "fc2"):
                    base = "pretrained.blocks.%d.mlp.%s." % (i, proj)
                    # PEFT's naming for one projection, the plain one for the other
                    copy = "pretrained.blocks.%d.mlp.experts.%d.%s.%s" % (
                        i, e, proj, "base_layer." if proj == "fc1" else "")
                    sd[copy + "weight"] = sd[base + "weight"].clone()
                    sd[copy + "bias"] = sd[base + "bias"].clone()
        m = ds.DepthSegModel("vits14-mini", **TINY).eval()
        ds.load_checkpoint(m, sd)
        self.assert_same(m)
        sd["pretrained.blocks.2.mlp.experts.3.fc2.weight"] = sd[
            "pretrained.blocks.2.mlp.fc2.weight"] + 1e-3
        with self.assertRaises(ds.CheckpointError) as cm:
            ds.load_checkpoint(m, sd)
        self.assertIn("expert 3", str(cm.exception))
        self.assertIn("pretrained.blocks.2.mlp", str(cm.exception))

    def test_mismatches_are_named(self):
        sd = dict(self.sd)
        del sd["pretrained.blocks.1.mlp.router.bias"]
        sd["depth_head.scratch.extra.weight"] = torch.zeros(3)
        sd["seg_head.conv_seg.weight"] = torch.zeros(6, 128, 1, 1)
        m = ds.DepthSegModel("vits14-mini", **TINY)
        with self.assertRaises(ds.CheckpointError) as cm:
            ds.load_checkpoint(m, sd)
        msg = str(cm.exception)
        for k in ("pretrained.blocks.1.mlp.router.bias", "depth_head.scratch.extra.weight",
                  "seg_head.conv_seg.weight: checkpoint (6, 128, 1, 1), model (5, 128, 1, 1)"):
            self.assertIn(k, msg)

    def test_partial_keeps_the_rest(self):
        # a Depth Anything V2 style checkpoint: no routers, no LoRA, no seg head
        sd = {k: v for k, v in self.sd.items() if not k.startswith("seg_head.")
              and ".mlp.router." not in k and ".mlp.experts." not in k}
        m = ds.DepthSegModel("vits14-mini", **TINY)
        with self.assertRaises(ds.CheckpointError):
            ds.load_checkpoint(m, sd)
        missing = ds.load_checkpoint(m, sd, strict=False)
        self.assertIn("seg_head.conv_seg.weight", missing)
        self.assertIn("pretrained.blocks.0.mlp.experts.0.fc1.lora_A.weight", missing)
        self.assertTrue(torch.equal(m.state_dict()["depth_head.projects.0.weight"],
                                    self.sd["depth_head.projects.0.weight"]))


class ExportTest(unittest.TestCase):
    def compare(self, model, x, tol=1e-4, **kw):
        self.assertGreater(ds.router_margin(model, x), 1e-5, "a routing decision is near a tie")
        b = ds.export_depth_seg(model, tuple(x.shape[2:]), **kw)
        got = run_graph(b, x)
        with torch.no_grad():
            want = model(x, routing_stats=kw.get("routing_stats", False))
        for k in ("depth", "seg_logits"):
            w = want[k].numpy()
            self.assertEqual(got[k].shape, w.shape, k)
            err = float(np.abs(got[k] - w).max())
            self.assertLessEqual(err, tol * rms(w), "%s: max err %.3g, rms %.3g" % (k, err, rms(w)))
        return b, got, want

    def test_pyramid_odd_grid_with_stats_and_labels(self):
        # 56 x 70: a 4 x 5 patch grid, so resize_layers[3] and the area pooling round down
        m = tiny(seed=5)
        x = image(2, 56, 70, 6)
        b, got, want = self.compare(m, x, routing_stats=True, labels=True)
        names = [b.tensors[i].name for i in b.outputs]
        self.assertEqual(names[:3], ["depth", "seg_logits", "seg_labels"])
        self.assertEqual(len(names), 3 + 4 * len(STAT_NAMES))
        for i in range(4):
            for s in STAT_NAMES:
                k = "blocks.%d.mlp.%s" % (i, s)
                np.testing.assert_allclose(got[k], want[k].numpy(), rtol=1e-5, atol=1e-6,
                                           err_msg=k)
        logits = want["seg_logits"].numpy()
        top2 = np.sort(logits, axis=1)[:, -2:]
        clear = (top2[:, 1] - top2[:, 0]) > 1e-4
        self.assertTrue(np.array_equal(got["seg_labels"][clear], logits.argmax(1)[clear]))
        ops = [n["op"] for n in b.nodes]
        self.assertNotIn("batchnorm", ops)           # folded into the branch convs
        self.assertNotIn("concat", ops)              # branches summed after resampling
        self.assertEqual(ops.count("relu"), 7)       # the RCUs' first ReLUs only
        self.assertEqual(ops.count("adaptive_avg_pool2d"), 1)

    def test_flat_224(self):
        m = tiny(seed=7, seg_head="flat")
        self.compare(m, image(1, 224, 224, 8))

    def test_fp16(self):
        m = tiny(seed=9, experts=2, top_k=2)          # every expert on: no routing decisions
        x = image(1, 56, 56, 10)
        b, _, _ = self.compare(m, x, tol=2e-2, fp16=True)
        dt = {t.name: t.dtype for t in b.tensors if t.role == "constant"}
        self.assertEqual(dt["depth_head.scratch.output_conv1.weight"], "f16")
        self.assertEqual(dt["depth_head.scratch.output_conv1.bias"], "f32")
        self.assertEqual(dt["blocks.0.mlp.router.weight"], "f32")

    def test_errors(self):
        m = tiny()
        with self.assertRaises(ds.ExportError):
            ds.export_depth_seg(m, (50, 56))
        with self.assertRaises(ds.ExportError):
            ds.export_depth_seg(m.pretrained, (56, 56))


@unittest.skipUnless(os.environ.get("VKG_SLOW_TESTS"), "about 3 minutes: ctest runs it as its own "
                     "test, python_depth_seg_spec_size (VKG_SLOW_TESTS=1)")
class SpecSizeTest(unittest.TestCase):
    """The spec model (vits14, C = 150, pyramid head, random weights) at 224 and 518."""

    compare = ExportTest.compare

    def test_vits14(self):
        m = ds.build_model("vits14", None, seed=2, classes=150)
        for size in ((224, 224), (518, 518)):
            x = image(1, size[0], size[1], 3)
            self.compare(m, x, routing_stats=True)


class CLITest(unittest.TestCase):
    def run_cli(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            rc = vkg_main(list(argv))
        return rc, out.getvalue(), err.getvalue()

    def test_arch_choices(self):
        from vkg.__main__ import build_parser
        sub = [a for a in build_parser()._actions if a.dest == "command"][0]
        arch = [a for a in sub.choices["depth-seg"]._actions if a.dest == "arch"][0]
        self.assertEqual(sorted(arch.choices), ds.ARCH_NAMES)

    def test_random_and_checkpoint(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "m.vkg")
            rc, out, err = self.run_cli("depth-seg", "--random-init", "3", "--arch", "vits14-mini",
                                        "--classes", "5", "--lora-rank", "4", "--image-size",
                                        "56", "84", "--routing-stats", "--fp16", "-o", path)
            self.assertEqual(rc, 0, err)
            g = read_graph(path)
            names = [g.tensors[i].name for i in g.outputs]
            self.assertEqual(names[:2], ["depth", "seg_logits"])
            self.assertIn("blocks.11.mlp.counts", names)
            self.assertEqual([g.tensors[i].name for i in g.inputs], ["image"])
            m = ds.build_model("vits14-mini", None, seed=3, classes=5, lora_rank=4)
            ck = os.path.join(d, "m.pth")
            torch.save(m.state_dict(), ck)
            rc, out, err = self.run_cli("depth-seg", ck, "--arch", "vits14-mini", "--experts",
                                        "8", "--top-k", "2", "--lora-rank", "4", "--lora-alpha",
                                        "8", "--classes", "5", "--seg-head", "pyramid",
                                        "--image-size", "56", "56", "--class-names",
                                        "sky,ground,wall,box,sphere", "-o", path)
            self.assertEqual(rc, 0, err)
            self.assertIn("5 classes", out)
            self.assertEqual(read_graph(path).metadata["seg.classes"], "sky,ground,wall,box,sphere")
            rc, out, err = self.run_cli("depth-seg", ck, "--arch", "vits14-mini", "--image-size",
                                        "56", "56", "--class-names", "a,b", "-o", path)
            self.assertEqual(rc, 1)
            self.assertIn("give 5 non-empty names", err)
            rc, out, err = self.run_cli("depth-seg", ck, "--arch", "vits14-mini", "--classes",
                                        "7", "--image-size", "56", "56", "-o", path)
            self.assertEqual(rc, 1)
            self.assertIn("seg_head.conv_seg.weight", err)
            rc, out, err = self.run_cli("depth-seg", "--arch", "vits14-mini", "-o", path)
            self.assertEqual(rc, 1)


if __name__ == "__main__":
    unittest.main()
