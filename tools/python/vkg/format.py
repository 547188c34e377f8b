"""Low-level writer and reader of the .vkg graph format v1.0 (docs/graph-format.md).

GraphWriter serializes tensors, nodes, graph inputs/outputs, metadata and weights byte-exactly;
read_graph parses a file (path or bytes), validates its structure and returns plain objects.
NumPy is imported lazily so that `import vkg` works without it.
"""

import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

MAGIC = b"VKGRAPH\0"
VERSION_MAJOR = 1
VERSION_MINOR = 0
HEADER_SIZE = 64
TABLE_ENTRY_SIZE = 32
TENSOR_RECORD_SIZE = 88
MAX_DIMS = 8
NONE = 0xFFFFFFFF
FLAG_REQUIRED = 1

SEC_STRINGS, SEC_TENSORS, SEC_NODES, SEC_GRAPH_IO, SEC_METADATA, SEC_WEIGHTS = 1, 2, 3, 4, 5, 6
SECTION_NAMES = {1: "STRINGS", 2: "TENSORS", 3: "NODES", 4: "GRAPH_IO", 5: "METADATA", 6: "WEIGHTS"}

DTYPES = ["f32", "f16", "bf16", "i32", "u8"]
DTYPE_CODE = {n: i for i, n in enumerate(DTYPES)}
DTYPE_SIZE = {"f32": 4, "f16": 2, "bf16": 2, "i32": 4, "u8": 1}
ROLES = ["intermediate", "input", "output", "constant"]
ROLE_CODE = {n: i for i, n in enumerate(ROLES)}

ATTR_INT, ATTR_FLOAT, ATTR_STRING, ATTR_INTS, ATTR_FLOATS = 1, 2, 3, 4, 5
ATTR_TYPE_NAMES = {1: "INT", 2: "FLOAT", 3: "STRING", 4: "INTS", 5: "FLOATS"}

OPS = ("linear", "layernorm", "gelu", "relu", "add", "mul", "softmax", "reshape",
       "attention", "patchify", "insert_tokens", "slice", "swiglu",
       "moe_router", "moe_experts", "moe_lora_mix", "tanh", "sigmoid", "add_n")
OPS += ("conv2d", "conv_transpose2d")
OPS += ("resize_bilinear", "adaptive_avg_pool2d", "batchnorm", "concat", "permute", "argmax")

MAX_STRINGS = 1 << 20
MAX_STRING_BYTES = 4096
MAX_COUNT = 1 << 20
MAX_PER_NODE = 64
MAX_ARRAY_ATTR = 64
WEIGHT_ALIGN = 64
SECTION_ALIGN = 8


class FormatError(ValueError):
    """A .vkg file (or what a writer was asked to write) breaks docs/graph-format.md."""


def _align(n, a):
    return (n + a - 1) // a * a


def _np():
    import numpy
    return numpy


def float32_to_bf16_bits(a):
    """float32 array -> uint16 array holding bfloat16 bits (round to nearest even; NaN stays NaN)."""
    np = _np()
    a = np.ascontiguousarray(a, dtype=np.float32)
    u = a.view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded = rounded.copy()
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)  # keep sign, force quiet NaN
    return rounded


def bf16_bits_to_float32(b):
    np = _np()
    return (np.asarray(b, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def numpy_dtype(dtype):
    """NumPy dtype that holds a vkg dtype's storage (bf16 -> uint16 raw bits)."""
    np = _np()
    return {"f32": np.float32, "f16": np.float16, "bf16": np.uint16, "i32": np.int32,
            "u8": np.uint8}[dtype]


class Attr:
    """An attribute value with an explicit type (needed for empty lists or floats given as ints)."""

    def __init__(self, type_, value):
        if type_ not in ATTR_TYPE_NAMES:
            raise FormatError("unknown attribute type %r" % (type_,))
        self.type = type_
        self.value = value

    def __repr__(self):
        return "Attr(%s, %r)" % (ATTR_TYPE_NAMES[self.type], self.value)


def infer_attr(value):
    """(type, value) of a Python attribute value: int, float, str, list of ints, list of floats."""
    if isinstance(value, Attr):
        return value.type, value.value
    if isinstance(value, bool):
        return ATTR_INT, int(value)
    if isinstance(value, int):
        return ATTR_INT, value
    if isinstance(value, float):
        return ATTR_FLOAT, value
    if isinstance(value, str):
        return ATTR_STRING, value
    if isinstance(value, (list, tuple)):
        vals = list(value)
        if vals and all(isinstance(v, int) and not isinstance(v, bool) for v in vals):
            return ATTR_INTS, [int(v) for v in vals]
        if vals and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            return ATTR_FLOATS, [float(v) for v in vals]
        raise FormatError("cannot infer the type of attribute value %r (use Attr)" % (value,))
    # numpy scalars
    try:
        np = _np()
        if isinstance(value, np.integer):
            return ATTR_INT, int(value)
        if isinstance(value, np.floating):
            return ATTR_FLOAT, float(value)
    except ImportError:
        pass
    raise FormatError("cannot infer the type of attribute value %r" % (value,))


# --------------------------------------------------------------------------------------------
# writer


class GraphWriter:
    """Collects a graph and serializes it. Checks only what it needs to serialize.

    dims entries are ints (>= 0, fixed) or str (a symbolic dim; '' = inferred, unchecked).
    """

    def __init__(self):
        self._strings: List[str] = []
        self._string_index: Dict[str, int] = {}
        self.tensors: List[dict] = []
        self.nodes: List[dict] = []
        self.inputs: List[int] = []
        self.outputs: List[int] = []
        self.metadata: List[tuple] = []

    def _str(self, s):
        if not isinstance(s, str):
            raise FormatError("string expected, got %r" % (s,))
        i = self._string_index.get(s)
        if i is None:
            i = len(self._strings)
            self._strings.append(s)
            self._string_index[s] = i
        return i

    def add_tensor(self, name, dtype, role, dims, data=None):
        """Adds a tensor and returns its id. data: bytes or a NumPy array (constants)."""
        if dtype not in DTYPE_CODE:
            raise FormatError("tensor %r: unknown dtype %r" % (name, dtype))
        if role not in ROLE_CODE:
            raise FormatError("tensor %r: unknown role %r" % (name, role))
        dims = list(dims)
        if len(dims) > MAX_DIMS:
            raise FormatError("tensor %r: rank %d > %d" % (name, len(dims), MAX_DIMS))
        raw = None
        if data is not None:
            if isinstance(data, (bytes, bytearray, memoryview)):
                raw = bytes(data)
            else:
                np = _np()
                arr = np.asarray(data)
                if dtype == "bf16" and arr.dtype.kind == "f":
                    arr = float32_to_bf16_bits(arr)
                le = np.dtype(numpy_dtype(dtype)).newbyteorder("<")
                raw = np.ascontiguousarray(arr).astype(le, copy=False).tobytes()
            n = DTYPE_SIZE[dtype]
            for d in dims:
                if not isinstance(d, int) or d < 0:
                    raise FormatError("constant %r: dims must be fixed" % (name,))
                n *= d
            if n != len(raw):
                raise FormatError("constant %r: %d data bytes, dims need %d" % (name, len(raw), n))
        self.tensors.append(dict(name=name, dtype=dtype, role=role, dims=dims, data=raw))
        return len(self.tensors) - 1

    def add_node(self, op, name, inputs, outputs, attrs=None):
        """attrs: dict name -> value (int, float, str, list, or Attr), or a list of pairs."""
        items = list(attrs.items()) if isinstance(attrs, dict) else list(attrs or [])
        typed = [(k,) + infer_attr(v) for k, v in items]
        self.nodes.append(dict(op=op, name=name, inputs=list(inputs), outputs=list(outputs),
                               attrs=typed))

    def add_input(self, tid):
        self.inputs.append(tid)

    def add_output(self, tid):
        self.outputs.append(tid)

    def add_metadata(self, key, value):
        self.metadata.append((key, value))

    # -- serialization --
    def to_bytes(self):
        # intern every string first, in a deterministic order
        for t in self.tensors:
            self._str(t["name"])
            for d in t["dims"]:
                if isinstance(d, str):
                    self._str(d)
        for n in self.nodes:
            self._str(n["op"])
            self._str(n["name"])
            for a in n["attrs"]:
                self._str(a[0])
                if a[1] == ATTR_STRING:
                    self._str(a[2])
        for k, v in self.metadata:
            self._str(k)
            self._str(v)

        # WEIGHTS
        weights = bytearray()
        offsets = {}
        for i, t in enumerate(self.tensors):
            if t["data"] is not None:
                weights.extend(b"\0" * (_align(len(weights), WEIGHT_ALIGN) - len(weights)))
                offsets[i] = len(weights)
                weights.extend(t["data"])

        sections = [(SEC_STRINGS, FLAG_REQUIRED, self._strings_bytes()),
                    (SEC_TENSORS, FLAG_REQUIRED, self._tensors_bytes(offsets)),
                    (SEC_NODES, FLAG_REQUIRED, self._nodes_bytes()),
                    (SEC_GRAPH_IO, FLAG_REQUIRED, self._io_bytes())]
        if self.metadata:
            sections.append((SEC_METADATA, 0, self._metadata_bytes()))
        if offsets:
            sections.append((SEC_WEIGHTS, FLAG_REQUIRED, bytes(weights)))

        table_end = HEADER_SIZE + TABLE_ENTRY_SIZE * len(sections)
        pos = table_end
        placed = []
        for kind, flags, body in sections:
            pos = _align(pos, WEIGHT_ALIGN if kind == SEC_WEIGHTS else SECTION_ALIGN)
            placed.append((kind, flags, pos, body))
            pos += len(body)
        file_size = pos

        out = bytearray(file_size)
        table = bytearray()
        for kind, flags, off, body in placed:
            out[off:off + len(body)] = body
            table += struct.pack("<IIQQII", kind, flags, off, len(body), zlib.crc32(body), 0)
        out[HEADER_SIZE:table_end] = table
        header = struct.pack("<8sIIQQII20s", MAGIC, VERSION_MAJOR, VERSION_MINOR, file_size,
                             HEADER_SIZE, len(sections), zlib.crc32(bytes(table)), b"\0" * 20)
        header += struct.pack("<I", zlib.crc32(header))
        out[0:HEADER_SIZE] = header
        return bytes(out)

    def save(self, path):
        data = self.to_bytes()
        with open(path, "wb") as f:
            f.write(data)
        return len(data)

    def _strings_bytes(self):
        enc = []
        for s in self._strings:
            b = s.encode("utf-8")
            if b"\0" in b:
                raise FormatError("string %r holds a NUL byte" % (s,))
            if len(b) > MAX_STRING_BYTES:
                raise FormatError("string %r... longer than %d bytes" % (s[:40], MAX_STRING_BYTES))
            enc.append(b)
        if len(enc) > MAX_STRINGS:
            raise FormatError("more than %d strings" % MAX_STRINGS)
        offs = [0]
        for b in enc:
            offs.append(offs[-1] + len(b))
        return struct.pack("<I%dI" % len(offs), len(enc), *offs) + b"".join(enc)

    def _tensors_bytes(self, offsets):
        out = bytearray(struct.pack("<I", len(self.tensors)))
        for i, t in enumerate(self.tensors):
            dims = []
            for d in t["dims"]:
                dims.append(-self._string_index[d] - 1 if isinstance(d, str) else int(d))
            dims += [0] * (MAX_DIMS - len(dims))
            data = t["data"]
            out += struct.pack("<IBBBBQQ8q", self._string_index[t["name"]], DTYPE_CODE[t["dtype"]],
                               ROLE_CODE[t["role"]], len(t["dims"]), 0,
                               offsets.get(i, 0), len(data) if data is not None else 0, *dims)
        return bytes(out)

    def _nodes_bytes(self):
        out = bytearray(struct.pack("<I", len(self.nodes)))
        for n in self.nodes:
            out += struct.pack("<IIIIII", self._string_index[n["op"]], self._string_index[n["name"]],
                               len(n["inputs"]), len(n["outputs"]), len(n["attrs"]), 0)
            out += struct.pack("<%dI" % len(n["inputs"]),
                               *[NONE if t is None else t for t in n["inputs"]])
            out += struct.pack("<%dI" % len(n["outputs"]), *n["outputs"])
            for name, typ, val in n["attrs"]:
                if typ in (ATTR_INTS, ATTR_FLOATS):
                    count = len(val)
                    if count > MAX_ARRAY_ATTR:
                        raise FormatError("node %r attribute %r: %d elements > %d"
                                          % (n["name"], name, count, MAX_ARRAY_ATTR))
                else:
                    count = 1
                out += struct.pack("<III", self._string_index[name], typ, count)
                if typ == ATTR_INT:
                    out += struct.pack("<q", int(val))
                elif typ == ATTR_FLOAT:
                    out += struct.pack("<d", float(val))
                elif typ == ATTR_STRING:
                    out += struct.pack("<I", self._string_index[val])
                elif typ == ATTR_INTS:
                    out += struct.pack("<%dq" % count, *[int(v) for v in val])
                else:
                    out += struct.pack("<%dd" % count, *[float(v) for v in val])
        return bytes(out)

    def _io_bytes(self):
        return (struct.pack("<I%dI" % len(self.inputs), len(self.inputs), *self.inputs)
                + struct.pack("<I%dI" % len(self.outputs), len(self.outputs), *self.outputs))

    def _metadata_bytes(self):
        out = bytearray(struct.pack("<I", len(self.metadata)))
        for k, v in self.metadata:
            out += struct.pack("<II", self._string_index[k], self._string_index[v])
        return bytes(out)


# --------------------------------------------------------------------------------------------
# reader


@dataclass
class TensorInfo:
    index: int
    name: str
    dtype: str
    role: str
    dims: List[int]              # fixed sizes; -1 where symbolic
    sym: List[Optional[str]]     # symbol name per dim ('' = inferred), None where fixed
    data_offset: int = 0
    data_size: int = 0
    data: Any = None             # constants: NumPy array of shape dims (bf16 decoded to float32)
    raw: Optional[bytes] = None  # constants: the stored bytes

    @property
    def rank(self):
        return len(self.dims)

    @property
    def shape(self):
        """dims with symbolic entries replaced by their names."""
        return [s if s is not None else d for d, s in zip(self.dims, self.sym)]


@dataclass
class NodeInfo:
    op: str
    name: str
    inputs: List[Optional[int]]  # None for an absent optional input
    outputs: List[int]
    attrs: Dict[str, Any] = field(default_factory=dict)
    attr_types: Dict[str, int] = field(default_factory=dict)


@dataclass
class Graph:
    version: tuple
    tensors: List[TensorInfo]
    nodes: List[NodeInfo]
    inputs: List[int]
    outputs: List[int]
    metadata: Dict[str, str]
    sections: List[dict]
    file_size: int

    def tensor(self, name):
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def input_names(self):
        return [self.tensors[i].name for i in self.inputs]

    @property
    def output_names(self):
        return [self.tensors[i].name for i in self.outputs]

    @property
    def constants(self):
        return {t.name: t.data for t in self.tensors if t.role == "constant"}

    def topo_order(self):
        """Nodes in an order where every input is produced before use (raises on cycles)."""
        return _topo_sort(self.nodes, len(self.tensors))


class _Cursor:
    def __init__(self, buf, section):
        self.buf = buf
        self.pos = 0
        self.section = section

    def take(self, fmt):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise FormatError("%s: truncated (need %d bytes at %d, section is %d)"
                              % (self.section, size, self.pos, len(self.buf)))
        vals = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return vals

    def end(self):
        if self.pos != len(self.buf):
            raise FormatError("%s: %d trailing bytes" % (self.section, len(self.buf) - self.pos))


def _topo_sort(nodes, n_tensors):
    producer = {}
    for i, n in enumerate(nodes):
        for t in n.outputs:
            producer[t] = i
    order, state = [], [0] * len(nodes)
    for start in range(len(nodes)):
        if state[start]:
            continue
        stack = [(start, iter([t for t in nodes[start].inputs if t is not None]))]
        state[start] = 1
        while stack:
            i, it = stack[-1]
            for t in it:
                p = producer.get(t)
                if p is None:
                    continue
                if state[p] == 1:
                    raise FormatError("cycle through node %r" % nodes[p].name)
                if state[p] == 0:
                    state[p] = 1
                    stack.append((p, iter([x for x in nodes[p].inputs if x is not None])))
                    break
            else:
                stack.pop()
                state[i] = 2
                order.append(nodes[i])
    return order


def read_graph(src, check_ops=True):
    """Parses and validates a .vkg file given as a path or bytes. Raises FormatError."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        buf = bytes(src)
    else:
        with open(src, "rb") as f:
            buf = f.read()
    if len(buf) < HEADER_SIZE:
        raise FormatError("file of %d bytes is shorter than the header" % len(buf))
    (magic, vmaj, vmin, file_size, table_off, count, table_crc, reserved,
     header_crc) = struct.unpack_from("<8sIIQQII20sI", buf, 0)
    if magic != MAGIC:
        raise FormatError("bad magic %r" % magic)
    if zlib.crc32(buf[0:60]) != header_crc:
        raise FormatError("header CRC mismatch")
    if vmaj != VERSION_MAJOR:
        raise FormatError("version %d.%d: this reader reads major version %d" % (vmaj, vmin,
                                                                                   VERSION_MAJOR))
    if reserved != b"\0" * 20:
        raise FormatError("header reserved bytes are not zero")
    if file_size != len(buf):
        raise FormatError("file_size %d but the file has %d bytes" % (file_size, len(buf)))
    if table_off != HEADER_SIZE:
        raise FormatError("section_table_offset %d, expected 64" % table_off)
    if not 1 <= count <= 64:
        raise FormatError("section_count %d outside 1..64" % count)
    table_end = HEADER_SIZE + TABLE_ENTRY_SIZE * count
    if table_end > len(buf):
        raise FormatError("section table runs past the end of the file")
    if zlib.crc32(buf[HEADER_SIZE:table_end]) != table_crc:
        raise FormatError("section table CRC mismatch")

    sections, by_kind = [], {}
    for i in range(count):
        kind, flags, off, size, crc, res = struct.unpack_from("<IIQQII", buf,
                                                              HEADER_SIZE + i * TABLE_ENTRY_SIZE)
        name = SECTION_NAMES.get(kind, "kind %d" % kind)
        if res != 0:
            raise FormatError("section %s: reserved field not zero" % name)
        if off < table_end or off + size > len(buf):
            raise FormatError("section %s [%d, %d) outside the file or over the header/table"
                              % (name, off, off + size))
        if off % (WEIGHT_ALIGN if kind == SEC_WEIGHTS else SECTION_ALIGN):
            raise FormatError("section %s at offset %d is misaligned" % (name, off))
        body = buf[off:off + size]
        if zlib.crc32(body) != crc:
            raise FormatError("section %s CRC mismatch" % name)
        sections.append(dict(kind=kind, name=name, flags=flags, offset=off, size=size, crc=crc))
        if kind in SECTION_NAMES:
            if kind in by_kind:
                raise FormatError("section %s appears twice" % name)
            by_kind[kind] = body
        elif flags & FLAG_REQUIRED:
            raise FormatError("unknown required section kind %d" % kind)
    spans = sorted((s["offset"], s["offset"] + s["size"], s["name"]) for s in sections)
    for a, b in zip(spans, spans[1:]):
        if b[0] < a[1]:
            raise FormatError("sections %s and %s overlap" % (a[2], b[2]))
    for kind in (SEC_STRINGS, SEC_TENSORS, SEC_NODES, SEC_GRAPH_IO):
        if kind not in by_kind:
            raise FormatError("required section %s is missing" % SECTION_NAMES[kind])

    strings = _read_strings(by_kind[SEC_STRINGS])

    def S(i, what):
        if i >= len(strings):
            raise FormatError("%s: string index %d out of range (%d strings)" % (what, i,
                                                                               len(strings)))
        return strings[i]

    tensors = _read_tensors(by_kind[SEC_TENSORS], S, by_kind.get(SEC_WEIGHTS))
    nodes = _read_nodes(by_kind[SEC_NODES], S, len(tensors), check_ops)
    inputs, outputs = _read_io(by_kind[SEC_GRAPH_IO], tensors)
    metadata = {}
    if SEC_METADATA in by_kind:
        c = _Cursor(by_kind[SEC_METADATA], "METADATA")
        (n,) = c.take("<I")
        for _ in range(n):
            k, v = c.take("<II")
            k, v = S(k, "METADATA key"), S(v, "METADATA value")
            if k in metadata:
                raise FormatError("METADATA: key %r twice" % k)
            metadata[k] = v
        c.end()

    # graph-level rules
    producer = {}
    for n in nodes:
        for t in n.outputs:
            role = tensors[t].role
            if role in ("input", "constant"):
                raise FormatError("node %r writes %s tensor %r" % (n.name, role, tensors[t].name))
            if t in producer:
                raise FormatError("tensor %r is written by nodes %r and %r"
                                  % (tensors[t].name, producer[t], n.name))
            producer[t] = n.name
    for t in tensors:
        if t.role in ("intermediate", "output") and t.index not in producer:
            raise FormatError("tensor %r (%s) is written by no node" % (t.name, t.role))
    _topo_sort(nodes, len(tensors))
    return Graph(version=(vmaj, vmin), tensors=tensors, nodes=nodes, inputs=inputs,
                 outputs=outputs, metadata=metadata, sections=sections, file_size=file_size)


def _read_strings(body):
    c = _Cursor(body, "STRINGS")
    (n,) = c.take("<I")
    if n > MAX_STRINGS:
        raise FormatError("STRINGS: %d strings > %d" % (n, MAX_STRINGS))
    offs = c.take("<%dI" % (n + 1))
    if offs[0] != 0:
        raise FormatError("STRINGS: offsets[0] = %d" % offs[0])
    base = c.pos
    if base + offs[-1] != len(body):
        raise FormatError("STRINGS: %d string bytes, section has %d" % (offs[-1], len(body) - base))
    out = []
    for i in range(n):
        a, b = offs[i], offs[i + 1]
        if b < a:
            raise FormatError("STRINGS: offsets decrease at %d" % i)
        if b - a > MAX_STRING_BYTES:
            raise FormatError("STRINGS: string %d is %d bytes > %d" % (i, b - a, MAX_STRING_BYTES))
        raw = body[base + a:base + b]
        if b"\0" in raw:
            raise FormatError("STRINGS: string %d holds a NUL byte" % i)
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise FormatError("STRINGS: string %d is not UTF-8" % i) from None
    return out


def _read_tensors(body, S, weights):
    c = _Cursor(body, "TENSORS")
    (n,) = c.take("<I")
    if n > MAX_COUNT:
        raise FormatError("TENSORS: %d tensors > %d" % (n, MAX_COUNT))
    tensors, names = [], set()
    for i in range(n):
        rec = c.take("<IBBBBQQ8q")
        name_i, dt, role, rank, res, doff, dsize = rec[:7]
        dims8 = rec[7:]
        name = S(name_i, "tensor %d name" % i)
        if not name:
            raise FormatError("TENSORS: tensor %d has an empty name" % i)
        if name in names:
            raise FormatError("TENSORS: name %r twice" % name)
        names.add(name)
        if dt >= len(DTYPES):
            raise FormatError("tensor %r: unknown dtype %d" % (name, dt))
        if role >= len(ROLES):
            raise FormatError("tensor %r: unknown role %d" % (name, role))
        if rank > MAX_DIMS:
            raise FormatError("tensor %r: rank %d > 8" % (name, rank))
        if res != 0:
            raise FormatError("tensor %r: reserved byte not zero" % name)
        if any(dims8[rank:]):
            raise FormatError("tensor %r: unused dims not zero" % name)
        dtype, role_s = DTYPES[dt], ROLES[role]
        dims, sym = [], []
        elems = 1
        for d in dims8[:rank]:
            if d >= 0:
                dims.append(d)
                sym.append(None)
                elems *= d
                if elems * DTYPE_SIZE[dtype] >= 1 << 63:
                    raise FormatError("tensor %r: size overflows 2^63 bytes" % name)
            else:
                dims.append(-1)
                sym.append(S(-d - 1, "tensor %r symbolic dim" % name))
        t = TensorInfo(index=i, name=name, dtype=dtype, role=role_s, dims=dims, sym=sym,
                       data_offset=doff, data_size=dsize)
        if role_s == "constant":
            if any(s is not None for s in sym):
                raise FormatError("constant %r has a symbolic dim" % name)
            if dsize != elems * DTYPE_SIZE[dtype]:
                raise FormatError("constant %r: data_size %d, dims need %d"
                                  % (name, dsize, elems * DTYPE_SIZE[dtype]))
            if doff % WEIGHT_ALIGN:
                raise FormatError("constant %r: data_offset %d not a multiple of 64" % (name, doff))
            if dsize:
                if weights is None:
                    raise FormatError("constant %r has data but there is no WEIGHTS section"
                                      % name)
                if doff + dsize > len(weights):
                    raise FormatError("constant %r: data [%d, %d) outside WEIGHTS (%d bytes)"
                                      % (name, doff, doff + dsize, len(weights)))
            raw = weights[doff:doff + dsize] if dsize else b""
            t.raw = raw
            np = _np()
            arr = np.frombuffer(raw, dtype=np.dtype(numpy_dtype(dtype)).newbyteorder("<"))
            if dtype == "bf16":
                arr = bf16_bits_to_float32(arr)
            t.data = arr.astype(arr.dtype.newbyteorder("="), copy=True).reshape(dims)
        elif doff or dsize:
            raise FormatError("%s tensor %r has data_offset/data_size" % (role_s, name))
        tensors.append(t)
    c.end()
    return tensors


def _read_nodes(body, S, n_tensors, check_ops):
    c = _Cursor(body, "NODES")
    (n,) = c.take("<I")
    if n > MAX_COUNT:
        raise FormatError("NODES: %d nodes > %d" % (n, MAX_COUNT))
    nodes, names = [], set()
    for i in range(n):
        op_i, name_i, ni, no, na, res = c.take("<IIIIII")
        op, name = S(op_i, "node %d op" % i), S(name_i, "node %d name" % i)
        if not name:
            raise FormatError("NODES: node %d has an empty name" % i)
        if name in names:
            raise FormatError("NODES: name %r twice" % name)
        names.add(name)
        if check_ops and op not in OPS:
            raise FormatError("node %r: unknown op %r" % (name, op))
        if ni > MAX_PER_NODE or no > MAX_PER_NODE or na > MAX_PER_NODE:
            raise FormatError("node %r: more than 64 inputs/outputs/attributes" % name)
        if res != 0:
            raise FormatError("node %r: reserved field not zero" % name)
        ins = list(c.take("<%dI" % ni))
        outs = list(c.take("<%dI" % no))
        for t in ins:
            if t != NONE and t >= n_tensors:
                raise FormatError("node %r: input tensor %d out of range" % (name, t))
        for t in outs:
            if t >= n_tensors:
                raise FormatError("node %r: output tensor %d out of range" % (name, t))
        if len(set(outs)) != len(outs):
            raise FormatError("node %r writes a tensor twice" % name)
        attrs, types = {}, {}
        for _ in range(na):
            an, at, cnt = c.take("<III")
            an = S(an, "node %r attribute name" % name)
            if an in attrs:
                raise FormatError("node %r: attribute %r twice" % (name, an))
            if at in (ATTR_INT, ATTR_FLOAT, ATTR_STRING):
                if cnt != 1:
                    raise FormatError("node %r attribute %r: count %d, expected 1" % (name, an,
                                                                                        cnt))
            elif at in (ATTR_INTS, ATTR_FLOATS):
                if cnt > MAX_ARRAY_ATTR:
                    raise FormatError("node %r attribute %r: count %d > 64" % (name, an, cnt))
            else:
                raise FormatError("node %r attribute %r: unknown type %d" % (name, an, at))
            if at == ATTR_INT:
                (v,) = c.take("<q")
            elif at == ATTR_FLOAT:
                (v,) = c.take("<d")
            elif at == ATTR_STRING:
                (v,) = c.take("<I")
                v = S(v, "node %r attribute %r" % (name, an))
            elif at == ATTR_INTS:
                v = list(c.take("<%dq" % cnt))
            else:
                v = list(c.take("<%dd" % cnt))
            attrs[an] = v
            types[an] = at
        nodes.append(NodeInfo(op=op, name=name, inputs=[None if t == NONE else t for t in ins],
                              outputs=outs, attrs=attrs, attr_types=types))
    c.end()
    return nodes


def _read_io(body, tensors):
    c = _Cursor(body, "GRAPH_IO")
    (ni,) = c.take("<I")
    ins = list(c.take("<%dI" % ni))
    (no,) = c.take("<I")
    outs = list(c.take("<%dI" % no))
    c.end()
    for lst, role in ((ins, "input"), (outs, "output")):
        if len(set(lst)) != len(lst):
            raise FormatError("GRAPH_IO: an %s is listed twice" % role)
        for t in lst:
            if t >= len(tensors):
                raise FormatError("GRAPH_IO: %s tensor %d out of range" % (role, t))
            if tensors[t].role != role:
                raise FormatError("GRAPH_IO: tensor %r listed as %s has role %s"
                                  % (tensors[t].name, role, tensors[t].role))
    for t in tensors:
        if t.role == "input" and t.index not in ins:
            raise FormatError("input tensor %r is not a graph input" % t.name)
        if t.role == "output" and t.index not in outs:
            raise FormatError("output tensor %r is not a graph output" % t.name)
    return ins, outs
