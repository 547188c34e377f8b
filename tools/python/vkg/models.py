"""Reference model modules: `vkg.models.DeepSeekViT` (vkg.deepseek_vit), the DeepSeek-MoE ViT
encoder of model-spec §2; `vkg.models.DepthSegModel` (vkg.depth_seg), DINOv2 with MoE-LoRA FFNs,
a DPT depth head and a BN segmentation head (model-spec §1)."""

from .deepseek_vit import DeepSeekViT
from .depth_seg import DepthSegModel

__all__ = ["DeepSeekViT", "DepthSegModel"]
