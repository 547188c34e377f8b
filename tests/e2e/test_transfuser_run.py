"""The Transfuser MoE decoder (vkg.transfuser, model-spec S3) -> .vkg -> `vkg run` on the Vulkan
device, against PyTorch at navsim's shapes: Q = 1 + 30 queries, S = 8*8 + 1 memory tokens,
D = 256, 8 heads, FFN 1024, 3 layers, E = 4, k = 2.

Run by ctest as `python3 tests/e2e/test_transfuser_run.py VKG_BINARY`. Covers the MoE decoder at
batch 1 (run twice: bit-identical files), 3 and 8 with the output and all five statistics
(moe_aux_loss, moe_router_z_loss, moe_load_balance_loss, moe_usage_counts, moe_usage_fraction);
the command line `python3 -m vkg transfuser-decoder --random SEED` with GELU experts, temperature
and other coefficients; f16 weights; a checkpoint through the command line; and the plain
nn.TransformerDecoder (dense FFN, navsim's configuration) through vkg.export.

Tolerances: output |vkg - torch| <= 1e-5 + 1e-5 |torch| per element (as test_export_run.py);
statistics |vkg - torch| <= 1e-5 |torch|; counts exactly. f16 weights are compared with the fp32
module whose matrices are rounded to f16 (vkg.transfuser.round_weights_f16), at the same
tolerances. Every case first checks that no top-k decision is within 1e-5 of a tie (the seeds are
chosen for that), so a different fp32 summation order cannot flip one.
"""
import os
import subprocess
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
TOOLS = os.path.join(HERE, "..", "..", "tools", "python")
sys.path.insert(0, TOOLS)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import vkg  # noqa: E402
from vkg import transfuser as tf  # noqa: E402
from vkg import transfuser_model as tm  # noqa: E402
import vkgrun  # noqa: E402  (tests/e2e/vkgrun.py)

VKG_BIN = None
ATOL, RTOL = 1e-5, 1e-5
STAT_RTOL = 1e-5
MARGIN = 1e-5
Q, S, D = 31, 65, 256
AUX = tf.AUX_NAMES


def data(seed, batch):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, Q, D, generator=g), torch.randn(batch, S, D, generator=g)


class TransfuserRun(unittest.TestCase):
    def close(self, got, want, what, rtol=RTOL, atol=ATOL):
        want = np.asarray(want, dtype=np.float64)
        self.assertEqual(got.shape, want.shape, what)
        err = np.abs(got.astype(np.float64) - want)
        tol = atol + rtol * np.abs(want)
        self.assertTrue((err <= tol).all(), "%s: max error %.3g (worst %.3g of tolerance)"
                        % (what, err.max(), (err / tol).max()))

    def check(self, path, model, cases, out_names=("output",) + AUX):
        """Runs path on every (seed, batch) of cases and compares with model (PyTorch); the
        first case runs twice and must give bit-identical files."""
        with tempfile.TemporaryDirectory() as tmp:
            for ci, (seed, batch) in enumerate(cases):
                tgt, mem = data(seed, batch)
                moe = isinstance(model, tf.MoETransformerDecoder)
                if moe:
                    margins = tf.routing_margins(model, tgt, mem)
                    self.assertGreater(min(margins), MARGIN,
                                       "test data too close to a routing tie: %s" % margins)
                with torch.no_grad():
                    want = model(tgt, mem)
                want, aux = want if moe else (want, {})
                ins = {"tgt": tgt.numpy(), "memory": mem.numpy()}
                outs = [vkgrun.run(VKG_BIN, path, ins, os.path.join(tmp, "out%d_%d" % (ci, rep)))
                        for rep in range(2 if ci == 0 else 1)]
                self.assertEqual(sorted(outs[0]), sorted(out_names))
                if len(outs) > 1:
                    for n in out_names:
                        self.assertEqual(outs[0][n][1], outs[1][n][1],
                                         "output %s differs between two runs" % n)
                got = {n: v[0] for n, v in outs[0].items()}
                what = "%s batch %d" % (type(model).__name__, batch)
                self.close(got["output"], want.numpy(), what + " output")
                for name, w in aux.items():
                    g = got[name]
                    self.assertEqual(g.dtype, np.float32, name)
                    w = w.numpy().reshape(-1)
                    if name == "moe_usage_counts":
                        np.testing.assert_array_equal(g, w.astype(np.float32), what + " " + name)
                        self.assertEqual(int(g.sum()), 3 * batch * Q * 2)
                    else:
                        self.close(g, w, what + " " + name, rtol=STAT_RTOL, atol=0)

    def test_navsim_moe_decoder(self):
        """Batch 1 (twice, bit-identical), 3 and 8; the dispatch count vkg inspect reports."""
        model = tf.init_random(tf.MoETransformerDecoder(), 0).eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "decoder.vkg")
            tf.export_transfuser_decoder(model, Q, S, path)
            r = subprocess.run([VKG_BIN, "inspect", path], capture_output=True, text=True)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.assertIn("MoETransformerDecoder", r.stdout)
            self.assertIn("dispatches", r.stdout)
            print("\n" + "\n".join(l for l in r.stdout.splitlines() if "dispatches" in l))
            self.check(path, model, [(1, 1), (2, 3), (3, 8)])

    def test_cli_gelu_temperature(self):
        """`python3 -m vkg transfuser-decoder --random` with GELU experts, temperature 0.7,
        other coefficients; compared with build_model(seed=...) in this process."""
        opts = dict(activation="gelu", temperature=0.7, load_balance_coef=0.05, z_loss_coef=0.01)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "gelu.vkg")
            env = dict(os.environ, PYTHONPATH=TOOLS)
            r = subprocess.run([sys.executable, "-m", "vkg", "transfuser-decoder", "--random", "4",
                                "--d-model", "256", "--heads", "8", "--ffn", "1024", "--layers",
                                "3", "--experts", "4", "--top-k", "2", "--activation", "gelu",
                                "--temperature", "0.7", "--load-balance-coef", "0.05",
                                "--z-loss-coef", "0.01", "--queries", "31", "--memory", "65",
                                "-o", path], capture_output=True, text=True, env=env)
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            model = tf.build_model(seed=4, **opts)
            self.check(path, model, [(4, 2), (6, 8)])

    def test_fp16_and_checkpoint(self):
        """A checkpoint (prefixed, as a whole Transfuser model's) through the command line with
        --fp16; compared with the module whose matrices are rounded to f16."""
        model = tf.init_random(tf.MoETransformerDecoder(), 6).eval()
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = os.path.join(tmp, "transfuser.pth")
            torch.save({"_tf_decoder." + k: v for k, v in model.state_dict().items()}, ckpt)
            path = os.path.join(tmp, "fp16.vkg")
            r = subprocess.run([sys.executable, "-m", "vkg", "transfuser-decoder", ckpt,
                                "--fp16", "-o", path], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=TOOLS))
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            self.check(path, tf.round_weights_f16(model), [(6, 2)])

    def test_plain_transformer_decoder(self):
        """nn.TransformerDecoder(batch_first, relu, post-norm, dropout 0) through vkg.export."""
        dense = tf.init_random(tf.dense_decoder(), 7).eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "dense.vkg")
            vkg.export(dense, data(0, 1), path)
            self.check(path, dense, [(7, 1), (8, 8)], out_names=("output",))

    def test_bundled_sample_model(self):
        """samples/transfuser_moe/transfuser_moe.vkg (keyval and query construction, the MoE
        decoder, the trajectory and agent heads; f16 matrices) against the PyTorch module it was
        exported from: vkg.transfuser_model.TransfuserMoE, random seed 0, matrices rounded to
        f16. Batch 1 twice (bit-identical) and batch 3."""
        path = os.path.join(HERE, "..", "..", "samples", "transfuser_moe", "transfuser_moe.vkg")
        model = tm.round_weights_f16(tm.build_model(seed=0))
        outs = ("trajectory", "agent_states", "agent_labels") + AUX
        with tempfile.TemporaryDirectory() as tmp:
            for ci, (seed, batch) in enumerate([(21, 1), (22, 3)]):
                g = torch.Generator().manual_seed(seed)
                bev = torch.relu(torch.randn(batch, 512, 8, 8, generator=g))
                status = torch.zeros(batch, 8)
                status[:, 1] = 1.0
                status[:, 4:] = torch.randn(batch, 4, generator=g)
                seen = []
                h = model._tf_decoder.register_forward_pre_hook(lambda m, a: seen.append(a))
                with torch.no_grad():
                    want = model(bev, status)
                h.remove()
                self.assertGreater(min(tf.routing_margins(model._tf_decoder, *seen[0])), MARGIN)
                ins = {"bev_feature": bev.numpy(), "status_feature": status.numpy()}
                runs = [vkgrun.run(VKG_BIN, path, ins, os.path.join(tmp, "o%d_%d" % (ci, r)))
                        for r in range(2 if ci == 0 else 1)]
                self.assertEqual(sorted(runs[0]), sorted(outs))
                if len(runs) > 1:
                    for n in outs:
                        self.assertEqual(runs[0][n][1], runs[1][n][1], n + " differs between runs")
                for n in outs:
                    got, w = runs[0][n][0], want[n].numpy()
                    if n == "moe_usage_counts":
                        np.testing.assert_array_equal(got, w.astype(np.float32))
                    elif n.startswith("moe_"):
                        self.close(got, w.reshape(got.shape), n, rtol=STAT_RTOL, atol=0)
                    else:
                        self.close(got, w, "%s batch %d" % (n, batch))


if __name__ == "__main__":
    VKG_BIN = sys.argv.pop(1)
    unittest.main(verbosity=2)
