"""vkg.scenes: the procedural renderer's depth and labels are exact (every hit lies on the surface
its label names, at the stated z-depth), renders are deterministic by seed, and the PNG writer and
reader round-trip. NumPy only."""

import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools",
                                "python"))

import numpy as np  # noqa: E402

from vkg import scenes  # noqa: E402


def box_distance(p, box):
    """Chebyshev distance of points p to the surface of a box (cx, cz, hx, hy, hz, yaw), in the
    box frame (0 on the surface)."""
    cx, cz, hx, hy, hz, yaw = box
    c, s = np.cos(yaw), np.sin(yaw)
    x, y, z = p[:, 0] - cx, p[:, 1] - hy, p[:, 2] - cz
    lx, lz = c * x - s * z, s * x + c * z
    q = np.abs(np.stack([lx, y, lz], 1)) - np.array([hx, hy, hz])
    return np.abs(q.max(1))


class ScenesTest(unittest.TestCase):
    def test_deterministic(self):
        a = scenes.render(11, 42, 56)
        b = scenes.render(11, 42, 56)
        c = scenes.render(12, 42, 56)
        for u, v in zip(a, b):
            self.assertTrue(np.array_equal(u, v))
        self.assertFalse(np.array_equal(a[0], c[0]))
        self.assertEqual((a[0].shape, a[0].dtype), ((42, 56, 3), np.uint8))
        self.assertEqual((a[1].dtype, a[2].dtype), (np.float32, np.uint8))

    def test_depth_and_labels_are_exact(self):
        seen = set()
        for seed in range(12):
            image, depth, labels, info = scenes.render(seed, 56, 56, info=True)
            self.assertTrue(np.array_equal(depth > 0, labels > 0))      # sky has no depth
            seen |= set(np.unique(labels).tolist())
            p = info["origin"][None] + depth.reshape(-1, 1).astype(np.float64) * info[
                "rays"].reshape(-1, 3)
            lab = labels.reshape(-1)
            tol = 1e-4 * np.maximum(depth.reshape(-1), 1)            # float32 depth rounding
            g = lab == 1
            self.assertTrue(np.all(np.abs(p[g, 1]) <= tol[g]))
            w = lab == 2
            if w.any():
                d = np.min([np.abs(p[w, 2 if axis == "z" else 0] - pos)
                            for axis, pos in info["walls"]], 0)
                self.assertTrue(np.all(d <= tol[w]))
                self.assertTrue(np.all(p[w, 1] <= info["wall_height"] + tol[w]))
            m = lab == 3
            if m.any():
                d = np.min([box_distance(p[m], bx) for bx in info["boxes"]], 0)
                self.assertTrue(np.all(d <= tol[m]))
            s = lab == 4
            if s.any():
                d = np.min([np.abs(np.linalg.norm(p[s] - np.array([cx, r, cz]), axis=1) - r)
                            for cx, cz, r in info["spheres"]], 0)
                self.assertTrue(np.all(d <= tol[s]))
            # z-depth: the rays have a unit component along the optical axis
            np.testing.assert_allclose(info["rays"].reshape(-1, 3) @ info["forward"], 1.0,
                                       atol=1e-12)
        self.assertEqual(seen, set(range(len(scenes.CLASSES))))

    def test_batch_and_normalize(self):
        ims, depth, labels = scenes.render_batch([0, 1, 2], 28, 42)
        self.assertEqual((ims.shape, depth.shape, labels.shape),
                         ((3, 28, 42, 3), (3, 28, 42), (3, 28, 42)))
        x = scenes.normalize(ims)
        self.assertEqual((x.shape, x.dtype), ((3, 3, 28, 42), np.float32))
        want = (ims[1, 5, 7, 2] / 255.0 - 0.406) / 0.225
        self.assertAlmostEqual(float(x[1, 2, 5, 7]), want, places=5)

    def test_png_round_trip(self):
        rng = np.random.default_rng(0)
        arrays = [rng.integers(0, 256, (5, 7), dtype=np.uint8),
                  rng.integers(0, 256, (6, 3, 3), dtype=np.uint8),
                  rng.integers(0, 65536, (4, 9), dtype=np.uint16),
                  rng.integers(0, 256, (3, 2, 4), dtype=np.uint8)]
        with tempfile.TemporaryDirectory() as d:
            for i, a in enumerate(arrays):
                path = os.path.join(d, "%d.png" % i)
                scenes.write_png(path, a)
                b = scenes.read_png(path)
                self.assertEqual(b.dtype, a.dtype)
                self.assertTrue(np.array_equal(a, b))
        with self.assertRaises(ValueError):
            scenes.png_bytes(np.zeros((2, 2), np.float32))


if __name__ == "__main__":
    unittest.main()
