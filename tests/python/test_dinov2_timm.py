"""vkg.dinov2 against timm's DINOv2 ViTs (skipped when timm is not importable).

timm's model is randomized (its own init has LayerScale 1e-5, which would hide the blocks), its
state_dict is loaded into vkg.dinov2.DinoV2 through the timm-layout loader (auto-detected), and the
block outputs (captured with forward hooks on timm's blocks) are compared with a 224 positional table at 224x224, where neither
side resamples it. For the register model also with the 518 table at 182x252 with timm's
dynamic_img_size: timm resamples with bicubic antialias=True and no offset, which is the official
convention of the `_reg` models.
"""

import importlib.util
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools",
                                "python"))

import torch  # noqa: E402

from vkg import dinov2  # noqa: E402

HAVE_TIMM = importlib.util.find_spec("timm") is not None
# scripts/setup.sh installs timm into build/pydeps and ctest sets VKG_REQUIRE_TIMM=1: there a
# missing timm is a failure, never a skip.
if not HAVE_TIMM and os.environ.get("VKG_REQUIRE_TIMM") == "1":
    raise ImportError("VKG_REQUIRE_TIMM=1 but timm is not importable; run scripts/setup.sh")
DEPTH = 2


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma") or (name.rsplit(".", 1)[-1] == "weight" and "norm" in name):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.2)
            elif p.dim() >= 2 and "token" not in name and "pos_embed" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@unittest.skipUnless(HAVE_TIMM, "timm is not importable (No module named 'timm'); install it "
                     "(pip install --no-deps timm) to compare against timm's DINOv2")
class TimmTest(unittest.TestCase):
    def compare(self, timm_name, arch, img_size, size, depth=DEPTH, **timm_kw):
        import timm
        try:
            tm = timm.create_model(timm_name, pretrained=False, num_classes=0, depth=depth,
                                   img_size=img_size, **timm_kw)
        except (RuntimeError, TypeError, KeyError) as e:   # older timm: model or kwarg missing
            if os.environ.get("VKG_REQUIRE_TIMM") == "1":
                raise
            self.skipTest("timm %s cannot build %s(%s): %s" % (timm.__version__, timm_name,
                                                              timm_kw, e))
        tm.eval()
        randomize(tm, 0)
        ours = dinov2.DinoV2(arch, depth=depth, img_size=img_size).eval()
        layout = dinov2.load_state_dict_any(ours, tm.state_dict())
        self.assertEqual(layout, "timm")
        captured = []
        hooks = [blk.register_forward_hook(lambda m, i, o: captured.append(o))
                 for blk in tm.blocks]
        x = torch.randn(1, 3, size[0], size[1], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            tm.forward_features(x)
            want = ours(x, taps=range(1, depth + 1))
        for h in hooks:
            h.remove()
        self.assertEqual(len(captured), depth)
        for i, (a, b) in enumerate(zip(captured, want)):
            self.assertEqual(tuple(a.shape), tuple(b.shape))
            err = (a - b).abs().max().item() / b.pow(2).mean().sqrt().item()
            self.assertLess(err, 1e-4, "%s block %d at %s: rel err %g" % (timm_name, i + 1, size,
                                                                          err))

    # a 224 table (16 x 16) at 224 input: no resampling on either side (keeps the test fast)
    def test_vits14_native_grid(self):
        self.compare("vit_small_patch14_dinov2", "vits14", 224, (224, 224))

    def test_vits14_reg_native_grid(self):
        self.compare("vit_small_patch14_reg4_dinov2", "vits14_reg", 224, (224, 224))

    def test_vits14_reg_resampled(self):
        # the 518 table (37 x 37) resampled to 13 x 18 by both: bicubic, antialias, no offset
        self.compare("vit_small_patch14_reg4_dinov2", "vits14_reg", 518, (182, 252),
                     dynamic_img_size=True)

    # vitg14: timm's SwiGLUPacked (mlp.fc1 chunked (gate, value), silu on the first half) loaded
    # as the official mlp.w12 / mlp.w3; one block (the full model is 1.1B parameters)
    # (a 70 table (5 x 5) at 70 input: no resampling; small so the 1536-wide block stays fast)
    def test_vitg14_swiglu_native_grid(self):
        self.compare("vit_giant_patch14_dinov2", "vitg14", 70, (70, 70), depth=1)

    def test_vitg14_reg_swiglu_native_grid(self):
        self.compare("vit_giant_patch14_reg4_dinov2", "vitg14_reg", 70, (70, 70), depth=1)


if __name__ == "__main__":
    unittest.main()
