"""Reference model modules: `vkg.models.DeepSeekViT` (vkg.deepseek_vit), the DeepSeek-MoE ViT
encoder of model-spec §2."""

from .deepseek_vit import DeepSeekViT

__all__ = ["DeepSeekViT"]
