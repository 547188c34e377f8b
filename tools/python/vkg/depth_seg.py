"""DINOv2 + MoE-LoRA FFN + DPT depth head + BN segmentation head (model-spec §1, seed family S1):
a PyTorch reference module, checkpoint loading, and a direct .vkg exporter.

Written from shared/docs/model-spec.md §1.2-1.5 (not copied from any repository).

- `DepthSegModel(arch, classes, experts=8, top_k=2, lora_rank=8, lora_alpha=8,
  seg_head="pyramid")`: `pretrained` = a vkg.dinov2.DinoV2 whose every block's `mlp` is a
  vkg.moe.MoELoRAFFN; `depth_head` = Depth Anything V2's DPTHead; `seg_head` = DINOv2's BNHead
  (nn.BatchNorm2d `bn`, 1x1 `conv_seg`). archs: vits14 (the spec), vitb14, vitl14 (Depth Anything
  V2's head configs), their `_reg` variants, and `vits14-mini`, the reduced bundled model (D 96,
  12 blocks, 3 heads, FFN 384, DPT features 32, out channels 24/48/96/96, positional table for
  112 x 112). Taps (1-based, after the final LayerNorm, cls and registers dropped): the depth
  head reads blocks 3/6/9/12 (Depth Anything V2's [2, 5, 8, 11]), the seg head blocks 9-12.
  forward(image) -> OrderedDict depth (N, H, W), seg_logits (N, C, H, W) and, with
  routing_stats=True, `blocks.<i>.mlp.<stat>` for every block i (0-based) and stat in
  vkg.moe.STAT_NAMES (counts, fraction, mean_score, load_balance, z_loss).
- state_dict (also what `load_checkpoint` accepts; a `module.` prefix is removed):
  `pretrained.` + DINOv2's official names, each block's FFN as `pretrained.blocks.<i>.mlp.fc1|fc2.
  weight|bias` (the frozen base), `...mlp.router.weight|bias` and `...mlp.experts.<e>.fc1|fc2.
  lora_A|lora_B.weight` (PEFT's orientation: A (r, in), B (out, r); MoELoRAFFN's own names, so no
  mapping is needed); per-expert frozen copies (`experts.<e>.fc1.weight` or PEFT's
  `...fc1.base_layer.weight`) collapse into the shared base when identical; `depth_head.` with
  Depth Anything V2's names (projects, resize_layers, scratch.layer<n>_rn,
  scratch.refinenet<n>.out_conv|resConfUnit1|resConfUnit2.conv1|conv2, scratch.output_conv1,
  scratch.output_conv2.0|2); `seg_head.bn.*`, `seg_head.conv_seg.*`.
- `export_depth_seg(model, (H, W), fp16, routing_stats, path)`: input `image` (batch, 3, H, W),
  already normalized (sample side, model-spec §1.1: RGB / 255, resized so both sides are multiples
  of 14, minus mean (0.485, 0.456, 0.406), divided by std (0.229, 0.224, 0.225), NCHW f32);
  outputs `depth` (batch, H, W), `seg_logits` (batch, C, H, W), optionally `seg_labels` and the
  routing statistics. Exact rewrites of model-spec §5 (LayerScale folded into each block's fc2
  and LoRA-B2, BN folded into conv_seg and split per branch at native resolution, 1x1 convs on
  tokens before the NCHW permute, fusion out_conv before its upsample, fused ReLU / residual
  convs, the duplicated final ReLU dropped).
"""

import copy
import math
import os
import sys
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import dinov2
from .builder import Builder
from .errors import ExportError
from .moe import STAT_NAMES, MoECheckpointError, MoELoRAFFN, _activation, \
    collapse_expert_copies, convert_moe_lora_ffn, route

PATCH = dinov2.PATCH
SEG_HEADS = ("pyramid", "flat")
PYRAMID_FACTORS = (4, 2, 1, 0.5)
BN_EPS = 1e-5
HEAD_FEATURES_2 = 32            # Depth Anything V2's output_conv2 width, fixed for every encoder

# Depth Anything V2's head per encoder (run.py's model_configs, intermediate_layer_idx + 1)
_DA_HEADS = {
    "vits14": dict(features=64, out_channels=(48, 96, 192, 384), depth_taps=(3, 6, 9, 12)),
    "vitb14": dict(features=128, out_channels=(96, 192, 384, 768), depth_taps=(3, 6, 9, 12)),
    "vitl14": dict(features=256, out_channels=(256, 512, 1024, 1024),
                   depth_taps=(5, 12, 18, 24)),
}
# the reduced bundled model (tools/train_depth_seg.py): 12 blocks so both heads keep their taps
MINI = dict(embed_dim=96, depth=12, heads=3, mlp_ratio=4.0, ffn="mlp", registers=0,
            interpolate_offset=0.1, interpolate_antialias=False, img_size=112, features=32,
            out_channels=(24, 48, 96, 96), depth_taps=(3, 6, 9, 12))
ARCH_NAMES = sorted([a for a in _DA_HEADS] + [a + "_reg" for a in _DA_HEADS] + ["vits14-mini"])


class CheckpointError(dinov2.CheckpointError, ValueError):
    """A checkpoint that does not fit DepthSegModel (names every missing, unexpected and
    mis-shaped key)."""


def arch_config(arch):
    """dict of the backbone (vkg.dinov2.arch_config's keys), img_size (the positional table's
    side in pixels), features, out_channels and depth_taps of an arch name."""
    if arch == "vits14-mini":
        return dict(MINI)
    base = arch[:-4] if arch.endswith("_reg") else arch
    if base not in _DA_HEADS:
        raise ValueError("unknown depth-seg arch %r (known: %s)" % (arch, ", ".join(ARCH_NAMES)))
    cfg = dinov2.arch_config(arch)
    cfg.update(_DA_HEADS[base], img_size=dinov2.IMG_SIZE)
    return cfg


# --------------------------------------------------------------------------------------------
# the reference module: Depth Anything V2's DPT head


class ResidualConvUnit(nn.Module):
    """x + conv2(relu(conv1(relu(x)))), 3x3 convs with bias (use_bn=False); the first ReLU
    leaves x itself untouched for the skip."""

    def __init__(self, features):
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, 1, 1)
        self.conv2 = nn.Conv2d(features, features, 3, 1, 1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FeatureFusionBlock(nn.Module):
    """out = x0 (+ resConfUnit1(x1)); out = resConfUnit2(out); bilinear (align_corners=True) to
    size (default: twice the input); out_conv 1x1. refinenet4's resConfUnit1 is never called
    but is a parameter of Depth Anything's checkpoints."""

    def __init__(self, features):
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1, 1, 0)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, *xs, size=None):
        out = xs[0]
        if len(xs) == 2:
            out = out + self.resConfUnit1(xs[1])
        out = self.resConfUnit2(out)
        if size is None:
            size = (2 * out.shape[-2], 2 * out.shape[-1])     # scale_factor=2 sets only the size
        out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=True)
        return self.out_conv(out)


class Scratch(nn.Module):
    def __init__(self, out_channels, features):
        super().__init__()
        for n, oc in enumerate(out_channels, 1):
            setattr(self, "layer%d_rn" % n, nn.Conv2d(oc, features, 3, 1, 1, bias=False))
        for n in range(1, 5):
            setattr(self, "refinenet%d" % n, FeatureFusionBlock(features))
        self.output_conv1 = nn.Conv2d(features, features // 2, 3, 1, 1)
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, HEAD_FEATURES_2, 3, 1, 1), nn.ReLU(),
            nn.Conv2d(HEAD_FEATURES_2, 1, 1, 1, 0), nn.ReLU(), nn.Identity())


class DPTHead(nn.Module):
    """Depth Anything V2's DPTHead (use_bn=False, use_clstoken=False): forward(maps, h, w) with
    maps four (N, D, h, w) normed patch maps -> (N, 1, 14h, 14w)."""

    def __init__(self, in_channels, features, out_channels):
        super().__init__()
        oc = [int(c) for c in out_channels]
        if len(oc) != 4:
            raise ValueError("DPTHead needs 4 out_channels, got %s" % (oc,))
        self.projects = nn.ModuleList([nn.Conv2d(in_channels, c, 1, 1, 0) for c in oc])
        self.resize_layers = nn.ModuleList([
            nn.ConvTranspose2d(oc[0], oc[0], 4, 4, 0), nn.ConvTranspose2d(oc[1], oc[1], 2, 2, 0),
            nn.Identity(), nn.Conv2d(oc[3], oc[3], 3, 2, 1)])
        self.scratch = Scratch(oc, features)

    def forward(self, maps, h, w):
        layers = [self.resize_layers[i](self.projects[i](x)) for i, x in enumerate(maps)]
        s = self.scratch
        l1, l2, l3, l4 = (getattr(s, "layer%d_rn" % n)(x) for n, x in enumerate(layers, 1))
        p = s.refinenet4(l4, size=l3.shape[2:])
        p = s.refinenet3(p, l3, size=l2.shape[2:])
        p = s.refinenet2(p, l2, size=l1.shape[2:])
        p = s.refinenet1(p, l1)
        out = F.interpolate(s.output_conv1(p), size=(h * PATCH, w * PATCH), mode="bilinear",
                            align_corners=True)
        return s.output_conv2(out)


class BNHead(nn.Module):
    """DINOv2's BNHead with resize_concat: optional resize_factors (bilinear, align_corners=False,
    scale-factor semantics for factors >= 1; area = adaptive average pooling below 1), bilinear
    to the first map's size, concat, BatchNorm2d, conv_seg 1x1; forward(maps, size) also resizes
    the logits to size (bilinear, align_corners=False) as mmseg's encode_decode does."""

    def __init__(self, in_channels, classes, resize_factors=None):
        super().__init__()
        self.resize_factors = None if resize_factors is None else tuple(resize_factors)
        self.bn = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self.conv_seg = nn.Conv2d(in_channels, classes, 1)

    def forward(self, maps, size):
        if self.resize_factors is not None:
            maps = [F.interpolate(x, scale_factor=f, mode="bilinear", align_corners=False)
                    if f >= 1 else F.interpolate(x, scale_factor=f, mode="area")
                    for x, f in zip(maps, self.resize_factors)]
        size0 = tuple(maps[0].shape[2:])
        maps = [x if tuple(x.shape[2:]) == size0 else
                F.interpolate(x, size=size0, mode="bilinear", align_corners=False) for x in maps]
        y = self.conv_seg(self.bn(torch.cat(maps, dim=1)))
        return F.interpolate(y, size=tuple(size), mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------
# the whole model


class BlockMoELoRAFFN(MoELoRAFFN):
    """vkg.moe.MoELoRAFFN (same parameters and routing) that can also compute its output by the
    shared-base algebra of model-spec §1.3.2 (shared_base=True): fc1 and fc2 run once per token,
    only the rank-r LoRA products and the activation per selected expert. Equal to the literal
    forward up to float rounding (fc2's bias enters as (sum of gates) * b2) and about half the
    FFN work, which is what makes CPU training of the bundled model affordable."""

    shared_base = False

    def forward(self, x):
        if not self.shared_base:
            return super().forward(x)
        f = x.reshape(-1, self.dim)
        r = route(self.router(f), self.top_k)
        self._record(r, x.shape[:-1])
        act, s, rank = _activation(self.act), self.lora_scale, self.rank
        u = self.fc1(f)
        a1 = F.linear(f, torch.cat([ex.fc1.lora_A.weight for ex in self.experts], 0))
        hbar = f.new_zeros(f.shape[0], self.hidden)
        c = f.new_zeros(f.shape[0], self.dim)
        for e, ex in enumerate(self.experts):
            tok, slot = (r.ids == e).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            g = r.gates[tok, slot].unsqueeze(-1)
            h = act(u[tok] + s * ex.fc1.lora_B(a1[tok, e * rank:(e + 1) * rank]))
            hbar = hbar.index_add(0, tok, g * h)
            c = c.index_add(0, tok, g * (s * ex.fc2(h)))
        y = F.linear(hbar, self.fc2.weight) + r.gates.sum(-1, keepdim=True) * self.fc2.bias + c
        return y.reshape(tuple(x.shape[:-1]) + (self.dim,))


class DepthSegModel(nn.Module):
    """See the module docstring. Overrides (all optional): depth (blocks), embed_dim, heads,
    img_size (the positional table's side in pixels, a multiple of 14), depth_taps / seg_taps
    (four 1-based blocks each; default the arch's, or 3/6/9/12 scaled to an overridden depth,
    and the last four blocks), features, out_channels."""

    def __init__(self, arch="vits14", classes=150, experts=8, top_k=2, lora_rank=8,
                 lora_alpha=8, seg_head="pyramid", depth=None, img_size=None, depth_taps=None,
                 seg_taps=None, features=None, out_channels=None, embed_dim=None, heads=None):
        super().__init__()
        cfg = arch_config(arch)
        n_arch = cfg["depth"]
        if depth is not None:
            cfg["depth"] = int(depth)
        if embed_dim is not None:
            cfg["embed_dim"] = int(embed_dim)
        if heads is not None:
            cfg["heads"] = int(heads)
        if cfg["embed_dim"] % cfg["heads"]:
            raise ValueError("embed_dim %d is not a multiple of heads %d"
                             % (cfg["embed_dim"], cfg["heads"]))
        if seg_head not in SEG_HEADS:
            raise ValueError("seg_head %r: expected 'pyramid' or 'flat'" % (seg_head,))
        if classes < 1:
            raise ValueError("classes must be >= 1, got %d" % classes)
        img_size = int(img_size or cfg["img_size"])
        n = cfg["depth"]
        if depth_taps is None:
            depth_taps = (cfg["depth_taps"] if n == n_arch
                          else [max(1, n * q // 4) for q in (1, 2, 3, 4)])
        if seg_taps is None:
            seg_taps = [max(1, n - 3 + q) for q in range(4)]
        self.depth_taps = [int(t) for t in depth_taps]
        self.seg_taps = [int(t) for t in seg_taps]
        for what, taps in (("depth_taps", self.depth_taps), ("seg_taps", self.seg_taps)):
            if len(taps) != 4 or any(not 1 <= t <= n for t in taps):
                raise ValueError("%s %s: give four blocks in 1..%d" % (what, taps, n))
        self.arch = arch
        self.n_classes = int(classes)
        self.seg_head_kind = seg_head
        self.features = int(features or cfg["features"])
        self.out_channels = tuple(int(c) for c in (out_channels or cfg["out_channels"]))
        self.pretrained = dinov2.DinoV2(arch, config=cfg, img_size=img_size)
        d, hidden = self.pretrained.embed_dim, self.pretrained.ffn_hidden
        self.embed_dim = d
        self.img_size = img_size
        for blk in self.pretrained.blocks:
            blk.mlp = BlockMoELoRAFFN(d, hidden, experts=experts, top_k=top_k,
                                      rank=lora_rank, alpha=lora_alpha)
        self.n_experts, self.top_k = int(experts), int(top_k)
        self.lora_rank, self.lora_alpha = int(lora_rank), lora_alpha
        self.depth_head = DPTHead(d, self.features, self.out_channels)
        self.seg_head = BNHead(4 * d, self.n_classes,
                               PYRAMID_FACTORS if seg_head == "pyramid" else None)

    def config(self):
        """The constructor arguments that rebuild this architecture."""
        return dict(arch=self.arch, classes=self.n_classes, experts=self.n_experts,
                    top_k=self.top_k, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                    seg_head=self.seg_head_kind, depth=self.pretrained.depth,
                    img_size=self.img_size, depth_taps=list(self.depth_taps),
                    seg_taps=list(self.seg_taps), features=self.features,
                    out_channels=list(self.out_channels), embed_dim=self.embed_dim,
                    heads=self.pretrained.heads)

    def set_moe_path(self, shared_base):
        """Every block's FFN computed literally (False, the reference) or by the shared-base
        algebra (True; training)."""
        for m in self.moe_blocks:
            m.shared_base = bool(shared_base)
        return self

    @property
    def moe_blocks(self):
        return [blk.mlp for blk in self.pretrained.blocks]

    def features_maps(self, image):
        """{tap: (N, D, h, w)}: the final-normed patch tokens of every tap either head reads."""
        _, _, hh, ww = image.shape
        h, w = hh // PATCH, ww // PATCH
        taps = sorted(set(self.depth_taps) | set(self.seg_taps))
        first = 1 + self.pretrained.n_registers
        outs = self.pretrained(image, taps=taps, norm=True)
        return {t: o[:, first:].transpose(1, 2).reshape(o.shape[0], o.shape[2], h, w)
                for t, o in zip(taps, outs)}

    def forward(self, image, routing_stats=False):
        _, _, hh, ww = image.shape
        maps = self.features_maps(image)
        depth = self.depth_head([maps[t] for t in self.depth_taps], hh // PATCH, ww // PATCH)
        out = OrderedDict()
        out["depth"] = F.relu(depth).squeeze(1)          # DepthAnythingV2.forward's own ReLU
        out["seg_logits"] = self.seg_head([maps[t] for t in self.seg_taps], (hh, ww))
        if routing_stats:
            out.update(self.routing_stats())
        return out

    def routing_stats(self):
        """The last forward's statistics: OrderedDict `blocks.<i>.mlp.<stat>` -> tensor."""
        out = OrderedDict()
        for i, m in enumerate(self.moe_blocks):
            for s in STAT_NAMES:
                out["blocks.%d.mlp.%s" % (i, s)] = m.last_stats[s]
        return out


def init_random(model, seed=0, lora_std=0.3):
    """Deterministic random weights with O(1) activations for tests and --random-init: the
    backbone as vkg.dinov2.init_random, every LoRA B non-zero (PEFT's zero init would make the
    experts equal), BatchNorm running statistics non-trivial, a positive bias on the last conv
    so the final ReLU keeps most of the depth map."""
    dinov2.init_random(model, seed)
    g = torch.Generator().manual_seed(int(seed) + 7919)
    with torch.no_grad():
        for m in model.moe_blocks:
            for ex in m.experts:
                for ad in (ex.fc1, ex.fc2):
                    r = ad.lora_B.weight.shape[1]
                    ad.lora_B.weight.copy_(torch.randn(ad.lora_B.weight.shape, generator=g)
                                           * lora_std / math.sqrt(r))
        bn = model.seg_head.bn
        bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g) * 0.3)
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
        last = model.depth_head.scratch.output_conv2[2]
        last.bias.add_(1.0)
    return model


# --------------------------------------------------------------------------------------------
# checkpoints

_OPTIONAL = ("pretrained.mask_token", "seg_head.bn.num_batches_tracked")


def read_state_dict(src):
    """A flat name -> tensor dict from a path (.pth/.pt via torch.load, .safetensors) or a dict,
    wrappers ({"model": ...}, {"state_dict": ...}) and a DDP `module.` prefix removed."""
    sd = dinov2.read_checkpoint(src)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def infer_config(sd):
    """What a state_dict says about the architecture: img_size (from pos_embed), classes,
    experts, lora_rank, depth (missing entries are absent)."""
    out = {}
    pe = sd.get("pretrained.pos_embed")
    if pe is not None and pe.dim() == 3:
        m = int(round(math.sqrt(pe.shape[1] - 1)))
        if m * m == pe.shape[1] - 1:
            out["img_size"] = m * PATCH
    w = sd.get("seg_head.conv_seg.weight")
    if w is not None:
        out["classes"] = int(w.shape[0])
    r = sd.get("pretrained.blocks.0.mlp.router.weight")
    if r is not None:
        out["experts"] = int(r.shape[0])
    a = sd.get("pretrained.blocks.0.mlp.experts.0.fc1.lora_A.weight")
    if a is not None:
        out["lora_rank"] = int(a.shape[0])
    blocks = {int(k.split(".")[2]) for k in sd if k.startswith("pretrained.blocks.")
              and k.split(".")[2].isdigit()}
    if blocks:
        out["depth"] = max(blocks) + 1
    return out


def load_checkpoint(model, src, strict=True):
    """Loads src (path or dict) in the layout of the module docstring into model. Identical
    per-expert frozen FFN copies collapse into the shared base. strict=False leaves missing keys
    at their current values (e.g. a Depth Anything V2 checkpoint without routers, LoRA and seg
    head: PEFT's zero LoRA B makes the FFN the dense one) and returns their names; unexpected or
    mis-shaped keys always raise CheckpointError naming them."""
    sd = read_state_dict(src)
    try:
        collapse_expert_copies(sd)
    except MoECheckpointError as e:
        raise CheckpointError(str(e)) from None
    return dinov2.copy_checkpoint(
        model.state_dict(), sd,
        "checkpoint does not fit DepthSegModel %s (%d blocks, %d experts, rank %d, %d classes, "
        "%d x %d positional table):" % (model.arch, model.pretrained.depth, model.n_experts,
                                        model.lora_rank, model.n_classes,
                                        model.img_size // PATCH, model.img_size // PATCH),
        optional=_OPTIONAL, strict=strict, error=CheckpointError)


_SPEC_DEFAULTS = dict(experts=8, top_k=2, lora_rank=8, lora_alpha=8)


def build_model(arch, checkpoint=None, seed=None, strict=True, **config):
    """A DepthSegModel in eval mode: random weights from seed when checkpoint is None (or
    "random:SEED"), else loaded with load_checkpoint. Config entries left out or None: img_size
    (the positional table), experts, lora_rank, classes and depth come from the checkpoint when
    it has them, then experts 8, top_k 2, lora_rank 8, lora_alpha 8 (model-spec §7); random
    weights need classes."""
    if isinstance(checkpoint, str) and checkpoint.startswith("random:"):
        try:
            seed = int(checkpoint[len("random:"):])
        except ValueError:
            raise ValueError("random:SEED needs an integer seed, got %r" % checkpoint) from None
        checkpoint = None
    config = {k: v for k, v in config.items() if v is not None}
    sd = None
    if checkpoint is not None:
        sd = read_state_dict(checkpoint)
        for k, v in infer_config(sd).items():
            if k == "depth" and v == arch_config(arch)["depth"]:
                continue
            config.setdefault(k, v)
    for k, v in _SPEC_DEFAULTS.items():
        config.setdefault(k, v)
    if "classes" not in config:
        raise ValueError("give the number of classes (the checkpoint has no seg_head.conv_seg)"
                         if sd is not None else "random weights need the number of classes")
    model = DepthSegModel(arch, **config)
    if sd is None:
        seed = 0 if seed is None else int(seed)
        init_random(model, seed)
        model.source = "random:%d" % seed
        model.missing_keys = []
    else:
        model.missing_keys = load_checkpoint(model, sd, strict=strict)
        model.source = (os.path.basename(checkpoint) if isinstance(checkpoint, (str, os.PathLike))
                        else "state dict")
    return model.eval()


def router_margin(model, image):
    """Smallest gap between the k-th and (k+1)-th router logit over every block and token
    (float64, from each block's actual FFN input): a test whose margin is far above the float32
    rounding of the logits cannot see a routing flip."""
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.append((mod, a[0])))
             for m in model.moe_blocks]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for h in hooks:
            h.remove()
    margin = float("inf")
    for m, f in inputs:
        if m.top_k >= m.n_experts:
            continue
        z = F.linear(f.reshape(-1, m.dim).double(), m.router.weight.double(),
                     None if m.router.bias is None else m.router.bias.double())
        s = torch.sort(z, dim=-1, descending=True).values
        margin = min(margin, float((s[:, m.top_k - 1] - s[:, m.top_k]).min()))
    return margin


# --------------------------------------------------------------------------------------------
# export


def _np64(t):
    return t.detach().cpu().double().numpy()


def _layer_scaled_ffn(mlp, gamma):
    """A float64 copy of mlp computing gamma * FFN(f) (model-spec §5.3: gamma scales fc2's rows
    and bias and every expert's fc2 LoRA B rows; exact in real arithmetic), so the graph adds
    the block's residual once instead of scaling first."""
    m = copy.deepcopy(mlp).double()
    g = gamma.detach().double()
    with torch.no_grad():
        m.fc2.weight.mul_(g[:, None])
        m.fc2.bias.mul_(g)
        for ex in m.experts:
            ex.fc2.lora_B.weight.mul_(g[:, None])
    return m


def export_depth_seg(model, image_size, fp16=False, routing_stats=False, path=None,
                     labels=False, variant=None, class_names=None, metadata=None):
    """Builds the .vkg graph of model for image_size = (H, W): input `image` (batch, 3, H, W)
    f32 (normalized, see the module docstring); outputs `depth` (batch, H, W), `seg_logits`
    (batch, C, H, W), with labels `seg_labels` (batch, H, W) (argmax over C), and with
    routing_stats `blocks.<i>.mlp.<stat>` for every block i (0-based) and stat in
    vkg.moe.STAT_NAMES (counts: per-expert (token, slot) selections of the whole batch).
    fp16 stores matrices and conv kernels as f16 (routers, norms, biases stay f32). variant:
    the MoE-LoRA graph form ("shared_base", default, or "naive"). class_names (C strings) go to
    the metadata key `seg.classes`, comma-separated. Returns the Builder (saved to path when
    given)."""
    if not isinstance(model, DepthSegModel):
        raise ExportError("export_depth_seg needs a vkg.depth_seg.DepthSegModel, got %s"
                          % type(model).__name__)
    bb = model.pretrained
    taps = sorted(set(model.depth_taps) | set(model.seg_taps))
    H, W, _ = dinov2.check_export_args(bb, image_size, taps)
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        if len(class_names) != model.n_classes or any(not c or "," in c for c in class_names):
            raise ExportError("class_names %s: give %d non-empty names without commas"
                              % (class_names, model.n_classes))
    h, w = H // PATCH, W // PATCH
    d = model.embed_dim
    wdt = "f16" if fp16 else "f32"
    sd = {k: _np64(v) for k, v in model.state_dict().items()}
    b = Builder()

    def const(name, arr, dtype="f32"):
        return b.constant(name, np.asarray(arr, dtype=np.float64), dtype=dtype)

    def ffn(b_, i, f, x):
        p = "blocks.%d" % i
        m = _layer_scaled_ffn(bb.blocks[i].mlp, bb.blocks[i].ls2.gamma)
        y = convert_moe_lora_ffn(b_, m, [f], p + ".mlp", variant=variant, fp16=fp16,
                                 stats=routing_stats, routing=False)
        return b_.add(x, y, name=p + ".mlp.residual")

    toks = dinov2.build_backbone(b, bb, (H, W), taps, norm=True, fp16=fp16, ffn=ffn)
    first = 1 + bb.n_registers
    patches = {t: b.slice(toks[t], 1, first, first + h * w, name="block%d.patches" % t)
               for t in taps}

    def tokens_to_map(y, c, name):
        # (N, h*w, c) -> (N, c, h, w)
        y = b.reshape(y, [0, h, w, c], name=name + ".grid")
        return b.permute(y, [0, 3, 1, 2], name=name + ".nchw")

    def conv(x, key, stride=1, padding=0, activation=None, residual=None, bias=True, name=None):
        wt = const(key + ".weight", sd[key + ".weight"], wdt)
        bs = const(key + ".bias", sd[key + ".bias"]) if bias else None
        return b.conv2d(x, wt, bs, stride=stride, padding=padding, activation=activation,
                        residual=residual, name=name or key)

    # -- DPT head (model-spec §1.4) --
    dh = "depth_head."
    layers = []
    for j, t in enumerate(model.depth_taps):
        key = dh + "projects.%d" % j
        oc = model.out_channels[j]
        # a 1x1 conv on the NCHW map is this linear on the tokens; permuting its oc-channel
        # output moves less data than permuting the D-channel tokens
        y = b.linear(patches[t], const(key + ".weight", sd[key + ".weight"].reshape(oc, d), wdt),
                     const(key + ".bias", sd[key + ".bias"]), name=key)
        y = tokens_to_map(y, oc, key)
        rk = dh + "resize_layers.%d" % j
        if j in (0, 1):
            s = 4 if j == 0 else 2
            y = b.conv_transpose2d(y, const(rk + ".weight", sd[rk + ".weight"], wdt),
                                   const(rk + ".bias", sd[rk + ".bias"]), stride=s, name=rk)
        elif j == 3:
            y = conv(y, rk, stride=2, padding=1)
        layers.append(conv(y, dh + "scratch.layer%d_rn" % (j + 1), padding=1, bias=False))

    def rcu(x, key, residual_extra=None):
        # x + conv2(relu(conv1(relu(x)))): ReLU op, conv1 with a fused ReLU, conv2 adding x
        r = b.relu(x, name=key + ".relu")
        r = conv(r, key + ".conv1", padding=1, activation="relu")
        return conv(r, key + ".conv2", padding=1, residual=x)

    def fusion(n, x0, x1, size):
        key = dh + "scratch.refinenet%d" % n
        out = x0
        if x1 is not None:
            out = b.add(x0, rcu(x1, key + ".resConfUnit1"), name=key + ".add")
        out = rcu(out, key + ".resConfUnit2")
        # out_conv (1x1) before the upsample: bilinear weights sum to 1, so it commutes
        out = conv(out, key + ".out_conv")
        return b.resize_bilinear(out, size=size, align_corners=True, name=key + ".resize")

    sizes = [(4 * h, 4 * w), (2 * h, 2 * w), (h, w)]
    p = fusion(4, layers[3], None, sizes[2])
    p = fusion(3, p, layers[2], sizes[1])
    p = fusion(2, p, layers[1], sizes[0])
    p = fusion(1, p, layers[0], (8 * h, 8 * w))
    oc1 = dh + "scratch.output_conv1"
    y = conv(p, oc1, padding=1)
    y = b.resize_bilinear(y, size=(H, W), align_corners=True, name=oc1 + ".resize")
    y = conv(y, dh + "scratch.output_conv2.0", padding=1, activation="relu")
    # the last ReLU also stands for DepthAnythingV2.forward's (idempotent) one
    y = conv(y, dh + "scratch.output_conv2.2", activation="relu")
    depth = b.reshape(y, [0, H, W], name="depth.squeeze")

    # -- BN seg head (model-spec §1.5), BN folded into conv_seg and split per branch --
    c = model.n_classes
    gamma, beta = sd["seg_head.bn.weight"], sd["seg_head.bn.bias"]
    mean, var = sd["seg_head.bn.running_mean"], sd["seg_head.bn.running_var"]
    inv = gamma / np.sqrt(var + model.seg_head.bn.eps)
    wseg = sd["seg_head.conv_seg.weight"].reshape(c, 4 * d)
    wfold = wseg * inv[None, :]
    bfold = sd["seg_head.conv_seg.bias"] + wseg @ (beta - mean * inv)
    factors = PYRAMID_FACTORS if model.seg_head_kind == "pyramid" else (1, 1, 1, 1)
    grid = [(int(math.floor(h * f)), int(math.floor(w * f))) for f in factors]
    logits = None
    for j, t in enumerate(model.seg_taps):
        key = "seg_head.branch%d" % j
        # each branch's 1x1 conv at native resolution, on the tokens; b' rides on branch 0
        # (every resampling below keeps constants)
        y = b.linear(patches[t], const(key + ".weight", wfold[:, j * d:(j + 1) * d], wdt),
                     const(key + ".bias", bfold) if j == 0 else None, name=key)
        y = tokens_to_map(y, c, key)
        f = factors[j]
        if f > 1:
            y = b.resize_bilinear(y, scale=f, align_corners=False, name=key + ".scale")
        elif f < 1:
            y = b.adaptive_avg_pool2d(y, grid[j], name=key + ".area")
        if grid[j] != grid[0]:
            y = b.resize_bilinear(y, size=grid[0], align_corners=False, name=key + ".resize")
        logits = y if logits is None else b.add(logits, y, name=key + ".sum")
    if grid[0] != (H, W):
        logits = b.resize_bilinear(logits, size=(H, W), align_corners=False,
                                   name="seg_logits.resize")
    b.output(depth, "depth")
    b.output(logits, "seg_logits")
    if labels:
        b.output(b.argmax(logits, axis=1, name="seg_labels.argmax"), "seg_labels")
    b.flush_outputs()            # the routing statistics, after the model's own outputs

    from . import __version__
    b.metadata("producer", "vkg.depth_seg %s" % __version__)
    b.metadata("exporter_version", __version__)
    b.metadata("model_name", "depth_seg_%s" % model.arch)
    b.metadata("description", "DINOv2 %s (D %d, %d blocks, %d registers) with MoE-LoRA FFNs "
               "(E %d, top-%d, rank %d, alpha %g), DPT depth head (taps %s, features %d, out "
               "channels %s), BN seg head %s (taps %s, %d classes); image %dx%d, normalized "
               "RGB (mean 0.485 0.456 0.406, std 0.229 0.224 0.225); outputs depth%s%s%s; "
               "weights %s; source %s"
               % (model.arch, d, bb.depth, bb.n_registers, model.n_experts, model.top_k,
                  model.lora_rank, model.lora_alpha, model.depth_taps, model.features,
                  list(model.out_channels), model.seg_head_kind, model.seg_taps, c, H, W,
                  ", seg_logits", ", seg_labels" if labels else "",
                  ", blocks.<i>.mlp.<routing stats>" if routing_stats else "",
                  "f16 matrices and kernels" if fp16 else "f32",
                  getattr(model, "source", "module")))
    if class_names:
        b.metadata("seg.classes", ",".join(class_names))
    if metadata:
        for k, v in metadata.items():
            b.metadata(k, v)
    if path is not None:
        b.save(path)
    return b


# --------------------------------------------------------------------------------------------
# python3 -m vkg depth-seg (the parser lives in vkg/__main__.py)


def run_export(args):
    prog = "vkg depth-seg"
    config = dict(classes=args.classes, experts=args.experts, top_k=args.top_k,
                  lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, seg_head=args.seg_head)
    if (args.checkpoint is None) == (args.random_init is None):
        print("%s: give CHECKPOINT or --random-init SEED (one of them)" % prog, file=sys.stderr)
        return 1
    try:
        model = build_model(args.arch, args.checkpoint, seed=args.random_init,
                            strict=not args.partial, **config)
    except (OSError, ValueError, RuntimeError) as e:
        print("%s: %s" % (prog, e), file=sys.stderr)
        return 1
    if model.missing_keys:
        m = model.missing_keys
        print("%s: %d keys not in the checkpoint keep their initial values (--partial): %s"
              % (prog, len(m), ", ".join(m[:8]) + (", ..." if len(m) > 8 else "")),
              file=sys.stderr)
    names = args.class_names.split(",") if args.class_names else None
    b = export_depth_seg(model, args.image_size, fp16=args.fp16,
                         routing_stats=args.routing_stats, labels=args.labels,
                         variant=args.variant, class_names=names, path=args.output)
    print("wrote %s: depth-seg %s, %d blocks, image %dx%d, %d classes, %s seg head, %d outputs, "
          "%d nodes, %d parameters" % (args.output, model.arch, model.pretrained.depth,
                                       args.image_size[0], args.image_size[1], model.n_classes,
                                       model.seg_head_kind, len(b.outputs), len(b.nodes),
                                       b.parameter_count()))
    return 0
