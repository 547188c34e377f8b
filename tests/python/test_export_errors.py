"""Exporter error cases and register_converter."""

import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools",
                                "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import vkg  # noqa: E402
from vkg import reference  # noqa: E402
from vkg.export import unregister_converter  # noqa: E402


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        # conv2d exists; circular padding does not
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), nn.ReLU())

    def forward(self, x):
        return self.features(x)


class Inner(nn.Module):
    def forward(self, x):
        return torch.matmul(x, x.transpose(-1, -2))


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mixer = Inner()

    def forward(self, x):
        return self.mixer(x)


class Top1MoE(nn.Module):
    """Toy top-1 mixture of experts: each row goes to the expert its router picks. The routing is
    data-dependent (Python control flow on tensor values), so torch.fx cannot trace it."""

    def __init__(self, dim=6, n_out=5, n_experts=3):
        super().__init__()
        self.router = nn.Linear(dim, n_experts)
        self.experts = nn.ModuleList([nn.Linear(dim, n_out) for _ in range(n_experts)])

    def forward(self, x):
        choice = self.router(x).argmax(-1)
        out = []
        for i in range(x.shape[0]):
            out.append(self.experts[int(choice[i])](x[i]))
        return torch.stack(out)


class MoENet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(6, 6)
        self.moe = Top1MoE()

    def forward(self, x):
        return F.relu(self.moe(self.pre(x)))


class Errors(unittest.TestCase):
    def test_conv2d_names_module_and_path(self):
        with self.assertRaises(vkg.ExportError) as cm:
            vkg.export(ConvNet().eval(), torch.randn(1, 3, 8, 8), None)
        msg = str(cm.exception)
        self.assertIn("Conv2d", msg)
        self.assertIn("features.0", msg)

    def test_unsupported_function_names_op_and_path(self):
        with self.assertRaises(vkg.ExportError) as cm:
            vkg.export(Outer().eval(), torch.randn(2, 3, 4), None)
        msg = str(cm.exception)
        self.assertIn("matmul", msg)  # the first unsupported op met (transpose is a permute)
        self.assertIn("'mixer'", msg)
        self.assertIn("Inner", msg)

    def test_gelu_tanh_refused(self):
        m = nn.Sequential(nn.Linear(4, 4), nn.GELU(approximate="tanh")).eval()
        with self.assertRaisesRegex(vkg.ExportError, "tanh") as cm:
            vkg.export(m, torch.randn(2, 4), None)
        self.assertIn("'1'", str(cm.exception))

        class FTanh(nn.Module):
            def forward(self, x):
                return F.gelu(x, approximate="tanh")

        with self.assertRaisesRegex(vkg.ExportError, "tanh"):
            vkg.export(FTanh(), torch.randn(2, 4), None)

    def test_softmax_not_last_dim(self):
        with self.assertRaisesRegex(vkg.ExportError, "softmax.*dim 1"):
            vkg.export(nn.Softmax(dim=1).eval(), torch.randn(2, 3, 4), None)

    def test_linear_k_mismatch_is_export_error(self):
        class Bad(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = nn.Parameter(torch.randn(3, 5))

            def forward(self, x):
                return F.linear(x, self.w)

        # PyTorch itself fails on the example, reported as an ExportError
        with self.assertRaises(vkg.ExportError):
            vkg.export(Bad(), torch.randn(2, 4), None)

    def test_untraceable_without_converter(self):
        with self.assertRaises(vkg.ExportError) as cm:
            vkg.export(MoENet().eval(), torch.randn(4, 6), None)
        self.assertIn("Top1MoE", str(cm.exception))


class Converters(unittest.TestCase):
    def tearDown(self):
        unregister_converter(Top1MoE)

    def test_register_converter_moe_as_linear(self):
        torch.manual_seed(0)
        net = MoENet().eval()
        calls = []

        def convert(builder, module, inputs, name):
            calls.append((module, len(inputs), name))
            # toy: treat the MoE as its expert 0 (a linear), using existing ops
            e = module.experts[0]
            w = builder.constant(name + ".experts.0.weight", e.weight.detach().numpy())
            b = builder.constant(name + ".experts.0.bias", e.bias.detach().numpy())
            return builder.linear(inputs[0], w, b, name=name)

        vkg.register_converter(Top1MoE, convert)
        b = vkg.export(net, torch.randn(4, 6), None)
        self.assertEqual(len(calls), 1)
        self.assertIs(calls[0][0], net.moe)
        self.assertEqual(calls[0][1:], (1, "moe"))
        g = vkg.read_graph(b.to_bytes())
        self.assertEqual([n.name for n in g.topo_order()], ["pre", "moe", "relu"])
        self.assertEqual(g.tensor("moe.experts.0.weight").shape, [5, 6])

        x = torch.randn(3, 6)
        with torch.no_grad():
            want = F.relu(net.moe.experts[0](net.pre(x)))
        got = reference.run(g, [x.numpy()])["output"]
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)

    def test_converter_bad_return(self):
        vkg.register_converter(Top1MoE, lambda b, m, inputs, name: "nope")
        with self.assertRaisesRegex(vkg.ExportError, "converter for Top1MoE"):
            vkg.export(MoENet().eval(), torch.randn(4, 6), None)

    def test_register_requires_module_class(self):
        with self.assertRaises(TypeError):
            vkg.register_converter(int, lambda *a: None)


if __name__ == "__main__":
    unittest.main()
