"""PyTorch -> .vkg exporter built on torch.fx (stable APIs only: Tracer, GraphModule, Node,
ShapeProp).

    vkg.export(module, example_inputs, path, dynamic_batch=True, metadata=None, fp16=False,
               moe_stats=False, moe_routing=False, moe_variant=None) -> Builder
    vkg.register_converter(ModuleClass, fn)   # fn(builder, module, input_tensors, name)

Modules with a registered converter are leaves of the trace (their forward is never traced), so
modules that tracing cannot follow (data-dependent routing, e.g. MoE) can still be exported; a
root module with a converter is converted directly. Converters read the export's options with
export_options() (vkg.moe's converters: fp16, moe_stats, moe_routing, moe_variant).
"""

import builtins
import inspect
import operator
import sys
import types

import numpy as np
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from .builder import Builder, Tensor
from .errors import ExportError

_CONVERTERS = {}
_OPTIONS = []     # a stack of the running exports' options (export_options())


def export_options():
    """The options of the export now running (a dict; empty outside vkg.export): fp16,
    moe_stats, moe_routing, moe_variant, dynamic_batch."""
    return dict(_OPTIONS[-1]) if _OPTIONS else {}


def register_converter(module_class, fn):
    """Registers fn(builder, module, input_tensors, name) -> Tensor or tuple of Tensors for
    module_class (and its subclasses). Such modules are not traced into."""
    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise TypeError("register_converter needs an nn.Module subclass, got %r" % (module_class,))
    if not callable(fn):
        raise TypeError("converter for %s is not callable" % module_class.__name__)
    _CONVERTERS[module_class] = fn
    return fn


def unregister_converter(module_class):
    _CONVERTERS.pop(module_class, None)


def _find_converter(cls):
    for c in cls.__mro__:
        if c in _CONVERTERS:
            return _CONVERTERS[c]
    return None


class _Tracer(torch.fx.Tracer):
    """Leaves = modules with converters + torch.nn modules; records each node's module path."""

    def __init__(self):
        super().__init__()
        self._scope = []
        self._root_name = ""
        self.failed_scope = None  # the module stack where tracing raised

    def trace(self, root, concrete_args=None):
        self._root_name = type(root).__name__ if isinstance(root, nn.Module) else ""
        return super().trace(root, concrete_args)

    def is_leaf_module(self, m, module_qualified_name):
        if _find_converter(type(m)) is not None:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        self._scope.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_scope is None:
                self.failed_scope = list(self._scope)
            raise
        finally:
            self._scope.pop()

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta["vkg_scope"] = self._scope[-1] if self._scope else ("", self._root_name)
        return node


class DimRef:
    """A size read from a tensor (x.shape[i], x.size(i)) while tracing."""

    def __init__(self, tensor, axis, value):
        self.tensor, self.axis, self.value = tensor, axis, int(value)

    @property
    def symbolic(self):
        return not isinstance(self.tensor.shape[self.axis], int)

    def __repr__(self):
        return "DimRef(%s[%d]=%d)" % (self.tensor.name, self.axis, self.value)


def _qualname(target):
    if isinstance(target, str):
        return target
    mod = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    if mod in ("_operator", "operator"):
        mod = "operator"
    return "%s.%s" % (mod, name) if mod else name


def _scope(node):
    path, cls = node.meta.get("vkg_scope", ("", ""))
    stack = node.meta.get("nn_module_stack")
    if not path and stack:
        key, val = list(stack.items())[-1]
        if isinstance(val, tuple):
            path, cls = val[0], getattr(val[1], "__name__", str(val[1]))
        else:
            path, cls = key, getattr(val, "__name__", str(val))
    return path, cls


def _where(node):
    path, cls = _scope(node)
    if path:
        return "module '%s' (%s)" % (path, cls)
    return "the root module (%s)" % cls if cls else "the root module"


_FLOAT_DT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
             torch.int32: "i32", torch.uint8: "u8"}


class _Converter:
    def __init__(self, gm, builder, dynamic_batch, fp16=False):
        self.gm = gm
        self.b = builder
        self.dynamic = dynamic_batch
        self.fp16 = fp16
        self.env = {}
        self.ex_shape = {}      # builder tensor index -> example shape (tuple of ints)
        self.const_by_id = {}   # id(torch tensor) -> builder constant
        self.node = None
        self.folded = set()     # BatchNorm fx nodes folded into the Conv2d before them

    # -- helpers --
    def fail(self, what):
        raise ExportError("%s in %s (fx node %r)" % (what, _where(self.node), self.node.name))

    def name(self):
        n = self.node
        if n.op == "call_module":
            return n.target
        path, _ = _scope(n)
        if n.op == "call_method":
            base = n.target
        else:
            base = getattr(n.target, "__name__", None) or n.name
        base = base.strip("_") or n.name  # e.g. __iadd__ -> iadd
        # the Builder makes names unique: blocks.0.add, blocks.0.add_1, ...
        return "%s.%s" % (path, base) if path else base

    def const(self, name, t, dtype="f32"):
        """A constant from a torch tensor (parameter/buffer), shared by identity."""
        key = (id(t), dtype)
        if key in self.const_by_id:
            return self.const_by_id[key]
        arr = t.detach().cpu()
        if dtype == "keep":
            dt = _FLOAT_DT.get(arr.dtype)
            if dt not in ("f32", "f16"):
                dt = "f32"
        else:
            dt = dtype
        if dt == "bf16":
            np_arr = arr.float().numpy()
        elif dt == "f16":
            np_arr = arr.half().numpy()
        else:
            np_arr = arr.float().numpy() if dt == "f32" else arr.numpy()
        c = self.b.constant(self.b.unique_tensor_name(name), np_arr, dtype=dt)
        self.const_by_id[key] = c
        self.ex_shape[c.index] = tuple(np_arr.shape)
        return c

    def scalar(self, value):
        return self.b.constant(self.b.unique_tensor_name(self.name() + ".scalar"),
                               np.array([value], dtype=np.float32))

    def tensor_arg(self, v, what="input"):
        if isinstance(v, Tensor):
            return v
        self.fail("%s %s is %r, not a tensor" % (self.node.op, what, type(v).__name__))

    def intval(self, v):
        """A Python int from an int or a non-symbolic DimRef."""
        if isinstance(v, DimRef):
            if v.symbolic:
                self.fail("arithmetic on the symbolic size %s (%s[%d])"
                          % (v.tensor.shape[v.axis], v.tensor.name, v.axis))
            return v.value
        return v

    def map(self, a):
        if isinstance(a, torch.fx.Node):
            return self.env[a]
        if isinstance(a, tuple):
            return tuple(self.map(x) for x in a)
        if isinstance(a, list):
            return [self.map(x) for x in a]
        if isinstance(a, dict):
            return {k: self.map(x) for k, x in a.items()}
        if isinstance(a, slice):
            return slice(self.map(a.start), self.map(a.stop), self.map(a.step))
        return a

    # -- main loop --
    def run(self, example_inputs):
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        examples = list(example_inputs)
        result = None
        for node in self.gm.graph.nodes:
            self.node = node
            try:
                if node.op == "placeholder":
                    val = self.placeholder(node, placeholders.index(node), examples)
                elif node.op == "get_attr":
                    val = self.get_attr(node)
                elif node.op == "call_module":
                    val = self.call_module(node)
                elif node.op == "call_function":
                    val = self.call_function(node)
                elif node.op == "call_method":
                    val = self.call_method(node)
                elif node.op == "output":
                    result = self.output(node)
                    continue
                else:
                    self.fail("unknown fx node kind %r" % node.op)
            except ValueError as e:  # a Builder check
                raise ExportError("%s: %s (in %s)" % (_qualname(node.target), e,
                                                      _where(node))) from e
            self.env[node] = val
            self.check_shape(node, val)
        return result

    def check_shape(self, node, val):
        meta = node.meta.get("tensor_meta")
        if isinstance(val, Tensor):
            shape = getattr(meta, "shape", None)
            if shape is None:
                return
            shape = tuple(int(s) for s in shape)
            if val.index not in self.ex_shape:
                self.ex_shape[val.index] = shape
            ok = len(shape) == val.rank and all(
                not isinstance(d, int) or d == s for d, s in zip(val.shape, shape))
            if not ok:
                self.fail("internal shape mismatch for %s: vkg infers %s, PyTorch ran %s"
                          % (_qualname(node.target), list(val.shape), list(shape)))
        elif isinstance(val, (tuple, list)) and isinstance(meta, (tuple, list)):
            for v, m in zip(val, meta):
                if isinstance(v, Tensor) and v.index not in self.ex_shape and hasattr(m, "shape"):
                    self.ex_shape[v.index] = tuple(int(s) for s in m.shape)

    def placeholder(self, node, i, examples):
        if i >= len(examples):
            if node.args:
                return node.args[0]  # a default value
            self.fail("no example input for parameter %r" % node.target)
        ex = examples[i]
        if not isinstance(ex, torch.Tensor):
            return ex
        if ex.dtype != torch.float32:
            self.fail("input %r is %s; graph inputs must be float32" % (node.target, ex.dtype))
        shape = list(ex.shape)
        if self.dynamic and shape:
            shape[0] = "batch"
        t = self.b.input(str(node.target), shape)
        self.ex_shape[t.index] = tuple(ex.shape)
        return t

    def get_attr(self, node):
        obj = self.gm
        for part in node.target.split("."):
            obj = getattr(obj, part)
        if isinstance(obj, torch.Tensor):
            return self.const(node.target, obj)
        return obj

    def _foldable_bn(self, node, mod):
        """The eval-mode BatchNorm2d module and fx node that are the only user of this Conv2d's
        output (so folding it changes nothing else), or (None, None)."""
        if type(mod) is not nn.Conv2d or len(node.users) != 1:
            return None, None
        user = next(iter(node.users))
        if user.op != "call_module" or len(user.args) != 1 or user.kwargs:
            return None, None
        bn = self.gm.get_submodule(user.target)
        if (type(bn) is not nn.BatchNorm2d or bn.training or bn.running_mean is None
                or bn.running_var is None or bn.num_features != mod.out_channels
                or _find_converter(type(bn)) is not None):
            return None, None
        return bn, user

    def call_module(self, node):
        mod = self.gm.get_submodule(node.target)
        args = self.map(node.args)
        kwargs = self.map(node.kwargs)
        if node in self.folded:     # its scale and shift are in the conv that feeds it
            return args[0]
        bn, bn_node = self._foldable_bn(node, mod)
        if bn is not None:
            mod = _fold_bn(mod, bn)
            self.folded.add(bn_node)
        conv = _find_converter(type(mod))
        path = node.target
        if conv is not None:
            inputs = list(args) + list(kwargs.values())
            out = conv(self.b, mod, inputs, path)
            flat = list(out) if isinstance(out, (tuple, list)) else [out]
            for o in flat:
                if not isinstance(o, Tensor) or o.builder is not self.b:
                    self.fail("converter for %s returned %r, not a tensor of the builder"
                              % (type(mod).__name__, o))
            return tuple(out) if isinstance(out, list) else out
        fn = _MODULES.get(type(mod))
        if fn is None:
            raise ExportError("unsupported module %s (%s.%s) at module path '%s' (fx node %r); "
                              "register a converter with vkg.register_converter"
                              % (type(mod).__name__, type(mod).__module__,
                                 type(mod).__qualname__, path, node.name))
        return fn(self, mod, path, *args, **kwargs)

    def call_function(self, node):
        fn = _FUNCTIONS.get(node.target)
        if fn is None:
            self.fail("unsupported function %s" % _qualname(node.target))
        return fn(self, *self.map(node.args), **self.map(node.kwargs))

    def call_method(self, node):
        fn = _METHODS.get(node.target)
        if fn is None:
            self.fail("unsupported method Tensor.%s" % node.target)
        return fn(self, *self.map(node.args), **self.map(node.kwargs))

    def output(self, node):
        out = self.map(node.args[0])
        if isinstance(out, Tensor):
            pairs = [("output", out)]
        elif isinstance(out, (tuple, list)):
            pairs = [("output%d" % i, o) for i, o in enumerate(out)]
        elif isinstance(out, dict):
            pairs = [(str(k), o) for k, o in out.items()]
        else:
            self.fail("the model returns %r, not tensors" % type(out).__name__)
        for name, o in pairs:
            if not isinstance(o, Tensor):
                self.fail("output %r is %r, not a tensor" % (name, type(o).__name__))
        results = [self.b.output(o, name) for name, o in pairs]
        self.b.flush_outputs()   # outputs converters queued (e.g. MoE routing statistics)
        return results

    # -- shared op helpers --
    def linear(self, x, w, bias, name):
        x = self.tensor_arg(x)
        w = self.tensor_arg(w, "weight")
        if w.role != "constant" or (bias is not None and self.tensor_arg(bias, "bias").role
                                    != "constant"):
            self.fail("linear with a weight/bias that is not a parameter")
        if bias is not None and bias.dtype != "f32":
            self.fail("linear bias must be f32")
        return self.b.linear(x, w, bias, name=name)

    def binary(self, op, a, b, alpha=1):
        if alpha != 1:
            self.fail("%s with alpha=%r" % (op, alpha))
        ta, tb = isinstance(a, Tensor), isinstance(b, Tensor)
        if not ta and not tb:
            a, b = self.intval(a), self.intval(b)
            return a + b if op == "add" else a * b
        if not ta:
            a = self.scalar(self._number(a))
        if not tb:
            b = self.scalar(self._number(b))
        return getattr(self.b, op)(a, b, name=self.name())

    def _number(self, v):
        v = self.intval(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail("operand %r is neither a tensor nor a number" % (v,))
        return float(v)

    def reshape(self, x, shape):
        x = self.tensor_arg(x)
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = list(shape[0])
        ex = self.ex_shape.get(x.index)
        out = []
        for i, s in enumerate(shape):
            if isinstance(s, DimRef):
                if i < x.rank and s.tensor.shape[s.axis] == x.shape[i] and (
                        s.symbolic or (s.tensor is x and s.axis == i)):
                    out.append(0)
                elif not s.symbolic:
                    out.append(s.value)
                else:
                    self.fail("reshape moves the symbolic size %s (%s[%d]) to position %d"
                              % (s.tensor.shape[s.axis], s.tensor.name, s.axis, i))
            elif isinstance(s, int) and not isinstance(s, bool):
                if (self.dynamic and s > 0 and i < x.rank and not isinstance(x.shape[i], int)
                        and ex is not None and ex[i] == s):
                    out.append(0)  # the example's batch size at the batch position
                else:
                    out.append(s)
            else:
                self.fail("reshape to a non-static size %r" % (s,))
        return self.b.reshape(x, out, name=self.name())

    def flatten(self, x, start_dim=0, end_dim=-1, name=None):
        x = self.tensor_arg(x)
        r = x.rank
        if r == 0:
            return self.b.reshape(x, [1], name=name or self.name())
        s, e = start_dim % r, end_dim % r
        if s > e:
            self.fail("flatten(start_dim=%d, end_dim=%d) of rank %d" % (start_dim, end_dim, r))
        if s == e:
            return x
        trailing = list(x.shape[e + 1:])
        merged = x.shape[s:e + 1]
        shape = [0] * s
        if all(isinstance(d, int) for d in trailing):
            shape += [-1] + trailing
        elif all(isinstance(d, int) for d in merged) and sum(
                not isinstance(d, int) for d in trailing) == 1:
            shape += [int(np.prod(merged))] + [d if isinstance(d, int) else -1 for d in trailing]
        else:
            self.fail("flatten leaves symbolic dims after end_dim")
        return self.b.reshape(x, shape, name=name or self.name())

    def softmax(self, x, dim, dtype=None):
        x = self.tensor_arg(x)
        if dtype is not None:
            self.fail("softmax with dtype=%r" % (dtype,))
        if dim is None or dim not in (-1, x.rank - 1):
            self.fail("softmax over dim %r of a rank-%d tensor (only the last dim)" % (dim, x.rank))
        return self.b.softmax(x, -1, name=self.name())

    def layer_norm(self, x, normalized_shape, weight, bias, eps, name):
        x = self.tensor_arg(x)
        ns = tuple(self.intval(d) for d in (normalized_shape if isinstance(
            normalized_shape, (tuple, list, torch.Size)) else (normalized_shape,)))
        if len(ns) != 1 or (isinstance(x.shape[-1], int) and x.shape[-1] != ns[0]):
            self.fail("layer_norm over %r (only the last dim of %s)" % (ns, list(x.shape)))
        if (weight is None) != (bias is None):
            if weight is not None:  # affine without bias: add a zero bias
                bias = self.b.constant(self.b.unique_tensor_name(name + ".bias"),
                                       np.zeros(ns, dtype=np.float32))
            else:
                weight = self.b.constant(self.b.unique_tensor_name(name + ".weight"),
                                         np.ones(ns, dtype=np.float32))
        return self.b.layernorm(x, weight, bias, eps, name=name)

    def size(self, x, dim=None):
        x = self.tensor_arg(x)
        ex = self.ex_shape.get(x.index)
        if ex is None:
            self.fail("size of a tensor of unknown example shape")
        if dim is None:
            return tuple(DimRef(x, i, ex[i]) for i in range(x.rank))
        return DimRef(x, dim % x.rank, ex[dim % x.rank])


# ---- modules ----

def _m_linear(c, m, path, x):
    w = c.const(path + ".weight", m.weight, "f16" if c.fp16 else "keep")
    b = c.const(path + ".bias", m.bias) if m.bias is not None else None
    return c.b.linear(c.tensor_arg(x), w, b, name=path)


def _m_layernorm(c, m, path, x):
    w = c.const(path + ".weight", m.weight) if getattr(m, "weight", None) is not None else None
    b = c.const(path + ".bias", m.bias) if getattr(m, "bias", None) is not None else None
    return c.layer_norm(x, tuple(m.normalized_shape), w, b, m.eps, path)


def _m_gelu(c, m, path, x):
    approx = getattr(m, "approximate", "none")
    if approx != "none":
        c.fail("GELU(approximate=%r) is not supported (only 'none')" % approx)
    return c.b.gelu(c.tensor_arg(x), name=path)


def _m_relu(c, m, path, x):
    return c.b.relu(c.tensor_arg(x), name=path)


def _m_tanh(c, m, path, x):
    return c.b.tanh(c.tensor_arg(x), name=path)


def _m_sigmoid(c, m, path, x):
    return c.b.sigmoid(c.tensor_arg(x), name=path)


def _m_softmax(c, m, path, x):
    return c.softmax(x, m.dim)


def _m_identity(c, m, path, x, *args, **kwargs):
    return x


def _m_flatten(c, m, path, x):
    return c.flatten(x, m.start_dim, m.end_dim, name=path)


_MODULES = {
    nn.Linear: _m_linear,
    nn.LayerNorm: _m_layernorm,
    nn.GELU: _m_gelu,
    nn.ReLU: _m_relu,
    nn.Tanh: _m_tanh,
    nn.Sigmoid: _m_sigmoid,
    nn.Softmax: _m_softmax,
    nn.Dropout: _m_identity,
    nn.Identity: _m_identity,
    nn.Flatten: _m_flatten,
}


# ---- functions and methods ----

def _f_linear(c, x, weight, bias=None):
    return c.linear(x, weight, bias, c.name())


def _f_layer_norm(c, x, normalized_shape, weight=None, bias=None, eps=1e-5, *rest, **kw):
    return c.layer_norm(x, normalized_shape, weight, bias, eps, c.name())


def _f_gelu(c, x, approximate="none"):
    if approximate != "none":
        c.fail("gelu(approximate=%r) is not supported (only 'none')" % approximate)
    return c.b.gelu(c.tensor_arg(x), name=c.name())


def _f_relu(c, x, inplace=False):
    return c.b.relu(c.tensor_arg(x), name=c.name())


def _f_tanh(c, x, out=None):
    return c.b.tanh(c.tensor_arg(x), name=c.name())


def _f_sigmoid(c, x, out=None):
    return c.b.sigmoid(c.tensor_arg(x), name=c.name())


def _f_softmax(c, x, dim=None, _stacklevel=3, dtype=None):
    return c.softmax(x, dim, dtype)


def _f_dropout(c, x, *args, **kwargs):
    return x


def _f_add(c, a, b, alpha=1, out=None):
    return c.binary("add", a, b, alpha)


def _f_sub(c, a, b, alpha=1):
    if isinstance(b, Tensor):
        c.fail("tensor - tensor (no sub op in vkg 1.0)")
    if not isinstance(a, Tensor):
        return c.intval(a) - c.intval(b)
    return c.binary("add", a, -c._number(b))


def _f_mul(c, a, b, out=None):
    return c.binary("mul", a, b)


def _f_truediv(c, a, b):
    if isinstance(b, Tensor):
        c.fail("division by a tensor (no div op in vkg 1.0)")
    if not isinstance(a, Tensor):
        return c.intval(a) / c.intval(b)
    return c.binary("mul", a, 1.0 / c._number(b))


def _f_floordiv(c, a, b):
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        c.fail("floor division of tensors")
    return c.intval(a) // c.intval(b)


def _f_flatten(c, x, start_dim=0, end_dim=-1):
    return c.flatten(x, start_dim, end_dim)


def _f_reshape(c, x, *shape, **kw):
    if "shape" in kw:
        shape = (kw["shape"],)
    elif "size" in kw:
        shape = (kw["size"],)
    return c.reshape(x, shape)


def _f_getattr(c, obj, name, *default):
    if isinstance(obj, Tensor):
        if name == "shape":
            return c.size(obj)
        if name == "ndim":
            return obj.rank
        c.fail("unsupported tensor attribute %r" % name)
    return getattr(obj, name, *default)


def _f_getitem(c, obj, idx):
    if isinstance(obj, Tensor):
        c.fail("unsupported tensor indexing (operator.getitem)")
    return obj[idx]


def _method_size(c, x, dim=None):
    return c.size(x, dim)


def _method_dim(c, x):
    return c.tensor_arg(x).rank


def _method_passthrough(c, x, *args, **kwargs):
    return x


_FUNCTIONS = {
    F.linear: _f_linear,
    F.layer_norm: _f_layer_norm,
    torch.layer_norm: _f_layer_norm,
    F.gelu: _f_gelu,
    F.relu: _f_relu,
    torch.relu: _f_relu,
    torch.tanh: _f_tanh,
    F.tanh: _f_tanh,
    torch.sigmoid: _f_sigmoid,
    F.sigmoid: _f_sigmoid,
    F.softmax: _f_softmax,
    torch.softmax: _f_softmax,
    F.dropout: _f_dropout,
    torch.add: _f_add,
    operator.add: _f_add,
    operator.iadd: _f_add,
    operator.sub: _f_sub,
    operator.isub: _f_sub,
    torch.mul: _f_mul,
    operator.mul: _f_mul,
    operator.imul: _f_mul,
    operator.truediv: _f_truediv,
    operator.floordiv: _f_floordiv,
    torch.flatten: _f_flatten,
    torch.reshape: _f_reshape,
    builtins.getattr: _f_getattr,
    operator.getitem: _f_getitem,
}

_METHODS = {
    "add": lambda c, a, b, alpha=1: c.binary("add", a, b, alpha),
    "add_": lambda c, a, b, alpha=1: c.binary("add", a, b, alpha),
    "__add__": lambda c, a, b: c.binary("add", a, b),
    "__iadd__": lambda c, a, b: c.binary("add", a, b),
    "mul": lambda c, a, b: c.binary("mul", a, b),
    "mul_": lambda c, a, b: c.binary("mul", a, b),
    "__mul__": lambda c, a, b: c.binary("mul", a, b),
    "flatten": _f_flatten,
    "reshape": _f_reshape,
    "view": _f_reshape,
    "relu": _f_relu,
    "tanh": _f_tanh,
    "sigmoid": _f_sigmoid,
    "softmax": lambda c, x, dim=None, dtype=None: c.softmax(x, dim, dtype),
    "size": _method_size,
    "dim": _method_dim,
    "contiguous": _method_passthrough,
}


# ---- convolutions (conv2d, conv_transpose2d) ----

def _conv_weight(c, w, path, what="weight"):
    """A conv weight or bias: a parameter (constant) of the model. f16 storage with fp16=True."""
    if isinstance(w, Tensor):
        if w.role != "constant":
            c.fail("%s with a %s that is not a parameter" % (_qualname(c.node.target), what))
        return w
    return c.const(path + "." + what, w, ("f16" if c.fp16 else "keep") if what == "weight" else "f32")


def _conv_padding(c, m):
    """nn.Conv2d's padding: ints, "valid", or "same" where PyTorch pads symmetrically."""
    p = m.padding
    if p == "valid":
        return (0, 0)
    if p == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if any(t % 2 for t in total):
            c.fail("Conv2d(padding='same') with kernel %s and dilation %s pads asymmetrically; vkg's "
                   "conv2d pads symmetrically" % (tuple(m.kernel_size), tuple(m.dilation)))
        return tuple(t // 2 for t in total)
    return tuple(p)


def _fold_bn(conv, bn):
    """A copy of conv with an inference BatchNorm2d after it folded in (float64 arithmetic):
    W' = W * s per output channel, b' = (b - mean) * s + beta, s = gamma / sqrt(var + eps)."""
    import copy
    s = bn.running_var.double().add(bn.eps).rsqrt()
    if bn.weight is not None:
        s = s * bn.weight.double()
    b = conv.bias.double() if conv.bias is not None else torch.zeros(conv.out_channels,
                                                                      dtype=torch.float64)
    b = (b - bn.running_mean.double()) * s
    if bn.bias is not None:
        b = b + bn.bias.double()
    out = copy.deepcopy(conv)
    with torch.no_grad():
        out.weight.copy_(conv.weight.double() * s.reshape(-1, 1, 1, 1))
        out.bias = nn.Parameter(b.to(conv.weight.dtype))
    return out


def _m_conv2d(c, m, path, x):
    if m.padding_mode != "zeros":
        c.fail("Conv2d(padding_mode=%r): only zero padding ('zeros') is supported" % m.padding_mode)
    w = _conv_weight(c, m.weight, path)
    b = _conv_weight(c, m.bias, path, "bias") if m.bias is not None else None
    return c.b.conv2d(c.tensor_arg(x), w, b, stride=tuple(m.stride), padding=_conv_padding(c, m),
                      dilation=tuple(m.dilation), groups=m.groups, name=path)


def _m_conv_transpose2d(c, m, path, x, output_size=None):
    if m.padding_mode != "zeros":
        c.fail("ConvTranspose2d(padding_mode=%r): only zero padding ('zeros') is supported"
               % m.padding_mode)
    if output_size is not None:
        c.fail("ConvTranspose2d called with output_size (set output_padding instead)")
    w = _conv_weight(c, m.weight, path)
    b = _conv_weight(c, m.bias, path, "bias") if m.bias is not None else None
    return c.b.conv_transpose2d(c.tensor_arg(x), w, b, stride=tuple(m.stride),
                                padding=tuple(m.padding), output_padding=tuple(m.output_padding),
                                dilation=tuple(m.dilation), groups=m.groups, name=path)


def _f_conv2d(c, x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if isinstance(padding, str):
        c.fail("conv2d(padding=%r): give the padding as ints" % padding)
    name = c.name()
    w = _conv_weight(c, c.tensor_arg(weight, "weight"), name)
    b = None if bias is None else _conv_weight(c, c.tensor_arg(bias, "bias"), name, "bias")
    return c.b.conv2d(c.tensor_arg(x), w, b, stride=stride, padding=padding, dilation=dilation,
                      groups=groups, name=name)


def _f_conv_transpose2d(c, x, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                        dilation=1):
    name = c.name()
    w = _conv_weight(c, c.tensor_arg(weight, "weight"), name)
    b = None if bias is None else _conv_weight(c, c.tensor_arg(bias, "bias"), name, "bias")
    return c.b.conv_transpose2d(c.tensor_arg(x), w, b, stride=stride, padding=padding,
                                output_padding=output_padding, dilation=dilation, groups=groups,
                                name=name)


_MODULES.update({nn.Conv2d: _m_conv2d, nn.ConvTranspose2d: _m_conv_transpose2d})
_FUNCTIONS.update({F.conv2d: _f_conv2d, torch.conv2d: _f_conv2d,
                   F.conv_transpose2d: _f_conv_transpose2d,
                   torch.conv_transpose2d: _f_conv_transpose2d})


# ---- dense-head ops: interpolate (bilinear, area), adaptive pooling, batch norm, cat, permute,
# ---- transpose, argmax ----

def _hw_arg(c, v, what, cast):
    """An int/float or a pair of them (tuple, list, torch.Size; fixed DimRefs) -> [h, w]."""
    vals = list(v) if isinstance(v, (tuple, list, torch.Size)) else [v, v]
    if len(vals) != 2:
        c.fail("%s %r: expected one value or two (H, W)" % (what, v))
    return [cast(c.intval(e)) for e in vals]


def _interpolate(c, x, size=None, scale_factor=None, mode="nearest", align_corners=None,
                 recompute_scale_factor=None, antialias=False, name=None):
    x = c.tensor_arg(x)
    name = name or c.name()
    if mode not in ("bilinear", "area"):
        c.fail("interpolate(mode=%r): only 'bilinear' and 'area' are supported" % (mode,))
    if antialias:
        c.fail("interpolate(antialias=True) is not supported")
    if x.rank != 4:
        c.fail("interpolate of a rank-%d tensor: only (N, C, H, W)" % x.rank)
    if (size is None) == (scale_factor is None):
        c.fail("interpolate needs exactly one of size and scale_factor")
    if size is not None:
        size = _hw_arg(c, size, "size", int)
    else:
        scale = _hw_arg(c, scale_factor, "scale_factor", float)
        # F.interpolate: 'area' and recompute_scale_factor=True turn the scale into a size.
        if mode == "area" or recompute_scale_factor:
            if not all(isinstance(d, int) for d in x.shape[2:]):
                c.fail("interpolate(scale_factor=...) on symbolic spatial sizes %s"
                       % (x.shape[2:],))
            size = [int(np.floor(d * s)) for d, s in zip(x.shape[2:], scale)]
    if mode == "area":
        return c.b.adaptive_avg_pool2d(x, size, name=name)
    ac = bool(align_corners)
    if size is not None:
        return c.b.resize_bilinear(x, size=size, align_corners=ac, name=name)
    return c.b.resize_bilinear(x, scale=scale, align_corners=ac, name=name)


def _m_upsample(c, m, path, x):
    return _interpolate(c, x, m.size, m.scale_factor, m.mode, m.align_corners,
                        getattr(m, "recompute_scale_factor", None), name=path)


def _adaptive_avg_pool(c, x, output_size, name):
    x = c.tensor_arg(x)
    if x.rank != 4:
        c.fail("adaptive_avg_pool2d of a rank-%d tensor: only (N, C, H, W)" % x.rank)
    vals = list(output_size) if isinstance(output_size, (tuple, list, torch.Size)) \
        else [output_size, output_size]
    if len(vals) != 2:
        c.fail("adaptive_avg_pool2d output_size %r: expected one value or two" % (output_size,))
    size = []
    for v, d in zip(vals, x.shape[2:]):
        if v is None:  # keep the input's size
            if not isinstance(d, int):
                c.fail("adaptive_avg_pool2d keeps a symbolic size %s" % (d,))
            v = d
        size.append(int(c.intval(v)))
    return c.b.adaptive_avg_pool2d(x, size, name=name)


def _m_adaptive_avg_pool2d(c, m, path, x):
    return _adaptive_avg_pool(c, x, m.output_size, path)


def _f_adaptive_avg_pool2d(c, x, output_size):
    return _adaptive_avg_pool(c, x, output_size, c.name())


def _m_batchnorm(c, m, path, x):
    if m.training:
        c.fail("%s in training mode (call .eval(): vkg exports inference batch norm)"
               % type(m).__name__)
    if m.running_mean is None or m.running_var is None:
        c.fail("%s(track_running_stats=False) normalizes with batch statistics; vkg exports "
               "inference batch norm with running statistics" % type(m).__name__)
    mean = c.const(path + ".running_mean", m.running_mean)
    var = c.const(path + ".running_var", m.running_var)
    w = c.const(path + ".weight", m.weight) if m.weight is not None else None
    b = c.const(path + ".bias", m.bias) if m.bias is not None else None
    return c.b.batchnorm(c.tensor_arg(x), mean, var, w, b, eps=m.eps, name=path)


def _f_batch_norm(c, x, running_mean, running_var, weight=None, bias=None, training=False,
                  momentum=0.1, eps=1e-5):
    if training:
        c.fail("batch_norm(training=True): vkg exports inference batch norm")
    if running_mean is None or running_var is None:
        c.fail("batch_norm without running statistics")
    args = [c.tensor_arg(t, what) if t is not None else None for t, what in
            ((running_mean, "running_mean"), (running_var, "running_var"), (weight, "weight"),
             (bias, "bias"))]
    return c.b.batchnorm(c.tensor_arg(x), *args, eps=eps, name=c.name())


def _f_cat(c, tensors, dim=0, out=None, axis=None):
    if out is not None:
        c.fail("cat(out=...) is not supported")
    ts = [c.tensor_arg(t, "input") for t in tensors]
    if not ts:
        c.fail("cat of no tensors")
    if len(ts) == 1:
        return ts[0]
    return c.b.concat(ts, dim if axis is None else axis, name=c.name())


def _permute(c, x, dims):
    x = c.tensor_arg(x)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list, torch.Size)):
        dims = tuple(dims[0])
    return c.b.permute(x, [c.intval(d) for d in dims], name=c.name())


def _f_permute(c, x, dims):
    return _permute(c, x, (dims,))


def _method_permute(c, x, *dims, **kw):
    return _permute(c, x, (kw["dims"],) if "dims" in kw else dims)


def _f_transpose(c, x, dim0, dim1):
    x = c.tensor_arg(x)
    r = x.rank
    d0, d1 = c.intval(dim0), c.intval(dim1)
    if not (-r <= d0 < r and -r <= d1 < r):
        c.fail("transpose(%d, %d) of a rank-%d tensor" % (d0, d1, r))
    perm = list(range(r))
    perm[d0 % r], perm[d1 % r] = perm[d1 % r], perm[d0 % r]
    return c.b.permute(x, perm, name=c.name())


def _f_argmax(c, x, dim=None, keepdim=False):
    x = c.tensor_arg(x)
    if dim is None:
        c.fail("argmax without dim (over the flattened tensor) is not supported; give dim")
    if keepdim:
        c.fail("argmax(keepdim=True) is not supported (vkg's i32 argmax drops the dim)")
    return c.b.argmax(x, c.intval(dim), name=c.name())


_MODULES.update({nn.Upsample: _m_upsample, nn.UpsamplingBilinear2d: _m_upsample,
                 nn.AdaptiveAvgPool2d: _m_adaptive_avg_pool2d, nn.BatchNorm2d: _m_batchnorm,
                 nn.BatchNorm1d: _m_batchnorm})
_FUNCTIONS.update({F.interpolate: _interpolate, F.upsample: _interpolate,
                   F.adaptive_avg_pool2d: _f_adaptive_avg_pool2d, F.batch_norm: _f_batch_norm,
                   torch.cat: _f_cat, torch.permute: _f_permute, torch.transpose: _f_transpose,
                   torch.argmax: _f_argmax})
if hasattr(torch, "concat"):
    _FUNCTIONS[torch.concat] = _f_cat
_METHODS.update({"permute": _method_permute, "transpose": _f_transpose, "argmax": _f_argmax})


def trace(module):
    """torch.fx.GraphModule of module, traced with the exporter's leaves."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(module)
    except ExportError:
        raise
    except Exception as e:  # e.g. data-dependent control flow
        where = "the root module (%s)" % type(module).__name__
        if tracer.failed_scope:
            path, cls = tracer.failed_scope[-1]
            where = "module '%s' (%s)" % (path, cls)
        raise ExportError("torch.fx cannot trace %s: %s: %s (register a converter for %s with "
                          "vkg.register_converter)" % (where, type(e).__name__, e,
                                                       where.split(" (")[1].rstrip(")"))) from e
    return torch.fx.GraphModule(tracer.root, graph, type(module).__name__)


def _export_root_converter(module, conv, example_inputs, dynamic_batch):
    """A root module with a registered converter: inputs named after forward's parameters."""
    b = Builder()
    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    inputs = []
    for i, ex in enumerate(example_inputs):
        if not isinstance(ex, torch.Tensor) or ex.dtype != torch.float32:
            raise ExportError("%s: example input %d must be a float32 tensor"
                              % (type(module).__name__, i))
        name = params[i].name if i < len(params) else "input%d" % i
        shape = list(ex.shape)
        if dynamic_batch and shape:
            shape[0] = "batch"
        inputs.append(b.input(name, shape))
    try:
        out = conv(b, module, inputs, "")
    except ValueError as e:  # a Builder check
        raise ExportError("converter for %s: %s" % (type(module).__name__, e)) from e
    with torch.no_grad():
        want = module(*example_inputs)
    if isinstance(out, Tensor):
        pairs, want = [("output", out)], [want]
    else:
        pairs = [("output%d" % i, o) for i, o in enumerate(out)]
    for (name, o), w in zip(pairs, want):
        if not isinstance(o, Tensor) or o.builder is not b:
            raise ExportError("converter for %s returned %r, not a tensor of the builder"
                              % (type(module).__name__, o))
        shape = tuple(w.shape)
        if o.rank != len(shape) or any(isinstance(d, int) and d != s
                                       for d, s in zip(o.shape, shape)):
            raise ExportError("converter for %s: output %s has shape %s, PyTorch ran %s"
                              % (type(module).__name__, name, list(o.shape), list(shape)))
        b.output(o, name)
    b.flush_outputs()
    return b


def export(module, example_inputs, path=None, dynamic_batch=True, metadata=None, fp16=False,
           moe_stats=False, moe_routing=False, moe_variant=None):
    """Exports module to a .vkg file at path (skipped when path is None); returns the Builder.

    example_inputs: a tensor or a tuple of tensors (float32) in forward's parameter order.
    dynamic_batch: the inputs' first dim becomes the symbol "batch".
    fp16: store the weight matrices of nn.Linear modules and of the MoE converters as f16
    (biases, norms, routers stay f32).
    moe_stats: every vkg.moe module adds its routing statistics as graph outputs
    "<module path>.counts", ".fraction", ".mean_score", ".load_balance", ".z_loss" (after the
    model's outputs; a module's `vkg_stats` attribute, when not None, overrides this);
    moe_routing: likewise "<module path>.ids" (i32) and ".gates" (`vkg_routing`).
    moe_variant: how MoELoRAFFN is exported: "shared_base" (default) or "naive" (a module's
    `vkg_variant` attribute overrides it). See docs/moe.md.
    """
    from . import __version__
    if not isinstance(module, nn.Module):
        raise TypeError("vkg.export needs an nn.Module, got %r" % type(module).__name__)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if moe_variant not in (None, "shared_base", "naive"):
        raise ValueError("moe_variant=%r: expected 'shared_base' or 'naive'" % (moe_variant,))
    with torch.no_grad():
        try:
            module(*example_inputs)
        except Exception as e:
            raise ExportError("running %s on the example inputs failed: %s: %s"
                              % (type(module).__name__, type(e).__name__, e)) from e
    _OPTIONS.append(dict(fp16=bool(fp16), moe_stats=bool(moe_stats),
                         moe_routing=bool(moe_routing), moe_variant=moe_variant,
                         dynamic_batch=bool(dynamic_batch)))
    try:
        root_conv = _find_converter(type(module))
        if root_conv is not None:
            b = _export_root_converter(module, root_conv, example_inputs, dynamic_batch)
        else:
            gm = trace(module)
            with torch.no_grad():
                try:
                    ShapeProp(gm).propagate(*example_inputs)
                except ExportError:
                    raise
                except Exception as e:
                    raise ExportError("running %s on the example inputs failed: %s: %s"
                                      % (type(module).__name__, type(e).__name__, e)) from e
                b = Builder()
                _Converter(gm, b, dynamic_batch, fp16=fp16).run(example_inputs)
    finally:
        _OPTIONS.pop()
    b.metadata("producer", "vkg.export %s" % __version__)
    b.metadata("model_name", type(module).__name__)
    b.metadata("exporter_version", __version__)
    for k, v in (metadata or {}).items():
        b.metadata(k, v)
    if path is not None:
        b.save(path)
    return b


class _CallableModule(types.ModuleType):
    """Lets `vkg.export(...)` work even when vkg.export is bound to this submodule."""

    def __call__(self, *args, **kwargs):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
