/* PEFT LoRA adapter files merged into a loaded model (vkg_adapter_*, vkg_model_apply_adapter).
 * `test_adapter merge`: a graph built with the C writer (LayerNorm, then linears with f32 and f16
 * weights, one of them (1, 7) and one (3, 1)) and adapter files written here; outputs at scales 1
 * and 0.5 against the CPU reference with the adapter merged into the weights, unload bit-identical
 * to the base model, switching, unmatched names. `test_adapter malformed`: broken files and configs
 * each refused with the right status and a message naming the file and tensor. `test_adapter mutate`:
 * seeded random mutations of a valid file and config (bytes, length field, JSON punctuation, cuts)
 * parsed without a crash or leak (run under ASan and UBSan in that build); no GPU. */
#include <sys/stat.h>
#include <unistd.h>

#include "harness.h"
#include "loaders/safetensors.h"
#include "ref.h"

enum { K1 = 5, N1 = 7, N2 = 1, N3 = 3, R = 2, MAXB = 4 };

/* ---- writing adapter files ---- */

typedef struct st_entry {
    const char *name, *dtype;
    int64_t rows, cols;
    const void *data;
} st_entry;

static size_t dtype_bytes(const char *dt) { return strcmp(dt, "F32") == 0 ? 4 : 2; }

/* Raw safetensors bytes: the length field (header_len, or the real one when 0), the header, the data. */
static void write_raw(const char *path, uint64_t header_len, const char *header, const void *data, size_t data_bytes)
{
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "FAIL: cannot write %s\n", path);
        exit(1);
    }
    uint64_t n = header_len ? header_len : strlen(header);
    unsigned char len[8];
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)(n >> (8 * i));
    fwrite(len, 1, 8, f);
    fwrite(header, 1, strlen(header), f);
    if (data_bytes) fwrite(data, 1, data_bytes, f);
    fclose(f);
}

/* A well-formed file of the entries, in order. */
static void write_st(const char *path, const st_entry *e, int n)
{
    char header[4096];
    unsigned char data[4096];
    size_t off = 0, hl = (size_t)snprintf(header, sizeof header, "{\"__metadata__\":{\"format\":\"pt\"}");
    for (int i = 0; i < n; i++) {
        size_t bytes = (size_t)(e[i].rows * e[i].cols) * dtype_bytes(e[i].dtype);
        hl += (size_t)snprintf(header + hl, sizeof header - hl,
                               ",\"%s\":{\"dtype\":\"%s\",\"shape\":[%lld,%lld],\"data_offsets\":[%zu,%zu]}", e[i].name,
                               e[i].dtype, (long long)e[i].rows, (long long)e[i].cols, off, off + bytes);
        memcpy(data + off, e[i].data, bytes);
        off += bytes;
    }
    hl += (size_t)snprintf(header + hl, sizeof header - hl, "}");
    while (hl % 8) header[hl++] = ' ';
    header[hl] = '\0';
    write_raw(path, 0, header, data, off);
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    if (!f) exit(1);
    fputs(text, f);
    fclose(f);
}

/* A fresh folder; its two files' paths. */
typedef struct adir {
    char dir[64], st[128], cfg[128];
} adir;

static void adir_make(adir *d)
{
    snprintf(d->dir, sizeof d->dir, "/tmp/vkg_adapter_XXXXXX");
    if (!mkdtemp(d->dir)) exit(1);
    snprintf(d->st, sizeof d->st, "%s/adapter_model.safetensors", d->dir);
    snprintf(d->cfg, sizeof d->cfg, "%s/adapter_config.json", d->dir);
}

static void adir_remove(const adir *d)
{
    unlink(d->st);
    unlink(d->cfg);
    rmdir(d->dir);
}

static const char *config(int r, double alpha, const char *targets)
{
    static char buf[512];
    snprintf(buf, sizeof buf,
             "{\"peft_type\": \"LORA\", \"r\": %d, \"lora_alpha\": %g, \"target_modules\": %s, \"bias\": \"none\", "
             "\"fan_in_fan_out\": false, \"use_rslora\": false, \"rank_pattern\": {}, \"alpha_pattern\": {}, "
             "\"modules_to_save\": null}",
             r, alpha, targets);
    return buf;
}

/* ---- the model ---- */

typedef struct params {
    float lnw[K1], lnb[K1], w1[N1 * K1], b1[N1], w2[N2 * N1], w3[N3 * 1], b3[N3];
    uint16_t w2h[N2 * N1];
} params;

static uint32_t add_tensor(vkg_writer *w, const char *name, vkg_dtype dt, vkg_tensor_role role, uint32_t rank, int64_t d0,
                           int64_t d1, const void *data)
{
    vkg_writer_tensor t = {.name = name, .dtype = dt, .role = role, .rank = rank, .dims = {d0, d1}, .data = data};
    if (role != VKG_ROLE_CONSTANT) t.sym[0] = role == VKG_ROLE_INPUT ? "batch" : "";
    if (data) t.data_size = (uint64_t)(rank == 2 ? d0 * d1 : d0) * (dt == VKG_DTYPE_F16 ? 2 : 4);
    uint32_t id = 0;
    if (vkg_writer_add_tensor(w, &t, &id) != VKG_SUCCESS) {
        fprintf(stderr, "FAIL: add %s: %s\n", name, vkg_last_error());
        exit(1);
    }
    return id;
}

/* x (batch, 5) -> LayerNorm "norm" -> fc1 (7x5 f32, bias) = "h" (an output) -> fc2 (1x7 f16)
 * -> head (3x1 f32, bias) = "y". */
static void *build_model(params *p, size_t *size)
{
    h_fill(p->lnw, K1, 1, 0.5f, 1.5f);
    h_fill(p->lnb, K1, 2, -0.2f, 0.2f);
    h_fill(p->w1, N1 * K1, 3, -0.5f, 0.5f);
    h_fill(p->b1, N1, 4, -0.1f, 0.1f);
    h_fill(p->w2, N2 * N1, 5, -0.5f, 0.5f);
    h_fill(p->w3, N3, 6, -1.0f, 1.0f);
    h_fill(p->b3, N3, 7, -0.1f, 0.1f);
    for (int i = 0; i < N2 * N1; i++) {
        p->w2h[i] = ref_f32_to_f16(p->w2[i]);
        p->w2[i] = ref_f16_to_f32(p->w2h[i]);
    }
    vkg_writer *w;
    if (vkg_writer_create(&w) != VKG_SUCCESS) exit(1);
    uint32_t x = add_tensor(w, "x", VKG_DTYPE_F32, VKG_ROLE_INPUT, 2, -1, K1, NULL);
    uint32_t lnw = add_tensor(w, "norm.weight", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 1, K1, 0, p->lnw);
    uint32_t lnb = add_tensor(w, "norm.bias", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 1, K1, 0, p->lnb);
    uint32_t w1 = add_tensor(w, "blocks.0.fc1.weight", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 2, N1, K1, p->w1);
    uint32_t b1 = add_tensor(w, "blocks.0.fc1.bias", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 1, N1, 0, p->b1);
    uint32_t w2 = add_tensor(w, "blocks.0.fc2.weight", VKG_DTYPE_F16, VKG_ROLE_CONSTANT, 2, N2, N1, p->w2h);
    uint32_t w3 = add_tensor(w, "head.weight", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 2, N3, 1, p->w3);
    uint32_t b3 = add_tensor(w, "head.bias", VKG_DTYPE_F32, VKG_ROLE_CONSTANT, 1, N3, 0, p->b3);
    uint32_t ln = add_tensor(w, "ln", VKG_DTYPE_F32, VKG_ROLE_INTERMEDIATE, 2, -1, K1, NULL);
    uint32_t h = add_tensor(w, "h", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 2, -1, N1, NULL);
    uint32_t z = add_tensor(w, "z", VKG_DTYPE_F32, VKG_ROLE_INTERMEDIATE, 2, -1, N2, NULL);
    uint32_t y = add_tensor(w, "y", VKG_DTYPE_F32, VKG_ROLE_OUTPUT, 2, -1, N3, NULL);
    vkg_writer_attr eps = {.name = "eps", .type = VKG_ATTR_FLOAT, .f = 1e-5};
    uint32_t in[3] = {x, lnw, lnb};
    vkg_writer_add_node(w, "layernorm", "norm", in, 3, &ln, 1, &eps, 1);
    in[0] = ln, in[1] = w1, in[2] = b1;
    vkg_writer_add_node(w, "linear", "blocks.0.fc1", in, 3, &h, 1, NULL, 0);
    in[0] = h, in[1] = w2;
    vkg_writer_add_node(w, "linear", "blocks.0.fc2", in, 2, &z, 1, NULL, 0);
    in[0] = z, in[1] = w3, in[2] = b3;
    vkg_writer_add_node(w, "linear", "head", in, 3, &y, 1, NULL, 0);
    vkg_writer_add_input(w, x);
    vkg_writer_add_output(w, y);
    vkg_writer_add_output(w, h);
    return h_writer_finish(w, VKG_SUCCESS, size); /* the writer refuses nothing these calls do */
}

/* The weights a reference run uses (f32 values; fc2's are f16 values). */
typedef struct weights {
    float w1[N1 * K1], w2[N2 * N1], w3[N3];
} weights;

static void base_weights(const params *p, weights *w)
{
    memcpy(w->w1, p->w1, sizeof w->w1);
    memcpy(w->w2, p->w2, sizeof w->w2);
    memcpy(w->w3, p->w3, sizeof w->w3);
}

/* W0 + coef B A, summed in double over the rank, rounded to float and then to half for f16 weights:
 * the rule vkg_model_apply_adapter documents. */
static void ref_merge(float *w, const float *a, const float *b, uint32_t n, uint32_t k, uint32_t r, double coef, int f16)
{
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t j = 0; j < k; j++) {
            double acc = 0;
            for (uint32_t q = 0; q < r; q++) acc += (double)b[i * r + q] * a[q * k + j];
            float v = (float)((double)w[i * k + j] + coef * acc);
            w[i * k + j] = f16 ? ref_f16_to_f32(ref_f32_to_f16(v)) : v;
        }
}

static void forward_ref(const params *p, const weights *w, const float *x, uint32_t batch, float *h, float *y)
{
    float ln[MAXB * K1], z[MAXB * N2];
    ref_layernorm(x, p->lnw, p->lnb, ln, NULL, batch, K1, 1e-5f);
    ref_matmul(ln, w->w1, p->b1, h, NULL, 1, batch, N1, K1, 1, 0);
    ref_matmul(h, w->w2, NULL, z, NULL, 1, batch, N2, N1, 1, 0);
    ref_matmul(z, w->w3, p->b3, y, NULL, 1, batch, N3, 1, 1, 0);
}

typedef struct outs {
    float h[MAXB * N1], y[MAXB * N3];
} outs;

static int run(vkg_session *s, const float *x, uint32_t batch, outs *o)
{
    OK(vkg_session_set_input(s, "x", x, (size_t)batch * K1 * 4));
    OK(vkg_session_run(s));
    OK(vkg_session_get_output(s, "h", o->h, (size_t)batch * N1 * 4));
    OK(vkg_session_get_output(s, "y", o->y, (size_t)batch * N3 * 4));
    return 0;
}

/* Runs and compares with the reference at weights w. */
static int check_run(vkg_session *s, const params *p, const weights *w, const float *x, uint32_t batch, const char *what)
{
    outs got, want;
    if (run(s, x, batch, &got)) return 1;
    forward_ref(p, w, x, batch, want.h, want.y);
    char label[128];
    snprintf(label, sizeof label, "%s: h", what);
    h_compare(label, got.h, want.h, NULL, (size_t)batch * N1, 2e-6, 1e-5);
    snprintf(label, sizeof label, "%s: y", what);
    h_compare(label, got.y, want.y, NULL, (size_t)batch * N3, 2e-6, 1e-5);
    return 0;
}

/* ---- the adapters ---- */

typedef struct lora {
    float a1[R * K1], b1[N1 * R];       /* blocks.0.fc1: F32 */
    float a2[R * N1], b2[N2 * R];       /* blocks.0.fc2: lora_A F16, lora_B BF16 (values exact in both) */
    uint16_t a2h[R * N1], b2bf[N2 * R];
    float a3[R * 1], b3[N3 * R];        /* head: F32, with an adapter name in the keys */
    float stray_a[R * K1], stray_b[N1 * R];
    float bad_a[R * 4];                 /* a head lora_A with K = 4 instead of 1 */
    float norm_a[R * K1], norm_b[K1 * R];
} lora;

static void make_lora(lora *l, uint32_t seed)
{
    h_fill(l->a1, R * K1, seed + 1, -0.6f, 0.6f);
    h_fill(l->b1, N1 * R, seed + 2, -0.6f, 0.6f);
    h_fill(l->a2, R * N1, seed + 3, -0.6f, 0.6f);
    h_fill(l->b2, N2 * R, seed + 4, -0.6f, 0.6f);
    h_fill(l->a3, R, seed + 5, -0.6f, 0.6f);
    h_fill(l->b3, N3 * R, seed + 6, -0.6f, 0.6f);
    h_fill(l->stray_a, R * K1, seed + 7, -0.6f, 0.6f);
    h_fill(l->stray_b, N1 * R, seed + 8, -0.6f, 0.6f);
    h_fill(l->bad_a, R * 4, seed + 9, -0.6f, 0.6f);
    h_fill(l->norm_a, R * K1, seed + 10, -0.6f, 0.6f);
    h_fill(l->norm_b, K1 * R, seed + 11, -0.6f, 0.6f);
    for (int i = 0; i < R * N1; i++) {
        l->a2h[i] = ref_f32_to_f16(l->a2[i]);
        l->a2[i] = ref_f16_to_f32(l->a2h[i]);
    }
    for (int i = 0; i < N2 * R; i++) {
        uint32_t bits;
        memcpy(&bits, &l->b2[i], 4);
        l->b2bf[i] = (uint16_t)(bits >> 16);
        bits &= 0xffff0000u;
        memcpy(&l->b2[i], &bits, 4);
    }
}

/* Adapter 1: fc1, fc2 and head (alpha 4, r 2), a key for a module the graph lacks, a
 * modules_to_save weight, and a target that matches nothing. */
static void write_adapter1(const adir *d, const lora *l)
{
    st_entry e[] = {
        {"base_model.model.blocks.0.fc1.lora_A.weight", "F32", R, K1, l->a1},
        {"base_model.model.blocks.0.fc1.lora_B.weight", "F32", N1, R, l->b1},
        {"base_model.model.blocks.0.fc2.lora_A.weight", "F16", R, N1, l->a2h},
        {"base_model.model.blocks.0.fc2.lora_B.weight", "BF16", N2, R, l->b2bf},
        {"base_model.model.head.lora_A.default.weight", "F32", R, 1, l->a3},
        {"base_model.model.head.lora_B.default.weight", "F32", N3, R, l->b3},
        {"base_model.model.blocks.9.fc1.lora_A.weight", "F32", R, K1, l->stray_a},
        {"base_model.model.blocks.9.fc1.lora_B.weight", "F32", N1, R, l->stray_b},
        {"base_model.model.classifier.modules_to_save.weight", "F32", R, K1, l->stray_a},
    };
    write_st(d->st, e, (int)VKG_ARRAY_LEN(e));
    write_text(d->cfg, config(R, 4.0, "[\"fc1\", \"fc2\", \"head\", \"missing_mod\"]"));
}

/* Adapter 2 (alpha 3, rslora): fc1 applies; head has the wrong in-features; norm is no linear. */
static void write_adapter2(const adir *d, const lora *l)
{
    st_entry e[] = {
        {"base_model.model.blocks.0.fc1.lora_A.weight", "F32", R, K1, l->a1},
        {"base_model.model.blocks.0.fc1.lora_B.weight", "F32", N1, R, l->b1},
        {"base_model.model.head.lora_A.weight", "F32", R, 4, l->bad_a},
        {"base_model.model.head.lora_B.weight", "F32", N3, R, l->b3},
        {"base_model.model.norm.lora_A.weight", "F32", R, K1, l->norm_a},
        {"base_model.model.norm.lora_B.weight", "F32", K1, R, l->norm_b},
    };
    write_st(d->st, e, (int)VKG_ARRAY_LEN(e));
    char cfg[512];
    snprintf(cfg, sizeof cfg, "{\"r\": %d, \"lora_alpha\": 3, \"use_rslora\": true, \"target_modules\": [\"fc1\", \"head\", \"norm\"]}", R);
    write_text(d->cfg, cfg);
}

static int has_unmatched(const vkg_adapter *a, const char *part1, const char *part2)
{
    for (uint32_t i = 0; i < vkg_adapter_unmatched_count(a); i++) {
        const char *u = vkg_adapter_unmatched(a, i);
        if (strstr(u, part1) && strstr(u, part2)) return 1;
    }
    return 0;
}

static void print_unmatched(const vkg_adapter *a)
{
    for (uint32_t i = 0; i < vkg_adapter_unmatched_count(a); i++) printf("  unmatched %s\n", vkg_adapter_unmatched(a, i));
}

static double max_diff(const float *a, const float *b, size_t n)
{
    double m = 0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs((double)a[i] - b[i]));
    return m;
}

static int check_unmatched(const vkg_adapter *a1, const vkg_adapter *a2)
{
    print_unmatched(a1);
    CHECK(vkg_adapter_matched_count(a1) == 3 && vkg_adapter_unmatched_count(a1) == 3, "adapter 1: %u matched, %u unmatched",
          vkg_adapter_matched_count(a1), vkg_adapter_unmatched_count(a1));
    CHECK(has_unmatched(a1, "blocks.9.fc1.lora_A", "no tensor \"blocks.9.fc1.weight\""), "module missing from the graph");
    CHECK(has_unmatched(a1, "classifier.modules_to_save.weight", "not a lora_A or lora_B"), "modules_to_save key");
    CHECK(has_unmatched(a1, "\"missing_mod\"", "matches no weight"), "target matching nothing");
    CHECK(vkg_adapter_unmatched(a1, 3) == NULL, "out of range");
    print_unmatched(a2);
    CHECK(vkg_adapter_matched_count(a2) == 1 && vkg_adapter_unmatched_count(a2) == 4, "adapter 2: %u matched, %u unmatched",
          vkg_adapter_matched_count(a2), vkg_adapter_unmatched_count(a2));
    CHECK(has_unmatched(a2, "head.lora_A.weight", "shape mismatch"), "shape mismatch");
    CHECK(has_unmatched(a2, "norm.lora_A.weight", "other than as a linear weight"), "a layernorm weight");
    CHECK(has_unmatched(a2, "\"head\"", "matches no weight") && has_unmatched(a2, "\"norm\"", "matches no weight"),
          "targets whose only keys were refused");
    return 0;
}

static int test_merge(void)
{
    vkg_context *ctx = h_context();
    params p;
    size_t size;
    void *bytes = build_model(&p, &size);
    vkg_model *m, *other;
    OK(vkg_model_load_memory(ctx, bytes, size, &m));
    OK(vkg_model_load_memory(ctx, bytes, size, &other));
    lora l1, l2;
    make_lora(&l1, 100);
    make_lora(&l2, 200);
    adir d1, d2;
    adir_make(&d1);
    adir_make(&d2);
    write_adapter1(&d1, &l1);
    write_adapter2(&d2, &l2);
    vkg_adapter *a1, *a2, *a1_file;
    OK(vkg_adapter_load(m, d1.dir, &a1));
    OK(vkg_adapter_load(m, d2.cfg, &a2));     /* either file's path finds its sibling */
    OK(vkg_adapter_load(m, d1.st, &a1_file));
    CHECK(vkg_adapter_matched_count(a1_file) == 3, "loaded by the .safetensors path");
    vkg_adapter_destroy(a1_file);
    if (check_unmatched(a1, a2)) return 1;

    uint32_t batch = 3;
    float x[MAXB * K1];
    h_fill(x, (size_t)batch * K1, 9, -2.0f, 2.0f);
    vkg_dim_binding b = {"batch", batch};
    vkg_session_desc sd = {.dims = &b, .n_dims = 1};
    vkg_session *s;
    OK(vkg_session_create(m, &sd, &s)); /* created before any adapter: it must see every change */
    weights base, w;
    base_weights(&p, &base);
    outs out_base, o;
    if (check_run(s, &p, &base, x, batch, "base")) return 1;
    if (run(s, x, batch, &out_base)) return 1;

    const float scales[2] = {1.0f, 0.5f};
    for (int i = 0; i < 2; i++) {
        OK(vkg_model_apply_adapter(m, a1, scales[i]));
        w = base;
        double coef = scales[i] * 4.0 / R;
        ref_merge(w.w1, l1.a1, l1.b1, N1, K1, R, coef, 0);
        ref_merge(w.w2, l1.a2, l1.b2, N2, N1, R, coef, 1);
        ref_merge(w.w3, l1.a3, l1.b3, N3, 1, R, coef, 0);
        char what[64];
        snprintf(what, sizeof what, "adapter 1 at scale %g", scales[i]);
        if (check_run(s, &p, &w, x, batch, what)) return 1;
        if (run(s, x, batch, &o)) return 1;
        CHECK(max_diff(o.y, out_base.y, (size_t)batch * N3) > 1e-2, "%s changes y by %g", what,
              max_diff(o.y, out_base.y, (size_t)batch * N3));
    }
    /* Applying again replaces, it does not add: still scale 0.5 after a second call. */
    OK(vkg_model_apply_adapter(m, a1, 0.5f));
    if (check_run(s, &p, &w, x, batch, "adapter 1 at 0.5 applied twice")) return 1;
    /* A session created after applying sees the merged weights too. */
    vkg_session *s2;
    OK(vkg_session_create(m, &sd, &s2));
    if (check_run(s2, &p, &w, x, batch, "adapter 1 at 0.5, new session")) return 1;
    vkg_session_destroy(s2);

    /* Switching: adapter 2 alone (rslora: alpha / sqrt(r)); only fc1 changes. */
    OK(vkg_model_apply_adapter(m, a2, 1.0f));
    w = base;
    ref_merge(w.w1, l2.a1, l2.b1, N1, K1, R, 3.0 / sqrt((double)R), 0);
    if (check_run(s, &p, &w, x, batch, "switched to adapter 2")) return 1;

    /* Unloading restores the base weights bit for bit. */
    OK(vkg_model_apply_adapter(m, NULL, 0.0f));
    if (run(s, x, batch, &o)) return 1;
    CHECK(memcmp(o.y, out_base.y, (size_t)batch * N3 * 4) == 0 && memcmp(o.h, out_base.h, (size_t)batch * N1 * 4) == 0,
          "unload is bit-identical to the base run");

    /* Misuse. */
    vkg_status st = vkg_model_apply_adapter(other, a1, 1.0f);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "another model"), "other model: %s", vkg_last_error());
    st = vkg_model_apply_adapter(m, a1, NAN);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "not finite"), "NaN scale: %s", vkg_last_error());
    /* An applied adapter destroyed: its weights stay until unloaded. */
    OK(vkg_model_apply_adapter(m, a1, 1.0f));
    vkg_adapter_destroy(a1);
    OK(vkg_model_apply_adapter(m, NULL, 0.0f));
    if (run(s, x, batch, &o)) return 1;
    CHECK(memcmp(o.y, out_base.y, (size_t)batch * N3 * 4) == 0, "unload after destroying the applied adapter");

    vkg_session_destroy(s);
    vkg_adapter_destroy(a2);
    vkg_model_destroy(m);
    vkg_model_destroy(other);
    adir_remove(&d1);
    adir_remove(&d2);
    free(bytes);
    return h_finish(ctx, "adapter merge");
}

/* ---- malformed files ---- */

typedef struct bad_case {
    const char *what;
    const char *header;   /* NULL: a valid file (the config is the fault) */
    uint64_t header_len;  /* 0: the header's own length */
    size_t data_bytes;
    const char *config;   /* NULL: a valid config with r = 2 */
    vkg_status want;
    const char *msg1, *msg2; /* both must appear in the message (msg2 may be NULL) */
    long truncate_to;        /* > 0: the .safetensors file cut to this many bytes */
} bad_case;

#define A_KEY "base_model.model.blocks.0.fc1.lora_A.weight"
#define B_KEY "base_model.model.blocks.0.fc1.lora_B.weight"
#define ENTRY(key, dt, r, c, b, e) "\"" key "\":{\"dtype\":\"" dt "\",\"shape\":[" #r "," #c "],\"data_offsets\":[" #b "," #e "]}"
#define GOOD_A ENTRY(A_KEY, "F32", 2, 5, 0, 40)
#define GOOD_B ENTRY(B_KEY, "F32", 7, 2, 40, 96)

static const bad_case bad_cases[] = {
    {"too short", NULL, 0, 0, NULL, VKG_ERROR_INVALID_GRAPH, "adapter_model.safetensors", "too short", 5},
    {"cut inside the data", NULL, 0, 0, NULL, VKG_ERROR_INVALID_GRAPH, B_KEY, "outside the 50 data bytes",
     8 + (long)sizeof("{" GOOD_A "," GOOD_B "}") - 1 + 50},
    {"empty header", "", 0, 0, NULL, VKG_ERROR_INVALID_GRAPH, "adapter_model.safetensors", "not valid JSON"},
    {"header length past the end", "{}", 1000, 0, NULL, VKG_ERROR_INVALID_GRAPH, "adapter_model.safetensors", "header length 1000"},
    {"huge header length", "{}", 1ull << 62, 0, NULL, VKG_ERROR_INVALID_GRAPH, "adapter_model.safetensors", "does not fit"},
    {"bad JSON", "{\"a\": [1, ", 0, 0, NULL, VKG_ERROR_INVALID_GRAPH, "adapter_model.safetensors", "not valid JSON"},
    {"not an object", "[1, 2]", 0, 0, NULL, VKG_ERROR_INVALID_GRAPH, "adapter_model.safetensors", "not a JSON object"},
    {"wrong dtype", "{" ENTRY(A_KEY, "I64", 2, 5, 0, 80) "," GOOD_B "}", 0, 136, NULL, VKG_ERROR_INVALID_GRAPH, A_KEY, "I64"},
    {"data_offsets out of range", "{" ENTRY(A_KEY, "F32", 2, 5, 0, 40) "," ENTRY(B_KEY, "F32", 7, 2, 40, 9999) "}", 0, 96,
     NULL, VKG_ERROR_INVALID_GRAPH, B_KEY, "outside the 96 data bytes"},
    {"data_offsets wrong size", "{" ENTRY(A_KEY, "F32", 2, 5, 0, 36) "," GOOD_B "}", 0, 96, NULL, VKG_ERROR_INVALID_GRAPH,
     A_KEY, "need 40"},
    {"negative dim", "{" ENTRY(A_KEY, "F32", -2, 5, 0, 40) "," GOOD_B "}", 0, 96, NULL, VKG_ERROR_INVALID_GRAPH, A_KEY,
     "non-negative"},
    {"entry not an object", "{\"" A_KEY "\": 3}", 0, 0, NULL, VKG_ERROR_INVALID_GRAPH, A_KEY, "not an object"},
    {"missing data_offsets", "{\"" A_KEY "\":{\"dtype\":\"F32\",\"shape\":[2,5]}}", 0, 40, NULL, VKG_ERROR_INVALID_GRAPH,
     A_KEY, "data_offsets"},
    {"duplicate key", "{" GOOD_A "," GOOD_A "," GOOD_B "}", 0, 96, NULL, VKG_ERROR_INVALID_GRAPH, A_KEY, "twice"},
    {"r mismatch with lora_A rows", NULL, 0, 0, "{\"r\": 3, \"lora_alpha\": 8, \"target_modules\": [\"fc1\"]}",
     VKG_ERROR_INVALID_GRAPH, A_KEY, "row count other than the config's r"},
    {"lora_A of rank 1", "{\"" A_KEY "\":{\"dtype\":\"F32\",\"shape\":[10],\"data_offsets\":[0,40]}," GOOD_B "}", 0, 96,
     NULL, VKG_ERROR_INVALID_GRAPH, A_KEY, "must be 2-d"},
    {"config not JSON", NULL, 0, 0, "{\"r\": 2,", VKG_ERROR_INVALID_GRAPH, "adapter_config.json", "not valid JSON"},
    {"config without r", NULL, 0, 0, "{\"lora_alpha\": 8, \"target_modules\": [\"fc1\"]}", VKG_ERROR_INVALID_GRAPH,
     "adapter_config.json", "r is missing"},
    {"config r = 0", NULL, 0, 0, "{\"r\": 0, \"lora_alpha\": 8, \"target_modules\": [\"fc1\"]}", VKG_ERROR_INVALID_GRAPH,
     "adapter_config.json", "r is missing or not an integer"},
    {"config without lora_alpha", NULL, 0, 0, "{\"r\": 2, \"target_modules\": [\"fc1\"]}", VKG_ERROR_INVALID_GRAPH,
     "adapter_config.json", "lora_alpha"},
    {"target_modules a number", NULL, 0, 0, "{\"r\": 2, \"lora_alpha\": 8, \"target_modules\": 3}", VKG_ERROR_INVALID_GRAPH,
     "adapter_config.json", "target_modules"},
    {"fan_in_fan_out", NULL, 0, 0, "{\"r\": 2, \"lora_alpha\": 8, \"target_modules\": [\"fc1\"], \"fan_in_fan_out\": true}",
     VKG_ERROR_INVALID_GRAPH, "adapter_config.json", "fan_in_fan_out"},
    {"bias all", NULL, 0, 0, "{\"r\": 2, \"lora_alpha\": 8, \"target_modules\": [\"fc1\"], \"bias\": \"all\"}",
     VKG_ERROR_INVALID_GRAPH, "adapter_config.json", "bias"},
    {"rank_pattern", NULL, 0, 0, "{\"r\": 2, \"lora_alpha\": 8, \"target_modules\": [\"fc1\"], \"rank_pattern\": {\"fc1\": 4}}",
     VKG_ERROR_INVALID_GRAPH, "adapter_config.json", "rank_pattern"},
    {"DoRA", NULL, 0, 0, "{\"r\": 2, \"lora_alpha\": 8, \"target_modules\": [\"fc1\"], \"use_dora\": true}",
     VKG_ERROR_INVALID_GRAPH, "adapter_config.json", "DoRA"},
    {"not LoRA", NULL, 0, 0, "{\"peft_type\": \"IA3\", \"r\": 2, \"lora_alpha\": 8, \"target_modules\": [\"fc1\"]}",
     VKG_ERROR_INVALID_GRAPH, "adapter_config.json", "peft_type"},
    {"Python-only regex", NULL, 0, 0, "{\"r\": 2, \"lora_alpha\": 8, \"target_modules\": \"blocks\\\\.\\\\d+\\\\.fc1\"}",
     VKG_ERROR_INVALID_GRAPH, "adapter_config.json", "POSIX"},
    {"invalid regex", NULL, 0, 0, "{\"r\": 2, \"lora_alpha\": 8, \"target_modules\": \"(fc1\"}", VKG_ERROR_INVALID_GRAPH,
     "adapter_config.json", "not a valid POSIX"},
};

static void write_case(const adir *d, const bad_case *c, const unsigned char *data)
{
    static const char good[] = "{" GOOD_A "," GOOD_B "}";
    if (c->header) write_raw(d->st, c->header_len, c->header, data, c->data_bytes);
    else write_raw(d->st, 0, good, data, 96);
    write_text(d->cfg, c->config ? c->config : config(2, 8, "[\"fc1\"]"));
    if (c->truncate_to > 0 && truncate(d->st, c->truncate_to) != 0) exit(1);
}

static int test_malformed(void)
{
    vkg_context *ctx = h_context();
    params p;
    size_t size;
    void *bytes = build_model(&p, &size);
    vkg_model *m;
    OK(vkg_model_load_memory(ctx, bytes, size, &m));
    unsigned char data[256];
    h_fill((float *)data, sizeof data / 4, 5, -1.0f, 1.0f);
    adir d;
    for (size_t i = 0; i < VKG_ARRAY_LEN(bad_cases); i++) {
        const bad_case *c = &bad_cases[i];
        adir_make(&d);
        write_case(&d, c, data);
        vkg_adapter *a = (vkg_adapter *)&d; /* must come back NULL */
        vkg_status st = vkg_adapter_load(m, d.dir, &a);
        const char *msg = vkg_last_error();
        CHECK(st == c->want && a == NULL && strstr(msg, c->msg1) && (!c->msg2 || strstr(msg, c->msg2)),
              "%s: got %s: %s", c->what, vkg_status_name(st), msg);
        printf("  %-28s %s: %s\n", c->what, vkg_status_name(st), msg);
        adir_remove(&d);
    }
    /* The valid file of the cases above, with a POSIX regex for target_modules, loads. */
    adir_make(&d);
    bad_case ok = {.config = "{\"r\": 2, \"lora_alpha\": 8, \"target_modules\": \"blocks\\\\.[0-9]+\\\\.(fc1|fc2)\"}"};
    write_case(&d, &ok, data);
    vkg_adapter *a;
    OK(vkg_adapter_load(m, d.dir, &a));
    CHECK(vkg_adapter_matched_count(a) == 1 && vkg_adapter_unmatched_count(a) == 0, "regex target: %u matched, %u unmatched",
          vkg_adapter_matched_count(a), vkg_adapter_unmatched_count(a));
    vkg_adapter_destroy(a);
    /* A regex that does not fully match the module path leaves the key unmatched. */
    ok.config = "{\"r\": 2, \"lora_alpha\": 8, \"target_modules\": \"fc1\"}";
    write_case(&d, &ok, data);
    OK(vkg_adapter_load(m, d.dir, &a));
    CHECK(vkg_adapter_matched_count(a) == 0 && has_unmatched(a, A_KEY, "not in target_modules") &&
          has_unmatched(a, "target_modules (a regular expression)", "matches no weight"), "regex is a full match");
    vkg_adapter_destroy(a);
    /* Missing files. */
    unlink(d.cfg);
    vkg_status st = vkg_adapter_load(m, d.dir, &a);
    CHECK(st == VKG_ERROR_IO && strstr(vkg_last_error(), "adapter_config.json"), "missing config: %s", vkg_last_error());
    write_case(&d, &ok, data);
    unlink(d.st);
    st = vkg_adapter_load(m, d.dir, &a);
    CHECK(st == VKG_ERROR_IO && strstr(vkg_last_error(), "adapter_model.safetensors"), "missing weights: %s", vkg_last_error());
    adir_remove(&d);
    st = vkg_adapter_load(m, "/nonexistent/vkg/adapter", &a);
    CHECK(st == VKG_ERROR_IO && strstr(vkg_last_error(), "/nonexistent/vkg/adapter"), "no such folder: %s", vkg_last_error());
    st = vkg_adapter_load(NULL, "x", &a);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT, "NULL model");
    vkg_model_destroy(m);
    free(bytes);
    return h_finish(ctx, "adapter malformed");
}

/* ---- mutations ---- */

static uint32_t rng_state = 12345;
static uint32_t rnd(void)
{
    rng_state = rng_state * 1664525u + 1013904223u;
    return rng_state >> 8;
}

/* Up to 4 edits of buf (len bytes, capacity len): a random byte, a JSON punctuation character in
 * the header, the length field, or a cut. */
static size_t mutate(unsigned char *buf, size_t len, size_t header_end)
{
    static const char punct[] = "{}[],:\"0123456789-e.AB ";
    for (uint32_t m = 0, n = 1 + rnd() % 4; m < n && len; m++) {
        switch (rnd() % 4) {
        case 0: buf[rnd() % len] = (unsigned char)rnd(); break;
        case 1: buf[8 + rnd() % (header_end - 8)] = (unsigned char)punct[rnd() % (sizeof punct - 1)]; break;
        case 2: buf[rnd() % 8] = (unsigned char)rnd(); break;
        default: len = rnd() % (len + 1); break;
        }
        if (header_end > len) header_end = len > 9 ? len : 9;
    }
    return len;
}

static int test_mutate(void)
{
    lora l;
    make_lora(&l, 300);
    adir d;
    adir_make(&d);
    write_adapter1(&d, &l);
    FILE *f = fopen(d.st, "rb");
    unsigned char base[8192], buf[8192];
    size_t n = f ? fread(base, 1, sizeof base, f) : 0;
    if (f) fclose(f);
    CHECK(n > 8 && n < sizeof base, "adapter file read back (%zu bytes)", n);
    size_t header_end = 8 + (size_t)(base[0] | base[1] << 8 | base[2] << 16);
    uint32_t parsed = 0;
    for (int it = 0; it < 100000; it++) {
        memcpy(buf, base, n);
        size_t len = mutate(buf, n, header_end);
        vkg_st_file *st = NULL;
        if (vkg_st_parse(buf, len, "mutated", &st) != VKG_SUCCESS) continue;
        parsed++;
        for (uint32_t t = 0; t < st->n_tensors; t++) /* every element of an accepted file is readable */
            for (uint64_t e = 0; e < st->tensors[t].numel; e++) (void)vkg_st_get(&st->tensors[t], e);
        vkg_st_free(st);
    }
    printf("%u of 100000 mutated safetensors files parsed, the rest refused\n", parsed);
    CHECK(parsed > 0 && parsed < 100000, "mutations both accepted and refused: %u", parsed);
    adir_remove(&d);
    return h_finish(NULL, "adapter mutate");
}

int main(int argc, char **argv)
{
    const char *t = argc > 1 ? argv[1] : "";
    if (!strcmp(t, "merge")) return test_merge();
    if (!strcmp(t, "malformed")) return test_malformed();
    if (!strcmp(t, "mutate")) return test_mutate();
    fprintf(stderr, "usage: test_adapter merge|malformed|mutate\n");
    return 2;
}
