"""Mixture-of-Experts FFNs: PyTorch reference modules, routing, upcycling, and their converters.

Written from shared/docs/model-spec.md §1.3 (S1), §2.3-2.4 (S2), §3.4 (S3); docs/moe.md describes
the parameter names, the graphs the converters emit and the routing statistics.

- `route(logits, k, ...)`: top-k routing (ties to the lower index) with gates and statistics,
  exactly the `moe_router` op of docs/graph-format.md.
- `TopKRouter`: the router alone (parameters `weight`, `bias`), forward -> (ids, gates).
- `MoELoRAFFN` (S1): a frozen FFN `fc1`, `fc2` shared by E experts that each add PEFT LoRA
  adapters `experts.e.fc1.lora_A.weight`, ... to both projections; top-k softmax router `router`.
- `DeepSeekMoEFFN` (S2): DeepSeekMoE fine-grained experts: `router.weight`, a shared MLP
  `shared.fc1/fc2(/fc3)` and routed experts stacked as `experts.w1/b1/w2(/w3)`.
- `MoEFFN` (S3): a Switch-style FFN: `router`, `experts.e.fc1`, `experts.e.fc2`.
- `upcycle_ffn(...)`: a DeepSeekMoEFFN state_dict sliced from a dense FFN (§2.4).
- `collapse_expert_copies(state_dict)`: MoE-LoRA checkpoints storing a frozen FFN per expert.

Every module keeps its last routing in `module.last_routing` (ids, gates) and statistics in
`module.last_stats` (counts, fraction, mean_score, load_balance, z_loss). Importing this module
registers the converters with vkg.export; `vkg.export(..., moe_stats=True)` (or a module's
`vkg_stats = True`) adds the statistics as graph outputs `<module path>.<stat>`.
"""

import math
import re
from collections import OrderedDict, namedtuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ExportError
from .export import export_options, register_converter

STAT_NAMES = ("counts", "fraction", "mean_score", "load_balance", "z_loss")
VARIANTS = ("shared_base", "naive")
_ACT_CODE = {"relu": 1, "gelu": 2, "swiglu": 3}


class MoECheckpointError(ExportError, ValueError):
    """A checkpoint that does not fit a MoE module (names the block and the expert)."""


# --------------------------------------------------------------------------------------------
# routing

Routing = namedtuple("Routing", "ids gates stats")
Routing.__doc__ = """ids (..., k) int64 (selectable column - first), gates (..., k), stats: dict of
counts (C-first), fraction (C-first), mean_score (C), load_balance (1,), z_loss (1,)."""


def topk_ids(z, k):
    """Indices of the k largest entries of each row of z, descending; ties go to the lower index."""
    return torch.sort(z, dim=-1, descending=True, stable=True).indices[..., :k]


def route(logits, k, first=0, score="softmax", gates="softmax_topk", renorm=False, scale=1.0,
          temperature=1.0):
    """The moe_router op in PyTorch. logits (..., C) = x W^T + b; z = logits / temperature.

    ids: the k largest z among columns [first, C) (descending, ties to the lower column) minus
    first. score: softmax(z) over all C columns or sigmoid(z). gates: "softmax_topk" (softmax over
    the k selected z) or "score" (the selected scores, divided by their sum when renorm), times
    scale. Statistics over all T tokens: counts[e] = (token, slot) pairs choosing e (float),
    fraction = counts / (T k), mean_score = mean_t score[t], load_balance = C sum(mean_score^2),
    z_loss = mean_t logsumexp(z_t)^2 (0 when T = 0)."""
    if score not in ("softmax", "sigmoid"):
        raise ValueError("score %r: expected 'softmax' or 'sigmoid'" % (score,))
    if gates not in ("softmax_topk", "score"):
        raise ValueError("gates %r: expected 'softmax_topk' or 'score'" % (gates,))
    c = logits.shape[-1]
    if not 0 <= first < c or not 1 <= k <= c - first:
        raise ValueError("k=%d, first=%d do not fit %d router columns" % (k, first, c))
    z = (logits / temperature).reshape(-1, c)
    t = z.shape[0]
    ids = topk_ids(z[:, first:], k)
    cols = ids + first
    sc = torch.softmax(z, dim=-1) if score == "softmax" else torch.sigmoid(z)
    if gates == "softmax_topk":
        g = torch.softmax(z.gather(1, cols), dim=-1)
    else:
        g = sc.gather(1, cols)
        if renorm:
            g = g / g.sum(dim=-1, keepdim=True)
    g = g * scale
    counts = torch.bincount(ids.reshape(-1), minlength=c - first).to(z.dtype)
    if t:
        fraction = counts / float(t * k)
        mean_score = sc.mean(dim=0)
        z_loss = (torch.logsumexp(z, dim=-1) ** 2).mean().reshape(1)
    else:
        fraction = z.new_zeros(c - first)
        mean_score = z.new_zeros(c)
        z_loss = z.new_zeros(1)
    load_balance = (c * (mean_score ** 2).sum()).reshape(1)
    lead = tuple(logits.shape[:-1])
    stats = OrderedDict(counts=counts, fraction=fraction, mean_score=mean_score,
                        load_balance=load_balance, z_loss=z_loss)
    return Routing(ids.reshape(lead + (k,)), g.reshape(lead + (k,)), stats)


def combine(out, ids, gates, n_experts, expert_fn):
    """out (T, D) + sum over each token's slots, in ascending expert id, of
    gates * expert_fn(e, token_indices) (T, D); ids, gates (T, k); ids outside [0, n) are
    skipped. Returns the new tensor."""
    for e in range(n_experts):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        out = out.index_add(0, tok, gates[tok, slot].unsqueeze(-1) * expert_fn(e, tok))
    return out


def _activation(name):
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError("activation %r: expected 'gelu' or 'relu'" % (name,))


class _RoutedModule(nn.Module):
    """Routing bookkeeping shared by the MoE modules. Attributes read by the exporter:
    vkg_stats / vkg_routing (None: follow vkg.export's moe_stats / moe_routing)."""

    vkg_stats = None
    vkg_routing = None

    def _record(self, r, lead=None):
        """Keeps r's ids and gates (shaped lead + (k,) when given) and statistics."""
        ids, gates = r.ids.detach(), r.gates.detach()
        if lead is not None:
            ids = ids.reshape(tuple(lead) + (ids.shape[-1],))
            gates = gates.reshape(tuple(lead) + (gates.shape[-1],))
        self.last_routing = (ids, gates)
        self.last_stats = OrderedDict((k, v.detach()) for k, v in r.stats.items())


class TopKRouter(_RoutedModule):
    """The router alone: forward(x (..., D)) -> (ids (..., k) int64, gates (..., k)) with
    parameters `weight` (C, D) and `bias` (C) (optional); the moe_router op's attributes."""

    def __init__(self, dim, columns, k, bias=True, first=0, score="softmax",
                 gates="softmax_topk", renorm=False, scale=1.0, temperature=1.0):
        super().__init__()
        if not 0 <= first < columns or not 1 <= k <= columns - first:
            raise ValueError("TopKRouter: k=%d, first=%d do not fit %d columns"
                             % (k, first, columns))
        lin = nn.Linear(dim, columns, bias=bias)
        self.weight = lin.weight
        if bias:
            self.bias = lin.bias
        else:
            self.register_parameter("bias", None)
        self.dim, self.columns, self.k, self.first = dim, columns, k, first
        self.score, self.gates, self.renorm = score, gates, bool(renorm)
        self.scale, self.temperature = float(scale), float(temperature)

    def forward(self, x):
        r = route(F.linear(x, self.weight, self.bias), self.k, self.first, self.score,
                  self.gates, self.renorm, self.scale, self.temperature)
        self._record(r)
        return r.ids, r.gates


# --------------------------------------------------------------------------------------------
# S1: MoE-LoRA FFN


class LoRA(nn.Module):
    """A PEFT-style adapter: lora_A (r, in) then lora_B (out, r), both nn.Linear without bias
    (PEFT's init: A Kaiming-uniform, B zero)."""

    def __init__(self, d_in, d_out, rank):
        super().__init__()
        self.lora_A = nn.Linear(d_in, rank, bias=False)
        self.lora_B = nn.Linear(rank, d_out, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return self.lora_B(self.lora_A(x))


class LoRAExpert(nn.Module):
    def __init__(self, dim, hidden, rank):
        super().__init__()
        self.fc1 = LoRA(dim, hidden, rank)
        self.fc2 = LoRA(hidden, dim, rank)


class MoELoRAFFN(_RoutedModule):
    """MoE-LoRA FFN (model-spec §1.3.1): E experts share the frozen FFN `fc1` (H, D) / `fc2`
    (D, H) (nn.Linear, requires_grad False) and each adds LoRA to both projections:
    `experts.e.fc1.lora_A.weight` (r, D), `experts.e.fc1.lora_B.weight` (H, r),
    `experts.e.fc2.lora_A.weight` (r, H), `experts.e.fc2.lora_B.weight` (D, r); s = alpha / r.
    `router` = nn.Linear(D, E); each token goes to the top_k experts by logit (ties to the lower
    index), gates = softmax over the k selected logits.
        expert_e(f) = (W2 + s B2_e A2_e) act((W1 + s B1_e A1_e) f + b1) + b2
        y = sum over the token's experts (ascending id) of g_e expert_e(f)
    forward(x (..., D)) is this literal definition. load_state_dict also accepts checkpoints that
    store a frozen FFN copy per expert (collapse_expert_copies). Exported as "shared_base"
    (default) or "naive" (`vkg_variant` or vkg.export's moe_variant; docs/moe.md)."""

    vkg_variant = None

    def __init__(self, dim, hidden, experts=8, top_k=2, rank=8, alpha=8, act="gelu",
                 router_bias=True):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError("MoELoRAFFN: top_k=%d outside 1..%d" % (top_k, experts))
        if rank < 1:
            raise ValueError("MoELoRAFFN: rank %d < 1" % rank)
        _activation(act)
        self.dim, self.hidden, self.n_experts, self.top_k = dim, hidden, experts, top_k
        self.rank, self.alpha, self.act = rank, alpha, act
        self.lora_scale = float(alpha) / rank
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        for p in list(self.fc1.parameters()) + list(self.fc2.parameters()):
            p.requires_grad_(False)
        self.router = nn.Linear(dim, experts, bias=router_bias)
        self.experts = nn.ModuleList([LoRAExpert(dim, hidden, rank) for _ in range(experts)])

    def forward(self, x):
        f = x.reshape(-1, self.dim)
        r = route(self.router(f), self.top_k)
        self._record(r, x.shape[:-1])
        act, s = _activation(self.act), self.lora_scale

        def expert(e, tok):
            ex, fe = self.experts[e], f[tok]
            h = act(self.fc1(fe) + s * ex.fc1(fe))
            return self.fc2(h) + s * ex.fc2(h)

        y = combine(f.new_zeros(f.shape[0], self.dim), r.ids, r.gates, self.n_experts, expert)
        return y.reshape(tuple(x.shape[:-1]) + (self.dim,))

    def dense(self, x):
        """The frozen FFN alone: fc2(act(fc1(x)))."""
        return self.fc2(_activation(self.act)(self.fc1(x)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        collapse_expert_copies(state_dict, prefix=prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


_COPY_RE = re.compile(r"^(.*?)experts\.(\d+)\.(fc1|fc2)\.(?:base_layer\.)?(weight|bias)$")


def collapse_expert_copies(state_dict, prefix=None):
    """Folds per-expert frozen FFN copies of MoE-LoRA checkpoints into the shared base, in place:
    "<prefix>experts.<e>.fc1.weight" (or PEFT's "...fc1.base_layer.weight"), fc1.bias,
    fc2.weight, fc2.bias equal to "<prefix>fc1.weight" etc. are removed (the first copy becomes
    the base when the checkpoint has none). A copy that differs raises MoECheckpointError naming
    the block and the expert. prefix None: every block whose experts have lora_A weights.
    Returns state_dict."""
    groups = OrderedDict()
    for key in list(state_dict):
        m = _COPY_RE.match(key)
        if m is None or (prefix is not None and m.group(1) != prefix):
            continue
        groups.setdefault(m.group(1), []).append((key, int(m.group(2)), m.group(3), m.group(4)))
    for pre, copies in groups.items():
        if prefix is None and not any(k.startswith(pre + "experts.") and ".lora_A." in k
                                      for k in state_dict):
            continue    # not a MoE-LoRA block (e.g. MoEFFN's own experts.e.fc1.weight)
        block = pre[:-1] if pre.endswith(".") else (pre or "(root)")
        for key, e, proj, kind in sorted(copies, key=lambda c: c[1]):
            base_key = "%s%s.%s" % (pre, proj, kind)
            value = state_dict.pop(key)
            if base_key not in state_dict:
                state_dict[base_key] = value
                continue
            base = state_dict[base_key]
            if tuple(base.shape) != tuple(value.shape) or not torch.equal(
                    torch.as_tensor(base), torch.as_tensor(value)):
                diff = ("shape %s vs %s" % (tuple(value.shape), tuple(base.shape))
                        if tuple(base.shape) != tuple(value.shape) else "max |diff| %.3g" % float(
                            (torch.as_tensor(value).double() - torch.as_tensor(base).double())
                            .abs().max()))
                raise MoECheckpointError(
                    "block %r, expert %d: the frozen copy %s differs from the shared base %s "
                    "(%s); MoELoRAFFN shares one frozen FFN across its experts"
                    % (block, e, key, base_key, diff))
    return state_dict


# --------------------------------------------------------------------------------------------
# S2: DeepSeekMoE FFN


class SharedMLP(nn.Module):
    """The S shared experts as one dense MLP of width S*w: gelu: fc2(gelu(fc1 x)) with biases;
    swiglu: fc2(silu(fc1 x) * fc3 x) without biases."""

    def __init__(self, dim, hidden, act="gelu"):
        super().__init__()
        self.act = act
        bias = act != "swiglu"
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        if act == "swiglu":
            self.fc3 = nn.Linear(dim, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        if self.act == "swiglu":
            return self.fc2(F.silu(self.fc1(x)) * self.fc3(x))
        return self.fc2(F.gelu(self.fc1(x)))


class RoutedExperts(nn.Module):
    """n experts of width w stacked: w1 (n, w, D), b1 (n, w) (gelu only), w2 (n, D, w), w3
    (n, w, D) (swiglu only); expert e: w2_e act(w1_e x + b1_e) (swiglu: silu(w1_e x) * w3_e x);
    no fc2 bias."""

    def __init__(self, n, dim, width, act="gelu"):
        super().__init__()
        self.n, self.act = n, act
        self.w1 = nn.Parameter(torch.empty(n, width, dim))
        if act == "swiglu":
            self.register_parameter("b1", None)
            self.w3 = nn.Parameter(torch.empty(n, width, dim))
        else:
            self.b1 = nn.Parameter(torch.empty(n, width))
        self.w2 = nn.Parameter(torch.empty(n, dim, width))
        for name, fan_in in (("w1", dim), ("b1", dim), ("w3", dim), ("w2", width)):
            p = getattr(self, name, None)
            if p is not None:
                nn.init.uniform_(p, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))

    def expert(self, e, x):
        pre = F.linear(x, self.w1[e], None if self.b1 is None else self.b1[e])
        if self.act == "swiglu":
            h = F.silu(pre) * F.linear(x, self.w3[e])
        else:
            h = F.gelu(pre)
        return F.linear(h, self.w2[e])

    def forward(self, x, ids, gates, out=None):
        """out + sum over slots (ascending expert id) of gates * expert(x); x (T, D)."""
        out = x.new_zeros(x.shape[0], self.w2.shape[1]) if out is None else out
        return combine(out, ids, gates, self.n, lambda e, tok: self.expert(e, x[tok]))


class DeepSeekMoEFFN(_RoutedModule):
    """DeepSeekMoE fine-grained FFN (model-spec §2.3): `experts` E fine-grained experts of width
    `width` w; the first `shared` S are always on (one dense MLP `shared.fc1` (S*w, D),
    `shared.fc2` (D, S*w) carrying the FFN's fc2 bias; swiglu adds `shared.fc3`, the up
    projection, and has no biases); the other E - S are routed: `experts.w1` (E-S, w, D),
    `experts.b1` (E-S, w), `experts.w2` (E-S, D, w), swiglu `experts.w3`; routed expert j is
    global expert S + j. `router.weight` (C, D), no bias: router_cols "all" C = E columns and
    top_m among columns S..E-1 (the paper), "routed" C = E - S (DeepSeek/HF code).
    score softmax/sigmoid over the C columns, gates = the selected scores (/ their sum when
    renorm) * scale. S = E: no router and no routed experts (top_m ignored)."""

    def __init__(self, dim, experts=128, width=40, shared=4, top_m=4, score="softmax",
                 router_cols="all", renorm=False, scale=1.0, act="gelu"):
        super().__init__()
        if act not in ("gelu", "swiglu"):
            raise ValueError("DeepSeekMoEFFN: act %r: expected 'gelu' or 'swiglu'" % (act,))
        if router_cols not in ("all", "routed"):
            raise ValueError("DeepSeekMoEFFN: router_cols %r: expected 'all' or 'routed'"
                             % (router_cols,))
        if score not in ("softmax", "sigmoid"):
            raise ValueError("DeepSeekMoEFFN: score %r: expected 'softmax' or 'sigmoid'"
                             % (score,))
        if not 0 <= shared <= experts or experts < 1 or width < 1:
            raise ValueError("DeepSeekMoEFFN: experts=%d, shared=%d, width=%d: need 0 <= shared "
                             "<= experts and width >= 1" % (experts, shared, width))
        routed = experts - shared
        if routed and not 1 <= top_m <= routed:
            raise ValueError("DeepSeekMoEFFN: top_m=%d outside 1..%d (routed experts)"
                             % (top_m, routed))
        self.dim, self.n_experts, self.width, self.n_shared = dim, experts, width, shared
        self.n_routed, self.top_m = routed, top_m if routed else 0
        self.score, self.router_cols, self.renorm = score, router_cols, bool(renorm)
        self.scale, self.act = float(scale), act
        self.columns = experts if router_cols == "all" else routed
        self.first = shared if router_cols == "all" else 0
        self.router = nn.Linear(dim, self.columns, bias=False) if routed else None
        self.shared = SharedMLP(dim, shared * width, act) if shared else None
        self.experts = RoutedExperts(routed, dim, width, act) if routed else None

    def routing(self, f):
        return route(self.router(f), self.top_m, self.first, self.score, "score", self.renorm,
                     self.scale)

    def forward(self, x):
        f = x.reshape(-1, self.dim)
        y = self.shared(f) if self.shared is not None else f.new_zeros(f.shape[0], self.dim)
        if self.n_routed:
            r = self.routing(f)
            self._record(r, x.shape[:-1])
            y = self.experts(f, r.ids, r.gates, y)
        return y.reshape(tuple(x.shape[:-1]) + (self.dim,))

    def forward_routed(self, x, ids, gates):
        """The FFN with the router bypassed: ids (..., k) in [0, E-S), gates (..., k)."""
        f = x.reshape(-1, self.dim)
        y = self.shared(f) if self.shared is not None else f.new_zeros(f.shape[0], self.dim)
        if self.n_routed:
            k = ids.shape[-1]
            y = self.experts(f, ids.reshape(-1, k), gates.reshape(-1, k), y)
        return y.reshape(tuple(x.shape[:-1]) + (self.dim,))

    @classmethod
    def upcycled(cls, fc1_weight, fc1_bias, fc2_weight, fc2_bias, experts, shared, top_m=4,
                 permutation=None, fc3_weight=None, router_weight=None, **kwargs):
        """A DeepSeekMoEFFN loaded with upcycle_ffn(...) of a dense FFN (kwargs: score,
        router_cols, renorm, scale)."""
        act = "swiglu" if fc3_weight is not None else "gelu"
        sd = upcycle_ffn(fc1_weight, fc1_bias, fc2_weight, fc2_bias, experts, shared,
                         permutation, fc3_weight=fc3_weight,
                         router_cols=kwargs.get("router_cols", "all"),
                         router_weight=router_weight)
        d, h = tuple(fc2_weight.shape)
        m = cls(d, experts, h // experts, shared, top_m, act=act, **kwargs)
        m.load_state_dict(sd)
        return m


def _tensor(a, what):
    if a is None:
        return None
    t = torch.as_tensor(a)
    if not t.is_floating_point():
        raise ValueError("upcycle_ffn: %s must be floating point, got %s" % (what, t.dtype))
    return t.detach().cpu()


def upcycle_ffn(fc1_weight, fc1_bias, fc2_weight, fc2_bias, experts, shared, permutation=None,
                fc3_weight=None, router_cols="all", router_weight=None):
    """Slices a dense FFN (PyTorch layout: fc1_weight (H, D), fc1_bias (H), fc2_weight (D, H),
    fc2_bias (D); SwiGLU: fc1 = gate, fc3_weight (H, D) = up, fc2 = down, no biases) into a
    DeepSeekMoEFFN state_dict with E = experts experts of width w = H / E, the first S = shared
    of them in the shared MLP (model-spec §2.4): expert e takes rows perm[e w:(e+1) w] of fc1
    (and b1, fc3) and the same columns of fc2; fc2's bias goes once into shared.fc2.bias; routed
    experts have no fc2 bias; router.weight is router_weight or zeros ((E or E-S) x D by
    router_cols). With every expert on at weight 1 the result equals the dense FFN exactly.
    Returns an OrderedDict of tensors."""
    w1 = _tensor(fc1_weight, "fc1_weight")
    b1 = _tensor(fc1_bias, "fc1_bias")
    w2 = _tensor(fc2_weight, "fc2_weight")
    b2 = _tensor(fc2_bias, "fc2_bias")
    w3 = _tensor(fc3_weight, "fc3_weight")
    if w1 is None or w2 is None or w1.dim() != 2 or w2.dim() != 2:
        raise ValueError("upcycle_ffn: fc1_weight (H, D) and fc2_weight (D, H) are required")
    h, d = w1.shape
    if tuple(w2.shape) != (d, h):
        raise ValueError("upcycle_ffn: fc2_weight is %s, expected (D, H) = (%d, %d) for "
                         "fc1_weight (%d, %d)" % (tuple(w2.shape), d, h, h, d))
    swiglu = w3 is not None
    if swiglu:
        if tuple(w3.shape) != (h, d):
            raise ValueError("upcycle_ffn: fc3_weight is %s, expected (H, D) = (%d, %d)"
                             % (tuple(w3.shape), h, d))
        if b1 is not None or b2 is not None:
            raise ValueError("upcycle_ffn: a SwiGLU FFN (fc3_weight given) has no biases; "
                             "DeepSeekMoEFFN(act='swiglu') stores none")
    else:
        if b1 is None or tuple(b1.shape) != (h,):
            raise ValueError("upcycle_ffn: fc1_bias must be (H,) = (%d,), got %s"
                             % (h, None if b1 is None else tuple(b1.shape)))
        if b2 is None or tuple(b2.shape) != (d,):
            raise ValueError("upcycle_ffn: fc2_bias must be (D,) = (%d,), got %s"
                             % (d, None if b2 is None else tuple(b2.shape)))
    for what, v in (("experts", experts), ("shared", shared)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError("upcycle_ffn: %s must be an int, got %r" % (what, v))
    experts, shared = int(experts), int(shared)
    if experts < 1:
        raise ValueError("upcycle_ffn: experts=%d < 1" % experts)
    if h % experts:
        raise ValueError("upcycle_ffn: %d experts do not divide the hidden width H=%d"
                         % (experts, h))
    if not 0 <= shared <= experts:
        raise ValueError("upcycle_ffn: shared=%d outside 0..%d (experts)" % (shared, experts))
    if shared == 0 and not swiglu:
        raise ValueError("upcycle_ffn: shared=0 leaves no shared MLP to carry fc2's bias "
                         "(routed experts have none)")
    if router_cols not in ("all", "routed"):
        raise ValueError("upcycle_ffn: router_cols %r: expected 'all' or 'routed'"
                         % (router_cols,))
    w = h // experts
    if permutation is None:
        perm = torch.arange(h)
    else:
        perm = torch.as_tensor(permutation)
        if perm.dim() != 1 or perm.numel() != h or perm.is_floating_point() or not torch.equal(
                torch.sort(perm).values, torch.arange(h, dtype=perm.dtype)):
            raise ValueError("upcycle_ffn: permutation must be a permutation of 0..%d (H=%d "
                             "hidden neurons)" % (h - 1, h))
        perm = perm.long()
    w1p, w2p = w1[perm], w2[:, perm]
    b1p = b1[perm] if b1 is not None else None
    w3p = w3[perm] if swiglu else None
    sw = shared * w
    routed = experts - shared
    sd = OrderedDict()
    if routed:
        cols = experts if router_cols == "all" else routed
        if router_weight is None:
            sd["router.weight"] = torch.zeros(cols, d, dtype=w1.dtype)
        else:
            rw = _tensor(router_weight, "router_weight")
            if tuple(rw.shape) != (cols, d):
                raise ValueError("upcycle_ffn: router_weight is %s, expected (%d, %d)"
                                 % (tuple(rw.shape), cols, d))
            sd["router.weight"] = rw.clone()
    if shared:
        sd["shared.fc1.weight"] = w1p[:sw].clone()
        if not swiglu:
            sd["shared.fc1.bias"] = b1p[:sw].clone()
        if swiglu:
            sd["shared.fc3.weight"] = w3p[:sw].clone()
        sd["shared.fc2.weight"] = w2p[:, :sw].clone()
        if not swiglu:
            sd["shared.fc2.bias"] = b2.clone()
    if routed:
        sd["experts.w1"] = w1p[sw:].reshape(routed, w, d).clone()
        if not swiglu:
            sd["experts.b1"] = b1p[sw:].reshape(routed, w).clone()
        sd["experts.w2"] = w2p[:, sw:].reshape(d, routed, w).permute(1, 0, 2).contiguous()
        if swiglu:
            sd["experts.w3"] = w3p[sw:].reshape(routed, w, d).clone()
    return sd


# --------------------------------------------------------------------------------------------
# S3: MoE FFN


class FFNExpert(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)


class MoEFFN(_RoutedModule):
    """MoE FFN of the Transfuser decoder (model-spec §3.4): `router` nn.Linear(D, E) (bias on),
    z = router(x) / temperature, top_k experts by z (ties to the lower index), gates = softmax
    over the k selected z; expert e = `experts.e.fc2`(act(`experts.e.fc1`(x))); the gate-weighted
    sum in ascending expert id. last_stats: counts, fraction, mean_score (mean softmax(z)),
    load_balance = E sum(mean_score^2), z_loss = mean logsumexp(z)^2."""

    def __init__(self, dim, hidden, experts=4, top_k=2, activation="relu", temperature=1.0):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise ValueError("MoEFFN: top_k=%d outside 1..%d" % (top_k, experts))
        if not temperature > 0:
            raise ValueError("MoEFFN: temperature %r must be > 0" % (temperature,))
        _activation(activation)
        self.dim, self.hidden, self.n_experts, self.top_k = dim, hidden, experts, top_k
        self.activation, self.temperature = activation, float(temperature)
        self.router = nn.Linear(dim, experts)
        self.experts = nn.ModuleList([FFNExpert(dim, hidden) for _ in range(experts)])

    def forward(self, x):
        f = x.reshape(-1, self.dim)
        r = route(self.router(f), self.top_k, temperature=self.temperature)
        self._record(r, x.shape[:-1])
        act = _activation(self.activation)

        def expert(e, tok):
            ex = self.experts[e]
            return ex.fc2(act(ex.fc1(f[tok])))

        y = combine(f.new_zeros(f.shape[0], self.dim), r.ids, r.gates, self.n_experts, expert)
        return y.reshape(tuple(x.shape[:-1]) + (self.dim,))


# --------------------------------------------------------------------------------------------
# converters (vkg.export; also callable directly with a vkg.Builder)


def _p(path, sub):
    return "%s.%s" % (path, sub) if path else sub


def _np(t):
    return t.detach().cpu().double().numpy() if isinstance(t, torch.Tensor) else np.asarray(
        t, dtype=np.float64)


def _const(b, name, arr, dtype="f32"):
    """A constant (float64 values rounded once to dtype), reused when the builder already holds
    the same name with the same values (a module called twice)."""
    arr = _np(arr)
    stored = arr.astype(np.float16 if dtype == "f16" else np.float32)
    if b.has_tensor(name):
        t = b.get_tensor(name)
        if (t.role == "constant" and t.dtype == dtype and t.shape == stored.shape
                and np.array_equal(t.value, stored)):
            return t
        name = b.unique_tensor_name(name)
    return b.constant(name, stored, dtype=dtype)


def _resolve(module, fp16, stats, routing, variant=None):
    o = export_options()
    if fp16 is None:
        fp16 = o.get("fp16", False)
    if stats is None:
        stats = module.vkg_stats if module.vkg_stats is not None else o.get("moe_stats", False)
    if routing is None:
        routing = (module.vkg_routing if module.vkg_routing is not None
                   else o.get("moe_routing", False))
    if variant is None:
        variant = getattr(module, "vkg_variant", None) or o.get("moe_variant") or "shared_base"
    return bool(fp16), bool(stats), bool(routing), variant


def _one_input(module, inputs):
    inputs = [t for t in inputs if t is not None]
    if len(inputs) != 1:
        raise ExportError("%s takes one input x (..., D), got %d"
                          % (type(module).__name__, len(inputs)))
    return inputs[0]


def _router(b, path, x, weight, bias, stats, routing, name="router", **attrs):
    outs = b.moe_router(x, weight, bias, stats=stats, name=_p(path, name), **attrs)
    if routing:
        b.output_later(outs[0], _p(path, "ids"))
        b.output_later(outs[1], _p(path, "gates"))
    if stats:
        for stat, t in zip(STAT_NAMES, outs[2:]):
            b.output_later(t, _p(path, stat))
    return outs[0], outs[1]


def convert_router(b, module, inputs, path, stats=None, routing=None):
    """TopKRouter -> moe_router(x, weight, bias) -> (ids, gates)."""
    x = _one_input(module, inputs)
    _, stats, _, _ = _resolve(module, False, stats, False)
    w = _const(b, _p(path, "weight"), module.weight)
    bias = _const(b, _p(path, "bias"), module.bias) if module.bias is not None else None
    outs = b.moe_router(x, w, bias, k=module.k, first=module.first, score=module.score,
                        gates=module.gates, renorm=int(module.renorm), scale=module.scale,
                        temperature=module.temperature, stats=stats, name=path or "router")
    if stats:
        for stat, t in zip(STAT_NAMES, outs[2:]):
            b.output_later(t, _p(path, stat))
    return outs[0], outs[1]


def convert_moe_ffn(b, module, inputs, path, fp16=None, stats=None, routing=None):
    """MoEFFN -> moe_router(x, router.weight, router.bias; k, temperature) ->
    moe_experts(x, ids, gates, experts.w1, experts.b1, experts.w2, experts.b2)."""
    x = _one_input(module, inputs)
    fp16, stats, routing, _ = _resolve(module, fp16, stats, routing)
    wdt = "f16" if fp16 else "f32"
    r = module.router
    ids, gates = _router(b, path, x, _const(b, _p(path, "router.weight"), r.weight),
                         _const(b, _p(path, "router.bias"), r.bias) if r.bias is not None
                         else None, stats, routing, k=module.top_k,
                         temperature=module.temperature)
    ex = module.experts

    def stack(fn):
        return np.stack([_np(fn(e)) for e in ex])

    w1 = _const(b, _p(path, "experts.w1"), stack(lambda e: e.fc1.weight), wdt)
    b1 = _const(b, _p(path, "experts.b1"), stack(lambda e: e.fc1.bias))
    w2 = _const(b, _p(path, "experts.w2"), stack(lambda e: e.fc2.weight), wdt)
    b2 = _const(b, _p(path, "experts.b2"), stack(lambda e: e.fc2.bias))
    return b.moe_experts(x, ids, gates, w1, w2, b1, b2, activation=module.activation,
                         name=_p(path, "experts"))


def convert_deepseek_ffn(b, module, inputs, path, fp16=None, stats=None, routing=None,
                         residual=None, layer_scale=None, route=None):
    """DeepSeekMoEFFN -> moe_router(x, router.weight; k=M, first, score, gates="score", renorm,
    scale) + shared MLP (gelu: linear(x, shared.fc1, gelu) -> linear(shared.fc2); swiglu:
    linear(x, [shared.fc1; shared.fc3]) -> swiglu -> linear(shared.fc2)) +
    moe_experts(x, ids, gates, experts.w1, experts.b1, experts.w2, -, experts.w3,
    residual = the shared MLP's output).

    For a block that folds the FFN into its residual stream (vkg.deepseek_vit), all optional:
    residual: a Tensor r (..., D); the result is then r + layer_scale * FFN(x) (shared fc2's
    epilogue takes scale and residual; moe_experts chains on it).
    layer_scale: (D,) LayerScale gamma (array or torch tensor): the shared fc2 applies it as its
    `scale` input, the routed experts' w2 rows are multiplied by it before storing (exact in
    real arithmetic; the stored weight is rounded once).
    route: bypass the router: a list of (ids (..., k) i32, gates (..., k) f32) Tensors, each
    feeding one moe_experts node chained through `residual` (k <= 64 per node; e.g. every
    routed expert at weight 1 in chunks). No router node and no routing outputs then."""
    x = _one_input(module, inputs)
    fp16, stats, routing, _ = _resolve(module, fp16, stats, routing)
    wdt = "f16" if fp16 else "f32"
    gamma = None if layer_scale is None else _np(layer_scale).reshape(-1)
    if gamma is not None and gamma.shape != (module.dim,):
        raise ExportError("DeepSeekMoEFFN at %r: layer_scale has %d values, expected D=%d"
                          % (path, gamma.size, module.dim))
    routes = []
    if module.n_routed:
        if route is not None:
            routes = list(route)
            if not routes:
                raise ExportError("DeepSeekMoEFFN at %r: route is empty" % (path,))
        else:
            routes = [_router(b, path, x, _const(b, _p(path, "router.weight"),
                                                 module.router.weight),
                              None, stats, routing, k=module.top_m, first=module.first,
                              score=module.score, gates="score", renorm=int(module.renorm),
                              scale=module.scale)]
    y = residual
    sh = module.shared
    if sh is not None:
        ls = None if gamma is None else _const(b, _p(path, "layer_scale"), gamma)
        if module.act == "swiglu":
            w13 = np.concatenate([_np(sh.fc1.weight), _np(sh.fc3.weight)], 0)
            hdn = b.linear(x, _const(b, _p(path, "shared.fc1_fc3.weight"), w13, wdt),
                           name=_p(path, "shared.fc1_fc3"))
            hdn = b.swiglu(hdn, name=_p(path, "shared.swiglu"))
            y = b.linear(hdn, _const(b, _p(path, "shared.fc2.weight"), sh.fc2.weight, wdt),
                         scale=ls, residual=residual, name=_p(path, "shared.fc2"))
        else:
            hdn = b.linear(x, _const(b, _p(path, "shared.fc1.weight"), sh.fc1.weight, wdt),
                           _const(b, _p(path, "shared.fc1.bias"), sh.fc1.bias), activation=2,
                           name=_p(path, "shared.fc1"))
            y = b.linear(hdn, _const(b, _p(path, "shared.fc2.weight"), sh.fc2.weight, wdt),
                         _const(b, _p(path, "shared.fc2.bias"), sh.fc2.bias), scale=ls,
                         residual=residual, name=_p(path, "shared.fc2"))
    if module.n_routed:
        ex = module.experts
        w1 = _const(b, _p(path, "experts.w1"), ex.w1, wdt)
        b1 = _const(b, _p(path, "experts.b1"), ex.b1) if ex.b1 is not None else None
        w2v = _np(ex.w2) if gamma is None else _np(ex.w2) * gamma[None, :, None]
        w2 = _const(b, _p(path, "experts.w2"), w2v, wdt)
        w3 = _const(b, _p(path, "experts.w3"), ex.w3, wdt) if module.act == "swiglu" else None
        for i, (ids, gates) in enumerate(routes):
            y = b.moe_experts(x, ids, gates, w1, w2, b1, None, w3, residual=y,
                              activation=3 if module.act == "swiglu" else 2,
                              name=_p(path, "experts") if i == 0
                              else _p(path, "experts.%d" % i))
    return y


def moe_lora_stacked(module):
    """MoELoRAFFN's LoRA weights stacked (float64 NumPy): A1 (E*r, D) (every expert's fc1 lora_A,
    expert-major), B1 (E, H, r), A2 (E, r, H), B2 (E, D, r)."""
    ex = module.experts
    a1 = np.concatenate([_np(e.fc1.lora_A.weight) for e in ex], 0)
    b1 = np.stack([_np(e.fc1.lora_B.weight) for e in ex])
    a2 = np.stack([_np(e.fc2.lora_A.weight) for e in ex])
    b2 = np.stack([_np(e.fc2.lora_B.weight) for e in ex])
    return a1, b1, a2, b2


def moe_lora_merged(module):
    """Per-expert merged weights of MoELoRAFFN (float64): W1 + s B1_e A1_e (E, H, D), b1 tiled
    (E, H), W2 + s B2_e A2_e (E, D, H), b2 tiled (E, D)."""
    s, n = module.lora_scale, module.n_experts
    w1, b1 = _np(module.fc1.weight), _np(module.fc1.bias)
    w2, b2 = _np(module.fc2.weight), _np(module.fc2.bias)
    ex = module.experts
    mw1 = np.stack([w1 + s * _np(e.fc1.lora_B.weight) @ _np(e.fc1.lora_A.weight) for e in ex])
    mw2 = np.stack([w2 + s * _np(e.fc2.lora_B.weight) @ _np(e.fc2.lora_A.weight) for e in ex])
    return mw1, np.tile(b1, (n, 1)), mw2, np.tile(b2, (n, 1))


def convert_moe_lora_ffn(b, module, inputs, path, variant=None, fp16=None, stats=None,
                         routing=None):
    """MoELoRAFFN ->
    shared_base: moe_router(f, router.weight, router.bias; k) -> ids, gates;
      u = linear(f, fc1.weight, fc1.bias); a1 = linear(f, experts.fc1.lora_A.weight (E*r, D));
      hbar, c = moe_lora_mix(u, a1, ids, gates, experts.fc1.lora_B.weight (E, H, r),
                             experts.fc2.lora_A.weight (E, r, H), experts.fc2.lora_B.weight
                             (E, D, r), fc2.bias; lora_scale s, activation);
      y = linear(hbar, fc2.weight, residual=c).
    naive: moe_router -> moe_experts(f, ids, gates, experts.w1 = W1 + s B1_e A1_e, experts.b1 =
      b1 tiled, experts.w2 = W2 + s B2_e A2_e, experts.b2 = b2 tiled)."""
    x = _one_input(module, inputs)
    fp16, stats, routing, variant = _resolve(module, fp16, stats, routing, variant)
    if variant not in VARIANTS:
        raise ExportError("MoELoRAFFN at %r: variant %r (expected %s)"
                          % (path, variant, " or ".join(VARIANTS)))
    wdt = "f16" if fp16 else "f32"
    r = module.router
    ids, gates = _router(b, path, x, _const(b, _p(path, "router.weight"), r.weight),
                         _const(b, _p(path, "router.bias"), r.bias) if r.bias is not None
                         else None, stats, routing, k=module.top_k)
    act = _ACT_CODE[module.act]
    if variant == "naive":
        mw1, mb1, mw2, mb2 = moe_lora_merged(module)
        return b.moe_experts(x, ids, gates, _const(b, _p(path, "experts.w1"), mw1, wdt),
                             _const(b, _p(path, "experts.w2"), mw2, wdt),
                             _const(b, _p(path, "experts.b1"), mb1),
                             _const(b, _p(path, "experts.b2"), mb2), activation=act,
                             name=_p(path, "experts"))
    a1, lb1, la2, lb2 = moe_lora_stacked(module)
    u = b.linear(x, _const(b, _p(path, "fc1.weight"), module.fc1.weight, wdt),
                 _const(b, _p(path, "fc1.bias"), module.fc1.bias), name=_p(path, "fc1"))
    a = b.linear(x, _const(b, _p(path, "experts.fc1.lora_A.weight"), a1, wdt),
                 name=_p(path, "experts.fc1.lora_A"))
    hbar, c = b.moe_lora_mix(u, a, ids, gates,
                             _const(b, _p(path, "experts.fc1.lora_B.weight"), lb1, wdt),
                             _const(b, _p(path, "experts.fc2.lora_A.weight"), la2, wdt),
                             _const(b, _p(path, "experts.fc2.lora_B.weight"), lb2, wdt),
                             b2=_const(b, _p(path, "fc2.bias"), module.fc2.bias),
                             lora_scale=module.lora_scale, activation=act,
                             name=_p(path, "lora_mix"))
    return b.linear(hbar, _const(b, _p(path, "fc2.weight"), module.fc2.weight, wdt),
                    residual=c, name=_p(path, "fc2"))


def _registered(fn):
    def conv(b, module, inputs, path):
        return fn(b, module, inputs, path)
    conv.__name__ = fn.__name__
    conv.__doc__ = fn.__doc__
    return conv


register_converter(TopKRouter, _registered(convert_router))
register_converter(MoEFFN, _registered(convert_moe_ffn))
register_converter(DeepSeekMoEFFN, _registered(convert_deepseek_ffn))
register_converter(MoELoRAFFN, _registered(convert_moe_lora_ffn))


# --------------------------------------------------------------------------------------------
# demo models (python3 -m vkg moe-demo)

DEMO_KINDS = ("lora", "deepseek", "deepseek-swiglu", "ffn")
DEMO_SIZES = {
    # kind: (small, spec) constructor arguments and example shape (batch, tokens)
    "lora": (dict(dim=32, hidden=64, experts=8, top_k=2, rank=4, alpha=8),
             dict(dim=384, hidden=1536, experts=8, top_k=2, rank=8, alpha=8), (1, 257)),
    "deepseek": (dict(dim=32, experts=16, width=8, shared=2, top_m=4),
                 dict(dim=1280, experts=128, width=40, shared=4, top_m=4), (1, 257)),
    "deepseek-swiglu": (dict(dim=32, experts=16, width=8, shared=2, top_m=4, act="swiglu"),
                        dict(dim=1280, experts=128, width=40, shared=4, top_m=4, act="swiglu"),
                        (1, 257)),
    "ffn": (dict(dim=32, hidden=64, experts=4, top_k=2),
            dict(dim=256, hidden=1024, experts=4, top_k=2), (1, 31)),
}


def randomize_lora(module, std=0.1, generator=None):
    """Gives every expert's lora_B random N(0, std^2) values (PEFT initializes them to zero,
    which makes MoE-LoRA equal to the frozen FFN)."""
    with torch.no_grad():
        for ex in module.experts:
            for ad in (ex.fc1, ex.fc2):
                ad.lora_B.weight.copy_(torch.randn(ad.lora_B.weight.shape, generator=generator)
                                       * std)
    return module


def demo(kind, size="small", seed=0):
    """(module, example input) for a demo MoE FFN: kind in DEMO_KINDS, size "small" or "spec"
    (model-spec sizes: S1 D=384 H=1536 E=8 r=8; S2 D=1280 E=128 w=40 S=4 M=4; S3 D=256 H=1024
    E=4); random weights from seed (LoRA B non-zero)."""
    if kind not in DEMO_SIZES:
        raise ValueError("moe demo %r: expected one of %s" % (kind, ", ".join(DEMO_KINDS)))
    if size not in ("small", "spec"):
        raise ValueError("moe demo size %r: expected 'small' or 'spec'" % (size,))
    small, spec, (batch, tokens) = DEMO_SIZES[kind]
    args = dict(small if size == "small" else spec)
    torch.manual_seed(seed)
    if kind == "lora":
        m = MoELoRAFFN(**args)
        randomize_lora(m)
    elif kind == "ffn":
        m = MoEFFN(**args)
    else:
        m = DeepSeekMoEFFN(**args)
    g = torch.Generator().manual_seed(seed + 1)
    return m.eval(), torch.randn(batch, tokens, args["dim"], generator=g)
