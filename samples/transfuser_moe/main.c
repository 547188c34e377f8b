/* The Transfuser planning model with the MoE decoder (model-spec S3): loads the bundled graph
 * (random weights, seed 0), feeds it a synthetic BEV feature map and ego status, and prints the
 * outputs' shapes, the planned trajectory, the most confident agents, the expert usage table and
 * latency percentiles. Only the public header is used, as an application would.
 *
 *   transfuser_moe [MODEL.vkg] [--batch N] [--runs N] [--seed S]
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "vkg.h"

#ifndef VKG_SAMPLE_MODEL
#define VKG_SAMPLE_MODEL "transfuser_moe.vkg"
#endif

/* Every tensor the sample reads back; the five statistics are the decoder's sums over layers. */
enum { T_TRAJ, T_STATES, T_LABELS, T_AUX, T_ZL, T_LB, T_COUNTS, T_FRAC, N_OUT };
static const char *const out_names[N_OUT] = {"trajectory",       "agent_states",          "agent_labels",
                                             "moe_aux_loss",     "moe_router_z_loss",     "moe_load_balance_loss",
                                             "moe_usage_counts", "moe_usage_fraction"};

typedef struct outputs {
    vkg_tensor_info info[N_OUT];
    float *data[N_OUT];
    size_t bytes[N_OUT];
} outputs;

static int fail(const char *what, vkg_status s)
{
    fprintf(stderr, "transfuser_moe: %s: %s: %s\n", what, vkg_status_name(s), vkg_last_error());
    return 1;
}

static uint64_t numel(const vkg_tensor_info *t)
{
    uint64_t n = 1;
    for (uint32_t i = 0; i < t->rank; i++) n *= (uint64_t)t->dims[i];
    return n;
}

static void print_shape(const vkg_tensor_info *t)
{
    printf("  %-22s (", t->name);
    for (uint32_t i = 0; i < t->rank; i++) printf(i ? ", %lld" : "%lld", (long long)t->dims[i]);
    printf(")\n");
}

/* A fixed generator so runs are reproducible (SplitMix64, then Box-Muller). */
static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double rng_uniform(uint64_t *s) { return ((double)(rng_next(s) >> 11) + 0.5) / 9007199254740992.0; }

static float rng_normal(uint64_t *s)
{
    double u = rng_uniform(s), v = rng_uniform(s);
    return (float)(sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v));
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double percentile(const double *sorted, int n, double p)
{
    int i = (int)ceil(p / 100.0 * n) - 1;
    return sorted[i < 0 ? 0 : i >= n ? n - 1 : i];
}

/* BEV features ~ N(0, 1) (a stand-in for the backbone's ReLU map would change nothing here);
 * status = one-hot driving command (left, straight, right, unknown), velocity, acceleration. */
static void make_inputs(float *bev, size_t nbev, float *status, int batch, uint64_t seed)
{
    uint64_t s = seed;
    for (size_t i = 0; i < nbev; i++) bev[i] = rng_normal(&s);
    for (int b = 0; b < batch; b++) {
        float *st = status + 8 * b;
        memset(st, 0, 8 * sizeof(float));
        st[rng_next(&s) % 4] = 1.0f;
        st[4] = (float)(2.0 + 10.0 * rng_uniform(&s)); /* m/s forward */
        st[5] = (float)(0.5 * rng_normal(&s));
        st[6] = (float)(0.8 * rng_normal(&s));         /* m/s^2 */
        st[7] = (float)(0.3 * rng_normal(&s));
    }
}

static int download(vkg_session *s, outputs *o)
{
    for (int i = 0; i < N_OUT; i++) {
        vkg_status st = vkg_session_get_output(s, out_names[i], o->data[i], o->bytes[i]);
        if (st != VKG_SUCCESS) return fail(out_names[i], st);
    }
    return 0;
}

static void report(const outputs *o, int batch)
{
    printf("\nOutputs:\n");
    for (int i = 0; i < N_OUT; i++) print_shape(&o->info[i]);

    int poses = (int)o->info[T_TRAJ].dims[1], agents = (int)o->info[T_LABELS].dims[1];
    printf("\nPlanned trajectory, batch element 0 (x m, y m, heading rad; random weights, so no real plan):\n");
    for (int p = 0; p < poses; p++) {
        const float *v = o->data[T_TRAJ] + 3 * p;
        printf("  t=%.1f s  %8.3f %8.3f %7.3f\n", 0.5 * (p + 1), v[0], v[1], v[2]);
    }
    /* The three agents with the highest label logits (sigmoid = detection confidence). */
    printf("\nMost confident agents, batch element 0 (x m, y m, heading rad, length m, width m):\n");
    int best[3] = {-1, -1, -1};
    for (int r = 0; r < 3 && r < agents; r++) {
        for (int a = 0; a < agents; a++) {
            if (a == best[0] || a == best[1]) continue;
            if (best[r] < 0 || o->data[T_LABELS][a] > o->data[T_LABELS][best[r]]) best[r] = a;
        }
        const float *v = o->data[T_STATES] + 5 * best[r];
        float logit = o->data[T_LABELS][best[r]];
        printf("  agent %2d  p=%.3f  %8.3f %8.3f %7.3f %7.3f %7.3f\n", best[r], 1.0 / (1.0 + exp(-logit)), v[0], v[1],
               v[2], v[3], v[4]);
    }

    int E = (int)o->info[T_COUNTS].dims[0];
    double total = 0;
    for (int e = 0; e < E; e++) total += o->data[T_COUNTS][e];
    printf("\nExpert usage, summed over the 3 decoder layers (%d tokens x top-2 per layer, batch %d):\n",
           batch * (agents + 1), batch);
    printf("  expert  tokens  fraction  \n");
    for (int e = 0; e < E; e++) {
        double f = o->data[T_FRAC][e];
        int bar = (int)lround(f * 40.0);
        printf("  %6d  %6.0f  %8.4f  %.*s\n", e, o->data[T_COUNTS][e], f, bar, "########################################");
    }
    printf("  total   %6.0f\n", total);
    printf("  moe_aux_loss %.6f = load balance %.6f + router z-loss %.6f\n", o->data[T_AUX][0], o->data[T_LB][0],
           o->data[T_ZL][0]);
}

int main(int argc, char **argv)
{
    const char *path = VKG_SAMPLE_MODEL;
    int batch = 1, runs = 200;
    uint64_t seed = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--batch") && i + 1 < argc) batch = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--runs") && i + 1 < argc) runs = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc) seed = strtoull(argv[++i], NULL, 10);
        else if (argv[i][0] != '-') path = argv[i];
        else {
            fprintf(stderr, "usage: transfuser_moe [MODEL.vkg] [--batch N] [--runs N] [--seed S]\n");
            return 2;
        }
    }
    if (batch < 1 || batch > 4096 || runs < 1 || runs > 1000000) {
        fprintf(stderr, "transfuser_moe: --batch must be 1..4096 and --runs 1..1000000\n");
        return 2;
    }

    vkg_context_desc cd = {0};
    vkg_context *ctx = NULL;
    vkg_status st = vkg_context_create(&cd, &ctx);
    if (st != VKG_SUCCESS) return fail("creating the Vulkan context", st);
    int rc = 1;
    vkg_model *model = NULL;
    vkg_session *sess = NULL;
    float *bev = NULL, *status = NULL;
    double *lat = NULL, *lat_io = NULL;
    outputs o = {0};

    double t0 = now_ms();
    st = vkg_model_load(ctx, path, &model);
    if (st != VKG_SUCCESS) {
        fail(path, st);
        goto done;
    }
    double t_load = now_ms() - t0;
    const char *desc = vkg_model_metadata(model, "description");
    printf("%s on %s\n  %s\n", path, vkg_context_device_info(ctx)->name, desc ? desc : "");

    vkg_dim_binding dim = {"batch", batch};
    vkg_session_desc sd = {.dims = &dim, .n_dims = 1};
    t0 = now_ms();
    st = vkg_session_create(model, &sd, &sess);
    if (st != VKG_SUCCESS) {
        fail("creating the session", st);
        goto done;
    }
    double t_sess = now_ms() - t0;

    vkg_tensor_info bi, si;
    if ((st = vkg_session_tensor(sess, "bev_feature", &bi)) != VKG_SUCCESS ||
        (st = vkg_session_tensor(sess, "status_feature", &si)) != VKG_SUCCESS) {
        fail("this model has no bev_feature / status_feature inputs", st);
        goto done;
    }
    size_t nbev = (size_t)numel(&bi), nst = (size_t)numel(&si);
    if (nst != (size_t)batch * 8) {
        fprintf(stderr, "transfuser_moe: status_feature has %zu values, expected batch x 8\n", nst);
        goto done;
    }
    bev = malloc(nbev * sizeof(float));
    status = malloc(nst * sizeof(float));
    for (int i = 0; i < N_OUT; i++) {
        if ((st = vkg_session_tensor(sess, out_names[i], &o.info[i])) != VKG_SUCCESS) {
            fail(out_names[i], st);
            goto done;
        }
        o.bytes[i] = (size_t)numel(&o.info[i]) * sizeof(float);
        o.data[i] = malloc(o.bytes[i] ? o.bytes[i] : 1);
    }
    lat = malloc((size_t)runs * sizeof(double));
    lat_io = malloc((size_t)runs * sizeof(double));
    if (!bev || !status || !lat || !lat_io) {
        fprintf(stderr, "transfuser_moe: out of host memory\n");
        goto done;
    }
    for (int i = 0; i < N_OUT; i++)
        if (!o.data[i]) {
            fprintf(stderr, "transfuser_moe: out of host memory\n");
            goto done;
        }
    make_inputs(bev, nbev, status, batch, seed);
    printf("  load %.1f ms, session %.1f ms (shapes, memory plan, one recorded command buffer: %u dispatches, "
           "%u barriers)\n", t_load, t_sess, vkg_session_dispatch_count(sess), vkg_session_barrier_count(sess));

    /* One run for the printed outputs; the first run also compiles pipelines on some drivers. */
    if ((st = vkg_session_set_input(sess, "bev_feature", bev, nbev * sizeof(float))) != VKG_SUCCESS ||
        (st = vkg_session_set_input(sess, "status_feature", status, nst * sizeof(float))) != VKG_SUCCESS) {
        fail("setting the inputs", st);
        goto done;
    }
    if ((st = vkg_session_run(sess)) != VKG_SUCCESS) {
        fail("run", st);
        goto done;
    }
    if (download(sess, &o)) goto done;
    report(&o, batch);

    /* Latency: the replayed run alone, and with the inputs' upload and the outputs' download. */
    for (int w = 0; w < 3; w++)
        if ((st = vkg_session_run(sess)) != VKG_SUCCESS) {
            fail("run", st);
            goto done;
        }
    for (int r = 0; r < runs; r++) {
        double a = now_ms();
        if ((st = vkg_session_set_input(sess, "bev_feature", bev, nbev * sizeof(float))) != VKG_SUCCESS ||
            (st = vkg_session_set_input(sess, "status_feature", status, nst * sizeof(float))) != VKG_SUCCESS) {
            fail("setting the inputs", st);
            goto done;
        }
        double b = now_ms();
        if ((st = vkg_session_run(sess)) != VKG_SUCCESS) {
            fail("run", st);
            goto done;
        }
        double c = now_ms();
        if (download(sess, &o)) goto done;
        lat[r] = c - b;
        lat_io[r] = now_ms() - a;
    }
    qsort(lat, (size_t)runs, sizeof(double), cmp_double);
    qsort(lat_io, (size_t)runs, sizeof(double), cmp_double);
    printf("\nLatency over %d runs, batch %d (ms):     p50      p90      p99      max\n", runs, batch);
    printf("  run (one submit, waited)          %8.3f %8.3f %8.3f %8.3f\n", percentile(lat, runs, 50),
           percentile(lat, runs, 90), percentile(lat, runs, 99), lat[runs - 1]);
    printf("  upload + run + download           %8.3f %8.3f %8.3f %8.3f\n", percentile(lat_io, runs, 50),
           percentile(lat_io, runs, 90), percentile(lat_io, runs, 99), lat_io[runs - 1]);
    rc = 0;

done:
    for (int i = 0; i < N_OUT; i++) free(o.data[i]);
    free(bev);
    free(status);
    free(lat);
    free(lat_io);
    vkg_session_destroy(sess);
    vkg_model_destroy(model);
    vkg_context_destroy(ctx);
    return rc;
}
