"""Exporter: PyTorch modules -> .vkg -> read_graph -> vkg.reference, compared with PyTorch.

Tolerance: rtol=1e-5, atol=1e-5 between PyTorch's float32 output and vkg.reference (which
computes in float64) on the read-back graph, at the export batch (2) and another batch (3).
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
from vkg import demos, reference  # noqa: E402

RTOL = 1e-5
ATOL = 1e-5


def export_and_read(module, example, **kw):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.vkg")
        vkg.export(module, example, path, **kw)
        return vkg.read_graph(path)


class ExportCase(unittest.TestCase):
    def check_numerics(self, module, graph, inputs_for_batch, batches=(2, 3)):
        for bs in batches:
            inputs = inputs_for_batch(bs)
            with torch.no_grad():
                want = module(*inputs)
            got = reference.run(graph, [t.numpy() for t in inputs])
            if isinstance(want, torch.Tensor):
                want = {"output": want}
            elif isinstance(want, (tuple, list)):
                want = {"output%d" % i: w for i, w in enumerate(want)}
            self.assertEqual(list(got), list(want))
            for k in want:
                np.testing.assert_allclose(got[k], want[k].numpy(), rtol=RTOL, atol=ATOL,
                                           err_msg="output %s at batch %d" % (k, bs))

    def check_common(self, module, g, input_names, output_names):
        self.assertEqual(g.input_names, input_names)
        self.assertEqual(g.output_names, output_names)
        self.assertEqual(g.metadata["producer"], "vkg.export " + vkg.__version__)
        self.assertEqual(g.metadata["exporter_version"], vkg.__version__)
        self.assertEqual(g.metadata["model_name"], type(module).__name__)
        consts = {t.name: t for t in g.tensors if t.role == "constant"}
        sd = module.state_dict()
        self.assertEqual(set(consts), set(sd))
        for k, v in sd.items():
            np.testing.assert_array_equal(consts[k].data, v.numpy(), err_msg=k)
        for i in g.inputs:
            self.assertEqual(g.tensors[i].sym[0], "batch")


class TestDemos(ExportCase):
    def test_mlp(self):
        m, x = demos.make("mlp")
        g = export_and_read(m, (x,), metadata={"license": "Apache-2.0"})
        self.check_common(m, g, ["x"], ["output"])
        self.assertEqual(g.metadata["license"], "Apache-2.0")
        self.assertEqual([n.op for n in g.topo_order()],
                         ["linear", "relu", "linear", "gelu", "linear"])
        self.assertEqual([n.name for n in g.topo_order()], ["fc1", "act1", "fc2", "act2", "fc3"])
        self.assertEqual(g.tensor("output").shape, ["", 10])
        self.check_numerics(m, g, lambda bs: (torch.randn(bs, 24),))

    def test_resblock(self):
        m, x = demos.make("resblock")
        g = export_and_read(m, (x,))
        self.check_common(m, g, ["x"], ["output"])
        self.assertIn("gamma", {t.name for t in g.tensors})
        self.assertEqual(sorted(n.op for n in g.nodes),
                         ["add", "gelu", "layernorm", "linear", "linear", "mul"])
        self.check_numerics(m, g, lambda bs: (torch.randn(bs, 7, 24),))

    def test_transformer(self):
        m, x = demos.make("transformer")
        self.assertEqual(tuple(x.shape), (2, 7, 24))
        g = export_and_read(m, (x,))
        self.check_common(m, g, ["x"], ["output"])
        names = {n.name for n in g.nodes}
        for want in ("blocks.0.ln", "blocks.2.fc2", "norm", "head", "blocks.1.add"):
            self.assertIn(want, names)
        self.assertIn("blocks.1.fc1.weight", {t.name for t in g.tensors})
        self.assertEqual(len(g.nodes), 3 * 6 + 2)
        self.check_numerics(m, g, lambda bs: (torch.randn(bs, 7, 24),))
        self.assertEqual(g.tensor("x").shape, ["batch", 7, 24])
        self.assertEqual(g.tensor("output").shape, ["", 7, 10])

    def test_static_batch(self):
        m, x = demos.make("mlp")
        g = export_and_read(m, (x,), dynamic_batch=False)
        self.assertEqual(g.tensor("x").shape, [2, 24])
        self.assertEqual(g.tensor("output").shape, [2, 10])
        self.check_numerics(m, g, lambda bs: (torch.randn(bs, 24),), batches=(2,))


class Functional(nn.Module):
    """F.* forms, scalars, flatten/view/reshape, softmax, tuple output."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 12) * 0.3)
        self.b = nn.Parameter(torch.randn(16) * 0.1)
        self.ln_w = nn.Parameter(1 + 0.1 * torch.randn(16))
        self.ln_b = nn.Parameter(0.1 * torch.randn(16))
        self.register_buffer("shift", torch.randn(16))
        self.norm = nn.LayerNorm(16, elementwise_affine=False)
        self.flat = nn.Flatten()
        self.drop = nn.Dropout(0.1)
        self.ident = nn.Identity()
        self.sm = nn.Softmax(dim=-1)

    def forward(self, x, y):
        h = F.linear(x, self.w, self.b)                       # (B, 3, 16)
        h = F.layer_norm(h, (16,), self.ln_w, self.ln_b, 1e-6)
        h = F.gelu(h) * 0.5 + self.shift
        h = torch.add(h, F.relu(h))
        h = torch.mul(h, 2.0)
        h = h.mul(self.ident(self.drop(h)))
        h = self.norm(h / 4.0)
        s = F.softmax(h, dim=-1)
        f = self.flat(s)                                      # (B, 48)
        v = h.view(h.size(0), -1)                              # (B, 48)
        r = h.reshape(h.shape[0], 3, 16).flatten(1)            # (B, 48)
        t = torch.flatten(h, start_dim=1)
        z = v + r + t + y
        z += 1.0
        return f, self.sm(z), z.reshape(-1, 3, 16)


class Dicty(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        h = self.fc(x)
        return {"logits": h, "probs": h.softmax(-1)}


class TestFunctionalForms(ExportCase):
    def test_functional(self):
        torch.manual_seed(0)
        m = Functional().eval()
        ex = (torch.randn(2, 3, 12), torch.randn(2, 48))
        b = vkg.export(m, ex, None)
        g = vkg.read_graph(b.to_bytes())
        self.assertEqual(g.input_names, ["x", "y"])
        self.assertEqual(g.output_names, ["output0", "output1", "output2"])
        consts = {t.name for t in g.tensors if t.role == "constant"}
        self.assertTrue(set(m.state_dict()) <= consts)
        reshapes = [n for n in g.nodes if n.op == "reshape"]
        for n in reshapes:
            self.assertNotIn(2, n.attrs["shape"], n.name)  # batch-agnostic
        self.check_numerics(m, g, lambda bs: (torch.randn(bs, 3, 12), torch.randn(bs, 48)))

    def test_dict_output(self):
        torch.manual_seed(0)
        m = Dicty().eval()
        g = vkg.read_graph(vkg.export(m, torch.randn(4, 5)).to_bytes())
        self.assertEqual(g.output_names, ["logits", "probs"])
        x = torch.randn(6, 5)
        got = reference.run(g, [x.numpy()])
        with torch.no_grad():
            want = m(x)
        for k in want:
            np.testing.assert_allclose(got[k], want[k].numpy(), rtol=RTOL, atol=ATOL)

    def test_layernorm_no_affine_and_submodule_names(self):
        torch.manual_seed(0)
        m = nn.Sequential(nn.LayerNorm(8, elementwise_affine=False), nn.Linear(8, 4, bias=False),
                          nn.ReLU()).eval()
        g = vkg.read_graph(vkg.export(m, torch.randn(2, 8)).to_bytes())
        self.assertEqual([n.name for n in g.topo_order()], ["0", "1", "2"])
        self.assertEqual(len(g.nodes[0].inputs), 1)
        self.assertEqual(len(g.nodes[1].inputs), 2)
        self.assertEqual({t.name for t in g.tensors if t.role == "constant"}, {"1.weight"})
        self.check_numerics(m, g, lambda bs: (torch.randn(bs, 8),))

    def test_half_linear_weight_stays_f16(self):
        torch.manual_seed(0)
        m = nn.Linear(8, 4).eval()
        m.weight.data = m.weight.data.half()
        m.bias.data = m.bias.data.half()

        # the module cannot run in float32 with half weights, so build through the converter API
        b = vkg.Builder()
        x = b.input("x", ["batch", 8])
        w = b.constant("fc.weight", m.weight.detach().numpy())
        b.output(b.linear(x, w, b.constant("fc.bias", m.bias.detach().float().numpy())), "out")
        g = vkg.read_graph(b.to_bytes())
        self.assertEqual(g.tensor("fc.weight").dtype, "f16")
        self.assertEqual(g.tensor("fc.bias").dtype, "f32")


if __name__ == "__main__":
    unittest.main()
