"""vkg.dinov2: the reference module, pos-embed interpolation, checkpoint layouts, and the exported
graph run through vkg.reference (float64) against the PyTorch module (float32).

Tolerances: fp32 weights max|err| <= 1e-4 * RMS(output); f16 weights max|err| <= 2e-2 * RMS.
"""

import copy
import io
import math
import os
import sys
import tempfile
import unittest
from contextlib import redirect_stdout

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools",
                                "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vkg import dinov2, dinov2_cli, reference  # noqa: E402
from vkg.format import read_graph  # noqa: E402
from vkg.safetensors import load_safetensors, safetensors_bytes, save_safetensors  # noqa: E402


def rms(a):
    return float(np.sqrt(np.mean(np.square(a, dtype=np.float64))))


def image(batch, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, h, w, generator=g)


# -- an independent pos-embed resampler, from the formulas of model-spec.md §1.2.1 (NumPy) --

def _cubic(x, a):
    x = abs(x)
    if x <= 1:
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    if x < 2:
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    return 0.0


def offset_matrix(m, n, offset):
    """(n, m): bicubic A=-0.75, step m/(n+offset), taps clamped to the border."""
    w = np.zeros((n, m))
    for o in range(n):
        src = (o + 0.5) * m / (n + offset) - 0.5
        i0 = math.floor(src)
        t = src - i0
        for k in range(-1, 3):
            w[o, min(max(i0 + k, 0), m - 1)] += _cubic(k - t, -0.75)
    return w


def antialias_matrix(m, n):
    """(n, m): PyTorch's antialiased bicubic (A=-0.5), weights normalized per output."""
    s = m / n
    support = 2 * s if s >= 1 else 2.0
    w = np.zeros((n, m))
    for o in range(n):
        c = s * (o + 0.5)
        lo, hi = max(int(c - support + 0.5), 0), min(int(c + support + 0.5), m)
        ws = np.array([_cubic((j - c + 0.5) / max(s, 1.0), -0.5) for j in range(lo, hi)])
        w[o, lo:hi] = ws / ws.sum()
    return w


def numpy_pos_embed(pe, h, w, offset, antialias):
    pe = np.asarray(pe, dtype=np.float64)[0]
    m = int(round(math.sqrt(pe.shape[0] - 1)))
    grid = pe[1:].reshape(m, m, -1)
    if antialias:
        wy, wx = antialias_matrix(m, h), antialias_matrix(m, w)
    else:
        wy, wx = offset_matrix(m, h, offset), offset_matrix(m, w, offset)
    out = np.einsum("xj,yjd->yxd", wx, np.einsum("yi,ijd->yjd", wy, grid)).reshape(h * w, -1)
    return np.concatenate([pe[:1], out])[None]


class PosEmbedTest(unittest.TestCase):
    def test_interpolation_matches_formulas(self):
        for arch in ("vits14", "vits14_reg"):
            model = dinov2.init_random(dinov2.DinoV2(arch, depth=1), seed=3)
            pe = model.pos_embed.detach().numpy()
            model64 = copy.deepcopy(model).double().requires_grad_(False)
            cfg = dinov2.arch_config(arch)
            for h, w in ((16, 16), (37, 28), (28, 37), (46, 40), (5, 9)):
                with self.subTest(arch=arch, h=h, w=w):
                    got = model.interpolate_pos_encoding(h, w).detach().numpy()
                    self.assertEqual(got.dtype, np.float32)
                    want = numpy_pos_embed(pe, h, w, cfg["interpolate_offset"],
                                           cfg["interpolate_antialias"])
                    self.assertEqual(got.shape, (1, 1 + h * w, 384))
                    err = np.abs(got - want).max()
                    self.assertLess(err, 1e-5 * np.abs(want).max(), (arch, h, w, err))
                    # the same F.interpolate call in float64 matches the formula to rounding
                    got64 = model64.interpolate_pos_encoding(h, w, torch.float64).numpy()
                    err = np.abs(got64 - want).max()
                    self.assertLess(err, 1e-12 * np.abs(want).max(), (arch, h, w, err))
                    # the other convention is far off: the check discriminates
                    other = numpy_pos_embed(pe, h, w, 0.1 if cfg["interpolate_antialias"] else 0,
                                            not cfg["interpolate_antialias"])
                    self.assertGreater(np.abs(other - want).max(), 1e-2 * np.abs(want).max())

    def test_native_grid_unchanged(self):
        for arch in ("vits14", "vits14_reg"):
            model = dinov2.init_random(dinov2.DinoV2(arch, depth=1), seed=4)
            got = model.interpolate_pos_encoding(37, 37)
            self.assertTrue(torch.equal(got, model.pos_embed))

    def test_offset_step_is_not_plain(self):
        # with offset 0.1 even the unchanged 37-row axis is resampled (step 37/37.1)
        w = offset_matrix(37, 37, 0.1)
        self.assertGreater(np.abs(w - np.eye(37)).max(), 1e-3)
        np.testing.assert_allclose(offset_matrix(37, 37, 0.0), np.eye(37), atol=1e-15)


class ExportTest(unittest.TestCase):
    def check(self, arch, depth, size, taps, norm, batch=1, seed=0, fp16=False):
        model = dinov2.build_model(arch, "random:%d" % seed, depth=depth)
        x = image(batch, size[0], size[1], seed + 100)
        with torch.no_grad():
            want = [t.numpy() for t in model(x, taps=taps, norm=norm)]
        b = dinov2.export_dinov2(model, size, taps, norm=norm, fp16=fp16)
        g = read_graph(b.to_bytes())
        self.assertEqual(g.output_names, ["block%d" % t for t in taps])
        self.assertEqual(g.tensors[g.inputs[0]].shape, ["batch", 3, size[0], size[1]])
        self.assertEqual(g.metadata["model_name"], "dinov2_" + arch)
        got = reference.run(g, {"image": x.numpy()})
        h, w = size[0] // 14, size[1] // 14
        for t, wv in zip(taps, want):
            gv = got["block%d" % t]
            self.assertEqual(gv.shape, (batch, 1 + model.n_registers + h * w, model.embed_dim))
            err = np.abs(gv - wv).max() / rms(wv)
            self.assertLess(err, 2e-2 if fp16 else 1e-4, (arch, size, t, err))
        return g, got

    def test_vits14_full_depth_224(self):
        g, _ = self.check("vits14", None, (224, 224), [3, 6, 9, 12], norm=False, seed=1)
        ops = [n.op for n in g.nodes]
        self.assertEqual(ops.count("attention"), 12)
        self.assertEqual(ops.count("layernorm"), 24)
        self.assertTrue(all(t.dtype == "f32" for t in g.tensors))

    def test_vits14_518x392_norm(self):
        g, _ = self.check("vits14", 1, (518, 392), [1], norm=True, seed=2)
        self.assertEqual([n.op for n in g.nodes].count("layernorm"), 2 + 1)

    def test_vits14_reg_224(self):
        self.check("vits14_reg", 2, (224, 224), [1, 2], norm=True, seed=3)

    def test_vits14_reg_518x392(self):
        self.check("vits14_reg", 1, (518, 392), [1], norm=False, seed=4)

    def test_fp16_weights(self):
        g, _ = self.check("vits14", 2, (224, 224), [1, 2], norm=True, batch=2, seed=5, fp16=True)
        lin_w = {g.tensors[n.inputs[1]].dtype for n in g.nodes if n.op == "linear"}
        self.assertEqual(lin_w, {"f16"})

    def test_export_errors(self):
        model = dinov2.build_model("vits14", "random:0", depth=2)
        with self.assertRaisesRegex(dinov2.ExportError, "multiples of 14"):
            dinov2.export_dinov2(model, (224, 220), [1])
        with self.assertRaisesRegex(dinov2.ExportError, "tap 3"):
            dinov2.export_dinov2(model, (224, 224), [3])

    def test_vitg14_swiglu_224(self):
        # one SwiGLU block (full vitg14 is 1.1B parameters): linear(w12) -> swiglu -> linear(w3)
        g, _ = self.check("vitg14", 1, (224, 224), [1], norm=True, seed=6)
        ops = [n.op for n in g.nodes]
        self.assertEqual(ops.count("swiglu"), 1)
        self.assertEqual(ops.count("gelu"), 0)
        names = {n.name: n for n in g.nodes}
        self.assertEqual(names["blocks.0.mlp.w12"].attrs.get("activation", 0), 0)
        sw = names["blocks.0.mlp.swiglu"]
        self.assertEqual(g.tensors[sw.inputs[0]].dims[-1], 8192)
        self.assertEqual(g.tensors[sw.outputs[0]].dims[-1], 4096)
        self.assertEqual(len(names["blocks.0.mlp.w3"].inputs), 5)      # scale + residual

    def test_vitg14_reg_swiglu_small(self):
        # 518 table resampled to 2 x 3 (antialias): few tokens keep this 1536-wide block fast
        self.check("vitg14_reg", 1, (28, 42), [1], norm=False, seed=7)

    def test_swiglu_op(self):
        from vkg.builder import Builder
        b = Builder()
        x = b.input("x", ["batch", 3, 10])
        y = b.swiglu(x, name="sw")
        self.assertEqual(list(y.shape), ["batch", 3, 5])
        b.output(y, "y")
        with self.assertRaisesRegex(ValueError, "even"):
            b2 = Builder()
            b2.swiglu(b2.input("odd", [2, 7]))
        g = read_graph(b.to_bytes())
        v = np.random.default_rng(0).standard_normal((2, 3, 10))
        got = reference.run(g, {"x": v})["y"]
        t = torch.from_numpy(v)
        want = (torch.nn.functional.silu(t[..., :5]) * t[..., 5:]).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)

    def test_arch_table(self):
        self.assertEqual(dinov2_cli.ARCH_NAMES, dinov2.ARCH_NAMES)
        self.assertEqual(dinov2_cli.LAYOUTS, dinov2.LAYOUTS)
        for arch, (d, depth, heads) in (("vitb14", (768, 12, 12)), ("vitl14", (1024, 24, 16))):
            m = dinov2.DinoV2(arch, depth=1)
            self.assertEqual((m.embed_dim, dinov2.arch_config(arch)["depth"], m.heads),
                             (d, depth, heads))
            self.assertEqual(m.blocks[0].mlp.fc1.weight.shape, (4 * d, d))
        self.assertEqual(dinov2.DinoV2("vitl14_reg", depth=1).register_tokens.shape, (1, 4, 1024))
        cfg = dinov2.arch_config("vitg14")
        self.assertEqual((cfg["embed_dim"], cfg["depth"], cfg["heads"], cfg["ffn"]),
                         (1536, 40, 24, "swiglu"))
        self.assertEqual(dinov2.swiglu_hidden(1536), 4096)
        m = dinov2.DinoV2("vitg14_reg", depth=1)
        self.assertEqual(m.blocks[0].mlp.w12.weight.shape, (8192, 1536))
        self.assertEqual(m.blocks[0].mlp.w3.weight.shape, (1536, 4096))
        self.assertEqual(m.register_tokens.shape, (1, 4, 1536))

    def test_cli(self):
        from vkg.__main__ import main
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "m.vkg")
            with redirect_stdout(io.StringIO()) as s:
                rc = main(["dinov2", "random:7", "--arch", "vits14_reg", "--depth", "2",
                           "--image-size", "28", "42", "--taps", "1,2", "--norm", "--fp16",
                           "-o", out])
            self.assertEqual(rc, 0)
            self.assertIn("block1,block2", s.getvalue())
            g = read_graph(out)
            self.assertEqual(g.output_names, ["block1", "block2"])
            self.assertEqual(g.metadata["model_name"], "dinov2_vits14_reg")
            self.assertEqual(g.tensors[g.outputs[0]].dims[1:], [1 + 4 + 6, 384])
            model = dinov2.build_model("vits14_reg", "random:7", depth=2)
            x = image(1, 28, 42, 0)
            with torch.no_grad():
                want = model(x, taps=[1, 2], norm=True)
            got = reference.run(g, [x.numpy()])
            for k, w in zip(("block1", "block2"), want):
                self.assertLess(np.abs(got[k] - w.numpy()).max() / rms(w.numpy()), 2e-2)
            # a bad checkpoint path is a clean error
            with redirect_stdout(io.StringIO()):
                import contextlib
                with contextlib.redirect_stderr(io.StringIO()) as err:
                    rc = main(["dinov2", os.path.join(d, "nope.pth"), "-o", out])
            self.assertEqual(rc, 1)
            self.assertIn("nope.pth", err.getvalue())


class CheckpointTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.models = {a: dinov2.build_model(a, "random:11", depth=2)
                      for a in ("vits14", "vits14_reg")}

    def assert_same_weights(self, a, b, skip=()):
        sa, sb = a.state_dict(), b.state_dict()
        self.assertEqual(set(sa), set(sb))
        for k in sa:
            if k not in skip:
                self.assertTrue(torch.equal(sa[k], sb[k]), k)

    def roundtrip(self, arch, sd_or_path, layout):
        fresh = dinov2.DinoV2(arch, depth=2)
        got = dinov2.load_state_dict_any(fresh, sd_or_path)
        self.assertEqual(got, layout)
        return fresh

    def test_official_wrapped_and_prefixed(self):
        for arch, m in self.models.items():
            sd = m.state_dict()
            with tempfile.TemporaryDirectory() as d:
                for wrap in (sd, {"model": sd}, {"teacher": {"backbone." + k: v
                                                             for k, v in sd.items()}},
                             dict({"pretrained." + k: v for k, v in sd.items()},
                                  **{"depth_head.x.weight": torch.zeros(2)})):
                    p = os.path.join(d, "ck.pth")
                    torch.save(wrap, p)
                    self.assert_same_weights(m, self.roundtrip(arch, p, "official"))

    def test_timm_layout(self):
        x = image(1, 28, 42, 1)
        for arch, m in self.models.items():
            tsd = dinov2.to_timm_state_dict(m.state_dict())
            self.assertNotIn("mask_token", tsd)
            if m.n_registers:
                self.assertIn("reg_token", tsd)
                self.assertEqual(tsd["pos_embed"].shape, (1, 37 * 37, 384))
            with tempfile.TemporaryDirectory() as d:
                p = os.path.join(d, "timm.pth")
                torch.save(tsd, p)
                got = self.roundtrip(arch, p, "timm")
            # mask_token is training-only and absent in timm; for reg models the cls row of the
            # pos table is folded into cls_token (cls + pe0 is what the network sees)
            skip = {"mask_token"} | ({"cls_token", "pos_embed"} if m.n_registers else set())
            self.assert_same_weights(m, got, skip)
            if m.n_registers:
                self.assertTrue(torch.equal(got.pos_embed[:, 1:], m.pos_embed[:, 1:]))
                self.assertTrue(torch.equal(got.cls_token + got.pos_embed[:, :1],
                                            m.cls_token + m.pos_embed[:, :1]))
            with torch.no_grad():
                a, b = m(x, taps=[2])[0], got(x, taps=[2])[0]
            self.assertLess((a - b).abs().max().item(), 1e-5 * a.abs().max().item())

    def test_hf_safetensors(self):
        for arch, m in self.models.items():
            hsd = dinov2.to_hf_state_dict(m.state_dict())
            self.assertIn("encoder.layer.1.attention.attention.value.weight", hsd)
            self.assertIn("encoder.layer.0.layer_scale2.lambda1", hsd)
            self.assertEqual(any(k == "embeddings.register_tokens" for k in hsd),
                             bool(m.n_registers))
            with tempfile.TemporaryDirectory() as d:
                p = os.path.join(d, "model.safetensors")
                save_safetensors(hsd, p, metadata={"format": "pt"})
                self.assert_same_weights(m, self.roundtrip(arch, p, "hf"))
                # a task model's prefix ("dinov2.") in a torch .bin
                p = os.path.join(d, "pytorch_model.bin")
                torch.save({"dinov2." + k: v for k, v in hsd.items()}, p)
                self.assert_same_weights(m, self.roundtrip(arch, p, "hf"))

    def test_vitg14_swiglu_layouts(self):
        # official mlp.w12 / mlp.w3 <-> timm SwiGLUPacked mlp.fc1 / mlp.fc2 <-> HF
        # Dinov2SwiGLUFFN mlp.weights_in / mlp.weights_out
        m = dinov2.build_model("vitg14", "random:12", depth=1)
        tsd = dinov2.to_timm_state_dict(m.state_dict())
        self.assertEqual(tsd["blocks.0.mlp.fc1.weight"].shape, (8192, 1536))
        self.assertNotIn("blocks.0.mlp.w12.weight", tsd)
        got = dinov2.DinoV2("vitg14", depth=1)
        self.assertEqual(dinov2.load_state_dict_any(got, tsd), "timm")
        self.assert_same_weights(m, got, {"mask_token"})
        hsd = dinov2.to_hf_state_dict(m.state_dict())
        self.assertEqual(hsd["encoder.layer.0.mlp.weights_in.weight"].shape, (8192, 1536))
        self.assertEqual(hsd["encoder.layer.0.mlp.weights_out.weight"].shape, (1536, 4096))
        got = dinov2.DinoV2("vitg14", depth=1)
        self.assertEqual(dinov2.load_state_dict_any(got, hsd), "hf")
        self.assert_same_weights(m, got)
        # an official checkpoint (w12 / w3 names) loads as is
        got = dinov2.DinoV2("vitg14", depth=1)
        self.assertEqual(dinov2.load_state_dict_any(got, m.state_dict()), "official")
        self.assert_same_weights(m, got)

    def test_safetensors_dtypes(self):
        a = np.linspace(-3, 3, 24, dtype=np.float32).reshape(2, 3, 4)
        buf = safetensors_bytes({"a": a, "h": a.astype(np.float16), "b": a, "i": np.arange(5)},
                                bf16={"b"})
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "t.safetensors")
            with open(p, "wb") as f:
                f.write(buf)
            got = load_safetensors(p)
        np.testing.assert_array_equal(got["a"], a)
        np.testing.assert_array_equal(got["h"], a.astype(np.float16))
        self.assertEqual(got["b"].dtype, np.float32)
        np.testing.assert_allclose(got["b"], a, rtol=2 ** -8)
        np.testing.assert_array_equal(got["i"], np.arange(5))

    def test_wrong_checkpoint_lists_keys(self):
        m = self.models["vits14"]
        sd = dict(m.state_dict())
        del sd["blocks.1.mlp.fc2.bias"]
        sd["blocks.1.extra.weight"] = torch.zeros(3)
        sd["norm.weight"] = torch.zeros(5)
        with self.assertRaises(dinov2.CheckpointError) as cm:
            dinov2.load_state_dict_any(dinov2.DinoV2("vits14", depth=2), sd)
        msg = str(cm.exception)
        self.assertIn("missing keys (1): blocks.1.mlp.fc2.bias", msg)
        self.assertIn("unexpected keys (1): blocks.1.extra.weight", msg)
        self.assertIn("norm.weight: checkpoint (5,), model (384,)", msg)
        # a deeper checkpoint, and a reg checkpoint for a plain arch
        with self.assertRaisesRegex(dinov2.CheckpointError, "unexpected keys .*blocks.1.norm1"):
            dinov2.load_state_dict_any(dinov2.DinoV2("vits14", depth=1), m.state_dict())
        with self.assertRaisesRegex(dinov2.CheckpointError, "unexpected keys .*register_tokens"):
            dinov2.load_state_dict_any(dinov2.DinoV2("vits14", depth=2),
                                       self.models["vits14_reg"].state_dict())
        # HF: a missing value projection is reported under its HF name
        hsd = dinov2.to_hf_state_dict(m.state_dict())
        del hsd["encoder.layer.0.attention.attention.value.bias"]
        with self.assertRaises(dinov2.CheckpointError) as cm:
            dinov2.load_state_dict_any(dinov2.DinoV2("vits14", depth=2), hsd)
        msg = str(cm.exception)
        self.assertIn("missing keys (1): blocks.0.attn.qkv.bias", msg)
        self.assertIn("encoder.layer.0.attention.attention.query.bias", msg)


if __name__ == "__main__":
    unittest.main()
