/* `vkg inspect`, `vkg run`, `vkg bench FILE`: the command line's graph commands. */
#include "cmd_graph.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "graph/exec.h"
#include "npy.h"

static int fail(vkg_status s)
{
    fprintf(stderr, "vkg: %s: %s\n", vkg_status_name(s), vkg_last_error());
    return 1;
}

typedef struct opts {
    const char *file;
    const char *out_dir;
    const char *in_name[32], *in_path[32];
    uint32_t n_in;
    vkg_dim_binding dims[16];
    uint32_t n_dims;
    int runs, warmup;
    bool profile;
    const char *adapter; /* --adapter DIR: a PEFT LoRA adapter merged in before the session */
    float adapter_scale;
} opts;

static void free_opts(opts *o)
{
    for (uint32_t i = 0; i < o->n_in; i++) free((char *)o->in_name[i]);
    for (uint32_t i = 0; i < o->n_dims; i++) free((char *)o->dims[i].name);
}

static int parse(int argc, char **argv, opts *o, const char *usage)
{
    memset(o, 0, sizeof *o);
    o->runs = 20;
    o->warmup = 3;
    o->adapter_scale = 1.0f;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if ((!strcmp(a, "--input") || !strcmp(a, "-i")) && i + 1 < argc) {
            const char *v = argv[++i], *eq = strchr(v, '=');
            if (!eq || o->n_in == 32) goto bad;
            size_t len = (size_t)(eq - v);
            char *name = malloc(len + 1);
            if (!name) goto bad;
            memcpy(name, v, len);
            name[len] = '\0';
            o->in_name[o->n_in] = name;
            o->in_path[o->n_in++] = eq + 1;
        } else if (!strcmp(a, "--dim") && i + 1 < argc) {
            const char *v = argv[++i], *eq = strchr(v, '=');
            if (!eq || o->n_dims == 16) goto bad;
            size_t len = (size_t)(eq - v);
            char *name = malloc(len + 1);
            if (!name) goto bad;
            memcpy(name, v, len);
            name[len] = '\0';
            o->dims[o->n_dims].name = name;
            o->dims[o->n_dims++].value = atoll(eq + 1);
        } else if (!strcmp(a, "--out") && i + 1 < argc) o->out_dir = argv[++i];
        else if (!strcmp(a, "--runs") && i + 1 < argc) o->runs = atoi(argv[++i]);
        else if (!strcmp(a, "--warmup") && i + 1 < argc) o->warmup = atoi(argv[++i]);
        else if (!strcmp(a, "--profile")) o->profile = true;
        else if (!strcmp(a, "--adapter") && i + 1 < argc) o->adapter = argv[++i];
        else if (!strcmp(a, "--adapter-scale") && i + 1 < argc) {
            char *end;
            o->adapter_scale = strtof(argv[++i], &end);
            if (*end || !isfinite(o->adapter_scale)) goto bad;
        }
        else if (a[0] != '-' && !o->file) o->file = a;
        else goto bad;
    }
    if (o->file && o->runs > 0 && o->warmup >= 0) return 0;
bad:
    fprintf(stderr, "%s", usage);
    free_opts(o);
    return 2;
}


static void print_shape(FILE *f, const vkg_tensor_info *t)
{
    fprintf(f, "(");
    for (uint32_t r = 0; r < t->rank; r++) {
        if (t->sym[r]) fprintf(f, "%s%s", r ? ", " : "", t->sym[r][0] ? t->sym[r] : "?");
        else fprintf(f, "%s%lld", r ? ", " : "", (long long)t->dims[r]);
    }
    fprintf(f, t->rank == 1 ? ",)" : ")");
}

/* Binds every symbolic dim of the inputs that the command line did not: from the .npy shapes
 * given (run), else 1 (inspect, bench). */
static void default_dims(const vkg_graph *g, opts *o, const vkg_npy *npys)
{
    for (uint32_t k = 0; k < g->n_inputs; k++) {
        const vkg_ir_tensor *t = &g->tensors[g->inputs[k]];
        const vkg_npy *np = NULL;
        for (uint32_t i = 0; npys && i < o->n_in; i++)
            if (!strcmp(o->in_name[i], t->name)) np = &npys[i];
        for (uint32_t r = 0; r < t->rank; r++) {
            if (!t->sym[r]) continue;
            bool bound = false;
            for (uint32_t i = 0; i < o->n_dims; i++) bound |= !strcmp(o->dims[i].name, t->sym[r]);
            if (bound || o->n_dims == 16) continue;
            size_t len = strlen(t->sym[r]) + 1;
            char *name = malloc(len);
            if (!name) continue;
            memcpy(name, t->sym[r], len);
            o->dims[o->n_dims].name = name;
            o->dims[o->n_dims++].value = np && np->rank == t->rank ? np->dims[r] : 1;
        }
    }
}

/* Loads the adapter, reports what it matched on stderr and merges it; the weights stay merged
 * after the adapter object is gone. */
static vkg_status apply_adapter(const opts *o, vkg_model *m)
{
    vkg_adapter *a;
    VKG_TRY(vkg_adapter_load(m, o->adapter, &a));
    fprintf(stderr, "vkg: adapter %s: %u weights matched, %u unmatched\n", o->adapter, vkg_adapter_matched_count(a),
            vkg_adapter_unmatched_count(a));
    for (uint32_t i = 0; i < vkg_adapter_unmatched_count(a); i++) fprintf(stderr, "vkg:   unmatched %s\n", vkg_adapter_unmatched(a, i));
    vkg_status s = vkg_model_apply_adapter(m, a, o->adapter_scale);
    vkg_adapter_destroy(a);
    return s;
}

static vkg_status open_model(const opts *o, vkg_context **ctx, vkg_model **m)
{
    *ctx = NULL;
    *m = NULL;
    VKG_TRY(vkg_context_create(NULL, ctx));
    vkg_status s = vkg_model_load(*ctx, o->file, m);
    if (s == VKG_SUCCESS && o->adapter) s = apply_adapter(o, *m);
    if (s != VKG_SUCCESS) {
        vkg_model_destroy(*m);
        *m = NULL;
        vkg_context_destroy(*ctx);
        *ctx = NULL;
    }
    return s;
}

int vkg_cmd_inspect(int argc, char **argv)
{
    opts o;
    int r = parse(argc, argv, &o, "usage: vkg inspect FILE [--dim NAME=N ...] [--adapter DIR [--adapter-scale S]]\n");
    if (r) return r;
    vkg_context *ctx;
    vkg_model *m;
    vkg_status s = open_model(&o, &ctx, &m);
    if (s != VKG_SUCCESS) {
        free_opts(&o);
        return fail(s);
    }
    const vkg_graph *g = vkg_model_graph(m);
    printf("%s: vkg graph format %u.%u\n", o.file, g->version_major, g->version_minor);
    for (uint32_t i = 0; i < g->n_meta; i++) printf("  %-18s %s\n", g->meta_keys[i], g->meta_values[i]);
    vkg_tensor_info ti;
    printf("inputs:\n");
    for (uint32_t i = 0; i < g->n_inputs; i++) {
        vkg_model_input(m, i, &ti);
        printf("  %-24s %-4s ", ti.name, vkg_dtype_name(ti.dtype));
        print_shape(stdout, &ti);
        printf("\n");
    }
    printf("outputs:\n");
    for (uint32_t i = 0; i < g->n_outputs; i++) {
        vkg_model_output(m, i, &ti);
        printf("  %-24s %-4s ", ti.name, vkg_dtype_name(ti.dtype));
        print_shape(stdout, &ti);
        printf("\n");
    }
    /* Nodes by op, in order of first appearance. */
    printf("nodes: %u\n", g->n_nodes);
    for (uint32_t n = 0; n < g->n_nodes; n++) {
        bool seen = false;
        for (uint32_t k = 0; k < n && !seen; k++) seen = !strcmp(g->nodes[k].op, g->nodes[n].op);
        if (seen) continue;
        uint32_t count = 0;
        for (uint32_t k = n; k < g->n_nodes; k++) count += !strcmp(g->nodes[k].op, g->nodes[n].op);
        printf("  %-12s %u\n", g->nodes[n].op, count);
    }
    uint64_t params = 0, pbytes = 0;
    for (uint32_t t = 0; t < g->n_tensors; t++)
        if (g->tensors[t].role == VKG_ROLE_CONSTANT) {
            params += g->tensors[t].data_size / vkg_dtype_size(g->tensors[t].dtype);
            pbytes += g->tensors[t].data_size;
        }
    printf("parameters: %llu (%.2f MiB)\n", (unsigned long long)params, (double)pbytes / (1 << 20));
    default_dims(g, &o, NULL);
    vkg_session_desc sd = {.dims = o.dims, .n_dims = o.n_dims};
    vkg_session *ss;
    s = vkg_session_create(m, &sd, &ss);
    if (s == VKG_SUCCESS) {
        printf("at");
        for (uint32_t i = 0; i < o.n_dims; i++) printf(" %s=%lld", o.dims[i].name, (long long)o.dims[i].value);
        printf("%s:\n", o.n_dims ? "" : " the fixed input shapes");
        printf("  FLOP estimate      %.4g GFLOP (matmul multiply-adds x 2)\n", vkg_session_flops(ss) * 1e-9);
        printf("  planned peak       %.3f MiB of activations (%.3f MiB without sharing), dispatches %u\n",
               (double)vkg_session_planned_bytes(ss) / (1 << 20), (double)vkg_session_unshared_bytes(ss) / (1 << 20),
               vkg_session_dispatch_count(ss));
        vkg_session_destroy(ss);
    }
    vkg_model_destroy(m);
    vkg_context_destroy(ctx);
    free_opts(&o);
    return s == VKG_SUCCESS ? 0 : fail(s);
}

int vkg_cmd_run(int argc, char **argv)
{
    opts o;
    int r = parse(argc, argv, &o, "usage: vkg run FILE --input NAME=x.npy ... --out DIR [--dim NAME=N ...] [--adapter DIR [--adapter-scale S]]\n");
    if (r) return r;
    if (!o.out_dir) {
        fprintf(stderr, "vkg run: --out DIR is required\n");
        free_opts(&o);
        return 2;
    }
    vkg_context *ctx = NULL;
    vkg_model *m = NULL;
    vkg_session *ss = NULL;
    vkg_npy npys[32];
    memset(npys, 0, sizeof npys);
    vkg_status s = VKG_SUCCESS;
    for (uint32_t i = 0; i < o.n_in && s == VKG_SUCCESS; i++) s = vkg_npy_read(o.in_path[i], &npys[i]);
    if (s == VKG_SUCCESS) s = open_model(&o, &ctx, &m);
    const vkg_graph *g = m ? vkg_model_graph(m) : NULL;
    /* Every input given exactly once, with the graph's dtype, rank and fixed dims. */
    for (uint32_t k = 0; g && s == VKG_SUCCESS && k < g->n_inputs; k++) {
        const vkg_ir_tensor *t = &g->tensors[g->inputs[k]];
        int found = -1;
        for (uint32_t i = 0; i < o.n_in; i++)
            if (!strcmp(o.in_name[i], t->name)) found = (int)i;
        if (found < 0) s = vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "input \"%s\" not given (--input %s=FILE.npy)", t->name, t->name);
        else if (npys[found].dtype != t->dtype || npys[found].rank != t->rank)
            s = vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: %s array of rank %u; input \"%s\" expects %s of rank %u",
                         o.in_path[found], vkg_dtype_name(npys[found].dtype), npys[found].rank, t->name,
                         vkg_dtype_name(t->dtype), t->rank);
        for (uint32_t d = 0; s == VKG_SUCCESS && found >= 0 && d < t->rank; d++)
            if (!t->sym[d] && t->dims[d] != npys[found].dims[d])
                s = vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: dim %u is %lld; input \"%s\" expects %lld", o.in_path[found],
                             d, (long long)npys[found].dims[d], t->name, (long long)t->dims[d]);
    }
    for (uint32_t i = 0; g && s == VKG_SUCCESS && i < o.n_in; i++) {
        uint32_t t = vkg_ir_tensor_find(g, o.in_name[i]);
        if (t == VKG_IR_NONE || g->tensors[t].role != VKG_ROLE_INPUT)
            s = vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "the graph has no input \"%s\"", o.in_name[i]);
    }
    if (s == VKG_SUCCESS) {
        default_dims(g, &o, npys);
        vkg_session_desc sd = {.dims = o.dims, .n_dims = o.n_dims};
        s = vkg_session_create(m, &sd, &ss);
    }
    for (uint32_t i = 0; s == VKG_SUCCESS && i < o.n_in; i++)
        s = vkg_session_set_input(ss, o.in_name[i], npys[i].data, npys[i].bytes);
    if (s == VKG_SUCCESS) s = vkg_session_run(ss);
    if (s == VKG_SUCCESS && mkdir(o.out_dir, 0777) != 0 && errno != EEXIST)
        s = vkg_fail(VKG_ERROR_IO, "cannot create %s: %s", o.out_dir, strerror(errno));
    for (uint32_t k = 0; s == VKG_SUCCESS && k < g->n_outputs; k++) {
        vkg_tensor_info ti;
        const char *name = g->tensors[g->outputs[k]].name;
        s = vkg_session_tensor(ss, name, &ti);
        uint64_t n = 1;
        for (uint32_t d = 0; d < ti.rank; d++) n *= (uint64_t)ti.dims[d];
        size_t bytes = n * vkg_dtype_size(ti.dtype);
        void *buf = malloc(bytes ? bytes : 1);
        if (!buf) s = vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        if (s == VKG_SUCCESS) s = vkg_session_get_output(ss, name, buf, bytes);
        char path[4096];
        snprintf(path, sizeof path, "%s/%s.npy", o.out_dir, name);
        if (s == VKG_SUCCESS) s = vkg_npy_write(path, ti.dtype, ti.rank, ti.dims, buf);
        if (s == VKG_SUCCESS) {
            printf("%s ", path);
            print_shape(stdout, &ti);
            printf("\n");
        }
        free(buf);
    }
    vkg_session_destroy(ss);
    vkg_model_destroy(m);
    vkg_context_destroy(ctx);
    for (uint32_t i = 0; i < o.n_in; i++) vkg_npy_free(&npys[i]);
    free_opts(&o);
    return s == VKG_SUCCESS ? 0 : fail(s);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Percentile by nearest rank of sorted values. */
static double pct(const double *sorted, int n, double p)
{
    int i = (int)ceil(p / 100.0 * n) - 1;
    return sorted[i < 0 ? 0 : i >= n ? n - 1 : i];
}

int vkg_cmd_bench_graph(int argc, char **argv)
{
    opts o;
    int r = parse(argc, argv, &o, "usage: vkg bench FILE [--runs N] [--warmup N] [--profile] [--dim NAME=N ...] [--adapter DIR [--adapter-scale S]]\n");
    if (r) return r;
    vkg_context *ctx = NULL;
    vkg_model *m = NULL;
    vkg_session *ss = NULL;
    double *t = calloc((size_t)o.runs, sizeof *t), *prof = NULL;
    vkg_status s = t ? open_model(&o, &ctx, &m) : vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    const vkg_graph *g = m ? vkg_model_graph(m) : NULL;
    if (s == VKG_SUCCESS) {
        default_dims(g, &o, NULL);
        vkg_session_desc sd = {.dims = o.dims, .n_dims = o.n_dims, .profile = o.profile};
        s = vkg_session_create(m, &sd, &ss);
    }
    /* Inputs: fixed pseudo-random values in [-1, 1). */
    for (uint32_t k = 0; s == VKG_SUCCESS && k < g->n_inputs; k++) {
        vkg_tensor_info ti;
        s = vkg_session_tensor(ss, g->tensors[g->inputs[k]].name, &ti);
        uint64_t n = 1;
        for (uint32_t d = 0; d < ti.rank; d++) n *= (uint64_t)ti.dims[d];
        float *x = malloc(n * 4 + 4);
        if (!x) s = vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        uint32_t seed = 12345 + k;
        for (uint64_t i = 0; x && i < n; i++) {
            seed = seed * 1664525u + 1013904223u;
            x[i] = (float)(seed >> 8) / 8388608.0f - 1.0f;
        }
        if (s == VKG_SUCCESS && ti.dtype != VKG_DTYPE_F32)
            s = vkg_fail(VKG_ERROR_UNSUPPORTED, "bench: input \"%s\" is %s; only f32 inputs are generated", ti.name,
                         vkg_dtype_name(ti.dtype));
        if (s == VKG_SUCCESS) s = vkg_session_set_input(ss, ti.name, x, n * 4);
        free(x);
    }
    for (int i = 0; s == VKG_SUCCESS && i < o.warmup; i++) s = vkg_session_run(ss);
    uint32_t nd = ss ? vkg_session_dispatch_count(ss) : 0;
    if (o.profile && s == VKG_SUCCESS && !(prof = calloc((size_t)nd * (size_t)o.runs + 1, sizeof *prof)))
        s = vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    for (int i = 0; s == VKG_SUCCESS && i < o.runs; i++) {
        double t0 = now_s();
        s = vkg_session_run(ss);
        t[i] = (now_s() - t0) * 1e3;
        for (uint32_t d = 0; prof && s == VKG_SUCCESS && d < nd; d++)
            s = vkg_session_profile(ss, d, NULL, NULL, &prof[(size_t)d * (size_t)o.runs + (size_t)i]);
    }
    if (s == VKG_SUCCESS) {
        qsort(t, (size_t)o.runs, sizeof *t, cmp_d);
        printf("%s on %s: %d runs after %d warm-up\n", o.file, vkg_context_device_info(ctx)->name, o.runs, o.warmup);
        printf("latency  median %.3f ms  p90 %.3f ms  p99 %.3f ms  min %.3f ms\n", pct(t, o.runs, 50), pct(t, o.runs, 90),
               pct(t, o.runs, 99), t[0]);
        printf("per run  %u dispatches, %u barriers, 1 submit\n", nd, vkg_session_barrier_count(ss));
        double gf = vkg_session_flops(ss);
        if (gf > 0) printf("throughput %.2f GFLOP/s at the median\n", gf * 1e-9 / (pct(t, o.runs, 50) * 1e-3));
    }
    if (s == VKG_SUCCESS && prof) {
        printf("\n%-4s %-32s %-10s %12s\n", "#", "node", "op", "median us");
        double total = 0;
        for (uint32_t d = 0; d < nd; d++) {
            const char *node, *op;
            vkg_session_profile(ss, d, &node, &op, NULL);
            double *v = &prof[(size_t)d * (size_t)o.runs];
            qsort(v, (size_t)o.runs, sizeof *v, cmp_d);
            double med = pct(v, o.runs, 50) * 1e-3;
            total += med;
            printf("%-4u %-32s %-10s %12.1f\n", d, node, op, med);
        }
        printf("%-4s %-32s %-10s %12.1f\n", "", "total (GPU)", "", total);
    } else if (s == VKG_SUCCESS && o.profile) {
        printf("(no GPU timestamps on this device: profile unavailable)\n");
    }
    free(t);
    free(prof);
    vkg_session_destroy(ss);
    vkg_model_destroy(m);
    vkg_context_destroy(ctx);
    free_opts(&o);
    return s == VKG_SUCCESS ? 0 : fail(s);
}
