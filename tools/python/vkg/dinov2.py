"""DINOv2 ViT backbones: a PyTorch reference module, checkpoint import, and a direct .vkg exporter.

Written from shared/docs/model-spec.md §1.2 (not copied from any repository).

- `DinoV2(arch, depth=None)`: archs vits14, vitb14, vitl14, vitg14 and their `_reg` variants (4
  register tokens). Parameter names follow the official facebookresearch layout (patch_embed.proj,
  cls_token, pos_embed, register_tokens, mask_token,
  blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}, norm). vitg14's
  FFN is the official SwiGLU (`ffn_layer="swiglufused"`): hidden = (int(4 D * 2/3) + 7) // 8 * 8
  (4096 for D = 1536), blocks.N.mlp.w12 (2 hidden, D) and blocks.N.mlp.w3 (D, hidden),
  `x1, x2 = w12(x).chunk(2, -1); w3(silu(x1) * x2)`; exported as linear -> swiglu -> linear.
  `forward(image, taps=(3, 6, 9, 12), norm=False)` returns the listed block outputs (1-based),
  all tokens (cls, registers, patches), optionally through the final LayerNorm.
- Positional-embedding interpolation exactly as the official `interpolate_pos_encoding`: bicubic
  F.interpolate in float32, `scale_factor=((h+0.1)/M, (w+0.1)/M)`, antialias False for R=0 models;
  `size=(h, w)`, antialias True for `_reg` models; the table is used as is when h == w == M.
- `load_state_dict_any(model, src)`: official (.pth, possibly wrapped/prefixed), timm
  (`vit_*_patch14_dinov2`, `reg_token`, cls-folded pos-embed for reg models) and Hugging Face
  `Dinov2Model` (.safetensors or .bin) layouts (SwiGLU: timm's SwiGLUPacked mlp.fc1 / mlp.fc2
  and HF's Dinov2SwiGLUFFN mlp.weights_in / mlp.weights_out map to mlp.w12 / mlp.w3), auto-detected; a mismatch raises CheckpointError
  listing missing / unexpected / mis-shaped keys.
- `export_dinov2(model, (H, W), taps, norm, fp16)` builds the graph with vkg.Builder;
  `build_backbone(b, model, ...)` is its backbone part (input, blocks, tap tensors; an `ffn`
  callback replaces each block's FFN), shared with vkg.depth_seg.
- `DinoV2(..., config=dict)` takes an arch_config()-style dict for widths no official arch has.
"""

import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .builder import Builder
from .errors import ExportError

PATCH = 14
IMG_SIZE = 518            # the official hub models' img_size: a 37 x 37 positional table
LN_EPS = 1e-6

# arch -> (embed dim, depth, heads, mlp ratio, ffn)
ARCHS = {
    "vits14": (384, 12, 6, 4.0, "mlp"),
    "vitb14": (768, 12, 12, 4.0, "mlp"),
    "vitl14": (1024, 24, 16, 4.0, "mlp"),
    "vitg14": (1536, 40, 24, 4.0, "swiglu"),
}
ARCH_NAMES = sorted(list(ARCHS) + [a + "_reg" for a in ARCHS])
N_REGISTERS = 4


class CheckpointError(ExportError):
    pass


def arch_config(arch):
    """dict(embed_dim, depth, heads, mlp_ratio, ffn, registers, interpolate_offset,
    interpolate_antialias) of an arch name such as "vits14" or "vits14_reg"."""
    base, reg = (arch[:-4], True) if arch.endswith("_reg") else (arch, False)
    if base not in ARCHS:
        raise ValueError("unknown DINOv2 arch %r (known: %s)" % (arch, ", ".join(ARCH_NAMES)))
    d, depth, heads, ratio, ffn = ARCHS[base]
    return dict(embed_dim=d, depth=depth, heads=heads, mlp_ratio=ratio, ffn=ffn,
                registers=N_REGISTERS if reg else 0,
                interpolate_offset=0.0 if reg else 0.1, interpolate_antialias=reg)


# --------------------------------------------------------------------------------------------
# the reference module


class PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)          # (B, h*w, D), row-major patches


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]            # (B, heads, N, d)
        a = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()                                     # exact erf GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden(dim, mlp_ratio=4.0):
    """The official SwiGLUFFNFused hidden width: (int(int(dim * ratio) * 2/3) + 7) // 8 * 8."""
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """The official DINOv2 SwiGLU FFN: w12 packs (gate, value); w3(silu(x1) * x2)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class LayerScale(nn.Module):
    def __init__(self, dim, init_values=1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, heads, hidden, ffn="mlp"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = SwiGLUFFN(dim, hidden) if ffn == "swiglu" else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    """DINOv2 ViT backbone (inference). depth overrides the arch's block count (for tests)."""

    def __init__(self, arch="vits14", depth=None, img_size=IMG_SIZE, config=None):
        super().__init__()
        # config: an arch_config()-style dict for widths no official arch has (vkg.depth_seg's
        # reduced bundled model); arch is then only a label
        cfg = arch_config(arch) if config is None else dict(config)
        self.arch = arch
        self.cfg = cfg
        d = self.embed_dim = cfg["embed_dim"]
        self.depth = cfg["depth"] if depth is None else int(depth)
        if self.depth < 1:
            raise ValueError("depth must be >= 1, got %d" % self.depth)
        self.heads = cfg["heads"]
        self.n_registers = cfg["registers"]
        self.interpolate_offset = cfg["interpolate_offset"]
        self.interpolate_antialias = cfg["interpolate_antialias"]
        if img_size % PATCH:
            raise ValueError("img_size %d is not a multiple of %d" % (img_size, PATCH))
        m = img_size // PATCH
        self.patch_embed = PatchEmbed(d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + m * m, d))
        if self.n_registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, self.n_registers, d))
        else:
            self.register_tokens = None
        self.mask_token = nn.Parameter(torch.zeros(1, d))        # training only
        self.ffn = cfg["ffn"]
        if self.ffn == "swiglu":
            hidden = swiglu_hidden(d, cfg["mlp_ratio"])
        else:
            hidden = int(d * cfg["mlp_ratio"])
        self.ffn_hidden = hidden
        self.blocks = nn.ModuleList([Block(d, self.heads, hidden, self.ffn)
                                     for _ in range(self.depth)])
        self.norm = nn.LayerNorm(d, eps=LN_EPS)

    # -- positional embedding --
    def interpolate_pos_encoding(self, h, w, compute_dtype=torch.float32):
        """The positional table for an h x w patch grid: (1, 1 + h*w, D), in pos_embed's dtype.
        Resampled in float32 as the official code does (compute_dtype=torch.float64 is for
        checking the formula)."""
        pe = self.pos_embed
        n = pe.shape[1] - 1
        m = int(round(math.sqrt(n)))
        if m * m != n:
            raise ValueError("pos_embed has %d patch rows, not a square" % n)
        if h * w == n and h == w:
            return pe
        dtype = pe.dtype
        pe = pe.to(compute_dtype)
        cls_pe, grid = pe[:, :1], pe[:, 1:]
        d = pe.shape[-1]
        grid = grid.reshape(1, m, m, d).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            kw = dict(scale_factor=(float(h + self.interpolate_offset) / m,
                                    float(w + self.interpolate_offset) / m))
        else:
            kw = dict(size=(h, w))
        grid = F.interpolate(grid, mode="bicubic", antialias=bool(self.interpolate_antialias), **kw)
        if tuple(grid.shape[-2:]) != (h, w):
            raise AssertionError("pos-embed interpolation gave %s, expected (%d, %d)"
                                 % (tuple(grid.shape[-2:]), h, w))
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, d)
        return torch.cat([cls_pe, grid], dim=1).to(dtype)

    def prepare_tokens(self, x):
        b, _, hh, ww = x.shape
        if hh % PATCH or ww % PATCH:
            raise ValueError("image size %dx%d is not a multiple of %d" % (hh, ww, PATCH))
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1)
        t = t + self.interpolate_pos_encoding(hh // PATCH, ww // PATCH)
        if self.register_tokens is not None:
            t = torch.cat([t[:, :1], self.register_tokens.expand(b, -1, -1), t[:, 1:]], dim=1)
        return t

    def forward(self, x, taps=None, norm=False):
        """taps: 1-based block numbers (default: the last block). Returns a list of (B, T, D)
        block outputs in the order of taps (through the final norm when norm=True)."""
        taps = [self.depth] if taps is None else [int(t) for t in taps]
        for t in taps:
            if not 1 <= t <= self.depth:
                raise ValueError("tap %d is outside blocks 1..%d" % (t, self.depth))
        outs = {}
        x = self.prepare_tokens(x)
        for i, blk in enumerate(self.blocks[:max(taps)]):
            x = blk(x)
            if i + 1 in taps:
                outs[i + 1] = self.norm(x) if norm else x
        return [outs[t] for t in taps]


def init_random(model, seed=0):
    """Deterministic random weights with O(1) activations (LayerScale, norms and biases all
    non-trivial, unlike the official init), for tests and `random:SEED` exports."""
    g = torch.Generator().manual_seed(int(seed))

    def randn(shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=g) * std + mean

    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.8 + 0.2)
            elif "norm" in name and leaf == "weight":
                p.copy_(randn(p.shape, 0.1, 1.0))
            elif leaf == "bias":
                p.copy_(randn(p.shape, 0.1))
            elif leaf == "weight":
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(randn(p.shape, fan_in ** -0.5))
            else:                                  # cls_token, pos_embed, register_tokens, mask
                p.copy_(randn(p.shape, 0.5))
    return model


def build_model(arch, checkpoint=None, depth=None, layout="auto"):
    """A DinoV2 in eval mode: checkpoint None or "random:SEED" gives random weights (seed 0
    for None); otherwise a path (or state dict) loaded with load_state_dict_any."""
    model = DinoV2(arch, depth=depth)
    if checkpoint is None or (isinstance(checkpoint, str) and checkpoint.startswith("random:")):
        seed = 0 if checkpoint is None else checkpoint[len("random:"):]
        try:
            seed = int(seed)
        except ValueError:
            raise ValueError("random:SEED needs an integer seed, got %r" % checkpoint) from None
        init_random(model, seed)
        model.source = "random:%d" % seed
    else:
        model.source = "%s (%s layout)" % (
            os.path.basename(checkpoint) if isinstance(checkpoint, str) else "state dict",
            load_state_dict_any(model, checkpoint, layout))
    return model.eval()


# --------------------------------------------------------------------------------------------
# checkpoints

LAYOUTS = ("official", "timm", "hf")
_WRAPPERS = ("state_dict", "model", "teacher", "model_state_dict", "module", "student")
_PREFIXES = ("module.", "backbone.", "pretrained.", "dinov2.", "model.", "encoder.backbone.")


def read_checkpoint(src):
    """A flat dict name -> torch.Tensor from a path (.safetensors via our reader, anything else
    via torch.load on the CPU) or a dict; wrappers such as {"model": {...}} or {"teacher": ...}
    are unwrapped."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if path.endswith(".safetensors"):
            from .safetensors import load_safetensors
            sd = load_safetensors(path)
        else:
            sd = torch.load(path, map_location="cpu")
    else:
        sd = src
    for _ in range(3):
        if isinstance(sd, dict) and not any(torch.is_tensor(v) or isinstance(v, np.ndarray)
                                            for v in sd.values()):
            inner = [k for k in _WRAPPERS if isinstance(sd.get(k), dict)]
            if not inner:
                break
            sd = sd[inner[0]]
    if not isinstance(sd, dict):
        raise CheckpointError("checkpoint is a %s, not a state dict" % type(sd).__name__)
    out = {}
    for k, v in sd.items():
        if isinstance(v, np.ndarray):
            v = torch.from_numpy(np.array(v))
        if torch.is_tensor(v):
            out[str(k)] = v
    return out


def _strip_prefix(sd):
    """Finds the prefix in front of the backbone's keys (e.g. "pretrained." in Depth Anything
    checkpoints, "backbone." in DINOv2 training checkpoints, "dinov2." in HF task models) and
    keeps only the keys under it. Returns (dict, prefix)."""
    anchors = ("embeddings.cls_token", "cls_token")     # the longer one first
    for anchor in anchors:
        if anchor in sd:
            return sd, ""
    for k in sd:
        for anchor in anchors:
            if k.endswith("." + anchor):
                p = k[:-len(anchor)]
                return {kk[len(p):]: v for kk, v in sd.items() if kk.startswith(p)}, p
    return sd, ""


def detect_layout(sd):
    if any(k.startswith("embeddings.") or k.startswith("encoder.layer.") for k in sd):
        return "hf"
    if "reg_token" in sd or ("mask_token" not in sd and "cls_token" in sd):
        return "timm"          # identical to official names for R=0 models (mask_token dropped)
    return "official"


def _from_timm(sd):
    """timm (`vit_*_patch14_dinov2`, `*_reg4_dinov2`) -> official names. timm's reg models have
    `reg_token`, no cls row in pos_embed (no_embed_class) and the cls row folded into cls_token:
    cls_token + 0 keeps the sum cls_token + pos_embed[:, 0] of the official model exact.
    timm's vitg14 FFN is SwiGLUPacked (GluMlp, gate_last=False): mlp.fc1 (2 hidden, D) chunked
    (gate, value) with silu on the first half, mlp.fc2 (D, hidden), i.e. exactly the official
    w12 / w3; a block is SwiGLU when its fc1 has twice the rows of fc2's columns."""
    swiglu = set()
    for k, v in sd.items():
        if k.endswith(".mlp.fc1.weight") and v.dim() == 2:
            fc2 = sd.get(k[:-len("fc1.weight")] + "fc2.weight")
            if fc2 is not None and fc2.dim() == 2 and v.shape[0] == 2 * fc2.shape[1]:
                swiglu.add(k[:-len("fc1.weight")])
    out = {}
    for k, v in sd.items():
        if k == "reg_token":
            out["register_tokens"] = v
            continue
        pre, _, rest = k.rpartition(".mlp.")
        pre += ".mlp."
        if pre in swiglu and rest.split(".")[0] in ("fc1", "fc2"):
            k = pre + ("w12" if rest.startswith("fc1") else "w3") + rest[3:]
        out[k] = v
    if "reg_token" in sd and "pos_embed" in sd:
        pe = sd["pos_embed"]
        n = pe.shape[1]
        if int(round(math.sqrt(n))) ** 2 == n:          # no cls row: put a zero one in front
            out["pos_embed"] = torch.cat([torch.zeros_like(pe[:, :1]), pe], dim=1)
    return out


_HF_BLOCK = {
    "norm1": "norm1", "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12", "mlp.weights_out": "mlp.w3",     # Dinov2SwiGLUFFN (vitg14)
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.register_tokens": "register_tokens",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def _from_hf(sd):
    """Hugging Face Dinov2Model -> official names (q, k, v concatenated into qkv)."""
    out, qkv = {}, {}
    for k, v in sd.items():
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
            continue
        parts = k.split(".")
        if len(parts) >= 4 and parts[0] == "encoder" and parts[1] == "layer" and parts[2].isdigit():
            i, rest = parts[2], ".".join(parts[3:])
            sub, leaf = rest.rsplit(".", 1)
            if sub in ("attention.attention.query", "attention.attention.key",
                       "attention.attention.value"):
                qkv.setdefault((i, leaf), {})[sub.rsplit(".", 1)[1]] = v
                continue
            if rest in ("layer_scale1.lambda1", "layer_scale2.lambda1"):
                out["blocks.%s.ls%s.gamma" % (i, rest[11])] = v
                continue
            if sub in _HF_BLOCK:
                out["blocks.%s.%s.%s" % (i, _HF_BLOCK[sub], leaf)] = v
                continue
        out["hf:" + k] = v                               # unknown: reported as unexpected
    for (i, leaf), parts in qkv.items():
        if set(parts) == {"query", "key", "value"}:
            out["blocks.%s.attn.qkv.%s" % (i, leaf)] = torch.cat(
                [parts["query"], parts["key"], parts["value"]], dim=0)
        else:
            for p, v in parts.items():
                out["hf:encoder.layer.%s.attention.attention.%s.%s" % (i, p, leaf)] = v
    return out


def to_official(sd, layout="auto"):
    """(official-name state dict, layout) of a flat checkpoint dict."""
    sd, _ = _strip_prefix(dict(sd))
    if layout == "auto":
        layout = detect_layout(sd)
    if layout == "hf":
        return _from_hf(sd), layout
    if layout == "timm":
        return _from_timm(sd), layout
    if layout == "official":
        return dict(sd), layout
    raise ValueError("unknown checkpoint layout %r (auto, %s)" % (layout, ", ".join(LAYOUTS)))


def copy_checkpoint(own, sd, header, optional=(), strict=True, rename=None, error=None):
    """Copies sd into own (a module's state_dict) after checking the keys: raises error (default
    CheckpointError) with header and every missing (unless strict is False), unexpected and
    mis-shaped key; keys in optional may be missing. rename(k) gives the name to report for an
    unexpected key. Returns the missing keys."""
    missing = sorted(k for k in own if k not in sd and k not in optional)
    unexpected = sorted((rename or str)(k) for k in sd if k not in own)
    shapes = sorted("%s: checkpoint %s, model %s" % (k, tuple(sd[k].shape), tuple(own[k].shape))
                    for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape))
    if (missing and strict) or unexpected or shapes:
        msg = [header]
        if missing and strict:
            msg.append("missing keys (%d): %s" % (len(missing), ", ".join(missing)))
        if unexpected:
            msg.append("unexpected keys (%d): %s" % (len(unexpected), ", ".join(unexpected)))
        if shapes:
            msg.append("shape mismatches (%d): %s" % (len(shapes), "; ".join(shapes)))
        raise (error or CheckpointError)("\n  ".join(msg))
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.to(own[k].dtype))
    return missing


def load_state_dict_any(model, src, layout="auto"):
    """Loads a checkpoint (path or dict; official, timm or HF layout, auto-detected) into model.
    mask_token is optional (training only). Returns the layout name; raises CheckpointError
    naming every missing, unexpected and mis-shaped key."""
    sd, layout = to_official(read_checkpoint(src), layout)
    copy_checkpoint(model.state_dict(), sd, "checkpoint (%s layout) does not fit DINOv2 %s with "
                    "%d blocks:" % (layout, model.arch, model.depth), optional={"mask_token"},
                    rename=lambda k: k[3:] if k.startswith("hf:") else k)
    return layout


def to_timm_state_dict(sd):
    """Official names -> timm's (what timm's DINOv2 checkpoint filter produces)."""
    out = {}
    for k, v in sd.items():
        if k == "mask_token":
            continue
        if ".mlp.w12." in k or ".mlp.w3." in k:          # SwiGLUPacked: fc1 / fc2
            k = k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[k] = v
    if "register_tokens" in sd:
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        out["pos_embed"] = sd["pos_embed"][:, 1:]
    return out


def to_hf_state_dict(sd):
    """Official names -> Hugging Face Dinov2Model's (qkv split into query, key, value)."""
    inv_top = {v: k for k, v in _HF_TOP.items()}
    inv_block = {v: k for k, v in _HF_BLOCK.items()}
    out = {}
    for k, v in sd.items():
        if k in inv_top:
            out[inv_top[k]] = v
            continue
        parts = k.split(".")
        i, rest = parts[1], ".".join(parts[2:])
        sub, leaf = rest.rsplit(".", 1)
        pre = "encoder.layer.%s." % i
        if sub == "attn.qkv":
            for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[pre + "attention.attention.%s.%s" % (name, leaf)] = part.clone()
        elif sub in ("ls1", "ls2"):
            out[pre + "layer_scale%s.lambda1" % sub[2]] = v
        else:
            out[pre + "%s.%s" % (inv_block[sub], leaf)] = v
    return out


# --------------------------------------------------------------------------------------------
# export


def build_backbone(b, model, image_size, taps, norm=False, fp16=False, ffn=None):
    """Adds input `image` (batch, 3, H, W) and the blocks up to max(taps) to Builder b.
    Returns {tap: tensor (batch, 1 + R + h*w, D)}, through the final LayerNorm when norm (its
    constants shared by every tap). ffn(b, i, f, x) -> x replaces block i's FFN step: f is
    norm2's output, x the residual stream; it returns x + ls2.gamma * FFN(f) (vkg.depth_seg's
    MoE-LoRA blocks). Checks are the caller's (export_dinov2)."""
    H, W = (int(s) for s in image_size)
    h, w = H // PATCH, W // PATCH
    d = model.embed_dim
    sd = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    wdt = "f16" if fp16 else "f32"

    def const(key, arr=None, dtype=None):
        return b.constant(key, sd[key] if arr is None else arr, dtype=dtype)

    def lin(x, prefix, name, activation=0, scale=None, residual=None):
        wt = const(prefix + ".weight", dtype=wdt)
        return b.linear(x, wt, const(prefix + ".bias"), activation=activation, name=name,
                        scale=scale, residual=residual)

    def ln(x, prefix, name):
        return b.layernorm(x, const(prefix + ".weight"), const(prefix + ".bias"), eps=LN_EPS,
                           name=name)

    x = b.input("image", ["batch", 3, H, W])
    x = b.patchify(x, PATCH, name="patch_embed.patchify")
    x = b.linear(x, const("patch_embed.proj.weight", sd["patch_embed.proj.weight"].reshape(d, -1),
                          dtype=wdt), const("patch_embed.proj.bias"), name="patch_embed.proj")
    x = b.insert_tokens(x, const("cls_token"), 0, name="cls_token.insert")
    with torch.no_grad():
        pe = model.interpolate_pos_encoding(h, w).detach().cpu().float().numpy()
    x = b.add(x, b.constant("pos_embed", pe), name="pos_embed.add")
    if model.n_registers:
        x = b.insert_tokens(x, const("register_tokens"), 1, name="register_tokens.insert")
    blocks_out = {}
    for i in range(max(taps)):
        p = "blocks.%d" % i
        a = ln(x, p + ".norm1", p + ".norm1")
        a = lin(a, p + ".attn.qkv", p + ".attn.qkv")
        a = b.attention_packed(a, model.heads, scale=(d // model.heads) ** -0.5, name=p + ".attn")
        # x + ls1.gamma * proj(a): LayerScale and the residual add in the projection's epilogue
        x = lin(a, p + ".attn.proj", p + ".attn.proj", scale=const(p + ".ls1.gamma"), residual=x)
        f = ln(x, p + ".norm2", p + ".norm2")
        if ffn is not None:
            x = ffn(b, i, f, x)
        elif model.ffn == "swiglu":
            # w3(silu(x1) * x2) with x1, x2 = w12(f).chunk(2, -1)
            f = lin(f, p + ".mlp.w12", p + ".mlp.w12")
            f = b.swiglu(f, name=p + ".mlp.swiglu")
            x = lin(f, p + ".mlp.w3", p + ".mlp.w3", scale=const(p + ".ls2.gamma"), residual=x)
        else:
            f = lin(f, p + ".mlp.fc1", p + ".mlp.fc1", activation=2)
            x = lin(f, p + ".mlp.fc2", p + ".mlp.fc2", scale=const(p + ".ls2.gamma"),
                    residual=x)
        blocks_out[i + 1] = x
    out = {}
    norm_w = norm_b = None
    for t in taps:
        y = blocks_out[t]
        if norm:
            if norm_w is None:
                norm_w, norm_b = const("norm.weight"), const("norm.bias")
            y = b.layernorm(y, norm_w, norm_b, eps=LN_EPS, name="norm.block%d" % t)
        out[t] = y
    return out


def check_export_args(model, image_size, taps):
    """(H, W, taps as ints) or ExportError."""
    H, W = (int(s) for s in image_size)
    if H <= 0 or W <= 0 or H % PATCH or W % PATCH:
        raise ExportError("image size %dx%d: both sides must be positive multiples of %d"
                          % (H, W, PATCH))
    taps = [int(t) for t in taps]
    if not taps or len(set(taps)) != len(taps):
        raise ExportError("taps %s: give distinct block numbers" % taps)
    for t in taps:
        if not 1 <= t <= model.depth:
            raise ExportError("tap %d is outside blocks 1..%d" % (t, model.depth))
    return H, W, taps


def export_dinov2(model, image_size, taps=(3, 6, 9, 12), norm=False, fp16=False, path=None,
                  metadata=None, tokens="all"):
    """Builds the .vkg graph of model for image_size = (H, W): input `image` (batch, 3, H, W) f32,
    outputs `block<t>` (batch, 1 + R + h*w, D) for each tap t (1-based), through the final
    LayerNorm when norm. tokens: "all" (cls, registers, patches), "patches" (h*w patch tokens) or
    "cls_patches" (cls then patches: registers dropped). fp16 stores the linear (and patch) weights
    as f16. Returns the Builder (saved to path when given)."""
    if tokens not in ("all", "patches", "cls_patches"):
        raise ExportError("tokens=%r: expected 'all', 'patches' or 'cls_patches'" % (tokens,))
    if not isinstance(model, DinoV2):
        raise ExportError("export_dinov2 needs a vkg.dinov2.DinoV2, got %s" % type(model).__name__)
    H, W, taps = check_export_args(model, image_size, taps)
    h, w = H // PATCH, W // PATCH
    b = Builder()
    outs = build_backbone(b, model, (H, W), taps, norm=norm, fp16=fp16)
    for t in taps:
        y = outs[t]
        first = 1 + model.n_registers
        if tokens == "patches":
            y = b.slice(y, 1, first, first + h * w, name="block%d.patches" % t)
        elif tokens == "cls_patches" and model.n_registers:
            cls = b.slice(y, 1, 0, 1, name="block%d.cls" % t)
            pt = b.slice(y, 1, first, first + h * w, name="block%d.patches" % t)
            y = b.insert_tokens(pt, cls, 0, name="block%d.cls_patches" % t)
        b.output(y, "block%d" % t)
    from . import __version__
    b.metadata("producer", "vkg.dinov2 %s" % __version__)
    b.metadata("exporter_version", __version__)
    b.metadata("model_name", "dinov2_%s" % model.arch)
    b.metadata("description", "DINOv2 %s backbone, %d blocks, image %dx%d (%dx%d patches, %d "
               "registers), outputs %s%s; pos-embed interpolated at export (offset %g, antialias "
               "%d); weights %s; source %s"
               % (model.arch, model.depth, H, W, h, w, model.n_registers,
                  ", ".join("block%d" % t for t in taps),
                  " after the final LayerNorm" if norm else " (raw block outputs)",
                  model.interpolate_offset, int(model.interpolate_antialias),
                  "f16 linear weights" if fp16 else "f32", getattr(model, "source", "module")))
    if metadata:
        for k, v in metadata.items():
            b.metadata(k, v)
    if path is not None:
        b.save(path)
    return b
