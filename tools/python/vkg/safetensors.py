"""A minimal safetensors reader and writer (standard library + NumPy only).

File layout: u64 little-endian header length n, then n bytes of UTF-8 JSON
{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}},
then the raw row-major little-endian tensor bytes; data_offsets count from the first byte after the
header. Reads F64, F32, F16, BF16 (decoded to float32), I64, I32, I16, I8, U8, BOOL.
"""

import json
import struct

import numpy as np

_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
           "I8": "i1", "U8": "u1", "BOOL": "?", "BF16": "<u2"}
_WRITE = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
          np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
          np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}


class SafetensorsError(ValueError):
    pass


def _bf16_to_f32(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(a):
    b = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = b + (np.uint32(0x7FFF) + ((b >> 16) & 1))    # round to nearest even
    return np.where(np.isnan(a), np.uint32(0x7FC00000), rounded).astype(np.uint32) >> 16


def read_safetensors_bytes(buf, path="<bytes>"):
    """dict name -> NumPy array (BF16 decoded to float32) and the __metadata__ dict."""
    buf = memoryview(buf)
    if len(buf) < 8:
        raise SafetensorsError("%s: too short for a safetensors file" % path)
    (n,) = struct.unpack("<Q", buf[:8])
    if n > len(buf) - 8 or n > 100 << 20:
        raise SafetensorsError("%s: header length %d does not fit the file (%d bytes)"
                               % (path, n, len(buf)))
    try:
        header = json.loads(bytes(buf[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SafetensorsError("%s: bad JSON header: %s" % (path, e)) from None
    if not isinstance(header, dict):
        raise SafetensorsError("%s: the header is not a JSON object" % path)
    data = buf[8 + n:]
    meta = header.pop("__metadata__", None) or {}
    out = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], list(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError("%s: tensor %r: bad header entry %r" % (path, name, info)) \
                from None
        if dtype not in _DTYPES:
            raise SafetensorsError("%s: tensor %r: unsupported dtype %r" % (path, name, dtype))
        npd = np.dtype(_DTYPES[dtype])
        count = int(np.prod(shape)) if shape else 1
        if not (0 <= begin <= end <= len(data)) or end - begin != count * npd.itemsize:
            raise SafetensorsError("%s: tensor %r: data_offsets [%d, %d) do not hold %s %s"
                                   % (path, name, begin, end, dtype, shape))
        arr = np.frombuffer(data[begin:end], dtype=npd).reshape(shape)
        if dtype == "BF16":
            arr = _bf16_to_f32(arr)
        out[name] = arr.copy()
    return out, meta


def load_safetensors(path):
    """dict name -> NumPy array (see read_safetensors_bytes)."""
    with open(path, "rb") as f:
        return read_safetensors_bytes(f.read(), path)[0]


def safetensors_bytes(tensors, metadata=None, bf16=()):
    """Serializes dict name -> array (NumPy or torch). Names in bf16 are stored as BF16."""
    header, chunks, off = {}, [], 0
    for name in sorted(tensors):
        a = tensors[name]
        if hasattr(a, "detach"):
            a = a.detach().cpu().numpy()
        a = np.asarray(a)
        if name in bf16:
            dtype, raw = "BF16", _f32_to_bf16(a).astype("<u2").tobytes()
        else:
            if a.dtype not in _WRITE:
                raise SafetensorsError("tensor %r: dtype %s is not supported" % (name, a.dtype))
            dtype = _WRITE[a.dtype]
            raw = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(chunks)


def save_safetensors(tensors, path, metadata=None, bf16=()):
    with open(path, "wb") as f:
        f.write(safetensors_bytes(tensors, metadata, bf16))
