/* The strided copy kernel (shaders/copy.comp) and the layout ops built on it: patchify,
 * insert_tokens, slice. `test_layout copy|ops [--inject-fault]`. */
#include "harness.h"
#include "runtime/kernels/copy.h"

/* CPU reference of vkg_copy: walks the box in row-major order. */
static void ref_copy(const vkg_copy_args *a, const float *src, float *dst)
{
    uint64_t n = 1;
    for (uint32_t d = 0; d < a->rank; d++) n *= a->shape[d];
    for (uint64_t e = 0; e < n; e++) {
        uint64_t rem = e, is = a->src_off, id = a->dst_off;
        for (int d = (int)a->rank - 1; d >= 0; d--) {
            uint64_t c = rem % a->shape[d];
            rem /= a->shape[d];
            is += c * a->src_stride[d];
            id += c * a->dst_stride[d];
        }
        dst[id] = src[is];
    }
}

static int copy_case(vkg_context *ctx, vkg_copy_args a, const char *what)
{
    float *src = malloc(a.src_elems * 4), *want = malloc(a.dst_elems * 4);
    h_fill(src, a.src_elems, 3, -1, 1);
    for (uint64_t i = 0; i < a.dst_elems; i++) want[i] = -7.0f; /* untouched elements must stay */
    vkg_buf *bs = h_upload(ctx, src, a.src_elems * 4), *bd = h_upload(ctx, want, a.dst_elems * 4);
    ref_copy(&a, src, want);
    a.src = (vkg_tref){bs, 0};
    a.dst = (vkg_tref){bd, 0};
    vkg_cmd *cmd;
    OK(vkg_cmd_begin(ctx, false, &cmd));
    OK(vkg_copy(cmd, &a));
    OK(vkg_cmd_submit_wait(cmd));
    float *got = h_download(bd, a.dst_elems);
    h_maybe_fault(got, a.dst_elems);
    h_compare(what, got, want, NULL, a.dst_elems, 0, 0);
    free(got);
    free(src);
    free(want);
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(bs);
    vkg_buf_destroy(bd);
    return 0;
}

static int test_copy(void)
{
    vkg_context *ctx = h_context();
    /* contiguous, transposed, broadcast (stride 0), offset windows, 8-d, a single element */
    vkg_copy_args c1 = {.src_elems = 1000, .dst_elems = 1000, .rank = 1, .shape = {1000}, .src_stride = {1}, .dst_stride = {1}};
    vkg_copy_args c2 = {.src_elems = 7 * 13, .dst_elems = 7 * 13, .rank = 2, .shape = {7, 13}, .src_stride = {1, 7},
                        .dst_stride = {13, 1}};
    vkg_copy_args c3 = {.src_elems = 5, .dst_elems = 3 * 4 * 5, .rank = 3, .shape = {3, 4, 5}, .src_stride = {0, 0, 1},
                        .dst_stride = {20, 5, 1}};
    vkg_copy_args c4 = {.src_elems = 100, .dst_elems = 300, .src_off = 17, .dst_off = 31, .rank = 2, .shape = {4, 9},
                        .src_stride = {20, 1}, .dst_stride = {50, 2}};
    vkg_copy_args c5 = {.src_elems = 256, .dst_elems = 256, .rank = 8, .shape = {2, 2, 2, 2, 2, 2, 2, 2},
                        .src_stride = {128, 64, 32, 16, 8, 4, 2, 1}, .dst_stride = {1, 2, 4, 8, 16, 32, 64, 128}};
    vkg_copy_args c6 = {.src_elems = 1, .dst_elems = 3, .dst_off = 2, .rank = 1, .shape = {1}, .src_stride = {1},
                        .dst_stride = {1}};
    vkg_copy_args c7 = {.src_elems = 70000, .dst_elems = 70000, .rank = 2, .shape = {7, 10000},
                        .src_stride = {10000, 1}, .dst_stride = {1, 7}};
    if (copy_case(ctx, c1, "copy contiguous 1000") || copy_case(ctx, c2, "copy transpose 7x13") ||
        copy_case(ctx, c3, "copy broadcast (5) to (3,4,5)") || copy_case(ctx, c4, "copy strided windows") ||
        copy_case(ctx, c5, "copy 8-d reversal") || copy_case(ctx, c6, "copy one element") ||
        copy_case(ctx, c7, "copy transpose 7x10000"))
        return 1;
    /* A box reaching past its buffer is refused before anything is recorded. */
    vkg_buf *b;
    OK(vkg_buf_create(ctx, 40, &b));
    vkg_cmd *cmd;
    OK(vkg_cmd_begin(ctx, false, &cmd));
    vkg_copy_args bad = {.src = {b, 0}, .dst = {b, 0}, .src_elems = 10, .dst_elems = 10, .rank = 1, .shape = {11},
                         .src_stride = {1}, .dst_stride = {1}};
    vkg_status s = vkg_copy(cmd, &bad);
    CHECK(s == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "src element 10 of 10"), "out of range box: %s",
          vkg_last_error());
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(b);
    return h_finish(ctx, "copy");
}

/* image (N, C, H, W) -> patchify(p) -> insert_tokens(cls (1,1,D'), 0) -> insert_tokens(reg (N,2,D'), 1)
 * -> slice(axis 1, 1, -1) = "output" ; D' = C*p*p. */
static int test_ops(void)
{
    enum { N = 2, C = 3, H = 6, W = 9, P = 3, D = C * P * P, T = (H / P) * (W / P), R = 2 };
    vkg_context *ctx = h_context();
    vkg_writer *w;
    OK(vkg_writer_create(&w));
    float cls[D], reg[N * R * D];
    h_fill(cls, D, 1, -1, 1);
    h_fill(reg, N * R * D, 2, -1, 1);
    vkg_writer_tensor ti = {.name = "image", .role = VKG_ROLE_INPUT, .rank = 4, .dims = {N, C, H, W}};
    vkg_writer_tensor tc = {.name = "cls", .role = VKG_ROLE_CONSTANT, .rank = 3, .dims = {1, 1, D}, .data = cls,
                            .data_size = sizeof cls};
    vkg_writer_tensor tr = {.name = "reg", .role = VKG_ROLE_CONSTANT, .rank = 3, .dims = {N, R, D}, .data = reg,
                            .data_size = sizeof reg};
    vkg_writer_tensor tp = {.name = "patches", .rank = 3, .dims = {N, T, D}};
    vkg_writer_tensor t1 = {.name = "with_cls", .rank = 3, .dims = {N, T + 1, D}};
    vkg_writer_tensor t2 = {.name = "tokens", .role = VKG_ROLE_OUTPUT, .rank = 3, .dims = {N, T + 1 + R, D}};
    vkg_writer_tensor t3 = {.name = "output", .role = VKG_ROLE_OUTPUT, .rank = 3, .dims = {N, T + R - 1, D}};
    uint32_t img, c, r, p, a, b, o;
    OK(vkg_writer_add_tensor(w, &ti, &img));
    OK(vkg_writer_add_tensor(w, &tc, &c));
    OK(vkg_writer_add_tensor(w, &tr, &r));
    OK(vkg_writer_add_tensor(w, &tp, &p));
    OK(vkg_writer_add_tensor(w, &t1, &a));
    OK(vkg_writer_add_tensor(w, &t2, &b));
    OK(vkg_writer_add_tensor(w, &t3, &o));
    vkg_writer_attr patch = {.name = "patch", .type = VKG_ATTR_INT, .i = P};
    vkg_writer_attr at0 = {.name = "index", .type = VKG_ATTR_INT, .i = 0}, at1 = at0;
    at1.i = 1;
    vkg_writer_attr sl[3] = {{.name = "axis", .type = VKG_ATTR_INT, .i = 1},
                             {.name = "start", .type = VKG_ATTR_INT, .i = 1},
                             {.name = "end", .type = VKG_ATTR_INT, .i = -1}};
    uint32_t in2[2] = {p, c};
    OK(vkg_writer_add_node(w, "patchify", "patch_embed", &img, 1, &p, 1, &patch, 1));
    OK(vkg_writer_add_node(w, "insert_tokens", "cls", in2, 2, &a, 1, &at0, 1));
    in2[0] = a, in2[1] = r;
    OK(vkg_writer_add_node(w, "insert_tokens", "registers", in2, 2, &b, 1, &at1, 1));
    OK(vkg_writer_add_node(w, "slice", "drop_ends", &b, 1, &o, 1, sl, 3));
    OK(vkg_writer_add_input(w, img));
    OK(vkg_writer_add_output(w, o));
    OK(vkg_writer_add_output(w, b));
    void *bytes;
    size_t size;
    OK(vkg_writer_to_memory(w, &bytes, &size));
    vkg_writer_destroy(w);
    vkg_model *m;
    OK(vkg_model_load_memory(ctx, bytes, size, &m));
    free(bytes);
    vkg_session *s;
    OK(vkg_session_create(m, NULL, &s));

    float image[N * C * H * W], want_tok[N * (T + 1 + R) * D], want_out[N * (T + R - 1) * D];
    float got_tok[N * (T + 1 + R) * D], got_out[N * (T + R - 1) * D];
    h_fill(image, N * C * H * W, 3, -1, 1);
    /* tokens: [cls, reg0, reg1, patch 0..T-1]; patch (py, px) row (c, ky, kx) */
    for (int n = 0; n < N; n++)
        for (int t = 0; t < T + 1 + R; t++)
            for (int d = 0; d < D; d++) {
                float v;
                if (t == 0) v = cls[d];
                else if (t <= R) v = reg[(n * R + t - 1) * D + d];
                else {
                    int q = t - 1 - R, py = q / (W / P), px = q % (W / P), ch = d / (P * P), ky = d / P % P, kx = d % P;
                    v = image[((n * C + ch) * H + py * P + ky) * W + px * P + kx];
                }
                want_tok[(n * (T + 1 + R) + t) * D + d] = v;
            }
    for (int n = 0; n < N; n++)
        for (int t = 0; t < T + R - 1; t++)
            for (int d = 0; d < D; d++) want_out[(n * (T + R - 1) + t) * D + d] = want_tok[(n * (T + 1 + R) + t + 1) * D + d];
    OK(vkg_session_set_input(s, "image", image, sizeof image));
    OK(vkg_session_run(s));
    OK(vkg_session_get_output(s, "tokens", got_tok, sizeof got_tok));
    OK(vkg_session_get_output(s, "output", got_out, sizeof got_out));
    h_maybe_fault(got_tok, N * (T + 1 + R) * D);
    h_compare("patchify + insert_tokens (cls at 0, registers at 1)", got_tok, want_tok, NULL, N * (T + 1 + R) * D, 0, 0);
    h_maybe_fault(got_out, N * (T + R - 1) * D);
    h_compare("slice [1, -1) of the tokens", got_out, want_out, NULL, N * (T + R - 1) * D, 0, 0);
    vkg_session_destroy(s);
    vkg_model_destroy(m);
    return h_finish(ctx, "layout ops");
}

int main(int argc, char **argv)
{
    for (int i = 2; i < argc; i++)
        if (!strcmp(argv[i], "--inject-fault")) h_inject_fault = 1;
    const char *t = argc > 1 ? argv[1] : "";
    if (!strcmp(t, "copy")) return test_copy();
    if (!strcmp(t, "ops")) return test_ops();
    fprintf(stderr, "usage: test_layout copy|ops [--inject-fault]\n");
    return 2;
}
