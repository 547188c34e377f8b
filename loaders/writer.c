/* The C writer: builds a .vkg image (docs/graph-format.md) from calls. Each add_* serializes its
 * record at once into the bytes of its section, so to_memory only lays the sections out and fills in
 * the header, the table and the CRCs. The writer refuses what it cannot serialize or what is
 * plainly a caller bug; everything else a reader would check is left to the reader, so tests can
 * build questionable graphs. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "graph/ir.h"
#include "runtime/internal.h"

/* Defined in graph_file.c. */

enum { KIND_STRINGS = 1, KIND_TENSORS, KIND_NODES, KIND_GRAPH_IO, KIND_METADATA, KIND_WEIGHTS };

/* A growable byte buffer; p is owned by the buffer. */
typedef struct buf {
    uint8_t *p;
    size_t len, cap;
} buf;

static bool buf_reserve(buf *b, size_t extra)
{
    if (b->cap - b->len >= extra) return true;
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len < extra) {
        if (cap > SIZE_MAX / 2) return false;
        cap *= 2;
    }
    uint8_t *p = realloc(b->p, cap);
    if (!p) return false;
    b->p = p;
    b->cap = cap;
    return true;
}

static bool put(buf *b, const void *data, size_t n)
{
    if (!buf_reserve(b, n)) return false;
    if (n) memcpy(b->p + b->len, data, n);
    b->len += n;
    return true;
}

static bool put_zero(buf *b, size_t n)
{
    if (!n) return true; /* b->p may still be NULL */
    if (!buf_reserve(b, n)) return false;
    memset(b->p + b->len, 0, n);
    b->len += n;
    return true;
}

static void le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static bool put32(buf *b, uint32_t v)
{
    uint8_t t[4];
    le32(t, v);
    return put(b, t, 4);
}

static bool put64(buf *b, uint64_t v)
{
    uint8_t t[8];
    le64(t, v);
    return put(b, t, 8);
}

static bool puti64(buf *b, int64_t v)
{
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    return put64(b, u);
}

static bool putf64(buf *b, double v)
{
    uint64_t u;
    memcpy(&u, &v, sizeof u);
    return put64(b, u);
}

struct vkg_writer {
    /* strings, deduplicated: bytes concatenated, end offsets, and an open-addressing index of ids */
    buf str_bytes;
    uint32_t *str_end;
    uint32_t n_str, cap_str;
    uint32_t *index; /* VKG_IR_NONE = empty slot */
    size_t index_cap;

    buf tensors, nodes, weights, meta, inputs, outputs;
    uint32_t n_tensors, n_nodes, n_meta, n_inputs, n_outputs;
};

static uint64_t fnv1a(const char *s, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 0x100000001b3ull;
    return h;
}

static const char *str_at(const vkg_writer *w, uint32_t id, size_t *len)
{
    uint32_t a = id ? w->str_end[id - 1] : 0;
    *len = w->str_end[id] - a;
    return (const char *)w->str_bytes.p + a;
}

static bool index_grow(vkg_writer *w)
{
    size_t cap = w->index_cap ? w->index_cap * 2 : 64;
    uint32_t *idx = malloc(cap * sizeof *idx);
    if (!idx) return false;
    memset(idx, 0xFF, cap * sizeof *idx);
    for (uint32_t id = 0; id < w->n_str; id++) {
        size_t len;
        const char *s = str_at(w, id, &len);
        size_t h = (size_t)fnv1a(s, len) & (cap - 1);
        while (idx[h] != VKG_IR_NONE) h = (h + 1) & (cap - 1);
        idx[h] = id;
    }
    free(w->index);
    w->index = idx;
    w->index_cap = cap;
    return true;
}

/* The id of string s in the table, adding it once. */
static vkg_status intern(vkg_writer *w, const char *s, uint32_t *id)
{
    size_t len = strlen(s);
    if ((w->n_str + 1) * 2 > w->index_cap && !index_grow(w))
        return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "vkg_writer: out of host memory for the string index");
    size_t h = (size_t)fnv1a(s, len) & (w->index_cap - 1);
    for (; w->index[h] != VKG_IR_NONE; h = (h + 1) & (w->index_cap - 1)) {
        size_t l;
        const char *t = str_at(w, w->index[h], &l);
        if (l == len && memcmp(s, t, len) == 0) {
            *id = w->index[h];
            return VKG_SUCCESS;
        }
    }
    if (len > UINT32_MAX - w->str_bytes.len)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_writer: the string table exceeds 4 GiB");
    if (w->n_str == w->cap_str) {
        uint32_t cap = w->cap_str ? w->cap_str * 2 : 64;
        uint32_t *e = realloc(w->str_end, (size_t)cap * sizeof *e);
        if (!e) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "vkg_writer: out of host memory for strings");
        w->str_end = e;
        w->cap_str = cap;
    }
    if (!put(&w->str_bytes, s, len)) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "vkg_writer: out of host memory for strings");
    w->str_end[w->n_str] = (uint32_t)w->str_bytes.len;
    w->index[h] = w->n_str;
    *id = w->n_str++;
    return VKG_SUCCESS;
}

/* *out is owned by the caller (vkg_writer_destroy). */
vkg_status vkg_writer_create(vkg_writer **out)
{
    if (!out) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_writer_create: out is NULL");
    *out = calloc(1, sizeof **out);
    if (!*out) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "vkg_writer_create: out of host memory");
    return VKG_SUCCESS;
}

void vkg_writer_destroy(vkg_writer *w)
{
    if (!w) return;
    free(w->str_bytes.p);
    free(w->str_end);
    free(w->index);
    buf *bufs[] = {&w->tensors, &w->nodes, &w->weights, &w->meta, &w->inputs, &w->outputs};
    for (size_t i = 0; i < VKG_ARRAY_LEN(bufs); i++) free(bufs[i]->p);
    free(w);
}

#define OOM_IF(cond, what)                                                                              \
    do {                                                                                                \
        if (cond) {                                                                                     \
            st = vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "vkg_writer: out of host memory adding %s", what); \
            goto fail;                                                                                  \
        }                                                                                               \
    } while (0)

vkg_status vkg_writer_add_tensor(vkg_writer *w, const vkg_writer_tensor *t, uint32_t *id)
{
    if (!w || !t) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_writer_add_tensor: writer and tensor must not be NULL");
    if (!t->name) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_writer_add_tensor: tensor %u has no name", w->n_tensors);
    if (t->rank > VKG_MAX_DIMS)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_writer_add_tensor: \"%s\" has rank %u, at most %d", t->name, t->rank,
                        VKG_MAX_DIMS);
    uint32_t esize = vkg_dtype_size(t->dtype);
    if (!esize) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_writer_add_tensor: \"%s\" has unknown dtype %d", t->name, (int)t->dtype);
    if ((unsigned)t->role > VKG_ROLE_CONSTANT)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_writer_add_tensor: \"%s\" has unknown role %d", t->name, (int)t->role);
    if (w->n_tensors == VKG_IR_NONE - 1) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_writer_add_tensor: too many tensors");
    if (t->role == VKG_ROLE_CONSTANT) {
        uint64_t bytes = esize;
        for (uint32_t i = 0; i < t->rank; i++) {
            if (t->dims[i] < 0)
                return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_writer_add_tensor: constant \"%s\" has symbolic dims[%u]", t->name, i);
            if (__builtin_mul_overflow(bytes, (uint64_t)t->dims[i], &bytes))
                return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_writer_add_tensor: constant \"%s\": shape overflows", t->name);
        }
        if (t->data_size != bytes || (bytes && !t->data))
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                            "vkg_writer_add_tensor: constant \"%s\" has data_size %llu (data %s), expected %llu bytes", t->name,
                            (unsigned long long)t->data_size, t->data ? "given" : "NULL", (unsigned long long)bytes);
    } else if (t->data || t->data_size) {
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_writer_add_tensor: \"%s\" is not a constant but has data", t->name);
    }

    vkg_status st = VKG_SUCCESS;
    size_t tensors_len = w->tensors.len, weights_len = w->weights.len;
    uint32_t name, sym[VKG_MAX_DIMS] = {0};
    if ((st = intern(w, t->name, &name)) != VKG_SUCCESS) return st;
    for (uint32_t i = 0; i < t->rank; i++)
        if (t->dims[i] < 0 && (st = intern(w, t->sym[i] ? t->sym[i] : "", &sym[i])) != VKG_SUCCESS) return st;
    uint64_t data_offset = 0;
    if (t->data_size) {
        OOM_IF(!put_zero(&w->weights, (64 - w->weights.len % 64) % 64), "weights");
        data_offset = w->weights.len;
        OOM_IF(!put(&w->weights, t->data, (size_t)t->data_size), "weights");
    }
    uint8_t small[4] = {(uint8_t)t->dtype, (uint8_t)t->role, (uint8_t)t->rank, 0};
    OOM_IF(!put32(&w->tensors, name) || !put(&w->tensors, small, 4) || !put64(&w->tensors, data_offset) ||
               !put64(&w->tensors, t->data_size),
           "a tensor");
    for (uint32_t i = 0; i < VKG_MAX_DIMS; i++) {
        int64_t d = i >= t->rank ? 0 : t->dims[i] >= 0 ? t->dims[i] : -(int64_t)sym[i] - 1;
        OOM_IF(!puti64(&w->tensors, d), "a tensor");
    }
    if (id) *id = w->n_tensors;
    w->n_tensors++;
    return VKG_SUCCESS;
fail:
    w->tensors.len = tensors_len;
    w->weights.len = weights_len;
    return st;
}

vkg_status vkg_writer_add_node(vkg_writer *w, const char *op, const char *name, const uint32_t *inputs, uint32_t n_inputs,
                               const uint32_t *outputs, uint32_t n_outputs, const vkg_writer_attr *attrs, uint32_t n_attrs)
{
    if (!w || !op || !name) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_writer_add_node: writer, op and name must not be NULL");
    if ((n_inputs && !inputs) || (n_outputs && !outputs) || (n_attrs && !attrs))
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_writer_add_node: node \"%s\": a non-zero count with a NULL array", name);
    for (uint32_t i = 0; i < n_inputs + n_outputs; i++) {
        uint32_t t = i < n_inputs ? inputs[i] : outputs[i - n_inputs];
        if (t != VKG_NO_TENSOR && t >= w->n_tensors)
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_writer_add_node: node \"%s\": %s %u is tensor %u, but only %u exist",
                            name, i < n_inputs ? "input" : "output", i < n_inputs ? i : i - n_inputs, t, w->n_tensors);
    }
    for (uint32_t i = 0; i < n_attrs; i++) {
        const vkg_writer_attr *a = &attrs[i];
        bool ok = a->name && a->type >= VKG_ATTR_INT && a->type <= VKG_ATTR_FLOATS;
        ok = ok && (a->type != VKG_ATTR_STRING || a->s);
        ok = ok && (a->type != VKG_ATTR_INTS || !a->count || a->ints);
        ok = ok && (a->type != VKG_ATTR_FLOATS || !a->count || a->floats);
        if (!ok)
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                            "vkg_writer_add_node: node \"%s\": attribute %u needs a name, a type 1-5 and its value", name, i);
    }
    vkg_status st = VKG_SUCCESS;
    size_t nodes_len = w->nodes.len;
    uint32_t op_id, name_id;
    if ((st = intern(w, op, &op_id)) != VKG_SUCCESS || (st = intern(w, name, &name_id)) != VKG_SUCCESS) return st;
    buf *b = &w->nodes;
    OOM_IF(!put32(b, op_id) || !put32(b, name_id) || !put32(b, n_inputs) || !put32(b, n_outputs) || !put32(b, n_attrs) ||
               !put32(b, 0),
           "a node");
    for (uint32_t i = 0; i < n_inputs; i++) OOM_IF(!put32(b, inputs[i]), "a node");
    for (uint32_t i = 0; i < n_outputs; i++) OOM_IF(!put32(b, outputs[i]), "a node");
    for (uint32_t i = 0; i < n_attrs; i++) {
        const vkg_writer_attr *a = &attrs[i];
        uint32_t an, sv = 0;
        if ((st = intern(w, a->name, &an)) != VKG_SUCCESS) goto fail;
        if (a->type == VKG_ATTR_STRING && (st = intern(w, a->s, &sv)) != VKG_SUCCESS) goto fail;
        bool list = a->type == VKG_ATTR_INTS || a->type == VKG_ATTR_FLOATS;
        OOM_IF(!put32(b, an) || !put32(b, (uint32_t)a->type) || !put32(b, list ? a->count : 1), "an attribute");
        switch (a->type) {
        case VKG_ATTR_INT: OOM_IF(!puti64(b, a->i), "an attribute"); break;
        case VKG_ATTR_FLOAT: OOM_IF(!putf64(b, a->f), "an attribute"); break;
        case VKG_ATTR_STRING: OOM_IF(!put32(b, sv), "an attribute"); break;
        case VKG_ATTR_INTS:
            for (uint32_t k = 0; k < a->count; k++) OOM_IF(!puti64(b, a->ints[k]), "an attribute");
            break;
        case VKG_ATTR_FLOATS:
            for (uint32_t k = 0; k < a->count; k++) OOM_IF(!putf64(b, a->floats[k]), "an attribute");
            break;
        }
    }
    w->n_nodes++;
    return VKG_SUCCESS;
fail:
    w->nodes.len = nodes_len;
    return st;
}

static vkg_status add_io(vkg_writer *w, uint32_t tensor, bool output)
{
    const char *fn = output ? "vkg_writer_add_output" : "vkg_writer_add_input";
    if (!w) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: writer is NULL", fn);
    if (tensor >= w->n_tensors)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: tensor %u, but only %u exist", fn, tensor, w->n_tensors);
    if (!put32(output ? &w->outputs : &w->inputs, tensor)) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory", fn);
    (*(output ? &w->n_outputs : &w->n_inputs))++;
    return VKG_SUCCESS;
}

vkg_status vkg_writer_add_input(vkg_writer *w, uint32_t tensor) { return add_io(w, tensor, false); }
vkg_status vkg_writer_add_output(vkg_writer *w, uint32_t tensor) { return add_io(w, tensor, true); }

vkg_status vkg_writer_add_metadata(vkg_writer *w, const char *key, const char *value)
{
    if (!w || !key || !value) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_writer_add_metadata: writer, key and value must not be NULL");
    uint32_t k, v;
    VKG_TRY(intern(w, key, &k));
    VKG_TRY(intern(w, value, &v));
    size_t len = w->meta.len;
    if (!put32(&w->meta, k) || !put32(&w->meta, v)) {
        w->meta.len = len;
        return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "vkg_writer_add_metadata: out of host memory");
    }
    w->n_meta++;
    return VKG_SUCCESS;
}

/* *data is malloc'd and owned by the caller (free). */
vkg_status vkg_writer_to_memory(const vkg_writer *w, void **data, size_t *size)
{
    if (!w || !data || !size) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_writer_to_memory: arguments must not be NULL");
    *data = NULL;
    *size = 0;
    /* Sizes of the sections, in the order the spec lists them; METADATA and WEIGHTS only when used. */
    struct wsec {
        uint32_t kind, flags;
        uint64_t size, offset;
    } sec[6];
    uint32_t n = 0;
    sec[n++] = (struct wsec){KIND_STRINGS, 1, 4 + ((uint64_t)w->n_str + 1) * 4 + w->str_bytes.len, 0};
    sec[n++] = (struct wsec){KIND_TENSORS, 1, 4 + (uint64_t)w->tensors.len, 0};
    sec[n++] = (struct wsec){KIND_NODES, 1, 4 + (uint64_t)w->nodes.len, 0};
    sec[n++] = (struct wsec){KIND_GRAPH_IO, 1, 8 + (uint64_t)w->inputs.len + w->outputs.len, 0};
    if (w->n_meta) sec[n++] = (struct wsec){KIND_METADATA, 0, 4 + (uint64_t)w->meta.len, 0};
    /* REQUIRED: the graph cannot run without its weights. */
    if (w->weights.len) sec[n++] = (struct wsec){KIND_WEIGHTS, 1, w->weights.len, 0};
    uint64_t off = 64 + (uint64_t)n * 32;
    for (uint32_t i = 0; i < n; i++) {
        uint64_t a = sec[i].kind == KIND_WEIGHTS ? 64 : 8;
        off = (off + a - 1) / a * a;
        sec[i].offset = off;
        off += sec[i].size;
    }
    if (off > SIZE_MAX) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "vkg_writer_to_memory: %llu bytes", (unsigned long long)off);
    uint8_t *p = calloc(1, (size_t)off); /* calloc: padding and reserved fields are zero */
    if (!p) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "vkg_writer_to_memory: out of host memory for %llu bytes", (unsigned long long)off);

    for (uint32_t i = 0; i < n; i++) {
        uint8_t *s = p + sec[i].offset;
        switch (sec[i].kind) {
        case KIND_STRINGS:
            le32(s, w->n_str);
            le32(s + 4, 0);
            for (uint32_t k = 0; k < w->n_str; k++) le32(s + 8 + (size_t)k * 4, w->str_end[k]);
            if (w->str_bytes.len) memcpy(s + 8 + (size_t)w->n_str * 4, w->str_bytes.p, w->str_bytes.len);
            break;
        case KIND_TENSORS:
            le32(s, w->n_tensors);
            if (w->tensors.len) memcpy(s + 4, w->tensors.p, w->tensors.len);
            break;
        case KIND_NODES:
            le32(s, w->n_nodes);
            if (w->nodes.len) memcpy(s + 4, w->nodes.p, w->nodes.len);
            break;
        case KIND_GRAPH_IO:
            le32(s, w->n_inputs);
            if (w->inputs.len) memcpy(s + 4, w->inputs.p, w->inputs.len);
            le32(s + 4 + w->inputs.len, w->n_outputs);
            if (w->outputs.len) memcpy(s + 8 + w->inputs.len, w->outputs.p, w->outputs.len);
            break;
        case KIND_METADATA:
            le32(s, w->n_meta);
            memcpy(s + 4, w->meta.p, w->meta.len);
            break;
        case KIND_WEIGHTS: memcpy(s, w->weights.p, w->weights.len); break;
        }
        uint8_t *e = p + 64 + (size_t)i * 32;
        le32(e, sec[i].kind);
        le32(e + 4, sec[i].flags);
        le64(e + 8, sec[i].offset);
        le64(e + 16, sec[i].size);
        le32(e + 24, vkg_crc32(0, s, (size_t)sec[i].size));
    }
    memcpy(p, "VKGRAPH\0", 8);
    le32(p + 8, 1);
    le32(p + 12, 0);
    le64(p + 16, off);
    le64(p + 24, 64);
    le32(p + 32, n);
    le32(p + 36, vkg_crc32(0, p + 64, (size_t)n * 32));
    le32(p + 60, vkg_crc32(0, p, 60));
    *data = p;
    *size = (size_t)off;
    return VKG_SUCCESS;
}

vkg_status vkg_writer_save(const vkg_writer *w, const char *path)
{
    if (!path) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_writer_save: path is NULL");
    void *data;
    size_t size;
    VKG_TRY(vkg_writer_to_memory(w, &data, &size));
    FILE *f = fopen(path, "wb");
    if (!f) {
        int e = errno;
        free(data);
        return vkg_fail(VKG_ERROR_IO, "%s: cannot open for writing: %s", path, strerror(e));
    }
    size_t put_n = fwrite(data, 1, size, f);
    int e = errno;
    free(data);
    if (put_n != size) {
        fclose(f);
        unlink(path); /* a partial file would only fail later with a less helpful message */
        return vkg_fail(VKG_ERROR_IO, "%s: write failed after %zu of %zu bytes: %s", path, put_n, size, strerror(e));
    }
    if (fclose(f) != 0) {
        e = errno;
        unlink(path);
        return vkg_fail(VKG_ERROR_IO, "%s: write failed: %s", path, strerror(e));
    }
    return VKG_SUCCESS;
}
