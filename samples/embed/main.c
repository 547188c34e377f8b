/* embed: vkg inside an application that owns its Vulkan device, built against an installed vkg
 * (find_package(vkg) or pkg-config), the way a host application uses it. See README.md and
 * docs/EMBEDDING.md.
 *
 *   embed                               y = relu(x W^T + b): the graph is built in code with the C
 *                                       writer, run on the application's device three ways, every
 *                                       result checked on the CPU:
 *                                        1. set_input / vkg_session_run / get_output;
 *                                        2. frames recorded into the application's command buffers
 *                                           (its producer, vkg_session_record, its barriers), double
 *                                           buffered, submitted with its own vkQueueSubmit;
 *                                        3. frames submitted with vkg_session_submit after the
 *                                           application's producer (a semaphore between them),
 *                                           double buffered: frame N+1 runs while the CPU reads N.
 *                                       Inputs and outputs of 2 and 3 are application VkBuffers
 *                                       bound zero copy (vkg_session_bind_buffer).
 *   embed MODEL.vkg [SYMBOL=VALUE ...]  loads a model, binds its symbolic dimensions (default 1),
 *                                       feeds deterministic fp32 inputs, prints every output
 *   embed --version                     header and library versions
 *
 * VKG_VALIDATION=1 makes the application enable VK_LAYER_KHRONOS_validation on its own instance; any
 * message it reports makes the program fail (check.sh also turns on synchronization validation with
 * VK_LAYER_ENABLES). vkg's own validation switch only applies to devices vkg creates: on an adopted
 * device, validation is the owner's business.
 *
 * Layout: app_vulkan_* is the application's Vulkan code (it knows nothing of vkg); embed_* is the vkg
 * part. frame_submit() / frame_wait() are where inference joins the application's frames.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <vkg.h>
#include <vulkan/vulkan.h>

/* ---------------------------------------------------------------------------------------------- */
/* The application's Vulkan objects: created and destroyed here, lent to vkg.                     */

typedef struct app_vulkan {
    VkInstance instance;
    VkDebugUtilsMessengerEXT messenger;
    VkPhysicalDevice physical_device;
    VkDevice device;
    uint32_t queue_family; /* a family with VK_QUEUE_COMPUTE_BIT */
    VkQueue queue;
    int timeline;          /* timelineSemaphore enabled (Vulkan 1.2 instance and device) */
    VkCommandPool pool;    /* for queue_family: the frames' command buffers */
    uint32_t validation_messages;
} app_vulkan;

static VKAPI_ATTR VkBool32 VKAPI_CALL on_validation(VkDebugUtilsMessageSeverityFlagBitsEXT severity,
                                                    VkDebugUtilsMessageTypeFlagsEXT type,
                                                    const VkDebugUtilsMessengerCallbackDataEXT *data, void *user)
{
    (void)severity;
    (void)type;
    app_vulkan *app = user;
    app->validation_messages++;
    fprintf(stderr, "embed: validation: %s\n", data && data->pMessage ? data->pMessage : "(no message)");
    return VK_FALSE;
}

static int env_true(const char *name)
{
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

static int type_rank(VkPhysicalDeviceType t)
{
    switch (t) {
    case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return 4;
    case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return 3;
    case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return 2;
    case VK_PHYSICAL_DEVICE_TYPE_CPU: return 1;
    default: return 0;
    }
}

/* Returns the first queue family with compute on pd, or UINT32_MAX. */
static uint32_t compute_family(VkPhysicalDevice pd)
{
    uint32_t n = 0;
    vkGetPhysicalDeviceQueueFamilyProperties(pd, &n, NULL);
    VkQueueFamilyProperties families[64];
    if (n > 64) n = 64;
    vkGetPhysicalDeviceQueueFamilyProperties(pd, &n, families);
    for (uint32_t i = 0; i < n; i++)
        if (families[i].queueFlags & VK_QUEUE_COMPUTE_BIT) return i;
    return UINT32_MAX;
}

static void app_vulkan_destroy(app_vulkan *app)
{
    if (app->pool) vkDestroyCommandPool(app->device, app->pool, NULL);
    if (app->device) vkDestroyDevice(app->device, NULL);
    if (app->messenger) {
        PFN_vkDestroyDebugUtilsMessengerEXT destroy = (PFN_vkDestroyDebugUtilsMessengerEXT)vkGetInstanceProcAddr(
            app->instance, "vkDestroyDebugUtilsMessengerEXT");
        if (destroy) destroy(app->instance, app->messenger, NULL);
    }
    if (app->instance) vkDestroyInstance(app->instance, NULL);
    app->pool = VK_NULL_HANDLE;
    app->device = VK_NULL_HANDLE;
    app->messenger = VK_NULL_HANDLE;
    app->instance = VK_NULL_HANDLE;
}

/* Instance (Vulkan 1.2 where the loader has it, else 1.1, the minimum vkg requires), the best device
 * with a compute queue, a device with one queue of that family and one optional feature: timeline
 * semaphores where instance and device are 1.2. */
static int app_vulkan_create(app_vulkan *app)
{
    memset(app, 0, sizeof *app);
    int validation = env_true("VKG_VALIDATION");
    uint32_t loader = VK_API_VERSION_1_1;
    if (vkEnumerateInstanceVersion(&loader) != VK_SUCCESS) loader = VK_API_VERSION_1_1;
    VkApplicationInfo ai = {.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO,
                            .pApplicationName = "vkg embed sample",
                            .apiVersion = loader >= VK_API_VERSION_1_2 ? VK_API_VERSION_1_2 : VK_API_VERSION_1_1};
    const char *layers[] = {"VK_LAYER_KHRONOS_validation"};
    const char *exts[] = {VK_EXT_DEBUG_UTILS_EXTENSION_NAME};
    VkDebugUtilsMessengerCreateInfoEXT dbg = {
        .sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT,
        .messageSeverity =
            VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT,
        .messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT |
                       VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT,
        .pfnUserCallback = on_validation,
        .pUserData = app};
    VkInstanceCreateInfo ici = {.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, .pApplicationInfo = &ai};
    if (validation) {
        ici.enabledLayerCount = 1;
        ici.ppEnabledLayerNames = layers;
        ici.enabledExtensionCount = 1;
        ici.ppEnabledExtensionNames = exts;
        ici.pNext = &dbg; /* also reports on vkCreateInstance / vkDestroyInstance themselves */
    }
    VkResult r = vkCreateInstance(&ici, NULL, &app->instance);
    if (r != VK_SUCCESS) {
        fprintf(stderr, "embed: vkCreateInstance failed (%d)%s\n", (int)r,
                validation ? "; is vulkan-validationlayers installed?" : "");
        return 1;
    }
    if (validation) {
        PFN_vkCreateDebugUtilsMessengerEXT create = (PFN_vkCreateDebugUtilsMessengerEXT)vkGetInstanceProcAddr(
            app->instance, "vkCreateDebugUtilsMessengerEXT");
        if (!create || create(app->instance, &dbg, NULL, &app->messenger) != VK_SUCCESS) {
            fprintf(stderr, "embed: cannot create the debug messenger\n");
            app_vulkan_destroy(app);
            return 1;
        }
    }

    VkPhysicalDevice pds[16];
    uint32_t n = 16;
    r = vkEnumeratePhysicalDevices(app->instance, &n, pds);
    if (r < 0 || n == 0) {
        fprintf(stderr, "embed: no Vulkan device (install mesa-vulkan-drivers for lavapipe)\n");
        app_vulkan_destroy(app);
        return 1;
    }
    int best = -1;
    for (uint32_t i = 0; i < n; i++) {
        VkPhysicalDeviceProperties p;
        vkGetPhysicalDeviceProperties(pds[i], &p);
        if (p.apiVersion < VK_API_VERSION_1_1 || compute_family(pds[i]) == UINT32_MAX) continue;
        if (best < 0) {
            best = (int)i;
            continue;
        }
        VkPhysicalDeviceProperties b;
        vkGetPhysicalDeviceProperties(pds[best], &b);
        if (type_rank(p.deviceType) > type_rank(b.deviceType)) best = (int)i;
    }
    if (best < 0) {
        fprintf(stderr, "embed: no Vulkan 1.1 device with a compute queue\n");
        app_vulkan_destroy(app);
        return 1;
    }
    app->physical_device = pds[best];
    app->queue_family = compute_family(app->physical_device);

    float priority = 1.0f;
    VkDeviceQueueCreateInfo qci = {.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO,
                                   .queueFamilyIndex = app->queue_family,
                                   .queueCount = 1,
                                   .pQueuePriorities = &priority};
    /* Timeline semaphores if instance and device are 1.2 and have them (vkg is told so with
     * VKG_FEATURE_TIMELINE_SEMAPHORE; without them its sessions signal fences). Nothing else optional:
     * vkg uses none of fp16 arithmetic, 16-bit storage or push descriptors unless told. */
    VkPhysicalDeviceProperties props;
    vkGetPhysicalDeviceProperties(app->physical_device, &props);
    VkPhysicalDeviceTimelineSemaphoreFeatures timeline = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_TIMELINE_SEMAPHORE_FEATURES};
    VkPhysicalDeviceFeatures2 features = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, .pNext = &timeline};
    if (ai.apiVersion >= VK_API_VERSION_1_2 && props.apiVersion >= VK_API_VERSION_1_2) {
        vkGetPhysicalDeviceFeatures2(app->physical_device, &features);
        app->timeline = timeline.timelineSemaphore == VK_TRUE;
    }
    timeline.timelineSemaphore = app->timeline ? VK_TRUE : VK_FALSE;
    VkDeviceCreateInfo dci = {.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO,
                              .pNext = app->timeline ? &features : NULL,
                              .queueCreateInfoCount = 1,
                              .pQueueCreateInfos = &qci};
    r = vkCreateDevice(app->physical_device, &dci, NULL, &app->device);
    if (r != VK_SUCCESS) {
        fprintf(stderr, "embed: vkCreateDevice failed (%d)\n", (int)r);
        app_vulkan_destroy(app);
        return 1;
    }
    vkGetDeviceQueue(app->device, app->queue_family, 0, &app->queue);
    VkCommandPoolCreateInfo pci = {.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
                                   .flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT,
                                   .queueFamilyIndex = app->queue_family};
    r = vkCreateCommandPool(app->device, &pci, NULL, &app->pool);
    if (r != VK_SUCCESS) {
        fprintf(stderr, "embed: vkCreateCommandPool failed (%d)\n", (int)r);
        app_vulkan_destroy(app);
        return 1;
    }
    return 0;
}

/* A buffer of the application's with its own memory: device-local (`host` = 0), or host-visible,
 * coherent and mapped (preferably device-local too). */
typedef struct app_buffer {
    VkBuffer buffer;
    VkDeviceMemory memory;
    void *map;
} app_buffer;

static int app_buffer_create(const app_vulkan *app, VkDeviceSize size, VkBufferUsageFlags usage, int host,
                             app_buffer *out)
{
    memset(out, 0, sizeof *out);
    VkBufferCreateInfo bci = {.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, .size = size, .usage = usage,
                              .sharingMode = VK_SHARING_MODE_EXCLUSIVE};
    if (vkCreateBuffer(app->device, &bci, NULL, &out->buffer) != VK_SUCCESS) return 1;
    VkMemoryRequirements req;
    vkGetBufferMemoryRequirements(app->device, out->buffer, &req);
    VkPhysicalDeviceMemoryProperties mp;
    vkGetPhysicalDeviceMemoryProperties(app->physical_device, &mp);
    const VkMemoryPropertyFlags hv = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
    const VkMemoryPropertyFlags dl = VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT;
    /* In order of preference; host buffers must be host-visible and coherent whatever else. */
    VkMemoryPropertyFlags tries[2] = {host ? hv | dl : dl, host ? hv : 0};
    int type = -1;
    for (int k = 0; k < 2 && type < 0; k++)
        for (uint32_t t = 0; t < mp.memoryTypeCount && type < 0; t++)
            if ((req.memoryTypeBits & (1u << t)) && (mp.memoryTypes[t].propertyFlags & tries[k]) == tries[k])
                type = (int)t;
    VkMemoryAllocateInfo mai = {.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO, .allocationSize = req.size,
                                .memoryTypeIndex = (uint32_t)(type < 0 ? 0 : type)};
    if (type < 0 || vkAllocateMemory(app->device, &mai, NULL, &out->memory) != VK_SUCCESS ||
        vkBindBufferMemory(app->device, out->buffer, out->memory, 0) != VK_SUCCESS ||
        (host && vkMapMemory(app->device, out->memory, 0, VK_WHOLE_SIZE, 0, &out->map) != VK_SUCCESS)) {
        fprintf(stderr, "embed: cannot create a buffer of %llu bytes\n", (unsigned long long)size);
        return 1;
    }
    return 0;
}

static void app_buffer_destroy(const app_vulkan *app, app_buffer *b)
{
    if (b->buffer) vkDestroyBuffer(app->device, b->buffer, NULL);
    if (b->memory) vkFreeMemory(app->device, b->memory, NULL);
    memset(b, 0, sizeof *b);
}

static void app_barrier(VkCommandBuffer cb, VkPipelineStageFlags src, VkAccessFlags src_access,
                        VkPipelineStageFlags dst, VkAccessFlags dst_access)
{
    VkMemoryBarrier mb = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER, .srcAccessMask = src_access,
                          .dstAccessMask = dst_access};
    vkCmdPipelineBarrier(cb, src, dst, 0, 1, &mb, 0, NULL, 0, NULL);
}

/* ---------------------------------------------------------------------------------------------- */
/* vkg on the application's device                                                               */

#define VKG_CHECK(call)                                                                             \
    do {                                                                                            \
        vkg_status st_ = (call);                                                                    \
        if (st_ != VKG_SUCCESS) {                                                                   \
            fprintf(stderr, "embed: %s: %s: %s\n", #call, vkg_status_name(st_), vkg_last_error());  \
            goto done;                                                                              \
        }                                                                                           \
    } while (0)

/* Refuses a library whose minor (0.x) or major (from 1.0) version differs from the header's. */
static int embed_check_version(void)
{
    uint32_t lib = vkg_version(), hdr = VKG_VERSION;
    int same = VKG_VERSION_MAJOR == 0 ? lib / 100 == hdr / 100 : lib / 10000 == hdr / 10000;
    if (!same) {
        fprintf(stderr, "embed: built against vkg %s but running with %s\n", VKG_VERSION_STRING,
                vkg_version_string());
        return 1;
    }
    return 0;
}

static vkg_context *embed_context(const app_vulkan *app)
{
    vkg_context_desc desc = {0};
    desc.external.instance = app->instance;
    desc.external.physical_device = app->physical_device;
    desc.external.device = app->device;
    desc.external.queue = app->queue;
    desc.external.queue_family_index = app->queue_family;
    /* The VKG_FEATURE_* the app enabled: timeline semaphores, if it could. */
    desc.external.enabled_features = app->timeline ? VKG_FEATURE_TIMELINE_SEMAPHORE : 0;
    vkg_context *ctx = NULL;
    if (vkg_context_create(&desc, &ctx) != VKG_SUCCESS) {
        fprintf(stderr, "embed: vkg_context_create: %s\n", vkg_last_error());
        return NULL;
    }
    return ctx;
}

/* Runs the session once, the simple way: submit on the adopted queue and wait. Inputs must have
 * been set; outputs are read afterwards. (Frames below show the asynchronous and recorded ways.) */
static vkg_status infer(vkg_session *s) { return vkg_session_run(s); }

/* A fixed generator so runs are reproducible (SplitMix64 -> [-1, 1)). */
static float rnd(uint64_t *state)
{
    uint64_t z = (*state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)((double)(z >> 11) / 4503599627370496.0 - 1.0);
}

enum { BATCH = 3, K = 16, N = 8 };

/* y = relu(x W^T + b), x (batch, K) with a symbolic batch, W (N, K), b (N): two nodes, "linear" then
 * "relu", serialized into memory (an application could as well ship the bytes as an asset). */
static vkg_status build_graph(const float *w, const float *b, void **bytes, size_t *size)
{
    vkg_writer *wr = NULL;
    vkg_status st = vkg_writer_create(&wr);
    if (st != VKG_SUCCESS) return st;
    vkg_writer_tensor x = {.name = "x", .role = VKG_ROLE_INPUT, .rank = 2, .dims = {-1, K}, .sym = {"batch"}};
    vkg_writer_tensor wt = {.name = "fc.weight", .role = VKG_ROLE_CONSTANT, .rank = 2, .dims = {N, K},
                            .data = w, .data_size = sizeof(float) * N * K};
    vkg_writer_tensor bt = {.name = "fc.bias", .role = VKG_ROLE_CONSTANT, .rank = 1, .dims = {N},
                            .data = b, .data_size = sizeof(float) * N};
    vkg_writer_tensor h = {.name = "h", .role = VKG_ROLE_INTERMEDIATE, .rank = 2, .dims = {-1, N}, .sym = {"batch"}};
    vkg_writer_tensor y = {.name = "y", .role = VKG_ROLE_OUTPUT, .rank = 2, .dims = {-1, N}, .sym = {"batch"}};
    uint32_t ix = 0, iw = 0, ib = 0, ih = 0, iy = 0;
    if (!st) st = vkg_writer_add_tensor(wr, &x, &ix);
    if (!st) st = vkg_writer_add_tensor(wr, &wt, &iw);
    if (!st) st = vkg_writer_add_tensor(wr, &bt, &ib);
    if (!st) st = vkg_writer_add_tensor(wr, &h, &ih);
    if (!st) st = vkg_writer_add_tensor(wr, &y, &iy);
    uint32_t fc_in[3] = {ix, iw, ib};
    if (!st) st = vkg_writer_add_node(wr, "linear", "fc", fc_in, 3, &ih, 1, NULL, 0);
    if (!st) st = vkg_writer_add_node(wr, "relu", "act", &ih, 1, &iy, 1, NULL, 0);
    if (!st) st = vkg_writer_add_input(wr, ix);
    if (!st) st = vkg_writer_add_output(wr, iy);
    if (!st) st = vkg_writer_add_metadata(wr, "producer", "samples/embed");
    if (!st) st = vkg_writer_to_memory(wr, bytes, size);
    vkg_writer_destroy(wr);
    return st;
}

/* The CPU computes the same thing in double; returns max |got - want| over the batch. */
static double check(const float *w, const float *b, const float *x, const float *got)
{
    double max_err = 0;
    for (int r = 0; r < BATCH; r++)
        for (int n = 0; n < N; n++) {
            double acc = b[n];
            for (int k = 0; k < K; k++) acc += (double)x[r * K + k] * w[n * K + k];
            double want = acc > 0 ? acc : 0;
            double e = fabs((double)got[r * N + n] - want);
            if (!(e <= max_err)) max_err = e; /* NaN counts as the worst */
        }
    return max_err;
}

static const double TOLERANCE = 1e-4;

/* ---------------------------------------------------------------------------------------------- */
/* Frames: inference inside the application's frame loop, two frames in flight                    */

enum { FRAMES = 6 };

typedef enum frame_mode {
    FRAME_RECORDED, /* vkg_session_record into the application's command buffer, its vkQueueSubmit */
    FRAME_SUBMITTED /* the application's producer, then vkg_session_submit waiting on its semaphore */
} frame_mode;

/* One of the two frames in flight: a session whose input is the application's device-local buffer
 * (a camera frame already on the GPU) and whose output is the application's host-visible buffer
 * (the CPU reads results in place), both bound zero copy; the application's command buffer, and the
 * semaphore or fence that orders the frame. */
typedef struct frame_slot {
    vkg_session *session;
    app_buffer in, out;
    VkCommandBuffer cb;
    VkSemaphore produced; /* FRAME_SUBMITTED: the producer's command buffer -> vkg's run */
    VkFence fence;        /* FRAME_RECORDED: the whole frame */
    int frame;            /* the frame in flight, -1: none */
} frame_slot;

/* The application's own Vulkan failures, reported like vkg's. */
static vkg_status app_failed(const char *call)
{
    fprintf(stderr, "embed: %s failed\n", call);
    return VKG_ERROR_VULKAN;
}

/* Starts frame x on the slot and returns without waiting. */
static vkg_status frame_submit(const app_vulkan *app, frame_slot *slot, frame_mode mode, const float *x)
{
    VkCommandBufferBeginInfo bi = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
                                   .flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT};
    if (vkBeginCommandBuffer(slot->cb, &bi) != VK_SUCCESS) return app_failed("vkBeginCommandBuffer");
    /* The producer: the application writes the frame into the GPU buffer vkg reads. */
    vkCmdUpdateBuffer(slot->cb, slot->in.buffer, 0, sizeof(float) * BATCH * K, x);
    if (mode == FRAME_RECORDED) {
        /* vkg's contract, before: our writes to its inputs visible to COMPUTE_SHADER reads. */
        app_barrier(slot->cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_ACCESS_TRANSFER_WRITE_BIT,
                    VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_READ_BIT);
        vkg_status st = vkg_session_record(slot->session, slot->cb);
        if (st != VKG_SUCCESS) {
            vkEndCommandBuffer(slot->cb);
            return st;
        }
        /* ... and after: outputs written at COMPUTE_SHADER, made visible to our consumer (the host). */
        app_barrier(slot->cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, VK_ACCESS_SHADER_WRITE_BIT,
                    VK_PIPELINE_STAGE_HOST_BIT, VK_ACCESS_HOST_READ_BIT);
    }
    if (vkEndCommandBuffer(slot->cb) != VK_SUCCESS) return app_failed("vkEndCommandBuffer");
    VkSubmitInfo si = {.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO, .commandBufferCount = 1, .pCommandBuffers = &slot->cb};
    if (mode == FRAME_RECORDED) /* one submission holds the producer and inference */
        return vkQueueSubmit(app->queue, 1, &si, slot->fence) == VK_SUCCESS ? VKG_SUCCESS : app_failed("vkQueueSubmit");
    si.signalSemaphoreCount = 1;
    si.pSignalSemaphores = &slot->produced;
    if (vkQueueSubmit(app->queue, 1, &si, VK_NULL_HANDLE) != VK_SUCCESS) return app_failed("vkQueueSubmit");
    vkg_submit_desc sd = {.wait_semaphores = &slot->produced, .n_wait = 1};
    return vkg_session_submit(slot->session, &sd); /* returns at once */
}

/* Waits until the slot's frame is done; its output is then readable on the CPU. */
static vkg_status frame_wait(const app_vulkan *app, frame_slot *slot, frame_mode mode)
{
    if (mode == FRAME_SUBMITTED) return vkg_session_wait(slot->session, UINT64_MAX);
    if (vkWaitForFences(app->device, 1, &slot->fence, VK_TRUE, UINT64_MAX) != VK_SUCCESS ||
        vkResetFences(app->device, 1, &slot->fence) != VK_SUCCESS)
        return app_failed("vkWaitForFences");
    return VKG_SUCCESS;
}

/* FRAMES frames, double buffered: frame f is started before the CPU reads frame f - 1's result. */
static int embed_frames(const app_vulkan *app, vkg_model *model, frame_mode mode, const float *w, const float *b)
{
    static float x[FRAMES][BATCH * K];
    frame_slot slots[2];
    memset(slots, 0, sizeof slots);
    int rc = 1;
    double max_err = 0;
    uint64_t seed = 100 + (uint64_t)mode;
    for (int f = 0; f < FRAMES; f++)
        for (int i = 0; i < BATCH * K; i++) x[f][i] = rnd(&seed);
    const VkBufferUsageFlags bind_usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_UNIFORM_TEXEL_BUFFER_BIT;
    vkg_dim_binding dims[] = {{"batch", BATCH}};
    vkg_session_desc sd = {.dims = dims, .n_dims = 1};
    for (int i = 0; i < 2; i++) {
        frame_slot *slot = &slots[i];
        slot->frame = -1;
        VKG_CHECK(vkg_session_create(model, &sd, &slot->session));
        VkCommandBufferAllocateInfo ai = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO,
                                          .commandPool = app->pool, .level = VK_COMMAND_BUFFER_LEVEL_PRIMARY,
                                          .commandBufferCount = 1};
        VkSemaphoreCreateInfo sci = {.sType = VK_STRUCTURE_TYPE_SEMAPHORE_CREATE_INFO};
        VkFenceCreateInfo fci = {.sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
        if (app_buffer_create(app, sizeof(float) * BATCH * K, bind_usage | VK_BUFFER_USAGE_TRANSFER_DST_BIT, 0,
                              &slot->in) ||
            app_buffer_create(app, sizeof(float) * BATCH * N, bind_usage, 1, &slot->out) ||
            vkAllocateCommandBuffers(app->device, &ai, &slot->cb) != VK_SUCCESS ||
            vkCreateSemaphore(app->device, &sci, NULL, &slot->produced) != VK_SUCCESS ||
            vkCreateFence(app->device, &fci, NULL, &slot->fence) != VK_SUCCESS) {
            fprintf(stderr, "embed: cannot create the frame objects\n");
            goto done;
        }
        /* Zero copy: vkg reads the frame where the producer wrote it, writes y where the CPU reads. */
        VKG_CHECK(vkg_session_bind_buffer(slot->session, "x", slot->in.buffer, 0, sizeof(float) * BATCH * K));
        VKG_CHECK(vkg_session_bind_buffer(slot->session, "y", slot->out.buffer, 0, sizeof(float) * BATCH * N));
    }
    for (int f = 0; f <= FRAMES; f++) {
        if (f < FRAMES) { /* frame f starts ... */
            frame_slot *slot = &slots[f % 2];
            VKG_CHECK(frame_submit(app, slot, mode, x[f]));
            slot->frame = f;
        }
        if (f > 0) { /* ... while the CPU consumes frame f - 1 */
            frame_slot *slot = &slots[(f - 1) % 2];
            VKG_CHECK(frame_wait(app, slot, mode));
            double e = check(w, b, x[f - 1], slot->out.map);
            if (!(e <= max_err)) max_err = e;
            slot->frame = -1;
        }
    }
    printf("%s: %d frames, two in flight, inputs and outputs zero copy; max |vkg - cpu| = %.3g: %s\n",
           mode == FRAME_RECORDED ? "recorded into the application's command buffers"
                                  : (vkg_session_timeline(slots[0].session) ? "vkg_session_submit (timeline semaphore)"
                                                                            : "vkg_session_submit (fence)"),
           FRAMES, max_err, max_err <= TOLERANCE ? "ok" : "MISMATCH");
    rc = max_err <= TOLERANCE ? 0 : 1;
done:
    for (int i = 0; i < 2; i++) {
        frame_slot *slot = &slots[i];
        if (slot->frame >= 0) (void)frame_wait(app, slot, mode); /* an error left a frame in flight */
        vkg_session_destroy(slot->session); /* before the buffers bound to it */
        if (slot->cb) vkFreeCommandBuffers(app->device, app->pool, 1, &slot->cb);
        if (slot->produced) vkDestroySemaphore(app->device, slot->produced, NULL);
        if (slot->fence) vkDestroyFence(app->device, slot->fence, NULL);
        app_buffer_destroy(app, &slot->in);
        app_buffer_destroy(app, &slot->out);
    }
    return rc;
}

static int embed_builtin(const app_vulkan *app, vkg_context *ctx)
{
    static float w[N * K], b[N], x[BATCH * K], y[BATCH * N];
    uint64_t seed = 1;
    for (int i = 0; i < N * K; i++) w[i] = rnd(&seed) * 0.5f;
    for (int i = 0; i < N; i++) b[i] = rnd(&seed) * 0.1f;
    for (int i = 0; i < BATCH * K; i++) x[i] = rnd(&seed);

    int rc = 1;
    void *bytes = NULL;
    size_t size = 0;
    vkg_model *model = NULL;
    vkg_session *session = NULL;
    VKG_CHECK(build_graph(w, b, &bytes, &size));
    VKG_CHECK(vkg_model_load_memory(ctx, bytes, size, &model)); /* copies the bytes */
    free(bytes);
    bytes = NULL;

    /* 1. The simple way: copies in and out of vkg's buffers, run and wait. */
    vkg_dim_binding dims[] = {{"batch", BATCH}};
    vkg_session_desc sd = {.dims = dims, .n_dims = 1};
    VKG_CHECK(vkg_session_create(model, &sd, &session));
    VKG_CHECK(vkg_session_set_input(session, "x", x, sizeof x));
    VKG_CHECK(infer(session));
    VKG_CHECK(vkg_session_get_output(session, "y", y, sizeof y));
    double max_err = check(w, b, x, y);
    printf("y = relu(x W^T + b), x (%d, %d), W (%d, %d); %u dispatches, %u barriers\n", BATCH, K, N, K,
           vkg_session_dispatch_count(session), vkg_session_barrier_count(session));
    for (int r = 0; r < BATCH; r++) {
        printf("  y[%d] =", r);
        for (int n = 0; n < N; n++) printf(" %8.4f", (double)y[r * N + n]);
        printf("\n");
    }
    printf("max |vkg - cpu| = %.3g (tolerance %.0e): %s\n", max_err, TOLERANCE, max_err <= TOLERANCE ? "ok" : "MISMATCH");
    if (max_err > TOLERANCE) goto done;

    /* 2 and 3. Inference in the application's frame loop. */
    if (embed_frames(app, model, FRAME_RECORDED, w, b) || embed_frames(app, model, FRAME_SUBMITTED, w, b)) goto done;
    rc = 0;
done:
    free(bytes);
    vkg_session_destroy(session); /* sessions before their model, models before the context */
    vkg_model_destroy(model);
    return rc;
}

static uint64_t numel(const vkg_tensor_info *t)
{
    uint64_t n = 1;
    for (uint32_t i = 0; i < t->rank; i++) n *= (uint64_t)t->dims[i];
    return n;
}

static void print_shape(const vkg_tensor_info *t)
{
    printf("(");
    for (uint32_t i = 0; i < t->rank; i++) printf(i ? ", %lld" : "%lld", (long long)t->dims[i]);
    printf(")");
}

static int embed_file(vkg_context *ctx, const char *path, int nargs, char **args)
{
    int rc = 1;
    vkg_model *model = NULL;
    vkg_session *session = NULL;
    float *buf = NULL;
    vkg_dim_binding dims[VKG_MAX_DIMS * 4];
    uint32_t n_dims = 0;
    VKG_CHECK(vkg_model_load(ctx, path, &model));

    /* SYMBOL=VALUE from the command line; every other symbol of the inputs is bound to 1. */
    for (int i = 0; i < nargs; i++) {
        char *eq = strchr(args[i], '=');
        if (!eq || n_dims == sizeof dims / sizeof dims[0]) {
            fprintf(stderr, "embed: expected SYMBOL=VALUE, got \"%s\"\n", args[i]);
            goto done;
        }
        *eq = '\0';
        dims[n_dims++] = (vkg_dim_binding){args[i], strtoll(eq + 1, NULL, 10)};
    }
    for (uint32_t i = 0; i < vkg_model_input_count(model); i++) {
        vkg_tensor_info t;
        VKG_CHECK(vkg_model_input(model, i, &t));
        for (uint32_t d = 0; d < t.rank; d++) {
            if (t.dims[d] >= 0 || !t.sym[d]) continue;
            int bound = 0;
            for (uint32_t j = 0; j < n_dims; j++) bound |= strcmp(dims[j].name, t.sym[d]) == 0;
            if (!bound && n_dims < sizeof dims / sizeof dims[0]) dims[n_dims++] = (vkg_dim_binding){t.sym[d], 1};
        }
    }
    vkg_session_desc sd = {.dims = dims, .n_dims = n_dims};
    VKG_CHECK(vkg_session_create(model, &sd, &session));

    uint64_t seed = 7;
    for (uint32_t i = 0; i < vkg_model_input_count(model); i++) {
        vkg_tensor_info t;
        VKG_CHECK(vkg_model_input(model, i, &t));
        VKG_CHECK(vkg_session_tensor(session, t.name, &t)); /* concrete shape */
        if (t.dtype != VKG_DTYPE_F32) {
            fprintf(stderr, "embed: input \"%s\" is not fp32; this sample feeds fp32 only\n", t.name);
            goto done;
        }
        size_t n = (size_t)numel(&t);
        buf = malloc(n * sizeof *buf + 1);
        if (!buf) goto done;
        for (size_t k = 0; k < n; k++) buf[k] = rnd(&seed);
        VKG_CHECK(vkg_session_set_input(session, t.name, buf, n * sizeof *buf));
        printf("input  %-24s ", t.name);
        print_shape(&t);
        printf("\n");
        free(buf);
        buf = NULL;
    }
    VKG_CHECK(infer(session));
    for (uint32_t i = 0; i < vkg_model_output_count(model); i++) {
        vkg_tensor_info t;
        VKG_CHECK(vkg_model_output(model, i, &t));
        VKG_CHECK(vkg_session_tensor(session, t.name, &t));
        size_t elem = t.dtype == VKG_DTYPE_F16 || t.dtype == VKG_DTYPE_BF16 ? 2 : t.dtype == VKG_DTYPE_U8 ? 1 : 4;
        size_t n = (size_t)numel(&t);
        buf = malloc(n * elem + 1);
        if (!buf) goto done;
        VKG_CHECK(vkg_session_get_output(session, t.name, buf, n * elem));
        printf("output %-24s ", t.name);
        print_shape(&t);
        if (t.dtype == VKG_DTYPE_F32) {
            double sum = 0;
            for (size_t k = 0; k < n; k++) sum += buf[k];
            printf(" sum %.6g, first", sum);
            for (size_t k = 0; k < n && k < 4; k++) printf(" %.5g", (double)buf[k]);
        }
        printf("\n");
        free(buf);
        buf = NULL;
    }
    rc = 0;
done:
    free(buf);
    vkg_session_destroy(session);
    vkg_model_destroy(model);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "--version") == 0) {
        printf("vkg header %s, library %s\n", VKG_VERSION_STRING, vkg_version_string());
        return embed_check_version();
    }
    if (embed_check_version()) return 1;

    app_vulkan app;
    if (app_vulkan_create(&app)) return 1;

    int rc = 1;
    vkg_context *ctx = embed_context(&app);
    if (ctx) {
        printf("vkg %s on the application's device: %s\n", vkg_version_string(), vkg_context_device_info(ctx)->name);
        rc = argc > 1 ? embed_file(ctx, argv[1], argc - 2, argv + 2) : embed_builtin(&app, ctx);
        vkg_context_destroy(ctx); /* waits for the device; destroys only what vkg created */
    }

    /* The application's objects outlive the context and are still the application's to use. */
    if (vkDeviceWaitIdle(app.device) != VK_SUCCESS) rc = 1;
    app_vulkan_destroy(&app);
    if (app.validation_messages) {
        fprintf(stderr, "embed: the validation layer reported %u message(s)\n", app.validation_messages);
        rc = 1;
    }
    return rc;
}
