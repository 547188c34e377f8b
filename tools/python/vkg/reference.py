"""A straightforward NumPy interpreter of a read .vkg graph (vkg.format.Graph).

Computes in float64 by default (compute_dtype=np.float32 to mimic the device), binds the inputs'
symbolic dims from the given arrays, and checks every recorded dim of every tensor against what it
computes (fixed dims must match, named symbols must equal their bound size, '' is unchecked).
Used to test the exporter independently of the C runtime.
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
        arr = np.asarray(inputs[t.name]).astype(compute_dtype)
        _check_dims(t, arr, symbols, bind=True)
        vals[i] = arr
    for t in graph.tensors:
        if t.role == "constant":
            vals[t.index] = np.asarray(t.data).astype(compute_dtype)

    for node in graph.topo_order():
        x = [None if i is None else vals[i] for i in node.inputs]
        y = _eval(node, x, compute_dtype)
        t = graph.tensors[node.outputs[0]]
        _check_dims(t, y, symbols, bind=False)
        vals[node.outputs[0]] = y
    return {graph.tensors[i].name: vals[i] for i in graph.outputs}


def _eval(node, x, dt):
    op, a = node.op, node.attrs

    def need(n_min, n_max=None):
        n_max = n_min if n_max is None else n_max
        if not n_min <= len(x) <= n_max or any(v is None for v in x[:n_min]):
            raise FormatError("node %r (%s): %d inputs" % (node.name, op, len(x)))

    if op == "linear":
        need(2, 5)
        inp, w = x[0], x[1]
        if w.ndim != 2 or inp.shape[-1] != w.shape[1]:
            raise FormatError("node %r: x %s and weight %s" % (node.name, inp.shape, w.shape))
        y = inp @ w.T
        if len(x) > 2 and x[2] is not None:
            y = y + x[2]
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
    return np.ascontiguousarray(v[tuple(idx)]).astype(dt)


_EXTRA_OPS = {"attention": _eval_attention, "patchify": _eval_patchify,
              "insert_tokens": _eval_insert_tokens, "slice": _eval_slice}
