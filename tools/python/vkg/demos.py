"""Small demo modules (used by `python3 -m vkg export-demo` and by the tests)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    """Linear-ReLU-Linear-GELU-Linear on (B, in_features)."""

    def __init__(self, d_in=24, hidden=40, d_out=10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.GELU()
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


class ResBlock(nn.Module):
    """Pre-LN residual MLP block with LayerScale: x + gamma * fc2(gelu(fc1(ln(x))))."""

    def __init__(self, dim=24, hidden=40, init_scale=0.5):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.gamma = nn.Parameter(torch.full((dim,), init_scale))

    def forward(self, x):
        y = self.fc2(F.gelu(self.fc1(self.ln(x))))
        return x + y * self.gamma


class Transformer(nn.Module):
    """Attention-free (token-mixing-free) stack: blocks of ResBlock, final LayerNorm, per-token
    linear head. Input (B, T, D)."""

    def __init__(self, dim=24, hidden=40, depth=3, n_out=10):
        super().__init__()
        self.blocks = nn.Sequential(*[ResBlock(dim, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_out)

    def forward(self, x):
        return self.head(self.norm(self.blocks(x)))


def make(kind, seed=0):
    """(module in eval mode, example input) for kind in mlp | resblock | transformer."""
    torch.manual_seed(seed)
    if kind == "mlp":
        m, x = MLP(), torch.randn(2, 24)
    elif kind == "resblock":
        m, x = ResBlock(), torch.randn(2, 7, 24)
    elif kind == "transformer":
        m, x = Transformer(), torch.randn(2, 7, 24)
    else:
        raise ValueError("unknown demo %r (mlp, resblock, transformer)" % kind)
    for p in m.parameters():  # make biases/affine params non-trivial
        if p.dim() == 1:
            with torch.no_grad():
                p.add_(0.1 * torch.randn_like(p))
    return m.eval(), x


KINDS = ("mlp", "resblock", "transformer")
