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
        need(2, 3)
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
    raise FormatError("node %r: unknown op %r" % (node.name, op))
