"""Mixture-of-Experts: vkg.moe's PyTorch modules -> vkg.export -> read_graph -> vkg.reference,
compared with the modules; the MoE ops and linear's LoRA inputs in the Builder and the reference
interpreter; upcycling; error cases.

Tolerances: fp32 weights |ref - torch| <= 1e-5 + 1e-5 |torch| per element (vkg.reference computes
in float64, PyTorch in float32); f16 weights max |ref - torch| <= 2e-2 * RMS(torch) for the FFN
output (the router stays f32, so ids and statistics keep the fp32 tolerance). Ids and counts must
match exactly; random cases check first that no top-k decision is within 1e-6 of a tie.

Run: cd tests/python && PYTHONPATH=../../tools/python /usr/bin/python3 -m unittest test_moe -v
"""

import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools",
                                "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vkg  # noqa: E402
from vkg import moe, reference  # noqa: E402
from vkg.builder import Builder, stack_lora  # noqa: E402
from vkg.format import read_graph  # noqa: E402

RTOL = ATOL = 1e-5
F16_REL = 2e-2
STATS = moe.STAT_NAMES


def rms(a):
    return float(np.sqrt(np.mean(np.square(np.asarray(a, dtype=np.float64)))))


def graph_of(module, example, **kw):
    return read_graph(vkg.export(module, (example,), None, **kw).to_bytes())


def logits_of(m, x):
    """(z float64 (T, C), first, k) of a vkg.moe module's router for input x."""
    with torch.no_grad():
        f = x.reshape(-1, x.shape[-1]).double()
        if isinstance(m, moe.TopKRouter):
            z = F.linear(f, m.weight.double(), None if m.bias is None else m.bias.double())
            return z / m.temperature, m.first, m.k
        r = m.router
        z = F.linear(f, r.weight.double(), None if r.bias is None else r.bias.double())
        if isinstance(m, moe.MoEFFN):
            return z / m.temperature, 0, m.top_k
        if isinstance(m, moe.DeepSeekMoEFFN):
            return z, m.first, m.top_m
        return z, 0, m.top_k


def routing_margin(m, x):
    z, first, k = logits_of(m, x)
    z = z[:, first:]
    if k >= z.shape[1]:
        return float("inf")
    s = torch.sort(z, dim=-1, descending=True).values
    return float((s[:, k - 1] - s[:, k]).min())


def rand_lora(m, seed=0, std=0.2):
    return moe.randomize_lora(m, std=std, generator=torch.Generator().manual_seed(seed))


class MoECase(unittest.TestCase):
    def assertClose(self, got, want, what, fp16=False):
        got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
        self.assertEqual(got.shape, want.shape, what)
        if fp16:
            err = np.abs(got - want).max() if got.size else 0.0
            self.assertLessEqual(err, F16_REL * rms(want), "%s: max err %.3g, RMS %.3g"
                                 % (what, err, rms(want)))
        else:
            np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=what)

    def check(self, m, example, runs, fp16=False, variant=None, ties_ok=False, graph=None):
        """Exports m (stats and routing as outputs), runs every x of runs through the reference
        and compares the output, ids, gates and the five statistics with PyTorch."""
        g = graph or graph_of(m, example, fp16=fp16, moe_stats=True, moe_routing=True,
                              moe_variant=variant)
        self.assertEqual(g.output_names, ["output", "ids", "gates"] + list(STATS))
        self.assertEqual(g.tensor("ids").dtype, "i32")
        for x in runs:
            if not ties_ok:
                self.assertGreater(routing_margin(m, x), 1e-6, "test data too close to a tie")
            with torch.no_grad():
                want = m(x)
            got = reference.run(g, [x.numpy()])
            what = "%s %s%s" % (type(m).__name__, list(x.shape), " fp16" if fp16 else "")
            self.assertClose(got["output"], want.numpy(), what + " output", fp16)
            ids, gates = m.last_routing
            self.assertEqual(got["ids"].dtype, np.int32)
            np.testing.assert_array_equal(got["ids"], ids.numpy(), err_msg=what + " ids")
            self.assertClose(got["gates"], gates.numpy(), what + " gates")
            np.testing.assert_array_equal(got["counts"], m.last_stats["counts"].numpy(),
                                          err_msg=what + " counts")
            for s in STATS[1:]:
                self.assertClose(got[s], m.last_stats[s].numpy(), what + " " + s)
        return g


# ---------------------------------------------------------------------------------------------
# routing


class TestRoute(MoECase):
    def test_route_matches_definitions(self):
        torch.manual_seed(0)
        z = torch.randn(11, 6)
        r = moe.route(z, 2)
        top = torch.sort(z, descending=True).indices[:, :2]
        np.testing.assert_array_equal(r.ids.numpy(), top.numpy())
        sel = z.gather(1, top)
        self.assertClose(r.gates.numpy(), torch.softmax(sel, -1).numpy(), "softmax_topk")
        # = renormalized full softmax (model-spec §1.3.1)
        p = torch.softmax(z, -1).gather(1, top)
        self.assertClose(r.gates.numpy(), (p / p.sum(-1, keepdim=True)).numpy(), "renorm")
        self.assertEqual(float(r.stats["counts"].sum()), 22.0)
        self.assertClose(r.stats["fraction"].sum().item(), 1.0, "fraction sum")
        ms = torch.softmax(z, -1).mean(0)
        self.assertClose(r.stats["load_balance"].numpy(), [6 * float((ms ** 2).sum())], "lb")
        self.assertClose(r.stats["z_loss"].numpy(),
                         [float((torch.logsumexp(z, -1) ** 2).mean())], "z")

    def test_k_equals_e_renorm_is_full_softmax(self):
        z = torch.randn(5, 4)
        r = moe.route(z, 4, gates="score", renorm=True)
        full = torch.softmax(z, -1)
        self.assertClose(r.gates.numpy(), full.gather(1, r.ids).numpy(), "k=E")

    def test_ties_go_to_lower_index(self):
        z = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
        np.testing.assert_array_equal(moe.route(z, 3).ids.numpy(), [[1, 2, 4], [0, 1, 2]])
        np.testing.assert_array_equal(moe.route(z, 2, first=2).ids.numpy(), [[0, 2], [0, 1]])


class TestRouterExport(MoECase):
    def router(self, seed, **kw):
        torch.manual_seed(seed)
        return moe.TopKRouter(16, kw.pop("columns", 6), kw.pop("k", 2), **kw).eval()

    def test_random_ragged_and_single_token(self):
        m = self.router(1)
        g = graph_of(m, torch.randn(2, 7, 16), moe_stats=True)
        self.assertEqual(g.output_names, ["output0", "output1"] + list(STATS))
        self.assertEqual([n.op for n in g.nodes], ["moe_router"])
        self.assertEqual(g.nodes[0].attrs, {"k": 2})
        for shape in ((2, 7, 16), (3, 7, 16), (1, 7, 16)):
            x = torch.randn(*shape)
            self.assertGreater(routing_margin(m, x), 1e-6)
            with torch.no_grad():
                ids, gates = m(x)
            got = reference.run(g, [x.numpy()])
            np.testing.assert_array_equal(got["output0"], ids.numpy())
            self.assertClose(got["output1"], gates.numpy(), "gates")
            for s in STATS:
                self.assertClose(got[s], m.last_stats[s].numpy(), s)
        g1 = graph_of(m, torch.randn(1, 16), moe_stats=True)           # T = 1 and T = 13
        for t in (1, 13):
            x = torch.randn(t, 16)
            with torch.no_grad():
                ids, gates = m(x)
            got = reference.run(g1, [x.numpy()])
            np.testing.assert_array_equal(got["output0"], ids.numpy())
            for s in STATS:
                self.assertClose(got[s], m.last_stats[s].numpy(), "T=%d %s" % (t, s))

    def test_variants(self):
        cases = [dict(k=1), dict(k=6), dict(k=3, temperature=0.7),
                 dict(columns=8, k=3, first=2, score="sigmoid", gates="score", renorm=True,
                      scale=2.5, bias=False),
                 dict(columns=8, k=4, first=4, gates="score", scale=16.0),
                 dict(columns=5, k=2, score="sigmoid", gates="softmax_topk")]
        for i, kw in enumerate(cases):
            m = self.router(10 + i, **dict(kw))
            g = graph_of(m, torch.randn(3, 16), moe_stats=True)
            attrs = g.nodes[0].attrs
            for key in ("first", "score", "gates", "temperature", "scale"):
                if key in kw and kw[key] not in (0, 1.0, "softmax", "softmax_topk"):
                    self.assertEqual(attrs[key], kw[key], key)
            for t in (1, 9):
                x = torch.randn(t, 16)
                self.assertGreater(routing_margin(m, x), 1e-6)
                with torch.no_grad():
                    ids, gates = m(x)
                got = reference.run(g, [x.numpy()])
                np.testing.assert_array_equal(got["output0"], ids.numpy(), str(kw))
                self.assertClose(got["output1"], gates.numpy(), "gates %s" % kw)
                for s in STATS:
                    self.assertClose(got[s], m.last_stats[s].numpy(), "%s %s" % (s, kw))
                c = kw.get("columns", 6) - kw.get("first", 0)
                self.assertEqual(got["counts"].shape, (c,))
                self.assertEqual(got["mean_score"].shape, (kw.get("columns", 6),))

    def test_ties_zero_weights(self):
        m = self.router(3, columns=7, k=3)
        with torch.no_grad():
            m.weight.zero_()
            m.bias.zero_()
        g = graph_of(m, torch.randn(4, 16), moe_stats=True)
        x = torch.randn(5, 16)
        with torch.no_grad():
            ids, gates = m(x)
        got = reference.run(g, [x.numpy()])
        np.testing.assert_array_equal(ids.numpy(), np.tile([0, 1, 2], (5, 1)))
        np.testing.assert_array_equal(got["output0"], ids.numpy())
        self.assertClose(got["output1"], np.full((5, 3), 1 / 3), "gates")
        np.testing.assert_array_equal(got["counts"], [5, 5, 5, 0, 0, 0, 0])
        self.assertClose(got["load_balance"], [1.0], "uniform scores: load_balance 1")
        self.assertClose(got["z_loss"], [np.log(7) ** 2], "z_loss")

    def test_float32_mode_matches(self):
        m = self.router(4, columns=6, k=2, temperature=2.0)
        g = graph_of(m, torch.randn(4, 16), moe_stats=True)
        x = torch.randn(9, 16)
        with torch.no_grad():
            ids, _ = m(x)
        got = reference.run(g, [x.numpy()], compute_dtype=np.float32)
        np.testing.assert_array_equal(got["output0"], ids.numpy())
        self.assertEqual(got["output1"].dtype, np.float32)


# ---------------------------------------------------------------------------------------------
# the three FFNs


class TestMoEFFN(MoECase):
    def make(self, seed, **kw):
        torch.manual_seed(seed)
        return moe.MoEFFN(16, 32, **kw).eval()

    def test_random_relu_gelu_temperature(self):
        for i, kw in enumerate([dict(), dict(activation="gelu"), dict(temperature=0.5),
                                dict(experts=6, top_k=3, activation="gelu", temperature=2.0)]):
            m = self.make(i, **kw)
            g = self.check(m, torch.randn(2, 7, 16), [torch.randn(2, 7, 16),
                                                      torch.randn(3, 7, 16)])
            self.assertEqual([n.op for n in g.topo_order()], ["moe_router", "moe_experts"])
            ex = [n for n in g.nodes if n.op == "moe_experts"][0]
            self.assertEqual(ex.attrs["activation"], 2 if kw.get("activation") == "gelu" else 1)
            self.assertEqual([g.tensors[t].name for t in ex.inputs],
                             ["x", "ids", "gates", "experts.w1", "experts.b1",
                              "experts.w2", "experts.b2"])

    def test_k1_kE_single_token(self):
        for k in (1, 4):
            m = self.make(10 + k, top_k=k)
            self.check(m, torch.randn(1, 16), [torch.randn(1, 16), torch.randn(13, 16)])

    def test_skewed(self):
        m = self.make(20)
        with torch.no_grad():
            m.router.bias.copy_(torch.tensor([0.0, 1000.0, 0.0, 990.0]))
        g = self.check(m, torch.randn(2, 5, 16), [torch.randn(3, 5, 16)])
        got = reference.run(g, [torch.randn(3, 5, 16).numpy()])
        np.testing.assert_array_equal(got["counts"], [0, 15, 0, 15])
        np.testing.assert_array_equal(got["ids"][..., 0], 1)

    def test_ties(self):
        m = self.make(21, experts=5, top_k=2)
        with torch.no_grad():
            m.router.weight.zero_()
            m.router.bias.zero_()
        g = self.check(m, torch.randn(3, 16), [torch.randn(4, 16)], ties_ok=True)
        got = reference.run(g, [torch.randn(4, 16).numpy()])
        np.testing.assert_array_equal(got["ids"], np.tile([0, 1], (4, 1)))

    def test_fp16(self):
        m = self.make(22, activation="gelu")
        g = self.check(m, torch.randn(2, 7, 16), [torch.randn(3, 7, 16)], fp16=True)
        self.assertEqual(g.tensor("experts.w1").dtype, "f16")
        self.assertEqual(g.tensor("experts.b1").dtype, "f32")
        self.assertEqual(g.tensor("router.weight").dtype, "f32")


class TestDeepSeekMoEFFN(MoECase):
    def make(self, seed, **kw):
        torch.manual_seed(seed)
        args = dict(experts=12, width=6, shared=2, top_m=3)
        args.update(kw)
        return moe.DeepSeekMoEFFN(16, **args).eval()

    def test_variants(self):
        cases = [dict(), dict(act="swiglu"), dict(router_cols="routed"),
                 dict(score="sigmoid", renorm=True, scale=2.5),
                 dict(act="swiglu", router_cols="routed", score="sigmoid", renorm=True),
                 dict(shared=0), dict(shared=0, act="swiglu", top_m=1),
                 dict(top_m=10, renorm=True)]
        for i, kw in enumerate(cases):
            m = self.make(30 + i, **kw)
            g = self.check(m, torch.randn(2, 5, 16), [torch.randn(2, 5, 16),
                                                      torch.randn(3, 5, 16)])
            ops = [n.op for n in g.topo_order()]
            sw = kw.get("act") == "swiglu"
            shared = [] if kw.get("shared") == 0 else (["linear", "swiglu", "linear"] if sw
                                                       else ["linear", "linear"])
            self.assertEqual(sorted(ops), sorted(["moe_router", "moe_experts"] + shared), kw)
            router = [n for n in g.nodes if n.op == "moe_router"][0]
            self.assertEqual(router.attrs["gates"], "score")
            self.assertEqual(router.attrs.get("first", 0),
                             2 if kw.get("router_cols", "all") == "all" and kw.get("shared") != 0
                             else 0)
            self.assertEqual(len(router.inputs), 2)           # no router bias
            ex = [n for n in g.nodes if n.op == "moe_experts"][0]
            self.assertEqual(ex.attrs["activation"], 3 if sw else 2)
            names = [None if t is None else g.tensors[t].name for t in ex.inputs]
            self.assertEqual(names[:3], ["x", "ids", "gates"])
            names += [None] * (9 - len(names))
            self.assertEqual(names[3:6], ["experts.w1", None if sw else "experts.b1",
                                          "experts.w2"])
            self.assertEqual(names[6], None)                  # routed experts: no fc2 bias
            if sw:
                self.assertEqual(names[7], "experts.w3")
            if shared:
                self.assertEqual(names[8], "shared.fc2")      # residual = the shared MLP

    def test_single_token_and_k_all(self):
        m = self.make(40, top_m=10)
        self.check(m, torch.randn(1, 16), [torch.randn(1, 16), torch.randn(7, 16)])

    def test_skewed(self):
        m = self.make(41, shared=2, top_m=2, experts=8)
        with torch.no_grad():
            m.router.weight.copy_(torch.linspace(-1, 1, 8)[:, None].repeat(1, 16))
        runs = [torch.rand(3, 4, 16) + 0.5]                  # positive: the same order for all
        g = self.check(m, torch.rand(2, 4, 16) + 0.5, runs)
        got = reference.run(g, [runs[0].numpy()])
        np.testing.assert_array_equal(got["counts"], [0, 0, 0, 0, 12, 12])
        np.testing.assert_array_equal(got["ids"], np.tile([5, 4], (3, 4, 1)))

    def test_ties(self):
        m = self.make(42)
        with torch.no_grad():
            m.router.weight.zero_()
        g = self.check(m, torch.randn(3, 16), [torch.randn(5, 16)], ties_ok=True)
        got = reference.run(g, [torch.randn(5, 16).numpy()])
        np.testing.assert_array_equal(got["ids"], np.tile([0, 1, 2], (5, 1)))
        self.assertClose(got["gates"], np.full((5, 3), 1 / 12), "uniform softmax over 12")

    def test_fp16(self):
        for act in ("gelu", "swiglu"):
            m = self.make(43, act=act)
            g = self.check(m, torch.randn(2, 5, 16), [torch.randn(3, 5, 16)], fp16=True)
            self.assertEqual(g.tensor("experts.w2").dtype, "f16")
            self.assertEqual(g.tensor("router.weight").dtype, "f32")

    def test_all_shared(self):
        m = self.make(44, experts=4, shared=4)
        self.assertIsNone(m.router)
        x = torch.randn(3, 16)
        g = graph_of(m, x)
        self.assertEqual(sorted(n.op for n in g.nodes), ["linear", "linear"])
        with torch.no_grad():
            self.assertClose(reference.run(g, [x.numpy()])["output"], m(x).numpy(), "S=E")


class TestMoELoRAFFN(MoECase):
    def make(self, seed, lora=True, **kw):
        torch.manual_seed(seed)
        args = dict(experts=6, top_k=2, rank=3, alpha=6)
        args.update(kw)
        m = moe.MoELoRAFFN(16, 32, **args).eval()
        return rand_lora(m, seed) if lora else m

    def test_names(self):
        m = self.make(0, experts=2, rank=4)
        self.assertEqual(sorted(k for k, v in m.state_dict().items()), sorted([
            "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "router.weight", "router.bias"]
            + ["experts.%d.fc%d.lora_%s.weight" % (e, i, ab) for e in range(2) for i in (1, 2)
               for ab in "AB"]))
        self.assertEqual(tuple(m.experts[1].fc1.lora_A.weight.shape), (4, 16))
        self.assertEqual(tuple(m.experts[1].fc1.lora_B.weight.shape), (32, 4))
        self.assertEqual(tuple(m.experts[1].fc2.lora_A.weight.shape), (4, 32))
        self.assertEqual(tuple(m.experts[1].fc2.lora_B.weight.shape), (16, 4))
        self.assertFalse(m.fc1.weight.requires_grad)
        self.assertTrue(m.experts[0].fc1.lora_A.weight.requires_grad)
        self.assertEqual(m.lora_scale, 1.5)       # alpha / rank = 6 / 4

    def test_shared_base_graph(self):
        m = self.make(1)
        g = self.check(m, torch.randn(2, 7, 16), [torch.randn(2, 7, 16), torch.randn(3, 7, 16)])
        order = [(n.op, n.name) for n in g.topo_order()]
        self.assertEqual(sorted(order), sorted([
            ("moe_router", "router"), ("linear", "fc1"), ("linear", "experts.fc1.lora_A"),
            ("moe_lora_mix", "lora_mix"), ("linear", "fc2")]))
        mix = [n for n in g.nodes if n.op == "moe_lora_mix"][0]
        self.assertEqual([None if t is None else g.tensors[t].name for t in mix.inputs],
                         ["fc1", "experts.fc1.lora_A", "ids", "gates",
                          "experts.fc1.lora_B.weight", "experts.fc2.lora_A.weight",
                          "experts.fc2.lora_B.weight", "fc2.bias"])
        self.assertEqual(mix.attrs, {"lora_scale": 2.0, "activation": 2})
        self.assertEqual(g.tensor("experts.fc1.lora_A.weight").dims, [18, 16])
        self.assertEqual(g.tensor("experts.fc1.lora_B.weight").dims, [6, 32, 3])
        self.assertEqual(g.tensor("experts.fc2.lora_A.weight").dims, [6, 3, 32])
        self.assertEqual(g.tensor("experts.fc2.lora_B.weight").dims, [6, 16, 3])
        fc2 = [n for n in g.nodes if n.name == "fc2"][0]
        self.assertEqual([None if t is None else g.tensors[t].name for t in fc2.inputs],
                         ["lora_mix.hbar", "fc2.weight", None, None, "lora_mix.c"])

    def test_naive_graph_and_equals_shared_base(self):
        m = self.make(2)
        gn = self.check(m, torch.randn(2, 7, 16), [torch.randn(3, 7, 16)], variant="naive")
        self.assertEqual(sorted(n.op for n in gn.nodes), ["moe_experts", "moe_router"])
        self.assertEqual(gn.tensor("experts.w1").dims, [6, 32, 16])
        gs = graph_of(m, torch.randn(2, 7, 16), moe_stats=True, moe_routing=True)
        for t in (1, 3):
            x = torch.randn(t, 7, 16).numpy()
            a, b = reference.run(gs, [x]), reference.run(gn, [x])
            # equal up to the f32 rounding of the stored weights (merged vs separate)
            np.testing.assert_allclose(a["output"], b["output"], rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(a["ids"], b["ids"])
        # the module attribute selects the variant too
        m.vkg_variant = "naive"
        self.assertIn("moe_experts", [n.op for n in graph_of(m, torch.randn(2, 16)).nodes])
        m.vkg_variant = None
        with self.assertRaises(vkg.ExportError):
            m.vkg_variant = "fused"
            graph_of(m, torch.randn(2, 16))
        m.vkg_variant = None

    def test_k1_kE_T1_relu_no_router_bias(self):
        for i, kw in enumerate([dict(top_k=1), dict(top_k=6), dict(act="relu", top_k=3),
                                dict(router_bias=False, rank=1, alpha=3)]):
            m = self.make(10 + i, **kw)
            for variant in ("shared_base", "naive"):
                self.check(m, torch.randn(1, 16), [torch.randn(1, 16), torch.randn(11, 16)],
                           variant=variant)

    def test_skewed(self):
        m = self.make(20)
        with torch.no_grad():
            m.router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 990.0, 0.0, 1000.0]))
        for variant in ("shared_base", "naive"):
            g = self.check(m, torch.randn(2, 5, 16), [torch.randn(3, 5, 16)], variant=variant)
            got = reference.run(g, [torch.randn(4, 5, 16).numpy()])
            np.testing.assert_array_equal(got["counts"], [0, 0, 0, 20, 0, 20])
            np.testing.assert_array_equal(got["ids"], np.tile([5, 3], (4, 5, 1)))

    def test_ties(self):
        m = self.make(21)
        with torch.no_grad():
            m.router.weight.zero_()
            m.router.bias.zero_()
        g = self.check(m, torch.randn(3, 16), [torch.randn(4, 16)], ties_ok=True)
        np.testing.assert_array_equal(reference.run(g, [np.ones((2, 16))])["ids"],
                                      [[0, 1], [0, 1]])

    def test_fp16(self):
        m = self.make(22)
        for variant in ("shared_base", "naive"):
            g = self.check(m, torch.randn(2, 7, 16), [torch.randn(3, 7, 16)], fp16=True,
                           variant=variant)
            w = "experts.fc1.lora_B.weight" if variant == "shared_base" else "experts.w1"
            self.assertEqual(g.tensor(w).dtype, "f16")
            self.assertEqual(g.tensor("router.weight").dtype, "f32")

    def test_lora_b_zero_is_the_dense_ffn(self):
        m = self.make(23, lora=False)             # PEFT init: every lora_B is zero
        x = torch.randn(3, 7, 16)
        with torch.no_grad():
            dense = m.dense(x).numpy()
            self.assertClose(m(x).numpy(), dense, "module")
        for variant in ("shared_base", "naive"):
            g = graph_of(m, torch.randn(2, 7, 16), moe_variant=variant)
            self.assertClose(reference.run(g, [x.numpy()])["output"], dense, variant)

    def test_frozen_copies_collapse(self):
        src = self.make(30)
        sd = src.state_dict()
        naive = dict((k, v.clone()) for k, v in sd.items()
                     if not k.startswith(("fc1.", "fc2.")))
        for e in range(6):
            for proj in ("fc1", "fc2"):
                for kind in ("weight", "bias"):
                    key = "experts.%d.%s.%s%s" % (e, proj, "base_layer." if e % 2 else "", kind)
                    naive[key] = sd["%s.%s" % (proj, kind)].clone()
        m = self.make(31)
        m.load_state_dict(naive)
        x = torch.randn(5, 16)
        with torch.no_grad():
            self.assertClose(m(x).numpy(), src(x).numpy(), "collapsed")
        # nested in a model, through the public helper and through load_state_dict
        block = nn.Sequential(nn.Identity(), self.make(32))
        block.load_state_dict({"1." + k: v for k, v in naive.items()})
        self.assertTrue(torch.equal(block[1].fc2.weight, src.fc2.weight))
        both = dict(naive, **{"fc1.weight": sd["fc1.weight"], "fc1.bias": sd["fc1.bias"]})
        out = moe.collapse_expert_copies(dict(("blocks.3.mlp." + k, v)
                                              for k, v in both.items()))
        self.assertNotIn("blocks.3.mlp.experts.0.fc1.weight", out)
        self.assertIn("blocks.3.mlp.fc2.weight", out)

    def test_frozen_copies_that_differ(self):
        sd = self.make(33).state_dict()
        bad = {"blocks.3.mlp." + k: v for k, v in sd.items()}
        for e in range(6):
            bad["blocks.3.mlp.experts.%d.fc1.weight" % e] = sd["fc1.weight"].clone()
        bad["blocks.3.mlp.experts.4.fc1.weight"][0, 0] += 0.01
        with self.assertRaises(moe.MoECheckpointError) as cm:
            moe.collapse_expert_copies(dict(bad))
        msg = str(cm.exception)
        self.assertIn("blocks.3.mlp", msg)
        self.assertIn("expert 4", msg)
        m = self.make(34)
        with self.assertRaises(moe.MoECheckpointError):
            m.load_state_dict({k[len("blocks.3.mlp."):]: v for k, v in bad.items()})

    def test_moe_ffn_checkpoint_is_left_alone(self):
        sd = moe.MoEFFN(8, 16).state_dict()
        self.assertEqual(set(moe.collapse_expert_copies(dict(sd))), set(sd))


class Block(nn.Module):
    """Pre-LN residual block around a MoE FFN (the way S1/S2/S3 use them)."""

    def __init__(self, ffn, dim=16):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = ffn

    def forward(self, x):
        return x + self.mlp(self.norm(x))


class Two(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(50)
        self.blocks = nn.ModuleList([Block(rand_lora(moe.MoELoRAFFN(16, 32, 4, 2, 2, 4), 1)),
                                     Block(moe.DeepSeekMoEFFN(16, 8, 4, 2, 2))])
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class TestExportOptions(MoECase):
    def test_nested_paths_and_stats(self):
        m = Two().eval()
        g = graph_of(m, torch.randn(2, 6, 16), moe_stats=True)
        want = ["output"] + ["blocks.%d.mlp.%s" % (i, s) for i in (0, 1) for s in STATS]
        self.assertEqual(g.output_names, want)
        names = {n.name for n in g.nodes}
        for n in ("blocks.0.mlp.router", "blocks.0.mlp.lora_mix", "blocks.0.mlp.fc2",
                  "blocks.1.mlp.router", "blocks.1.mlp.shared.fc1", "blocks.1.mlp.experts"):
            self.assertIn(n, names)
        self.assertIn("blocks.0.mlp.experts.fc1.lora_B.weight", {t.name for t in g.tensors})
        x = torch.randn(3, 6, 16)
        self.assertGreater(routing_margin(m.blocks[0].mlp, m.blocks[0].norm(x).detach()), 1e-6)
        with torch.no_grad():
            want_y = m(x)
        got = reference.run(g, [x.numpy()])
        self.assertClose(got["output"], want_y.numpy(), "Two")
        for i in (0, 1):
            for s in STATS:
                self.assertClose(got["blocks.%d.mlp.%s" % (i, s)],
                                 m.blocks[i].mlp.last_stats[s].numpy(), s)
        # the module attribute wins over the export option
        m.blocks[1].mlp.vkg_stats = False
        g = graph_of(m, torch.randn(2, 6, 16), moe_stats=True)
        self.assertEqual(g.output_names, want[:6])
        m.blocks[1].mlp.vkg_stats = None
        m.blocks[0].mlp.vkg_routing = True
        g = graph_of(m, torch.randn(2, 6, 16))
        self.assertEqual(g.output_names, ["output", "blocks.0.mlp.ids", "blocks.0.mlp.gates"])
        self.assertEqual(vkg.export_options(), {})

    def test_converter_on_a_hand_built_graph(self):
        torch.manual_seed(51)
        m = moe.MoEFFN(16, 24, 4, 2).eval()
        b = Builder()
        x = b.input("tokens", [5, 16])
        h = b.layernorm(x, eps=1e-5, name="ln")
        y = moe.convert_moe_ffn(b, m, [h], "layers.0.moe", fp16=True, stats=True)
        b.output(y, "y")
        g = read_graph(b.to_bytes())          # writer() flushes the queued statistics
        self.assertEqual(g.output_names, ["y"] + ["layers.0.moe." + s for s in STATS])
        self.assertEqual(g.tensor("layers.0.moe.experts.w1").dtype, "f16")
        xx = torch.randn(5, 16)
        with torch.no_grad():
            want = m(F.layer_norm(xx, (16,)))
        got = reference.run(g, [xx.numpy()])
        self.assertClose(got["y"], want.numpy(), "hand-built", fp16=True)
        np.testing.assert_array_equal(got["layers.0.moe.counts"], m.last_stats["counts"])

    def test_bad_variant_option(self):
        with self.assertRaises(ValueError):
            vkg.export(moe.MoEFFN(4, 8), torch.randn(2, 4), None, moe_variant="fast")

    def test_fp16_plain_linear(self):
        m = nn.Sequential(nn.Linear(8, 4), nn.GELU()).eval()
        g = graph_of(m, torch.randn(2, 8), fp16=True)
        self.assertEqual(g.tensor("0.weight").dtype, "f16")
        self.assertEqual(g.tensor("0.bias").dtype, "f32")
        x = torch.randn(3, 8)
        with torch.no_grad():
            self.assertClose(reference.run(g, [x.numpy()])["output"], m(x).numpy(), "f16",
                             fp16=True)

    def test_cli_moe_demo(self):
        import subprocess
        tools = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools",
                             "python")
        env = dict(os.environ, PYTHONPATH=tools + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "lora.vkg")
            r = subprocess.run([sys.executable, "-m", "vkg", "moe-demo", "lora", "-o", path,
                                "--stats", "--variant", "naive", "--fp16"], env=env,
                               capture_output=True, text=True, timeout=300)
            self.assertEqual(r.returncode, 0, r.stderr)
            g = read_graph(path)
            self.assertEqual(sorted(n.op for n in g.nodes), ["moe_experts", "moe_router"])
            self.assertEqual(g.output_names, ["output"] + list(STATS))
            self.assertEqual(g.tensor("experts.w1").dtype, "f16")
            m, x = moe.demo("lora")
            with torch.no_grad():
                want = m(x).numpy()
            self.assertClose(reference.run(g, [x.numpy()])["output"], want, "cli", fp16=True)

    def test_save_and_cli_demo(self):
        with tempfile.TemporaryDirectory() as d:
            for kind in moe.DEMO_KINDS:
                m, x = moe.demo(kind)
                path = os.path.join(d, kind + ".vkg")
                vkg.export(m, (x,), path, moe_stats=True)
                with torch.no_grad():
                    want = m(x).numpy()
                self.assertClose(reference.run(path, [x.numpy()])["output"], want, kind)


# ---------------------------------------------------------------------------------------------
# upcycling (model-spec §2.4)


def dense_ffn(seed, d=16, h=48, swiglu=False):
    g = torch.Generator().manual_seed(seed)
    t = {"fc1_weight": torch.randn(h, d, generator=g) / 4,
         "fc2_weight": torch.randn(d, h, generator=g) / 6}
    if swiglu:
        t["fc3_weight"] = torch.randn(h, d, generator=g) / 4
        t["fc1_bias"] = t["fc2_bias"] = None
    else:
        t["fc1_bias"] = torch.randn(h, generator=g) / 4
        t["fc2_bias"] = torch.randn(d, generator=g) / 4
    return t


def dense_forward(t, x):
    if t.get("fc3_weight") is not None:
        return F.linear(F.silu(F.linear(x, t["fc1_weight"])) * F.linear(x, t["fc3_weight"]),
                        t["fc2_weight"])
    return F.linear(F.gelu(F.linear(x, t["fc1_weight"], t["fc1_bias"])), t["fc2_weight"],
                    t["fc2_bias"])


def upcycle(t, experts, shared, **kw):
    return moe.upcycle_ffn(t["fc1_weight"], t["fc1_bias"], t["fc2_weight"], t["fc2_bias"],
                           experts, shared, fc3_weight=t.get("fc3_weight"), **kw)


class TestUpcycle(MoECase):
    def all_on(self, m, x):
        n = m.n_routed
        ids = torch.arange(n).repeat(x.shape[0], 1)
        return ids, torch.ones(x.shape[0], n)

    def test_all_on_equals_dense_pytorch(self):
        for swiglu in (False, True):
            for shared, perm in ((2, None), (1, torch.randperm(48, generator=torch.Generator()
                                                               .manual_seed(3))), (0, None)):
                if shared == 0 and not swiglu:
                    continue
                t = dense_ffn(1, swiglu=swiglu)
                m = moe.DeepSeekMoEFFN.upcycled(t["fc1_weight"], t["fc1_bias"], t["fc2_weight"],
                                                t["fc2_bias"], 8, shared, top_m=2,
                                                permutation=perm,
                                                fc3_weight=t.get("fc3_weight")).eval()
                x = torch.randn(9, 16)
                with torch.no_grad():
                    got = m.forward_routed(x, *self.all_on(m, x))
                    self.assertClose(got.numpy(), dense_forward(t, x).numpy(),
                                     "swiglu=%s shared=%d" % (swiglu, shared))
                n_dense = sum(v.numel() for v in t.values() if v is not None)
                n_router = m.router.weight.numel()
                self.assertEqual(sum(p.numel() for p in m.parameters()), n_dense + n_router)

    def test_all_on_equals_dense_reference(self):
        for swiglu in (False, True):
            t = dense_ffn(2, swiglu=swiglu)
            sd = upcycle(t, 8, 2)
            n = 6
            m = moe.DeepSeekMoEFFN(16, 8, 6, 2, 2, act="swiglu" if swiglu else "gelu").eval()
            m.load_state_dict(sd)
            b = Builder()
            x = b.input("x", ["batch", 16])
            ids = b.input("ids", ["batch", n], dtype="i32")
            gates = b.input("gates", ["batch", n])
            c = {k: b.constant(k, v.numpy()) for k, v in sd.items() if k != "router.weight"}
            if swiglu:
                w13 = b.constant("w13", np.concatenate([sd["shared.fc1.weight"].numpy(),
                                                        sd["shared.fc3.weight"].numpy()]))
                s = b.linear(b.swiglu(b.linear(x, w13)), c["shared.fc2.weight"])
                y = b.moe_experts(x, ids, gates, c["experts.w1"], c["experts.w2"],
                                  w3=c["experts.w3"], residual=s, activation="swiglu")
            else:
                s = b.linear(b.linear(x, c["shared.fc1.weight"], c["shared.fc1.bias"],
                                      activation="gelu"),
                             c["shared.fc2.weight"], c["shared.fc2.bias"])
                y = b.moe_experts(x, ids, gates, c["experts.w1"], c["experts.w2"],
                                  c["experts.b1"], residual=s, activation="gelu")
            b.output(y, "y")
            g = read_graph(b.to_bytes())
            self.assertEqual(g.tensor("ids").dtype, "i32")
            xx = torch.randn(5, 16)
            ii, gg = self.all_on(m, xx)
            got = reference.run(g, {"x": xx.numpy(), "ids": ii.numpy().astype(np.int32),
                                    "gates": gg.numpy()})["y"]
            with torch.no_grad():
                self.assertClose(got, dense_forward(t, xx).numpy(), "swiglu=%s" % swiglu)

    def test_all_shared_equals_dense(self):
        t = dense_ffn(3)
        m = moe.DeepSeekMoEFFN.upcycled(t["fc1_weight"], t["fc1_bias"], t["fc2_weight"],
                                        t["fc2_bias"], 4, 4).eval()
        x = torch.randn(2, 3, 16)
        with torch.no_grad():
            want = dense_forward(t, x).numpy()
            self.assertClose(m(x).numpy(), want, "module")
        self.assertClose(reference.run(graph_of(m, x), [x.numpy()])["output"], want, "graph")

    def test_layout(self):
        t = dense_ffn(4)
        perm = torch.randperm(48, generator=torch.Generator().manual_seed(1))
        sd = upcycle(t, 8, 3, permutation=perm)
        self.assertEqual(list(sd), ["router.weight", "shared.fc1.weight", "shared.fc1.bias",
                                    "shared.fc2.weight", "shared.fc2.bias", "experts.w1",
                                    "experts.b1", "experts.w2"])
        self.assertEqual(tuple(sd["router.weight"].shape), (8, 16))
        self.assertEqual(float(sd["router.weight"].abs().sum()), 0.0)
        self.assertTrue(torch.equal(sd["shared.fc2.bias"], t["fc2_bias"]))
        # routed expert j = global expert 3 + j: rows perm[(3+j)*6 : (4+j)*6]
        rows = perm[(3 + 1) * 6:(4 + 1) * 6]
        self.assertTrue(torch.equal(sd["experts.w1"][1], t["fc1_weight"][rows]))
        self.assertTrue(torch.equal(sd["experts.b1"][1], t["fc1_bias"][rows]))
        self.assertTrue(torch.equal(sd["experts.w2"][1], t["fc2_weight"][:, rows]))
        self.assertTrue(torch.equal(sd["shared.fc1.weight"], t["fc1_weight"][perm[:18]]))
        sd = upcycle(t, 8, 3, router_cols="routed")
        self.assertEqual(tuple(sd["router.weight"].shape), (5, 16))

    def test_upcycled_routing_ties(self):
        t = dense_ffn(5)
        m = moe.DeepSeekMoEFFN.upcycled(t["fc1_weight"], t["fc1_bias"], t["fc2_weight"],
                                        t["fc2_bias"], 8, 2, top_m=3).eval()
        g = self.check(m, torch.randn(2, 16), [torch.randn(4, 16)], ties_ok=True)
        np.testing.assert_array_equal(reference.run(g, [np.ones((2, 16), np.float32)])["ids"],
                                      [[0, 1, 2], [0, 1, 2]])

    def test_errors(self):
        t = dense_ffn(6)
        cases = [
            (dict(experts=5, shared=1), "do not divide the hidden width H=48"),
            (dict(experts=8, shared=9), "shared=9 outside 0..8"),
            (dict(experts=8, shared=-1), "shared=-1"),
            (dict(experts=8, shared=0), "no shared MLP to carry fc2's bias"),
            (dict(experts=8, shared=2, permutation=[0] * 48), "permutation"),
            (dict(experts=8, shared=2, permutation=list(range(47))), "permutation"),
            (dict(experts=8, shared=2, permutation=torch.arange(48).float()), "permutation"),
            (dict(experts=8, shared=2, permutation=list(range(1, 49))), "permutation"),
            (dict(experts=8, shared=2, router_cols="some"), "router_cols"),
            (dict(experts=8, shared=2, router_weight=torch.zeros(3, 16)), "router_weight"),
            (dict(experts=0, shared=0), "experts=0"),
        ]
        for kw, msg in cases:
            with self.assertRaises(ValueError, msg=str(kw)) as cm:
                upcycle(t, **kw)
            self.assertIn(msg, str(cm.exception), kw)
        with self.assertRaisesRegex(ValueError, "fc2_weight"):
            moe.upcycle_ffn(t["fc1_weight"], t["fc1_bias"], t["fc2_weight"].T, t["fc2_bias"],
                            8, 2)
        with self.assertRaisesRegex(ValueError, "fc1_bias"):
            moe.upcycle_ffn(t["fc1_weight"], t["fc1_bias"][:4], t["fc2_weight"], t["fc2_bias"],
                            8, 2)
        with self.assertRaisesRegex(ValueError, "no biases"):
            moe.upcycle_ffn(t["fc1_weight"], t["fc1_bias"], t["fc2_weight"], t["fc2_bias"],
                            8, 2, fc3_weight=t["fc1_weight"])


# ---------------------------------------------------------------------------------------------
# Builder: linear with LoRA, the MoE ops, errors


class TestLinearLoRA(MoECase):
    def test_several_adapters(self):
        rng = np.random.default_rng(0)
        k, n = 12, 9
        ads = [(rng.standard_normal((r, k)), rng.standard_normal((n, r)), s)
               for r, s in ((2, 0.5), (4, 2.0), (1, -1.0))]
        ads[1] = (torch.tensor(ads[1][0]), torch.tensor(ads[1][1]), ads[1][2])   # torch too
        b = Builder()
        x = b.input("x", ["batch", 3, k])
        w = b.constant("w", rng.standard_normal((n, k)).astype(np.float32))
        bias = b.constant("b", rng.standard_normal(n).astype(np.float32))
        scale = b.constant("g", rng.standard_normal(n).astype(np.float32))
        res = b.input("r", ["batch", 3, n])
        y = b.linear(x, w, bias, activation="gelu", scale=scale, residual=res,
                     **b.lora("fc", ads), name="fc")
        b.output(y, "y")
        y2 = b.linear(x, w, **b.lora("fc2", ads[:1]), name="plain")
        b.output(y2, "y2")
        g = read_graph(b.to_bytes())
        node = [nd for nd in g.nodes if nd.name == "fc"][0]
        self.assertEqual(len(node.inputs), 7)
        self.assertEqual(node.attrs["lora_scale"], [0.5, 2.0, -1.0])
        self.assertEqual(node.attrs["lora_ranks"], [2, 4, 1])
        self.assertEqual(g.tensor("fc.lora_a").dims, [7, k])
        self.assertEqual(g.tensor("fc.lora_b").dims, [n, 7])
        plain = [nd for nd in g.nodes if nd.name == "plain"][0]
        self.assertEqual([None if t is None else g.tensors[t].name for t in plain.inputs],
                         ["x", "w", None, None, None, "fc2.lora_a", "fc2.lora_b"])
        xv, rv = rng.standard_normal((2, 3, k)), rng.standard_normal((2, 3, n))
        got = reference.run(g, {"x": xv, "r": rv})
        wv, bv, gv = (np.asarray(b.get_tensor(s).value, np.float64) for s in ("w", "b", "g"))
        a32, b32, _, _ = stack_lora(ads)
        pre = xv @ wv.T + bv
        o = 0
        for (_, _, s), r in zip(ads, (2, 4, 1)):
            pre = pre + s * (xv @ a32[o:o + r].astype(np.float64).T) @ b32[:, o:o + r].T
            o += r
        want = rv + gv * reference.gelu(pre)
        np.testing.assert_allclose(got["y"], want, rtol=1e-10, atol=1e-10)
        want2 = xv @ wv.T + 0.5 * (xv @ a32[:2].astype(np.float64).T) @ b32[:, :2].T
        np.testing.assert_allclose(got["y2"], want2, rtol=1e-10, atol=1e-10)

    def test_matches_peft_style_module(self):
        torch.manual_seed(0)
        base = nn.Linear(10, 6)
        lora = moe.LoRA(10, 6, 3)
        nn.init.normal_(lora.lora_B.weight)
        b = Builder()
        x = b.input("x", ["batch", 10])
        y = b.linear(x, b.constant("w", base.weight.detach().numpy()),
                     b.constant("b", base.bias.detach().numpy()),
                     **b.lora("l", [(lora.lora_A.weight, lora.lora_B.weight, 1.5)]))
        b.output(y, "y")
        xx = torch.randn(4, 10)
        with torch.no_grad():
            want = base(xx) + 1.5 * lora(xx)
        self.assertClose(reference.run(b.to_bytes(), [xx.numpy()])["y"], want.numpy(), "peft")

    def test_errors(self):
        b = Builder()
        x = b.input("x", [2, 8])
        w = b.constant("w", np.zeros((4, 8), np.float32))
        a = b.constant("a", np.zeros((3, 8), np.float32))
        bb = b.constant("bb", np.zeros((4, 3), np.float32))
        bad_b = b.constant("bad_b", np.zeros((4, 2), np.float32))
        a_k = b.constant("a_k", np.zeros((3, 7), np.float32))
        cases = [
            (dict(lora_a=a), "both given or both absent"),
            (dict(lora_a=a, lora_b=bb), "lora_scale is required"),
            (dict(lora_a=a, lora_b=bad_b, lora_scale=1.0), "lora_b"),
            (dict(lora_a=a_k, lora_b=bb, lora_scale=1.0), "lora_a"),
            (dict(lora_a=a, lora_b=bb, lora_scale=[1.0, 2.0], lora_ranks=[1, 1]), "sum to 2"),
            (dict(lora_a=a, lora_b=bb, lora_scale=[1.0], lora_ranks=[1, 2]), "1 lora_scale"),
            (dict(lora_a=a, lora_b=bb, lora_scale=[1.0] * 3, lora_ranks=[0, 2, 1]), ">= 1"),
            (dict(lora_a=x, lora_b=bb, lora_scale=1.0), "constant"),
            (dict(lora_scale=1.0), "without lora_a"),
        ]
        for kw, msg in cases:
            with self.assertRaises(ValueError, msg=msg) as cm:
                b.linear(x, w, name="proj", **kw)
            self.assertIn("proj", str(cm.exception))
            self.assertIn(msg, str(cm.exception))
        with self.assertRaisesRegex(ValueError, "at most 8"):
            stack_lora([(np.zeros((1, 8)), np.zeros((4, 1)), 1.0)] * 9)
        with self.assertRaisesRegex(ValueError, "adapter 1"):
            stack_lora([(np.zeros((1, 8)), np.zeros((4, 1)), 1.0),
                        (np.zeros((1, 7)), np.zeros((4, 1)), 1.0)])


class TestBuilderMoE(MoECase):
    def setUp(self):
        b = self.b = Builder()
        self.x = b.input("x", ["batch", 8])
        self.wr = b.constant("wr", np.zeros((6, 8), np.float32))
        self.ids = b.input("ids", ["batch", 2], dtype="i32")
        self.gates = b.input("gates", ["batch", 2])
        self.w1 = b.constant("w1", np.zeros((4, 5, 8), np.float32))
        self.w2 = b.constant("w2", np.zeros((4, 8, 5), np.float32))

    def test_router_outputs(self):
        outs = self.b.moe_router(self.x, self.wr, k=2, first=1, stats=True, name="r")
        self.assertEqual([t.name for t in outs],
                         ["r.ids", "r.gates", "r.counts", "r.fraction", "r.mean_score",
                          "r.load_balance", "r.z_loss"])
        self.assertEqual([t.dtype for t in outs], ["i32"] + ["f32"] * 6)
        self.assertEqual([t.shape for t in outs],
                         [("batch", 2), ("batch", 2), (5,), (5,), (6,), (1,), (1,)])
        for t in outs:
            self.b.output(t)
        g = read_graph(self.b.to_bytes())
        self.assertEqual(len(g.nodes[0].outputs), 7)
        self.assertEqual(g.nodes[0].inputs, [0, 1])   # no bias: trailing None dropped
        self.assertEqual(g.tensor("r.ids").dtype, "i32")

    def test_router_errors(self):
        b, x, wr = self.b, self.x, self.wr
        bias5 = b.constant("bias5", np.zeros(5, np.float32))
        cases = [
            (dict(k=7), "k=7 outside 1..6"), (dict(k=2, first=5), "k=2 outside 1..1"),
            (dict(k=1, first=6), "first=6"), (dict(), "k (the experts per token)"),
            (dict(k=2, bias=bias5), "bias"), (dict(k=2, score="tanh"), "score"),
            (dict(k=2, gates="top"), "gates"), (dict(k=2, renorm=1), "renorm"),
            (dict(k=2, temperature=0.0), "temperature"), (dict(k=2.0), "k must be an int"),
        ]
        for kw, msg in cases:
            with self.assertRaises(ValueError, msg=msg) as cm:
                b.moe_router(x, wr, name="blk.router", **kw)
            self.assertIn("blk.router", str(cm.exception))
            self.assertIn(msg, str(cm.exception))
        with self.assertRaisesRegex(ValueError, "'r2'.*D=8"):
            b.moe_router(x, b.constant("w7", np.zeros((6, 7), np.float32)), k=1, name="r2")
        with self.assertRaisesRegex(ValueError, "'r3'.*x must be f32"):
            b.moe_router(self.ids, wr, k=1, name="r3")
        with self.assertRaisesRegex(ValueError, "'r4'.*weight"):
            b.moe_router(x, self.gates, k=1, name="r4")

    def test_experts_errors(self):
        b, x, ids, gates, w1, w2 = self.b, self.x, self.ids, self.gates, self.w1, self.w2
        g3 = b.input("g3", ["batch", 3])
        w3 = b.constant("w3", np.zeros((4, 5, 8), np.float32))
        cases = [
            (dict(ids=gates), "ids must be i32"), (dict(gates=ids), "gates must be f32"),
            (dict(gates=g3), "last dim 2"), (dict(w2=w1), "w2"),
            (dict(activation="swiglu"), "need w3"), (dict(w3=w3), "only used with"),
            (dict(activation="tanh"), "unknown activation"), (dict(activation=0), "not one of"),
            (dict(b1=b.constant("b1", np.zeros((4, 8), np.float32))), "b1"),
            (dict(residual=g3), "residual"),
            (dict(x=b.input("x7", ["batch", 7])), "D=7"),
        ]
        for kw, msg in cases:
            args = dict(x=x, ids=ids, gates=gates, w1=w1, w2=w2)
            args.update(kw)
            with self.assertRaises(ValueError, msg=msg) as cm:
                b.moe_experts(name="blk.experts", **args)
            self.assertIn("blk.experts", str(cm.exception))
            self.assertIn(msg, str(cm.exception))
        y = b.moe_experts(x, ids, gates, w1, w2, activation="relu", name="e")
        self.assertEqual((y.dtype, y.shape), ("f32", ("batch", 8)))

    def test_lora_mix_errors(self):
        b = self.b
        u = b.input("u", ["batch", 5])
        a1 = b.input("a1", ["batch", 12])
        lb1 = b.constant("lb1", np.zeros((4, 5, 3), np.float32))
        la2 = b.constant("la2", np.zeros((4, 3, 5), np.float32))
        lb2 = b.constant("lb2", np.zeros((4, 8, 3), np.float32))
        good = dict(u=u, a1=a1, ids=self.ids, gates=self.gates, lora_b1=lb1, lora_a2=la2,
                    lora_b2=lb2, lora_scale=1.0)
        cases = [
            (dict(a1=b.input("a11", ["batch", 11])), "last dim 12"),
            (dict(lora_a2=lb1), "lora_a2"), (dict(lora_scale=None), "lora_scale"),
            (dict(activation="swiglu"), "not one of"),
            (dict(b2=b.constant("b2", np.zeros(5, np.float32))), "b2"),
            (dict(u=self.x), "H=8"), (dict(ids=self.gates), "ids must be i32"),
        ]
        for kw, msg in cases:
            args = dict(good)
            args.update(kw)
            with self.assertRaises(ValueError, msg=msg) as cm:
                b.moe_lora_mix(name="blk.mix", **args)
            self.assertIn("blk.mix", str(cm.exception))
            self.assertIn(msg, str(cm.exception))
        hbar, c = b.moe_lora_mix(**good)
        self.assertEqual((hbar.shape, c.shape), (("batch", 5), ("batch", 8)))

    def test_i32_into_float_ops_refused(self):
        with self.assertRaisesRegex(ValueError, "'g'.*must be f32"):
            self.b.gelu(self.ids, name="g")
        with self.assertRaisesRegex(ValueError, "f32"):
            self.b.add(self.ids, self.gates)

    def test_ids_as_output_keeps_i32(self):
        t = self.b.output(self.ids, "ids_out")      # an input: copied by a reshape first
        self.assertEqual(t.dtype, "i32")
        g = read_graph(self.b.to_bytes())
        got = reference.run(g, {"x": np.zeros((2, 8)), "ids": np.array([[1, 2], [3, 0]]),
                                "gates": np.zeros((2, 2))})
        self.assertEqual(got["ids_out"].dtype, np.int32)


class TestReferenceOps(MoECase):
    def test_out_of_range_ids_contribute_nothing(self):
        rng = np.random.default_rng(1)
        b = Builder()
        x = b.input("x", ["batch", 6])
        ids = b.input("ids", ["batch", 3], dtype="i32")
        gates = b.input("gates", ["batch", 3])
        w1 = b.constant("w1", rng.standard_normal((3, 4, 6)).astype(np.float32))
        w2 = b.constant("w2", rng.standard_normal((3, 6, 4)).astype(np.float32))
        b2 = b.constant("b2", rng.standard_normal((3, 6)).astype(np.float32))
        b.output(b.moe_experts(x, ids, gates, w1, w2, b2=b2, activation="relu"), "y")
        g = read_graph(b.to_bytes())
        xv = rng.standard_normal((2, 6))
        gv = rng.standard_normal((2, 3))
        full = reference.run(g, {"x": xv, "ids": np.array([[2, -1, 0], [1, 3, 7]]),
                                 "gates": gv})["y"]
        only = reference.run(g, {"x": xv, "ids": np.array([[2, 0, 0], [1, 1, 1]]),
                                 "gates": gv * [[1, 0, 1], [1, 0, 0]]})["y"]
        np.testing.assert_allclose(full, only, rtol=1e-12, atol=1e-12)
        w1v, w2v, b2v = (np.asarray(b.get_tensor(s).value, np.float64) for s in ("w1", "w2", "b2"))
        want = gv[1, 0] * (w2v[1] @ np.maximum(w1v[1] @ xv[1], 0) + b2v[1])
        np.testing.assert_allclose(full[1], want, rtol=1e-12, atol=1e-12)

    def test_lora_mix_formula(self):
        rng = np.random.default_rng(2)
        e, h, r, d, k, t = 3, 5, 2, 4, 2, 4
        arr = {n: rng.standard_normal(s) for n, s in (
            ("u", (t, h)), ("a1", (t, e * r)), ("gates", (t, k)), ("lb1", (e, h, r)),
            ("la2", (e, r, h)), ("lb2", (e, d, r)), ("b2", (d,)), ("scale", (d,)),
            ("res", (t, d)))}
        ids = np.array([[2, 0], [1, 2], [0, 1], [2, 1]])
        hbar, c = reference.moe_lora_mix_ref(arr["u"], arr["a1"], ids, arr["gates"], arr["lb1"],
                                             arr["la2"], arr["lb2"], arr["b2"], arr["scale"],
                                             arr["res"], lora_scale=0.7, activation=1)
        for i in range(t):
            hb, cc, gs = np.zeros(h), np.zeros(d), 0.0
            for j in range(k):
                ex, gj = ids[i, j], arr["gates"][i, j]
                hj = np.maximum(arr["u"][i] + 0.7 * arr["lb1"][ex] @ arr["a1"][i, ex * r:
                                                                             (ex + 1) * r], 0)
                hb += gj * hj
                cc += gj * 0.7 * arr["lb2"][ex] @ (arr["la2"][ex] @ hj)
                gs += gj
            np.testing.assert_allclose(hbar[i], hb, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(c[i], arr["res"][i] + arr["scale"] * (gs * arr["b2"] + cc),
                                       rtol=1e-12, atol=1e-12)


if __name__ == "__main__":
    unittest.main()
