/* Runtime core: device choice, features, memory, barriers, pipeline cache, timestamps, validation
 * capture, adopting a host's device. `test_runtime NAME` runs one group. */
#include <unistd.h>

#include "harness.h"

static int test_context(void)
{
    vkg_context *ctx = h_context();
    const vkg_device_info *d = vkg_context_device_info(ctx);
    CHECK(d->name[0] != '\0', "device has a name");
    CHECK(d->max_storage_buffer_range >= (1u << 27) || !d->is_cpu, "storage range %llu",
          (unsigned long long)d->max_storage_buffer_range);
    CHECK(d->max_workgroup_invocations >= 128, "max invocations %u", d->max_workgroup_invocations);
    CHECK(d->max_push_constants >= 128, "push constants %u", d->max_push_constants);
    CHECK(d->api_version >= VK_API_VERSION_1_1, "api version");
    if (d->subgroup_size) CHECK((d->subgroup_ops & VK_SUBGROUP_FEATURE_BASIC_BIT) != 0, "basic subgroup ops");
    char idx[16], name[64];
    snprintf(idx, sizeof idx, "%u", d->index);
    snprintf(name, sizeof name, "%.20s", d->name);
    vkg_context_destroy(ctx);

    /* Choose by index and by a case-changed name substring. */
    for (int i = 0; i < 2; i++) {
        if (i == 1)
            for (char *p = name; *p; p++) *p = (char)(*p >= 'a' && *p <= 'z' ? *p - 32 : *p);
        vkg_context_desc cd = {.device = i ? name : idx, .validation = 1};
        vkg_context *c2 = NULL;
        OK(vkg_context_create(&cd, &c2));
        vkg_context_destroy(c2);
    }
    /* A device that does not exist: a clear error listing what does. */
    vkg_context_desc bad = {.device = "no-such-gpu-xyz", .validation = 1};
    vkg_context *c3 = NULL;
    vkg_status s = vkg_context_create(&bad, &c3);
    CHECK(s == VKG_ERROR_NO_DEVICE && c3 == NULL, "unknown device gives VKG_ERROR_NO_DEVICE, got %s", vkg_status_name(s));
    CHECK(strstr(vkg_last_error(), "no-such-gpu-xyz") && strstr(vkg_last_error(), "devices:"), "message: %s",
          vkg_last_error());
    /* VKG_DEVICE is honoured when desc.device is NULL. */
    setenv("VKG_DEVICE", "99", 1);
    vkg_context_desc env = {.validation = 1};
    s = vkg_context_create(&env, &c3);
    CHECK(s == VKG_ERROR_NO_DEVICE, "VKG_DEVICE=99 gives VKG_ERROR_NO_DEVICE, got %s", vkg_status_name(s));
    unsetenv("VKG_DEVICE");
    CHECK(vkg_context_create(NULL, NULL) == VKG_ERROR_INVALID_ARGUMENT, "NULL out is refused");
    CHECK(strcmp(vkg_status_name(VKG_ERROR_OUT_OF_DEVICE_MEMORY), "VKG_ERROR_OUT_OF_DEVICE_MEMORY") == 0, "names");
    return h_finish(NULL, "context");
}

static int test_memory(void)
{
    vkg_context_desc cd = {.validation = 1, .block_size = 1 << 20};
    vkg_context *ctx;
    OK(vkg_context_create(&cd, &ctx));
    /* Under VKG_FORCE_STAGING=1 (ctest runtime_memory_staging) every copy goes through a staging
     * buffer and vkCmdCopyBuffer, as on a discrete GPU. */
    bool staging = getenv("VKG_FORCE_STAGING") != NULL;
    /* Many small buffers share one block; offsets respect alignment; contents stay separate. */
    enum { N = 40 };
    vkg_buf *b[N];
    for (int i = 0; i < N; i++) {
        OK(vkg_buf_create(ctx, (VkDeviceSize)(i * 37 + 1), &b[i]));
        CHECK((b[i]->mapped == NULL) == (staging || !vkg_context_device_info(ctx)->unified_memory),
              "mapped only on unified memory without forced staging");
        CHECK(b[i]->offset % vkg_context_device_info(ctx)->min_storage_offset_alignment == 0, "aligned offset");
        uint8_t v[1500];
        memset(v, i, sizeof v);
        OK(vkg_buf_upload(b[i], 0, v, b[i]->size));
    }
    CHECK(vkg_mem_block_bytes(ctx) == (1u << 20), "40 small buffers fit one 1 MiB block (%llu bytes in blocks)",
          (unsigned long long)vkg_mem_block_bytes(ctx));
    for (int i = 0; i < N; i++) {
        uint8_t v[1500];
        OK(vkg_buf_download(b[i], 0, v, b[i]->size));
        int same = 1;
        for (VkDeviceSize k = 0; k < b[i]->size; k++) same &= v[k] == (uint8_t)i;
        CHECK(same, "buffer %d kept its bytes", i);
    }
    for (int i = 0; i < N; i += 2) vkg_buf_destroy(b[i]);
    vkg_buf *again;
    OK(vkg_buf_create(ctx, 30, &again)); /* reuses a freed hole: still one block */
    CHECK(vkg_mem_block_bytes(ctx) == (1u << 20), "freed ranges are reused");
    /* Larger than a block: gets a block of its own; freed, the block goes away. */
    vkg_buf *big;
    OK(vkg_buf_create(ctx, 3u << 20, &big));
    CHECK(vkg_mem_block_bytes(ctx) == (1u << 20) + (3u << 20), "a dedicated block for a large buffer");
    vkg_buf_destroy(big);
    CHECK(vkg_mem_block_bytes(ctx) == (1u << 20), "empty blocks are released");
    /* Out of range copies are refused. */
    uint8_t tmp[8];
    vkg_status s = vkg_buf_upload(again, 24, tmp, 8);
    CHECK(s == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "outside the buffer"), "range check: %s",
          vkg_last_error());
    /* An impossible allocation: VKG_ERROR_OUT_OF_DEVICE_MEMORY naming the size, and no validation noise. */
    vkg_buf *huge = NULL;
    s = vkg_buf_create(ctx, 1ull << 50, &huge);
    CHECK(s == VKG_ERROR_OUT_OF_DEVICE_MEMORY && huge == NULL, "2^50 bytes: got %s", vkg_status_name(s));
    CHECK(strstr(vkg_last_error(), "1125899906842624") != NULL, "message names the size: %s", vkg_last_error());
    vkg_buf_destroy(again);
    for (int i = 1; i < N; i += 2) vkg_buf_destroy(b[i]);
    CHECK(vkg_mem_block_bytes(ctx) == 0, "all blocks released");
    return h_finish(ctx, "memory");
}

/* Barriers appear only between dispatches that depend on each other. */
static int test_barriers(void)
{
    vkg_context *ctx = h_context();
    float x[64];
    h_fill(x, 64, 5, -1, 1);
    vkg_buf *a = h_upload(ctx, x, sizeof x), *b, *c, *d;
    OK(vkg_buf_create(ctx, sizeof x, &b));
    OK(vkg_buf_create(ctx, sizeof x, &c));
    OK(vkg_buf_create(ctx, sizeof x, &d));
    vkg_cmd *cmd;
    OK(vkg_cmd_begin(ctx, false, &cmd));
    OK(vkg_unary(cmd, VKG_ACT_RELU, (vkg_tref){a, 0}, (vkg_tref){b, 0}, 64)); /* a -> b */
    OK(vkg_unary(cmd, VKG_ACT_GELU, (vkg_tref){a, 0}, (vkg_tref){c, 0}, 64)); /* a -> c: independent */
    CHECK(vkg_cmd_barrier_count(cmd) == 0, "independent dispatches: %u barriers", vkg_cmd_barrier_count(cmd));
    uint32_t s64[1] = {64};
    OK(vkg_binary(cmd, VKG_BIN_ADD, (vkg_tref){b, 0}, s64, 1, (vkg_tref){c, 0}, s64, 1, (vkg_tref){d, 0})); /* reads b, c */
    CHECK(vkg_cmd_barrier_count(cmd) == 1, "read after write: %u barriers", vkg_cmd_barrier_count(cmd));
    OK(vkg_unary(cmd, VKG_ACT_RELU, (vkg_tref){a, 0}, (vkg_tref){b, 0}, 64)); /* writes b, which add read */
    CHECK(vkg_cmd_barrier_count(cmd) == 2, "write after read: %u barriers", vkg_cmd_barrier_count(cmd));
    OK(vkg_cmd_submit_wait(cmd));
    float *got = h_download(d, 64), want[64];
    for (int i = 0; i < 64; i++) {
        double g = 0.5 * x[i] * (1.0 + erf(x[i] / sqrt(2.0)));
        want[i] = (float)((x[i] > 0 ? x[i] : 0) + g);
    }
    h_compare("relu(a) + gelu(a) through a barrier", got, want, NULL, 64, 2e-6, 1e-6);
    free(got);
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(a);
    vkg_buf_destroy(b);
    vkg_buf_destroy(c);
    vkg_buf_destroy(d);
    return h_finish(ctx, "barriers");
}

static int test_pipeline_cache(void)
{
    char path[] = "/tmp/vkg_pcache_XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "temp file");
    close(fd);
    unlink(path); /* start absent: a missing cache file is not an error */
    for (int round = 0; round < 2; round++) {
        vkg_context_desc cd = {.validation = 1, .pipeline_cache_path = path};
        vkg_context *ctx;
        OK(vkg_context_create(&cd, &ctx));
        float x[4] = {1, -2, 3, -4};
        vkg_buf *a = h_upload(ctx, x, sizeof x), *b;
        OK(vkg_buf_create(ctx, sizeof x, &b));
        vkg_cmd *cmd;
        OK(vkg_cmd_begin(ctx, false, &cmd));
        OK(vkg_unary(cmd, VKG_ACT_RELU, (vkg_tref){a, 0}, (vkg_tref){b, 0}, 4));
        OK(vkg_cmd_submit_wait(cmd));
        float *got = h_download(b, 4), want[4] = {1, 0, 3, 0};
        h_compare(round ? "relu with the cache loaded" : "relu, cold cache", got, want, NULL, 4, 0, 0);
        free(got);
        vkg_cmd_destroy(cmd);
        vkg_buf_destroy(a);
        vkg_buf_destroy(b);
        CHECK(vkg_context_check_validation(ctx) == VKG_SUCCESS, "validation: %s", vkg_last_error());
        vkg_context_destroy(ctx);
        CHECK(access(path, R_OK) == 0, "cache written to %s", path);
    }
    /* A corrupt cache file is ignored, not trusted. */
    FILE *f = fopen(path, "wb");
    fputs("definitely not a pipeline cache, but long enough to have a header", f);
    fclose(f);
    vkg_context_desc cd = {.validation = 1, .pipeline_cache_path = path};
    vkg_context *ctx;
    OK(vkg_context_create(&cd, &ctx));
    vkg_context_destroy(ctx);
    unlink(path);
    return h_finish(NULL, "pipeline_cache");
}

static int test_timestamps(void)
{
    vkg_context *ctx = h_context();
    if (!vkg_context_device_info(ctx)->timestamps) {
        printf("device has no compute timestamps: profiling unavailable\n");
        vkg_context_destroy(ctx);
        return 77;
    }
    enum { N = 1 << 16 };
    float *x = malloc(N * 4);
    h_fill(x, N, 9, -1, 1);
    vkg_buf *a = h_upload(ctx, x, N * 4), *b;
    OK(vkg_buf_create(ctx, N * 4, &b));
    vkg_cmd *cmd;
    OK(vkg_cmd_begin(ctx, true, &cmd));
    OK(vkg_unary(cmd, VKG_ACT_GELU, (vkg_tref){a, 0}, (vkg_tref){b, 0}, N));
    OK(vkg_unary(cmd, VKG_ACT_RELU, (vkg_tref){b, 0}, (vkg_tref){a, 0}, N));
    double ns;
    CHECK(vkg_cmd_dispatch_time_ns(cmd, 0, &ns, NULL) != VKG_SUCCESS, "no times before a submit");
    OK(vkg_cmd_submit_wait(cmd));
    for (uint32_t i = 0; i < 2; i++) {
        const char *label = NULL;
        OK(vkg_cmd_dispatch_time_ns(cmd, i, &ns, &label));
        CHECK(ns > 0 && ns < 10e9, "dispatch %u took %.0f ns", i, ns);
        CHECK(label && !strcmp(label, i ? "relu" : "gelu"), "label %s", label ? label : "(null)");
    }
    CHECK(vkg_cmd_dispatch_time_ns(cmd, 2, &ns, NULL) == VKG_ERROR_INVALID_ARGUMENT, "index past the end");
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(a);
    vkg_buf_destroy(b);
    free(x);
    return h_finish(ctx, "timestamps");
}

/* A validation message must surface as VKG_ERROR_VALIDATION, not pass silently. */
static int test_validation(void)
{
    vkg_context *ctx = h_context();
    /* Invalid usage on purpose: a buffer of size 0 (VUID-VkBufferCreateInfo-size-00912). */
    VkBufferCreateInfo bci = {.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, .size = 0,
                              .usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT};
    VkBuffer buf = VK_NULL_HANDLE;
    VkResult r = vkCreateBuffer(ctx->device, &bci, NULL, &buf);
    if (r == VK_SUCCESS && buf) vkDestroyBuffer(ctx->device, buf, NULL);
    vkg_status s = vkg_context_check_validation(ctx);
    CHECK(s == VKG_ERROR_VALIDATION, "validation message became an error: %s", vkg_status_name(s));
    CHECK(strstr(vkg_last_error(), "00912") != NULL, "message carries the VUID: %s", vkg_last_error());
    CHECK(vkg_context_check_validation(ctx) == VKG_SUCCESS, "the check resets");
    vkg_context_destroy(ctx); /* not h_finish: this test made its message on purpose */
    return h_finish(NULL, "validation");
}

/* The host owns instance, device and queue; vkg works on them and destroys none of them. */
static int test_adopt(void)
{
    VkApplicationInfo app = {.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO, .apiVersion = VK_API_VERSION_1_1};
    const char *layers[] = {"VK_LAYER_KHRONOS_validation"};
    VkInstanceCreateInfo ici = {.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, .pApplicationInfo = &app,
                                .enabledLayerCount = 1, .ppEnabledLayerNames = layers};
    VkInstance inst;
    if (vkCreateInstance(&ici, NULL, &inst) != VK_SUCCESS) {
        fprintf(stderr, "FAIL: host instance\n");
        return 1;
    }
    uint32_t n = 1;
    VkPhysicalDevice pd;
    vkEnumeratePhysicalDevices(inst, &n, &pd);
    CHECK(n == 1, "a physical device");
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
    VkDeviceCreateInfo dci = {.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO, .queueCreateInfoCount = 1,
                              .pQueueCreateInfos = &qci};
    VkDevice dev;
    if (vkCreateDevice(pd, &dci, NULL, &dev) != VK_SUCCESS) {
        fprintf(stderr, "FAIL: host device\n");
        return 1;
    }
    VkQueue q;
    vkGetDeviceQueue(dev, fam, 0, &q);

    vkg_context_desc cd = {.external = {inst, pd, dev, q, fam, 0}};
    vkg_context *ctx;
    OK(vkg_context_create(&cd, &ctx));
    const vkg_device_info *di = vkg_context_device_info(ctx);
    CHECK(!di->fp16_arithmetic && !di->push_descriptors, "features the host did not enable are off");
    float x[5] = {-1, 2, -3, 4, 0.5f}, want[5] = {0, 2, 0, 4, 0.5f};
    vkg_buf *a = h_upload(ctx, x, sizeof x), *b;
    OK(vkg_buf_create(ctx, sizeof x, &b));
    vkg_cmd *cmd;
    OK(vkg_cmd_begin(ctx, false, &cmd));
    OK(vkg_unary(cmd, VKG_ACT_RELU, (vkg_tref){a, 0}, (vkg_tref){b, 0}, 5));
    OK(vkg_cmd_submit_wait(cmd));
    float *got = h_download(b, 5);
    h_compare("relu on the host's device", got, want, NULL, 5, 0, 0);
    free(got);
    vkg_cmd_destroy(cmd);
    vkg_buf_destroy(a);
    vkg_buf_destroy(b);
    vkg_context_destroy(ctx);
    /* Still ours and still usable: vkg destroyed nothing it did not create. */
    CHECK(vkDeviceWaitIdle(dev) == VK_SUCCESS, "host device alive after vkg_context_destroy");
    vkDestroyDevice(dev, NULL);
    vkDestroyInstance(inst, NULL);

    vkg_context_desc half = {.external = {.device = (VkDevice)(uintptr_t)1}};
    vkg_status s = vkg_context_create(&half, &ctx);
    CHECK(s == VKG_ERROR_INVALID_ARGUMENT && strstr(vkg_last_error(), "external.instance"), "incomplete adoption: %s",
          vkg_last_error());
    return h_finish(NULL, "adopt");
}

int main(int argc, char **argv)
{
    const char *t = argc > 1 ? argv[1] : "";
    if (!strcmp(t, "context")) return test_context();
    if (!strcmp(t, "memory")) return test_memory();
    if (!strcmp(t, "barriers")) return test_barriers();
    if (!strcmp(t, "pipeline_cache")) return test_pipeline_cache();
    if (!strcmp(t, "timestamps")) return test_timestamps();
    if (!strcmp(t, "validation")) return test_validation();
    if (!strcmp(t, "adopt")) return test_adopt();
    fprintf(stderr, "usage: test_runtime context|memory|barriers|pipeline_cache|timestamps|validation|adopt\n");
    return 2;
}
