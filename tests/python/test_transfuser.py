"""The Transfuser MoE decoder (vkg.transfuser, model-spec S3): the PyTorch module against the
spec's formula (§3.3-3.4) and its coefficient semantics; MoE decoders with identical experts
against nn.TransformerDecoder; the exported graph run by the NumPy reference interpreter
(vkg.reference) against the module; plain nn.TransformerDecoder export; checkpoints and the
command line.

Tolerances: fp32 |ref - torch| <= 1e-5 + 1e-5 |torch| per element (as test_moe.py); statistics
within 1e-5 relative, counts exactly. Random cases first check that no top-k decision is within
1e-5 of a tie (vkg.transfuser.routing_margins).

Run: cd tests/python && PYTHONPATH=../../tools/python /usr/bin/python3 -m unittest test_transfuser
"""

import math
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
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vkg  # noqa: E402
from vkg import reference  # noqa: E402
from vkg import transfuser as tf  # noqa: E402
from vkg.format import read_graph  # noqa: E402

ATOL = RTOL = 1e-5
MARGIN = 1e-5
AUX = tf.AUX_NAMES
SMALL = dict(d_model=64, nhead=4, dim_feedforward=96, num_layers=2)


def data(seed, batch, queries=31, memory=65, d=256):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, queries, d, generator=g), torch.randn(batch, memory, d, generator=g)


def decoder(seed, config=None, **sizes):
    args = dict(tf.NAVSIM)
    args.pop("queries")
    args.pop("memory")
    args.update(sizes)
    return tf.init_random(tf.MoETransformerDecoder(config=config, **args), seed).eval()


def mha_formula(mha, q_in, kv_in):
    """§3.3's MultiheadAttention formula in float64."""
    d, h = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight.double(), mha.in_proj_bias.double()
    q = F.linear(q_in, w[:d], b[:d])
    k = F.linear(kv_in, w[d:2 * d], b[d:2 * d])
    v = F.linear(kv_in, w[2 * d:], b[2 * d:])

    def heads(t):
        return t.reshape(t.shape[0], t.shape[1], h, d // h).transpose(1, 2)

    a = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(d // h), -1) @ heads(v)
    a = a.transpose(1, 2).reshape(q.shape)
    return F.linear(a, mha.out_proj.weight.double(), mha.out_proj.bias.double())


def ln(x, norm):
    return F.layer_norm(x, (x.shape[-1],), norm.weight.double(), norm.bias.double(), norm.eps)


def formula(model, tgt, memory):
    """The decoder of model-spec §3.3-3.4 written out in float64: returns (output, aux)."""
    x, mem = tgt.double(), memory.double()
    cfg = model.config
    lb = zl = 0.0
    counts = torch.zeros(cfg.num_experts, dtype=torch.int64)
    act = F.relu if cfg.activation == "relu" else F.gelu
    for layer in model.layers:
        x = ln(x + mha_formula(layer.self_attn, x, x), layer.norm1)
        x = ln(x + mha_formula(layer.multihead_attn, x, mem), layer.norm2)
        m = layer.moe
        f = x.reshape(-1, x.shape[-1])
        z = F.linear(f, m.router.weight.double(), m.router.bias.double()) / cfg.router_temperature
        ids = torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :cfg.top_k]
        g = torch.softmax(z.gather(1, ids), -1)
        y = torch.zeros_like(f)
        for t in range(f.shape[0]):
            for j in torch.argsort(ids[t]).tolist():       # ascending expert id
                ex = m.experts[int(ids[t, j])]
                y[t] += g[t, j] * F.linear(act(F.linear(f[t], ex.fc1.weight.double(),
                                                        ex.fc1.bias.double())),
                                           ex.fc2.weight.double(), ex.fc2.bias.double())
        x = ln(x + y.reshape(x.shape), layer.norm3)
        p = torch.softmax(z, -1)
        lb += cfg.load_balance_coef * cfg.num_experts * float((p.mean(0) ** 2).sum())
        zl += cfg.router_z_loss_coef * float((torch.logsumexp(z, -1) ** 2).mean())
        counts += torch.bincount(ids.reshape(-1), minlength=cfg.num_experts)
    aux = dict(moe_aux_loss=lb + zl, moe_router_z_loss=zl, moe_load_balance_loss=lb,
               moe_usage_counts=counts, moe_usage_fraction=counts.double() / counts.sum())
    return x, aux


class Case(unittest.TestCase):
    def assertClose(self, got, want, what, rtol=RTOL, atol=ATOL):
        got = np.asarray(got, dtype=np.float64)
        want = np.asarray(want, dtype=np.float64)
        self.assertEqual(got.shape, want.shape, what)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)

    def assertAux(self, got, want, what):
        """got: graph outputs or a module aux; want: a module aux (or the formula's)."""
        for name in AUX:
            g = np.asarray(got[name] if not torch.is_tensor(got[name])
                           else got[name].detach().numpy(), dtype=np.float64).reshape(-1)
            w = np.asarray(want[name].detach().numpy() if torch.is_tensor(want[name])
                           else want[name], dtype=np.float64).reshape(-1)
            if name == "moe_usage_counts":
                np.testing.assert_array_equal(g, w, err_msg="%s %s" % (what, name))
            else:
                self.assertClose(g, w, "%s %s" % (what, name), rtol=1e-5, atol=0)

    def tie_free(self, model, tgt, memory):
        margins = tf.routing_margins(model, tgt, memory)
        self.assertGreater(min(margins), MARGIN, "test data too close to a routing tie: %s"
                           % margins)

    def check_graph(self, model, runs, fp16=False, layer_stats=False, want_model=None):
        """Exports model, runs every (tgt, memory) of runs through vkg.reference and compares
        the output and the five statistics with want_model (default model)."""
        q, s = runs[0][0].shape[1], runs[0][1].shape[1]
        g = read_graph(tf.export_transfuser_decoder(model, q, s, fp16=fp16,
                                                    layer_stats=layer_stats).to_bytes())
        self.assertEqual(g.input_names, ["tgt", "memory"])
        self.assertEqual(g.output_names[:6], ["output"] + list(AUX))
        ref = want_model or model
        for tgt, mem in runs:
            self.tie_free(ref, tgt, mem)
            with torch.no_grad():
                want, aux = ref(tgt, mem)
            got = reference.run(g, {"tgt": tgt.numpy(), "memory": mem.numpy()})
            what = "batch %d" % tgt.shape[0]
            self.assertClose(got["output"], want.numpy(), what + " output")
            self.assertAux(got, aux, what)
            if layer_stats:
                for i, st in enumerate(ref.last_layer_stats):
                    for k, v in st.items():
                        self.assertClose(got["layers.%d.moe.%s" % (i, k)], v.numpy(),
                                         "layer %d %s" % (i, k))
        return g


class Module(Case):
    def test_state_dict_layout(self):
        m = tf.MoETransformerDecoder(64, 4, 96, 2, tf.MoEConfig(num_experts=3))
        keys = [k for k in m.state_dict() if k.startswith("layers.1.")]
        want = ["layers.1.self_attn.in_proj_weight", "layers.1.self_attn.in_proj_bias",
                "layers.1.self_attn.out_proj.weight", "layers.1.self_attn.out_proj.bias",
                "layers.1.multihead_attn.in_proj_weight", "layers.1.multihead_attn.in_proj_bias",
                "layers.1.multihead_attn.out_proj.weight",
                "layers.1.multihead_attn.out_proj.bias",
                "layers.1.norm1.weight", "layers.1.norm1.bias", "layers.1.norm2.weight",
                "layers.1.norm2.bias", "layers.1.norm3.weight", "layers.1.norm3.bias",
                "layers.1.moe.router.weight", "layers.1.moe.router.bias"]
        for e in range(3):
            for fc in ("fc1", "fc2"):
                want += ["layers.1.moe.experts.%d.%s.%s" % (e, fc, w) for w in ("weight", "bias")]
        self.assertEqual(sorted(keys), sorted(want))
        self.assertEqual(tuple(m.state_dict()["layers.1.moe.experts.2.fc1.weight"].shape),
                         (96, 64))
        # navsim sizes: model-spec §3.6's parameter count
        self.assertEqual(sum(p.numel() for p in tf.MoETransformerDecoder().parameters()),
                         7893516)

    def test_config(self):
        c = tf.MoEConfig()
        self.assertEqual((c.num_experts, c.top_k, c.load_balance_coef, c.router_z_loss_coef,
                          c.router_temperature, c.activation), (4, 2, 1e-2, 1e-3, 1.0, "relu"))
        for bad in (dict(top_k=5), dict(top_k=0), dict(router_temperature=0.0),
                    dict(activation="silu"), dict(load_balance_coef=float("nan"))):
            with self.assertRaises(ValueError, msg=str(bad)):
                tf.MoEConfig(**bad)

    def test_matches_the_formula(self):
        cases = [(decoder(1), data(101, 2)),
                 (decoder(2, tf.MoEConfig(num_experts=6, top_k=3, activation="gelu",
                                          router_temperature=0.6, load_balance_coef=0.05,
                                          router_z_loss_coef=0.02), **SMALL),
                  data(102, 3, 5, 9, 64))]
        for m, (tgt, mem) in cases:
            self.tie_free(m, tgt, mem)
            with torch.no_grad():
                out, aux = m(tgt, mem)
                want, waux = formula(m, tgt, mem)
            self.assertEqual(out.shape, tgt.shape)
            self.assertEqual(aux["moe_usage_counts"].dtype, torch.int64)
            self.assertEqual(aux["moe_aux_loss"].dim(), 0)
            self.assertClose(out, want, "output")
            self.assertAux(aux, waux, "module vs formula")
            self.assertEqual(int(aux["moe_usage_counts"].sum()),
                             m.num_layers * tgt.shape[0] * tgt.shape[1] * m.config.top_k)

    def test_identical_experts_equal_nn_transformer_decoder(self):
        for act, seed in (("relu", 3), ("gelu", 4)):
            dense = tf.init_random(tf.dense_decoder(activation=act), seed).eval()
            m = tf.MoETransformerDecoder.from_dense(dense, tf.MoEConfig(activation=act)).eval()
            tf.init_random(m.layers[0].moe.router, seed + 10)   # routers matter only for aux
            tgt, mem = data(seed, 2)
            with torch.no_grad():
                want = dense(tgt, mem)
                out, aux = m(tgt, mem)
            self.assertClose(out, want, act + ": MoE with identical experts vs dense")
            self.assertEqual(int(aux["moe_usage_counts"].sum()), 3 * 2 * 31 * 2)

    def test_coefficients_uniform_router(self):
        """Zero routers: softmax uniform, so lb_l = 1 and zl_l = log(E)^2 per layer; ties go to
        the lowest experts."""
        cfg = tf.MoEConfig(num_experts=4, top_k=2, load_balance_coef=0.3,
                           router_z_loss_coef=0.07, router_temperature=2.0)
        m = decoder(5, cfg, **SMALL)
        with torch.no_grad():
            for layer in m.layers:
                layer.moe.router.weight.zero_()
                layer.moe.router.bias.zero_()
        tgt, mem = data(5, 2, 7, 9, 64)
        with torch.no_grad():
            _, aux = m(tgt, mem)
        L, T = 2, 2 * 7
        self.assertAlmostEqual(float(aux["moe_load_balance_loss"]), 0.3 * L * 1.0, places=6)
        self.assertAlmostEqual(float(aux["moe_router_z_loss"]),
                               0.07 * L * math.log(4) ** 2, places=6)
        self.assertAlmostEqual(float(aux["moe_aux_loss"]),
                               0.3 * L + 0.07 * L * math.log(4) ** 2, places=6)
        self.assertEqual(aux["moe_usage_counts"].tolist(), [L * T, L * T, 0, 0])
        self.assertEqual(aux["moe_usage_fraction"].tolist(), [0.5, 0.5, 0.0, 0.0])
        # the exported graph agrees on the ties and every statistic
        g = read_graph(tf.export_transfuser_decoder(m, 7, 9).to_bytes())
        got = reference.run(g, {"tgt": tgt.numpy(), "memory": mem.numpy()})
        self.assertAux(got, aux, "uniform router")

    def test_coefficients_collapsed_and_temperature(self):
        """A router that sends everything to expert 3: lb_l -> E; the temperature divides the
        logits of every statistic."""
        cfg = tf.MoEConfig(num_experts=4, top_k=1, load_balance_coef=1.0,
                           router_z_loss_coef=1.0, router_temperature=4.0)
        m = decoder(6, cfg, **SMALL)
        with torch.no_grad():
            for layer in m.layers:
                layer.moe.router.weight.zero_()
                layer.moe.router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 400.0]))
        tgt, mem = data(6, 1, 3, 5, 64)
        with torch.no_grad():
            _, aux = m(tgt, mem)
        # z = [0, 0, 0, 100]: softmax ~ one-hot, logsumexp ~ 100
        self.assertAlmostEqual(float(aux["moe_load_balance_loss"]), 2 * 4.0, places=5)
        self.assertAlmostEqual(float(aux["moe_router_z_loss"]) / (2 * 100.0 ** 2), 1.0, places=6)
        self.assertEqual(aux["moe_usage_counts"].tolist(), [0, 0, 0, 6])
        self.assertEqual(aux["moe_usage_fraction"].tolist(), [0, 0, 0, 1.0])

    def test_layer_aux_sums_and_gradients(self):
        m = decoder(7, **SMALL)
        tgt, mem = data(7, 2, 5, 9, 64)
        out, aux = m(tgt, mem)
        per = [layer.moe.last_aux for layer in m.layers]
        self.assertAlmostEqual(float(aux["moe_load_balance_loss"]),
                               sum(float(a["moe_load_balance_loss"]) for a in per), places=6)
        for i, layer in enumerate(m.layers):
            st = m.last_layer_stats[i]
            self.assertAlmostEqual(float(per[i]["moe_load_balance_loss"]),
                                   1e-2 * float(st["load_balance"]), places=7)
            self.assertAlmostEqual(float(per[i]["moe_router_z_loss"]),
                                   1e-3 * float(st["z_loss"]), places=7)
        (out.sum() + aux["moe_aux_loss"]).backward()     # the losses train the routers
        self.assertGreater(float(m.layers[0].moe.router.weight.grad.abs().sum()), 0)
        m.return_aux = False
        with torch.no_grad():
            self.assertEqual(tuple(m(tgt, mem).shape), (2, 5, 64))
        self.assertIn("moe_aux_loss", m.last_aux)


class Graph(Case):
    def test_navsim_reference(self):
        m = decoder(11)
        g = self.check_graph(m, [data(201, 1), data(202, 2)])
        ops = {}
        for n in g.nodes:
            ops[n.op] = ops.get(n.op, 0) + 1
        # one linear for every layer's memory K and V; per layer 4 linears (in_proj, out_proj,
        # q, out_proj), 2 attention, 3 layernorm, router, experts; statistics: one add_n over
        # the layers each (coefficients as its scale), the aux add
        self.assertEqual(ops, {"linear": 13, "attention": 6, "layernorm": 9, "moe_router": 3,
                               "moe_experts": 3, "add": 1, "add_n": 4})
        t = g.tensor("tgt")
        self.assertEqual(t.sym[0], "batch")
        self.assertEqual(g.metadata["model_name"], "MoETransformerDecoder")
        self.assertEqual(g.metadata["decoder.experts"], "4")
        # the memory K/V projections of every layer come first, as one linear whose column
        # windows the cross-attentions read
        self.assertEqual(g.nodes[0].name, "memory_kv_proj")
        cross = [n for n in g.nodes if n.name.endswith("multihead_attn.attention")]
        self.assertEqual([(n.attrs["k_col"], n.attrs["v_col"]) for n in cross],
                         [(0, 256), (512, 768), (1024, 1280)])

    def test_gelu_temperature_k3_layer_stats(self):
        cfg = tf.MoEConfig(num_experts=6, top_k=3, activation="gelu", router_temperature=0.7,
                           load_balance_coef=0.02, router_z_loss_coef=0.005)
        m = decoder(12, cfg, **SMALL)
        self.check_graph(m, [data(203, 3, 5, 9, 64), data(204, 1, 5, 9, 64)], layer_stats=True)

    def test_more_layers_than_one_add_n(self):
        """17 layers: add_n sums at most 8 tensors, so the statistics go through partial sums."""
        m = decoder(14, d_model=16, nhead=2, dim_feedforward=8, num_layers=17)
        g = self.check_graph(m, [data(206, 2, 3, 4, 16)])
        parts = [n for n in g.nodes if ".part" in n.name]
        self.assertEqual(len(parts), 4 * 2)    # 17 = 8 + 8 + 1 for each of the four sums

    def test_single_layer_top1(self):
        m = decoder(13, tf.MoEConfig(num_experts=4, top_k=1), d_model=64, nhead=2,
                    dim_feedforward=32, num_layers=1)
        g = self.check_graph(m, [data(205, 2, 1, 3, 64)], layer_stats=True)
        # one layer: no sums over layers, no 1/L; the coefficients and the aux add remain
        self.assertEqual(sorted(n.name for n in g.nodes if n.name.startswith("stats.")),
                         ["stats.moe_aux_loss", "stats.moe_load_balance_loss",
                          "stats.moe_router_z_loss"])

    def test_fp16(self):
        m = decoder(14)
        g = self.check_graph(m, [data(206, 2)], fp16=True,
                             want_model=tf.round_weights_f16(decoder(14)))
        dt = {t.name: t.dtype for t in g.tensors if t.role == "constant"}
        self.assertEqual(dt["layers.0.self_attn.in_proj_weight"], "f16")
        self.assertEqual(dt["layers.2.moe.experts.w2"], "f16")
        self.assertEqual(dt["layers.0.moe.router.weight"], "f32")
        self.assertEqual(dt["layers.1.norm3.weight"], "f32")

    def test_plain_transformer_decoder(self):
        """nn.TransformerDecoder through vkg.export and export_transfuser_decoder: navsim's
        (relu, post-norm) and a gelu pre-norm stack with a final norm."""
        for seed, kw in ((15, dict()), (16, dict(activation="gelu", norm_first=True,
                                                  final_norm=True, num_layers=2))):
            dense = tf.init_random(tf.dense_decoder(**kw), seed).eval()
            tgt, mem = data(seed, 2)
            with torch.no_grad():
                want = dense(tgt, mem).numpy()
            for g in (read_graph(vkg.export(dense, (tgt, mem)).to_bytes()),
                      read_graph(tf.export_transfuser_decoder(dense).to_bytes())):
                self.assertEqual(g.input_names, ["tgt", "memory"])
                self.assertEqual(g.output_names, ["output"])
                got = reference.run(g, {"tgt": tgt.numpy(), "memory": mem.numpy()})
                self.assertClose(got["output"], want, "dense %s" % kw)

    def test_vkg_export_nested_and_return_aux(self):
        class Model(nn.Module):
            def __init__(self, dec):
                super().__init__()
                self.proj = nn.Linear(64, 64)
                self.decoder = dec

            def forward(self, query, keyval):
                return self.decoder(self.proj(query), keyval)

        m = decoder(17, **SMALL)
        tgt, mem = data(207, 2, 5, 9, 64)
        with self.assertRaisesRegex(vkg.ExportError, "return_aux"):
            vkg.export(m, (tgt, mem))
        m.return_aux = False
        model = Model(m).eval()
        g = read_graph(vkg.export(model, (tgt, mem)).to_bytes())
        self.assertEqual(g.output_names, ["output"] + ["decoder." + a for a in AUX])
        self.tie_free(m, model.proj(tgt).detach(), mem)
        with torch.no_grad():
            want = model(tgt, mem)
        got = reference.run(g, {"query": tgt.numpy(), "keyval": mem.numpy()})
        self.assertClose(got["output"], want.numpy(), "nested output")
        self.assertAux({a: got["decoder." + a] for a in AUX}, m.last_aux, "nested")
        # a plain layer inside a traced model, too
        layer = tf.init_random(tf.dense_decoder(64, 4, 96, 1), 18).layers[0].eval()
        model = Model(layer).eval()
        g = read_graph(vkg.export(model, (tgt, mem)).to_bytes())
        with torch.no_grad():
            want = model(tgt, mem)
        got = reference.run(g, {"query": tgt.numpy(), "keyval": mem.numpy()})
        self.assertClose(got["output"], want.numpy(), "nested plain layer")

    def test_refusals(self):
        seq_first = nn.TransformerDecoder(nn.TransformerDecoderLayer(64, 4, 96, 0.0), 1).eval()
        with self.assertRaisesRegex(vkg.ExportError, "batch_first"):
            tf.export_transfuser_decoder(seq_first, 3, 5)
        tanh = tf.dense_decoder(64, 4, 96, 1)
        tanh.layers[0].activation = torch.tanh
        with self.assertRaisesRegex(vkg.ExportError, "activation"):
            tf.export_transfuser_decoder(tanh, 3, 5)
        with self.assertRaisesRegex(vkg.ExportError, "MoETransformerDecoder"):
            tf.export_transfuser_decoder(nn.Linear(4, 4))
        with self.assertRaisesRegex(vkg.ExportError, "D=32"):
            b = vkg.Builder()
            tf.convert_decoder(b, tf.dense_decoder(64, 4, 96, 1), b.input("t", [1, 3, 32]),
                               b.input("m", [1, 5, 64]))


class Checkpoints(Case):
    def test_load_prefixed_pt_and_safetensors(self):
        from vkg.safetensors import save_safetensors
        cfg = tf.MoEConfig(activation="gelu", router_temperature=0.5)
        m = decoder(21, cfg, **SMALL)
        tgt, mem = data(208, 1, 5, 9, 64)
        with torch.no_grad():
            want, _ = m(tgt, mem)
        with tempfile.TemporaryDirectory() as d:
            pt = os.path.join(d, "model.pt")
            sd = {"_tf_decoder." + k: v for k, v in m.state_dict().items()}
            sd["_trajectory_head.mlp.0.weight"] = torch.zeros(3, 3)     # dropped
            torch.save({"state_dict": sd}, pt)
            st = os.path.join(d, "model.safetensors")
            save_safetensors({k: v.numpy() for k, v in m.state_dict().items()}, st)
            for path in (pt, st):
                got = tf.build_model(path, heads=4, activation="gelu", temperature=0.5)
                self.assertIsInstance(got, tf.MoETransformerDecoder)
                self.assertEqual((got.d_model, got.dim_feedforward, got.num_layers), (64, 96, 2))
                with torch.no_grad():
                    out, _ = got(tgt, mem)
                self.assertTrue(torch.equal(out, want), path)
            with self.assertRaisesRegex(tf.CheckpointError, "--layers 3: the checkpoint has 2"):
                tf.build_model(pt, heads=4, layers=3)
            with self.assertRaisesRegex(tf.CheckpointError, "MoE"):
                tf.build_model(pt, heads=4, dense=True)
            two = dict(sd)
            two.update({"other." + k: v for k, v in m.state_dict().items()})
            torch.save(two, pt)
            with self.assertRaisesRegex(tf.CheckpointError, "several decoders"):
                tf.build_model(pt, heads=4)
            self.assertEqual(tf.build_model(pt, heads=4, prefix="other.").num_layers, 2)
            del sd["_tf_decoder.layers.1.moe.router.bias"]
            torch.save(sd, pt)
            with self.assertRaisesRegex(tf.CheckpointError, "missing layers.1.moe.router.bias"):
                tf.build_model(pt, heads=4)
            dense = tf.dense_decoder(64, 4, 96, 2)
            torch.save(dense.state_dict(), pt)
            got = tf.build_model(pt, heads=4)
            self.assertIsInstance(got, nn.TransformerDecoder)
            torch.save({"x": torch.zeros(1)}, pt)
            with self.assertRaisesRegex(tf.CheckpointError, "no decoder"):
                tf.build_model(pt)

    def test_cli(self):
        env = dict(os.environ, PYTHONPATH=TOOLS + os.pathsep + os.environ.get("PYTHONPATH", ""))

        def cli(*args):
            return subprocess.run([sys.executable, "-m", "vkg", "transfuser-decoder"] + list(args),
                                  env=env, capture_output=True, text=True, timeout=300)

        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "dec.vkg")
            r = cli("--random", "3", "--d-model", "64", "--heads", "4", "--ffn", "96",
                    "--layers", "2", "--experts", "4", "--top-k", "2", "--activation", "gelu",
                    "--temperature", "0.8", "--load-balance-coef", "0.05", "--z-loss-coef",
                    "0.002", "--queries", "5", "--memory", "9", "-o", out)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn("MoETransformerDecoder", r.stdout)
            m = tf.build_model(seed=3, d_model=64, heads=4, ffn=96, layers=2, experts=4,
                               top_k=2, activation="gelu", temperature=0.8,
                               load_balance_coef=0.05, z_loss_coef=0.002)
            tgt, mem = data(209, 2, 5, 9, 64)
            self.tie_free(m, tgt, mem)
            with torch.no_grad():
                want, aux = m(tgt, mem)
            got = reference.run(out, {"tgt": tgt.numpy(), "memory": mem.numpy()})
            self.assertClose(got["output"], want.numpy(), "cli output")
            self.assertAux(got, aux, "cli")
            # a checkpoint: sizes from the file
            pt = os.path.join(d, "m.pth")
            torch.save(m.state_dict(), pt)
            r = cli(pt, "--heads", "4", "--activation", "gelu", "--temperature", "0.8",
                    "--load-balance-coef", "0.05", "--z-loss-coef", "0.002", "--queries", "5",
                    "--memory", "9", "--fp16", "-o", out)
            self.assertEqual(r.returncode, 0, r.stderr)
            g = read_graph(out)
            self.assertEqual(g.tensor("layers.1.moe.experts.w1").dtype, "f16")
            self.assertEqual(g.metadata["decoder.ffn"], "96")
            r = cli(pt, "--random", "1", "-o", out)
            self.assertEqual(r.returncode, 2)
            r = cli(pt, "--d-model", "128", "-o", out)
            self.assertEqual(r.returncode, 1)
            self.assertIn("--d-model 128: the checkpoint has 64", r.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
