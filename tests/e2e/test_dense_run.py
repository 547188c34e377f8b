"""The dense-head ops end to end: a PyTorch module (a BN segmentation head's resampling on tokens:
tokens -> NCHW by reshape and permute, the pyramid of bilinear and area resizes, concat,
BatchNorm2d, a resize to the image with align_corners, argmax labels, adaptive pooling, NCHW back to
tokens) -> vkg.export -> `vkg run` (the C runtime on the Vulkan device) -> compared with PyTorch.

Run by ctest as `python3 tests/e2e/test_dense_run.py VKG_BINARY`. Tolerance per element:
8 ulp of the output's scale (float32 blends and the batch-norm terms) plus one ulp of the largest
source coordinate (<= its value in ulps of 1) times twice the scale (the spread of the blended
values): ATen's vectorized CPU build may contract a bilinear source coordinate into an fma, one ulp
away from the device's exact float32 steps. Labels must match
PyTorch's wherever the top two channels are further apart than that tolerance; elsewhere the chosen
channel must be within it of the maximum. i32 outputs must come back as int32 .npy files.
"""
import os
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools", "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import vkg  # noqa: E402
import vkgrun  # noqa: E402  (tests/e2e/vkgrun.py)

VKG_BIN = None
ULP = float(np.finfo(np.float32).eps)


class SegResample(nn.Module):
    """Four taps of tokens (N, h*w, D) -> a (N, 4D, 4h, 4w) normalized pyramid and its labels."""

    def __init__(self, d=12, h=5, w=7):
        super().__init__()
        self.h, self.w = h, w
        self.bn = nn.BatchNorm2d(4 * d)
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.pool = nn.AdaptiveAvgPool2d((3, 4))

    def forward(self, t0, t1, t2, t3):
        n, d = t0.shape[0], t0.shape[2]
        maps = [t.reshape(n, self.h, self.w, d).permute(0, 3, 1, 2) for t in (t0, t1, t2, t3)]
        maps = [F.interpolate(maps[0], scale_factor=4, mode="bilinear", align_corners=False),
                self.up2(maps[1]), maps[2], F.interpolate(maps[3], scale_factor=0.5, mode="area")]
        size = maps[0].shape[2:]
        maps = [maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in maps[1:]]
        y = self.bn(torch.cat(maps, dim=1))
        image = F.interpolate(y, size=(self.h * 14, self.w * 14), mode="bilinear", align_corners=True)
        labels = image.argmax(dim=1)
        tokens = y.permute(0, 2, 3, 1).reshape(n, -1, 4 * d)
        return image, labels, self.pool(y), tokens


class DenseRun(unittest.TestCase):
    def test_seg_resample(self):
        torch.manual_seed(0)
        m = SegResample().eval()
        with torch.no_grad():
            m.bn.running_mean.uniform_(-1, 1)
            m.bn.running_var.uniform_(0.2, 2)
            m.bn.weight.uniform_(-1.5, 1.5)
            m.bn.bias.uniform_(-1, 1)
        names = ["t0", "t1", "t2", "t3"]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "seg.vkg")
            vkg.export(m, tuple(torch.randn(2, 35, 12) for _ in names), path)
            for batch in (2, 3):
                xs = [torch.randn(batch, 35, 12) for _ in names]
                with torch.no_grad():
                    want = [w.numpy() for w in m(*xs)]
                res = vkgrun.run(VKG_BIN, path, {k: x.numpy() for k, x in zip(names, xs)}, os.path.join(tmp, "out"))
                scale = max(np.abs(w).max() for w in (want[0], want[2], want[3]))
                # the largest source coordinate is about the largest input size, 4 max(h, w)
                tol = scale * ULP * (8 + 2 * 4 * max(m.h, m.w))
                for i in (0, 2, 3):
                    got = res["output%d" % i][0]
                    self.assertEqual(got.shape, want[i].shape)
                    err = np.abs(got - want[i]).max()
                    self.assertLessEqual(err, tol, "batch %d output %d: max error %.3g > %.3g" % (batch, i, err, tol))
                labels, raw = res["output1"]
                self.assertEqual(labels.dtype, np.int32)
                self.assertIn(b"'descr': '<i4'", raw[:128])
                self.assertEqual(labels.shape, want[1].shape)
                image = want[0]
                top2 = np.sort(image, axis=1)[:, -2:]
                clear = top2[:, 1] - top2[:, 0] > 2 * tol
                np.testing.assert_array_equal(labels[clear], want[1][clear])
                picked = np.take_along_axis(image, labels[:, None].astype(np.int64), axis=1)[:, 0]
                self.assertTrue((picked >= top2[:, 1] - 2 * tol).all(), "a label far from the maximum")
                self.assertGreater(clear.mean(), 0.99)


if __name__ == "__main__":
    VKG_BIN = sys.argv.pop(1)
    unittest.main(verbosity=2)
