/* Depth and segmentation from one image (model-spec S1: a DINOv2-style ViT with MoE-LoRA FFNs, a
 * DPT depth head and a BN segmentation head), with the bundled model trained on procedural scenes.
 * Reads a PNG or JPEG of any size, resizes it to the graph's input (a multiple of 14), runs the
 * graph and writes two pictures at the image's own size: a colourised depth map and the
 * segmentation blended over the image. Prints per-stage timings; the two GPU stages come from the
 * session's per-dispatch timestamps, split by node name (backbone vs heads).
 *
 *   depth_seg [IMAGE] [--model FILE.vkg] [--out DIR] [--runs N]
 */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "stb_wrap.h"
#include "vkg.h"

#ifndef VKG_SAMPLE_DIR
#define VKG_SAMPLE_DIR "."
#endif

/* ImageNet statistics the model was trained with (model-spec §1.1). */
static const float MEAN[3] = {0.485f, 0.456f, 0.406f}, STD[3] = {0.229f, 0.224f, 0.225f};

/* Class colours for the overlay; class i > 7 cycles. Chosen to be told apart at a glance. */
static const uint8_t PALETTE[8][3] = {{70, 130, 230}, {60, 170, 60},  {200, 80, 60},  {240, 200, 40},
                                      {190, 60, 200}, {40, 200, 200}, {250, 140, 20}, {150, 150, 150}};

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec * 1e-6;
}

static int fail(const char *what, vkg_status s)
{
    fprintf(stderr, "depth_seg: %s: %s: %s\n", what, vkg_status_name(s), vkg_last_error());
    return 1;
}

/* Bilinear sample of a (h, w) plane at the centre-aligned position of output pixel (oy, ox) of an
 * (oh, ow) grid (align_corners = false, clamped at the borders). */
static float sample_bilinear(const float *p, int h, int w, int oh, int ow, int oy, int ox)
{
    float sy = ((float)oy + 0.5f) * (float)h / (float)oh - 0.5f, sx = ((float)ox + 0.5f) * (float)w / (float)ow - 0.5f;
    if (sy < 0) sy = 0;
    if (sx < 0) sx = 0;
    int y0 = (int)sy, x0 = (int)sx;
    int y1 = y0 + 1 < h ? y0 + 1 : h - 1, x1 = x0 + 1 < w ? x0 + 1 : w - 1;
    if (y0 > h - 1) y0 = h - 1;
    if (x0 > w - 1) x0 = w - 1;
    float fy = sy - (float)y0, fx = sx - (float)x0;
    float a = p[y0 * w + x0] * (1 - fx) + p[y0 * w + x1] * fx;
    float b = p[y1 * w + x0] * (1 - fx) + p[y1 * w + x1] * fx;
    return a * (1 - fy) + b * fy;
}

/* RGB8 (h, w) -> normalized planar (3, oh, ow) f32, resized bilinearly. Downscaling by a large
 * factor first box-filters to about twice the target size so small details do not alias. */
static void preprocess(const uint8_t *rgb, int h, int w, float *out, int oh, int ow)
{
    int f = (h / oh < w / ow ? h / oh : w / ow) / 2;
    if (f < 1) f = 1;
    int bh = h / f, bw = w / f;
    float *plane = malloc((size_t)bh * bw * sizeof(float));
    for (int c = 0; c < 3; c++) {
        for (int y = 0; y < bh; y++)
            for (int x = 0; x < bw; x++) {
                float s = 0;
                for (int dy = 0; dy < f; dy++)
                    for (int dx = 0; dx < f; dx++) s += rgb[((size_t)(y * f + dy) * w + (x * f + dx)) * 3 + c];
                plane[y * bw + x] = s / (float)(f * f) / 255.0f;
            }
        for (int y = 0; y < oh; y++)
            for (int x = 0; x < ow; x++)
                out[((size_t)c * oh + y) * ow + x] = (sample_bilinear(plane, bh, bw, oh, ow, y, x) - MEAN[c]) / STD[c];
    }
    free(plane);
}

/* A perceptually ordered ramp from dark violet (far) through red and orange to pale yellow (near),
 * interpolated between five hand-picked stops. */
static void ramp(float t, uint8_t *rgb)
{
    static const float stops[5][3] = {{20, 10, 60}, {110, 20, 120}, {210, 50, 70}, {250, 150, 40}, {252, 250, 190}};
    if (!(t > 0)) t = 0;
    if (t > 1) t = 1;
    float s = t * 4;
    int i = (int)s;
    if (i > 3) i = 3;
    float f = s - (float)i;
    for (int c = 0; c < 3; c++) rgb[c] = (uint8_t)lrintf(stops[i][c] * (1 - f) + stops[i + 1][c] * f);
}

static int cmp_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static int write_png(const char *dir, const char *stem, const char *suffix, const uint8_t *rgb, int w, int h)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s_%s.png", dir, stem, suffix);
    if (!stbi_write_png(path, w, h, 3, rgb, w * 3)) {
        fprintf(stderr, "depth_seg: cannot write %s\n", path);
        return 1;
    }
    printf("  wrote %s\n", path);
    return 0;
}

/* The file name without directories and extension. */
static void stem_of(const char *path, char *stem, size_t n)
{
    const char *s = strrchr(path, '/');
    s = s ? s + 1 : path;
    snprintf(stem, n, "%s", s);
    char *dot = strrchr(stem, '.');
    if (dot && dot != stem) *dot = 0;
}

/* Backbone or head, by node name: vkg.depth_seg names every head node depth* or seg* (depth_head.*,
 * seg_head.*, depth.squeeze, seg_logits.resize); the rest is the backbone. */
static int is_head(const char *node) { return !strncmp(node, "depth", 5) || !strncmp(node, "seg", 3); }

int main(int argc, char **argv)
{
    const char *image = VKG_SAMPLE_DIR "/images/scene_0.png", *model_path = VKG_SAMPLE_DIR "/depth_seg_mini.vkg";
    const char *out_dir = "depth_seg_out";
    int runs = 5;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--model") && i + 1 < argc) model_path = argv[++i];
        else if (!strcmp(argv[i], "--out") && i + 1 < argc) out_dir = argv[++i];
        else if (!strcmp(argv[i], "--runs") && i + 1 < argc) runs = atoi(argv[++i]);
        else if (argv[i][0] != '-') image = argv[i];
        else {
            fprintf(stderr, "usage: depth_seg [IMAGE.png|.jpg] [--model FILE.vkg] [--out DIR] [--runs N]\n");
            return 2;
        }
    }
    if (runs < 1 || runs > 10000) {
        fprintf(stderr, "depth_seg: --runs must be 1..10000\n");
        return 2;
    }
    if (mkdir(out_dir, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "depth_seg: cannot create %s: %s\n", out_dir, strerror(errno));
        return 1;
    }

    double t0 = now_ms();
    int iw, ih, ic;
    uint8_t *rgb = stbi_load(image, &iw, &ih, &ic, 3);
    if (!rgb) {
        fprintf(stderr, "depth_seg: cannot read %s: %s (PNG or JPEG expected)\n", image, stbi_failure_reason());
        return 1;
    }
    double t_decode = now_ms() - t0;

    vkg_context_desc cd = {0};
    vkg_context *ctx = NULL;
    vkg_status st = vkg_context_create(&cd, &ctx);
    if (st != VKG_SUCCESS) {
        stbi_image_free(rgb);
        return fail("creating the Vulkan context", st);
    }
    int rc = 1;
    vkg_model *model = NULL;
    vkg_session *sess = NULL;
    float *input = NULL, *depth = NULL, *logits = NULL, *ts = NULL;
    uint8_t *pic = NULL, *labels = NULL;

    st = vkg_model_load(ctx, model_path, &model);
    if (st != VKG_SUCCESS) {
        fail(model_path, st);
        goto done;
    }
    vkg_dim_binding dim = {"batch", 1};
    vkg_session_desc sd = {.dims = &dim, .n_dims = 1, .profile = 1};
    if ((st = vkg_session_create(model, &sd, &sess)) != VKG_SUCCESS) {
        fail("creating the session", st);
        goto done;
    }
    vkg_tensor_info ti, di, li;
    if ((st = vkg_session_tensor(sess, "image", &ti)) != VKG_SUCCESS ||
        (st = vkg_session_tensor(sess, "depth", &di)) != VKG_SUCCESS ||
        (st = vkg_session_tensor(sess, "seg_logits", &li)) != VKG_SUCCESS) {
        fail("the model needs an input image and outputs depth and seg_logits", st);
        goto done;
    }
    if (ti.rank != 4 || ti.dims[1] != 3 || di.rank != 3 || li.rank != 4 || li.dims[2] != ti.dims[2] ||
        li.dims[3] != ti.dims[3] || di.dims[1] != ti.dims[2] || di.dims[2] != ti.dims[3]) {
        fprintf(stderr, "depth_seg: %s: expected image (1, 3, H, W), depth (1, H, W), seg_logits (1, C, H, W)\n",
                model_path);
        goto done;
    }
    int H = (int)ti.dims[2], W = (int)ti.dims[3], C = (int)li.dims[1];
    const char *desc = vkg_model_metadata(model, "description");
    const char *classes = vkg_model_metadata(model, "seg.classes");
    printf("%s: %dx%d RGB\n%s on %s\n  %s\n", image, iw, ih, model_path, vkg_context_device_info(ctx)->name,
           desc ? desc : "");

    size_t nin = (size_t)3 * H * W, nd = (size_t)H * W, nl = (size_t)C * H * W;
    input = malloc(nin * sizeof(float));
    depth = malloc(nd * sizeof(float));
    logits = malloc(nl * sizeof(float));
    labels = malloc(nd);
    pic = malloc((size_t)iw * ih * 3);
    ts = malloc((size_t)runs * 7 * sizeof(float));
    if (!input || !depth || !logits || !labels || !pic || !ts) {
        fprintf(stderr, "depth_seg: out of host memory\n");
        goto done;
    }

    /* Per-stage times of each run (ms): pre-process, upload, backbone (GPU), heads (GPU), run
     * (wall, submit to done), download, post-process; the median over the runs is printed. */
    for (int r = 0; r < runs + 1; r++) { /* run 0 warms up (pipelines compile on first use) */
        double a = now_ms();
        preprocess(rgb, ih, iw, input, H, W);
        double b = now_ms();
        if ((st = vkg_session_set_input(sess, "image", input, nin * sizeof(float))) != VKG_SUCCESS) {
            fail("uploading the image", st);
            goto done;
        }
        double c = now_ms();
        if ((st = vkg_session_run(sess)) != VKG_SUCCESS) {
            fail("run", st);
            goto done;
        }
        double d = now_ms();
        if ((st = vkg_session_get_output(sess, "depth", depth, nd * sizeof(float))) != VKG_SUCCESS ||
            (st = vkg_session_get_output(sess, "seg_logits", logits, nl * sizeof(float))) != VKG_SUCCESS) {
            fail("downloading the outputs", st);
            goto done;
        }
        double e = now_ms();
        double gpu[2] = {0, 0};
        for (uint32_t i = 0; i < vkg_session_dispatch_count(sess); i++) {
            const char *node, *op;
            double ns;
            if (vkg_session_profile(sess, i, &node, &op, &ns) == VKG_SUCCESS) gpu[is_head(node)] += ns * 1e-6;
        }
        /* labels: argmax over classes, ties to the lower class */
        for (size_t p = 0; p < nd; p++) {
            int best = 0;
            for (int k = 1; k < C; k++)
                if (logits[(size_t)k * nd + p] > logits[(size_t)best * nd + p]) best = k;
            labels[p] = (uint8_t)best;
        }
        double f = now_ms();
        if (r > 0) {
            float *row = ts + (size_t)(r - 1) * 7;
            row[0] = (float)(b - a), row[1] = (float)(c - b), row[2] = (float)gpu[0], row[3] = (float)gpu[1];
            row[4] = (float)(d - c), row[5] = (float)(e - d), row[6] = (float)(f - e);
        }
    }

    /* The depth output is inverse depth (larger = nearer; 0 = sky). Colours span its 2nd to 98th
     * percentile so a few extreme pixels do not wash out the picture. */
    float *sorted = malloc(nd * sizeof(float));
    if (!sorted) goto done;
    memcpy(sorted, depth, nd * sizeof(float));
    qsort(sorted, nd, sizeof(float), cmp_float);
    float lo = sorted[nd * 2 / 100], hi = sorted[nd * 98 / 100];
    free(sorted);
    if (!(hi > lo)) hi = lo + 1e-6f;

    char stem[256];
    stem_of(image, stem, sizeof stem);
    printf("\nPictures (%dx%d, the image's size):\n", iw, ih);
    for (int y = 0; y < ih; y++)
        for (int x = 0; x < iw; x++)
            ramp((sample_bilinear(depth, H, W, ih, iw, y, x) - lo) / (hi - lo), pic + ((size_t)y * iw + x) * 3);
    if (write_png(out_dir, stem, "depth", pic, iw, ih)) goto done;
    /* Segmentation: nearest label per image pixel, blended 55/45 over the image. */
    for (int y = 0; y < ih; y++)
        for (int x = 0; x < iw; x++) {
            int sy = (int)(((double)y + 0.5) * H / ih), sx = (int)(((double)x + 0.5) * W / iw);
            const uint8_t *col = PALETTE[labels[sy * W + sx] % 8];
            for (int c = 0; c < 3; c++) {
                size_t o = ((size_t)y * iw + x) * 3 + c;
                pic[o] = (uint8_t)lrint(0.55 * col[c] + 0.45 * rgb[o]);
            }
        }
    if (write_png(out_dir, stem, "seg", pic, iw, ih)) goto done;

    printf("\nClasses (share of the image's pixels):\n");
    for (int k = 0; k < C; k++) {
        size_t n = 0;
        for (size_t p = 0; p < nd; p++) n += labels[p] == k;
        char name[64] = {0};
        if (classes) { /* "sky,ground,..." */
            const char *s = classes;
            for (int j = 0; j < k && s; j++) {
                s = strchr(s, ',');
                if (s) s++;
            }
            if (s) {
                size_t len = strcspn(s, ",");
                snprintf(name, sizeof name, "%.*s", (int)(len < 63 ? len : 63), s);
            }
        }
        if (!name[0]) snprintf(name, sizeof name, "class %d", k);
        const uint8_t *col = PALETTE[k % 8];
        printf("  %-10s rgb(%3d,%3d,%3d)  %5.1f%%\n", name, col[0], col[1], col[2], 100.0 * (double)n / (double)nd);
    }

    static const char *stage[7] = {"pre-process (resize, normalize)", "upload", "backbone (GPU)", "heads (GPU)",
                                   "run (submit to done)", "download", "post-process (argmax)"};
    printf("\nTimings, median of %d runs after a warm-up (image decode %.1f ms once):\n", runs, t_decode);
    for (int s = 0; s < 7; s++) {
        float *col = malloc((size_t)runs * sizeof(float));
        if (!col) goto done;
        for (int r = 0; r < runs; r++) col[r] = ts[(size_t)r * 7 + s];
        qsort(col, (size_t)runs, sizeof(float), cmp_float);
        printf("  %-32s %9.2f ms\n", stage[s], col[runs / 2]);
        free(col);
    }
    rc = 0;

done:
    free(input);
    free(depth);
    free(logits);
    free(labels);
    free(pic);
    free(ts);
    stbi_image_free(rgb);
    vkg_session_destroy(sess);
    vkg_model_destroy(model);
    vkg_context_destroy(ctx);
    return rc;
}
