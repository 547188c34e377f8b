/* Embedding (issue 10 points 1-2): application VkBuffers bound as graph inputs and outputs (zero
 * copy), a session recorded into the application's own command buffer, asynchronous submits with
 * the application's semaphores and vkg's timeline semaphore or fence, and every misuse refused with
 * its own message. Only the public API and Vulkan are used, as an application would.
 * `test_embed NAME`; ctest runs each under the validation layer with synchronization validation. */
#include <pthread.h>
#include <stdbool.h>

#include "harness.h"
#include "ref.h"

enum { B = 4, K = 32, N = 16, FRAMES = 6 };
#define XBYTES ((VkDeviceSize)B * K * 4)
#define YBYTES ((VkDeviceSize)B * N * 4)

typedef struct params {
    float w[N * K], b[N];
} params;

/* x (B, K) -> linear -> h; y = relu(h) (output); g = gelu(h); flat = reshape(g) (output, a view of
 * the intermediate g). */
static void *build(params *p, size_t *size)
{
    h_fill(p->w, N * K, 11, -0.5f, 0.5f);
    h_fill(p->b, N, 12, -0.2f, 0.2f);
    vkg_writer *w;
    if (vkg_writer_create(&w) != VKG_SUCCESS) exit(1);
    vkg_writer_tensor tx = {.name = "x", .role = VKG_ROLE_INPUT, .rank = 2, .dims = {B, K}};
    vkg_writer_tensor tw = {.name = "fc.weight", .role = VKG_ROLE_CONSTANT, .rank = 2, .dims = {N, K},
                            .data = p->w, .data_size = sizeof p->w};
    vkg_writer_tensor tb = {.name = "fc.bias", .role = VKG_ROLE_CONSTANT, .rank = 1, .dims = {N},
                            .data = p->b, .data_size = sizeof p->b};
    vkg_writer_tensor th = {.name = "h", .role = VKG_ROLE_INTERMEDIATE, .rank = 2, .dims = {B, N}};
    vkg_writer_tensor ty = {.name = "y", .role = VKG_ROLE_OUTPUT, .rank = 2, .dims = {B, N}};
    vkg_writer_tensor tg = {.name = "g", .role = VKG_ROLE_INTERMEDIATE, .rank = 2, .dims = {B, N}};
    vkg_writer_tensor tf = {.name = "flat", .role = VKG_ROLE_OUTPUT, .rank = 2, .dims = {B, N}};
    uint32_t x = 0, wt = 0, bt = 0, h = 0, y = 0, g = 0, f = 0;
    vkg_status st = vkg_writer_add_tensor(w, &tx, &x);
    if (!st) st = vkg_writer_add_tensor(w, &tw, &wt);
    if (!st) st = vkg_writer_add_tensor(w, &tb, &bt);
    if (!st) st = vkg_writer_add_tensor(w, &th, &h);
    if (!st) st = vkg_writer_add_tensor(w, &ty, &y);
    if (!st) st = vkg_writer_add_tensor(w, &tg, &g);
    if (!st) st = vkg_writer_add_tensor(w, &tf, &f);
    uint32_t in[3] = {x, wt, bt};
    int64_t shp[2] = {0, -1};
    vkg_writer_attr shape = {.name = "shape", .type = VKG_ATTR_INTS, .count = 2, .ints = shp};
    if (!st) st = vkg_writer_add_node(w, "linear", "fc", in, 3, &h, 1, NULL, 0);
    if (!st) st = vkg_writer_add_node(w, "relu", "act", &h, 1, &y, 1, NULL, 0);
    if (!st) st = vkg_writer_add_node(w, "gelu", "act2", &h, 1, &g, 1, NULL, 0);
    if (!st) st = vkg_writer_add_node(w, "reshape", "flatten", &g, 1, &f, 1, &shape, 1);
    if (!st) st = vkg_writer_add_input(w, x);
    if (!st) st = vkg_writer_add_output(w, y);
    if (!st) st = vkg_writer_add_output(w, f);
    return h_writer_finish(w, st, size);
}

static void reference(const params *p, const float *x, float *y, float *flat)
{
    for (int r = 0; r < B; r++)
        for (int n = 0; n < N; n++) {
            double acc = p->b[n];
            for (int k = 0; k < K; k++) acc += (double)x[r * K + k] * p->w[n * K + k];
            y[r * N + n] = (float)(acc > 0 ? acc : 0);
            flat[r * N + n] = (float)ref_gelu((double)(float)acc);
        }
}

/* ---- the "application": its own buffers, command pool, semaphores on the context's device ---- */

typedef struct app {
    vkg_vulkan_handles vk;
    VkCommandPool pool;
    VkFence fence;
} app;

typedef struct abuf {
    VkBuffer buf;
    VkDeviceMemory mem;
    void *map;
} abuf;

static int app_init(app *a, vkg_context *ctx)
{
    memset(a, 0, sizeof *a);
    OK(vkg_context_vulkan(ctx, &a->vk));
    VkCommandPoolCreateInfo pci = {.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
                                   .flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT,
                                   .queueFamilyIndex = a->vk.queue_family_index};
    VkFenceCreateInfo fci = {.sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
    if (vkCreateCommandPool(a->vk.device, &pci, NULL, &a->pool) != VK_SUCCESS ||
        vkCreateFence(a->vk.device, &fci, NULL, &a->fence) != VK_SUCCESS) {
        fprintf(stderr, "FAIL: app command pool / fence\n");
        return 1;
    }
    return 0;
}

static void app_free(app *a)
{
    vkDestroyFence(a->vk.device, a->fence, NULL);
    vkDestroyCommandPool(a->vk.device, a->pool, NULL);
}

/* host: host-visible, coherent and mapped (staging, readback); else device-local if there is such. */
static int abuf_create(const app *a, VkDeviceSize size, VkBufferUsageFlags usage, bool host, abuf *out)
{
    memset(out, 0, sizeof *out);
    VkBufferCreateInfo bci = {.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, .size = size, .usage = usage,
                              .sharingMode = VK_SHARING_MODE_EXCLUSIVE};
    if (vkCreateBuffer(a->vk.device, &bci, NULL, &out->buf) != VK_SUCCESS) return 1;
    VkMemoryRequirements req;
    vkGetBufferMemoryRequirements(a->vk.device, out->buf, &req);
    VkPhysicalDeviceMemoryProperties mp;
    vkGetPhysicalDeviceMemoryProperties(a->vk.physical_device, &mp);
    VkMemoryPropertyFlags want = host ? VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT
                                      : VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT;
    int type = -1;
    for (uint32_t t = 0; t < mp.memoryTypeCount && type < 0; t++)
        if ((req.memoryTypeBits & (1u << t)) && (mp.memoryTypes[t].propertyFlags & want) == want) type = (int)t;
    for (uint32_t t = 0; t < mp.memoryTypeCount && type < 0; t++)
        if (req.memoryTypeBits & (1u << t)) type = (int)t;
    VkMemoryAllocateInfo mai = {.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO, .allocationSize = req.size,
                                .memoryTypeIndex = (uint32_t)type};
    if (vkAllocateMemory(a->vk.device, &mai, NULL, &out->mem) != VK_SUCCESS ||
        vkBindBufferMemory(a->vk.device, out->buf, out->mem, 0) != VK_SUCCESS)
        return 1;
    if (host && vkMapMemory(a->vk.device, out->mem, 0, VK_WHOLE_SIZE, 0, &out->map) != VK_SUCCESS) return 1;
    return 0;
}

static void abuf_free(const app *a, abuf *b)
{
    if (b->buf) vkDestroyBuffer(a->vk.device, b->buf, NULL);
    if (b->mem) vkFreeMemory(a->vk.device, b->mem, NULL);
    memset(b, 0, sizeof *b);
}

static VkCommandBuffer cb_begin(const app *a)
{
    VkCommandBufferAllocateInfo ai = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO, .commandPool = a->pool,
                                      .level = VK_COMMAND_BUFFER_LEVEL_PRIMARY, .commandBufferCount = 1};
    VkCommandBuffer cb = VK_NULL_HANDLE;
    VkCommandBufferBeginInfo bi = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
                                   .flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT};
    if (vkAllocateCommandBuffers(a->vk.device, &ai, &cb) != VK_SUCCESS || vkBeginCommandBuffer(cb, &bi) != VK_SUCCESS) {
        fprintf(stderr, "FAIL: app command buffer\n");
        exit(1);
    }
    return cb;
}

/* Ends cb, submits it (optionally after a semaphore, with a timeline value), waits, frees it. */
static int cb_submit_wait(const app *a, VkCommandBuffer cb, VkSemaphore wait, uint64_t wait_value)
{
    VkPipelineStageFlags stage = VK_PIPELINE_STAGE_TRANSFER_BIT;
    VkTimelineSemaphoreSubmitInfo ts = {.sType = VK_STRUCTURE_TYPE_TIMELINE_SEMAPHORE_SUBMIT_INFO,
                                        .waitSemaphoreValueCount = 1, .pWaitSemaphoreValues = &wait_value};
    VkSubmitInfo si = {.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO, .pNext = wait_value ? &ts : NULL,
                       .waitSemaphoreCount = wait ? 1 : 0, .pWaitSemaphores = &wait, .pWaitDstStageMask = &stage,
                       .commandBufferCount = 1, .pCommandBuffers = &cb};
    int rc = vkEndCommandBuffer(cb) != VK_SUCCESS || vkQueueSubmit(a->vk.queue, 1, &si, a->fence) != VK_SUCCESS ||
             vkWaitForFences(a->vk.device, 1, &a->fence, VK_TRUE, UINT64_MAX) != VK_SUCCESS ||
             vkResetFences(a->vk.device, 1, &a->fence) != VK_SUCCESS;
    vkFreeCommandBuffers(a->vk.device, a->pool, 1, &cb);
    if (rc) fprintf(stderr, "FAIL: app submit\n");
    return rc;
}

static void barrier(VkCommandBuffer cb, VkPipelineStageFlags src, VkAccessFlags src_access, VkPipelineStageFlags dst,
                    VkAccessFlags dst_access)
{
    VkMemoryBarrier mb = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER, .srcAccessMask = src_access,
                          .dstAccessMask = dst_access};
    vkCmdPipelineBarrier(cb, src, dst, 0, 1, &mb, 0, NULL, 0, NULL);
}

static void copy(VkCommandBuffer cb, VkBuffer src, VkDeviceSize so, VkBuffer dst, VkDeviceSize d, VkDeviceSize size)
{
    VkBufferCopy region = {so, d, size};
    vkCmdCopyBuffer(cb, src, dst, 1, &region);
}

static VkSemaphore semaphore(const app *a, bool timeline)
{
    VkSemaphoreTypeCreateInfo type = {.sType = VK_STRUCTURE_TYPE_SEMAPHORE_TYPE_CREATE_INFO,
                                      .semaphoreType = VK_SEMAPHORE_TYPE_TIMELINE};
    VkSemaphoreCreateInfo ci = {.sType = VK_STRUCTURE_TYPE_SEMAPHORE_CREATE_INFO, .pNext = timeline ? &type : NULL};
    VkSemaphore s = VK_NULL_HANDLE;
    if (vkCreateSemaphore(a->vk.device, &ci, NULL, &s) != VK_SUCCESS) {
        fprintf(stderr, "FAIL: semaphore\n");
        exit(1);
    }
    return s;
}

static VkDeviceSize bind_alignment(const vkg_context *ctx)
{
    const vkg_device_info *d = vkg_context_device_info(ctx);
    VkDeviceSize a = 64;
    if (d->min_storage_offset_alignment > a) a = d->min_storage_offset_alignment;
    if (d->min_texel_offset_alignment > a) a = d->min_texel_offset_alignment;
    return a;
}

/* The test graph, built in memory (build) and loaded; exits on failure. */
static vkg_model *load_model(vkg_context *ctx, params *p)
{
    size_t size;
    void *bytes = build(p, &size);
    vkg_model *m = NULL;
    vkg_status st = vkg_model_load_memory(ctx, bytes, size, &m);
    free(bytes);
    if (st != VKG_SUCCESS) {
        fprintf(stderr, "FAIL: loading the test graph: %s\n", vkg_last_error());
        exit(1);
    }
    return m;
}

static const VkBufferUsageFlags BIND_USAGE = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_UNIFORM_TEXEL_BUFFER_BIT;

/* ---- record: the application's command buffer holds its producer copy, vkg's run and its
 * consumer copy, three frames in one command buffer; inputs and one output zero copy. ---- */
static int test_record(void)
{
    vkg_context *ctx = h_context();
    app a;
    if (app_init(&a, ctx)) return 1;
    params p;
    vkg_model *m = load_model(ctx, &p);
    vkg_session *s;
    OK(vkg_session_create(m, NULL, &s));
    VkDeviceSize al = bind_alignment(ctx);

    abuf xin, yout, stage, readback;
    if (abuf_create(&a, al + XBYTES, BIND_USAGE | VK_BUFFER_USAGE_TRANSFER_DST_BIT, false, &xin) ||
        abuf_create(&a, 2 * al + YBYTES, BIND_USAGE | VK_BUFFER_USAGE_TRANSFER_SRC_BIT, false, &yout) ||
        abuf_create(&a, FRAMES * XBYTES, VK_BUFFER_USAGE_TRANSFER_SRC_BIT, true, &stage) ||
        abuf_create(&a, FRAMES * YBYTES, VK_BUFFER_USAGE_TRANSFER_DST_BIT, true, &readback)) {
        fprintf(stderr, "FAIL: app buffers\n");
        return 1;
    }
    /* Non-zero offsets: the bound ranges start inside the application's buffers. */
    OK(vkg_session_bind_buffer(s, "x", xin.buf, al, XBYTES));
    OK(vkg_session_bind_buffer(s, "y", yout.buf, 2 * al, YBYTES));
    float *x = stage.map;
    for (int f = 0; f < FRAMES; f++) h_fill(x + f * B * K, B * K, 100 + (uint32_t)f, -2, 2);

    VkCommandBuffer cb = cb_begin(&a);
    for (int f = 0; f < FRAMES; f++) {
        /* The previous frame's vkg run read xin: finish before the copy overwrites it. */
        barrier(cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, 0, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT);
        copy(cb, stage.buf, (VkDeviceSize)f * XBYTES, xin.buf, al, XBYTES);
        /* The contract before vkg: input writes visible to COMPUTE_SHADER reads; the previous frame's
         * copy-out of yout (a transfer read) done before vkg writes it. */
        barrier(cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT,
                VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT);
        OK(vkg_session_record(s, cb));
        /* After vkg: outputs written at COMPUTE_SHADER/SHADER_WRITE, made visible to our consumer. */
        barrier(cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT, VK_PIPELINE_STAGE_TRANSFER_BIT,
                VK_ACCESS_TRANSFER_READ_BIT);
        copy(cb, yout.buf, 2 * al, readback.buf, (VkDeviceSize)f * YBYTES, YBYTES);
    }
    barrier(cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT, VK_PIPELINE_STAGE_HOST_BIT,
            VK_ACCESS_HOST_READ_BIT);
    if (cb_submit_wait(&a, cb, VK_NULL_HANDLE, 0)) return 1;

    float want_y[B * N], want_f[B * N], got[B * N];
    for (int f = 0; f < FRAMES; f++) {
        reference(&p, x + f * B * K, want_y, want_f);
        char what[64];
        snprintf(what, sizeof what, "recorded frame %d, y (zero copy)", f);
        h_compare(what, (float *)readback.map + f * B * N, want_y, NULL, B * N, 1e-5, 1e-5);
    }
    /* "flat" stayed vkg's: get_output after the application's command buffer completed. */
    OK(vkg_session_get_output(s, "flat", got, sizeof got));
    h_compare("recorded run, flat (vkg's buffer) after the last frame", got, want_f, NULL, B * N, 1e-5, 1e-5);
    CHECK(vkg_session_get_output(s, "y", got, sizeof got) == VKG_ERROR_INVALID_ARGUMENT &&
              strstr(vkg_last_error(), "\"y\" is bound to an application buffer"),
          "get_output of a bound output: %s", vkg_last_error());

    /* The same bindings through vkg_session_run: the input is still in xin from the last frame. */
    memset(readback.map, 0, FRAMES * YBYTES);
    OK(vkg_session_run(s));
    cb = cb_begin(&a);
    copy(cb, yout.buf, 2 * al, readback.buf, 0, YBYTES);
    barrier(cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT, VK_PIPELINE_STAGE_HOST_BIT,
            VK_ACCESS_HOST_READ_BIT);
    if (cb_submit_wait(&a, cb, VK_NULL_HANDLE, 0)) return 1;
    h_compare("vkg_session_run on bound buffers", readback.map, want_y, NULL, B * N, 1e-5, 1e-5);

    /* Unbinding gives the tensors vkg's memory back: set_input/get_output work again. */
    OK(vkg_session_bind_buffer(s, "x", VK_NULL_HANDLE, 0, 0));
    OK(vkg_session_bind_buffer(s, "y", VK_NULL_HANDLE, 0, 0));
    OK(vkg_session_set_input(s, "x", x, XBYTES));
    OK(vkg_session_run(s));
    OK(vkg_session_get_output(s, "y", got, sizeof got));
    reference(&p, x, want_y, want_f);
    h_compare("unbound again, y", got, want_y, NULL, B * N, 1e-5, 1e-5);

    /* The output that is a view of an intermediate binds that intermediate's memory. */
    OK(vkg_session_bind_buffer(s, "flat", yout.buf, 0, YBYTES));
    OK(vkg_session_run(s));
    cb = cb_begin(&a);
    copy(cb, yout.buf, 0, readback.buf, 0, YBYTES);
    barrier(cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT, VK_PIPELINE_STAGE_HOST_BIT,
            VK_ACCESS_HOST_READ_BIT);
    if (cb_submit_wait(&a, cb, VK_NULL_HANDLE, 0)) return 1;
    h_compare("flat (a view) bound zero copy", readback.map, want_f, NULL, B * N, 1e-5, 1e-5);

    vkg_session_destroy(s);
    vkg_model_destroy(m);
    abuf_free(&a, &xin);
    abuf_free(&a, &yout);
    abuf_free(&a, &stage);
    abuf_free(&a, &readback);
    app_free(&a);
    return h_finish(ctx, "record");
}

/* ---- submit: pending states, app semaphores, vkg's completion on the GPU and the host, double
 * buffering with two sessions. Run twice by ctest: timeline, and VKG_DISABLE_TIMELINE=1 (fence). ---- */
static int test_submit(void)
{
    vkg_context *ctx = h_context();
    app a;
    if (app_init(&a, ctx)) return 1;
    bool have_timeline = vkg_context_device_info(ctx)->timeline_semaphore != 0;
    const char *dis = getenv("VKG_DISABLE_TIMELINE");
    bool forced_fence = dis && *dis && strcmp(dis, "0") != 0;
    params p;
    vkg_model *m = load_model(ctx, &p);
    vkg_session *s[2];
    abuf yout[2], readback;
    VkSemaphore done[2];
    for (int i = 0; i < 2; i++) {
        OK(vkg_session_create(m, NULL, &s[i]));
        bool tl = vkg_session_timeline(s[i]) != VK_NULL_HANDLE;
        CHECK(tl == (have_timeline && !forced_fence), "timeline semaphore iff the device has them (and not forced off)");
        CHECK((vkg_session_fence(s[i]) != VK_NULL_HANDLE) == !tl, "a fence exactly without a timeline");
        CHECK(vkg_session_timeline_value(s[i]) == 0, "no submit yet");
        if (abuf_create(&a, YBYTES, BIND_USAGE | VK_BUFFER_USAGE_TRANSFER_SRC_BIT, false, &yout[i])) return 1;
        OK(vkg_session_bind_buffer(s[i], "y", yout[i].buf, 0, YBYTES));
        done[i] = semaphore(&a, false); /* binary: what vkg signals for our consumer without timelines */
    }
    printf("completion through %s\n", vkg_session_timeline(s[0]) ? "a timeline semaphore" : "a fence");
    if (abuf_create(&a, 2 * YBYTES, VK_BUFFER_USAGE_TRANSFER_DST_BIT, true, &readback)) return 1;
    float x[FRAMES][B * K], want_y[B * N], want_f[B * N], got[B * N];
    for (int f = 0; f < FRAMES; f++) h_fill(x[f], B * K, 200 + (uint32_t)f, -2, 2);

    CHECK(vkg_session_wait(s[0], 0) == VKG_SUCCESS, "wait with nothing submitted succeeds");
    if (have_timeline) {
        /* A run held back by the application's timeline semaphore is pending, deterministically. */
        VkSemaphore gate = semaphore(&a, true);
        uint64_t one = 1;
        OK(vkg_session_set_input(s[0], "x", x[0], XBYTES));
        vkg_submit_desc sd = {.wait_semaphores = &gate, .wait_values = &one, .n_wait = 1};
        OK(vkg_session_submit(s[0], &sd));
        CHECK(vkg_session_timeline_value(s[0]) == 1, "first submit: value 1");
        vkg_status st = vkg_session_wait(s[0], 0);
        CHECK(st == VKG_TIMEOUT && strstr(vkg_last_error(), "not completed"), "wait(0) on a pending run: %s: %s",
              vkg_status_name(st), vkg_last_error());
        CHECK(strcmp(vkg_status_name(VKG_TIMEOUT), "VKG_TIMEOUT") == 0, "status name");
        CHECK(vkg_session_wait(s[0], 1000000) == VKG_TIMEOUT, "wait(1 ms) on a run that cannot start");
        st = vkg_session_get_output(s[0], "flat", got, sizeof got);
        CHECK(st == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "not yet waited for"),
              "get_output before wait: %s", vkg_last_error());
        CHECK(vkg_session_submit(s[0], NULL) == VKG_ERROR_INVALID_ARGUMENT &&
                  strstr(vkg_last_error(), "vkg_session_submit: run 1"),
              "second submit while pending: %s", vkg_last_error());
        CHECK(vkg_session_run(s[0]) == VKG_ERROR_INVALID_ARGUMENT, "run while pending");
        CHECK(vkg_session_set_input(s[0], "x", x[0], XBYTES) == VKG_ERROR_INVALID_ARGUMENT, "set_input while pending");
        CHECK(vkg_session_bind_buffer(s[0], "y", VK_NULL_HANDLE, 0, 0) == VKG_ERROR_INVALID_ARGUMENT,
              "bind while pending: %s", vkg_last_error());
        VkSemaphoreSignalInfo si = {.sType = VK_STRUCTURE_TYPE_SEMAPHORE_SIGNAL_INFO, .semaphore = gate, .value = 1};
        CHECK(vkSignalSemaphore(a.vk.device, &si) == VK_SUCCESS, "host signals the gate");
        OK(vkg_session_wait(s[0], UINT64_MAX));
        CHECK(vkg_session_wait(s[0], 0) == VKG_SUCCESS, "waiting again is a no-op");
        OK(vkg_session_get_output(s[0], "flat", got, sizeof got));
        reference(&p, x[0], want_y, want_f);
        h_compare("gated run, flat", got, want_f, NULL, B * N, 1e-5, 1e-5);
        vkDestroySemaphore(a.vk.device, gate, NULL);
    } else {
        uint64_t one = 1;
        VkSemaphore gate = semaphore(&a, false);
        vkg_submit_desc sd = {.wait_semaphores = &gate, .wait_values = &one, .n_wait = 1};
        CHECK(vkg_session_submit(s[0], &sd) == VKG_ERROR_UNSUPPORTED && strstr(vkg_last_error(), "wait_values"),
              "timeline values without timeline semaphores: %s", vkg_last_error());
        vkDestroySemaphore(a.vk.device, gate, NULL);
    }
    vkg_submit_desc bad = {.n_wait = 1};
    CHECK(vkg_session_submit(s[0], &bad) == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "wait_semaphores"),
          "n_wait without semaphores: %s", vkg_last_error());
    CHECK(vkg_session_wait(NULL, 0) == VKG_ERROR_INVALID_ARGUMENT, "NULL session");

    /* Double buffering: frame f is submitted before the application consumes frame f - 1. The
     * consumer's copy waits on the GPU for vkg's completion: the session's timeline value, or the
     * binary semaphore vkg signals. The host then waits for vkg (a no-op by then) and reads "flat". */
    uint64_t base[2] = {vkg_session_timeline_value(s[0]), vkg_session_timeline_value(s[1])};
    for (int f = 0; f <= FRAMES; f++) {
        if (f < FRAMES) {
            int i = f % 2;
            OK(vkg_session_set_input(s[i], "x", x[f], XBYTES));
            vkg_submit_desc sd = {0};
            if (!vkg_session_timeline(s[i])) {
                sd.signal_semaphores = &done[i];
                sd.n_signal = 1;
            }
            OK(vkg_session_submit(s[i], &sd));
            CHECK(vkg_session_timeline_value(s[i]) == base[i] + (uint64_t)(f / 2) + 1, "one value per submit");
        }
        if (f == 0) continue;
        int j = (f - 1) % 2;
        VkCommandBuffer cb = cb_begin(&a);
        copy(cb, yout[j].buf, 0, readback.buf, (VkDeviceSize)j * YBYTES, YBYTES);
        barrier(cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT, VK_PIPELINE_STAGE_HOST_BIT,
                VK_ACCESS_HOST_READ_BIT);
        VkSemaphore tl = vkg_session_timeline(s[j]);
        if (cb_submit_wait(&a, cb, tl ? tl : done[j], tl ? vkg_session_timeline_value(s[j]) : 0)) return 1;
        OK(vkg_session_wait(s[j], UINT64_MAX));
        OK(vkg_session_get_output(s[j], "flat", got, sizeof got));
        reference(&p, x[f - 1], want_y, want_f);
        char what[64];
        snprintf(what, sizeof what, "double-buffered frame %d, y (zero copy)", f - 1);
        h_compare(what, (float *)readback.map + j * B * N, want_y, NULL, B * N, 1e-5, 1e-5);
        snprintf(what, sizeof what, "double-buffered frame %d, flat", f - 1);
        h_compare(what, got, want_f, NULL, B * N, 1e-5, 1e-5);
    }
    if (vkg_session_timeline(s[0])) {
        uint64_t v = 0;
        CHECK(vkGetSemaphoreCounterValue(a.vk.device, vkg_session_timeline(s[0]), &v) == VK_SUCCESS &&
                  v == vkg_session_timeline_value(s[0]),
              "the timeline reached %llu (expected %llu)", (unsigned long long)v,
              (unsigned long long)vkg_session_timeline_value(s[0]));
    }
    /* Destroying a session with a submitted run waits for it. */
    OK(vkg_session_submit(s[1], NULL));
    for (int i = 0; i < 2; i++) {
        vkg_session_destroy(s[i]);
        abuf_free(&a, &yout[i]);
        vkDestroySemaphore(a.vk.device, done[i], NULL);
    }
    abuf_free(&a, &readback);
    vkg_model_destroy(m);
    app_free(&a);
    return h_finish(ctx, forced_fence ? "submit (fence)" : "submit");
}

/* ---- bind_errors: every refusal names what is wrong ---- */
static int test_bind_errors(void)
{
    vkg_context *ctx = h_context();
    app a;
    if (app_init(&a, ctx)) return 1;
    params p;
    vkg_model *m = load_model(ctx, &p);
    vkg_session *s;
    OK(vkg_session_create(m, NULL, &s));
    VkDeviceSize al = bind_alignment(ctx);
    abuf buf;
    if (abuf_create(&a, 4 * al + XBYTES, BIND_USAGE, false, &buf)) return 1;
    vkg_status st;

    st = vkg_session_bind_buffer(s, "x", buf.buf, 0, XBYTES - 4);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "input \"x\" holds 512 bytes") &&
              strstr(vkg_last_error(), "got 508"),
          "too small: %s", vkg_last_error());
    st = vkg_session_bind_buffer(s, "x", buf.buf, al / 2, XBYTES);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "is not a multiple of"),
          "misaligned offset: %s", vkg_last_error());
    st = vkg_session_bind_buffer(s, "nope", buf.buf, 0, XBYTES);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "no tensor named \"nope\"") &&
              strstr(vkg_last_error(), "\"x\", \"y\", \"flat\""),
          "unknown tensor: %s", vkg_last_error());
    st = vkg_session_bind_buffer(s, "h", buf.buf, 0, XBYTES);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "\"h\" is an intermediate"),
          "intermediate: %s", vkg_last_error());
    st = vkg_session_bind_buffer(s, "fc.weight", buf.buf, 0, XBYTES);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "\"fc.weight\" is a constant"),
          "constant: %s", vkg_last_error());
    st = vkg_session_bind_buffer(s, NULL, buf.buf, 0, XBYTES);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "tensor is NULL"), "NULL name: %s",
          vkg_last_error());
    st = vkg_session_bind_buffer(NULL, "x", buf.buf, 0, XBYTES);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "session is NULL"), "NULL session");
    st = vkg_session_record(s, VK_NULL_HANDLE);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "command buffer is NULL"), "record NULL: %s",
          vkg_last_error());
    CHECK(vkg_context_vulkan(ctx, NULL) == VKG_ERROR_INVALID_ARGUMENT, "vkg_context_vulkan NULL out");
    /* Refusals leave the session as it was: still runs on its own buffers. */
    float x[B * K], got[B * N], want_y[B * N], want_f[B * N];
    h_fill(x, B * K, 5, -1, 1);
    OK(vkg_session_set_input(s, "x", x, sizeof x));
    OK(vkg_session_run(s));
    OK(vkg_session_get_output(s, "y", got, sizeof got));
    reference(&p, x, want_y, want_f);
    h_compare("after refused bindings", got, want_y, NULL, B * N, 1e-5, 1e-5);
    /* A bound input refuses set_input; a larger range than needed is fine; unbinding twice too. */
    OK(vkg_session_bind_buffer(s, "x", buf.buf, 2 * al, XBYTES + 2 * al));
    st = vkg_session_set_input(s, "x", x, sizeof x);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "input \"x\" is bound to an application buffer"),
          "set_input of a bound input: %s", vkg_last_error());
    OK(vkg_session_bind_buffer(s, "x", VK_NULL_HANDLE, 0, 0));
    OK(vkg_session_bind_buffer(s, "x", VK_NULL_HANDLE, 0, 0));
    OK(vkg_session_set_input(s, "x", x, sizeof x));

    vkg_session_destroy(s);
    vkg_model_destroy(m);
    abuf_free(&a, &buf);
    app_free(&a);
    return h_finish(ctx, "bind_errors");
}

/* ---- adopt: the application's device, told (or not) that timeline semaphores are enabled ---- */
static unsigned adopt_messages;
static VKAPI_ATTR VkBool32 VKAPI_CALL on_message(VkDebugUtilsMessageSeverityFlagBitsEXT sev,
                                                 VkDebugUtilsMessageTypeFlagsEXT type,
                                                 const VkDebugUtilsMessengerCallbackDataEXT *data, void *user)
{
    (void)type;
    (void)user;
    if (!(sev & (VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT)))
        return VK_FALSE;
    adopt_messages++;
    fprintf(stderr, "validation: %s\n", data && data->pMessage ? data->pMessage : "");
    return VK_FALSE;
}

/* ---- a queue shared with the application's own submitting thread, through lock_queue ---- */

typedef struct queue_lock {
    pthread_mutex_t mutex;
    unsigned vkg_locks; /* taken by vkg */
    bool held;
} queue_lock;

static void lock_q(void *user)
{
    queue_lock *l = user;
    pthread_mutex_lock(&l->mutex);
    l->vkg_locks++;
    l->held = true;
}

static void unlock_q(void *user)
{
    queue_lock *l = user;
    l->held = false;
    pthread_mutex_unlock(&l->mutex);
}

typedef struct app_thread {
    app *a;
    queue_lock *lock;
    int submits, failures;
} app_thread;

/* The "render thread": empty command buffers submitted to the same queue under the same lock. */
static void *app_submitter(void *arg)
{
    app_thread *t = arg;
    VkCommandBufferAllocateInfo ai = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO, .commandPool = t->a->pool,
                                      .level = VK_COMMAND_BUFFER_LEVEL_PRIMARY, .commandBufferCount = 1};
    VkCommandBufferBeginInfo bi = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO};
    VkCommandBuffer cb = VK_NULL_HANDLE;
    if (vkAllocateCommandBuffers(t->a->vk.device, &ai, &cb) != VK_SUCCESS || vkBeginCommandBuffer(cb, &bi) != VK_SUCCESS ||
        vkEndCommandBuffer(cb) != VK_SUCCESS)
        t->failures++;
    for (int i = 0; i < t->submits && !t->failures; i++) {
        VkSubmitInfo si = {.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO, .commandBufferCount = 1, .pCommandBuffers = &cb};
        pthread_mutex_lock(&t->lock->mutex);
        VkResult r = vkQueueSubmit(t->a->vk.queue, 1, &si, t->a->fence);
        pthread_mutex_unlock(&t->lock->mutex);
        if (r != VK_SUCCESS || vkWaitForFences(t->a->vk.device, 1, &t->a->fence, VK_TRUE, UINT64_MAX) != VK_SUCCESS ||
            vkResetFences(t->a->vk.device, 1, &t->a->fence) != VK_SUCCESS)
            t->failures++;
    }
    vkFreeCommandBuffers(t->a->vk.device, t->a->pool, 1, &cb);
    return NULL;
}

/* vkg runs while the application submits to the same adopted queue from another thread; the
 * validation layer's thread checks report any unsynchronized vkQueueSubmit. */
static int shared_queue_runs(app *a, vkg_session *s, queue_lock *lock)
{
    app_thread t = {a, lock, 200, 0};
    pthread_t tid;
    CHECK(pthread_create(&tid, NULL, app_submitter, &t) == 0, "pthread_create");
    unsigned before = lock->vkg_locks;
    for (int i = 0; i < 100; i++) OK(vkg_session_run(s));
    pthread_join(tid, NULL);
    CHECK(t.failures == 0, "the application's submissions failed %d time(s)", t.failures);
    CHECK(lock->vkg_locks - before == 100, "vkg took the application's queue lock once per run (%u times)",
          lock->vkg_locks - before);
    return 0;
}

static int adopt_run(vkg_context_desc *cd, bool timeline)
{
    vkg_context *ctx;
    OK(vkg_context_create(cd, &ctx));
    CHECK((vkg_context_device_info(ctx)->timeline_semaphore != 0) == timeline, "timeline_semaphore follows the bit");
    vkg_vulkan_handles vk;
    OK(vkg_context_vulkan(ctx, &vk));
    CHECK(vk.device == cd->external.device && vk.queue == cd->external.queue &&
              vk.queue_family_index == cd->external.queue_family_index && vk.instance == cd->external.instance,
          "vkg_context_vulkan gives back the adopted handles");
    app a;
    if (app_init(&a, ctx)) return 1;
    params p;
    vkg_model *m = load_model(ctx, &p);
    vkg_session *s;
    OK(vkg_session_create(m, NULL, &s));
    CHECK((vkg_session_timeline(s) != VK_NULL_HANDLE) == timeline, "completion object follows the bit");
    float x[B * K], got[B * N], want_y[B * N], want_f[B * N];
    h_fill(x, B * K, 9, -1, 1);
    reference(&p, x, want_y, want_f);
    OK(vkg_session_set_input(s, "x", x, sizeof x));
    OK(vkg_session_submit(s, NULL));
    OK(vkg_session_wait(s, UINT64_MAX));
    OK(vkg_session_get_output(s, "y", got, sizeof got));
    h_compare(timeline ? "adopted, timeline: y" : "adopted, fence: y", got, want_y, NULL, B * N, 1e-5, 1e-5);
    if (cd->external.lock_queue) {
        if (shared_queue_runs(&a, s, cd->external.queue_lock_user)) return 1;
        OK(vkg_session_get_output(s, "y", got, sizeof got));
        h_compare("adopted, queue shared with another thread: y", got, want_y, NULL, B * N, 1e-5, 1e-5);
    }
    if (!timeline) {
        uint64_t v = 1;
        VkSemaphore sem = semaphore(&a, false);
        vkg_submit_desc sd = {.signal_semaphores = &sem, .signal_values = &v, .n_signal = 1};
        vkg_status st = vkg_session_submit(s, &sd);
        CHECK(st == VKG_ERROR_UNSUPPORTED && strstr(vkg_last_error(), "VKG_FEATURE_TIMELINE_SEMAPHORE"),
              "signal values without the feature bit: %s", vkg_last_error());
        vkDestroySemaphore(a.vk.device, sem, NULL);
    }
    /* Recorded into our command buffer, vkg's own input and output buffers. */
    memset(got, 0, sizeof got);
    VkCommandBuffer cb = cb_begin(&a);
    OK(vkg_session_record(s, cb));
    OK(vkg_session_record(s, cb)); /* twice in a row: vkg's leading barrier orders the second */
    if (cb_submit_wait(&a, cb, VK_NULL_HANDLE, 0)) return 1;
    OK(vkg_session_get_output(s, "flat", got, sizeof got));
    h_compare("adopted, recorded twice: flat", got, want_f, NULL, B * N, 1e-5, 1e-5);
    vkg_session_destroy(s);
    vkg_model_destroy(m);
    app_free(&a);
    vkg_context_destroy(ctx);
    return 0;
}

static int test_adopt(void)
{
    uint32_t loader = VK_API_VERSION_1_1;
    vkEnumerateInstanceVersion(&loader);
    VkApplicationInfo ai = {.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO,
                            .apiVersion = loader >= VK_API_VERSION_1_2 ? VK_API_VERSION_1_2 : VK_API_VERSION_1_1};
    const char *layers[] = {"VK_LAYER_KHRONOS_validation"};
    const char *exts[] = {VK_EXT_DEBUG_UTILS_EXTENSION_NAME};
    VkDebugUtilsMessengerCreateInfoEXT dbg = {
        .sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT,
        .messageSeverity = VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT,
        .messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT |
                       VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT,
        .pfnUserCallback = on_message};
    VkInstanceCreateInfo ici = {.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, .pNext = &dbg, .pApplicationInfo = &ai,
                                .enabledLayerCount = 1, .ppEnabledLayerNames = layers, .enabledExtensionCount = 1,
                                .ppEnabledExtensionNames = exts};
    VkInstance inst;
    if (vkCreateInstance(&ici, NULL, &inst) != VK_SUCCESS) {
        fprintf(stderr, "FAIL: host instance\n");
        return 1;
    }
    PFN_vkCreateDebugUtilsMessengerEXT mk =
        (PFN_vkCreateDebugUtilsMessengerEXT)vkGetInstanceProcAddr(inst, "vkCreateDebugUtilsMessengerEXT");
    VkDebugUtilsMessengerEXT messenger = VK_NULL_HANDLE;
    if (!mk || mk(inst, &dbg, NULL, &messenger) != VK_SUCCESS) {
        fprintf(stderr, "FAIL: messenger\n");
        return 1;
    }
    uint32_t n = 1;
    VkPhysicalDevice pd;
    vkEnumeratePhysicalDevices(inst, &n, &pd);
    CHECK(n == 1, "a physical device");
    VkPhysicalDeviceProperties props;
    vkGetPhysicalDeviceProperties(pd, &props);
    uint32_t nq = 0;
    vkGetPhysicalDeviceQueueFamilyProperties(pd, &nq, NULL);
    VkQueueFamilyProperties qf[16];
    nq = nq > 16 ? 16 : nq;
    vkGetPhysicalDeviceQueueFamilyProperties(pd, &nq, qf);
    uint32_t fam = 0;
    while (fam < nq && !(qf[fam].queueFlags & VK_QUEUE_COMPUTE_BIT)) fam++;
    float prio = 1;
    VkDeviceQueueCreateInfo qci = {.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO, .queueFamilyIndex = fam,
                                   .queueCount = 1, .pQueuePriorities = &prio};
    /* Timeline semaphores through Vulkan 1.2 core where instance and device have it. */
    VkPhysicalDeviceTimelineSemaphoreFeatures tlf = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_TIMELINE_SEMAPHORE_FEATURES};
    VkPhysicalDeviceFeatures2 f2 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, .pNext = &tlf};
    bool core12 = ai.apiVersion >= VK_API_VERSION_1_2 && props.apiVersion >= VK_API_VERSION_1_2;
    if (core12) vkGetPhysicalDeviceFeatures2(pd, &f2);
    bool timeline = core12 && tlf.timelineSemaphore;
    VkDeviceCreateInfo dci = {.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO, .pNext = timeline ? &f2 : NULL,
                              .queueCreateInfoCount = 1, .pQueueCreateInfos = &qci};
    VkDevice dev;
    if (vkCreateDevice(pd, &dci, NULL, &dev) != VK_SUCCESS) {
        fprintf(stderr, "FAIL: host device\n");
        return 1;
    }
    VkQueue q;
    vkGetDeviceQueue(dev, fam, 0, &q);
    printf("adopted device: Vulkan 1.%u instance, timeline semaphores %s\n", VK_API_VERSION_MINOR(ai.apiVersion),
           timeline ? "enabled" : "unavailable");

    vkg_context_desc cd = {.external = {inst, pd, dev, q, fam, 0}};
    if (adopt_run(&cd, false)) return 1; /* the bit not given: a fence, whatever the device has */
    if (timeline) {
        cd.external.enabled_features = VKG_FEATURE_TIMELINE_SEMAPHORE;
        if (adopt_run(&cd, true)) return 1;
    }
    /* The application's queue lock: refused half-given, then used while its thread submits too. */
    queue_lock lock = {.mutex = PTHREAD_MUTEX_INITIALIZER};
    cd.external.lock_queue = lock_q;
    vkg_context *refused = NULL;
    vkg_status st = vkg_context_create(&cd, &refused);
    CHECK(st == VKG_ERROR_INVALID_ARGUMENT && !refused && strstr(vkg_last_error(), "unlock_queue"),
          "lock_queue without unlock_queue is refused: %s", vkg_last_error());
    cd.external.unlock_queue = unlock_q;
    cd.external.queue_lock_user = &lock;
    if (adopt_run(&cd, timeline)) return 1;
    CHECK(vkDeviceWaitIdle(dev) == VK_SUCCESS, "host device alive after vkg_context_destroy");
    vkDestroyDevice(dev, NULL);
    PFN_vkDestroyDebugUtilsMessengerEXT rm =
        (PFN_vkDestroyDebugUtilsMessengerEXT)vkGetInstanceProcAddr(inst, "vkDestroyDebugUtilsMessengerEXT");
    if (rm) rm(inst, messenger, NULL);
    vkDestroyInstance(inst, NULL);
    CHECK(adopt_messages == 0, "%u validation message(s) on the adopted device", adopt_messages);
    return h_finish(NULL, "adopt");
}

int main(int argc, char **argv)
{
    const char *t = argc > 1 ? argv[1] : "";
    if (!strcmp(t, "record")) return test_record();
    if (!strcmp(t, "submit")) return test_submit();
    if (!strcmp(t, "bind_errors")) return test_bind_errors();
    if (!strcmp(t, "adopt")) return test_adopt();
    fprintf(stderr, "usage: test_embed record|submit|bind_errors|adopt\n");
    return 2;
}
