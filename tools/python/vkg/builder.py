"""High-level graph builder: one method per op of the .vkg v1.0 op table.

Every method infers its output's rank and dims and checks what it can, raising ValueError that
names the node. Internally a dim is an int (fixed), a str (a graph input's symbol, e.g. "batch",
carried through ops that keep it) or None (unknown). When written, inputs keep their symbols;
intermediates and outputs write every non-fixed dim as the empty symbol ("inferred, unchecked").
"""

import numpy as np

from . import format as fmt

ACTIVATIONS = {"none": 0, "relu": 1, "gelu": 2}


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

    def _node(self, op, name, inputs, out_shape, attrs=None, out_name=None):
        out = self._add_tensor(self.unique_tensor_name(out_name or name), "f32", "intermediate",
                               out_shape)
        self.nodes.append(dict(op=op, name=name, inputs=list(inputs), outputs=[out.index],
                               attrs=dict(attrs or {})))
        self._producer[out.index] = name
        return out

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
    def linear(self, x, weight, bias=None, activation=0, name=None):
        name = self._node_name(name, "linear")
        self._check_tensor(x, name, "x")
        self._check_tensor(weight, name, "weight")
        if isinstance(activation, str):
            if activation not in ACTIVATIONS:
                raise ValueError("node %r: unknown activation %r" % (name, activation))
            activation = ACTIVATIONS[activation]
        if activation not in (0, 1, 2):
            raise ValueError("node %r: activation %r is not 0, 1 or 2" % (name, activation))
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
        inputs = [x.index, weight.index]
        if bias is not None:
            self._check_tensor(bias, name, "bias")
            if bias.role != "constant" or bias.dtype != "f32" or bias.shape != (n,):
                raise ValueError("node %r: bias must be an f32 constant of shape (%d), got %r"
                                 % (name, n, bias))
            inputs.append(bias.index)
        attrs = {"activation": int(activation)} if activation else {}
        return self._node("linear", name, inputs, list(x.shape[:-1]) + [n], attrs)

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

    def gelu(self, x, approximate="none", name=None):
        name = self._node_name(name, "gelu")
        self._check_tensor(x, name, "x")
        if approximate != "none":
            raise ValueError("node %r: gelu approximate=%r is not supported (only 'none')"
                             % (name, approximate))
        return self._node("gelu", name, [x.index], list(x.shape))

    def relu(self, x, name=None):
        name = self._node_name(name, "relu")
        self._check_tensor(x, name, "x")
        return self._node("relu", name, [x.index], list(x.shape))

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

    def add(self, a, b, name=None):
        return self._broadcast("add", a, b, name)

    def mul(self, a, b, name=None):
        return self._broadcast("mul", a, b, name)

    def softmax(self, x, axis=-1, name=None):
        name = self._node_name(name, "softmax")
        self._check_tensor(x, name, "x")
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
                                                                             shape)})

    def identity(self, x, name=None):
        """A copy of x (a reshape that keeps every dim)."""
        return self.reshape(x, [0] * x.rank, name=name or "identity")

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

    def _rename(self, t, new):
        del self._tensor_names[t.name]
        t.name = new
        self._tensor_names[new] = t.index

    def metadata(self, key, value):
        self.metadata_items[str(key)] = str(value)

    # -- serialization --
    def writer(self):
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
