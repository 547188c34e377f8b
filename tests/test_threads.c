/* Concurrency (issue 10 point 3): one loaded model shared by sessions on many threads. Each thread
 * creates its own session (pipelines and memory come from the shared context at the same time) and
 * runs it `runs` times on inputs that change from run to run; every output must be bit-identical to
 * what a single-threaded run gave for the same inputs. A mixed-up activation, a command buffer
 * recorded with another session's memory or a race in the context would show as a difference;
 * ThreadSanitizer (the VKG_TSAN build) and the validation layer's thread checks see the races
 * themselves. Only the public API is used.
 * `test_threads GRAPH [--threads N] [--runs N] [--dim NAME=V ...]` */
#include <pthread.h>
#include <stdbool.h>

#include "harness.h"

enum { MAX_THREADS = 64, VARIANTS = 3 };

typedef struct io_desc {
    uint32_t n_in, n_out;
    vkg_tensor_info in[16], out[16];
    size_t in_bytes[16], out_bytes[16];
} io_desc;

typedef struct shared {
    vkg_model *model;
    vkg_session_desc desc;
    const io_desc *io;
    /* want[v][o]: outputs of input variant v, from the single-threaded pass */
    void *inputs[MAX_THREADS][VARIANTS][16];
    void *want[MAX_THREADS][VARIANTS][16];
    int runs;
} shared;

typedef struct worker {
    shared *sh;
    int id;
    int mismatches, failures;
    char error[512];
} worker;

static size_t tensor_bytes(const vkg_tensor_info *t)
{
    size_t n = 1;
    for (uint32_t r = 0; r < t->rank; r++) n *= (size_t)t->dims[r];
    size_t es = t->dtype == VKG_DTYPE_F32 || t->dtype == VKG_DTYPE_I32 ? 4 : t->dtype == VKG_DTYPE_U8 ? 1 : 2;
    return n * es;
}

static int describe(vkg_session *s, const vkg_model *m, io_desc *out)
{
    out->n_in = vkg_model_input_count(m);
    out->n_out = vkg_model_output_count(m);
    if (out->n_in > 16 || out->n_out > 16) {
        fprintf(stderr, "FAIL: the graph has %u inputs and %u outputs; this test handles 16 of each\n", out->n_in,
                out->n_out);
        return 1;
    }
    for (uint32_t i = 0; i < out->n_in + out->n_out; i++) {
        bool is_in = i < out->n_in;
        vkg_tensor_info info;
        OK(is_in ? vkg_model_input(m, i, &info) : vkg_model_output(m, i - out->n_in, &info));
        vkg_tensor_info *t = is_in ? &out->in[i] : &out->out[i - out->n_in];
        OK(vkg_session_tensor(s, info.name, t));
        if (is_in && t->dtype != VKG_DTYPE_F32) {
            fprintf(stderr, "FAIL: input \"%s\" is not f32; this test fills f32 inputs only\n", t->name);
            return 1;
        }
        (is_in ? out->in_bytes : out->out_bytes)[is_in ? i : i - out->n_in] = tensor_bytes(t);
    }
    return 0;
}

/* One run of session s on input variant v of thread `id`; outputs into got[o]. Called on worker
 * threads: it reports through its status and vkg_last_error, not through the harness's counters. */
#define TRY(call)                                                                                  \
    do {                                                                                           \
        vkg_status t__s = (call);                                                                  \
        if (t__s != VKG_SUCCESS) return t__s;                                                      \
    } while (0)
static vkg_status run_once(vkg_session *s, const shared *sh, int id, int v, void **got, bool async)
{
    const io_desc *io = sh->io;
    for (uint32_t i = 0; i < io->n_in; i++)
        TRY(vkg_session_set_input(s, io->in[i].name, sh->inputs[id][v][i], io->in_bytes[i]));
    if (async) {
        /* Poll first, as a render loop would, then block. */
        TRY(vkg_session_submit(s, NULL));
        vkg_status st = vkg_session_wait(s, 0);
        if (st == VKG_TIMEOUT) st = vkg_session_wait(s, UINT64_MAX);
        TRY(st);
    } else {
        TRY(vkg_session_run(s));
    }
    for (uint32_t o = 0; o < io->n_out; o++) TRY(vkg_session_get_output(s, io->out[o].name, got[o], io->out_bytes[o]));
    return VKG_SUCCESS;
}

static void *work(void *arg)
{
    worker *w = arg;
    shared *sh = w->sh;
    const io_desc *io = sh->io;
    void *got[16] = {0};
    vkg_session *s = NULL;
    for (uint32_t o = 0; o < io->n_out; o++) got[o] = malloc(io->out_bytes[o]);
    if (vkg_session_create(sh->model, &sh->desc, &s) != VKG_SUCCESS) {
        snprintf(w->error, sizeof w->error, "vkg_session_create: %s", vkg_last_error());
        w->failures++;
    }
    for (int r = 0; s && r < sh->runs && !w->failures; r++) {
        int v = (r + w->id) % VARIANTS;
        if (run_once(s, sh, w->id, v, got, r % 2 == 1) != VKG_SUCCESS) {
            snprintf(w->error, sizeof w->error, "run %d: %s", r, vkg_last_error());
            w->failures++;
            break;
        }
        for (uint32_t o = 0; o < io->n_out; o++)
            if (memcmp(got[o], sh->want[w->id][v][o], io->out_bytes[o]) != 0) {
                if (!w->mismatches)
                    snprintf(w->error, sizeof w->error, "run %d: output \"%s\" differs from the single-threaded run", r,
                             io->out[o].name);
                w->mismatches++;
            }
    }
    vkg_session_destroy(s);
    for (uint32_t o = 0; o < io->n_out; o++) free(got[o]);
    return NULL;
}

static int parse_dim(const char *arg, vkg_dim_binding *d)
{
    const char *eq = strchr(arg, '=');
    if (!eq) return 1;
    static char names[8][64];
    static int used;
    if (used == 8 || (size_t)(eq - arg) >= sizeof names[0]) return 1;
    memcpy(names[used], arg, (size_t)(eq - arg));
    names[used][eq - arg] = 0;
    *d = (vkg_dim_binding){names[used++], atoll(eq + 1)};
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: test_threads GRAPH [--threads N] [--runs N] [--dim NAME=V ...]\n");
        return 2;
    }
    int threads = 8, runs = 100;
    vkg_dim_binding dims[8];
    uint32_t n_dims = 0;
    for (int i = 2; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--threads")) threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--runs")) runs = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--dim") && n_dims < 8 && !parse_dim(argv[i + 1], &dims[n_dims])) n_dims++;
        else {
            fprintf(stderr, "test_threads: bad argument %s\n", argv[i]);
            return 2;
        }
    }
    if (threads < 1 || threads > MAX_THREADS || runs < 1) {
        fprintf(stderr, "test_threads: --threads 1..%d, --runs >= 1\n", MAX_THREADS);
        return 2;
    }
    vkg_context *ctx = h_context();
    vkg_model *model = NULL;
    OK(vkg_model_load(ctx, argv[1], &model));
    shared *sh = calloc(1, sizeof *sh);
    io_desc *desc_io = calloc(1, sizeof *desc_io);
    sh->model = model;
    sh->desc = (vkg_session_desc){.dims = dims, .n_dims = n_dims};
    sh->io = desc_io;
    sh->runs = runs;

    /* The single-threaded pass: one session, every thread's input variants, in order. */
    vkg_session *s = NULL;
    OK(vkg_session_create(model, &sh->desc, &s));
    if (describe(s, model, desc_io)) return 1;
    for (int t = 0; t < threads; t++)
        for (int v = 0; v < VARIANTS; v++) {
            for (uint32_t i = 0; i < desc_io->n_in; i++) {
                sh->inputs[t][v][i] = malloc(desc_io->in_bytes[i]);
                h_fill(sh->inputs[t][v][i], desc_io->in_bytes[i] / 4, (uint32_t)(1000 * t + 10 * v + i), -1.f, 1.f);
            }
            for (uint32_t o = 0; o < desc_io->n_out; o++) sh->want[t][v][o] = malloc(desc_io->out_bytes[o]);
            OK(run_once(s, sh, t, v, sh->want[t][v], false));
        }
    vkg_session_destroy(s);
    printf("single-threaded: %d threads x %d input variants, %u inputs, %u outputs\n", threads, VARIANTS,
           desc_io->n_in, desc_io->n_out);

    worker ws[MAX_THREADS] = {0};
    pthread_t tids[MAX_THREADS];
    for (int t = 0; t < threads; t++) {
        ws[t] = (worker){.sh = sh, .id = t};
        CHECK(pthread_create(&tids[t], NULL, work, &ws[t]) == 0, "pthread_create %d", t);
    }
    int mismatches = 0;
    for (int t = 0; t < threads; t++) {
        pthread_join(tids[t], NULL);
        CHECK(ws[t].failures == 0 && ws[t].mismatches == 0, "thread %d: %d failure(s), %d mismatching run(s): %s", t,
              ws[t].failures, ws[t].mismatches, ws[t].error);
        mismatches += ws[t].mismatches;
    }
    printf("%d threads x %d runs: %d mismatching output(s)\n", threads, runs, mismatches);
    for (int t = 0; t < threads; t++)
        for (int v = 0; v < VARIANTS; v++) {
            for (uint32_t i = 0; i < desc_io->n_in; i++) free(sh->inputs[t][v][i]);
            for (uint32_t o = 0; o < desc_io->n_out; o++) free(sh->want[t][v][o]);
        }
    free(sh);
    free(desc_io);
    vkg_model_destroy(model);
    return h_finish(ctx, "threads");
}
