"""High-level graph builder: one method per op of the .vkg v1.0 op table.

Every method infers its output's rank and dims and checks what it can, raising ValueError that
names the node. Internally a dim is an int (fixed), a str (a graph input's symbol, e.g. "batch",
carried through ops that keep it) or None (unknown). When written, inputs keep their symbols;
intermediates and outputs write every non-fixed dim as the empty symbol ("inferred, unchecked").
"""

import math

import numpy as np

from . import format as fmt
from .errors import ExportError

ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2}
MOE_ACTIVATIONS = {"relu": 1, "gelu": 2, "swiglu": 3}
MOE_ROUTER_OUTPUTS = ("ids", "gates", "counts", "fraction", "mean_score", "load_balance", "z_loss")
LORA_MAX_ADAPTERS = 8
LORA_MAX_RANK = 512


class _OpError(ExportError, ValueError):
    """A Builder check of the dense-head ops: an ExportError that also passes where a Builder
    check's ValueError is expected (the exporter's wrapping, existing callers)."""


class Tensor:
    """A handle to a tensor of a Builder's graph."""

    def __init__(self, builder, index, name, dtype, role, shape, data=None, value=None):
        self.builder = builder
        self.index = index
        self.name = name
        self.dtype = dtype
        self.role = role
        self.shape = tuple(shape)
        self.data = data      # constants: the array as stored (bf16: uint16 bits)
        self.value = value    # constants: the values as a NumPy array (bf16 decoded to float32)

    @property
    def rank(self):
        return len(self.shape)

    def __repr__(self):
        return "Tensor(%r, %s, %s, %s)" % (self.name, self.dtype, self.role, list(self.shape))


def _dim_str(d):
    return "?" if d is None else str(d)


def _shape_str(shape):
    return "(" + ", ".join(_dim_str(d) for d in shape) + ")"


def _as_array(a):
    if hasattr(a, "detach"):      # a torch tensor
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def stack_lora(adapters):
    """Stacks PEFT adapters [(A (r_a, K), B (N, r_a), scale_a), ...] (arrays or torch tensors)
    into one lora_a (R, K) and lora_b (N, R) (float32, R = sum r_a, adapter a owning rows
    [o_a, o_a + r_a) of lora_a and the same columns of lora_b) as linear()'s LoRA inputs.
    Returns (lora_a, lora_b, scales, ranks)."""
    adapters = list(adapters)
    if not adapters:
        raise ValueError("stack_lora: no adapters given")
    if len(adapters) > LORA_MAX_ADAPTERS:
        raise ValueError("stack_lora: %d adapters, at most %d" % (len(adapters), LORA_MAX_ADAPTERS))
    As, Bs, scales, ranks = [], [], [], []
    for i, ad in enumerate(adapters):
        if len(ad) != 3:
            raise ValueError("stack_lora: adapter %d is not (A, B, scale)" % i)
        a, bm, sc = _as_array(ad[0]), _as_array(ad[1]), float(ad[2])
        if a.ndim != 2 or bm.ndim != 2 or bm.shape[1] != a.shape[0] or a.shape[0] < 1:
            raise ValueError("stack_lora: adapter %d has A %s and B %s; expected A (r, K) and "
                             "B (N, r)" % (i, a.shape, bm.shape))
        if As and (a.shape[1] != As[0].shape[1] or bm.shape[0] != Bs[0].shape[0]):
            raise ValueError("stack_lora: adapter %d has A %s, B %s but adapter 0 has A %s, B %s"
                             % (i, a.shape, bm.shape, As[0].shape, Bs[0].shape))
        As.append(a)
        Bs.append(bm)
        scales.append(sc)
        ranks.append(int(a.shape[0]))
    if sum(ranks) > LORA_MAX_RANK:
        raise ValueError("stack_lora: total rank %d > %d" % (sum(ranks), LORA_MAX_RANK))
    return (np.concatenate(As, 0).astype(np.float32), np.concatenate(Bs, 1).astype(np.float32),
            scales, ranks)


class Builder:
    def __init__(self):
        self.tensors = []
        self._tensor_names = {}
        self.nodes = []
        self._node_names = set()
        self._producer = {}
        self.inputs = []
        self.outputs = []
        self.metadata_items = {}
        self._counter = {}
        self._pending_outputs = []   # (tensor, name) marked as outputs by flush_outputs()

    # -- names --
    def _node_name(self, name, op):
        if name is None:
            k = self._counter.get(op, 0)
            name = "%s_%d" % (op, k)
            self._counter[op] = k + 1
        if not isinstance(name, str) or not name:
            raise ValueError("node name must be a non-empty string, got %r" % (name,))
        base, i = name, 1
        while name in self._node_names:
            name = "%s_%d" % (base, i)
            i += 1
        self._node_names.add(name)
        return name

    def unique_tensor_name(self, name):
        base, i = name, 1
        while name in self._tensor_names:
            name = "%s_%d" % (base, i)
            i += 1
        return name

    def has_tensor(self, name):
        return name in self._tensor_names

    def get_tensor(self, name):
        return self.tensors[self._tensor_names[name]]

    def _add_tensor(self, name, dtype, role, shape, data=None, value=None):
        if name in self._tensor_names:
            raise ValueError("tensor name %r is already used" % name)
        if len(shape) > fmt.MAX_DIMS:
            raise ValueError("tensor %r: rank %d > %d" % (name, len(shape), fmt.MAX_DIMS))
        t = Tensor(self, len(self.tensors), name, dtype, role, shape, data, value)
        self.tensors.append(t)
        self._tensor_names[name] = t.index
        return t

    def _check_tensor(self, t, node, what):
        if not isinstance(t, Tensor) or t.builder is not self:
            raise ValueError("node %r: %s is not a tensor of this builder (%r)" % (node, what, t))

    def _node(self, op, name, inputs, out_shape, attrs=None, out_name=None, dtype="f32"):
        out = self._add_tensor(self.unique_tensor_name(out_name or name), dtype, "intermediate",
                               out_shape)
        self.nodes.append(dict(op=op, name=name, inputs=list(inputs), outputs=[out.index],
                               attrs=dict(attrs or {})))
        self._producer[out.index] = name
        return out

    def _node_multi(self, op, name, inputs, outputs, attrs=None):
        """A node with several outputs: outputs is a list of (suffix, dtype, shape); output i is
        the tensor "<name>.<suffix>". inputs: Tensors or None (absent optional inputs; trailing
        ones are dropped). Returns the output Tensors in order."""
        ins = [None if t is None else t.index for t in inputs]
        while ins and ins[-1] is None:
            ins.pop()
        outs = [self._add_tensor(self.unique_tensor_name("%s.%s" % (name, suffix)), dtype,
                                 "intermediate", shape) for suffix, dtype, shape in outputs]
        self.nodes.append(dict(op=op, name=name, inputs=ins, outputs=[t.index for t in outs],
                               attrs=dict(attrs or {})))
        for t in outs:
            self._producer[t.index] = name
        return outs

    # -- graph inputs and constants --
    def input(self, name, shape, dtype="f32"):
        if dtype not in fmt.DTYPE_CODE:
            raise ValueError("input %r: unknown dtype %r" % (name, dtype))
        shape = list(shape)
        for d in shape:
            if isinstance(d, str):
                if not d:
                    raise ValueError("input %r: symbolic dims need a non-empty name" % name)
            elif not isinstance(d, (int, np.integer)) or isinstance(d, bool) or d < 0:
                raise ValueError("input %r: dim %r is neither a size nor a symbol" % (name, d))
        shape = [d if isinstance(d, str) else int(d) for d in shape]
        t = self._add_tensor(name, dtype, "input", shape)
        self.inputs.append(t.index)
        return t

    def constant(self, name, array, dtype=None):
        """A constant from a NumPy array. dtype: f32/f16/bf16/i32/u8 (default from the array;
        float64 becomes f32). bf16 is given as floats and rounded to nearest even."""
        arr = np.asarray(array)
        if dtype is None:
            dtype = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f32",
                     np.dtype(np.float16): "f16", np.dtype(np.int32): "i32",
                     np.dtype(np.uint8): "u8"}.get(arr.dtype)
            if dtype is None:
                raise ValueError("constant %r: unsupported array dtype %s (pass dtype=)"
                                 % (name, arr.dtype))
        if dtype not in fmt.DTYPE_CODE:
            raise ValueError("constant %r: unknown dtype %r" % (name, dtype))
        if dtype == "bf16":
            value = np.ascontiguousarray(arr, dtype=np.float32)
            data = fmt.float32_to_bf16_bits(value)
            value = fmt.bf16_bits_to_float32(data).reshape(arr.shape)
        else:
            data = np.ascontiguousarray(arr, dtype=fmt.numpy_dtype(dtype))
            if dtype in ("i32", "u8") and not np.array_equal(data, arr):
                raise ValueError("constant %r: values do not fit %s" % (name, dtype))
            value = data
        return self._add_tensor(name, dtype, "constant", list(arr.shape), data=data, value=value)

    # -- ops --
    def linear(self, x, weight, bias=None, activation=0, name=None, scale=None, residual=None,
               lora_a=None, lora_b=None, lora_scale=None, lora_ranks=None):
        """residual + scale * act(x weight^T + bias + sum_a s_a (x A_a^T) B_a^T).

        scale (N,) and residual (shape of the output) are optional (LayerScale and the residual
        add fused into the projection). LoRA: lora_a (R, K) and lora_b (N, R) f32/f16 constants
        (both or neither) hold one or several adapters stacked along R (see stack_lora);
        lora_scale is s (a float) or one float per adapter, lora_ranks the adapters' ranks
        (default [R]). Inputs are written as x, weight, bias, scale, residual, lora_a, lora_b with
        None for absent optional inputs before the last present one."""
        name = self._node_name(name, "linear")
        self._check_tensor(x, name, "x")
        self._check_tensor(weight, name, "weight")
        activation = self._activation(name, activation, ACTIVATIONS, (0, 1, 2))
        if x.dtype != "f32" or x.rank < 1:
            raise ValueError("node %r: x must be f32 of rank >= 1, got %s %s"
                             % (name, x.dtype, _shape_str(x.shape)))
        if weight.role != "constant" or weight.rank != 2 or weight.dtype not in ("f32", "f16"):
            raise ValueError("node %r: weight must be a rank-2 f32/f16 constant, got %r"
                             % (name, weight))
        n, k = weight.shape
        if isinstance(x.shape[-1], int) and x.shape[-1] != k:
            raise ValueError("node %r: x %s has K=%d but weight %r is (%d, %d)"
                             % (name, _shape_str(x.shape), x.shape[-1], weight.name, n, k))
        if bias is not None:
            self._check_tensor(bias, name, "bias")
            if bias.role != "constant" or bias.dtype != "f32" or bias.shape != (n,):
                raise ValueError("node %r: bias must be an f32 constant of shape (%d), got %r"
                                 % (name, n, bias))
        if scale is not None:
            self._check_tensor(scale, name, "scale")
            if scale.role != "constant" or scale.dtype != "f32" or scale.shape != (n,):
                raise ValueError("node %r: scale must be an f32 constant of shape (%d), got %r"
                                 % (name, n, scale))
        if residual is not None:
            self._check_tensor(residual, name, "residual")
            if residual.dtype != "f32" or residual.rank != x.rank or (
                    isinstance(residual.shape[-1], int) and residual.shape[-1] != n):
                raise ValueError("node %r: residual must be f32 with the output's shape, got %r"
                                 % (name, residual))
        attrs = {"activation": int(activation)} if activation else {}
        if (lora_a is None) != (lora_b is None):
            raise ValueError("node %r: lora_a and lora_b must be both given or both absent" % name)
        if lora_a is None:
            if lora_scale is not None or lora_ranks is not None:
                raise ValueError("node %r: lora_scale/lora_ranks given without lora_a, lora_b"
                                 % name)
        else:
            attrs.update(self._lora_attrs(name, n, k, lora_a, lora_b, lora_scale, lora_ranks))
        opt = [bias, scale, residual, lora_a, lora_b]
        while opt and opt[-1] is None:
            opt.pop()
        inputs = [x.index, weight.index] + [None if t is None else t.index for t in opt]
        return self._node("linear", name, inputs, list(x.shape[:-1]) + [n], attrs)

    @staticmethod
    def _activation(name, activation, table, allowed):
        if isinstance(activation, str):
            if activation not in table:
                raise ValueError("node %r: unknown activation %r (known: %s)"
                                 % (name, activation, ", ".join(sorted(table))))
            activation = table[activation]
        if isinstance(activation, bool) or activation not in allowed:
            raise ValueError("node %r: activation %r is not one of %s"
                             % (name, activation, ", ".join(str(a) for a in allowed)))
        return int(activation)

    def _lora_attrs(self, name, n, k, lora_a, lora_b, lora_scale, lora_ranks):
        self._check_tensor(lora_a, name, "lora_a")
        self._check_tensor(lora_b, name, "lora_b")
        for what, t in (("lora_a", lora_a), ("lora_b", lora_b)):
            if t.role != "constant" or t.rank != 2 or t.dtype not in ("f32", "f16"):
                raise ValueError("node %r: %s must be a rank-2 f32/f16 constant, got %r"
                                 % (name, what, t))
        r = lora_a.shape[0]
        if lora_a.shape != (r, k):
            raise ValueError("node %r: lora_a %r must be (R, K=%d)" % (name, lora_a, k))
        if lora_b.shape != (n, r):
            raise ValueError("node %r: lora_b %r must be (N=%d, R=%d) to match lora_a %s"
                             % (name, lora_b, n, r, _shape_str(lora_a.shape)))
        if not 1 <= r <= LORA_MAX_RANK:
            raise ValueError("node %r: total LoRA rank R=%d outside 1..%d"
                             % (name, r, LORA_MAX_RANK))
        ranks = [r] if lora_ranks is None else list(lora_ranks)
        if lora_scale is None:
            raise ValueError("node %r: lora_scale is required with LoRA inputs" % name)
        scales = list(lora_scale) if isinstance(lora_scale, (list, tuple, np.ndarray)) \
            else [lora_scale]
        if not 1 <= len(ranks) <= LORA_MAX_ADAPTERS:
            raise ValueError("node %r: %d LoRA adapters (1..%d allowed)"
                             % (name, len(ranks), LORA_MAX_ADAPTERS))
        for q in ranks:
            if isinstance(q, bool) or not isinstance(q, (int, np.integer)) or q < 1:
                raise ValueError("node %r: lora_ranks %s: each rank must be an int >= 1"
                                 % (name, ranks))
        if sum(ranks) != r:
            raise ValueError("node %r: lora_ranks %s sum to %d, lora_a has R=%d rows"
                             % (name, [int(q) for q in ranks], sum(ranks), r))
        if len(scales) != len(ranks):
            raise ValueError("node %r: %d lora_scale values for %d adapters (lora_ranks %s)"
                             % (name, len(scales), len(ranks), [int(q) for q in ranks]))
        scales = [float(v) for v in scales]
        if not all(np.isfinite(scales)):
            raise ValueError("node %r: lora_scale %s is not finite" % (name, scales))
        return {"lora_scale": fmt.Attr(fmt.ATTR_FLOATS, scales),
                "lora_ranks": fmt.Attr(fmt.ATTR_INTS, [int(q) for q in ranks])}

    def lora(self, name, adapters, dtype="f32"):
        """Constants for several PEFT adapters of one linear, as keyword arguments of linear():
        adapters is a list of (A (r, K), B (N, r), scale) (arrays or torch tensors);
        creates "<name>.lora_a" (R, K) and "<name>.lora_b" (N, R) in dtype (f32/f16) and returns
        dict(lora_a=..., lora_b=..., lora_scale=[...], lora_ranks=[...])."""
        a, bm, scales, ranks = stack_lora(adapters)
        return dict(lora_a=self.constant(self.unique_tensor_name(name + ".lora_a"), a, dtype=dtype),
                    lora_b=self.constant(self.unique_tensor_name(name + ".lora_b"), bm,
                                         dtype=dtype),
                    lora_scale=scales, lora_ranks=ranks)

    def layernorm(self, x, weight=None, bias=None, eps=1e-5, name=None):
        name = self._node_name(name, "layernorm")
        self._check_tensor(x, name, "x")
        if x.dtype != "f32" or x.rank < 1:
            raise ValueError("node %r: x must be f32 of rank >= 1" % name)
        if (weight is None) != (bias is None):
            raise ValueError("node %r: weight and bias must be both given or both absent" % name)
        inputs = [x.index]
        if weight is not None:
            d = x.shape[-1]
            for what, t in (("weight", weight), ("bias", bias)):
                self._check_tensor(t, name, what)
                if t.role != "constant" or t.dtype != "f32" or t.rank != 1:
                    raise ValueError("node %r: %s must be a rank-1 f32 constant, got %r"
                                     % (name, what, t))
                if isinstance(d, int) and t.shape[0] != d:
                    raise ValueError("node %r: %s %r has %d elements, x %s has D=%d"
                                     % (name, what, t.name, t.shape[0], _shape_str(x.shape), d))
            inputs += [weight.index, bias.index]
        eps = float(eps)
        if not eps > 0:
            raise ValueError("node %r: eps must be > 0, got %r" % (name, eps))
        return self._node("layernorm", name, inputs, list(x.shape), {"eps": eps})

    def _check_f32(self, x, name, what="x"):
        if x.dtype != "f32":
            raise ValueError("node %r: %s must be f32, got %s tensor %r"
                             % (name, what, x.dtype, x.name))

    def gelu(self, x, approximate="none", name=None):
        name = self._node_name(name, "gelu")
        self._check_tensor(x, name, "x")
        self._check_f32(x, name)
        if approximate != "none":
            raise ValueError("node %r: gelu approximate=%r is not supported (only 'none')"
                             % (name, approximate))
        return self._node("gelu", name, [x.index], list(x.shape))

    def relu(self, x, name=None):
        name = self._node_name(name, "relu")
        self._check_tensor(x, name, "x")
        self._check_f32(x, name)
        return self._node("relu", name, [x.index], list(x.shape))

    def tanh(self, x, name=None):
        name = self._node_name(name, "tanh")
        self._check_tensor(x, name, "x")
        self._check_f32(x, name)
        return self._node("tanh", name, [x.index], list(x.shape))

    def sigmoid(self, x, name=None):
        name = self._node_name(name, "sigmoid")
        self._check_tensor(x, name, "x")
        self._check_f32(x, name)
        return self._node("sigmoid", name, [x.index], list(x.shape))

    def swiglu(self, x, name=None):
        """silu(x[..., :h]) * x[..., h:] for x (..., 2h): output (..., h); silu(v) = v*sigmoid(v)."""
        name = self._node_name(name, "swiglu")
        self._check_tensor(x, name, "x")
        self._check_f32(x, name)
        if x.rank < 1:
            raise ValueError("node %r: swiglu needs a tensor of rank >= 1" % name)
        d = x.shape[-1]
        if isinstance(d, int):
            if d % 2:
                raise ValueError("node %r: swiglu's last dim must be even, got %d" % (name, d))
            half = d // 2
        else:
            half = None
        return self._node("swiglu", name, [x.index], list(x.shape[:-1]) + [half])

    def _broadcast(self, op, a, b, name):
        name = self._node_name(name, op)
        self._check_tensor(a, name, "a")
        self._check_tensor(b, name, "b")
        for t in (a, b):
            if t.dtype != "f32":
                raise ValueError("node %r: %s needs f32 operands, %r is %s" % (name, op, t.name,
                                                                               t.dtype))
        ra, rb = a.rank, b.rank
        r = max(ra, rb)
        sa = [1] * (r - ra) + list(a.shape)
        sb = [1] * (r - rb) + list(b.shape)
        out = []
        for da, db in zip(sa, sb):
            if da == db:
                out.append(da)
            elif da == 1:
                out.append(db)
            elif db == 1:
                out.append(da)
            elif isinstance(da, int) and isinstance(db, int):
                raise ValueError("node %r: shapes %s and %s do not broadcast"
                                 % (name, _shape_str(a.shape), _shape_str(b.shape)))
            elif isinstance(da, int):
                out.append(da)
            elif isinstance(db, int):
                out.append(db)
            else:
                out.append(None)
        return self._node(op, name, [a.index, b.index], out)

    def add_n(self, tensors, scale=None, name=None):
        """scale * (t0 + t1 + ...) for 2 to 8 f32 tensors of one shape, summed left to right in
        one dispatch (scale omitted: 1)."""
        name = self._node_name(name, "add_n")
        tensors = list(tensors)
        if not 2 <= len(tensors) <= 8:
            raise ValueError("node %r: add_n takes 2 to 8 tensors, got %d" % (name, len(tensors)))
        for i, t in enumerate(tensors):
            self._check_tensor(t, name, "input %d" % i)
            if t.dtype != "f32" or t.rank != tensors[0].rank or any(
                    isinstance(p, int) and isinstance(q, int) and p != q
                    for p, q in zip(t.shape, tensors[0].shape)):
                raise ValueError("node %r: add_n needs f32 tensors of one shape; %r and %r differ"
                                 % (name, tensors[0], t))
        attrs = {}
        if scale is not None:
            attrs["scale"] = float(scale)
        return self._node("add_n", name, [t.index for t in tensors], list(tensors[0].shape),
                          attrs)

    def add(self, a, b, name=None):
        return self._broadcast("add", a, b, name)

    def mul(self, a, b, name=None):
        return self._broadcast("mul", a, b, name)

    def softmax(self, x, axis=-1, name=None):
        name = self._node_name(name, "softmax")
        self._check_tensor(x, name, "x")
        self._check_f32(x, name)
        axis = int(axis)
        if x.rank < 1 or axis not in (-1, x.rank - 1):
            raise ValueError("node %r: softmax axis %d is not the last dim of %s"
                             % (name, axis, _shape_str(x.shape)))
        return self._node("softmax", name, [x.index], list(x.shape), {"axis": axis})

    def reshape(self, x, shape, name=None):
        """shape: ints; 0 copies x's dim at that position, one -1 is inferred."""
        name = self._node_name(name, "reshape")
        self._check_tensor(x, name, "x")
        shape = [int(s) for s in shape]
        if len(shape) > fmt.MAX_DIMS:
            raise ValueError("node %r: reshape to rank %d > 8" % (name, len(shape)))
        if shape.count(-1) > 1:
            raise ValueError("node %r: more than one -1 in shape %s" % (name, shape))
        out = []
        for i, s in enumerate(shape):
            if s == 0:
                if i >= x.rank:
                    raise ValueError("node %r: shape %s copies dim %d of rank-%d x"
                                     % (name, shape, i, x.rank))
                out.append(x.shape[i])
            elif s == -1 or s > 0:
                out.append(s)
            else:
                raise ValueError("node %r: bad entry %d in shape %s" % (name, s, shape))
        # element counts as (fixed product, symbols, unknown?)
        def count(dims):
            p, syms, unknown = 1, [], False
            for d in dims:
                if d is None:
                    unknown = True
                elif isinstance(d, str):
                    syms.append(d)
                elif d != -1:
                    p *= d
            return p, sorted(syms), unknown

        pi, si, ui = count(x.shape)
        po, so, uo = count(out)
        if -1 in out:
            j = out.index(-1)
            rest = list(si)
            ok = not ui and not uo
            for s in so:
                if s in rest:
                    rest.remove(s)
                else:
                    ok = False
            if ok and po and pi % po:
                raise ValueError("node %r: cannot reshape %s to %s" % (name, _shape_str(x.shape),
                                                                       shape))
            if ok and not rest and po:
                out[j] = pi // po
            elif ok and len(rest) == 1 and po and pi == po:
                out[j] = rest[0]
            else:
                out[j] = None
        elif not ui and not uo and (pi, si) != (po, so):
            raise ValueError("node %r: cannot reshape %s to %s (element counts differ)"
                             % (name, _shape_str(x.shape), _shape_str(out)))
        return self._node("reshape", name, [x.index], out, {"shape": fmt.Attr(fmt.ATTR_INTS,
                                                                             shape)},
                          dtype=x.dtype)

    def identity(self, x, name=None):
        """A copy of x (a reshape that keeps every dim)."""
        return self.reshape(x, [0] * x.rank, name=name or "identity")

    # -- attention, token ops (ops added to the v1.0 table: attention, patchify, insert_tokens,
    #    slice) --
    def _attention_common(self, name, n, tq, tk, mask, key_padding):
        """Checks the optional additive mask (Tq, Tk) / (N, Tq, Tk) and key_padding (N, Tk);
        returns their input indices (None where absent, trailing Nones dropped)."""
        extra = []
        if mask is not None:
            self._check_tensor(mask, name, "mask")
            if mask.dtype != "f32" or mask.rank not in (2, 3):
                raise ValueError("node %r: mask must be f32 (Tq, Tk) or (N, Tq, Tk), got %r"
                                 % (name, mask))
            want = (tq, tk) if mask.rank == 2 else (n, tq, tk)
            for got, w in zip(mask.shape, want):
                if isinstance(got, int) and isinstance(w, int) and got != w:
                    raise ValueError("node %r: mask %s does not fit (N, Tq, Tk) = %s"
                                     % (name, _shape_str(mask.shape), _shape_str((n, tq, tk))))
        if key_padding is not None:
            self._check_tensor(key_padding, name, "key_padding")
            if key_padding.dtype != "f32" or key_padding.rank != 2:
                raise ValueError("node %r: key_padding must be f32 (N, Tk), got %r"
                                 % (name, key_padding))
            for got, w in zip(key_padding.shape, (n, tk)):
                if isinstance(got, int) and isinstance(w, int) and got != w:
                    raise ValueError("node %r: key_padding %s does not fit (N, Tk) = %s"
                                     % (name, _shape_str(key_padding.shape),
                                        _shape_str((n, tk))))
        extra = [None if mask is None else mask.index,
                 None if key_padding is None else key_padding.index]
        while extra and extra[-1] is None:
            extra.pop()
        return extra

    @staticmethod
    def _attention_attrs(name, heads, scale, d_model):
        heads = int(heads)
        if heads < 1:
            raise ValueError("node %r: heads must be >= 1, got %d" % (name, heads))
        if isinstance(d_model, int) and d_model % heads:
            raise ValueError("node %r: width %d is not a multiple of heads=%d"
                             % (name, d_model, heads))
        attrs = {"heads": heads}
        if scale is not None:
            attrs["scale"] = float(scale)
        return attrs

    def attention(self, q, k, v, heads, scale=None, mask=None, key_padding=None, name=None,
                  k_col=None, v_col=None):
        """softmax(q_h k_h^T * scale + mask + key_padding) v_h per head, heads concatenated.
        q (N, Tq, H*d), k, v (N, Tk, H*d); scale defaults to 1/sqrt(d) (attribute omitted).
        k_col, v_col (together): k and v are the H*d columns starting there of k and v, which
        then share one width F (e.g. one (N, Tk, F) projection of the memory for several
        layers; k and v may be the same Tensor)."""
        name = self._node_name(name, "attention")
        for what, t in (("q", q), ("k", k), ("v", v)):
            self._check_tensor(t, name, what)
            if t.dtype != "f32" or t.rank != 3:
                raise ValueError("node %r: %s must be f32 of rank 3 (N, T, H*d), got %r"
                                 % (name, what, t))
        n = q.shape[0]
        cols = (k_col is not None) or (v_col is not None)
        if cols:
            if k_col is None or v_col is None or int(k_col) < 0 or int(v_col) < 0:
                raise ValueError("node %r: k_col and v_col come together, each >= 0" % name)
            hd, fk, fv = q.shape[2], k.shape[2], v.shape[2]
            if isinstance(fk, int) and isinstance(fv, int) and fk != fv:
                raise ValueError("node %r: with k_col/v_col, k %s and v %s must have one width"
                                 % (name, _shape_str(k.shape), _shape_str(v.shape)))
            for what, c, f in (("k", k_col, fk), ("v", v_col, fv)):
                if isinstance(hd, int) and isinstance(f, int) and int(c) + hd > f:
                    raise ValueError("node %r: %s columns [%d, %d) outside its width %d"
                                     % (name, what, int(c), int(c) + hd, f))
        for what, t in (("k", k), ("v", v)):
            for i in ((0,) if cols else (0, 2)):
                a, b = q.shape[i], t.shape[i]
                if isinstance(a, int) and isinstance(b, int) and a != b:
                    raise ValueError("node %r: q %s and %s %s differ in dim %d"
                                     % (name, _shape_str(q.shape), what, _shape_str(t.shape), i))
        if isinstance(k.shape[1], int) and isinstance(v.shape[1], int) and k.shape[1] != v.shape[1]:
            raise ValueError("node %r: k %s and v %s differ in Tk"
                             % (name, _shape_str(k.shape), _shape_str(v.shape)))
        attrs = self._attention_attrs(name, heads, scale, q.shape[2])
        if cols:
            attrs["k_col"], attrs["v_col"] = int(k_col), int(v_col)
        extra = self._attention_common(name, n, q.shape[1], k.shape[1], mask, key_padding)
        return self._node("attention", name, [q.index, k.index, v.index] + extra,
                          list(q.shape), attrs)

    def attention_packed(self, qkv, heads, scale=None, mask=None, key_padding=None, name=None):
        """attention on qkv (N, T, 3*H*d) whose column blocks are q, k, v (attribute packed=1)."""
        name = self._node_name(name, "attention")
        self._check_tensor(qkv, name, "qkv")
        if qkv.dtype != "f32" or qkv.rank != 3:
            raise ValueError("node %r: qkv must be f32 of rank 3 (N, T, 3*H*d), got %r"
                             % (name, qkv))
        w = qkv.shape[2]
        if isinstance(w, int) and w % 3:
            raise ValueError("node %r: qkv width %d is not a multiple of 3" % (name, w))
        d_model = w // 3 if isinstance(w, int) else None
        attrs = self._attention_attrs(name, heads, scale, d_model)
        attrs["packed"] = 1
        extra = self._attention_common(name, qkv.shape[0], qkv.shape[1], qkv.shape[1], mask,
                                       key_padding)
        return self._node("attention", name, [qkv.index] + extra,
                          [qkv.shape[0], qkv.shape[1], d_model], attrs)

    def patchify(self, x, patch, name=None):
        """(N, C, H, W) -> (N, (H/p)(W/p), C*p*p), patches row-major, columns (c, ky, kx)."""
        name = self._node_name(name, "patchify")
        self._check_tensor(x, name, "x")
        p = int(patch)
        if p < 1:
            raise ValueError("node %r: patch must be >= 1, got %d" % (name, p))
        if x.dtype != "f32" or x.rank != 4:
            raise ValueError("node %r: x must be f32 (N, C, H, W), got %r" % (name, x))
        n, c, h, w = x.shape
        for what, d in (("H", h), ("W", w)):
            if isinstance(d, int) and d % p:
                raise ValueError("node %r: %s=%d is not a multiple of patch %d" % (name, what, d, p))
        t = (h // p) * (w // p) if isinstance(h, int) and isinstance(w, int) else None
        cols = c * p * p if isinstance(c, int) else None
        return self._node("patchify", name, [x.index], [n, t, cols], {"patch": p})

    def insert_tokens(self, x, t, index, name=None):
        """(N, T, D) with t (1, R, D) or (N, R, D) inserted before position index -> (N, T+R, D)."""
        name = self._node_name(name, "insert_tokens")
        self._check_tensor(x, name, "x")
        self._check_tensor(t, name, "t")
        if x.dtype != "f32" or x.rank != 3 or t.dtype != "f32" or t.rank != 3:
            raise ValueError("node %r: x and t must be f32 of rank 3, got %r and %r"
                             % (name, x, t))
        index = int(index)
        T, R = x.shape[1], t.shape[1]
        if index < 0 or (isinstance(T, int) and index > T):
            raise ValueError("node %r: index %d is outside 0..%s" % (name, index, _dim_str(T)))
        if isinstance(x.shape[2], int) and isinstance(t.shape[2], int) and x.shape[2] != t.shape[2]:
            raise ValueError("node %r: x %s and t %s differ in D"
                             % (name, _shape_str(x.shape), _shape_str(t.shape)))
        tn = t.shape[0]
        if tn != 1 and tn != x.shape[0] and isinstance(tn, int) and isinstance(x.shape[0], int):
            raise ValueError("node %r: t %s must have batch 1 or N=%s"
                             % (name, _shape_str(t.shape), _dim_str(x.shape[0])))
        total = T + R if isinstance(T, int) and isinstance(R, int) else None
        return self._node("insert_tokens", name, [x.index, t.index], [x.shape[0], total, x.shape[2]],
                          {"index": index})

    def slice(self, x, axis, start, end, name=None):
        """x with dimension axis cut to [start, end) (negative values count from the end)."""
        name = self._node_name(name, "slice")
        self._check_tensor(x, name, "x")
        axis, start, end = int(axis), int(start), int(end)
        if not -x.rank <= axis < x.rank:
            raise ValueError("node %r: axis %d out of range for %s" % (name, axis,
                                                                      _shape_str(x.shape)))
        ax = axis % x.rank
        d = x.shape[ax]
        out = list(x.shape)
        if isinstance(d, int):
            s = start + d if start < 0 else start
            e = end + d if end < 0 else end
            if not 0 <= s <= e <= d:
                raise ValueError("node %r: slice [%d, %d) of dim %d (size %d) is out of range"
                                 % (name, start, end, ax, d))
            out[ax] = e - s
        elif start >= 0 and end >= 0:
            if start > end:
                raise ValueError("node %r: slice start %d > end %d" % (name, start, end))
            out[ax] = end - start
        elif start < 0 and end < 0:
            if start > end:
                raise ValueError("node %r: slice start %d > end %d" % (name, start, end))
            out[ax] = end - start
        else:
            out[ax] = None
        return self._node("slice", name, [x.index], out, {"axis": axis, "start": start,
                                                          "end": end}, dtype=x.dtype)

    # -- dense-head ops: resize_bilinear, adaptive_avg_pool2d, batchnorm, concat, permute, argmax --
    def _check_image(self, x, name):
        self._check_tensor(x, name, "x")
        if x.dtype != "f32" or x.rank != 4:
            raise _OpError("node %r: x must be f32 (N, C, H, W), got %r" % (name, x))
        for what, d in (("H", x.shape[2]), ("W", x.shape[3])):
            if isinstance(d, int) and d < 1:
                raise _OpError("node %r: x %s has %s = %d; resampling needs >= 1"
                               % (name, _shape_str(x.shape), what, d))

    @staticmethod
    def _hw(name, what, v, kind):
        """An int/float or a pair of them -> [h, w] (ints >= 1 or finite floats > 0)."""
        vals = list(v) if isinstance(v, (tuple, list, np.ndarray)) else [v, v]
        if len(vals) != 2:
            raise _OpError("node %r: %s %r: expected one value or two (H, W)" % (name, what, v))
        out = []
        for e in vals:
            if kind is int:
                if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or not 1 <= e <= 1 << 30:
                    raise _OpError("node %r: %s %r: expected sizes 1..2^30" % (name, what, v))
                out.append(int(e))
            else:
                if isinstance(e, bool) or not isinstance(e, (int, float, np.integer, np.floating)) \
                        or not 0 < float(e) < 1e9:
                    raise _OpError("node %r: %s %r: expected finite numbers > 0" % (name, what, v))
                out.append(float(e))
        return out

    def resize_bilinear(self, x, size=None, scale=None, align_corners=False, name=None):
        """PyTorch's bilinear interpolate of x (N, C, H, W) to size (Ho, Wo) or by scale (sh, sw)
        (exactly one; output floor(H sh) x floor(W sw); with align_corners=False the source steps
        by 1/scale, as F.interpolate(scale_factor=...) without recompute_scale_factor)."""
        name = self._node_name(name, "resize_bilinear")
        self._check_image(x, name)
        if (size is None) == (scale is None):
            raise _OpError("node %r: give exactly one of size and scale" % name)
        n, c, h, w = x.shape
        if size is not None:
            ho, wo = self._hw(name, "size", size, int)
            attrs = {"size": fmt.Attr(fmt.ATTR_INTS, [ho, wo])}
        else:
            sh, sw = self._hw(name, "scale", scale, float)
            ho, wo = [int(math.floor(d * s)) if isinstance(d, int) else None
                      for d, s in ((h, sh), (w, sw))]
            for what, d, o in (("H", h, ho), ("W", w, wo)):
                if o is not None and not 1 <= o <= 1 << 30:
                    raise _OpError("node %r: scale %r takes %s = %d to %d; expected 1..2^30"
                                   % (name, scale, what, d, o))
            attrs = {"scale": fmt.Attr(fmt.ATTR_FLOATS, [sh, sw])}
        if align_corners not in (0, 1, False, True):
            raise _OpError("node %r: align_corners must be a bool, got %r" % (name, align_corners))
        if align_corners:
            attrs["align_corners"] = 1
        return self._node("resize_bilinear", name, [x.index], [n, c, ho, wo], attrs)

    def adaptive_avg_pool2d(self, x, size, name=None):
        """Mean of x (N, C, H, W) over windows [floor(i H / Ho), ceil((i+1) H / Ho)) x (the same
        along W): F.adaptive_avg_pool2d, F.interpolate(mode='area')."""
        name = self._node_name(name, "adaptive_avg_pool2d")
        self._check_image(x, name)
        ho, wo = self._hw(name, "size", size, int)
        return self._node("adaptive_avg_pool2d", name, [x.index], [x.shape[0], x.shape[1], ho, wo],
                          {"size": fmt.Attr(fmt.ATTR_INTS, [ho, wo])})

    def batchnorm(self, x, mean, var, weight=None, bias=None, eps=1e-5, name=None):
        """Inference batch norm over dim 1 of x (N, C, ...): (x - mean) / sqrt(var + eps) * weight
        + bias; mean, var, weight, bias are f32 (C) tensors (weight, bias optional)."""
        name = self._node_name(name, "batchnorm")
        self._check_tensor(x, name, "x")
        if x.dtype != "f32" or x.rank < 2:
            raise _OpError("node %r: x must be f32 (N, C, ...), got %r" % (name, x))
        inputs = [x.index]
        for what, t in (("mean", mean), ("var", var), ("weight", weight), ("bias", bias)):
            if t is None:
                if what in ("mean", "var"):
                    raise _OpError("node %r: %s is required" % (name, what))
                inputs.append(None)
                continue
            self._check_tensor(t, name, what)
            if t.dtype != "f32" or t.rank != 1 or self._dims_clash(t.shape[0], x.shape[1]):
                raise _OpError("node %r: %s must be an f32 (C) tensor with C = %s, got %r"
                               % (name, what, _dim_str(x.shape[1]), t))
            inputs.append(t.index)
        while inputs[-1] is None:
            inputs.pop()
        eps = float(eps)
        if not 0 <= eps < 1e30:
            raise _OpError("node %r: eps must be finite and >= 0, got %r" % (name, eps))
        return self._node("batchnorm", name, inputs, list(x.shape), {"eps": eps})

    def concat(self, tensors, axis, name=None):
        """Concatenation of 2 or more f32 tensors of one rank along axis (negative counts from the
        end); every other dim must match. More than 8 become a chain of concat nodes."""
        name = self._node_name(name, "concat")
        ts = list(tensors)
        if len(ts) < 2:
            raise _OpError("node %r: concat needs 2 or more tensors, got %d" % (name, len(ts)))
        for i, t in enumerate(ts):
            self._check_tensor(t, name, "input %d" % i)
            if t.dtype != "f32" or t.rank != ts[0].rank or t.rank < 1:
                raise _OpError("node %r: inputs must be f32 of one rank >= 1, got %r and %r"
                               % (name, ts[0], t))
        r = ts[0].rank
        axis = int(axis)
        if not -r <= axis < r:
            raise _OpError("node %r: axis %d outside the %d dims of %s"
                           % (name, axis, r, _shape_str(ts[0].shape)))
        axis %= r
        if len(ts) > 8:
            head = self.concat(ts[:8], axis, name=name + ".part")
            return self.concat([head] + ts[8:], axis, name=name)
        out = []
        for d in range(r):
            dims = [t.shape[d] for t in ts]
            if d == axis:
                out.append(sum(dims) if all(isinstance(v, int) for v in dims) else None)
                continue
            fixed = {v for v in dims if isinstance(v, int)}
            if len(fixed) > 1:
                raise _OpError("node %r: inputs %s differ in dim %d (only axis %d may)"
                               % (name, ", ".join(_shape_str(t.shape) for t in ts), d, axis))
            out.append(fixed.pop() if fixed else dims[0] if len(set(dims)) == 1 else None)
        return self._node("concat", name, [t.index for t in ts], out, {"axis": axis})

    def permute(self, x, perm, name=None):
        """x with its dims reordered: output dim d is input dim perm[d] (negative entries count from
        the end), as Tensor.permute."""
        name = self._node_name(name, "permute")
        self._check_tensor(x, name, "x")
        self._check_f32(x, name)
        p = [int(v) for v in perm]
        r = x.rank
        if len(p) != r or sorted(v % r if -r <= v < r else -1 for v in p) != list(range(r)):
            raise _OpError("node %r: perm %s is not a permutation of the %d dims of %s"
                           % (name, list(perm), r, _shape_str(x.shape)))
        p = [v % r for v in p]
        return self._node("permute", name, [x.index], [x.shape[v] for v in p],
                          {"perm": fmt.Attr(fmt.ATTR_INTS, p)})

    def argmax(self, x, axis=1, name=None):
        """i32 index of the maximum along axis (removed from the shape): the first NaN if any
        (PyTorch treats NaN as the maximum), else the first maximum."""
        name = self._node_name(name, "argmax")
        self._check_tensor(x, name, "x")
        self._check_f32(x, name)
        axis = int(axis)
        if x.rank < 1 or not -x.rank <= axis < x.rank:
            raise _OpError("node %r: axis %d outside the %d dims of %s"
                           % (name, axis, x.rank, _shape_str(x.shape)))
        axis %= x.rank
        if x.shape[axis] == 0:
            raise _OpError("node %r: argmax over dim %d of %s, which is empty"
                           % (name, axis, _shape_str(x.shape)))
        out = [d for i, d in enumerate(x.shape) if i != axis]
        return self._node("argmax", name, [x.index], out, {"axis": axis}, dtype="i32")

    # -- Mixture-of-Experts ops (moe_router, moe_experts, moe_lora_mix; docs/moe.md) --
    @staticmethod
    def _dims_clash(a, b):
        return isinstance(a, int) and isinstance(b, int) and a != b

    def _check_tokens(self, name, what, t, ref, last=None, dtype="f32"):
        """t must be dtype with ref's leading dims and last dim `last` (None: any)."""
        self._check_tensor(t, name, what)
        if t.dtype != dtype:
            raise ValueError("node %r: %s must be %s, got %s tensor %r"
                             % (name, what, dtype, t.dtype, t.name))
        if t.rank != ref.rank or any(self._dims_clash(a, b) for a, b in
                                     zip(t.shape[:-1], ref.shape[:-1])):
            raise ValueError("node %r: %s %r %s must have the leading dims of %r %s"
                             % (name, what, t.name, _shape_str(t.shape), ref.name,
                                _shape_str(ref.shape)))
        if last is not None and self._dims_clash(t.shape[-1], last):
            raise ValueError("node %r: %s %r %s must have last dim %s"
                             % (name, what, t.name, _shape_str(t.shape), _dim_str(last)))

    def _check_const(self, name, what, t, shape, dtypes=("f32",)):
        self._check_tensor(t, name, what)
        if t.role != "constant" or t.dtype not in dtypes:
            raise ValueError("node %r: %s must be a %s constant, got %r"
                             % (name, what, "/".join(dtypes), t))
        if len(t.shape) != len(shape) or any(w is not None and d != w
                                             for d, w in zip(t.shape, shape)):
            raise ValueError("node %r: %s %r is %s, expected %s"
                             % (name, what, t.name, _shape_str(t.shape), _shape_str(shape)))

    def _check_weight(self, name, what, t, rank, layout):
        self._check_tensor(t, name, what)
        if t.role != "constant" or t.rank != rank or t.dtype not in ("f32", "f16"):
            raise ValueError("node %r: %s must be a rank-%d f32/f16 constant %s, got %r"
                             % (name, what, rank, layout, t))

    def moe_router(self, x, weight, bias=None, k=None, first=0, score="softmax",
                   gates="softmax_topk", renorm=0, scale=1.0, temperature=1.0, stats=False,
                   name=None):
        """z = (x weight^T + bias) / temperature per token; ids = the k largest z among columns
        [first, C) (descending, ties to the lower column) minus first, as i32; gates: softmax
        over the k selected logits ("softmax_topk") or the selected scores ("score": softmax(z)
        over all C columns or sigmoid(z); renorm divides them by their sum); times scale.
        Returns (ids, gates), or with stats=True (ids, gates, counts (C-first), fraction
        (C-first), mean_score (C), load_balance (1), z_loss (1))."""
        name = self._node_name(name, "moe_router")
        self._check_tensor(x, name, "x")
        if x.dtype != "f32" or x.rank < 1:
            raise ValueError("node %r: x must be f32 of rank >= 1, got %r" % (name, x))
        self._check_weight(name, "weight", weight, 2, "(C, D)")
        c, d = weight.shape
        if self._dims_clash(x.shape[-1], d):
            raise ValueError("node %r: x %s has D=%s but weight %r is (%d, %d)"
                             % (name, _shape_str(x.shape), _dim_str(x.shape[-1]), weight.name,
                                c, d))
        if bias is not None:
            self._check_const(name, "bias", bias, (c,))
        if k is None:
            raise ValueError("node %r: k (the experts per token) is required" % name)
        for what, v in (("k", k), ("first", first)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError("node %r: %s must be an int, got %r" % (name, what, v))
        k, first = int(k), int(first)
        if not 0 <= first < c:
            raise ValueError("node %r: first=%d outside 0..%d (weight has C=%d columns)"
                             % (name, first, c - 1, c))
        if not 1 <= k <= c - first:
            raise ValueError("node %r: k=%d outside 1..%d (C=%d columns, first=%d)"
                             % (name, k, c - first, c, first))
        if score not in ("softmax", "sigmoid"):
            raise ValueError("node %r: score %r is not 'softmax' or 'sigmoid'" % (name, score))
        if gates not in ("softmax_topk", "score"):
            raise ValueError("node %r: gates %r is not 'softmax_topk' or 'score'" % (name, gates))
        if renorm not in (0, 1):
            raise ValueError("node %r: renorm %r is not 0 or 1" % (name, renorm))
        renorm = int(renorm)
        if renorm and gates != "score":
            raise ValueError("node %r: renorm applies to gates='score' (softmax_topk gates "
                             "already sum to 1)" % name)
        scale, temperature = float(scale), float(temperature)
        if not np.isfinite(scale):
            raise ValueError("node %r: scale %r is not finite" % (name, scale))
        if not (np.isfinite(temperature) and temperature > 0):
            raise ValueError("node %r: temperature %r must be finite and > 0"
                             % (name, temperature))
        attrs = {"k": k}
        if first:
            attrs["first"] = first
        if score != "softmax":
            attrs["score"] = score
        if gates != "softmax_topk":
            attrs["gates"] = gates
        if renorm:
            attrs["renorm"] = 1
        if scale != 1.0:
            attrs["scale"] = scale
        if temperature != 1.0:
            attrs["temperature"] = temperature
        lead = list(x.shape[:-1])
        outs = [("ids", "i32", lead + [k]), ("gates", "f32", lead + [k])]
        if stats:
            outs += [("counts", "f32", [c - first]), ("fraction", "f32", [c - first]),
                     ("mean_score", "f32", [c]), ("load_balance", "f32", [1]),
                     ("z_loss", "f32", [1])]
        return tuple(self._node_multi("moe_router", name, [x, weight, bias], outs, attrs))

    def _check_routing(self, name, x, ids, gates):
        self._check_tokens(name, "ids", ids, x, dtype="i32")
        self._check_tokens(name, "gates", gates, x, last=ids.shape[-1])

    def moe_experts(self, x, ids, gates, w1, w2, b1=None, b2=None, w3=None, residual=None,
                    activation="gelu", name=None):
        """residual + sum over each token's k slots, in ascending expert id, of
        gate * (w2_e act(w1_e x + b1_e) + b2_e) (swiglu: silu(w1_e x + b1_e) * (w3_e x)); a slot
        whose id is outside [0, E) contributes nothing.
        x (..., D) f32, ids (..., k) i32, gates (..., k) f32; w1 (E, h, D), w2 (E, D, h), w3
        (E, h, D) f32/f16 constants; b1 (E, h), b2 (E, D) f32 constants; activation relu / gelu /
        swiglu (or 1 / 2 / 3). Inputs are written x, ids, gates, w1, b1, w2, b2, w3, residual."""
        name = self._node_name(name, "moe_experts")
        self._check_tensor(x, name, "x")
        if x.dtype != "f32" or x.rank < 1:
            raise ValueError("node %r: x must be f32 of rank >= 1, got %r" % (name, x))
        self._check_routing(name, x, ids, gates)
        activation = self._activation(name, activation, MOE_ACTIVATIONS, (1, 2, 3))
        self._check_weight(name, "w1", w1, 3, "(E, h, D)")
        e, h, d = w1.shape
        if self._dims_clash(x.shape[-1], d):
            raise ValueError("node %r: x %s has D=%s but w1 %r is %s"
                             % (name, _shape_str(x.shape), _dim_str(x.shape[-1]), w1.name,
                                _shape_str(w1.shape)))
        self._check_const(name, "w2", w2, (e, d, h), ("f32", "f16"))
        if b1 is not None:
            self._check_const(name, "b1", b1, (e, h))
        if b2 is not None:
            self._check_const(name, "b2", b2, (e, d))
        if activation == 3:
            if w3 is None:
                raise ValueError("node %r: swiglu experts need w3 (E, h, D)" % name)
            self._check_const(name, "w3", w3, (e, h, d), ("f32", "f16"))
        elif w3 is not None:
            raise ValueError("node %r: w3 is only used with activation swiglu" % name)
        if residual is not None:
            self._check_tokens(name, "residual", residual, x, last=d)
        ins = [None if t is None else t.index
               for t in (x, ids, gates, w1, b1, w2, b2, w3, residual)]
        while ins[-1] is None:
            ins.pop()
        return self._node("moe_experts", name, ins, list(x.shape[:-1]) + [d],
                          {"activation": activation})

    def moe_lora_mix(self, u, a1, ids, gates, lora_b1, lora_a2, lora_b2, b2=None, scale=None,
                     residual=None, lora_scale=None, activation=2, name=None):
        """The per-expert step of the shared-base MoE-LoRA FFN (docs/moe.md). u (..., H) = the
        frozen fc1 (f W1^T + b1); a1 (..., E*r) = f A1^T with every expert's fc1 lora_A stacked;
        lora_b1 (E, H, r), lora_a2 (E, r, H), lora_b2 (E, D, r) f32/f16 constants; b2, scale (D)
        f32 constants; lora_scale s (required); activation relu / gelu (1 / 2, default gelu).
        Returns (hbar (..., H), c (..., D)); linear(hbar, W2, scale=scale, residual=c) then
        completes the FFN."""
        name = self._node_name(name, "moe_lora_mix")
        self._check_tensor(u, name, "u")
        if u.dtype != "f32" or u.rank < 1:
            raise ValueError("node %r: u must be f32 of rank >= 1, got %r" % (name, u))
        self._check_weight(name, "lora_b1", lora_b1, 3, "(E, H, r)")
        e, h, r = lora_b1.shape
        if self._dims_clash(u.shape[-1], h):
            raise ValueError("node %r: u %s has H=%s but lora_b1 %r is %s"
                             % (name, _shape_str(u.shape), _dim_str(u.shape[-1]), lora_b1.name,
                                _shape_str(lora_b1.shape)))
        self._check_tokens(name, "a1", a1, u, last=e * r)
        self._check_routing(name, u, ids, gates)
        self._check_const(name, "lora_a2", lora_a2, (e, r, h), ("f32", "f16"))
        self._check_weight(name, "lora_b2", lora_b2, 3, "(E, D, r)")
        d = lora_b2.shape[1]
        self._check_const(name, "lora_b2", lora_b2, (e, d, r), ("f32", "f16"))
        if b2 is not None:
            self._check_const(name, "b2", b2, (d,))
        if scale is not None:
            self._check_const(name, "scale", scale, (d,))
        if residual is not None:
            self._check_tokens(name, "residual", residual, u, last=d)
        if lora_scale is None:
            raise ValueError("node %r: lora_scale (s) is required" % name)
        lora_scale = float(lora_scale)
        if not np.isfinite(lora_scale):
            raise ValueError("node %r: lora_scale %r is not finite" % (name, lora_scale))
        activation = self._activation(name, activation, MOE_ACTIVATIONS, (1, 2))
        lead = list(u.shape[:-1])
        return tuple(self._node_multi(
            "moe_lora_mix", name,
            [u, a1, ids, gates, lora_b1, lora_a2, lora_b2, b2, scale, residual],
            [("hbar", "f32", lead + [h]), ("c", "f32", lead + [d])],
            {"lora_scale": lora_scale, "activation": activation}))

    # -- convolutions (conv2d, conv_transpose2d): NCHW, PyTorch's semantics and weight layouts --
    @staticmethod
    def _conv_pair(name, what, v, lo):
        """An int or a pair of ints, each >= lo, as [height, width]."""
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            v = (v, v)
        try:
            v = tuple(v)
        except TypeError:
            raise ConvError("node %r: %s %r is not an int or a pair of ints" % (name, what, v)) from None
        if len(v) != 2 or any(isinstance(e, bool) or not isinstance(e, (int, np.integer)) for e in v):
            raise ConvError("node %r: %s %r is not an int or a pair of ints" % (name, what, v))
        if any(e < lo or e > 65535 for e in v):
            raise ConvError("node %r: %s %s outside %d..65535" % (name, what, list(v), lo))
        return [int(v[0]), int(v[1])]

    def _conv_const(self, name, what, t, rank):
        """weight / bias: a constant Tensor of this builder, or an array made one."""
        if not isinstance(t, Tensor):
            arr = np.asarray(t.detach().cpu().numpy() if hasattr(t, "detach") else t)
            if arr.dtype not in (np.float16, np.float32, np.float64):
                raise ConvError("node %r: %s must be a float array, got %s" % (name, what, arr.dtype))
            if what != "weight" or arr.dtype == np.float64:
                arr = arr.astype(np.float32)   # weights keep f16; biases are f32
            t = self.constant(self.unique_tensor_name("%s.%s" % (name, what)), arr)
        if not isinstance(t, Tensor) or t.builder is not self:
            raise ConvError("node %r: %s is not a tensor of this builder (%r)" % (name, what, t))
        dtypes = ("f32", "f16") if what == "weight" else ("f32",)
        if t.role != "constant" or t.rank != rank or t.dtype not in dtypes:
            raise ConvError("node %r: %s must be a rank-%d %s constant, got %r"
                            % (name, what, rank, "/".join(dtypes), t))
        return t

    def _conv_x(self, name, x):
        if not isinstance(x, Tensor) or x.builder is not self:
            raise ConvError("node %r: x is not a tensor of this builder (%r)" % (name, x))
        if x.dtype != "f32" or x.rank != 4:
            raise ConvError("node %r: x must be f32 (N, C, H, W), got %r" % (name, x))

    def conv2d(self, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
               activation=None, residual=None, name=None):
        """act(conv(x, weight) + bias) + residual, as torch.nn.functional.conv2d: x (N, C, H, W)
        f32; weight (O, C/groups, kh, kw) f32/f16 constant (a Tensor, or an array made one);
        bias (O,) f32; stride, padding (symmetric zeros), dilation: ints or (h, w) pairs;
        activation None or "relu"; residual (N, O, Ho, Wo) f32, added last."""
        name = self._node_name(name, "conv2d")
        self._conv_x(name, x)
        w = self._conv_const(name, "weight", weight, 4)
        o, cg, kh, kw = w.shape
        if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
            raise ConvError("node %r: groups must be an int >= 1, got %r" % (name, groups))
        groups = int(groups)
        if o % groups:
            raise ConvError("node %r: %d output channels are not a multiple of groups=%d"
                            % (name, o, groups))
        c = x.shape[1]
        if isinstance(c, int) and c != cg * groups:
            raise ConvError("node %r: x %s has C=%d but weight %r is %s with groups=%d: expected "
                            "C=%d" % (name, _shape_str(x.shape), c, w.name, _shape_str(w.shape),
                                      groups, cg * groups))
        s = self._conv_pair(name, "stride", stride, 1)
        p = self._conv_pair(name, "padding", padding, 0)
        d = self._conv_pair(name, "dilation", dilation, 1)
        if activation in (None, 0, "none"):
            act = 0
        elif activation in (1, "relu"):
            act = 1
        else:
            raise ConvError("node %r: activation %r is not None or 'relu'" % (name, activation))
        out = [x.shape[0], o]
        for i, (k, dim) in enumerate(((kh, x.shape[2]), (kw, x.shape[3]))):
            if not isinstance(dim, int):
                out.append(None)
                continue
            num = dim + 2 * p[i] - d[i] * (k - 1) - 1
            if num < 0:
                raise ConvError("node %r: x %s is too small for kernel %dx%d (padding %s, dilation "
                                "%s): output %s would be <= 0" % (name, _shape_str(x.shape), kh, kw,
                                                                 p, d, "HW"[i]))
            out.append(num // s[i] + 1)
        b = None if bias is None else self._conv_const(name, "bias", bias, 1)
        if b is not None and b.shape != (o,):
            raise ConvError("node %r: bias %r must have shape (%d)" % (name, b.name, o))
        if residual is not None:
            if not isinstance(residual, Tensor) or residual.builder is not self:
                raise ConvError("node %r: residual is not a tensor of this builder" % name)
            if residual.dtype != "f32" or residual.rank != 4 or any(
                    self._dims_clash(a, e) for a, e in zip(residual.shape, out)):
                raise ConvError("node %r: residual %r must be f32 of the output's shape %s"
                                % (name, residual, _shape_str(out)))
        attrs = {}
        for key, v, dflt in (("stride", s, 1), ("padding", p, 0), ("dilation", d, 1)):
            if v != [dflt, dflt]:
                attrs[key] = fmt.Attr(fmt.ATTR_INTS, v)
        if groups != 1:
            attrs["groups"] = groups
        if act:
            attrs["activation"] = act
        ins = [x.index, w.index, None if b is None else b.index,
               None if residual is None else residual.index]
        while ins[-1] is None:
            ins.pop()
        return self._node("conv2d", name, ins, out, attrs)

    def conv_transpose2d(self, x, weight, bias=None, stride=1, padding=0, output_padding=0,
                         dilation=1, groups=1, name=None):
        """torch.nn.functional.conv_transpose2d: x (N, C, H, W) f32; weight (C, O/groups, kh, kw)
        f32/f16 constant (or an array); bias (O,) f32; stride, padding, output_padding,
        dilation: ints or (h, w) pairs. Output (N, O, (H-1)s - 2p + d(k-1) + output_padding + 1,
        ...)."""
        name = self._node_name(name, "conv_transpose2d")
        self._conv_x(name, x)
        w = self._conv_const(name, "weight", weight, 4)
        cw, ocg, kh, kw = w.shape
        if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
            raise ConvError("node %r: groups must be an int >= 1, got %r" % (name, groups))
        groups = int(groups)
        if cw % groups:
            raise ConvError("node %r: weight %r has %d input channels, not a multiple of groups=%d"
                            % (name, w.name, cw, groups))
        c = x.shape[1]
        if isinstance(c, int) and c != cw:
            raise ConvError("node %r: x %s has C=%d but weight %r is %s: expected C=%d"
                            % (name, _shape_str(x.shape), c, w.name, _shape_str(w.shape), cw))
        o = ocg * groups
        s = self._conv_pair(name, "stride", stride, 1)
        p = self._conv_pair(name, "padding", padding, 0)
        op = self._conv_pair(name, "output_padding", output_padding, 0)
        d = self._conv_pair(name, "dilation", dilation, 1)
        for i in range(2):
            if op[i] and op[i] >= s[i] and op[i] >= d[i]:
                raise ConvError("node %r: output_padding %s must be smaller than the stride %s or "
                                "the dilation %s" % (name, op, s, d))
        out = [x.shape[0], o]
        for i, (k, dim) in enumerate(((kh, x.shape[2]), (kw, x.shape[3]))):
            if not isinstance(dim, int):
                out.append(None)
                continue
            v = (dim - 1) * s[i] - 2 * p[i] + d[i] * (k - 1) + op[i] + 1
            if v < 1:
                raise ConvError("node %r: x %s gives an output %s of %d" % (name, _shape_str(x.shape),
                                                                            "HW"[i], v))
            out.append(v)
        b = None if bias is None else self._conv_const(name, "bias", bias, 1)
        if b is not None and b.shape != (o,):
            raise ConvError("node %r: bias %r must have shape (%d)" % (name, b.name, o))
        attrs = {}
        for key, v, dflt in (("stride", s, 1), ("padding", p, 0), ("output_padding", op, 0),
                             ("dilation", d, 1)):
            if v != [dflt, dflt]:
                attrs[key] = fmt.Attr(fmt.ATTR_INTS, v)
        if groups != 1:
            attrs["groups"] = groups
        ins = [x.index, w.index] + ([] if b is None else [b.index])
        return self._node("conv_transpose2d", name, ins, out, attrs)

    # -- graph outputs and metadata --
    def output(self, tensor, name=None):
        """Marks tensor as a graph output named name (renaming it). Inputs, constants and
        tensors that already are outputs are copied first."""
        self._check_tensor(tensor, name or "output", "output")
        name = name or tensor.name
        if tensor.role != "intermediate":
            tensor = self.identity(tensor, name=name + ".identity")
        if name != tensor.name:
            if name in self._tensor_names:
                other = self.get_tensor(name)
                if other.role != "intermediate":
                    raise ValueError("output name %r is already a %s tensor" % (name, other.role))
                self._rename(other, self.unique_tensor_name(name + "_"))
            self._rename(tensor, name)
        tensor.role = "output"
        self.outputs.append(tensor.index)
        return tensor

    def output_later(self, tensor, name):
        """Queues tensor as a graph output named name, marked by flush_outputs() (the exporter
        calls it after the model's own outputs, so converters can add e.g. routing statistics
        after them; writer() flushes what is left)."""
        self._check_tensor(tensor, name, "output")
        self._pending_outputs.append((tensor, name))

    def flush_outputs(self):
        pending, self._pending_outputs = self._pending_outputs, []
        out = []
        for tensor, name in pending:
            if self.has_tensor(name) and self.get_tensor(name).role == "output":
                name = self.unique_tensor_name(name)
            out.append(self.output(tensor, name))
        return out

    def _rename(self, t, new):
        del self._tensor_names[t.name]
        t.name = new
        self._tensor_names[new] = t.index

    def metadata(self, key, value):
        self.metadata_items[str(key)] = str(value)

    # -- serialization --
    def writer(self):
        self.flush_outputs()
        w = fmt.GraphWriter()
        for t in self.tensors:
            if t.role == "input":
                dims = list(t.shape)
            else:
                dims = [d if isinstance(d, int) else "" for d in t.shape]
            w.add_tensor(t.name, t.dtype, t.role, dims, data=t.data)
        for n in self.nodes:
            w.add_node(n["op"], n["name"], n["inputs"], n["outputs"], n["attrs"])
        for i in self.inputs:
            w.add_input(i)
        for i in self.outputs:
            w.add_output(i)
        for k, v in self.metadata_items.items():
            w.add_metadata(k, v)
        return w

    def to_bytes(self):
        return self.writer().to_bytes()

    def save(self, path):
        return self.writer().save(path)

    def parameter_count(self):
        return sum(int(np.prod(t.shape)) for t in self.tensors if t.role == "constant")


from .errors import ExportError  # noqa: E402  (after Builder: errors.py imports nothing of ours)


class ConvError(ExportError, ValueError):
    """A conv2d / conv_transpose2d the builder refuses, naming the node: an ExportError that is
    also the ValueError every Builder check raises (the exporter adds the module path to those)."""
