"""The Transfuser model around the MoE decoder (vkg.transfuser_model, model-spec §3.2-3.5): the
PyTorch module against the spec's formulas (keyval and query construction, the heads' tanh
scalings), its state_dict names (navsim's), and the exported graph run by the NumPy reference
interpreter (vkg.reference) against the module, in fp32 and with f16 weights; the command line.

Tolerances as test_transfuser.py: |ref - torch| <= 1e-5 + 1e-5 |torch| per element; statistics
within 1e-5 relative, counts exactly; inputs checked to be >= 1e-5 away from a routing tie.

Run: cd tests/python && PYTHONPATH=../../tools/python /usr/bin/python3 -m unittest test_transfuser_model
"""

import os
import subprocess
import sys
import tempfile
import unittest

TOOLS = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..",
                                      "tools", "python"))
sys.path.insert(0, TOOLS)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vkg import reference  # noqa: E402
from vkg import transfuser as tf  # noqa: E402
from vkg import transfuser_model as tm  # noqa: E402
from vkg.format import read_graph  # noqa: E402

ATOL = RTOL = 1e-5
MARGIN = 1e-5
OUTS = ("trajectory", "agent_states", "agent_labels") + tf.AUX_NAMES


def inputs(seed, batch):
    g = torch.Generator().manual_seed(seed)
    bev = torch.relu(torch.randn(batch, 512, 8, 8, generator=g))
    status = torch.zeros(batch, 8)
    status[torch.arange(batch), torch.randint(0, 4, (batch,), generator=g)] = 1.0
    status[:, 4:] = torch.randn(batch, 4, generator=g)
    return bev, status


def decoder_margins(model, bev, status):
    """tf.routing_margins on the decoder's own inputs (query, keyval) in this forward."""
    seen = []
    h = model._tf_decoder.register_forward_pre_hook(lambda m, a: seen.append(a))
    try:
        with torch.no_grad():
            model(bev, status)
    finally:
        h.remove()
    return tf.routing_margins(model._tf_decoder, *seen[0])


class Module(unittest.TestCase):
    def test_state_dict_names_and_sizes(self):
        m = tm.TransfuserMoE()
        sd = m.state_dict()
        for k in ("_bev_downscale.weight", "_status_encoding.bias", "_keyval_embedding.weight",
                  "_query_embedding.weight", "_tf_decoder.layers.2.moe.experts.3.fc2.bias",
                  "_tf_decoder.layers.0.multihead_attn.in_proj_weight",
                  "_trajectory_head._mlp.0.weight", "_trajectory_head._mlp.2.bias",
                  "_agent_head._mlp_states.2.weight", "_agent_head._mlp_label.0.bias"):
            self.assertIn(k, sd)
        count = lambda pre: sum(v.numel() for k, v in sd.items() if k.startswith(pre))  # noqa
        # model-spec §3.2, §3.5, §3.6
        self.assertEqual(count("_bev_downscale"), 131328)
        self.assertEqual(count("_status_encoding"), 2304)
        self.assertEqual(count("_keyval_embedding"), 16640)
        self.assertEqual(count("_query_embedding"), 7936)
        self.assertEqual(count("_trajectory_head"), 287768)
        self.assertEqual(count("_agent_head"), 268550)
        self.assertEqual(count("_tf_decoder"), 7893516)

    def test_forward_against_the_spec(self):
        """§3.2 and §3.5 written out with the decoder's own output."""
        m = tm.init_random(tm.TransfuserMoE(), 3).eval()
        bev, status = inputs(1, 2)
        with torch.no_grad():
            out = m(bev, status)
            kv = torch.cat([F.conv2d(bev, m._bev_downscale.weight, m._bev_downscale.bias)
                            .flatten(2).permute(0, 2, 1),
                            m._status_encoding(status)[:, None]], 1) \
                + m._keyval_embedding.weight[None]
            q = m._query_embedding.weight[None].repeat(2, 1, 1)
            dec, aux = m._tf_decoder(q, kv)
            th, ah = m._trajectory_head, m._agent_head
            poses = th._mlp(dec[:, :1]).reshape(-1, 8, 3)
            poses[..., 2] = poses[..., 2].tanh() * np.pi
            states = ah._mlp_states(dec[:, 1:])
            states[..., 0:2] = states[..., 0:2].tanh() * 32
            states[..., 2] = states[..., 2].tanh() * np.pi
            labels = ah._mlp_label(dec[:, 1:]).squeeze(-1)
        self.assertEqual(tuple(out["trajectory"].shape), (2, 8, 3))
        self.assertEqual(tuple(out["agent_states"].shape), (2, 30, 5))
        self.assertEqual(tuple(out["agent_labels"].shape), (2, 30))
        torch.testing.assert_close(out["trajectory"], poses, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out["agent_states"], states, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out["agent_labels"], labels)
        for k, v in aux.items():
            torch.testing.assert_close(out[k], v)


class Graph(unittest.TestCase):
    def close(self, got, want, what, rtol=RTOL, atol=ATOL):
        want = np.asarray(want, dtype=np.float64)
        self.assertEqual(got.shape, want.shape, what)
        err = np.abs(got.astype(np.float64) - want)
        tol = atol + rtol * np.abs(want)
        self.assertTrue((err <= tol).all(), "%s: max error %.3g (worst %.3g of tolerance)"
                        % (what, err.max(), (err / tol).max()))

    def check(self, model, path, cases):
        g = read_graph(path)
        self.assertEqual([g.tensors[i].name for i in g.outputs], list(OUTS))
        for seed, batch in cases:
            bev, status = inputs(seed, batch)
            self.assertGreater(min(decoder_margins(model, bev, status)), MARGIN)
            with torch.no_grad():
                want = model(bev, status)
            got = reference.run(g, {"bev_feature": bev.numpy(), "status_feature": status.numpy()})
            for name in OUTS:
                w = want[name].numpy().reshape(np.shape(got[name]))
                if name == "moe_usage_counts":
                    np.testing.assert_array_equal(got[name], w.astype(np.float32))
                elif name.startswith("moe_"):
                    self.close(got[name], w, name, rtol=1e-5, atol=0)
                else:
                    self.close(got[name], w, "%s batch %d" % (name, batch))

    def test_fp32_graph(self):
        m = tm.init_random(tm.TransfuserMoE(), 0).eval()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "t.vkg")
            b = tm.export_transfuser_model(m, path)
            ops = {}
            for n in b.nodes:
                ops[n["op"]] = ops.get(n["op"], 0) + 1
            self.assertEqual(ops["moe_router"], 3)
            self.assertEqual(ops["concat"], 2)
            self.check(m, path, [(11, 1), (12, 3)])

    def test_fp16_graph_from_the_command_line(self):
        """`python3 -m vkg transfuser-model --random 0 --fp16` (how the sample's bundled graph
        is made) against the module with the same matrices rounded to f16."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "t16.vkg")
            r = subprocess.run([sys.executable, "-m", "vkg", "transfuser-model", "--random", "0",
                                "--fp16", "-o", path], capture_output=True, text=True,
                               env=dict(os.environ, PYTHONPATH=TOOLS))
            self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
            m = tm.round_weights_f16(tm.build_model(seed=0))
            self.check(m, path, [(13, 2)])

    def test_checkpoint_round_trip_and_mismatch(self):
        m = tm.init_random(tm.TransfuserMoE(), 5).eval()
        with tempfile.TemporaryDirectory() as tmp:
            ck = os.path.join(tmp, "m.pth")
            torch.save(m.state_dict(), ck)
            m2 = tm.build_model(ck)
            for k, v in m.state_dict().items():
                self.assertTrue(torch.equal(v, m2.state_dict()[k]), k)
            sd = m.state_dict()
            sd.pop("_agent_head._mlp_label.0.bias")
            sd["extra.weight"] = torch.zeros(1)
            torch.save(sd, ck)
            with self.assertRaises(tf.CheckpointError) as e:
                tm.build_model(ck)
            self.assertIn("_agent_head._mlp_label.0.bias", str(e.exception))
            self.assertIn("extra.weight", str(e.exception))


if __name__ == "__main__":
    unittest.main()
