"""The Transfuser decoder with a Mixture-of-Experts FFN (model-spec S3, §3.3-3.4) and its exporter.

Written from shared/docs/model-spec.md §3 and the seed design of `moe_transformer_decoder.py`
(shared/seeds/002_*); the seed's file itself is not public.

- `MoEConfig`: num_experts, top_k, load_balance_coef, router_z_loss_coef, router_temperature,
  activation (the seed's fields and defaults: 4, 2, 1e-2, 1e-3, 1.0, "relu").
- `MoEFeedForward(d_model, dim_feedforward, config)`: vkg.moe.MoEFFN (router Linear D->E with
  bias, z = logits / temperature, top-k over z with ties to the lower index, softmax over the k,
  experts Linear-act-Linear, contributions in ascending expert id) whose `last_aux` holds the
  layer's statistics with gradients (`aux()`).
- `MoETransformerDecoderLayer`: nn.TransformerDecoderLayer(batch_first=True, norm_first=False,
  dropout=0) with the FFN replaced by the MoE FFN:
      x = norm1(x + self_attn(x, x, x)); x = norm2(x + multihead_attn(x, mem, mem));
      x = norm3(x + moe(x))
- `MoETransformerDecoder(d_model, nhead, dim_feedforward, num_layers, config)`:
  forward(tgt (B, Q, D), memory (B, S, D)) -> (output (B, Q, D), aux) with aux summed over layers:
      moe_load_balance_loss = load_balance_coef * sum_l E * sum_e mean_t(softmax(z_l))_e^2
      moe_router_z_loss     = router_z_loss_coef * sum_l mean_t(logsumexp(z_l)^2)
      moe_aux_loss          = moe_load_balance_loss + moe_router_z_loss
      moe_usage_counts      = sum_l bincount(ids_l) (E,) int64
      moe_usage_fraction    = counts / sum(counts) (E,)
  (scalars are 0-dim tensors). With `return_aux = False` forward returns the output alone (the
  nn.TransformerDecoder contract) and keeps aux in `last_aux`.
  state_dict: layers.{i}.self_attn.* and layers.{i}.multihead_attn.* (nn.MultiheadAttention:
  in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias), layers.{i}.norm1|norm2|norm3.*,
  layers.{i}.moe.router.weight|bias, layers.{i}.moe.experts.{e}.fc1|fc2.weight|bias.
- `export_transfuser_decoder(model, queries, memory, ...)`: the .vkg graph of a
  MoETransformerDecoder or of a plain nn.TransformerDecoder (batch_first, relu/gelu, post- or
  pre-norm, optional final norm): inputs `tgt` (batch, Q, D), `memory` (batch, S, D); outputs
  `output` and, for the MoE decoder, the five statistics above ((1,) and (E,) f32).
  `convert_decoder(builder, model, tgt, memory)` adds the same nodes to a hand-built Builder.
- Importing this module registers vkg.export converters for nn.TransformerDecoder,
  nn.TransformerDecoderLayer and MoETransformerDecoder (the latter with `return_aux = False`; its
  statistics become outputs `<module path>.moe_aux_loss`, ...).
- `python3 -m vkg transfuser-decoder` (run_export): checkpoints (.pt/.pth state_dict or
  .safetensors) or `--random SEED`.

Graph: first one linear `memory_kv_proj` on memory holding every layer's K and V (columns
[2 l D, 2 l D + D) and the next D for layer l); then, per layer l (p = layers.l):
  linear p.self_attn.in_proj (packed q,k,v) -> attention (packed) -> linear p.self_attn.out_proj
  (residual = x) -> layernorm p.norm1 -> linear p.multihead_attn.q_proj -> attention (q, memory_kv_proj with k_col, v_col)
  -> linear p.multihead_attn.out_proj (residual = x) -> layernorm p.norm2 ->
  moe_router p.moe.router (k, temperature, statistics) -> moe_experts p.moe.experts (residual = x)
  -> layernorm p.norm3;
then the statistics: add_n over the layers with the coefficients (and 1/L for the fraction) as
its scale, and one add for moe_aux_loss (each layer routes the same B*Q*k pairs, so
counts / sum(counts) = mean_l fraction_l).
"""

import math
import re
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import moe
from .builder import Builder, Tensor
from .errors import ExportError
from .export import export_options, register_converter

AUX_NAMES = ("moe_aux_loss", "moe_router_z_loss", "moe_load_balance_loss", "moe_usage_counts",
             "moe_usage_fraction")
LN_EPS = 1e-5
ACTIVATIONS = ("relu", "gelu")

# navsim's TransfuserConfig (model-spec §3.1)
NAVSIM = dict(d_model=256, nhead=8, dim_feedforward=1024, num_layers=3, queries=31, memory=65)


class CheckpointError(ExportError, ValueError):
    """A checkpoint that does not fit the decoder (names the keys or the flag)."""


# --------------------------------------------------------------------------------------------
# the reference modules


@dataclass
class MoEConfig:
    """The seed's MoE settings (model-spec §3.4)."""
    num_experts: int = 4
    top_k: int = 2
    load_balance_coef: float = 1e-2
    router_z_loss_coef: float = 1e-3
    router_temperature: float = 1.0
    activation: str = "relu"

    def __post_init__(self):
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError("MoEConfig: top_k=%d outside 1..num_experts=%d"
                             % (self.top_k, self.num_experts))
        if self.num_experts > 1024 or self.top_k > 64:
            raise ValueError("MoEConfig: vkg routes at most 1024 experts and top_k <= 64")
        if not (math.isfinite(self.router_temperature) and self.router_temperature > 0):
            raise ValueError("MoEConfig: router_temperature %r must be finite and > 0"
                             % (self.router_temperature,))
        if self.activation not in ACTIVATIONS:
            raise ValueError("MoEConfig: activation %r: expected 'relu' or 'gelu'"
                             % (self.activation,))
        for what in ("load_balance_coef", "router_z_loss_coef"):
            if not math.isfinite(getattr(self, what)):
                raise ValueError("MoEConfig: %s is not finite" % what)


class MoEFeedForward(moe.MoEFFN):
    """vkg.moe.MoEFFN built from a MoEConfig; forward(x) -> y. After each forward, `last_aux`
    holds this layer's statistics (losses keep their gradients; see aux())."""

    def __init__(self, d_model, dim_feedforward, config=None):
        config = MoEConfig() if config is None else config
        super().__init__(d_model, dim_feedforward, config.num_experts, config.top_k,
                         config.activation, config.router_temperature)
        self.config = config
        self.last_aux = None

    def forward(self, x):
        f = x.reshape(-1, self.dim)
        r = moe.route(self.router(f), self.top_k, temperature=self.temperature)
        self._record(r, x.shape[:-1])
        self.last_aux = self.aux(r.stats)
        act = moe._activation(self.activation)

        def expert(e, tok):
            ex = self.experts[e]
            return ex.fc2(act(ex.fc1(f[tok])))

        y = moe.combine(f.new_zeros(f.shape[0], self.dim), r.ids, r.gates, self.n_experts,
                        expert)
        return y.reshape(tuple(x.shape[:-1]) + (self.dim,))

    def aux(self, stats=None):
        """The five statistics of one layer from routing statistics (vkg.moe.route's; default
        last_stats): coefficient-weighted losses (0-dim), counts (E,) int64, fraction (E,)."""
        s = self.last_stats if stats is None else stats
        c = self.config
        lb = s["load_balance"].reshape(()) * c.load_balance_coef
        zl = s["z_loss"].reshape(()) * c.router_z_loss_coef
        return OrderedDict([("moe_aux_loss", lb + zl), ("moe_router_z_loss", zl),
                            ("moe_load_balance_loss", lb),
                            ("moe_usage_counts", s["counts"].detach().round().long()),
                            ("moe_usage_fraction", s["fraction"].detach())])


class MoETransformerDecoderLayer(nn.Module):
    """nn.TransformerDecoderLayer(batch_first=True, norm_first=False, dropout=0) with the FFN
    replaced by MoEFeedForward (`moe`). forward(tgt, memory) -> (x, this layer's aux)."""

    def __init__(self, d_model=256, nhead=8, dim_feedforward=1024, config=None,
                 layer_norm_eps=LN_EPS):
        super().__init__()
        if d_model % nhead:
            raise ValueError("MoETransformerDecoderLayer: d_model %d is not a multiple of "
                             "nhead %d" % (d_model, nhead))
        self.config = MoEConfig() if config is None else config
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0,
                                                    batch_first=True)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm3 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.moe = MoEFeedForward(d_model, dim_feedforward, self.config)

    def forward(self, tgt, memory):
        x = tgt
        x = self.norm1(x + self.self_attn(x, x, x, need_weights=False)[0])
        x = self.norm2(x + self.multihead_attn(x, memory, memory, need_weights=False)[0])
        x = self.norm3(x + self.moe(x))
        return x, self.moe.last_aux


def sum_aux(layer_aux):
    """Sums per-layer aux dicts (MoEFeedForward.aux) into the decoder's: losses and counts
    summed, fraction = counts / sum(counts) (0 when no token was routed)."""
    layer_aux = list(layer_aux)
    out = OrderedDict()
    for name in ("moe_aux_loss", "moe_router_z_loss", "moe_load_balance_loss",
                 "moe_usage_counts"):
        v = layer_aux[0][name]
        for a in layer_aux[1:]:
            v = v + a[name]
        out[name] = v
    counts = out["moe_usage_counts"]
    total = int(counts.sum())
    out["moe_usage_fraction"] = (counts.float() / total if total
                                 else torch.zeros(counts.shape, dtype=torch.float32))
    return out


class MoETransformerDecoder(nn.Module):
    """A stack of num_layers MoETransformerDecoderLayer (independent parameters), no final norm.

    forward(tgt (B, Q, D), memory (B, S, D)) -> (output (B, Q, D), aux) where aux has
    moe_aux_loss, moe_router_z_loss, moe_load_balance_loss (0-dim), moe_usage_counts (E,) int64
    and moe_usage_fraction (E,), summed over layers (module docstring). return_aux = False: forward
    returns output alone. last_aux: the last aux; last_layer_stats: each layer's raw routing
    statistics (vkg.moe.route: counts, fraction, mean_score, load_balance, z_loss)."""

    return_aux = True

    def __init__(self, d_model=256, nhead=8, dim_feedforward=1024, num_layers=3, config=None,
                 layer_norm_eps=LN_EPS):
        super().__init__()
        if num_layers < 1:
            raise ValueError("MoETransformerDecoder: num_layers %d < 1" % num_layers)
        self.config = MoEConfig() if config is None else config
        self.d_model, self.nhead, self.dim_feedforward = d_model, nhead, dim_feedforward
        self.num_layers = num_layers
        self.layers = nn.ModuleList([
            MoETransformerDecoderLayer(d_model, nhead, dim_feedforward, self.config,
                                       layer_norm_eps) for _ in range(num_layers)])
        self.last_aux = None
        self.last_layer_stats = None

    def forward(self, tgt, memory):
        x, per_layer = tgt, []
        for layer in self.layers:
            x, a = layer(x, memory)
            per_layer.append(a)
        self.last_aux = sum_aux(per_layer)
        self.last_layer_stats = [layer.moe.last_stats for layer in self.layers]
        return (x, self.last_aux) if self.return_aux else x

    @classmethod
    def from_dense(cls, decoder, config=None, router_weight=None, router_bias=None):
        """A MoETransformerDecoder whose attention and norms are those of the plain
        nn.TransformerDecoder `decoder` (batch_first, post-norm, no final norm) and whose E
        experts are all copies of each layer's dense FFN (linear1, linear2); the routers get
        router_weight / router_bias ((E, D) and (E,), shared by all layers) or random values.
        With identical experts and gates summing to 1 it computes what decoder computes."""
        layers = list(decoder.layers)
        l0 = layers[0]
        if getattr(decoder, "norm", None) is not None or l0.norm_first:
            raise ValueError("from_dense: needs a post-norm decoder without a final norm")
        config = MoEConfig() if config is None else config
        act = _dense_activation(l0, "from_dense")
        if act != config.activation:
            raise ValueError("from_dense: the dense FFN uses %s, config.activation is %s"
                             % (act, config.activation))
        d, h = l0.linear1.in_features, l0.linear1.out_features
        m = cls(d, l0.self_attn.num_heads, h, len(layers), config, l0.norm1.eps)
        sd = OrderedDict()
        for i, layer in enumerate(layers):
            for k, v in layer.state_dict().items():
                if k.startswith(("linear1.", "linear2.")):
                    continue
                sd["layers.%d.%s" % (i, k)] = v
            for e in range(config.num_experts):
                for src, dst in (("linear1", "fc1"), ("linear2", "fc2")):
                    lin = getattr(layer, src)
                    sd["layers.%d.moe.experts.%d.%s.weight" % (i, e, dst)] = lin.weight.detach()
                    sd["layers.%d.moe.experts.%d.%s.bias" % (i, e, dst)] = lin.bias.detach()
            router = m.layers[i].moe.router
            sd["layers.%d.moe.router.weight" % i] = (router.weight.detach() if router_weight is None
                                                      else torch.as_tensor(router_weight))
            sd["layers.%d.moe.router.bias" % i] = (router.bias.detach() if router_bias is None
                                                    else torch.as_tensor(router_bias))
        m.load_state_dict(sd)
        return m


def dense_decoder(d_model=256, nhead=8, dim_feedforward=1024, num_layers=3, activation="relu",
                  norm_first=False, final_norm=False, layer_norm_eps=LN_EPS):
    """A plain nn.TransformerDecoder(batch_first=True, dropout=0) of navsim's form (relu, post-norm,
    no final norm by default)."""
    layer = nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout=0.0,
                                       activation=activation, layer_norm_eps=layer_norm_eps,
                                       batch_first=True, norm_first=norm_first)
    norm = nn.LayerNorm(d_model, eps=layer_norm_eps) if final_norm else None
    return nn.TransformerDecoder(layer, num_layers, norm=norm)


def init_random(model, seed=0, norm_std=0.1):
    """Gives every parameter of model (a MoETransformerDecoder or nn.TransformerDecoder)
    independent random values from seed, in named_modules order: Linear and attention weights
    and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)), LayerNorm weight 1 + N(0, norm_std^2) and bias
    N(0, norm_std^2) (so every layer differs and biases and norms matter). Returns model."""
    g = torch.Generator().manual_seed(int(seed))

    def uniform(p, fan_in):
        a = 1.0 / math.sqrt(fan_in)
        p.copy_((torch.rand(p.shape, generator=g, dtype=torch.float64) * 2 - 1) * a)

    with torch.no_grad():
        for _, mod in model.named_modules():
            if isinstance(mod, nn.LayerNorm):
                if mod.weight is not None:
                    mod.weight.copy_(1 + norm_std * torch.randn(mod.weight.shape, generator=g))
                    mod.bias.copy_(norm_std * torch.randn(mod.bias.shape, generator=g))
            elif isinstance(mod, nn.MultiheadAttention):
                if mod.in_proj_weight is not None:
                    uniform(mod.in_proj_weight, mod.in_proj_weight.shape[1])
                if mod.in_proj_bias is not None:
                    uniform(mod.in_proj_bias, mod.embed_dim)
            elif isinstance(mod, nn.Linear):      # out_proj, routers, experts, linear1/2
                uniform(mod.weight, mod.in_features)
                if mod.bias is not None:
                    uniform(mod.bias, mod.in_features)
    return model


F16_SUFFIXES = ("in_proj_weight", "out_proj.weight", "fc1.weight", "fc2.weight",
                "linear1.weight", "linear2.weight")


def round_weights_f16(model):
    """Rounds, in place, the matrices that `fp16=True` stores as f16 (attention projections,
    expert and FFN matrices; not the routers, biases, norms) to f16 and back: the fp32 model
    that an f16 graph computes. Returns model."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(F16_SUFFIXES):
                p.copy_(p.half().float())
    return model


def routing_margins(model, tgt, memory):
    """For each MoE layer, the smallest gap over the tokens between the k-th and (k+1)-th router
    logit z = router(x) / temperature (float64, on the layer inputs of model's fp32 forward);
    inf when k = E. Tests keep it above their tolerance so that no top-k decision is a tie."""
    xs = []
    hooks = [layer.moe.register_forward_pre_hook(lambda m, inp: xs.append(inp[0].detach()))
             for layer in model.layers]
    try:
        with torch.no_grad():
            model(tgt, memory)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for layer, x in zip(model.layers, xs):
        m = layer.moe
        if m.top_k >= m.n_experts:
            out.append(float("inf"))
            continue
        z = F.linear(x.reshape(-1, m.dim).double(), m.router.weight.double(),
                     m.router.bias.double()) / m.temperature
        s = torch.sort(z, dim=-1, descending=True).values
        out.append(float((s[:, m.top_k - 1] - s[:, m.top_k]).min()) if z.shape[0] else
                   float("inf"))
    return out


# --------------------------------------------------------------------------------------------
# the converter


def _dense_activation(layer, where):
    act = layer.activation
    if act is F.relu or isinstance(act, nn.ReLU) or act == "relu":
        return "relu"
    if act is F.gelu or act == "gelu" or (isinstance(act, nn.GELU)
                                          and getattr(act, "approximate", "none") == "none"):
        return "gelu"
    raise ExportError("%s: activation %r (vkg exports relu and exact gelu)" % (where, act))


def _check_mha(mha, where):
    if not isinstance(mha, nn.MultiheadAttention):
        raise ExportError("%s is a %s, not nn.MultiheadAttention" % (where, type(mha).__name__))
    if not mha.batch_first:
        raise ExportError("%s: batch_first=False; vkg exports batch_first=True decoders "
                          "((B, Q, D) inputs)" % where)
    if not mha._qkv_same_embed_dim or mha.in_proj_weight is None:
        raise ExportError("%s: separate kdim/vdim projections are not supported" % where)
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ExportError("%s: add_bias_kv / add_zero_attn are not supported" % where)
    if mha.embed_dim % mha.num_heads:
        raise ExportError("%s: embed_dim %d is not a multiple of num_heads %d"
                          % (where, mha.embed_dim, mha.num_heads))


def _layers(model):
    """[(layer, kind)] with kind "moe" or "dense"; checks what the converter supports."""
    if isinstance(model, MoETransformerDecoder):
        return [(layer, "moe") for layer in model.layers]
    if isinstance(model, MoETransformerDecoderLayer):
        return [(model, "moe")]
    if isinstance(model, nn.TransformerDecoder):
        return [(layer, "dense") for layer in model.layers]
    if isinstance(model, nn.TransformerDecoderLayer):
        return [(model, "dense")]
    raise ExportError("vkg.transfuser exports MoETransformerDecoder(Layer) and "
                      "nn.TransformerDecoder(Layer), got %s" % type(model).__name__)


def _p(path, sub):
    return "%s.%s" % (path, sub) if path else sub


def convert_decoder(b, model, tgt, memory, path="", fp16=False, layer_stats=False):
    """Adds model (MoETransformerDecoder, MoETransformerDecoderLayer, nn.TransformerDecoder or
    nn.TransformerDecoderLayer) to Builder b on tgt (N, Q, D) and memory (N, S, D) Tensors.

    Returns (output Tensor (N, Q, D), stats): stats is an OrderedDict of the five statistic
    Tensors (AUX_NAMES; (1,) losses, (E,) counts and fraction) for the MoE decoder, empty for a
    plain one. Marks no outputs, except that layer_stats queues each layer's router statistics
    as `<path.>layers.l.moe.<stat>` (b.output_later). fp16: attention, FFN and expert matrices
    stored as f16 (routers, biases, norms f32). Node and constant names follow the state_dict
    (`layers.l.self_attn.in_proj`, ...)."""
    layers = _layers(model)
    single = isinstance(model, (MoETransformerDecoderLayer, nn.TransformerDecoderLayer))
    wdt = "f16" if fp16 else "f32"
    for what, t in (("tgt", tgt), ("memory", memory)):
        if not isinstance(t, Tensor) or t.builder is not b:
            raise ExportError("convert_decoder: %s is not a Tensor of the builder" % what)
        if t.rank != 3:
            raise ExportError("convert_decoder: %s must be (N, T, D), got %s"
                              % (what, list(t.shape)))

    def const(name, arr, dtype="f32"):
        return moe._const(b, name, arr, dtype)

    prefixes = [path if single else _p(path, "layers.%d" % i) for i in range(len(layers))]
    # checks, then the memory K/V projections of every layer first (they depend on memory only)
    kv = []
    for (layer, kind), pre in zip(layers, prefixes):
        where = "%s at %r" % (type(layer).__name__, pre)
        _check_mha(layer.self_attn, where + ".self_attn")
        _check_mha(layer.multihead_attn, where + ".multihead_attn")
        if kind == "dense":
            _dense_activation(layer, where)
        d = layer.self_attn.embed_dim
        for what, t in (("tgt", tgt), ("memory", memory)):
            if isinstance(t.shape[2], int) and t.shape[2] != d:
                raise ExportError("%s: %s has D=%d, the layer has d_model %d"
                                  % (where, what, t.shape[2], d))
    # One projection for every layer's memory K and V: memory does not change across layers, so
    # one (N*S, D) x (D, 2*D*L) matmul replaces 2*L small ones (a dispatch and a barrier each);
    # layer l's attention reads K and V as column windows [2 l D, (2 l + 1) D) and the next D.
    ws, bs, any_bias = [], [], False
    for (layer, kind), pre in zip(layers, prefixes):
        mha, d = layer.multihead_attn, layer.multihead_attn.embed_dim
        ws.append(moe._np(mha.in_proj_weight)[d:3 * d])
        if mha.in_proj_bias is not None:
            any_bias = True
            bs.append(moe._np(mha.in_proj_bias)[d:3 * d])
        else:
            bs.append(np.zeros(2 * d, dtype=np.float32))
    kv_pre = _p(path, "memory_kv_proj")
    kv_all = b.linear(memory, const(kv_pre + ".weight", np.concatenate(ws), wdt),
                      const(kv_pre + ".bias", np.concatenate(bs)) if any_bias else None,
                      name=kv_pre)
    col = 0
    for (layer, kind), pre in zip(layers, prefixes):
        d = layer.multihead_attn.embed_dim
        kv.append((col, col + d))
        col += 2 * d

    def ln(x, norm, name):
        return b.layernorm(x, const(name + ".weight", norm.weight), const(name + ".bias",
                                                                          norm.bias),
                           eps=norm.eps, name=name)

    def out_proj(a, mha, pre, residual):
        return b.linear(a, const(pre + ".out_proj.weight", mha.out_proj.weight, wdt),
                        None if mha.out_proj.bias is None else
                        const(pre + ".out_proj.bias", mha.out_proj.bias), residual=residual,
                        name=pre + ".out_proj")

    x = tgt
    per_layer = []
    for (layer, kind), pre, (k_col, v_col) in zip(layers, prefixes, kv):
        norm_first = bool(getattr(layer, "norm_first", False))
        # self-attention: one packed projection, packed attention, out_proj + residual
        sa, sp = layer.self_attn, _p(pre, "self_attn")
        h = ln(x, layer.norm1, _p(pre, "norm1")) if norm_first else x
        qkv = b.linear(h, const(sp + ".in_proj_weight", sa.in_proj_weight, wdt),
                       None if sa.in_proj_bias is None else
                       const(sp + ".in_proj_bias", sa.in_proj_bias), name=sp + ".in_proj")
        a = b.attention_packed(qkv, sa.num_heads, name=sp + ".attention")
        x = out_proj(a, sa, sp, x)
        if not norm_first:
            x = ln(x, layer.norm1, _p(pre, "norm1"))
        # cross-attention: q from x, k and v from memory (projected above)
        ca, cp = layer.multihead_attn, _p(pre, "multihead_attn")
        h = ln(x, layer.norm2, _p(pre, "norm2")) if norm_first else x
        d = ca.embed_dim
        q = b.linear(h, const(cp + ".q_proj.weight", ca.in_proj_weight[:d], wdt),
                     None if ca.in_proj_bias is None else
                     const(cp + ".q_proj.bias", ca.in_proj_bias[:d]), name=cp + ".q_proj")
        a = b.attention(q, kv_all, kv_all, ca.num_heads, k_col=k_col, v_col=v_col,
                        name=cp + ".attention")
        x = out_proj(a, ca, cp, x)
        if not norm_first:
            x = ln(x, layer.norm2, _p(pre, "norm2"))
        # FFN
        h = ln(x, layer.norm3, _p(pre, "norm3")) if norm_first else x
        if kind == "moe":
            m, mp = layer.moe, _p(pre, "moe")
            r = m.router
            outs = b.moe_router(h, const(mp + ".router.weight", r.weight),
                                None if r.bias is None else const(mp + ".router.bias", r.bias),
                                k=m.top_k, temperature=m.temperature, stats=True,
                                name=mp + ".router")
            ids, gates = outs[0], outs[1]
            stats = OrderedDict(zip(moe.STAT_NAMES, outs[2:]))
            per_layer.append((m, stats))
            if layer_stats:
                for s, t in stats.items():
                    b.output_later(t, "%s.%s" % (mp, s))
            ex = m.experts

            def stack(fn):
                return np.stack([moe._np(fn(e)) for e in ex])

            w1 = const(mp + ".experts.w1", stack(lambda e: e.fc1.weight), wdt)
            b1 = const(mp + ".experts.b1", stack(lambda e: e.fc1.bias))
            w2 = const(mp + ".experts.w2", stack(lambda e: e.fc2.weight), wdt)
            b2 = const(mp + ".experts.b2", stack(lambda e: e.fc2.bias))
            x = b.moe_experts(h, ids, gates, w1, w2, b1, b2, residual=x,
                              activation=m.activation, name=mp + ".experts")
        else:
            act = 1 if _dense_activation(layer, pre) == "relu" else 2
            l1, l2 = layer.linear1, layer.linear2
            hid = b.linear(h, const(_p(pre, "linear1.weight"), l1.weight, wdt),
                           None if l1.bias is None else const(_p(pre, "linear1.bias"), l1.bias),
                           activation=act, name=_p(pre, "linear1"))
            x = b.linear(hid, const(_p(pre, "linear2.weight"), l2.weight, wdt),
                         None if l2.bias is None else const(_p(pre, "linear2.bias"), l2.bias),
                         residual=x, name=_p(pre, "linear2"))
        if not norm_first:
            x = ln(x, layer.norm3, _p(pre, "norm3"))
    norm = getattr(model, "norm", None) if isinstance(model, nn.TransformerDecoder) else None
    if norm is not None:
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None:
            raise ExportError("nn.TransformerDecoder at %r: final norm %s is not an affine "
                              "nn.LayerNorm" % (path, type(norm).__name__))
        x = ln(x, norm, _p(path, "norm"))
    return x, (_sum_stats(b, per_layer, path) if per_layer else OrderedDict())


def _sum_stats(b, per_layer, path):
    """The five decoder statistics from each layer's router statistics: add_n over the layers
    with the coefficients (and 1/L for the fraction) as its scale, one dispatch each."""
    cfg = per_layer[0][0].config if hasattr(per_layer[0][0], "config") else MoEConfig()
    n = len(per_layer)

    def total(stat, name, scale=None):
        ts = [s[stat] for _, s in per_layer]
        if n == 1:
            if scale is None:
                return ts[0]
            return b.mul(ts[0], moe._const(b, _p(path, name + ".scale"),
                                           np.array([scale], dtype=np.float64)),
                         name=_p(path, "stats." + name))
        level = 0
        while len(ts) > 8:      # add_n sums at most 8 tensors: partial sums first
            ts = [ts[i] if i + 1 == len(ts) else
                  b.add_n(ts[i:i + 8], name=_p(path, "stats.%s.part%d_%d" % (name, level, i // 8)))
                  for i in range(0, len(ts), 8)]
            level += 1
        return b.add_n(ts, scale=scale, name=_p(path, "stats." + name))

    lb = total("load_balance", "moe_load_balance_loss", cfg.load_balance_coef)
    zl = total("z_loss", "moe_router_z_loss", cfg.router_z_loss_coef)
    aux = b.add(lb, zl, name=_p(path, "stats.moe_aux_loss"))
    counts = total("counts", "moe_usage_counts")
    frac = total("fraction", "moe_usage_fraction", 1.0 / n if n > 1 else None)
    return OrderedDict([("moe_aux_loss", aux), ("moe_router_z_loss", zl),
                        ("moe_load_balance_loss", lb), ("moe_usage_counts", counts),
                        ("moe_usage_fraction", frac)])


def model_config(model):
    """dict of model's sizes and MoE settings (metadata and messages)."""
    layers = _layers(model)
    l0, kind = layers[0]
    cfg = OrderedDict(kind=kind, d_model=l0.self_attn.embed_dim, heads=l0.self_attn.num_heads,
                      layers=len(layers))
    if kind == "moe":
        c = l0.moe.config if hasattr(l0.moe, "config") else MoEConfig()
        cfg.update(ffn=l0.moe.hidden, experts=l0.moe.n_experts, top_k=l0.moe.top_k,
                   activation=l0.moe.activation, temperature=l0.moe.temperature,
                   load_balance_coef=c.load_balance_coef, router_z_loss_coef=c.router_z_loss_coef)
    else:
        cfg.update(ffn=l0.linear1.out_features, activation=_dense_activation(l0, "layer 0"),
                   norm_first=bool(l0.norm_first),
                   final_norm=getattr(model, "norm", None) is not None)
    return cfg


def export_transfuser_decoder(model, queries=31, memory=65, path=None, fp16=False,
                              dynamic_batch=True, batch=1, layer_stats=False, metadata=None):
    """The .vkg graph of model (MoETransformerDecoder or a plain nn.TransformerDecoder):
    inputs `tgt` (batch, queries, D) and `memory` (batch, memory, D) f32 (batch symbolic unless
    dynamic_batch is False, then `batch`); outputs `output` (batch, queries, D) and, for the MoE
    decoder, moe_aux_loss, moe_router_z_loss, moe_load_balance_loss (1,), moe_usage_counts (E,)
    (exact integers in f32) and moe_usage_fraction (E,); layer_stats adds each layer's router
    statistics `layers.l.moe.counts`, ... after them. Returns the Builder (saved when path is
    given)."""
    from . import __version__
    cfg = model_config(model)
    d = cfg["d_model"]
    for what, v in (("queries", queries), ("memory", memory)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ExportError("export_transfuser_decoder: %s must be an int >= 1, got %r"
                              % (what, v))
    b = Builder()
    bd = "batch" if dynamic_batch else int(batch)
    tgt = b.input("tgt", [bd, int(queries), d])
    mem = b.input("memory", [bd, int(memory), d])
    out, stats = convert_decoder(b, model, tgt, mem, fp16=fp16, layer_stats=layer_stats)
    b.output(out, "output")
    for name in AUX_NAMES:
        if name in stats:
            b.output(stats[name], name)
    b.flush_outputs()
    b.metadata("producer", "vkg.export %s" % __version__)
    b.metadata("model_name", "MoETransformerDecoder" if cfg["kind"] == "moe"
               else "TransformerDecoder")
    b.metadata("exporter_version", __version__)
    for k, v in cfg.items():
        if k != "kind":
            b.metadata("decoder.%s" % k, v)
    b.metadata("decoder.queries", int(queries))
    b.metadata("decoder.memory", int(memory))
    b.metadata("decoder.weights", "f16" if fp16 else "f32")
    for k, v in (metadata or {}).items():
        b.metadata(k, v)
    if path is not None:
        b.save(path)
    return b


# vkg.export converters -------------------------------------------------------------------------


def _two_inputs(module, inputs):
    ins = [t for t in inputs if t is not None]
    if len(ins) != 2 or not all(isinstance(t, Tensor) for t in ins):
        raise ExportError("%s takes (tgt, memory); masks are not supported by the vkg export "
                          "(got %d inputs)" % (type(module).__name__, len(ins)))
    return ins


def _convert_plain(b, module, inputs, path):
    tgt, mem = _two_inputs(module, inputs)
    out, _ = convert_decoder(b, module, tgt, mem, path, fp16=export_options().get("fp16", False))
    return out


def _convert_moe_decoder(b, module, inputs, path):
    if module.return_aux:
        raise ExportError("MoETransformerDecoder at %r returns (output, aux): set "
                          "module.return_aux = False to export it with vkg.export (the "
                          "statistics become outputs <path>.moe_aux_loss, ...), or use "
                          "vkg.transfuser.export_transfuser_decoder" % (path,))
    tgt, mem = _two_inputs(module, inputs)
    out, stats = convert_decoder(b, module, tgt, mem, path,
                                 fp16=export_options().get("fp16", False))
    for name, t in stats.items():
        b.output_later(t, _p(path, name))
    return out


register_converter(nn.TransformerDecoder, _convert_plain)
register_converter(nn.TransformerDecoderLayer, _convert_plain)
register_converter(MoETransformerDecoder, _convert_moe_decoder)


# --------------------------------------------------------------------------------------------
# checkpoints and the command line

_ANCHOR = re.compile(r"^(.*?)layers\.(\d+)\.self_attn\.in_proj_weight$")


def read_state_dict(src, prefix=None):
    """The decoder's keys (layers.{i}.*, and norm.* of a plain decoder) from a path (.safetensors
    or a torch .pt/.pth state dict, possibly wrapped in {"state_dict": ...}) or a dict; the
    prefix in front of `layers.` (e.g. `_tf_decoder.` of a whole Transfuser model; found when
    None, and it must then be the only one) is removed and keys outside it are dropped. Returns
    an OrderedDict name -> torch.Tensor."""
    from .dinov2 import read_checkpoint
    try:
        sd = read_checkpoint(src)
    except ExportError as e:
        raise CheckpointError(str(e)) from e
    prefixes = sorted({m.group(1) for m in map(_ANCHOR.match, sd) if m})
    if prefix is not None:
        if prefix not in prefixes:
            raise CheckpointError("no decoder under the prefix %r (decoders found under %s)"
                                  % (prefix, ", ".join(repr(p) for p in prefixes) or "none"))
        prefixes = [prefix]
    if not prefixes:
        raise CheckpointError("no decoder in the checkpoint: no key ends with "
                              "layers.0.self_attn.in_proj_weight (%d keys, e.g. %s)"
                              % (len(sd), ", ".join(sorted(sd)[:5])))
    if len(prefixes) > 1:
        raise CheckpointError("the checkpoint holds several decoders (prefixes %s); pick one "
                              "with --prefix" % ", ".join(repr(p) for p in prefixes))
    pre = prefixes[0]
    out = OrderedDict()
    for k in sorted(sd):
        if k.startswith(pre):
            rest = k[len(pre):]
            if rest.startswith("layers.") or rest.startswith("norm."):
                out[rest] = sd[k] if torch.is_tensor(sd[k]) else torch.as_tensor(sd[k])
    return out


def infer_config(sd):
    """Sizes a decoder state dict fixes: dict(kind, layers, d_model, ffn, experts (MoE),
    final_norm (plain))."""
    ids = sorted({int(m.group(2)) for m in map(_ANCHOR.match, sd) if m})
    if ids != list(range(len(ids))):
        raise CheckpointError("decoder layers %s are not numbered 0..%d" % (ids, len(ids) - 1))
    w = sd["layers.0.self_attn.in_proj_weight"]
    if w.dim() != 2 or w.shape[0] != 3 * w.shape[1]:
        raise CheckpointError("layers.0.self_attn.in_proj_weight is %s, expected (3D, D)"
                              % (tuple(w.shape),))
    cfg = dict(layers=len(ids), d_model=int(w.shape[1]))
    if "layers.0.moe.router.weight" in sd:
        cfg["kind"] = "moe"
        cfg["experts"] = int(sd["layers.0.moe.router.weight"].shape[0])
        key = "layers.0.moe.experts.0.fc1.weight"
        if key not in sd:
            raise CheckpointError("MoE checkpoint without %s" % key)
        cfg["ffn"] = int(sd[key].shape[0])
        if any(k.startswith("norm.") for k in sd):
            raise CheckpointError("MoETransformerDecoder has no final norm, the checkpoint "
                                  "has norm.*")
    elif "layers.0.linear1.weight" in sd:
        cfg["kind"] = "dense"
        cfg["ffn"] = int(sd["layers.0.linear1.weight"].shape[0])
        cfg["final_norm"] = "norm.weight" in sd
    else:
        raise CheckpointError("layer 0 has neither moe.router.weight (MoE decoder) nor "
                              "linear1.weight (nn.TransformerDecoder)")
    return cfg


def build_model(checkpoint=None, seed=None, dense=None, d_model=None, heads=None, ffn=None,
                layers=None, experts=None, top_k=None, activation=None, temperature=None,
                load_balance_coef=None, z_loss_coef=None, norm_first=False, final_norm=None,
                prefix=None):
    """A MoETransformerDecoder (or a plain nn.TransformerDecoder: dense=True, or a checkpoint
    with linear1/linear2) loaded from checkpoint, or random from seed (init_random). Sizes left
    None come from the checkpoint, else navsim's (D 256, 8 heads, FFN 1024, 3 layers, E 4,
    k 2); a size given that the checkpoint contradicts raises CheckpointError naming it.
    prefix: the checkpoint's decoder prefix (read_state_dict)."""
    if (checkpoint is None) == (seed is None):
        raise ValueError("build_model: give a checkpoint or a seed (not both)")
    sd = None
    given = dict(d_model=d_model, ffn=ffn, layers=layers, experts=experts)
    flags = dict(d_model="--d-model", ffn="--ffn", layers="--layers", experts="--experts")
    if checkpoint is not None:
        sd = read_state_dict(checkpoint, prefix)
        found = infer_config(sd)
        if dense is not None and dense != (found["kind"] == "dense"):
            raise CheckpointError("the checkpoint holds a%s decoder" %
                                  (" plain nn.Transformer" if found["kind"] == "dense"
                                   else " MoE"))
        dense = found["kind"] == "dense"
        for k, v in given.items():
            if k in found and v is not None and v != found[k]:
                raise CheckpointError("%s %d: the checkpoint has %d" % (flags[k], v, found[k]))
            if k in found:
                given[k] = found[k]
        if dense:
            if final_norm is not None and final_norm != found["final_norm"]:
                raise CheckpointError("final norm: the checkpoint %s norm.*"
                                      % ("has" if found["final_norm"] else "has no"))
            final_norm = found["final_norm"]
    d = given["d_model"] or NAVSIM["d_model"]
    heads = heads or NAVSIM["nhead"]
    h = given["ffn"] or NAVSIM["dim_feedforward"]
    n = given["layers"] or NAVSIM["num_layers"]
    act = activation or "relu"
    if d % heads:
        raise ValueError("--d-model %d is not a multiple of --heads %d" % (d, heads))
    if dense:
        model = dense_decoder(d, heads, h, n, act, norm_first=norm_first,
                              final_norm=bool(final_norm))
    else:
        cfg = MoEConfig(num_experts=given["experts"] or 4, top_k=top_k or 2,
                        load_balance_coef=1e-2 if load_balance_coef is None
                        else load_balance_coef,
                        router_z_loss_coef=1e-3 if z_loss_coef is None else z_loss_coef,
                        router_temperature=1.0 if temperature is None else temperature,
                        activation=act)
        model = MoETransformerDecoder(d, heads, h, n, cfg)
    if sd is not None:
        missing, unexpected = _load(model, sd)
        if missing or unexpected:
            raise CheckpointError("the checkpoint does not fit %s: missing %s; unexpected %s"
                                  % (type(model).__name__, _few(missing), _few(unexpected)))
    else:
        init_random(model, seed)
    return model.eval()


def _few(keys, n=6):
    keys = list(keys)
    if not keys:
        return "none"
    return ", ".join(keys[:n]) + (" and %d more" % (len(keys) - n) if len(keys) > n else "")


def _load(model, sd):
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shaped = ["%s %s (expected %s)" % (k, tuple(sd[k].shape), tuple(own[k].shape))
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if shaped:
        raise CheckpointError("mis-shaped tensors: %s" % _few(shaped))
    if not missing and not unexpected:
        model.load_state_dict(OrderedDict((k, v.float()) for k, v in sd.items()))
    return missing, unexpected


def run_export(args):
    """`python3 -m vkg transfuser-decoder` (the parser is in vkg/__main__.py)."""
    import pickle
    import sys
    ckpt, seed = args.checkpoint, args.random
    if ckpt is not None and ckpt.startswith("random:"):
        if seed is not None:
            print("vkg transfuser-decoder: give CHECKPOINT or --random, not both",
                  file=sys.stderr)
            return 2
        try:
            ckpt, seed = None, int(ckpt[len("random:"):])
        except ValueError:
            print("vkg transfuser-decoder: %r: expected random:SEED" % args.checkpoint,
                  file=sys.stderr)
            return 2
    if (ckpt is None) == (seed is None):
        print("vkg transfuser-decoder: give a CHECKPOINT or --random SEED (one of them)",
              file=sys.stderr)
        return 2
    try:
        model = build_model(ckpt, seed, dense=True if args.dense else None,
                            d_model=args.d_model, heads=args.heads, ffn=args.ffn,
                            layers=args.layers, experts=args.experts, top_k=args.top_k,
                            activation=args.activation, temperature=args.temperature,
                            load_balance_coef=args.load_balance_coef,
                            z_loss_coef=args.z_loss_coef,
                            prefix=getattr(args, "prefix", None))
    except (ValueError, OSError, RuntimeError, pickle.UnpicklingError) as e:
        print("vkg transfuser-decoder: %s" % e, file=sys.stderr)
        return 1
    src = ("random weights, seed %d" % seed) if ckpt is None else ckpt
    b = export_transfuser_decoder(model, args.queries, args.memory, args.output, fp16=args.fp16,
                                  layer_stats=args.layer_stats,
                                  metadata={"description": "Transfuser decoder (%s)" % src})
    c = model_config(model)
    what = ("MoETransformerDecoder, E=%d, top-%d, temperature %g" %
            (c["experts"], c["top_k"], c["temperature"]) if c["kind"] == "moe"
            else "nn.TransformerDecoder (dense)")
    print("wrote %s: %s, %d layers, D=%d, %d heads, FFN %d, %s; tgt (batch, %d, %d), memory "
          "(batch, %d, %d); outputs %s; %d nodes, %d parameters"
          % (args.output, what, c["layers"], c["d_model"], c["heads"], c["ffn"],
             c["activation"], args.queries, c["d_model"], args.memory, c["d_model"],
             ", ".join(b.tensors[i].name for i in b.outputs[:6]), len(b.nodes),
             b.parameter_count()))
    return 0
