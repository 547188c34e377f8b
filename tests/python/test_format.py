"""Format round trip: Builder -> bytes -> read_graph, CRCs, alignment, corruption detection."""

import os
import struct
import sys
import tempfile
import unittest
import zlib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools",
                                "python"))

import numpy as np  # noqa: E402

from vkg import Builder, read_graph  # noqa: E402
from vkg import format as fmt  # noqa: E402
from vkg import reference  # noqa: E402


def build_sample():
    rng = np.random.default_rng(1)
    b = Builder()
    x = b.input("x", ["batch", 5, 8])
    w1 = b.constant("fc1.weight", rng.standard_normal((12, 8)).astype(np.float32))
    b1 = b.constant("fc1.bias", rng.standard_normal(12).astype(np.float32))
    w2 = b.constant("fc2.weight", rng.standard_normal((8, 12)).astype(np.float16))
    lnw = b.constant("ln.weight", np.ones(8, np.float32))
    lnb = b.constant("ln.bias", np.zeros(8, np.float32))
    g = b.constant("gamma", rng.standard_normal(8).astype(np.float32), dtype="bf16")
    gf = b.constant("gamma_f32", rng.standard_normal(8).astype(np.float32))  # ops need f32
    extra_i = b.constant("ids", np.arange(7, dtype=np.int32))
    extra_u = b.constant("bytes", np.arange(3, dtype=np.uint8))
    h = b.layernorm(x, lnw, lnb, 1e-6, name="ln")
    h = b.linear(h, w1, b1, activation="gelu", name="fc1")
    h = b.relu(h, name="relu")
    h = b.linear(h, w2, None, name="fc2")
    h = b.mul(h, gf, name="scale")
    h = b.add(x, h, name="residual")
    s = b.softmax(h, axis=-1, name="softmax")
    r = b.reshape(s, [0, -1], name="flat")
    b.output(r, "probs")
    b.output(h, "hidden")
    b.metadata("license", "MIT")
    b.metadata("description", "round trip ü")
    return b, dict(w1=w1, w2=w2, g=g, extra_i=extra_i, extra_u=extra_u)


class FormatRoundTrip(unittest.TestCase):
    def setUp(self):
        self.b, self.c = build_sample()
        self.data = self.b.to_bytes()
        self.g = read_graph(self.data)

    def test_header_and_crcs(self):
        d = self.data
        self.assertEqual(d[:8], b"VKGRAPH\0")
        vmaj, vmin, size, toff, count, tcrc = struct.unpack_from("<IIQQII", d, 8)
        self.assertEqual((vmaj, vmin, size, toff), (1, 0, len(d), 64))
        self.assertEqual(count, 6)
        self.assertEqual(d[40:60], b"\0" * 20)
        self.assertEqual(struct.unpack_from("<I", d, 60)[0], zlib.crc32(d[:60]))
        self.assertEqual(tcrc, zlib.crc32(d[64:64 + 32 * count]))
        kinds = []
        for i in range(count):
            kind, flags, off, sz, crc, res = struct.unpack_from("<IIQQII", d, 64 + 32 * i)
            kinds.append(kind)
            self.assertEqual(crc, zlib.crc32(d[off:off + sz]))
            self.assertEqual(off % (64 if kind == fmt.SEC_WEIGHTS else 8), 0)
            self.assertEqual(res, 0)
            if kind <= 4:
                self.assertEqual(flags & 1, 1)
        self.assertEqual(sorted(kinds), [1, 2, 3, 4, 5, 6])

    def test_weights_64_aligned_in_file(self):
        w = [s for s in self.g.sections if s["kind"] == fmt.SEC_WEIGHTS][0]
        self.assertEqual(w["offset"] % 64, 0)
        for t in self.g.tensors:
            if t.role == "constant":
                self.assertEqual((w["offset"] + t.data_offset) % 64, 0, t.name)
                self.assertEqual(self.data[w["offset"] + t.data_offset:
                                           w["offset"] + t.data_offset + t.data_size], t.raw)

    def test_tensors(self):
        g = self.g
        x = g.tensor("x")
        self.assertEqual((x.role, x.dtype, x.shape), ("input", "f32", ["batch", 5, 8]))
        self.assertEqual(g.input_names, ["x"])
        self.assertEqual(g.output_names, ["probs", "hidden"])
        self.assertEqual(g.tensor("probs").shape, ["", 40])
        self.assertEqual(g.tensor("probs").role, "output")
        self.assertEqual(g.tensor("fc1").shape, ["", 5, 12])
        np.testing.assert_array_equal(g.tensor("fc1.weight").data, self.c["w1"].data)
        self.assertEqual(g.tensor("fc2.weight").dtype, "f16")
        self.assertEqual(g.tensor("fc2.weight").data.dtype, np.float16)
        np.testing.assert_array_equal(g.tensor("fc2.weight").data, self.c["w2"].data)
        gam = g.tensor("gamma")
        self.assertEqual((gam.dtype, gam.data_size), ("bf16", 16))
        np.testing.assert_array_equal(gam.data, self.c["g"].value)
        np.testing.assert_array_equal(g.tensor("ids").data, np.arange(7, dtype=np.int32))
        np.testing.assert_array_equal(g.tensor("bytes").data, np.arange(3, dtype=np.uint8))
        self.assertEqual([t.name for t in g.tensors], [t.name for t in self.b.tensors])

    def test_nodes_attrs_metadata(self):
        g = self.g
        by = {n.name: n for n in g.nodes}
        self.assertEqual([n.name for n in g.nodes],
                         ["ln", "fc1", "relu", "fc2", "scale", "residual", "softmax", "flat"])
        self.assertEqual(by["ln"].attrs, {"eps": 1e-6})
        self.assertEqual(by["ln"].attr_types, {"eps": fmt.ATTR_FLOAT})
        self.assertEqual(by["fc1"].attrs, {"activation": 2})
        self.assertEqual(by["fc2"].attrs, {})
        self.assertEqual(len(by["fc2"].inputs), 2)
        self.assertEqual(by["softmax"].attrs, {"axis": -1})
        self.assertEqual(by["flat"].attrs, {"shape": [0, -1]})
        self.assertEqual(by["flat"].attr_types, {"shape": fmt.ATTR_INTS})
        self.assertEqual([g.tensors[i].name for i in by["fc1"].inputs],
                         ["ln", "fc1.weight", "fc1.bias"])
        self.assertEqual(g.metadata, {"license": "MIT", "description": "round trip ü"})

    def test_all_attr_types_and_none_input(self):
        w = fmt.GraphWriter()
        x = w.add_tensor("x", "f32", "input", [3])
        y = w.add_tensor("y", "f32", "output", [""])
        w.add_node("custom", "n", [x, None], [y],
                   {"i": -5, "f": 0.25, "s": "tanh", "ii": [1, -2, 3], "ff": [0.5, 1.5],
                    "empty": fmt.Attr(fmt.ATTR_FLOATS, [])})
        w.add_input(x)
        w.add_output(y)
        g = read_graph(w.to_bytes(), check_ops=False)
        n = g.nodes[0]
        self.assertEqual(n.inputs, [0, None])
        self.assertEqual(n.attrs, {"i": -5, "f": 0.25, "s": "tanh", "ii": [1, -2, 3],
                                   "ff": [0.5, 1.5], "empty": []})
        self.assertEqual(n.attr_types["empty"], fmt.ATTR_FLOATS)
        with self.assertRaisesRegex(fmt.FormatError, "unknown op 'custom'"):
            read_graph(w.to_bytes())
        # no constants: no WEIGHTS, no METADATA section
        self.assertEqual(sorted(s["kind"] for s in g.sections), [1, 2, 3, 4])

    def test_save_and_read_path(self):
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "g.vkg")
            self.b.save(p)
            with open(p, "rb") as f:
                self.assertEqual(f.read(), self.data)
            self.assertEqual(read_graph(p).output_names, ["probs", "hidden"])

    def test_deterministic(self):
        self.assertEqual(build_sample()[0].to_bytes(), self.data)

    def test_reference_runs(self):
        x = np.random.default_rng(3).standard_normal((3, 5, 8)).astype(np.float32)
        out = reference.run(self.g, {"x": x})
        self.assertEqual(out["probs"].shape, (3, 40))
        np.testing.assert_allclose(out["probs"].reshape(3, 5, 8).sum(-1), 1.0, rtol=1e-12)

    def test_bf16_rounding(self):
        a = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.0e38, np.inf], np.float32)
        bits = fmt.float32_to_bf16_bits(a)
        # 1 + 2^-8 is a tie -> even (1.0); 1 + 3*2^-8 rounds up to 1 + 2^-6
        np.testing.assert_array_equal(fmt.bf16_bits_to_float32(bits)[:4],
                                      np.array([1.0, 1.0, 1.015625, -2.5], np.float32))
        self.assertEqual(bits[5], 0x7F80)
        self.assertTrue(np.isnan(fmt.bf16_bits_to_float32(
            fmt.float32_to_bf16_bits(np.array([np.nan], np.float32))))[0])


class FormatCorruption(unittest.TestCase):
    def setUp(self):
        self.data = build_sample()[0].to_bytes()

    def test_every_region_detected(self):
        d = self.data
        offsets = [3, 20, 61, 64 + 5, 64 + 32 * 2 + 9]
        g = read_graph(d)
        for s in g.sections:
            offsets.append(s["offset"] + s["size"] // 2)
        for off in offsets:
            bad = bytearray(d)
            bad[off] ^= 0x40
            with self.assertRaises(fmt.FormatError, msg="byte %d" % off):
                read_graph(bytes(bad))

    def test_crc_message(self):
        g = read_graph(self.data)
        w = [s for s in g.sections if s["kind"] == fmt.SEC_WEIGHTS][0]
        bad = bytearray(self.data)
        bad[w["offset"] + 1] ^= 1
        with self.assertRaisesRegex(fmt.FormatError, "WEIGHTS CRC"):
            read_graph(bytes(bad))

    def test_truncated(self):
        with self.assertRaisesRegex(fmt.FormatError, "file_size"):
            read_graph(self.data[:-1])
        with self.assertRaises(fmt.FormatError):
            read_graph(self.data[:30])

    def _patch_header(self, d, field_off, fmt_s, value):
        d = bytearray(d)
        struct.pack_into(fmt_s, d, field_off, value)
        struct.pack_into("<I", d, 60, zlib.crc32(bytes(d[:60])))
        return bytes(d)

    def test_versions(self):
        newer_minor = self._patch_header(self.data, 12, "<I", 3)
        self.assertEqual(read_graph(newer_minor).version, (1, 3))
        with self.assertRaisesRegex(fmt.FormatError, "version"):
            read_graph(self._patch_header(self.data, 8, "<I", 2))

    def test_unknown_sections(self):
        # rebuild the table with an extra section of kind 99, optional then required
        for flags, ok in ((0, True), (1, False)):
            d = bytearray(self.data)
            count = struct.unpack_from("<I", d, 32)[0]
            table = bytes(d[64:64 + 32 * count])
            # the new table is 32 bytes longer; it would overlap the first section, so move all
            # sections by appending them again at the end of a new file
            body_start = 64 + 32 * (count + 1)
            out = bytearray(b"\0" * body_start)
            entries = []
            for i in range(count):
                kind, fl, off, sz, crc, res = struct.unpack_from("<IIQQII", table, 32 * i)
                align = 64 if kind == 6 else 8
                pos = (len(out) + align - 1) // align * align
                out += b"\0" * (pos - len(out)) + d[off:off + sz]
                entries.append((kind, fl, pos, sz, crc))
            pos = (len(out) + 7) // 8 * 8
            extra = b"future"
            out += b"\0" * (pos - len(out)) + extra
            entries.append((99, flags, pos, len(extra), zlib.crc32(extra)))
            tab = b"".join(struct.pack("<IIQQII", *e, 0) for e in entries)
            out[64:body_start] = tab
            hdr = struct.pack("<8sIIQQII20s", b"VKGRAPH\0", 1, 0, len(out), 64, count + 1,
                              zlib.crc32(tab), b"\0" * 20)
            out[0:60] = hdr
            struct.pack_into("<I", out, 60, zlib.crc32(hdr))
            if ok:
                self.assertEqual(len(read_graph(bytes(out)).nodes), 8)
            else:
                with self.assertRaisesRegex(fmt.FormatError, "kind 99"):
                    read_graph(bytes(out))


class BuilderChecks(unittest.TestCase):
    def test_linear_k_mismatch_names_node(self):
        b = Builder()
        x = b.input("x", ["batch", 8])
        w = b.constant("w", np.zeros((4, 6), np.float32))
        with self.assertRaisesRegex(ValueError, "'my_fc'.*K=8"):
            b.linear(x, w, name="my_fc")

    def test_bias_and_layernorm_checks(self):
        b = Builder()
        x = b.input("x", [2, 8])
        w = b.constant("w", np.zeros((4, 8), np.float32))
        with self.assertRaisesRegex(ValueError, "'fc'.*bias"):
            b.linear(x, w, b.constant("bias", np.zeros(5, np.float32)), name="fc")
        with self.assertRaisesRegex(ValueError, "'ln'.*both"):
            b.layernorm(x, b.constant("lw", np.ones(8, np.float32)), None, 1e-5, name="ln")
        with self.assertRaisesRegex(ValueError, "'ln2'.*D=8"):
            b.layernorm(x, b.constant("lw2", np.ones(7, np.float32)),
                        b.constant("lb2", np.ones(7, np.float32)), 1e-5, name="ln2")

    def test_broadcast_softmax_reshape_gelu(self):
        b = Builder()
        x = b.input("x", ["batch", 3, 4])
        with self.assertRaisesRegex(ValueError, "'a'.*broadcast"):
            b.add(x, b.constant("c", np.zeros((5,), np.float32)), name="a")
        with self.assertRaisesRegex(ValueError, "'s'.*axis"):
            b.softmax(x, axis=1, name="s")
        with self.assertRaisesRegex(ValueError, "'r'"):
            b.reshape(x, [0, 5], name="r")
        with self.assertRaisesRegex(ValueError, "'g'.*tanh"):
            b.gelu(x, approximate="tanh", name="g")
        self.assertEqual(b.reshape(x, [0, -1]).shape, ("batch", 12))
        self.assertEqual(b.reshape(b.reshape(x, [0, -1]), [-1, 3, 4]).shape, ("batch", 3, 4))
        self.assertEqual(b.add(x, b.constant("d", np.zeros((4,), np.float32))).shape,
                         ("batch", 3, 4))

    def test_output_of_input_gets_identity(self):
        b = Builder()
        x = b.input("x", ["n", 2])
        o = b.output(x, "y")
        self.assertEqual(o.name, "y")
        g = read_graph(b.to_bytes())
        self.assertEqual(g.nodes[0].op, "reshape")
        self.assertEqual(g.output_names, ["y"])
        out = reference.run(g, [np.ones((3, 2), np.float32)])
        self.assertEqual(out["y"].shape, (3, 2))


if __name__ == "__main__":
    unittest.main()
