"""vkg.dinov2 against Hugging Face transformers' Dinov2Model (an implementation written elsewhere).

HF's model is randomized (its init makes LayerScale 1.0 but we randomize everything so no block is
trivial), its state_dict is loaded into vkg.dinov2.DinoV2 through the HF-layout loader (auto-detected:
separate query/key/value joined into qkv, layer_scale lambda1 -> ls gamma, ...), and every block's
output is compared: HF's hidden_states[i] (before the final layernorm) against our block i, and
last_hidden_state against our last block through the final norm. Tolerance 1e-4 x RMS (fp32).
transformers 4.40.2 (installed by scripts/setup.sh into build/pydeps, --no-deps) works with Debian's
PyTorch 1.13; with VKG_REQUIRE_HF=1 (set by ctest) a missing transformers fails instead of skipping.
"""

import importlib.util
import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools",
                                "python"))

import torch  # noqa: E402

from vkg import dinov2  # noqa: E402

HAVE_HF = importlib.util.find_spec("transformers") is not None
if not HAVE_HF and os.environ.get("VKG_REQUIRE_HF") == "1":
    raise ImportError("VKG_REQUIRE_HF=1 but transformers is not importable; run scripts/setup.sh")


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lambda1" in name or (name.endswith("weight") and "norm" in name):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.2)
            elif p.dim() >= 2 and "token" not in name and "position" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@unittest.skipUnless(HAVE_HF, "transformers is not importable (No module named 'transformers')")
class HuggingFaceTest(unittest.TestCase):
    def compare(self, arch, hidden, heads, img_size, size, depth=2, swiglu=False):
        from transformers import Dinov2Config, Dinov2Model
        cfg = Dinov2Config(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads,
                           image_size=img_size, patch_size=14, layer_norm_eps=1e-6,
                           use_swiglu_ffn=swiglu)
        hf = Dinov2Model(cfg).eval()
        randomize(hf, 0)
        ours = dinov2.DinoV2(arch, depth=depth, img_size=img_size).eval()
        layout = dinov2.load_state_dict_any(ours, hf.state_dict())
        self.assertEqual(layout, "hf")
        x = torch.randn(2, 3, size[0], size[1], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            out = hf(pixel_values=x, output_hidden_states=True)
            want = ours(x, taps=range(1, depth + 1))
            normed = ours(x, taps=[depth], norm=True)[0]
        pairs = [(out.hidden_states[i + 1], want[i], "block %d" % (i + 1)) for i in range(depth)]
        pairs.append((out.last_hidden_state, normed, "final norm"))
        for a, b, what in pairs:
            self.assertEqual(tuple(a.shape), tuple(b.shape), what)
            err = (a - b).abs().max().item() / b.pow(2).mean().sqrt().item()
            print("%s %s at %s: max err %.3g x RMS" % (arch, what, size, err))
            self.assertLess(err, 1e-4, "%s %s at %s: rel err %g" % (arch, what, size, err))

    def test_vits14_native_grid(self):
        # a 224 table at 224 input: neither side resamples the positional embedding
        self.compare("vits14", 384, 6, 224, (224, 224))

    def test_vits14_resampled(self):
        # the 518 table resampled to 12 x 16 patches by both implementations
        self.compare("vits14", 384, 6, 518, (168, 224))


    def test_vitg14_swiglu(self):
        # ViT-g's SwiGLU FFN (HF: mlp.weights_in / weights_out), one block on a 70 x 70 grid
        self.compare("vitg14", 1536, 24, 70, (70, 70), depth=1, swiglu=True)


if __name__ == "__main__":
    unittest.main(verbosity=2)
