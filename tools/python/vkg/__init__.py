"""vkg: export PyTorch modules to .vkg graph files (docs/graph-format.md) and read them back.

NumPy and PyTorch are imported on first use, so `import vkg` works without them.
"""

from .errors import ExportError

__version__ = "0.1.0"

__all__ = ["export", "register_converter", "ExportError", "Builder", "read_graph", "GraphWriter",
           "FormatError", "__version__"]

_LAZY = {
    "export": ("export", "export"),
    "register_converter": ("export", "register_converter"),
    "Builder": ("builder", "Builder"),
    "read_graph": ("format", "read_graph"),
    "GraphWriter": ("format", "GraphWriter"),
    "FormatError": ("format", "FormatError"),
    "export_dinov2": ("dinov2", "export_dinov2"),
    "export_options": ("export", "export_options"),
    "stack_lora": ("builder", "stack_lora"),
    "MoELoRAFFN": ("moe", "MoELoRAFFN"),
    "DeepSeekMoEFFN": ("moe", "DeepSeekMoEFFN"),
    "MoEFFN": ("moe", "MoEFFN"),
    "TopKRouter": ("moe", "TopKRouter"),
    "upcycle_ffn": ("moe", "upcycle_ffn"),
    "DeepSeekViT": ("deepseek_vit", "DeepSeekViT"),
    "export_deepseek_vit": ("deepseek_vit", "export_deepseek_vit"),
    "upcycle_state_dict": ("deepseek_vit", "upcycle_state_dict"),
    "models": ("models", None),
    "MoETransformerDecoder": ("transfuser", "MoETransformerDecoder"),
    "MoEConfig": ("transfuser", "MoEConfig"),
    "export_transfuser_decoder": ("transfuser", "export_transfuser_decoder"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        module = importlib.import_module("." + mod, __name__)
        value = module if attr is None else getattr(module, attr)
        # importing vkg/export.py binds the submodule to vkg.export; the function wins (the
        # submodule is also callable, so either object works as vkg.export(...)).
        globals()[name] = value
        return value
    raise AttributeError("module 'vkg' has no attribute %r" % name)
