"""DeepSeek-MoE ViT encoder (model-spec §2, seed family 2): a PyTorch reference module, upcycling
a dense ViT checkpoint into fine-grained experts, and a direct .vkg exporter.

Written from shared/docs/model-spec.md §1.2 (the ViT pieces) and §2.1-2.4 (the FFN).

- `DeepSeekViT(dim, depth, heads, patch, ...)` (also `vkg.models.DeepSeekViT`): a pre-norm ViT
  (patch-embedding conv, cls token, learned positional table resampled exactly as DINOv2's
  `interpolate_pos_encoding` (vkg.dinov2's code is reused), optional LayerScale, final LayerNorm,
  eps 1e-6 everywhere, exact erf GELU) whose FFN in every block is `vkg.moe.DeepSeekMoEFFN`
  (ffn="moe") or a dense FFN (ffn="dense": `mlp.fc1`, `mlp.fc2`; SwiGLU: `mlp.fc1` gate,
  `mlp.fc3` up, `mlp.fc2` down, no biases). state_dict names: `cls_token` (1, 1, D), `pos_embed`
  (1, 1 + M*M, D), `patch_embed.proj.{weight,bias}`, `blocks.i.norm1.*`, `blocks.i.attn.qkv.*`,
  `blocks.i.attn.proj.*`, `blocks.i.ls1.gamma` (LayerScale only), `blocks.i.norm2.*`,
  `blocks.i.mlp.router.weight`, `blocks.i.mlp.shared.fc1|fc2.weight|bias` (SwiGLU:
  `shared.fc3.weight`, no biases), `blocks.i.mlp.experts.w1` (E-S, w, D), `.b1` (E-S, w), `.w2`
  (E-S, D, w), `.w3` (SwiGLU), `blocks.i.ls2.gamma`, `norm.*`.
- `upcycle_state_dict(src, experts, shared, ...)`: slices every dense FFN of a ViT state_dict
  (timm / DINOv2 official / Hugging Face Dinov2 names, DINOv2's packed SwiGLU `mlp.w12`/`mlp.w3`,
  or this module's dense form) with `vkg.moe.upcycle_ffn` (§2.4); other tensors pass through.
  `python3 -m vkg upcycle` writes the result as safetensors.
- `load_checkpoint(model, src)`: MoE or (upcycled on the fly) dense checkpoints; a mismatch
  raises CheckpointError naming every missing, unexpected and mis-shaped key.
- `export_deepseek_vit(model, (H, W), taps, fp16, ...)`: the graph, built with vkg.Builder as
  vkg.dinov2 does: input `image` (batch, 3, H, W); output `output` = the final-normed tokens
  (batch, 1 + h*w, D) and `block<t>` for each 1-based tap t. The MoE FFN goes through
  vkg.moe.convert_deepseek_ffn with the block's residual (and LayerScale) folded in.
  bypass=True replaces every router by graph inputs `ids<c>` (batch, T, k_c) i32 and
  `gates<c>` (batch, T, k_c) f32, c = 0, 1, ... (chunks of at most 64 routed experts): with
  `all_on_inputs(...)` every expert is on at weight 1 (the upcycling identity).
"""

import math
import os
import sys
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn

from . import dinov2
from .builder import Builder
from .errors import ExportError
from .moe import DeepSeekMoEFFN, SharedMLP, convert_deepseek_ffn, upcycle_ffn

LN_EPS = 1e-6
FFN_KINDS = ("moe", "dense")
ROUTE_CHUNK = 64            # moe_experts takes at most 64 slots per token (docs/graph-format.md)
_IGNORED_KEYS = ("mask_token", "head.weight", "head.bias")     # training-only / classifier


class CheckpointError(dinov2.CheckpointError, ValueError):
    """A checkpoint that does not fit, or cannot be upcycled (names the block and the tensor)."""


# --------------------------------------------------------------------------------------------
# the reference module


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)          # (B, h*w, D), row-major patches


class Block(nn.Module):
    """x + ls1(attn(norm1 x)); x + ls2(mlp(norm2 x)) (ls1, ls2 absent without LayerScale)."""

    def __init__(self, dim, heads, mlp, layerscale):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = dinov2.Attention(dim, heads)
        if layerscale:
            self.ls1 = dinov2.LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = mlp
        if layerscale:
            self.ls2 = dinov2.LayerScale(dim)
        self.layerscale = bool(layerscale)

    def forward(self, x, route=None):
        a = self.attn(self.norm1(x))
        x = x + (self.ls1(a) if self.layerscale else a)
        f = self.norm2(x)
        if route is not None and isinstance(self.mlp, DeepSeekMoEFFN) and self.mlp.n_routed:
            f = self.mlp.forward_routed(f, *route)
        else:
            f = self.mlp(f)
        return x + (self.ls2(f) if self.layerscale else f)


class DeepSeekViT(nn.Module):
    """Pre-norm ViT whose FFN is DeepSeek-MoE (model-spec §2.1, §2.3), or its dense form.

    dim D, depth L, heads, patch P; pos_grid M (the positional table has 1 + M*M rows; default
    img_size // patch, img_size 224: ViT-H/14's 16 x 16); experts E, shared S, top_m M,
    width w (default hidden // E), hidden (the dense FFN width, default 4 D; E * w for MoE),
    score "softmax"/"sigmoid", router_cols "all"/"routed", renorm, scale, activation
    "gelu" (biases) / "swiglu" (no biases), layerscale (ls1/ls2 gamma), ffn "moe"/"dense".
    interpolate_offset / interpolate_antialias: DINOv2's pos-embed resampling convention (0.1 /
    False: the official R=0 models; 0 / True: the _reg models); the table is used as is when
    the patch grid is M x M."""

    def __init__(self, dim=1280, depth=32, heads=16, patch=14, img_size=224, pos_grid=None,
                 experts=128, shared=4, top_m=4, width=None, hidden=None, score="softmax",
                 router_cols="all", renorm=False, scale=1.0, activation="gelu",
                 layerscale=False, ffn="moe", interpolate_offset=0.1,
                 interpolate_antialias=False):
        super().__init__()
        if ffn not in FFN_KINDS:
            raise ValueError("DeepSeekViT: ffn %r: expected 'moe' or 'dense'" % (ffn,))
        if activation not in ("gelu", "swiglu"):
            raise ValueError("DeepSeekViT: activation %r: expected 'gelu' or 'swiglu'"
                             % (activation,))
        if dim < 1 or depth < 1 or heads < 1 or dim % heads:
            raise ValueError("DeepSeekViT: dim %d, depth %d, heads %d: need depth >= 1 and heads "
                             "dividing dim" % (dim, depth, heads))
        if patch < 1:
            raise ValueError("DeepSeekViT: patch %d < 1" % patch)
        if pos_grid is None:
            pos_grid = max(1, img_size // patch)
        if hidden is None:
            hidden = experts * width if (width and ffn == "moe") else 4 * dim
        if ffn == "moe":
            if experts < 1 or hidden % experts:
                raise ValueError("DeepSeekViT: %d experts do not divide the FFN width %d"
                                 % (experts, hidden))
            if width is not None and width * experts != hidden:
                raise ValueError("DeepSeekViT: width %d x %d experts != hidden %d"
                                 % (width, experts, hidden))
            width = hidden // experts
        self.dim, self.depth, self.heads, self.patch = dim, depth, heads, patch
        self.pos_grid, self.hidden, self.ffn = pos_grid, hidden, ffn
        self.n_experts, self.n_shared, self.top_m, self.width = experts, shared, top_m, width
        self.score, self.router_cols, self.renorm = score, router_cols, bool(renorm)
        self.scale, self.activation, self.layerscale = float(scale), activation, bool(layerscale)
        self.interpolate_offset = float(interpolate_offset)
        self.interpolate_antialias = bool(interpolate_antialias)
        self.patch_embed = PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, self._make_ffn(), layerscale)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def _make_ffn(self):
        if self.ffn == "dense":
            if self.activation == "swiglu":
                return SharedMLP(self.dim, self.hidden, "swiglu")
            return dinov2.Mlp(self.dim, self.hidden)
        return DeepSeekMoEFFN(self.dim, self.n_experts, self.width, self.n_shared, self.top_m,
                              score=self.score, router_cols=self.router_cols,
                              renorm=self.renorm, scale=self.scale, act=self.activation)

    def config(self):
        """The constructor arguments (for metadata, dense twins and copies)."""
        return dict(dim=self.dim, depth=self.depth, heads=self.heads, patch=self.patch,
                    pos_grid=self.pos_grid, experts=self.n_experts, shared=self.n_shared,
                    top_m=self.top_m, hidden=self.hidden, score=self.score,
                    router_cols=self.router_cols, renorm=self.renorm, scale=self.scale,
                    activation=self.activation, layerscale=self.layerscale, ffn=self.ffn,
                    interpolate_offset=self.interpolate_offset,
                    interpolate_antialias=self.interpolate_antialias)

    # DINOv2's resampling, reused as is (it reads pos_embed, interpolate_offset and
    # interpolate_antialias): (1, 1 + h*w, D), bicubic in float32.
    interpolate_pos_encoding = dinov2.DinoV2.interpolate_pos_encoding

    def prepare_tokens(self, x):
        b, _, hh, ww = x.shape
        if hh % self.patch or ww % self.patch:
            raise ValueError("image size %dx%d is not a multiple of the patch %d"
                             % (hh, ww, self.patch))
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1)
        return t + self.interpolate_pos_encoding(hh // self.patch, ww // self.patch)

    def forward_features(self, x, taps=(), bypass=None):
        """(final-normed tokens (B, 1 + h*w, D), {t: raw output of block t} for 1-based taps).
        bypass: None (the routers), "all" (every routed expert on at weight 1) or (ids, gates)
        of shape (k,) or broadcastable to (B, T, k): the routers are skipped."""
        taps = [int(t) for t in taps]
        for t in taps:
            if not 1 <= t <= self.depth:
                raise ValueError("tap %d is outside blocks 1..%d" % (t, self.depth))
        x = self.prepare_tokens(x)
        route = None
        if bypass is not None and self.ffn == "moe" and self.n_experts > self.n_shared:
            if isinstance(bypass, str):
                if bypass != "all":
                    raise ValueError("bypass %r: expected 'all' or (ids, gates)" % (bypass,))
                n = self.n_experts - self.n_shared
                ids, gates = torch.arange(n), torch.ones(n, dtype=x.dtype)
            else:
                ids, gates = (torch.as_tensor(v) for v in bypass)
            k = ids.shape[-1]
            lead = tuple(x.shape[:-1])
            route = (ids.long().expand(lead + (k,)), gates.to(x.dtype).expand(lead + (k,)))
        outs = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x, route)
            if i + 1 in taps:
                outs[i + 1] = x
        return self.norm(x), outs

    def forward(self, x):
        return self.forward_features(x)[0]


def vit_h_config(**overrides):
    """ViT-H/14 at 224 (model-spec §2.1, §2.3 defaults): D 1280, 32 blocks, 16 heads of 80,
    E 128, w 40, S 4, M 4."""
    cfg = dict(dim=1280, depth=32, heads=16, patch=14, img_size=224, experts=128, shared=4,
               top_m=4, hidden=5120)
    cfg.update(overrides)
    return cfg


def init_random(model, seed=0, router_std=None):
    """Deterministic random weights with O(1) activations (as vkg.dinov2.init_random: norms,
    biases and LayerScale non-trivial): linear weights N(0, 1/fan_in); routed experts w1/w3
    N(0, 1/D), w2 N(0, 1/hidden) (the dense FFN's fan-in, as an upcycled expert has); router
    N(0, router_std^2), default 1/sqrt(D) (O(1) logits, routing far from ties)."""
    g = torch.Generator().manual_seed(int(seed))

    def randn(shape, std=1.0, mean=0.0):
        return torch.randn(tuple(shape), generator=g) * std + mean

    d = model.dim
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith(".gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.2)
            elif name.endswith("router.weight"):
                p.copy_(randn(p.shape, d ** -0.5 if router_std is None else router_std))
            elif leaf in ("w1", "w3"):
                p.copy_(randn(p.shape, d ** -0.5))
            elif leaf == "w2":
                p.copy_(randn(p.shape, model.hidden ** -0.5))
            elif "norm" in name and leaf == "weight":
                p.copy_(randn(p.shape, 0.1, 1.0))
            elif leaf in ("bias", "b1"):
                p.copy_(randn(p.shape, 0.1))
            elif leaf == "weight":
                fan_in = int(np.prod(p.shape[1:]))
                if ".fc2." in name:
                    fan_in = model.hidden          # shared fc2 is a slice of the dense fc2
                p.copy_(randn(p.shape, fan_in ** -0.5))
            else:                                    # cls_token, pos_embed
                p.copy_(randn(p.shape, 0.5))
    return model


# --------------------------------------------------------------------------------------------
# checkpoints and upcycling


def read_state_dict(src):
    """A flat official-name dict (name -> torch.Tensor) from a path (.safetensors, torch
    .pt/.pth/.bin) or a dict: wrappers and prefixes removed, timm's and Hugging Face Dinov2's
    names mapped to the official ones (vkg.dinov2's readers)."""
    sd = dinov2.read_checkpoint(src)
    sd, _ = dinov2.to_official(sd)
    return {k: (v if torch.is_tensor(v) else torch.as_tensor(v)) for k, v in sd.items()}


def _block_ids(sd):
    ids = set()
    for k in sd:
        parts = k.split(".")
        if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
            ids.add(int(parts[1]))
    return sorted(ids)


def dense_ffn(sd, i):
    """The dense FFN of block i: dict(fc1_weight, fc1_bias, fc2_weight, fc2_bias, fc3_weight,
    keys) or None when the block has none. Accepts mlp.fc1/fc2 (GELU, biases), mlp.fc1/fc3/fc2
    (SwiGLU, no biases) and DINOv2's packed SwiGLU mlp.w12 (2H, D) = [gate; up] / mlp.w3 (down),
    whose biases must be zero (DeepSeekMoEFFN's SwiGLU has none)."""
    p = "blocks.%d.mlp." % i
    get = sd.get
    if get(p + "w12.weight") is not None:
        w12, w3 = sd[p + "w12.weight"], get(p + "w3.weight")
        if w3 is None:
            raise CheckpointError("block %d: %sw12.weight without %sw3.weight" % (i, p, p))
        for key in (p + "w12.bias", p + "w3.bias"):
            b = get(key)
            if b is not None and bool(torch.any(b != 0)):
                raise CheckpointError(
                    "block %d: %s is not zero; a SwiGLU DeepSeekMoEFFN has no biases, so this "
                    "FFN cannot be upcycled exactly" % (i, key))
        if w12.dim() != 2 or w12.shape[0] % 2:
            raise CheckpointError("block %d: %sw12.weight is %s, expected (2H, D)"
                                  % (i, p, tuple(w12.shape)))
        h = w12.shape[0] // 2
        keys = [k for k in (p + "w12.weight", p + "w12.bias", p + "w3.weight", p + "w3.bias")
                if k in sd]
        return dict(fc1_weight=w12[:h], fc1_bias=None, fc2_weight=w3, fc2_bias=None,
                    fc3_weight=w12[h:], keys=keys, names=(p + "w12.weight", p + "w3.weight"))
    if get(p + "fc1.weight") is None:
        return None
    if get(p + "fc2.weight") is None:
        raise CheckpointError("block %d: %sfc1.weight without %sfc2.weight" % (i, p, p))
    keys = [p + s for s in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight")
            if p + s in sd]
    return dict(fc1_weight=sd[p + "fc1.weight"], fc1_bias=get(p + "fc1.bias"),
                fc2_weight=sd[p + "fc2.weight"], fc2_bias=get(p + "fc2.bias"),
                fc3_weight=get(p + "fc3.weight"), keys=keys,
                names=(p + "fc1.weight", p + "fc2.weight"))


def _permutation_for(permutation, i, depth, h, source, tensor):
    """Block i's row of a permutation given as (H,) (every block) or (L, H); tensor: the fc1
    weight's name (for messages)."""
    if permutation is None:
        return None
    perm = np.asarray(permutation.detach().cpu().numpy() if torch.is_tensor(permutation)
                      else permutation)
    what = "permutation %s" % source
    if perm.ndim == 2:
        if perm.shape[0] != depth:
            raise CheckpointError("%s has %d rows for %d blocks (give (H,) or (blocks, H))"
                                  % (what, perm.shape[0], depth))
        perm, what = perm[i], "%s row %d" % (what, i)
    elif perm.ndim != 1:
        raise CheckpointError("block %d (%s): %s is %d-dimensional; give (H,) or (blocks, H)"
                              % (i, tensor, what, perm.ndim))
    if perm.dtype.kind not in "iu":
        raise CheckpointError("block %d (%s): %s has dtype %s; a permutation holds integers"
                              % (i, tensor, what, perm.dtype))
    if perm.shape != (h,) or not np.array_equal(np.sort(perm), np.arange(h)):
        raise CheckpointError("block %d (%s): %s is not a permutation of 0..%d (the %d hidden "
                              "neurons)" % (i, tensor, what, h - 1, h))
    return torch.from_numpy(perm.astype(np.int64))


def upcycle_state_dict(src, experts, shared, permutation=None, router_init="zeros", seed=0,
                       router_std=None, router_cols="all", permutation_source="given"):
    """Upcycles every dense FFN of a ViT state_dict (path or dict; names as read_state_dict)
    into DeepSeekMoEFFN tensors `blocks.i.mlp.{router.weight, shared.*, experts.*}` with
    vkg.moe.upcycle_ffn (model-spec §2.4): E = experts of width H / E, the first S = shared in
    the shared MLP (fc2's bias there, once). permutation: None, (H,) for every block or
    (blocks, H). router_init "zeros" (uniform scores; ties go to the lowest routed experts) or
    "normal" (N(0, router_std^2), default 1/sqrt(D), torch.Generator seeded with seed, drawn
    block by block). Every other tensor passes through unchanged. Raises CheckpointError naming
    the block and the tensor. Returns an OrderedDict (official names)."""
    sd = read_state_dict(src)
    if router_init not in ("zeros", "normal"):
        raise CheckpointError("router_init %r: expected 'zeros' or 'normal'" % (router_init,))
    for what, v in (("experts", experts), ("shared", shared)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise CheckpointError("%s must be an int, got %r" % (what, v))
    blocks = _block_ids(sd)
    ffns = [(i, dense_ffn(sd, i)) for i in blocks]
    ffns = [(i, f) for i, f in ffns if f is not None]
    if not ffns:
        moe = [k for k in sd if ".mlp.router." in k or ".mlp.experts." in k]
        raise CheckpointError("no dense FFN (blocks.i.mlp.fc1/fc2 or mlp.w12/w3) in the "
                              "checkpoint%s" % (" (it is already a MoE checkpoint: %s ...)"
                                                % moe[0] if moe else ""))
    depth = max(blocks) + 1
    g = torch.Generator().manual_seed(int(seed))
    out = OrderedDict()
    done = set()
    for i, f in ffns:
        w1, w2 = f["fc1_weight"], f["fc2_weight"]
        n1, n2 = f["names"]
        if w1.dim() != 2 or w2.dim() != 2:
            raise CheckpointError("block %d: %s %s / %s %s are not matrices"
                                  % (i, n1, tuple(w1.shape), n2, tuple(w2.shape)))
        h, d = w1.shape
        if experts < 1 or h % experts:
            raise CheckpointError("block %d: %s has a hidden width H=%d that %d experts do not "
                                  "divide" % (i, n1, h, experts))
        if not 0 <= shared <= experts:
            raise CheckpointError("block %d: %s: shared=%d outside 0..%d (experts)"
                                  % (i, n1, shared, experts))
        perm = _permutation_for(permutation, i, depth, h, permutation_source, n1)
        cols = experts if router_cols == "all" else experts - shared
        rw = None
        if experts > shared:
            rw = torch.zeros(cols, d, dtype=w1.dtype)
            if router_init == "normal":
                std = d ** -0.5 if router_std is None else float(router_std)
                rw = (torch.randn(cols, d, generator=g) * std).to(w1.dtype)
        try:
            part = upcycle_ffn(f["fc1_weight"], f["fc1_bias"], w2, f["fc2_bias"], experts, shared,
                               perm, fc3_weight=f["fc3_weight"], router_cols=router_cols,
                               router_weight=rw)
        except ValueError as e:
            raise CheckpointError("block %d (%s): %s" % (i, n1, e)) from None
        for k, v in part.items():
            out["blocks.%d.mlp.%s" % (i, k)] = v
        done.update(f["keys"])
    for k, v in sd.items():
        if k not in done:
            out[k] = v
    return OrderedDict(sorted(out.items(), key=lambda kv: _sort_key(kv[0])))


def _sort_key(k):
    parts = k.split(".")
    if len(parts) > 1 and parts[0] == "blocks" and parts[1].isdigit():
        return (1, int(parts[1]), k)
    return (0 if k in ("cls_token", "pos_embed") or k.startswith("patch_embed") else 2, 0, k)


def save_state_dict(sd, path, metadata=None):
    """Writes name -> tensor as safetensors (vkg.safetensors); float dtypes other than
    f16/f32/f64 (bf16) are stored as f32."""
    from .safetensors import save_safetensors
    arrays = {}
    for k, v in sd.items():
        t = v.detach().cpu() if torch.is_tensor(v) else torch.as_tensor(np.asarray(v))
        if t.is_floating_point() and t.dtype not in (torch.float16, torch.float32, torch.float64):
            t = t.float()
        arrays[k] = t.numpy()
    save_safetensors(arrays, path, metadata=metadata)


def _infer_config(sd):
    """What a state dict says about the model: pos_grid, layerscale, activation, the expert
    width or the dense FFN width (keys absent where it says nothing)."""
    cfg = {}
    pe = sd.get("pos_embed")
    if pe is not None and pe.dim() == 3:
        n = pe.shape[1]
        for rows in (n - 1, n):
            m = int(round(math.sqrt(max(rows, 0))))
            if m * m == rows and rows:
                cfg["pos_grid"] = m
                break
    cfg["layerscale"] = any(k.endswith(".ls1.gamma") or k.endswith(".ls2.gamma") for k in sd)
    for k, v in sd.items():
        if k.endswith(".mlp.experts.w1") and v.dim() == 3:
            cfg["width"] = int(v.shape[1])
            break
        if (k.endswith(".mlp.fc1.weight") or k.endswith(".mlp.w12.weight")) and v.dim() == 2:
            cfg["hidden"] = int(v.shape[0]) // (2 if k.endswith("w12.weight") else 1)
            break
    if any(k.endswith(".mlp.experts.w3") or k.endswith(".mlp.shared.fc3.weight")
           or k.endswith(".mlp.fc3.weight") or k.endswith(".mlp.w12.weight") for k in sd):
        cfg["activation"] = "swiglu"
    elif any(".mlp." in k for k in sd):
        cfg["activation"] = "gelu"
    return cfg


def _router_cols(sd, experts, shared):
    for k, v in sd.items():
        if k.endswith(".mlp.router.weight"):
            if v.shape[0] == experts:
                return "all"
            if v.shape[0] == experts - shared:
                return "routed"
    return None


def load_checkpoint(model, src, upcycle=True):
    """Loads a checkpoint (path or dict, names as read_state_dict) into model. A MoE model
    given a dense checkpoint upcycles it first (zero routers: for the identity check; a trained
    router comes from the checkpoint), unless upcycle=False. mask_token and a classifier head
    are ignored; a positional table without a cls row (timm's no_embed_class) gets a zero one.
    Returns a short description of what was loaded; raises CheckpointError listing every
    missing, unexpected and mis-shaped key."""
    sd = dict(read_state_dict(src))
    for k in _IGNORED_KEYS:
        sd.pop(k, None)
    what = "MoE" if any(".mlp.experts." in k or ".mlp.router." in k or ".mlp.shared." in k
                        for k in sd) else "dense"
    if model.ffn == "moe" and what == "dense" and any(dense_ffn(sd, i) is not None
                                                      for i in _block_ids(sd)):
        if not upcycle:
            raise CheckpointError("the checkpoint has dense FFNs; upcycle it first "
                                  "(python3 -m vkg upcycle)")
        sd = dict(upcycle_state_dict(sd, model.n_experts, model.n_shared,
                                     router_cols=model.router_cols))
        what = "dense, upcycled on load with zero routers"
    pe = sd.get("pos_embed")
    if pe is not None and pe.dim() == 3 and pe.shape[1] == model.pos_grid ** 2:
        sd["pos_embed"] = torch.cat([torch.zeros_like(pe[:, :1]), pe], dim=1)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    shapes = sorted("%s: checkpoint %s, model %s" % (k, tuple(sd[k].shape), tuple(own[k].shape))
                    for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unexpected or shapes:
        msg = ["checkpoint (%s) does not fit DeepSeekViT (%s FFN, D %d, %d blocks, E %d, S %d, "
               "%s, router columns %s, LayerScale %s):"
               % (what, model.ffn, model.dim, model.depth, model.n_experts, model.n_shared,
                  model.activation, model.router_cols, "on" if model.layerscale else "off")]
        if missing:
            msg.append("missing keys (%d): %s" % (len(missing), ", ".join(missing[:40])
                                                  + (" ..." if len(missing) > 40 else "")))
        if unexpected:
            msg.append("unexpected keys (%d): %s" % (len(unexpected), ", ".join(
                (k[3:] if k.startswith("hf:") else k) for k in unexpected[:40])
                + (" ..." if len(unexpected) > 40 else "")))
        if shapes:
            msg.append("shape mismatches (%d): %s" % (len(shapes), "; ".join(shapes[:40])))
        raise CheckpointError("\n  ".join(msg))
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.to(own[k].dtype))
    return what


def build_model(checkpoint=None, **config):
    """A DeepSeekViT in eval mode. checkpoint None or "random:SEED": random weights
    (init_random); a path or dict: pos_grid, LayerScale, activation and router columns are
    taken from the checkpoint where config leaves them None, then load_checkpoint."""
    config = {k: v for k, v in config.items() if v is not None}
    if checkpoint is None or (isinstance(checkpoint, str) and checkpoint.startswith("random:")):
        seed = 0 if checkpoint is None else checkpoint[len("random:"):]
        try:
            seed = int(seed)
        except ValueError:
            raise ValueError("random:SEED needs an integer seed, got %r" % checkpoint) from None
        model = init_random(DeepSeekViT(**config), seed)
        model.source = "random:%d" % seed
        return model.eval()
    sd = read_state_dict(checkpoint)
    inferred = _infer_config(sd)
    rc = _router_cols(sd, config.get("experts", 128), config.get("shared", 4))
    if rc:
        inferred["router_cols"] = rc
    if "hidden" in config or "width" in config:         # the caller's widths win
        inferred.pop("hidden", None)
        inferred.pop("width", None)
    for k, v in inferred.items():
        config.setdefault(k, v)
    model = DeepSeekViT(**config)
    what = load_checkpoint(model, sd)
    model.source = "%s (%s)" % (os.path.basename(checkpoint) if isinstance(checkpoint, str)
                                else "state dict", what)
    return model.eval()


def dense_twin(model):
    """A dense DeepSeekViT with model's configuration (hidden = E * w) and random weights:
    the module an upcycled checkpoint is sliced from."""
    cfg = model.config()
    cfg["ffn"] = "dense"
    return DeepSeekViT(**cfg)


def round_weights_f16(model):
    """A copy of model whose weights are rounded to f16 exactly where export_deepseek_vit(...,
    fp16=True) stores f16 (patch, qkv, proj, FFN and expert matrices; routers, norms, biases,
    LayerScale, cls and pos stay f32): the PyTorch module that graph computes."""
    import copy
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            f16 = (leaf in ("w1", "w2", "w3") or (leaf == "weight" and "norm" not in name
                                                 and not name.endswith("router.weight")))
            if f16:
                p.copy_(p.half().float())
    return m


# --------------------------------------------------------------------------------------------
# export


def route_chunks(n_routed):
    """[(first, count), ...]: the routed experts split into moe_experts nodes of <= 64 slots."""
    return [(c, min(ROUTE_CHUNK, n_routed - c)) for c in range(0, n_routed, ROUTE_CHUNK)]


def all_on_inputs(model, batch, tokens):
    """The bypass graph's inputs with every routed expert on at weight 1:
    {"ids<c>": (batch, tokens, k_c) i32, "gates<c>": ones f32}."""
    out = {}
    for c, (first, k) in enumerate(route_chunks(model.n_experts - model.n_shared)):
        out["ids%d" % c] = np.broadcast_to(np.arange(first, first + k, dtype=np.int32),
                                           (batch, tokens, k)).copy()
        out["gates%d" % c] = np.ones((batch, tokens, k), np.float32)
    return out


def export_deepseek_vit(model, image_size, taps=(), fp16=False, path=None, metadata=None,
                        stats=False, routing=False, bypass=False, norm_taps=False):
    """Builds the .vkg graph of model for image_size = (H, W): input `image` (batch, 3, H, W)
    f32; outputs `output` (batch, 1 + h*w, D), the final-normed tokens, then `block<t>` for each
    1-based tap t (raw block outputs; through the final LayerNorm when norm_taps), then with
    stats / routing each MoE block's statistics / ids and gates (`blocks.i.mlp.counts`, ...).
    fp16 stores the patch, qkv, proj, FFN and expert matrices as f16 (routers stay f32).
    bypass: no routers; graph inputs ids<c>, gates<c> (batch, T, k_c) feed every block's experts
    (all_on_inputs gives the upcycling identity). Returns the Builder (saved when path is given).
    """
    if not isinstance(model, DeepSeekViT):
        raise ExportError("export_deepseek_vit needs a vkg.deepseek_vit.DeepSeekViT, got %s"
                          % type(model).__name__)
    H, W = (int(s) for s in image_size)
    p = model.patch
    if H <= 0 or W <= 0 or H % p or W % p:
        raise ExportError("image size %dx%d: both sides must be positive multiples of the patch "
                          "%d" % (H, W, p))
    taps = [int(t) for t in taps]
    if len(set(taps)) != len(taps):
        raise ExportError("taps %s: give distinct block numbers" % taps)
    for t in taps:
        if not 1 <= t <= model.depth:
            raise ExportError("tap %d is outside blocks 1..%d" % (t, model.depth))
    if bypass and model.ffn != "moe":
        raise ExportError("bypass needs the MoE FFN (this model is dense)")
    h, w = H // p, W // p
    n_tok = 1 + h * w
    d = model.dim
    wdt = "f16" if fp16 else "f32"
    sd = model.state_dict()
    b = Builder()

    def arr(key):
        return sd[key].detach().cpu().float().numpy()

    def const(key, value=None, dtype=None):
        return b.constant(key, arr(key) if value is None else value, dtype=dtype)

    def lin(x, prefix, activation=0, scale=None, residual=None, bias=True):
        return b.linear(x, const(prefix + ".weight", dtype=wdt),
                        const(prefix + ".bias") if bias else None, activation=activation,
                        name=prefix, scale=scale, residual=residual)

    def ln(x, prefix, name=None):
        return b.layernorm(x, const(prefix + ".weight"), const(prefix + ".bias"), eps=LN_EPS,
                           name=name or prefix)

    x = b.input("image", ["batch", 3, H, W])
    x = b.patchify(x, p, name="patch_embed.patchify")
    x = b.linear(x, const("patch_embed.proj.weight", arr("patch_embed.proj.weight").reshape(d, -1),
                          dtype=wdt), const("patch_embed.proj.bias"), name="patch_embed.proj")
    x = b.insert_tokens(x, const("cls_token"), 0, name="cls_token.insert")
    with torch.no_grad():
        pe = model.interpolate_pos_encoding(h, w).detach().cpu().float().numpy()
    x = b.add(x, b.constant("pos_embed", pe), name="pos_embed.add")
    route = None
    if bypass and model.n_experts > model.n_shared:
        route = []
        for c, (_, k) in enumerate(route_chunks(model.n_experts - model.n_shared)):
            route.append((b.input("ids%d" % c, ["batch", n_tok, k], dtype="i32"),
                          b.input("gates%d" % c, ["batch", n_tok, k])))
    taps_out = {}
    for i, blk in enumerate(model.blocks):
        pre = "blocks.%d" % i
        a = ln(x, pre + ".norm1")
        a = lin(a, pre + ".attn.qkv")
        a = b.attention_packed(a, model.heads, scale=(d // model.heads) ** -0.5,
                               name=pre + ".attn")
        ls1 = const(pre + ".ls1.gamma") if model.layerscale else None
        x = lin(a, pre + ".attn.proj", scale=ls1, residual=x)
        f = ln(x, pre + ".norm2")
        gamma = arr(pre + ".ls2.gamma") if model.layerscale else None
        if model.ffn == "moe":
            # residual + gamma * (shared(f) + sum_j g_j expert_j(f)): shared fc2's epilogue
            # takes gamma and the residual, the experts' w2 rows carry gamma, moe_experts adds.
            x = convert_deepseek_ffn(b, blk.mlp, [f], pre + ".mlp", fp16=fp16, stats=stats,
                                     routing=routing, residual=x, layer_scale=gamma,
                                     route=route)
        else:
            ls2 = const(pre + ".ls2.gamma") if model.layerscale else None
            if model.activation == "swiglu":
                w13 = np.concatenate([arr(pre + ".mlp.fc1.weight"), arr(pre + ".mlp.fc3.weight")])
                f = b.linear(f, b.constant(pre + ".mlp.fc1_fc3.weight", w13, dtype=wdt),
                             name=pre + ".mlp.fc1_fc3")
                f = b.swiglu(f, name=pre + ".mlp.swiglu")
                x = lin(f, pre + ".mlp.fc2", scale=ls2, residual=x, bias=False)
            else:
                f = lin(f, pre + ".mlp.fc1", activation=2)
                x = lin(f, pre + ".mlp.fc2", scale=ls2, residual=x)
        if i + 1 in taps:
            taps_out[i + 1] = x
    nw, nb = const("norm.weight"), const("norm.bias")
    b.output(b.layernorm(x, nw, nb, eps=LN_EPS, name="norm"), "output")
    for t in taps:
        y = taps_out[t]
        if norm_taps:
            y = b.layernorm(y, nw, nb, eps=LN_EPS, name="norm.block%d" % t)
        b.output(y, "block%d" % t)
    from . import __version__
    b.metadata("producer", "vkg.deepseek_vit %s" % __version__)
    b.metadata("exporter_version", __version__)
    b.metadata("model_name", "deepseek_vit" if model.ffn == "moe" else "deepseek_vit_dense")
    if model.ffn == "moe":
        ffn = ("DeepSeek-MoE FFN E %d, w %d, S %d, M %d, %s scores over %s router columns%s%s, %s"
               % (model.n_experts, model.width, model.n_shared, model.top_m, model.score,
                  model.router_cols, ", renorm" if model.renorm else "",
                  ", scale %g" % model.scale if model.scale != 1 else "", model.activation))
        if bypass:
            ffn += "; routers bypassed (inputs ids<c>, gates<c>)"
    else:
        ffn = "dense FFN %d wide, %s" % (model.hidden, model.activation)
    b.metadata("description", "DeepSeek-MoE ViT: D %d, %d blocks, %d heads, patch %d, image %dx%d "
               "(%d tokens), %s, LayerScale %s; outputs output%s; pos-embed %dx%d resampled at "
               "export (offset %g, antialias %d); weights %s; source %s"
               % (d, model.depth, model.heads, p, H, W, n_tok, ffn,
                  "on" if model.layerscale else "off",
                  "".join(", block%d" % t for t in taps), model.pos_grid, model.pos_grid,
                  model.interpolate_offset, int(model.interpolate_antialias),
                  "f16 matrices" if fp16 else "f32", getattr(model, "source", "module")))
    if metadata:
        for k, v in metadata.items():
            b.metadata(k, v)
    if path is not None:
        b.save(path)
    return b


# --------------------------------------------------------------------------------------------
# python3 -m vkg upcycle / deepseek-vit (the parsers live in vkg/__main__.py)


def _parse_taps(s):
    if not s:
        return []
    return [int(t) for t in s.split(",") if t.strip()]


def run_upcycle(args):
    perm = None
    if args.permutation:
        try:
            perm = np.load(args.permutation)
        except (OSError, ValueError) as e:
            print("vkg upcycle: --permutation %s: %s" % (args.permutation, e), file=sys.stderr)
            return 1
    try:
        sd = upcycle_state_dict(args.checkpoint, args.experts, args.shared, perm,
                                router_init=args.router_init, seed=args.seed,
                                router_std=args.router_std, router_cols=args.router_cols,
                                permutation_source=args.permutation or "given")
    except (OSError, ValueError, RuntimeError) as e:
        print("vkg upcycle: %s" % e, file=sys.stderr)
        return 1
    n_blocks = len({k.split(".")[1] for k in sd if k.endswith(".mlp.experts.w1")
                    or k.endswith(".mlp.shared.fc1.weight")})
    meta = {"format": "pt", "producer": "vkg upcycle", "experts": args.experts,
            "shared": args.shared, "router_cols": args.router_cols,
            "router_init": args.router_init, "seed": args.seed,
            "source": os.path.basename(args.checkpoint)}
    if args.permutation:
        meta["permutation"] = os.path.basename(args.permutation)
    save_state_dict(sd, args.output, meta)
    n = sum(int(v.numel()) for v in sd.values())
    print("wrote %s: %d blocks upcycled to %d experts (%d shared), %d tensors, %d parameters"
          % (args.output, n_blocks, args.experts, args.shared, len(sd), n))
    return 0


def run_export(args):
    cfg = dict(dim=args.dim, depth=args.depth, heads=args.heads, patch=args.patch,
               experts=args.experts, shared=args.shared, top_m=args.top_k, width=args.width,
               hidden=args.hidden, score=args.score, router_cols=args.router_cols,
               renorm=args.renorm, scale=args.scale, activation=args.activation,
               ffn=args.ffn, interpolate_offset=args.interpolate_offset,
               interpolate_antialias=args.interpolate_antialias or None)
    if args.layerscale:
        cfg["layerscale"] = True
    if args.pos_grid:
        cfg["pos_grid"] = args.pos_grid
    try:
        taps = _parse_taps(args.taps)
    except ValueError:
        print("vkg deepseek-vit: --taps %r: give comma-separated integers" % args.taps,
              file=sys.stderr)
        return 1
    try:
        model = build_model(args.checkpoint, **cfg)
    except (OSError, ValueError, RuntimeError) as e:
        print("vkg deepseek-vit: %s" % e, file=sys.stderr)
        return 1
    b = export_deepseek_vit(model, args.image_size, taps, fp16=args.fp16, stats=args.stats,
                            routing=args.routing, path=args.output)
    print("wrote %s: DeepSeek ViT (%s FFN), D %d, %d blocks, image %dx%d, outputs %s, %d nodes, "
          "%d parameters" % (args.output, model.ffn, model.dim, model.depth, args.image_size[0],
                             args.image_size[1], ",".join(["output"] + ["block%d" % t
                                                                         for t in taps]),
                             len(b.nodes), b.parameter_count()))
    return 0


def router_margin(model, x):
    """Smallest gap between the M-th and (M+1)-th selectable router logit over every block and
    token (float64, from each block's actual FFN input)."""
    inputs = []
    hooks = [blk.mlp.register_forward_pre_hook(lambda m, a: inputs.append((m, a[0])))
             for blk in model.blocks if isinstance(blk.mlp, DeepSeekMoEFFN)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    margin = float("inf")
    for m, f in inputs:
        if not m.n_routed or m.top_m >= m.n_routed:
            continue
        z = torch.nn.functional.linear(f.reshape(-1, m.dim).double(), m.router.weight.double())[:, m.first:]
        s = torch.sort(z, dim=-1, descending=True).values
        margin = min(margin, float((s[:, m.top_m - 1] - s[:, m.top_m]).min()))
    return margin
