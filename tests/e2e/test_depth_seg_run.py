"""The S1 depth + segmentation model (vkg.depth_seg: DINOv2 ViT-S/14 with MoE-LoRA FFNs, the DPT
depth head, the BN seg head) exported and run by `vkg run` on the Vulkan device, against the
PyTorch module at 224 and 518; and the bundled trained model through the C sample's graph.

Run by ctest as `python3 tests/e2e/test_depth_seg_run.py VKG_BINARY [CASE ...]`, one case per
process. Tolerance: the ViT issue's, max |vkg - torch| <= 1e-4 x RMS(torch output) for depth and
seg_logits in fp32 (tests/e2e/test_dinov2_run.py); the bundled graph's f16 weights are compared
with the fp32 module, within 2e-2 x RMS (as the ViT issue's fp16 case). Routing must agree exactly: every case first
checks that no top-k decision is within 5e-5 of a tie (vkg.depth_seg.router_margin), so fp32
rounding cannot flip one, and the graph's routing counts equal PyTorch's.
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

from vkg import depth_seg  # noqa: E402

VKG_BIN = None
MARGIN = 5e-5


class DepthSegRun(unittest.TestCase):
    def run_vkg(self, path, x, tmp):
        np.save(os.path.join(tmp, "image.npy"), x)
        out = os.path.join(tmp, "out")
        r = subprocess.run([VKG_BIN, "run", path, "--input", "image=" + os.path.join(tmp, "image.npy"),
                            "--out", out], capture_output=True, text=True,
                           env=dict(os.environ, VKG_VALIDATION="1"))
        self.assertEqual(r.returncode, 0, "vkg run failed: %s%s" % (r.stdout, r.stderr))
        return {f[:-4]: np.load(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".npy")}

    def compare(self, what, got, want, bound):
        self.assertEqual(got.shape, want.shape, what)
        rms = float(np.sqrt(np.mean(want.astype(np.float64) ** 2)))
        err = float(np.abs(got.astype(np.float64) - want).max())
        print("%s: max err %.3g = %.3g x RMS (bound %g)" % (what, err, err / rms, bound))
        self.assertLessEqual(err, bound * rms, "%s: max err %.3g > %g x RMS %.3g" % (what, err, bound, rms))

    def check(self, size, seg_head, seed, batch=1, classes=150):
        model = depth_seg.build_model("vits14", seed=seed, experts=8, top_k=2, lora_rank=8, lora_alpha=16,
                                      classes=classes, seg_head=seg_head)
        x = torch.randn(batch, 3, size[0], size[1], generator=torch.Generator().manual_seed(seed + 100))
        margin = depth_seg.router_margin(model, x)
        self.assertGreater(margin, MARGIN, "test image too close to a routing tie")
        with torch.no_grad():
            want = model(x, routing_stats=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ds.vkg")
            depth_seg.export_depth_seg(model, size, routing_stats=True, path=path)
            got = self.run_vkg(path, x.numpy(), tmp)
        name = "vits14 %dx%d %s batch %d" % (size[0], size[1], seg_head, batch)
        self.compare(name + " depth", got["depth"], want["depth"].numpy(), 1e-4)
        self.compare(name + " seg_logits", got["seg_logits"], want["seg_logits"].numpy(), 1e-4)
        for i in range(12):
            k = "blocks.%d.mlp.counts" % i
            np.testing.assert_array_equal(got[k], want[k].numpy().astype(np.float32), k)

    def test_vits14_224(self):
        self.check((224, 224), "pyramid", seed=4)

    def test_vits14_518(self):
        self.check((518, 518), "pyramid", seed=1)

    def test_vits14_224x168_flat_batch2(self):
        self.check((224, 168), "flat", seed=4, batch=2, classes=7)

    def test_bundled_model(self):
        """samples/depth_seg/depth_seg_mini.vkg (the trained model, f16 weights) on the four bundled
        held-out scenes (one run, batch 4) against their ground truth: a trained model run right
        gets mean pixel accuracy >= 0.75 and mean depth AbsRel <= 0.45 on them (measured when it
        was bundled: accuracy 0.877 / 0.990 / 0.833 / 0.834, AbsRel 0.256 / 0.205 / 0.434 /
        0.344); random weights, or a wrong kernel, land far outside (accuracy ~0.3, AbsRel > 1)."""
        from vkg import scenes
        sample = os.path.join(HERE, "..", "..", "samples", "depth_seg")
        img = os.path.join(sample, "images", "scene_%d")
        x = np.concatenate([np.load(img % k + "_input.npy") for k in range(4)])
        with tempfile.TemporaryDirectory() as tmp:
            got = self.run_vkg(os.path.join(sample, "depth_seg_mini.vkg"), x, tmp)
        self.assertEqual(got["depth"].shape, (4, 112, 112))
        self.assertEqual(got["seg_logits"].shape, (4, 5, 112, 112))
        self.assertTrue(np.isfinite(got["depth"]).all() and (got["depth"] >= 0).all())
        acc, absrel = [], []
        for k in range(4):
            gt, lab = np.load(img % k + "_depth.npy"), scenes.read_png(img % k + "_labels.png")
            valid = gt > 0
            pred = 1.0 / np.maximum(got["depth"][k][valid].astype(np.float64), 1e-3)
            absrel.append(float(np.mean(np.abs(pred - gt[valid]) / gt[valid])))
            acc.append(float(np.mean(got["seg_logits"][k].argmax(0) == lab)))
        print("bundled model: pixel accuracy %s, AbsRel %s" % (np.round(acc, 3), np.round(absrel, 3)))
        self.assertGreaterEqual(np.mean(acc), 0.75)
        self.assertLessEqual(np.mean(absrel), 0.45)

if __name__ == "__main__":
    VKG_BIN = sys.argv.pop(1)
    unittest.main(verbosity=2)
