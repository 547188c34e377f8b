"""A straightforward NumPy interpreter of a read .vkg graph (vkg.format.Graph).

Computes in float64 by default (compute_dtype=np.float32 to mimic the device), binds the inputs'
symbolic dims from the given arrays, and checks every recorded dim of every tensor against what it
computes (fixed dims must match, named symbols must equal their bound size, '' is unchecked).
Used to test the exporter independently of the C runtime.

i32 tensors (the MoE routing ids) stay int32 arrays. Nodes may have several outputs (moe_router,
moe_lora_mix). The MoE ops follow docs/graph-format.md: moe_router selects its top-k on the logits
rounded to float32 (what the device compares; ties go to the lower column), counts are exact
integers, every per-token sum runs over the slots in ascending expert id.
"""

import math

import numpy as np

from .format import FormatError, read_graph

_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(x.dtype))


def _check_dims(t, arr, symbols, bind):
    if arr.ndim != t.rank:
        raise FormatError("tensor %r: rank %d recorded, %d computed" % (t.name, t.rank, arr.ndim))
    for i, (d, s) in enumerate(zip(t.dims, t.sym)):
        n = arr.shape[i]
        if s is None:
            if d != n:
                raise FormatError("tensor %r dim %d: %d recorded, %d computed" % (t.name, i, d, n))
        elif s:
            if s in symbols:
                if symbols[s] != n:
                    raise FormatError("tensor %r dim %d: symbol %r is %d, computed %d"
                                      % (t.name, i, s, symbols[s], n))
            elif bind:
                symbols[s] = n
            else:
                raise FormatError("tensor %r dim %d: unbound symbol %r" % (t.name, i, s))


def run(graph, inputs, compute_dtype=np.float64):
    """Runs graph (a Graph, a path or bytes) on inputs (a dict name -> array, or a list in input
    order). Returns a dict output name -> array (compute_dtype)."""
    if not hasattr(graph, "nodes"):
        graph = read_graph(graph)
    if not isinstance(inputs, dict):
        inputs = list(inputs)
        if len(inputs) != len(graph.inputs):
            raise ValueError("%d inputs given, the graph has %d" % (len(inputs), len(graph.inputs)))
        inputs = dict(zip(graph.input_names, inputs))
    vals, symbols = {}, {}
    for i in graph.inputs:
        t = graph.tensors[i]
        if t.name not in inputs:
            raise ValueError("input %r not given" % t.name)
        arr = np.asarray(inputs[t.name])
        if t.dtype == "i32":
            if arr.dtype.kind not in "iu" or (arr.size and (arr.min() < -2 ** 31
                                                             or arr.max() >= 2 ** 31)):
                raise ValueError("input %r is i32; got %s values" % (t.name, arr.dtype))
            arr = arr.astype(np.int32)
        else:
            arr = arr.astype(compute_dtype)
        _check_dims(t, arr, symbols, bind=True)
        vals[i] = arr
    for t in graph.tensors:
        if t.role == "constant":
            vals[t.index] = np.asarray(t.data).astype(np.int32 if t.dtype == "i32"
                                                      else compute_dtype)

    for node in graph.topo_order():
        x = [None if i is None else vals[i] for i in node.inputs]
        y = _eval(node, x, compute_dtype)
        ys = list(y) if isinstance(y, (tuple, list)) else [y]
        if len(ys) < len(node.outputs):
            raise FormatError("node %r (%s): %d outputs, the op gives %d"
                              % (node.name, node.op, len(node.outputs), len(ys)))
        for i, arr in zip(node.outputs, ys):
            t = graph.tensors[i]
            if (t.dtype == "i32") != (arr.dtype == np.int32):
                raise FormatError("tensor %r: recorded %s, node %r computes %s"
                                  % (t.name, t.dtype, node.name, arr.dtype))
            _check_dims(t, arr, symbols, bind=False)
            vals[i] = arr
    return {graph.tensors[i].name: vals[i] for i in graph.outputs}


def _eval(node, x, dt):
    op, a = node.op, node.attrs
    if op not in _I32_OPS and any(v is not None and v.dtype == np.int32 for v in x):
        raise FormatError("node %r: %s of an i32 tensor" % (node.name, op))

    def need(n_min, n_max=None):
        n_max = n_min if n_max is None else n_max
        if not n_min <= len(x) <= n_max or any(v is None for v in x[:n_min]):
            raise FormatError("node %r (%s): %d inputs" % (node.name, op, len(x)))

    if op == "linear":
        need(2, 7)
        inp, w = x[0], x[1]
        if w.ndim != 2 or inp.shape[-1] != w.shape[1]:
            raise FormatError("node %r: x %s and weight %s" % (node.name, inp.shape, w.shape))
        y = inp @ w.T
        if len(x) > 2 and x[2] is not None:
            y = y + x[2]
        if len(x) > 5:
            y = y + _lora_term(node, inp, x[5], x[6] if len(x) > 6 else None, a)
        act = a.get("activation", 0)
        if act == 1:
            y = np.maximum(y, 0)
        elif act == 2:
            y = gelu(y)
        elif act != 0:
            raise FormatError("node %r: activation %r" % (node.name, act))
        if len(x) > 3 and x[3] is not None:
            y = y * x[3]
        if len(x) > 4 and x[4] is not None:
            if x[4].shape != y.shape:
                raise FormatError("node %r: residual %s, output %s" % (node.name, x[4].shape, y.shape))
            y = y + x[4]
        return y.astype(dt)
    if op == "layernorm":
        if len(x) not in (1, 3) or (len(x) == 3 and (x[1] is None) != (x[2] is None)):
            raise FormatError("node %r: layernorm takes x or x, weight, bias" % node.name)
        if "eps" not in a:
            raise FormatError("node %r: layernorm without eps" % node.name)
        v = x[0]
        mean = v.mean(axis=-1, keepdims=True)
        var = ((v - mean) ** 2).mean(axis=-1, keepdims=True)
        y = (v - mean) / np.sqrt(var + a["eps"])
        if len(x) == 3 and x[1] is not None:
            y = y * x[1] + x[2]
        return y.astype(dt)
    if op == "gelu":
        need(1)
        if a.get("approximate", "none") != "none":
            raise FormatError("node %r: gelu approximate=%r" % (node.name, a["approximate"]))
        return gelu(x[0]).astype(dt)
    if op == "relu":
        need(1)
        return np.maximum(x[0], 0).astype(dt)
    if op == "add_n":
        need(2, 8)
        if any(v.shape != x[0].shape for v in x):
            raise FormatError("node %r: add_n of shapes %s" % (node.name, [v.shape for v in x]))
        y = x[0].astype(dt)
        for v in x[1:]:
            y = y + v
        return (y * a.get("scale", 1.0)).astype(dt)
    if op == "tanh":
        need(1)
        return np.tanh(x[0].astype(np.float64)).astype(dt)
    if op == "sigmoid":
        need(1)
        v = x[0].astype(np.float64)
        return (0.5 * (1.0 + np.tanh(0.5 * v))).astype(dt)
    if op == "swiglu":
        need(1)
        v = x[0]
        if v.ndim < 1 or v.shape[-1] % 2:
            raise FormatError("node %r: swiglu input %s has no even last dim" % (node.name, v.shape))
        hh = v.shape[-1] // 2
        g, u = v[..., :hh], v[..., hh:]
        return (g / (1.0 + np.exp(-g)) * u).astype(dt)
    if op in ("add", "mul"):
        need(2)
        try:
            return (x[0] + x[1] if op == "add" else x[0] * x[1]).astype(dt)
        except ValueError:
            raise FormatError("node %r: shapes %s and %s do not broadcast"
                              % (node.name, x[0].shape, x[1].shape)) from None
    if op == "softmax":
        need(1)
        v = x[0]
        axis = a.get("axis", -1)
        if axis not in (-1, v.ndim - 1):
            raise FormatError("node %r: softmax axis %r is not the last" % (node.name, axis))
        e = np.exp(v - v.max(axis=-1, keepdims=True))
        return (e / e.sum(axis=-1, keepdims=True)).astype(dt)
    if op == "reshape":
        need(1)
        v = x[0]
        shape = list(a["shape"])
        for i, s in enumerate(shape):
            if s == 0:
                if i >= v.ndim:
                    raise FormatError("node %r: shape %s copies a missing dim" % (node.name, shape))
                shape[i] = v.shape[i]
        try:
            return v.reshape(shape)
        except ValueError:
            raise FormatError("node %r: cannot reshape %s to %s" % (node.name, v.shape,
                                                                   a["shape"])) from None
    if op in _EXTRA_OPS:
        return _EXTRA_OPS[op](node, x, a, dt)
    raise FormatError("node %r: unknown op %r" % (node.name, op))


# -- attention, patchify, insert_tokens, slice --------------------------------------------------

def _softmax_last(v):
    e = np.exp(v - v.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def attention_ref(q, k, v, heads, scale=None, mask=None, key_padding=None):
    """q (N, Tq, H*d), k, v (N, Tk, H*d) -> (N, Tq, H*d): per-head softmax attention."""
    n, tq, hd = q.shape
    tk = k.shape[1]
    if hd % heads:
        raise ValueError("width %d is not a multiple of heads=%d" % (hd, heads))
    d = hd // heads
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    qh = q.reshape(n, tq, heads, d).transpose(0, 2, 1, 3)
    kh = k.reshape(n, tk, heads, d).transpose(0, 2, 1, 3)
    vh = v.reshape(n, tk, heads, d).transpose(0, 2, 1, 3)
    s = np.matmul(qh, kh.transpose(0, 1, 3, 2)) * scale            # (N, H, Tq, Tk)
    if mask is not None:
        s = s + (mask[None, None] if mask.ndim == 2 else mask[:, None])
    if key_padding is not None:
        s = s + key_padding[:, None, None, :]
    o = np.matmul(_softmax_last(s), vh)                               # (N, H, Tq, d)
    return o.transpose(0, 2, 1, 3).reshape(n, tq, hd)


def _eval_attention(node, x, a, dt):
    if "heads" not in a:
        raise FormatError("node %r: attention without heads" % node.name)
    heads = int(a["heads"])
    scale = a.get("scale")
    packed = int(a.get("packed", 0))
    n_main = 1 if packed else 3
    if not n_main <= len(x) <= n_main + 2 or any(v is None for v in x[:n_main]):
        raise FormatError("node %r (attention, packed=%d): %d inputs" % (node.name, packed, len(x)))
    extra = list(x[n_main:]) + [None] * (n_main + 2 - len(x))
    mask, kp = extra
    if packed:
        qkv = x[0]
        if qkv.ndim != 3 or qkv.shape[2] % 3:
            raise FormatError("node %r: qkv %s is not (N, T, 3*H*d)" % (node.name, qkv.shape))
        w = qkv.shape[2] // 3
        q, k, v = qkv[..., :w], qkv[..., w:2 * w], qkv[..., 2 * w:]
    else:
        q, k, v = x[0], x[1], x[2]
        if "k_col" in a or "v_col" in a:
            kc, vc, hd = int(a.get("k_col", -1)), int(a.get("v_col", -1)), q.shape[-1]
            if kc < 0 or vc < 0 or k.shape != v.shape or k.ndim != 3 or max(kc, vc) + hd > k.shape[2]:
                raise FormatError("node %r: k_col %d, v_col %d: k %s, v %s cannot hold %d columns"
                                  % (node.name, kc, vc, k.shape, v.shape, hd))
            k, v = k[..., kc:kc + hd], v[..., vc:vc + hd]
        if q.ndim != 3 or k.shape != v.shape or k.ndim != 3 or q.shape[0] != k.shape[0] \
                or q.shape[2] != k.shape[2]:
            raise FormatError("node %r: q %s, k %s, v %s" % (node.name, q.shape, k.shape, v.shape))
    nb, tq, hd = q.shape
    tk = k.shape[1]
    if heads < 1 or hd % heads:
        raise FormatError("node %r: width %d and heads=%d" % (node.name, hd, heads))
    if mask is not None and mask.shape not in ((tq, tk), (nb, tq, tk)):
        raise FormatError("node %r: mask %s, expected (%d, %d) or (%d, %d, %d)"
                          % (node.name, mask.shape, tq, tk, nb, tq, tk))
    if kp is not None and kp.shape != (nb, tk):
        raise FormatError("node %r: key_padding %s, expected (%d, %d)"
                          % (node.name, kp.shape, nb, tk))
    return attention_ref(q, k, v, heads, scale, mask, kp).astype(dt)


def patchify_ref(x, p):
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
    return y.reshape(n, (h // p) * (w // p), c * p * p)


def _eval_patchify(node, x, a, dt):
    if len(x) != 1 or x[0] is None or "patch" not in a:
        raise FormatError("node %r: patchify takes x and attribute patch" % node.name)
    v, p = x[0], int(a["patch"])
    if v.ndim != 4 or p < 1 or v.shape[2] % p or v.shape[3] % p:
        raise FormatError("node %r: x %s is not (N, C, H, W) with H, W multiples of %d"
                          % (node.name, v.shape, p))
    return patchify_ref(v, p).astype(dt)


def _eval_insert_tokens(node, x, a, dt):
    if len(x) != 2 or any(v is None for v in x) or "index" not in a:
        raise FormatError("node %r: insert_tokens takes x, t and attribute index" % node.name)
    v, t = x
    idx = int(a["index"])
    if v.ndim != 3 or t.ndim != 3 or t.shape[2] != v.shape[2] or t.shape[0] not in (1, v.shape[0]):
        raise FormatError("node %r: x %s, t %s" % (node.name, v.shape, t.shape))
    if not 0 <= idx <= v.shape[1]:
        raise FormatError("node %r: index %d outside 0..%d" % (node.name, idx, v.shape[1]))
    t = np.broadcast_to(t, (v.shape[0],) + t.shape[1:])
    return np.concatenate([v[:, :idx], t, v[:, idx:]], axis=1).astype(dt)


def _eval_slice(node, x, a, dt):
    if len(x) != 1 or x[0] is None or any(k not in a for k in ("axis", "start", "end")):
        raise FormatError("node %r: slice takes x and attributes axis, start, end" % node.name)
    v = x[0]
    axis, start, end = int(a["axis"]), int(a["start"]), int(a["end"])
    if not -v.ndim <= axis < v.ndim:
        raise FormatError("node %r: axis %d for rank %d" % (node.name, axis, v.ndim))
    axis %= v.ndim
    d = v.shape[axis]
    s = start + d if start < 0 else start
    e = end + d if end < 0 else end
    if not 0 <= s <= e <= d:
        raise FormatError("node %r: slice [%d, %d) of a dim of size %d" % (node.name, start, end, d))
    idx = [slice(None)] * v.ndim
    idx[axis] = slice(s, e)
    out = np.ascontiguousarray(v[tuple(idx)])
    return out if v.dtype == np.int32 else out.astype(dt)


_EXTRA_OPS = {"attention": _eval_attention, "patchify": _eval_patchify,
              "insert_tokens": _eval_insert_tokens, "slice": _eval_slice}


# -- LoRA inputs of linear, Mixture-of-Experts ops ----------------------------------------------

def _lora_term(node, inp, la, lb, a):
    """sum_a s_a (x A_a^T) B_a^T for linear's lora_a (R, K), lora_b (N, R) inputs."""
    if la is None or lb is None:
        raise FormatError("node %r: lora_a and lora_b must be both given" % node.name)
    r = la.shape[0] if la.ndim == 2 else -1
    if la.ndim != 2 or lb.ndim != 2 or la.shape[1] != inp.shape[-1] or lb.shape[1] != r:
        raise FormatError("node %r: lora_a %s, lora_b %s for x %s"
                          % (node.name, la.shape, lb.shape, inp.shape))
    if "lora_scale" not in a:
        raise FormatError("node %r: LoRA inputs without lora_scale" % node.name)
    scales = a["lora_scale"]
    scales = list(scales) if isinstance(scales, (list, tuple)) else [scales]
    ranks = list(a.get("lora_ranks", [r]))
    if len(scales) != len(ranks) or any(q < 1 for q in ranks) or sum(ranks) != r:
        raise FormatError("node %r: lora_scale %s / lora_ranks %s do not fit R=%d"
                          % (node.name, scales, ranks, r))
    out, o = 0, 0
    for s, q in zip(scales, ranks):
        out = out + s * ((inp @ la[o:o + q].T) @ lb[:, o:o + q].T)
        o += q
    return out


def _softmax_rows(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _sigmoid(z):
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _logsumexp_rows(z):
    m = z.max(axis=-1)
    return m + np.log(np.exp(z - m[:, None]).sum(axis=-1))


def _act(v, activation):
    if activation == 1:
        return np.maximum(v, 0)
    if activation == 2:
        return gelu(v)
    raise ValueError("activation %r" % (activation,))


def moe_router_ref(x, weight, bias=None, k=1, first=0, score="softmax", gates="softmax_topk",
                   renorm=0, scale=1.0, temperature=1.0, dtype=np.float64):
    """The moe_router op on NumPy arrays: returns (ids (..., k) int32, gates (..., k), counts
    (C-first), fraction (C-first), mean_score (C), load_balance (1,), z_loss (1,)).

    Top-k on the logits rounded to float32 (stable: ties to the lower column); everything else in
    dtype. With no tokens, fraction, mean_score and the losses are 0."""
    x = np.asarray(x)
    lead, d = x.shape[:-1], x.shape[-1]
    c = weight.shape[0]
    xf = x.reshape(-1, d).astype(dtype)
    z = xf @ np.asarray(weight, dtype=dtype).T
    if bias is not None:
        z = z + np.asarray(bias, dtype=dtype)
    z = (z / dtype(temperature)).astype(dtype)
    t = z.shape[0]
    sel = z[:, first:].astype(np.float32)
    order = np.argsort(-sel, axis=1, kind="stable")[:, :k]
    cols = order + first
    sc = _softmax_rows(z) if score == "softmax" else _sigmoid(z)
    if gates == "softmax_topk":
        g = _softmax_rows(np.take_along_axis(z, cols, axis=1))
    else:
        g = np.take_along_axis(sc, cols, axis=1)
        if renorm:
            g = g / g.sum(axis=1, keepdims=True)
    g = g * dtype(scale)
    counts = np.bincount(order.ravel(), minlength=c - first).astype(dtype)
    if t:
        fraction = counts / dtype(t * k)
        mean_score = sc.mean(axis=0)
        z_loss = np.array([np.mean(_logsumexp_rows(z) ** 2)], dtype=dtype)
    else:
        fraction = np.zeros(c - first, dtype)
        mean_score = np.zeros(c, dtype)
        z_loss = np.zeros(1, dtype)
    load_balance = np.array([c * np.sum(mean_score ** 2)], dtype=dtype)
    return (order.astype(np.int32).reshape(lead + (k,)), g.astype(dtype).reshape(lead + (k,)),
            counts, fraction.astype(dtype), mean_score.astype(dtype), load_balance, z_loss)


def _slots_ascending(ids):
    """For (T, k) ids: per sorted position j, the (T,) slot holding each token's j-th smallest id
    (stable: equal ids keep slot order)."""
    order = np.argsort(ids, axis=1, kind="stable")
    return [order[:, j] for j in range(ids.shape[1])]


def moe_experts_ref(x, ids, gates, w1, w2, b1=None, b2=None, w3=None, residual=None,
                    activation=2, dtype=np.float64):
    """The moe_experts op on NumPy arrays (activation 1 relu, 2 gelu, 3 swiglu)."""
    lead, d = x.shape[:-1], x.shape[-1]
    k = ids.shape[-1]
    xf = x.reshape(-1, d).astype(dtype)
    idf = np.asarray(ids).reshape(-1, k)
    gf = np.asarray(gates, dtype=dtype).reshape(-1, k)
    n_tok, n_exp = xf.shape[0], w1.shape[0]
    y = (np.zeros((n_tok, d), dtype) if residual is None
         else np.array(residual, dtype=dtype).reshape(-1, d))
    rows = np.arange(n_tok)
    for col in _slots_ascending(idf):
        e_j, g_j = idf[rows, col], gf[rows, col]
        for e in np.unique(e_j):
            if not 0 <= e < n_exp:
                continue
            m = e_j == e
            xm = xf[m]
            pre = xm @ w1[e].T
            if b1 is not None:
                pre = pre + b1[e]
            if activation == 3:
                h = pre * _sigmoid(pre) * (xm @ w3[e].T)
            else:
                h = _act(pre, activation)
            o = h @ w2[e].T
            if b2 is not None:
                o = o + b2[e]
            y[m] += g_j[m, None] * o
    return y.reshape(lead + (d,)).astype(dtype)


def moe_lora_mix_ref(u, a1, ids, gates, lora_b1, lora_a2, lora_b2, b2=None, scale=None,
                     residual=None, lora_scale=1.0, activation=2, dtype=np.float64):
    """The moe_lora_mix op on NumPy arrays: returns (hbar (..., H), c (..., D))."""
    n_exp, h_dim, r = lora_b1.shape
    d = lora_b2.shape[1]
    lead = u.shape[:-1]
    k = ids.shape[-1]
    uf = u.reshape(-1, h_dim).astype(dtype)
    af = a1.reshape(-1, n_exp * r).astype(dtype)
    idf = np.asarray(ids).reshape(-1, k)
    gf = np.asarray(gates, dtype=dtype).reshape(-1, k)
    n_tok = uf.shape[0]
    s = dtype(lora_scale)
    hbar = np.zeros((n_tok, h_dim), dtype)
    acc = np.zeros((n_tok, d), dtype)
    gsum = np.zeros(n_tok, dtype)
    rows = np.arange(n_tok)
    for col in _slots_ascending(idf):
        e_j, g_j = idf[rows, col], gf[rows, col]
        for e in np.unique(e_j):
            if not 0 <= e < n_exp:
                continue
            m = e_j == e
            g = g_j[m, None]
            h = _act(uf[m] + s * (af[m, e * r:(e + 1) * r] @ lora_b1[e].T), activation)
            hbar[m] += g * h
            acc[m] += g * (s * ((h @ lora_a2[e].T) @ lora_b2[e].T))
            gsum[m] += g[:, 0]
    c = acc
    if b2 is not None:
        c = c + gsum[:, None] * b2
    if scale is not None:
        c = c * scale
    if residual is not None:
        c = c + residual.reshape(-1, d)
    return hbar.reshape(lead + (h_dim,)).astype(dtype), c.reshape(lead + (d,)).astype(dtype)


def _moe_inputs(node, x, names, required):
    """names: the op's inputs in order, those in `required` must be present."""
    v = dict(zip(names, list(x) + [None] * (len(names) - len(x))))
    if len(x) > len(names) or any(v[n] is None for n in required):
        raise FormatError("node %r (%s): %d inputs, expected (%s) with %s present"
                          % (node.name, node.op, len(x), ", ".join(names), ", ".join(required)))
    return v


def _check_routing(node, lead, ids, gates):
    if ids.dtype != np.int32 or ids.ndim != len(lead) + 1 or ids.shape[:-1] != lead:
        raise FormatError("node %r: ids %s %s do not fit tokens %s"
                          % (node.name, ids.dtype, ids.shape, lead))
    if gates.shape != ids.shape:
        raise FormatError("node %r: gates %s, ids %s" % (node.name, gates.shape, ids.shape))


def _eval_moe_router(node, x, a, dt):
    v = _moe_inputs(node, x, ("x", "weight", "bias"), ("x", "weight"))
    xx, w, b = v["x"], v["weight"], v["bias"]
    if xx.ndim < 1 or w.ndim != 2 or xx.shape[-1] != w.shape[1]:
        raise FormatError("node %r: x %s, weight %s" % (node.name, xx.shape, w.shape))
    c = w.shape[0]
    if b is not None and b.shape != (c,):
        raise FormatError("node %r: bias %s, expected (%d,)" % (node.name, b.shape, c))
    if "k" not in a:
        raise FormatError("node %r: moe_router without k" % node.name)
    k, first = int(a["k"]), int(a.get("first", 0))
    if not 0 <= first < c or not 1 <= k <= c - first:
        raise FormatError("node %r: k=%d, first=%d with C=%d" % (node.name, k, first, c))
    score, gates = a.get("score", "softmax"), a.get("gates", "softmax_topk")
    if score not in ("softmax", "sigmoid") or gates not in ("softmax_topk", "score"):
        raise FormatError("node %r: score=%r, gates=%r" % (node.name, score, gates))
    renorm = int(a.get("renorm", 0))
    temperature = float(a.get("temperature", 1.0))
    if renorm not in (0, 1) or not temperature > 0:
        raise FormatError("node %r: renorm=%r, temperature=%r" % (node.name, renorm, temperature))
    n_out = len(node.outputs)
    if not 2 <= n_out <= 7:
        raise FormatError("node %r: moe_router has %d outputs (2..7)" % (node.name, n_out))
    return moe_router_ref(xx, w, b, k, first, score, gates, renorm, float(a.get("scale", 1.0)),
                          temperature, dtype=dt)[:n_out]


def _eval_moe_experts(node, x, a, dt):
    v = _moe_inputs(node, x, ("x", "ids", "gates", "w1", "b1", "w2", "b2", "w3", "residual"),
                    ("x", "ids", "gates", "w1", "w2"))
    xx, w1, w2 = v["x"], v["w1"], v["w2"]
    act = a.get("activation")
    if act not in (1, 2, 3):
        raise FormatError("node %r: moe_experts activation %r (1, 2 or 3 required)"
                          % (node.name, act))
    if w1.ndim != 3 or xx.shape[-1] != w1.shape[2]:
        raise FormatError("node %r: x %s, w1 %s" % (node.name, xx.shape, w1.shape))
    e, h, d = w1.shape
    want = {"w2": (e, d, h), "b1": (e, h), "b2": (e, d), "w3": (e, h, d),
            "residual": xx.shape}
    for key, shape in want.items():
        if v[key] is not None and v[key].shape != shape:
            raise FormatError("node %r: %s %s, expected %s" % (node.name, key, v[key].shape,
                                                               shape))
    if (act == 3) != (v["w3"] is not None):
        raise FormatError("node %r: w3 is required with swiglu (3) and only then" % node.name)
    _check_routing(node, xx.shape[:-1], v["ids"], v["gates"])
    return moe_experts_ref(xx, v["ids"], v["gates"], w1, w2, v["b1"], v["b2"], v["w3"],
                           v["residual"], act, dtype=dt)


def _eval_moe_lora_mix(node, x, a, dt):
    v = _moe_inputs(node, x, ("u", "a1", "ids", "gates", "lora_b1", "lora_a2", "lora_b2", "b2",
                              "scale", "residual"),
                    ("u", "a1", "ids", "gates", "lora_b1", "lora_a2", "lora_b2"))
    u, b1 = v["u"], v["lora_b1"]
    if b1.ndim != 3 or u.shape[-1] != b1.shape[1] or v["lora_b2"].ndim != 3:
        raise FormatError("node %r: u %s, lora_b1 %s" % (node.name, u.shape, b1.shape))
    e, h, r = b1.shape
    d = v["lora_b2"].shape[1]
    lead = u.shape[:-1]
    want = {"a1": lead + (e * r,), "lora_a2": (e, r, h), "lora_b2": (e, d, r), "b2": (d,),
            "scale": (d,), "residual": lead + (d,)}
    for key, shape in want.items():
        if v[key] is not None and v[key].shape != shape:
            raise FormatError("node %r: %s %s, expected %s" % (node.name, key, v[key].shape,
                                                               shape))
    _check_routing(node, lead, v["ids"], v["gates"])
    if "lora_scale" not in a:
        raise FormatError("node %r: moe_lora_mix without lora_scale" % node.name)
    act = a.get("activation", 2)
    if act not in (1, 2):
        raise FormatError("node %r: moe_lora_mix activation %r (1 or 2)" % (node.name, act))
    if len(node.outputs) != 2:
        raise FormatError("node %r: moe_lora_mix has %d outputs (2)" % (node.name,
                                                                      len(node.outputs)))
    return moe_lora_mix_ref(u, v["a1"], v["ids"], v["gates"], b1, v["lora_a2"], v["lora_b2"],
                            v["b2"], v["scale"], v["residual"], float(a["lora_scale"]), act,
                            dtype=dt)


_EXTRA_OPS.update({"moe_router": _eval_moe_router, "moe_experts": _eval_moe_experts,
                   "moe_lora_mix": _eval_moe_lora_mix})
_I32_OPS = {"moe_router", "moe_experts", "moe_lora_mix", "reshape", "slice"}



# -- conv2d, conv_transpose2d (NCHW, PyTorch semantics) ------------------------------------------

def _conv_pairs(node, a, keys):
    out = []
    for key, dflt in keys:
        v = list(a.get(key, [dflt, dflt]))
        if len(v) != 2:
            raise FormatError("node %r: %s %s is not a pair" % (node.name, key, v))
        out.append([int(e) for e in v])
    return out


def conv2d_ref(x, w, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """torch.nn.functional.conv2d: x (N, C, H, W), w (O, C/groups, kh, kw): one strided window
    of the zero-padded input per kernel tap, contracted over the group's channels."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sy, sx), (py, px), (dy, dx) = stride, padding, dilation
    ho = (h + 2 * py - dy * (kh - 1) - 1) // sy + 1
    wo = (wd + 2 * px - dx * (kw - 1) - 1) // sx + 1
    xp = np.pad(x, ((0, 0), (0, 0), (py, py), (px, px)))
    y = np.zeros((n, o, ho, wo), dtype=np.result_type(x, w))
    og = o // groups
    for g in range(groups):
        xg, wg = xp[:, g * cg:(g + 1) * cg], w[g * og:(g + 1) * og]
        for ky in range(kh):
            for kx in range(kw):
                win = xg[:, :, ky * dy:ky * dy + sy * (ho - 1) + 1:sy,
                         kx * dx:kx * dx + sx * (wo - 1) + 1:sx]
                y[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", win, wg[:, :, ky, kx])
    if bias is not None:
        y = y + bias[None, :, None, None]
    return y


def conv_transpose2d_ref(x, w, bias=None, stride=(1, 1), padding=(0, 0), output_padding=(0, 0),
                         dilation=(1, 1), groups=1):
    """torch.nn.functional.conv_transpose2d: x (N, C, H, W), w (C, O/groups, kh, kw): every input
    pixel scattered through every tap onto an uncropped canvas, then the padding cropped off."""
    n, c, h, wd = x.shape
    _, ocg, kh, kw = w.shape
    (sy, sx), (py, px), (oy, ox), (dy, dx) = stride, padding, output_padding, dilation
    ho = (h - 1) * sy - 2 * py + dy * (kh - 1) + oy + 1
    wo = (wd - 1) * sx - 2 * px + dx * (kw - 1) + ox + 1
    cg, o = c // groups, ocg * groups
    canvas = np.zeros((n, o, (h - 1) * sy + dy * (kh - 1) + 1 + oy,
                       (wd - 1) * sx + dx * (kw - 1) + 1 + ox), dtype=np.result_type(x, w))
    for g in range(groups):
        xg, wg = x[:, g * cg:(g + 1) * cg], w[g * cg:(g + 1) * cg]
        for ky in range(kh):
            for kx in range(kw):
                canvas[:, g * ocg:(g + 1) * ocg, ky * dy:ky * dy + sy * (h - 1) + 1:sy,
                       kx * dx:kx * dx + sx * (wd - 1) + 1:sx] += np.einsum(
                           "nchw,co->nohw", xg, wg[:, :, ky, kx])
    y = canvas[:, :, py:py + ho, px:px + wo]
    if bias is not None:
        y = y + bias[None, :, None, None]
    return y


def _eval_conv2d(node, x, a, dt):
    if not 2 <= len(x) <= 4 or x[0] is None or x[1] is None:
        raise FormatError("node %r: conv2d takes x, weight, bias, residual" % node.name)
    v, w = x[0], x[1]
    b, res = (list(x[2:]) + [None, None])[:2]
    groups = int(a.get("groups", 1))
    stride, pad, dil = _conv_pairs(node, a, (("stride", 1), ("padding", 0), ("dilation", 1)))
    if v.ndim != 4 or w.ndim != 4 or groups < 1 or w.shape[0] % groups or \
            v.shape[1] != w.shape[1] * groups:
        raise FormatError("node %r: x %s, weight %s, groups=%d" % (node.name, v.shape, w.shape,
                                                                   groups))
    if b is not None and b.shape != (w.shape[0],):
        raise FormatError("node %r: bias %s for %d channels" % (node.name, b.shape, w.shape[0]))
    for i in range(2):
        if v.shape[2 + i] + 2 * pad[i] - dil[i] * (w.shape[2 + i] - 1) - 1 < 0:
            raise FormatError("node %r: x %s gives an empty output" % (node.name, v.shape))
    y = conv2d_ref(v, w, b, stride, pad, dil, groups)
    act = int(a.get("activation", 0))
    if act == 1:
        y = np.maximum(y, 0)
    elif act != 0:
        raise FormatError("node %r: conv2d activation %r (0 or 1)" % (node.name, act))
    if res is not None:
        if res.shape != y.shape:
            raise FormatError("node %r: residual %s, output %s" % (node.name, res.shape, y.shape))
        y = y + res
    return y.astype(dt)


def _eval_conv_transpose2d(node, x, a, dt):
    if not 2 <= len(x) <= 3 or x[0] is None or x[1] is None:
        raise FormatError("node %r: conv_transpose2d takes x, weight, bias" % node.name)
    v, w = x[0], x[1]
    b = x[2] if len(x) > 2 else None
    groups = int(a.get("groups", 1))
    stride, pad, opad, dil = _conv_pairs(node, a, (("stride", 1), ("padding", 0),
                                                   ("output_padding", 0), ("dilation", 1)))
    if v.ndim != 4 or w.ndim != 4 or groups < 1 or w.shape[0] % groups or v.shape[1] != w.shape[0]:
        raise FormatError("node %r: x %s, weight %s, groups=%d" % (node.name, v.shape, w.shape,
                                                                   groups))
    o = w.shape[1] * groups
    if b is not None and b.shape != (o,):
        raise FormatError("node %r: bias %s for %d channels" % (node.name, b.shape, o))
    for i in range(2):
        if opad[i] and opad[i] >= stride[i] and opad[i] >= dil[i]:
            raise FormatError("node %r: output_padding %s" % (node.name, opad))
        if (v.shape[2 + i] - 1) * stride[i] - 2 * pad[i] + dil[i] * (w.shape[2 + i] - 1) + \
                opad[i] + 1 < 1:
            raise FormatError("node %r: x %s gives an empty output" % (node.name, v.shape))
    return conv_transpose2d_ref(v, w, b, stride, pad, opad, dil, groups).astype(dt)


_EXTRA_OPS.update({"conv2d": _eval_conv2d, "conv_transpose2d": _eval_conv_transpose2d})


# -- dense-head ops: resize_bilinear, adaptive_avg_pool2d, batchnorm, concat, permute, argmax ------

def _bilinear_taps(n, m, align_corners, scale):
    """ATen's upsample_bilinear2d along one axis of n inputs and m outputs: index pairs and the
    second index's weight. As ATen 1.13 on the CPU: the ratio in float32, the source coordinate
    in float64 from it, the weight rounded to float32."""
    o = np.arange(m)
    if n == m:  # ATen copies: same size is the identity
        return o, o, np.zeros(m, np.float32)
    f32 = np.float32
    if align_corners:
        ratio = f32(n - 1) / f32(m - 1) if m > 1 else f32(0)
        src = np.float64(ratio) * o
    else:
        ratio = f32(1.0 / scale) if scale else f32(n) / f32(m)
        src = np.maximum(np.float64(ratio) * (o + 0.5) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
    l1 = np.clip(src - i0, 0, 1).astype(f32)
    return i0, np.minimum(i0 + 1, n - 1), l1


def resize_bilinear_ref(x, size=None, scale=None, align_corners=False):
    """Bilinear resize of x (N, C, H, W) as F.interpolate(mode='bilinear') with size or
    scale_factor (recompute_scale_factor unset): a zero weight drops its tap, so integral source
    coordinates copy exactly (ATen's 0 * inf would give NaN there)."""
    h, w = x.shape[2:]
    if size is not None:
        ho, wo = size
        sh = sw = None
    else:
        sh, sw = scale
        ho, wo = int(math.floor(h * sh)), int(math.floor(w * sw))
    r0, r1, lh = _bilinear_taps(h, ho, align_corners, sh)
    c0, c1, lw = _bilinear_taps(w, wo, align_corners, sw)
    lh = lh.astype(x.dtype)[:, None]
    lw = lw.astype(x.dtype)[None, :]
    one = x.dtype.type(1)

    def row(r):
        a, b = x[:, :, r][..., c0], x[:, :, r][..., c1]
        return np.where(lw == 0, a, a * (one - lw) + b * lw)

    t0, t1 = row(r0), row(r1)
    return np.where(lh == 0, t0, t0 * (one - lh) + t1 * lh)


def adaptive_avg_pool2d_ref(x, size):
    h, w = x.shape[2:]
    ho, wo = size
    y = np.empty(x.shape[:2] + (ho, wo), x.dtype)
    for i in range(ho):
        r0, r1 = i * h // ho, -((-(i + 1) * h) // ho)
        for j in range(wo):
            c0, c1 = j * w // wo, -((-(j + 1) * w) // wo)
            y[:, :, i, j] = x[:, :, r0:r1, c0:c1].mean(axis=(2, 3))
    return y


def batchnorm_ref(x, mean, var, weight=None, bias=None, eps=1e-5):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def argmax_ref(x, axis=1):
    """int32 argmax: NumPy's, like PyTorch's, returns the first NaN, else the first maximum."""
    return np.argmax(x, axis=axis).astype(np.int32)


def _eval_resize_bilinear(node, x, a, dt):
    if len(x) != 1 or x[0] is None or x[0].ndim != 4:
        raise FormatError("node %r: resize_bilinear takes x (N, C, H, W)" % node.name)
    if ("size" in a) == ("scale" in a):
        raise FormatError("node %r: resize_bilinear needs exactly one of size, scale" % node.name)
    v = x[0]
    if min(v.shape[2:]) < 1:
        raise FormatError("node %r: input %s has an empty plane" % (node.name, v.shape))
    size = [int(s) for s in a["size"]] if "size" in a else None
    scale = [float(s) for s in a["scale"]] if "scale" in a else None
    if scale is not None and min(math.floor(d * s) for d, s in zip(v.shape[2:], scale)) < 1:
        raise FormatError("node %r: scale %s takes %s to an empty plane"
                          % (node.name, scale, v.shape))
    return resize_bilinear_ref(v, size, scale, bool(a.get("align_corners", 0))).astype(dt)


def _eval_adaptive_avg_pool2d(node, x, a, dt):
    if len(x) != 1 or x[0] is None or x[0].ndim != 4 or "size" not in a or min(x[0].shape[2:]) < 1:
        raise FormatError("node %r: adaptive_avg_pool2d takes x (N, C, H >= 1, W >= 1) and size"
                          % node.name)
    return adaptive_avg_pool2d_ref(x[0], [int(s) for s in a["size"]]).astype(dt)


def _eval_batchnorm(node, x, a, dt):
    if not 3 <= len(x) <= 5 or any(v is None for v in x[:3]) or "eps" not in a:
        raise FormatError("node %r: batchnorm takes x, mean, var[, weight, bias] and eps"
                          % node.name)
    v, p = x[0], list(x[1:]) + [None] * (5 - len(x))
    if v.ndim < 2 or any(t is not None and t.shape != (v.shape[1],) for t in p):
        raise FormatError("node %r: x %s with statistics %s"
                          % (node.name, v.shape, [None if t is None else t.shape for t in p]))
    return batchnorm_ref(v, p[0], p[1], p[2], p[3], float(a["eps"])).astype(dt)


def _eval_concat(node, x, a, dt):
    if not 2 <= len(x) <= 8 or any(v is None for v in x) or "axis" not in a:
        raise FormatError("node %r: concat takes 2 to 8 inputs and axis" % node.name)
    try:
        return np.concatenate(x, axis=int(a["axis"])).astype(dt)
    except (ValueError, np.AxisError) as e:
        raise FormatError("node %r: %s" % (node.name, e)) from None


def _eval_permute(node, x, a, dt):
    if len(x) != 1 or x[0] is None or "perm" not in a:
        raise FormatError("node %r: permute takes x and perm" % node.name)
    perm = [int(p) for p in a["perm"]]
    if sorted(perm) != list(range(x[0].ndim)):
        raise FormatError("node %r: perm %s for rank %d" % (node.name, perm, x[0].ndim))
    return np.ascontiguousarray(np.transpose(x[0], perm)).astype(dt)


def _eval_argmax(node, x, a, dt):
    if len(x) != 1 or x[0] is None:
        raise FormatError("node %r: argmax takes x" % node.name)
    v, axis = x[0], int(a.get("axis", 1))
    if not -v.ndim <= axis < v.ndim or v.shape[axis] == 0:
        raise FormatError("node %r: argmax over axis %d of %s" % (node.name, axis, v.shape))
    return argmax_ref(v, axis)


_EXTRA_OPS.update({"resize_bilinear": _eval_resize_bilinear,
                   "adaptive_avg_pool2d": _eval_adaptive_avg_pool2d, "batchnorm": _eval_batchnorm,
                   "concat": _eval_concat, "permute": _eval_permute, "argmax": _eval_argmax})
