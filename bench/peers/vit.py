"""DINOv2 ViT (official parameter names) for the peer benchmark, written for torch 1.13.

Two uses:
  * the stand-in PyTorch model while vkg.dinov2 is absent (random init, fixed seed);
  * the export module for pnnx/ONNX: a fixed-input-size copy of any DINOv2-named state dict, with the
    interpolated positional table precomputed (so converters see no bicubic resize), attention written
    as explicit softmax((q*scale) k^T) v (Depth Anything V2's formulation; torch 1.13 has no SDPA).

Output of forward: the final-LayerNorm-ed tokens (B, 1+h*w, D) = cls + patch tokens of the last block
(what `--taps 12 --norm` exports, before the NCHW reshape).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHS = {"vits14": dict(embed=384, depth=12, heads=6, mlp=1536, patch=14)}


def interpolate_pos_embed(pos_embed, h, w, offset=0.1):
    """Official DINOv2 interpolate_pos_encoding (R=0 models: bicubic, scale_factor with offset 0.1,
    antialias False), computed in float32. pos_embed: (1, 1+M*M, D)."""
    n = pos_embed.shape[1] - 1
    m = int(math.sqrt(n))
    assert m * m == n
    if h == m and w == m:
        return pos_embed
    dim = pos_embed.shape[-1]
    cls_pe, grid = pos_embed[:, :1].float(), pos_embed[:, 1:].float()
    grid = grid.reshape(1, m, m, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((h + offset) / m, (w + offset) / m), mode="bicubic",
                         align_corners=False)
    assert grid.shape[-2:] == (h, w), grid.shape
    grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim)
    return torch.cat([cls_pe, grid], dim=1).to(pos_embed.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        b, n, c = x.shape
        # split on the last dim rather than qkv[0] of a 5-D tensor: pnnx/ncnn cannot lower the latter
        q, k, v = (t.reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)
                   for t in self.qkv(x).split(c, dim=-1))
        a = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim, init=1.0):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf form
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """DINOv2 backbone. With fixed_hw=(h, w) the positional table is a precomputed (1, 1+h*w, D)
    buffer-like parameter `pos_fixed` (export form); otherwise `pos_embed` (1, 1+37*37, D) is
    interpolated per call like the official model."""

    def __init__(self, arch="vits14", img_size=518, fixed_hw=None):
        super().__init__()
        a = ARCHS[arch]
        d, self.patch = a["embed"], a["patch"]
        self.patch_embed = PatchEmbed(self.patch, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        m = img_size // self.patch
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + m * m, d))
        self.blocks = nn.ModuleList([Block(d, a["heads"], a["mlp"]) for _ in range(a["depth"])])
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.fixed_hw = fixed_hw
        if fixed_hw is not None:
            self.pos_fixed = nn.Parameter(torch.zeros(1, 1 + fixed_hw[0] * fixed_hw[1], d))

    def forward(self, x):
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        pos = self.pos_fixed if self.fixed_hw is not None else interpolate_pos_embed(self.pos_embed, h, w)
        t = t + pos
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)


def random_vit(arch="vits14", seed=0):
    """Stand-in random model (DINOv2-like init: trunc-normal 0.02 linears, LayerScale 1.0)."""
    g = torch.Generator().manual_seed(seed)
    m = ViT(arch)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g).clamp_(-2, 2) * 0.02)
    return m.eval()


def export_copy(state_dict, arch, image_hw):
    """A fixed-size ViT carrying the weights of any DINOv2-named state dict (extra keys such as
    mask_token are ignored; missing ones are an error)."""
    h, w = image_hw[0] // ARCHS[arch]["patch"], image_hw[1] // ARCHS[arch]["patch"]
    pe = state_dict["pos_embed"]
    m = ViT(arch, img_size=int(math.sqrt(pe.shape[1] - 1)) * ARCHS[arch]["patch"], fixed_hw=(h, w))
    sd = {k: v for k, v in state_dict.items() if k in m.state_dict()}
    sd["pos_fixed"] = interpolate_pos_embed(pe.detach(), h, w)
    missing = sorted(set(m.state_dict()) - set(sd))
    if missing:
        raise KeyError("state dict lacks %s" % ", ".join(missing[:8]))
    m.load_state_dict(sd)
    return m.eval()


class AttentionOnly(nn.Module):
    """One attention core (no projections): softmax(q k^T * scale) v on packed (B, T, 3*H*d) input,
    for the --attention peer figure."""

    def __init__(self, heads=6, head_dim=64):
        super().__init__()
        self.heads, self.hd = heads, head_dim

    def forward(self, qkv):
        b, n, _ = qkv.shape
        q, k, v = (t.reshape(b, n, self.heads, self.hd).permute(0, 2, 1, 3)
                   for t in qkv.split(self.heads * self.hd, dim=-1))
        q = q * (self.hd ** -0.5)
        a = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return (a @ v).transpose(1, 2).reshape(b, n, self.heads * self.hd)
