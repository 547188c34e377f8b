/* The .vkg reader and writer (no GPU needed).
 *   roundtrip          writer -> memory/file -> reader, every field compared; format evolution
 *   corpus             malformed files, each refused with its own specific message
 *   seeds DIR          writes valid files and the corpus into DIR to seed fuzz_loader */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "graph/ir.h"
#include "harness.h"

/* Defined in loaders/graph_file.c. */

/* ---- byte helpers ---- */

static uint32_t g32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t g64(const uint8_t *p) { return (uint64_t)g32(p) | (uint64_t)g32(p + 4) << 32; }
static void s32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void s64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

/* A mutable file image; p is malloc'd with room for growth and owned by whoever holds the img. */
typedef struct img {
    uint8_t *p;
    size_t n, cap;
} img;

enum { K_STRINGS = 1, K_TENSORS, K_NODES, K_GRAPH_IO, K_METADATA, K_WEIGHTS };

static uint32_t n_sections(const img *m) { return m->n >= 64 ? g32(m->p + 32) : 0; }
/* Offset of the table entry of the first section of `kind`; 0 when absent. */
static size_t entry_of(const img *m, uint32_t kind)
{
    for (uint32_t i = 0; i < n_sections(m) && 64 + (size_t)(i + 1) * 32 <= m->n; i++)
        if (g32(m->p + 64 + (size_t)i * 32) == kind) return 64 + (size_t)i * 32;
    return 0;
}
static size_t sec_off(const img *m, uint32_t kind) { return (size_t)g64(m->p + entry_of(m, kind) + 8); }
static size_t sec_size(const img *m, uint32_t kind) { return (size_t)g64(m->p + entry_of(m, kind) + 16); }

/* Recomputes every CRC, so a mutation reaches the check it is about instead of a CRC check. */
static void fix_crcs(img *m)
{
    uint32_t n = n_sections(m);
    for (uint32_t i = 0; i < n && 64 + (size_t)(i + 1) * 32 <= m->n; i++) {
        uint8_t *e = m->p + 64 + (size_t)i * 32;
        uint64_t off = g64(e + 8), size = g64(e + 16);
        if (off <= m->n && size <= m->n - off) s32(e + 24, vkg_crc32(0, m->p + off, (size_t)size));
    }
    if (n <= 64 && 64 + (size_t)n * 32 <= m->n) s32(m->p + 36, vkg_crc32(0, m->p + 64, (size_t)n * 32));
    s32(m->p + 60, vkg_crc32(0, m->p, 60));
}

static size_t tensor_rec(const img *m, uint32_t i) { return sec_off(m, K_TENSORS) + 4 + (size_t)i * 88; }
static size_t node_rec(const img *m, uint32_t i)
{
    size_t c = sec_off(m, K_NODES) + 4;
    for (uint32_t k = 0; k < i; k++) {
        uint32_t ni = g32(m->p + c + 8), no = g32(m->p + c + 12), na = g32(m->p + c + 16);
        c += 24 + ((size_t)ni + no) * 4;
        for (uint32_t a = 0; a < na; a++) {
            uint32_t type = g32(m->p + c + 4), cnt = g32(m->p + c + 8);
            c += 12 + (type == 3 ? 4 : (size_t)cnt * 8);
        }
    }
    return c;
}
/* Offset of node i's first attribute. */
static size_t node_attr(const img *m, uint32_t i)
{
    size_t c = node_rec(m, i);
    return c + 24 + ((size_t)g32(m->p + c + 8) + g32(m->p + c + 12)) * 4;
}
static uint32_t str_id(const img *m, const char *s)
{
    size_t o = sec_off(m, K_STRINGS);
    uint32_t n = g32(m->p + o);
    const uint8_t *bytes = m->p + o + 4 + ((size_t)n + 1) * 4;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t a = g32(m->p + o + 4 + (size_t)i * 4), b = g32(m->p + o + 8 + (size_t)i * 4);
        if (b - a == strlen(s) && memcmp(bytes + a, s, b - a) == 0) return i;
    }
    return 0xFFFFFFFFu;
}

/* ---- the test graph: x -> linear fc1 -> gelu act -> linear fc2 -> layernorm ln -> reshape flat -> y ---- */

enum { T_X, T_W1, T_B1, T_H1, T_H2, T_W2, T_B2, T_H3, T_LNW, T_LNB, T_H4, T_Y, N_T };
enum { N_FC1, N_ACT, N_FC2, N_LN, N_FLAT, N_N };

static float w1[32 * 16], b1[32], w2[8 * 32], b2[8], lnw[8], lnb[8];
static uint16_t b1_f16[32];

#define F32C(nm, arr, r, ...) {.name = nm, .dtype = VKG_DTYPE_F32, .role = VKG_ROLE_CONSTANT, .rank = r, .dims = {__VA_ARGS__}, .data = arr, .data_size = sizeof arr}
static vkg_writer_tensor base_tensors[N_T] = {
    [T_X] = {.name = "x", .role = VKG_ROLE_INPUT, .rank = 2, .dims = {-1, 16}, .sym = {"batch"}},
    [T_W1] = F32C("fc1.weight", w1, 2, 32, 16),
    [T_B1] = F32C("fc1.bias", b1, 1, 32),
    [T_H1] = {.name = "h1", .rank = 2, .dims = {-1, 32}, .sym = {""}},
    [T_H2] = {.name = "h2", .rank = 2, .dims = {-1, 32}, .sym = {NULL}},
    [T_W2] = F32C("fc2.weight", w2, 2, 8, 32),
    [T_B2] = F32C("fc2.bias", b2, 1, 8),
    [T_H3] = {.name = "h3", .rank = 2, .dims = {-1, 8}, .sym = {"batch"}},
    [T_LNW] = F32C("ln.weight", lnw, 1, 8),
    [T_LNB] = F32C("ln.bias", lnb, 1, 8),
    [T_H4] = {.name = "h4", .rank = 2, .dims = {-1, 8}, .sym = {"batch"}},
    [T_Y] = {.name = "y", .role = VKG_ROLE_OUTPUT, .rank = 2, .dims = {-1, 8}, .sym = {"batch"}},
};

static const int64_t flat_shape[2] = {0, -1};
static const double future_vals[2] = {1.5, -2.25};

typedef struct nspec {
    const char *op, *name;
    uint32_t in[3], n_in, out;
    vkg_writer_attr attrs[2];
    uint32_t n_attrs;
} nspec;

static const nspec base_nodes[N_N] = {
    [N_FC1] = {"linear", "fc1", {T_X, T_W1, T_B1}, 3, T_H1, {{.name = "activation", .type = VKG_ATTR_INT, .i = 0}}, 1},
    [N_ACT] = {"gelu", "act", {T_H1}, 1, T_H2, {{.name = "approximate", .type = VKG_ATTR_STRING, .s = "none"}}, 1},
    [N_FC2] = {"linear", "fc2", {T_H2, T_W2, T_B2}, 3, T_H3, {{0}}, 0},
    [N_LN] = {"layernorm", "ln", {T_H3, T_LNW, T_LNB}, 3, T_H4, {{.name = "eps", .type = VKG_ATTR_FLOAT, .f = 1e-5}}, 1},
    [N_FLAT] = {"reshape", "flat", {T_H4}, 1, T_Y, {{.name = "shape", .type = VKG_ATTR_INTS, .count = 2, .ints = flat_shape}}, 1},
};

static const char *const base_meta[2][2] = {{"producer", "vkg test_graph_file"}, {"model_name", "TinyMLP"}};

/* Writer-level variants: graphs a byte edit cannot easily express. */
typedef enum variant {
    V_BASE, V_REVERSED, V_FUTURE_ATTR, V_GELU_I32, V_BIAS_F16, V_UNKNOWN_OP, V_NO_EPS, V_EPS_INT, V_K_MISMATCH,
    V_OUTPUT_UNPRODUCED, V_DUP_ATTR, V_META_DUP
} variant;

static float w2_bad[8 * 31];

static int build(variant v, img *out)
{
    vkg_writer_tensor T[N_T + 1];
    nspec N[N_N];
    memcpy(T, base_tensors, sizeof base_tensors);
    memcpy(N, base_nodes, sizeof base_nodes);
    uint32_t n_t = N_T;
    if (v == V_BIAS_F16) {
        T[T_B1].dtype = VKG_DTYPE_F16;
        T[T_B1].data = b1_f16;
        T[T_B1].data_size = sizeof b1_f16;
    }
    if (v == V_K_MISMATCH) {
        T[T_W2].dims[1] = 31;
        T[T_W2].data = w2_bad;
        T[T_W2].data_size = sizeof w2_bad;
    }
    if (v == V_GELU_I32) {
        T[n_t] = (vkg_writer_tensor){.name = "ids", .dtype = VKG_DTYPE_I32, .role = VKG_ROLE_INPUT, .rank = 2, .dims = {-1, 32}, .sym = {"batch"}};
        N[N_ACT].in[0] = n_t++;
    }
    if (v == V_OUTPUT_UNPRODUCED)
        T[n_t++] = (vkg_writer_tensor){.name = "y_extra", .role = VKG_ROLE_OUTPUT, .rank = 2, .dims = {-1, 8}, .sym = {"batch"}};
    if (v == V_UNKNOWN_OP) N[N_ACT].op = "swish7";
    if (v == V_NO_EPS) N[N_LN].n_attrs = 0;
    if (v == V_EPS_INT) N[N_LN].attrs[0] = (vkg_writer_attr){.name = "eps", .type = VKG_ATTR_INT, .i = 0};
    if (v == V_DUP_ATTR) {
        N[N_LN].attrs[1] = N[N_LN].attrs[0];
        N[N_LN].n_attrs = 2;
    }
    if (v == V_FUTURE_ATTR) {
        N[N_ACT].attrs[1] = (vkg_writer_attr){.name = "future_scale", .type = VKG_ATTR_FLOATS, .count = 2, .floats = future_vals};
        N[N_ACT].n_attrs = 2;
    }

    vkg_writer *w = NULL;
    OK(vkg_writer_create(&w));
    for (uint32_t i = 0; i < n_t; i++) {
        uint32_t id;
        OK(vkg_writer_add_tensor(w, &T[i], &id));
        CHECK(id == i, "tensor id %u, expected %u", id, i);
        if (T[i].role == VKG_ROLE_INPUT) OK(vkg_writer_add_input(w, id));
        if (T[i].role == VKG_ROLE_OUTPUT) OK(vkg_writer_add_output(w, id));
    }
    for (uint32_t k = 0; k < N_N; k++) {
        const nspec *n = &N[v == V_REVERSED ? N_N - 1 - k : k];
        OK(vkg_writer_add_node(w, n->op, n->name, n->in, n->n_in, &n->out, 1, n->attrs, n->n_attrs));
    }
    for (int i = 0; i < 2; i++) OK(vkg_writer_add_metadata(w, base_meta[i][0], base_meta[i][1]));
    if (v == V_META_DUP) OK(vkg_writer_add_metadata(w, "producer", "again"));
    void *data;
    size_t size;
    OK(vkg_writer_to_memory(w, &data, &size));
    vkg_writer_destroy(w);
    out->cap = size + 4096;
    out->p = calloc(1, out->cap);
    if (!out->p) return 1;
    memcpy(out->p, data, size);
    out->n = size;
    free(data);
    return 0;
}

static void fill_data(void)
{
    h_fill(w1, VKG_ARRAY_LEN(w1), 1, -1, 1);
    h_fill(b1, VKG_ARRAY_LEN(b1), 2, -1, 1);
    h_fill(w2, VKG_ARRAY_LEN(w2), 3, -1, 1);
    h_fill(b2, VKG_ARRAY_LEN(b2), 4, -1, 1);
    h_fill(lnw, VKG_ARRAY_LEN(lnw), 5, 0.5f, 1.5f);
    h_fill(lnb, VKG_ARRAY_LEN(lnb), 6, -1, 1);
    h_fill(w2_bad, VKG_ARRAY_LEN(w2_bad), 7, -1, 1);
    for (size_t i = 0; i < VKG_ARRAY_LEN(b1_f16); i++) b1_f16[i] = (uint16_t)(0x3c00 + i);
}

/* ---- roundtrip ---- */

/* Compares a parsed graph with base_tensors/base_nodes/base_meta, field by field. */
static void compare_base(const vkg_graph *g, const char *what)
{
    CHECK(g->n_tensors == N_T && g->n_nodes == N_N && g->n_meta == 2, "%s: %u tensors, %u nodes, %u metadata", what,
          g->n_tensors, g->n_nodes, g->n_meta);
    if (g->n_tensors != N_T || g->n_nodes != N_N || g->n_meta != 2) return;
    for (uint32_t i = 0; i < N_T; i++) {
        const vkg_writer_tensor *w = &base_tensors[i];
        const vkg_ir_tensor *t = &g->tensors[i];
        CHECK(!strcmp(t->name, w->name) && t->dtype == w->dtype && t->role == w->role && t->rank == w->rank,
              "%s: tensor %u \"%s\" header differs", what, i, t->name);
        for (uint32_t d = 0; d < w->rank; d++) {
            if (w->dims[d] >= 0)
                CHECK(t->dims[d] == w->dims[d] && !t->sym[d], "%s: %s dims[%u]", what, w->name, d);
            else
                CHECK(t->dims[d] == -1 && t->sym[d] && !strcmp(t->sym[d], w->sym[d] ? w->sym[d] : ""),
                      "%s: %s dims[%u] symbol \"%s\"", what, w->name, d, t->sym[d] ? t->sym[d] : "(null)");
        }
        CHECK(t->data_size == w->data_size, "%s: %s data_size %llu", what, w->name, (unsigned long long)t->data_size);
        if (w->data_size) {
            CHECK(t->data && !memcmp(t->data, w->data, w->data_size), "%s: %s data bytes differ", what, w->name);
            CHECK(t->data && ((uintptr_t)t->data - (uintptr_t)g->image) % 64 == 0, "%s: %s data not 64-aligned in the image",
                  what, w->name);
        } else {
            CHECK(!t->data, "%s: %s has data", what, w->name);
        }
        bool produced = w->role == VKG_ROLE_INTERMEDIATE || w->role == VKG_ROLE_OUTPUT;
        CHECK(produced ? t->producer < N_N && g->nodes[t->producer].outputs[0] == i : t->producer == VKG_IR_NONE,
              "%s: %s producer %u", what, w->name, t->producer);
    }
    for (uint32_t k = 0; k < N_N; k++) {
        const nspec *s = &base_nodes[k];
        const vkg_ir_node *n = &g->nodes[k];
        CHECK(!strcmp(n->op, s->op) && !strcmp(n->name, s->name) && n->n_inputs == s->n_in && n->n_outputs == 1 &&
                  n->outputs[0] == s->out && n->n_attrs == s->n_attrs,
              "%s: node %u \"%s\" differs", what, k, n->name);
        for (uint32_t i = 0; i < s->n_in && i < n->n_inputs; i++) CHECK(n->inputs[i] == s->in[i], "%s: %s input %u", what, s->name, i);
        for (uint32_t a = 0; a < s->n_attrs && a < n->n_attrs; a++) {
            const vkg_writer_attr *wa = &s->attrs[a];
            const vkg_ir_attr *ra = &n->attrs[a];
            bool same = !strcmp(ra->name, wa->name) && ra->type == wa->type;
            if (same && wa->type == VKG_ATTR_INT) same = ra->i == wa->i && ra->count == 1;
            if (same && wa->type == VKG_ATTR_FLOAT) same = ra->f == wa->f && ra->count == 1;
            if (same && wa->type == VKG_ATTR_STRING) same = !strcmp(ra->s, wa->s);
            if (same && wa->type == VKG_ATTR_INTS) same = ra->count == wa->count && !memcmp(ra->ints, wa->ints, wa->count * 8);
            CHECK(same, "%s: %s attribute %u \"%s\" differs", what, s->name, a, ra->name);
        }
    }
    CHECK(g->n_inputs == 1 && g->inputs[0] == T_X && g->n_outputs == 1 && g->outputs[0] == T_Y, "%s: graph io", what);
    for (uint32_t i = 0; i < 2; i++)
        CHECK(!strcmp(g->meta_keys[i], base_meta[i][0]) && !strcmp(g->meta_values[i], base_meta[i][1]), "%s: metadata %u",
              what, i);
    CHECK(g->version_major == 1, "%s: version %u.%u", what, g->version_major, g->version_minor);
}

static int parse_img(const img *m, vkg_graph **g) { return vkg_graph_parse(m->p, m->n, "<memory>", false, g) != VKG_SUCCESS; }

/* Rebuilds m with one more section (kind, flags, payload) at the end: the table grows by one
 * entry, so every existing section moves 64 bytes (keeping WEIGHTS 64-aligned). */
static void add_section(img *m, uint32_t kind, uint32_t flags, const void *payload, size_t size)
{
    uint32_t n = n_sections(m);
    size_t first = m->n;
    for (uint32_t i = 0; i < n; i++) first = VKG_MIN(first, (size_t)g64(m->p + 64 + (size_t)i * 32 + 8));
    size_t end = (m->n + 64 + 7) / 8 * 8, total = end + size;
    uint8_t *p = calloc(1, total + 4096);
    memcpy(p, m->p, 64 + (size_t)n * 32);
    memcpy(p + first + 64, m->p + first, m->n - first);
    for (uint32_t i = 0; i < n; i++) s64(p + 64 + (size_t)i * 32 + 8, g64(p + 64 + (size_t)i * 32 + 8) + 64);
    uint8_t *e = p + 64 + (size_t)n * 32;
    s32(e, kind);
    s32(e + 4, flags);
    s64(e + 8, end);
    s64(e + 16, size);
    memcpy(p + end, payload, size);
    s32(p + 32, n + 1);
    s64(p + 16, total);
    free(m->p);
    m->p = p;
    m->n = total;
    m->cap = total + 4096;
    fix_crcs(m);
}

static int test_roundtrip(void)
{
    img m = {0};
    if (build(V_BASE, &m)) return 1;

    /* memory, copied: the caller's bytes may go away */
    vkg_graph *g = NULL;
    uint8_t *tmp = malloc(m.n);
    memcpy(tmp, m.p, m.n);
    OK(vkg_graph_parse(tmp, m.n, NULL, true, &g));
    memset(tmp, 0xAB, m.n);
    free(tmp);
    CHECK(g->image_owned && !g->image_mapped && !strcmp(g->source, "<memory>"), "copy=true owns its image");
    compare_base(g, "memory");
    vkg_graph_free(g);

    /* file, mapped */
    char path[] = "/tmp/vkg_roundtrip_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp: %s", strerror(errno));
    close(fd);
    vkg_writer *w = NULL;
    {
        /* The same graph through vkg_writer_save must give identical bytes. */
        img again = {0};
        if (build(V_BASE, &again)) return 1;
        CHECK(again.n == m.n && !memcmp(again.p, m.p, m.n), "the writer is deterministic");
        free(again.p);
    }
    OK(vkg_writer_create(&w));
    for (uint32_t i = 0; i < N_T; i++) {
        OK(vkg_writer_add_tensor(w, &base_tensors[i], NULL));
        if (base_tensors[i].role == VKG_ROLE_INPUT) OK(vkg_writer_add_input(w, i));
        if (base_tensors[i].role == VKG_ROLE_OUTPUT) OK(vkg_writer_add_output(w, i));
    }
    for (uint32_t k = 0; k < N_N; k++) {
        const nspec *n = &base_nodes[k];
        OK(vkg_writer_add_node(w, n->op, n->name, n->in, n->n_in, &n->out, 1, n->attrs, n->n_attrs));
    }
    for (int i = 0; i < 2; i++) OK(vkg_writer_add_metadata(w, base_meta[i][0], base_meta[i][1]));

    /* misuse is refused and leaves the writer usable */
    vkg_writer_tensor bad = base_tensors[T_W1];
    bad.data_size -= 4;
    CHECK(vkg_writer_add_tensor(w, &bad, NULL) == VKG_ERROR_INVALID_ARGUMENT, "data_size mismatch refused");
    bad = base_tensors[T_X];
    bad.name = NULL;
    CHECK(vkg_writer_add_tensor(w, &bad, NULL) == VKG_ERROR_INVALID_ARGUMENT, "NULL name refused");
    bad = base_tensors[T_X];
    bad.rank = 9;
    CHECK(vkg_writer_add_tensor(w, &bad, NULL) == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "rank 9"),
          "rank 9 refused: %s", vkg_last_error());
    uint32_t one = 0;
    CHECK(vkg_writer_add_node(w, NULL, "n", &one, 1, &one, 1, NULL, 0) == VKG_ERROR_INVALID_ARGUMENT, "NULL op refused");
    CHECK(vkg_writer_add_metadata(w, "k", NULL) == VKG_ERROR_INVALID_ARGUMENT, "NULL metadata value refused");
    CHECK(vkg_writer_save(w, "/nonexistent-dir/x.vkg") == VKG_ERROR_IO && strstr(vkg_last_error(), "No such file"),
          "save to a missing directory: %s", vkg_last_error());

    OK(vkg_writer_save(w, path));
    vkg_writer_destroy(w);
    OK(vkg_graph_load_file(path, &g));
    CHECK(g->image_mapped && !g->image_owned && !strcmp(g->source, path), "load_file maps its image");
    CHECK(g->image_size == m.n && !memcmp(g->image, m.p, m.n), "file bytes equal the memory bytes");
    compare_base(g, "file");
    vkg_graph_free(g);
    unlink(path);

    /* strings are deduplicated: "batch" is used by five tensors and stored once */
    {
        size_t o = sec_off(&m, K_STRINGS);
        uint32_t n = g32(m.p + o), hits = 0;
        const uint8_t *bytes = m.p + o + 4 + ((size_t)n + 1) * 4;
        for (uint32_t i = 0; i < n; i++) {
            uint32_t a = g32(m.p + o + 4 + (size_t)i * 4), b = g32(m.p + o + 8 + (size_t)i * 4);
            hits += b - a == 5 && !memcmp(bytes + a, "batch", 5);
        }
        CHECK(hits == 1, "\"batch\" stored %u times", hits);
    }

    /* nodes written in reverse come back in topological order */
    img r = {0};
    if (build(V_REVERSED, &r)) return 1;
    OK(vkg_graph_parse(r.p, r.n, "<reversed>", true, &g));
    compare_base(g, "reversed");
    vkg_graph_free(g);
    free(r.p);

    /* a newer minor version is accepted, and with it attributes this reader does not know */
    img f = {0};
    if (build(V_FUTURE_ATTR, &f)) return 1;
    CHECK(parse_img(&f, &g) && strstr(vkg_last_error(), "unknown attribute \"future_scale\""),
          "unknown attribute refused at minor 0: %s", vkg_last_error());
    s32(f.p + 12, 3);
    fix_crcs(&f);
    if (parse_img(&f, &g)) OK(VKG_ERROR_INVALID_GRAPH);
    CHECK(g->version_minor == 3, "version_minor %u", g->version_minor);
    const vkg_ir_attr *fa = vkg_ir_attr_find(&g->nodes[N_ACT], "future_scale");
    CHECK(fa && fa->type == VKG_ATTR_FLOATS && fa->count == 2 && fa->floats[0] == 1.5 && fa->floats[1] == -2.25,
          "FLOATS attribute survives");
    vkg_graph_free(g);
    free(f.p);

    /* an unknown optional section is skipped */
    static const char payload[] = "from a future exporter";
    add_section(&m, 42, 0, payload, sizeof payload);
    if (parse_img(&m, &g)) OK(VKG_ERROR_INVALID_GRAPH);
    compare_base(g, "unknown optional section");
    vkg_graph_free(g);

    /* an empty graph is valid */
    OK(vkg_writer_create(&w));
    void *data;
    size_t size;
    OK(vkg_writer_to_memory(w, &data, &size));
    vkg_writer_destroy(w);
    OK(vkg_graph_parse(data, size, "<empty>", false, &g));
    CHECK(g->n_tensors == 0 && g->n_nodes == 0, "empty graph");
    vkg_graph_free(g);
    free(data);

    free(m.p);
    return h_finish(NULL, "graph_file_roundtrip");
}

/* ---- corpus ---- */

static void trunc_to(img *m, size_t n) { m->n = n; }
static void set_tensor_u8(img *m, uint32_t t, size_t field, uint8_t v) { m->p[tensor_rec(m, t) + field] = v; }
static void set_tensor_dim(img *m, uint32_t t, uint32_t d, int64_t v) { s64(m->p + tensor_rec(m, t) + 24 + d * 8, (uint64_t)v); }
static void set_node_io(img *m, uint32_t node, uint32_t slot, uint32_t v) { s32(m->p + node_rec(m, node) + 24 + slot * 4, v); }
static size_t io_off(const img *m) { return sec_off(m, K_GRAPH_IO); }
static size_t strings_offsets(const img *m) { return sec_off(m, K_STRINGS) + 4; }

#define MUT(name) static void name(img *m)
MUT(m_none) { (void)m; }
MUT(m_trunc_mid_header) { trunc_to(m, 40); }
MUT(m_trunc_header_end) { trunc_to(m, 64); }
MUT(m_trunc_mid_table) { trunc_to(m, 64 + 32 + 8); }
MUT(m_trunc_strings) { trunc_to(m, sec_off(m, K_STRINGS)); }
MUT(m_trunc_tensors) { trunc_to(m, sec_off(m, K_TENSORS)); }
MUT(m_trunc_nodes) { trunc_to(m, sec_off(m, K_NODES)); }
MUT(m_trunc_io) { trunc_to(m, sec_off(m, K_GRAPH_IO)); }
MUT(m_trunc_meta) { trunc_to(m, sec_off(m, K_METADATA)); }
MUT(m_trunc_weights) { trunc_to(m, sec_off(m, K_WEIGHTS)); }
MUT(m_bad_magic) { m->p[0] = 'X'; }
MUT(m_bad_major) { s32(m->p + 8, 2); }
MUT(m_trailing) { m->n += 8; }
MUT(m_header_crc) { m->p[44] ^= 1; }
MUT(m_header_reserved) { m->p[40] = 1; }
MUT(m_table_crc) { m->p[64 + 28] ^= 1; }
MUT(m_section_count0) { s32(m->p + 32, 0); }
MUT(m_section_crc) { m->p[sec_off(m, K_NODES) + 4] ^= 0x40; }
MUT(m_section_past_end) { s64(m->p + entry_of(m, K_NODES) + 8, (m->n + 8) / 8 * 8); }
MUT(m_section_size_overflow) { s64(m->p + entry_of(m, K_NODES) + 16, UINT64_MAX - 4); }
MUT(m_overlap) { s64(m->p + entry_of(m, K_TENSORS) + 8, sec_off(m, K_STRINGS)); }
MUT(m_overlap_table) { s64(m->p + entry_of(m, K_STRINGS) + 8, 64); }
MUT(m_misaligned_section) { s64(m->p + entry_of(m, K_GRAPH_IO) + 8, sec_off(m, K_GRAPH_IO) + 4); }
MUT(m_misaligned_weights) { s64(m->p + entry_of(m, K_WEIGHTS) + 8, sec_off(m, K_WEIGHTS) - 8); }
MUT(m_missing_required)
{
    size_t e = entry_of(m, K_GRAPH_IO);
    s32(m->p + e, 9);
    s32(m->p + e + 4, 0);
}
MUT(m_unknown_required)
{
    size_t e = entry_of(m, K_METADATA);
    s32(m->p + e, 99);
    s32(m->p + e + 4, 1);
}
MUT(m_duplicate_section) { s32(m->p + entry_of(m, K_METADATA), K_STRINGS); }
MUT(m_no_weights)
{
    size_t e = entry_of(m, K_WEIGHTS);
    s32(m->p + e, 77);
    s32(m->p + e + 4, 0);
}
MUT(m_strings_order) { s32(m->p + strings_offsets(m) + 4, g32(m->p + strings_offsets(m) + 8) + 1); }
MUT(m_strings_past_end)
{
    uint32_t n = g32(m->p + sec_off(m, K_STRINGS));
    s32(m->p + strings_offsets(m) + (size_t)n * 4, 100000);
}
MUT(m_strings_nul)
{
    uint32_t n = g32(m->p + sec_off(m, K_STRINGS));
    m->p[strings_offsets(m) + ((size_t)n + 1) * 4] = 0;
}
MUT(m_tensor_name_oob) { s32(m->p + tensor_rec(m, T_H1), 100000); }
MUT(m_bad_dtype) { set_tensor_u8(m, T_H1, 4, 9); }
MUT(m_bad_role) { set_tensor_u8(m, T_H1, 5, 7); }
MUT(m_rank9) { set_tensor_u8(m, T_H1, 6, 9); }
MUT(m_shape_overflow)
{
    set_tensor_dim(m, T_W1, 0, INT64_C(1) << 40);
    set_tensor_dim(m, T_W1, 1, INT64_C(1) << 40);
}
MUT(m_const_past_weights) { s64(m->p + tensor_rec(m, T_B2) + 8, (sec_size(m, K_WEIGHTS) + 63) / 64 * 64); }
MUT(m_const_misaligned) { s64(m->p + tensor_rec(m, T_B2) + 8, g64(m->p + tensor_rec(m, T_B2) + 8) + 4); }
MUT(m_const_size) { s64(m->p + tensor_rec(m, T_B1) + 16, 132); }
MUT(m_const_symbolic) { set_tensor_dim(m, T_B1, 0, -1); }
MUT(m_input_empty_sym) { set_tensor_dim(m, T_X, 0, -(int64_t)str_id(m, "") - 1); }
MUT(m_sym_oob) { set_tensor_dim(m, T_X, 0, -100000 - 1); }
MUT(m_nonconst_data) { s64(m->p + tensor_rec(m, T_H1) + 16, 4); }
MUT(m_dup_tensor) { s32(m->p + tensor_rec(m, T_H2), g32(m->p + tensor_rec(m, T_H1))); }
MUT(m_dup_node) { s32(m->p + node_rec(m, N_ACT) + 4, g32(m->p + node_rec(m, N_FC1) + 4)); }
MUT(m_node_count) { s32(m->p + sec_off(m, K_NODES), N_N + 1); }
MUT(m_too_many_inputs) { s32(m->p + node_rec(m, N_FC1) + 8, 65); }
MUT(m_dangling_input) { set_node_io(m, N_ACT, 0, 1000); }
MUT(m_output_none) { set_node_io(m, N_ACT, 1, 0xFFFFFFFFu); }
MUT(m_attr_type) { s32(m->p + node_attr(m, N_ACT) + 4, 9); }
MUT(m_attr_count) { s32(m->p + node_attr(m, N_FC1) + 8, 2); }
MUT(m_attr_name_oob) { s32(m->p + node_attr(m, N_FC1), 100000); }
MUT(m_two_producers) { set_node_io(m, N_ACT, 1, T_H1); }
MUT(m_writes_constant) { set_node_io(m, N_FC2, 3, T_W1); }
MUT(m_writes_input) { set_node_io(m, N_FC2, 3, T_X); }
MUT(m_cycle) { set_node_io(m, N_FC1, 0, T_H3); }
MUT(m_io_oob) { s32(m->p + io_off(m) + 4, 500); }
MUT(m_io_role) { s32(m->p + io_off(m) + 12, T_H1); }
MUT(m_io_unlisted) { set_tensor_u8(m, T_H4, 5, VKG_ROLE_OUTPUT); }
MUT(m_meta_oob) { s32(m->p + sec_off(m, K_METADATA) + 8, 99999); }

typedef struct corpus_case {
    const char *name;
    variant v;
    void (*mutate)(img *m);
    bool fix; /* recompute CRCs after the mutation */
    const char *expect;
} corpus_case;

static const corpus_case cases[] = {
    {"trunc_mid_header", V_BASE, m_trunc_mid_header, false, "header: truncated header: the image is 40 bytes"},
    {"trunc_header_end", V_BASE, m_trunc_header_end, false, "truncated inside the section table: 6 entries need 256 bytes, the image is 64"},
    {"trunc_mid_table", V_BASE, m_trunc_mid_table, false, "truncated inside the section table: 6 entries need 256 bytes, the image is 104"},
    {"trunc_at_strings", V_BASE, m_trunc_strings, false, "section 0 (STRINGS, kind 1) at offset"},
    {"trunc_at_tensors", V_BASE, m_trunc_tensors, false, "section 1 (TENSORS, kind 2) at offset"},
    {"trunc_at_nodes", V_BASE, m_trunc_nodes, false, "section 2 (NODES, kind 3) at offset"},
    {"trunc_at_graph_io", V_BASE, m_trunc_io, false, "section 3 (GRAPH_IO, kind 4) at offset"},
    {"trunc_at_metadata", V_BASE, m_trunc_meta, false, "section 4 (METADATA, kind 5) at offset"},
    {"trunc_at_weights", V_BASE, m_trunc_weights, false, "section 5 (WEIGHTS, kind 6) at offset"},
    {"bad_magic", V_BASE, m_bad_magic, true, "bad magic"},
    {"bad_major_version", V_BASE, m_bad_major, true, "format version 2.0 is not supported"},
    {"file_size_mismatch", V_BASE, m_trailing, false, "(trailing data)"},
    {"header_crc", V_BASE, m_header_crc, false, "header_crc mismatch"},
    {"header_reserved", V_BASE, m_header_reserved, true, "reserved byte 40 is 0x01"},
    {"table_crc", V_BASE, m_table_crc, false, "table_crc mismatch"},
    {"section_count_zero", V_BASE, m_section_count0, true, "section_count is 0, expected 1..64"},
    {"section_crc", V_BASE, m_section_crc, false, "NODES: section 2 CRC mismatch"},
    {"section_past_end", V_BASE, m_section_past_end, true, "section 2 (NODES, kind 3): offset"},
    {"section_size_overflow", V_BASE, m_section_size_overflow, true, "+ size 18446744073709551611 lies outside the file"},
    {"sections_overlap", V_BASE, m_overlap, true, "overlaps section"},
    {"section_overlaps_table", V_BASE, m_overlap_table, true, "overlaps the header and section table"},
    {"section_misaligned", V_BASE, m_misaligned_section, true, "(GRAPH_IO, kind 4): offset"},
    {"weights_misaligned", V_BASE, m_misaligned_weights, true, "is not a multiple of 64"},
    {"missing_required_section", V_BASE, m_missing_required, true, "required section GRAPH_IO (kind 4) is missing"},
    {"unknown_required_section", V_BASE, m_unknown_required, true, "unknown section kind 99 is marked REQUIRED"},
    {"duplicate_section", V_BASE, m_duplicate_section, true, "kind STRINGS appears twice"},
    {"weights_missing", V_BASE, m_no_weights, true, "but the file has no WEIGHTS section"},
    {"strings_out_of_order", V_BASE, m_strings_order, true, "offsets must not decrease"},
    {"strings_past_end", V_BASE, m_strings_past_end, true, "= 100000 points past the end of the string bytes"},
    {"string_nul", V_BASE, m_strings_nul, true, "string 0 holds a NUL byte"},
    {"tensor_name_out_of_range", V_BASE, m_tensor_name_oob, true, "TENSORS: tensor 3: name is string id 100000"},
    {"bad_dtype", V_BASE, m_bad_dtype, true, "tensor 3 \"h1\": dtype 9 is not valid"},
    {"bad_role", V_BASE, m_bad_role, true, "tensor 3 \"h1\": role 7 is not valid"},
    {"rank_9", V_BASE, m_rank9, true, "tensor 3 \"h1\": rank 9 exceeds the maximum of 8"},
    {"shape_overflow", V_BASE, m_shape_overflow, true, "tensor 1 \"fc1.weight\": shape overflows"},
    {"constant_past_weights", V_BASE, m_const_past_weights, true, "\"fc2.bias\": data [" },
    {"constant_misaligned", V_BASE, m_const_misaligned, true, "\"fc2.bias\": data_offset"},
    {"constant_size_mismatch", V_BASE, m_const_size, true, "\"fc1.bias\": data_size is 132, expected 128"},
    {"constant_symbolic", V_BASE, m_const_symbolic, true, "\"fc1.bias\": a constant must have only fixed dims"},
    {"input_empty_symbol", V_BASE, m_input_empty_sym, true, "\"x\": dims[0] is symbolic with an empty name"},
    {"symbol_out_of_range", V_BASE, m_sym_oob, true, "symbolic dims[0] is string id 100000"},
    {"intermediate_with_data", V_BASE, m_nonconst_data, true, "\"h1\": a tensor of role intermediate has data_offset 0 and data_size 4"},
    {"duplicate_tensor_name", V_BASE, m_dup_tensor, true, "tensors 3 and 4 are both named \"h1\""},
    {"duplicate_node_name", V_BASE, m_dup_node, true, "nodes 0 and 1 are both named \"fc1\""},
    {"node_count_past_end", V_BASE, m_node_count, true, "node 5: record header runs past the end"},
    {"too_many_inputs", V_BASE, m_too_many_inputs, true, "65 inputs, 1 outputs, 1 attributes: each must be at most 64"},
    {"dangling_input", V_BASE, m_dangling_input, true, "node 1 \"act\": input 0 is tensor id 1000, but there are only 12 tensors"},
    {"output_none", V_BASE, m_output_none, true, "\"act\": output 0 is NONE"},
    {"bad_attr_type", V_BASE, m_attr_type, true, "attribute \"approximate\" has type 9"},
    {"scalar_attr_count", V_BASE, m_attr_count, true, "attribute \"activation\" is a scalar with count 2"},
    {"attr_name_out_of_range", V_BASE, m_attr_name_oob, true, "attribute 0 name is string id 100000"},
    {"duplicate_attr", V_DUP_ATTR, m_none, false, "attribute \"eps\" appears twice"},
    {"two_producers", V_BASE, m_two_producers, true, "tensor \"h1\" is already written by node \"fc1\""},
    {"node_writes_constant", V_BASE, m_writes_constant, true, "\"fc2\": output 0 writes constant tensor \"fc1.weight\""},
    {"node_writes_input", V_BASE, m_writes_input, true, "\"fc2\": output 0 writes input tensor \"x\""},
    {"cycle", V_BASE, m_cycle, true, "cycle through node"},
    {"graph_io_out_of_range", V_BASE, m_io_oob, true, "inputs[0] is tensor id 500"},
    {"graph_io_wrong_role", V_BASE, m_io_role, true, "outputs[0] is tensor \"h1\" of role intermediate, expected role output"},
    {"output_not_listed", V_BASE, m_io_unlisted, true, "tensor \"h4\" has role output but is not listed"},
    {"output_never_produced", V_OUTPUT_UNPRODUCED, m_none, false, "graph output \"y_extra\" is never produced"},
    {"metadata_out_of_range", V_BASE, m_meta_oob, true, "METADATA: pair 0: value is string id 99999"},
    {"metadata_duplicate_key", V_META_DUP, m_none, false, "key \"producer\" appears twice"},
    {"gelu_i32_input", V_GELU_I32, m_none, false, "node \"act\" (op gelu): input 0 \"ids\" has dtype i32, expected f32"},
    {"linear_f16_bias", V_BIAS_F16, m_none, false, "node \"fc1\" (op linear): input 2 \"fc1.bias\" has dtype f16, expected f32"},
    {"unknown_op", V_UNKNOWN_OP, m_none, false, "node \"act\" (op swish7): unknown op \"swish7\""},
    {"missing_attr_eps", V_NO_EPS, m_none, false, "node \"ln\" (op layernorm): required attribute \"eps\" (FLOAT) is missing"},
    {"wrong_attr_type", V_EPS_INT, m_none, false, "attribute \"eps\" is INT, expected FLOAT"},
    {"linear_k_mismatch", V_K_MISMATCH, m_none, false, "input \"h2\" has last dim 32 but weight \"fc2.weight\" is (8, 31): expected K = 31"},
};

/* Builds case c into *m (caller frees m->p). */
static int make_case(const corpus_case *c, img *m)
{
    if (build(c->v, m)) return 1;
    c->mutate(m);
    if (c->fix) fix_crcs(m);
    return 0;
}

static int test_corpus(void)
{
    for (size_t i = 0; i < VKG_ARRAY_LEN(cases); i++) {
        const corpus_case *c = &cases[i];
        img m = {0};
        if (make_case(c, &m)) return 1;
        vkg_graph *g = NULL;
        vkg_status s = vkg_graph_parse(m.p, m.n, "<memory>", false, &g);
        const char *msg = vkg_last_error();
        bool ok = s == VKG_ERROR_INVALID_GRAPH && !g && strstr(msg, c->expect) && !strncmp(msg, "<memory>: ", 10);
        CHECK(ok, "case %s: got %s \"%s\", expected \"%s\"", c->name, vkg_status_name(s), msg, c->expect);
        printf("%-28s %s: %s\n", c->name, ok ? "ok  " : "FAIL", msg);
        vkg_graph_free(g);
        free(m.p);
    }
    /* the checks above must not be vacuous: the unmutated base parses */
    img m = {0};
    if (build(V_BASE, &m)) return 1;
    vkg_graph *g = NULL;
    OK(vkg_graph_parse(m.p, m.n, "<memory>", false, &g));
    vkg_graph_free(g);
    free(m.p);
    vkg_status s = vkg_graph_load_file("/nonexistent/model.vkg", &g);
    bool ok = s == VKG_ERROR_IO && strstr(vkg_last_error(), "/nonexistent/model.vkg: cannot open: No such file or directory");
    CHECK(ok, "missing file: %s %s", vkg_status_name(s), vkg_last_error());
    printf("%-28s %s: %s\n", "missing_file", ok ? "ok  " : "FAIL", vkg_last_error());
    printf("%zu corpus cases\n", VKG_ARRAY_LEN(cases) + 1);
    return h_finish(NULL, "graph_file_corpus");
}

/* ---- fuzz seeds ---- */

static int write_file(const char *dir, const char *name, const img *m)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.vkg", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(m->p, 1, m->n, f) != m->n) {
        fprintf(stderr, "FAIL: cannot write %s: %s\n", path, strerror(errno));
        if (f) fclose(f);
        return 1;
    }
    return fclose(f) != 0;
}

static int test_seeds(const char *dir)
{
    mkdir(dir, 0755); /* may exist */
    static const struct {
        const char *name;
        variant v;
    } valid[] = {{"valid_base", V_BASE}, {"valid_reversed", V_REVERSED}, {"valid_future_attr", V_FUTURE_ATTR}};
    for (size_t i = 0; i < VKG_ARRAY_LEN(valid); i++) {
        img m = {0};
        if (build(valid[i].v, &m)) return 1;
        if (valid[i].v == V_FUTURE_ATTR) {
            s32(m.p + 12, 1);
            fix_crcs(&m);
        }
        if (write_file(dir, valid[i].name, &m)) return 1;
        free(m.p);
    }
    for (size_t i = 0; i < VKG_ARRAY_LEN(cases); i++) {
        img m = {0};
        if (make_case(&cases[i], &m) || write_file(dir, cases[i].name, &m)) return 1;
        free(m.p);
    }
    printf("wrote %zu seeds to %s\n", VKG_ARRAY_LEN(valid) + VKG_ARRAY_LEN(cases), dir);
    return 0;
}

int main(int argc, char **argv)
{
    const char *t = argc > 1 ? argv[1] : "";
    fill_data();
    if (!strcmp(t, "roundtrip")) return test_roundtrip();
    if (!strcmp(t, "corpus")) return test_corpus();
    if (!strcmp(t, "seeds") && argc > 2) return test_seeds(argv[2]);
    fprintf(stderr, "usage: test_graph_file roundtrip|corpus|seeds DIR\n");
    return 2;
}
