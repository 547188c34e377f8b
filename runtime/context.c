/* Instance and device: creation or adoption, device choice, feature detection, validation capture. */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define VALIDATION_LAYER "VK_LAYER_KHRONOS_validation"

static bool has_ext(const VkExtensionProperties *exts, uint32_t n, const char *name)
{
    for (uint32_t i = 0; i < n; i++)
        if (strcmp(exts[i].extensionName, name) == 0) return true;
    return false;
}

static bool env_true(const char *name)
{
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

/* Fills info for one physical device. Reads only; touches no device. */
static vkg_status fill_info(VkPhysicalDevice pd, uint32_t index, vkg_device_info *info)
{
    memset(info, 0, sizeof *info);
    info->index = index;

    uint32_t next = 0;
    VKG_VK(vkEnumerateDeviceExtensionProperties(pd, NULL, &next, NULL));
    VkExtensionProperties *exts = calloc(next ? next : 1, sizeof *exts);
    if (!exts) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory listing extensions");
    VkResult r = vkEnumerateDeviceExtensionProperties(pd, NULL, &next, exts);
    if (r != VK_SUCCESS && r != VK_INCOMPLETE) {
        free(exts);
        return vkg_fail_vk(r, "vkEnumerateDeviceExtensionProperties");
    }

    VkPhysicalDeviceProperties base;
    vkGetPhysicalDeviceProperties(pd, &base);
    bool v12 = base.apiVersion >= VK_API_VERSION_1_2;
    bool v13 = base.apiVersion >= VK_API_VERSION_1_3;

    VkPhysicalDeviceDriverProperties drv = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRIVER_PROPERTIES};
    VkPhysicalDeviceSubgroupProperties sg = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES};
    VkPhysicalDeviceSubgroupSizeControlProperties sgc = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_SIZE_CONTROL_PROPERTIES};
    VkPhysicalDeviceProperties2 props = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2, .pNext = &sg};
    bool has_sgc = v13 || has_ext(exts, next, "VK_EXT_subgroup_size_control");
    bool has_drv = v12 || has_ext(exts, next, "VK_KHR_driver_properties");
    if (has_sgc) { sgc.pNext = props.pNext; props.pNext = &sgc; }
    if (has_drv) { drv.pNext = props.pNext; props.pNext = &drv; }
    vkGetPhysicalDeviceProperties2(pd, &props);

    VkPhysicalDeviceShaderFloat16Int8Features f16 = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES};
    VkPhysicalDevice16BitStorageFeatures s16 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_16BIT_STORAGE_FEATURES};
    VkPhysicalDeviceFeatures2 feats = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, .pNext = &s16};
    bool has_f16 = v12 || has_ext(exts, next, "VK_KHR_shader_float16_int8");
    if (has_f16) { f16.pNext = feats.pNext; feats.pNext = &f16; }
    VkPhysicalDeviceTimelineSemaphoreFeatures tl = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_TIMELINE_SEMAPHORE_FEATURES};
    bool has_tl = v12 || has_ext(exts, next, "VK_KHR_timeline_semaphore");
    if (has_tl) { tl.pNext = feats.pNext; feats.pNext = &tl; }
    vkGetPhysicalDeviceFeatures2(pd, &feats);

    const VkPhysicalDeviceLimits *L = &base.limits;
    snprintf(info->name, sizeof info->name, "%s", base.deviceName);
    if (has_drv) {
        snprintf(info->driver_name, sizeof info->driver_name, "%s", drv.driverName);
        snprintf(info->driver_info, sizeof info->driver_info, "%s", drv.driverInfo);
    }
    info->vendor_id = base.vendorID;
    info->device_id = base.deviceID;
    info->api_version = base.apiVersion;
    info->driver_version = base.driverVersion;
    info->type = base.deviceType;
    info->is_cpu = base.deviceType == VK_PHYSICAL_DEVICE_TYPE_CPU;

    info->fp16_arithmetic = has_f16 && f16.shaderFloat16;
    info->storage_16bit = s16.storageBuffer16BitAccess;
    info->timeline_semaphore = has_tl && tl.timelineSemaphore;
    if (sg.supportedStages & VK_SHADER_STAGE_COMPUTE_BIT) {
        info->subgroup_size = (int)sg.subgroupSize;
        info->subgroup_ops = sg.supportedOperations;
    }
    if (has_sgc) {
        info->subgroup_size_control = 1;
        info->min_subgroup_size = sgc.minSubgroupSize;
        info->max_subgroup_size = sgc.maxSubgroupSize;
    }
    info->push_descriptors = has_ext(exts, next, "VK_KHR_push_descriptor");
    info->cooperative_matrix =
        has_ext(exts, next, "VK_KHR_cooperative_matrix") || has_ext(exts, next, "VK_NV_cooperative_matrix");
    free(exts);

    uint32_t nq = 0;
    vkGetPhysicalDeviceQueueFamilyProperties(pd, &nq, NULL);
    VkQueueFamilyProperties qf[32];
    nq = VKG_MIN(nq, 32u);
    vkGetPhysicalDeviceQueueFamilyProperties(pd, &nq, qf);
    for (uint32_t i = 0; i < nq; i++)
        if ((qf[i].queueFlags & VK_QUEUE_COMPUTE_BIT) && qf[i].timestampValidBits > 0) info->timestamps = 1;
    info->timestamp_period_ns = L->timestampPeriod;

    VkFormatProperties fp;
    vkGetPhysicalDeviceFormatProperties(pd, VK_FORMAT_R32G32B32A32_SFLOAT, &fp);
    info->texel_rgba32f = (fp.bufferFeatures & VK_FORMAT_FEATURE_UNIFORM_TEXEL_BUFFER_BIT) != 0;
    vkGetPhysicalDeviceFormatProperties(pd, VK_FORMAT_R16G16B16A16_SFLOAT, &fp);
    info->texel_rgba16f = (fp.bufferFeatures & VK_FORMAT_FEATURE_UNIFORM_TEXEL_BUFFER_BIT) != 0;

    info->max_storage_buffer_range = L->maxStorageBufferRange;
    info->max_uniform_buffer_range = L->maxUniformBufferRange;
    info->max_texel_buffer_elements = L->maxTexelBufferElements;
    info->max_shared_memory = L->maxComputeSharedMemorySize;
    info->max_workgroup_invocations = L->maxComputeWorkGroupInvocations;
    for (int i = 0; i < 3; i++) {
        info->max_workgroup_size[i] = L->maxComputeWorkGroupSize[i];
        info->max_workgroup_count[i] = L->maxComputeWorkGroupCount[i];
    }
    info->max_push_constants = L->maxPushConstantsSize;
    info->min_storage_offset_alignment = L->minStorageBufferOffsetAlignment;
    info->min_texel_offset_alignment = L->minTexelBufferOffsetAlignment;

    VkPhysicalDeviceMemoryProperties mp;
    vkGetPhysicalDeviceMemoryProperties(pd, &mp);
    for (uint32_t h = 0; h < mp.memoryHeapCount; h++)
        if ((mp.memoryHeaps[h].flags & VK_MEMORY_HEAP_DEVICE_LOCAL_BIT) && mp.memoryHeaps[h].size > info->device_local_bytes)
            info->device_local_bytes = mp.memoryHeaps[h].size;
    const VkMemoryPropertyFlags uni = VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT | VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT |
                                      VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
    for (uint32_t t = 0; t < mp.memoryTypeCount; t++)
        if ((mp.memoryTypes[t].propertyFlags & uni) == uni &&
            mp.memoryHeaps[mp.memoryTypes[t].heapIndex].size == info->device_local_bytes)
            info->unified_memory = 1;
    return VKG_SUCCESS;
}

static vkg_status create_instance(bool validation, VkInstance *out,
                                  const VkDebugUtilsMessengerCreateInfoEXT *dbg, uint32_t *api_out)
{
    uint32_t api = VK_API_VERSION_1_1;
    uint32_t loader = 0;
    if (vkEnumerateInstanceVersion(&loader) == VK_SUCCESS) {
        if (loader >= VK_API_VERSION_1_3) api = VK_API_VERSION_1_3;
        else if (loader >= VK_API_VERSION_1_2) api = VK_API_VERSION_1_2;
    }
    VkApplicationInfo app = {.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO,
                             .pApplicationName = "vkg",
                             .pEngineName = "vkg",
                             .engineVersion = VK_MAKE_VERSION(VKG_VERSION_MAJOR, VKG_VERSION_MINOR, VKG_VERSION_PATCH),
                             .apiVersion = api};
    const char *layers[1] = {VALIDATION_LAYER};
    const char *exts[1] = {VK_EXT_DEBUG_UTILS_EXTENSION_NAME};
    VkInstanceCreateInfo ci = {.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, .pApplicationInfo = &app};
    if (validation) {
        uint32_t n = 0;
        vkEnumerateInstanceLayerProperties(&n, NULL);
        VkLayerProperties *lp = calloc(n ? n : 1, sizeof *lp);
        if (!lp) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory listing layers");
        vkEnumerateInstanceLayerProperties(&n, lp);
        bool found = false;
        for (uint32_t i = 0; i < n; i++)
            if (strcmp(lp[i].layerName, VALIDATION_LAYER) == 0) found = true;
        free(lp);
        if (!found)
            return vkg_fail(VKG_ERROR_UNSUPPORTED,
                            "validation requested (VKG_VALIDATION=1) but %s is not installed "
                            "(Debian package vulkan-validationlayers)", VALIDATION_LAYER);
        ci.enabledLayerCount = 1;
        ci.ppEnabledLayerNames = layers;
        ci.enabledExtensionCount = 1;
        ci.ppEnabledExtensionNames = exts;
        ci.pNext = dbg;
    }
    if (api_out) *api_out = api;
    VkResult r = vkCreateInstance(&ci, NULL, out);
    if (r == VK_ERROR_INCOMPATIBLE_DRIVER)
        return vkg_fail(VKG_ERROR_NO_DEVICE, "vkCreateInstance: no Vulkan driver found (%s); on a machine "
                        "without a GPU install mesa-vulkan-drivers for lavapipe", vkg_vk_result_name(r));
    if (r != VK_SUCCESS) return vkg_fail_vk(r, "vkCreateInstance");
    return VKG_SUCCESS;
}

vkg_status vkg_enumerate_devices(vkg_device_info *infos, uint32_t *count)
{
    if (!count) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_enumerate_devices: count is NULL");
    VkInstance inst;
    VKG_TRY(create_instance(false, &inst, NULL, NULL));
    uint32_t n = 0;
    VkResult r = vkEnumeratePhysicalDevices(inst, &n, NULL);
    VkPhysicalDevice *pds = calloc(n ? n : 1, sizeof *pds);
    vkg_status st = VKG_SUCCESS;
    if (!pds) st = vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    else if (r != VK_SUCCESS || (r = vkEnumeratePhysicalDevices(inst, &n, pds)) < 0)
        st = vkg_fail_vk(r, "vkEnumeratePhysicalDevices");
    if (st == VKG_SUCCESS && infos) {
        for (uint32_t i = 0; i < n && i < *count && st == VKG_SUCCESS; i++) st = fill_info(pds[i], i, &infos[i]);
    }
    if (st == VKG_SUCCESS) *count = n;
    free(pds);
    vkDestroyInstance(inst, NULL);
    return st;
}

static VKAPI_ATTR VkBool32 VKAPI_CALL on_validation(VkDebugUtilsMessageSeverityFlagBitsEXT sev,
                                                    VkDebugUtilsMessageTypeFlagsEXT type,
                                                    const VkDebugUtilsMessengerCallbackDataEXT *data, void *user)
{
    (void)type;
    vkg_context *ctx = user;
    if (!ctx || !(sev & (VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT)))
        return VK_FALSE;
    pthread_mutex_lock(&ctx->val_lock);
    if (ctx->validation_unseen == 0)
        snprintf(ctx->validation_first, sizeof ctx->validation_first, "%s", data->pMessage ? data->pMessage : "");
    ctx->validation_unseen++;
    ctx->validation_total++;
    pthread_mutex_unlock(&ctx->val_lock);
    /* Printed too, so a test log shows every message, not only the first. */
    fprintf(stderr, "vkg: validation: %s\n", data->pMessage ? data->pMessage : "(no message)");
    return VK_FALSE;
}

vkg_status vkg_context_check_validation(vkg_context *ctx)
{
    if (!ctx || !ctx->validation) return VKG_SUCCESS;
    pthread_mutex_lock(&ctx->val_lock);
    uint64_t n = ctx->validation_unseen;
    char first[sizeof ctx->validation_first];
    memcpy(first, ctx->validation_first, sizeof first);
    ctx->validation_unseen = 0;
    pthread_mutex_unlock(&ctx->val_lock);
    if (n == 0) return VKG_SUCCESS;
    return vkg_fail(VKG_ERROR_VALIDATION, "validation layer reported %llu message(s); first: %s",
                    (unsigned long long)n, first);
}

uint64_t vkg_context_validation_count(const vkg_context *ctx)
{
    if (!ctx || !ctx->validation) return 0;
    pthread_mutex_lock((pthread_mutex_t *)&ctx->val_lock);
    uint64_t n = ctx->validation_total;
    pthread_mutex_unlock((pthread_mutex_t *)&ctx->val_lock);
    return n;
}

const vkg_device_info *vkg_context_device_info(const vkg_context *ctx) { return ctx ? &ctx->info : NULL; }

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

static bool icontains(const char *hay, const char *needle)
{
    size_t n = strlen(needle);
    for (; *hay; hay++) {
        size_t i = 0;
        while (i < n && hay[i] && tolower((unsigned char)hay[i]) == tolower((unsigned char)needle[i])) i++;
        if (i == n) return true;
    }
    return n == 0;
}

/* Picks the physical device: by index or name substring when `want` is set, else the best. */
static vkg_status pick_device(VkInstance inst, const char *want, VkPhysicalDevice *out, vkg_device_info *info)
{
    uint32_t n = 0;
    VKG_VK(vkEnumeratePhysicalDevices(inst, &n, NULL));
    if (n == 0)
        return vkg_fail(VKG_ERROR_NO_DEVICE, "no Vulkan physical device found; on a machine without a GPU "
                        "install mesa-vulkan-drivers for lavapipe");
    VkPhysicalDevice pds[16];
    n = VKG_MIN(n, 16u);
    VkResult r = vkEnumeratePhysicalDevices(inst, &n, pds);
    if (r < 0) return vkg_fail_vk(r, "vkEnumeratePhysicalDevices");

    int best = -1;
    vkg_device_info cand, best_info;
    bool by_index = want && *want;
    for (const char *p = want; by_index && *p; p++)
        if (!isdigit((unsigned char)*p)) by_index = false;
    for (uint32_t i = 0; i < n; i++) {
        VKG_TRY(fill_info(pds[i], i, &cand));
        if (cand.api_version < VK_API_VERSION_1_1) continue;
        bool take;
        if (want && *want) take = by_index ? (uint32_t)atoi(want) == i : icontains(cand.name, want);
        else
            take = best < 0 || type_rank(cand.type) > type_rank(best_info.type) ||
                   (type_rank(cand.type) == type_rank(best_info.type) && cand.device_local_bytes > best_info.device_local_bytes);
        if (take && (best < 0 || !(want && *want))) {
            best = (int)i;
            best_info = cand;
        }
    }
    if (best < 0) {
        char names[1024] = "";
        size_t len = 0;
        for (uint32_t i = 0; i < n; i++) {
            VKG_TRY(fill_info(pds[i], i, &cand));
            len += (size_t)snprintf(names + len, len < sizeof names ? sizeof names - len : 0, "%s[%u] %s",
                                    i ? ", " : "", i, cand.name);
            if (len >= sizeof names) break;
        }
        if (want && *want)
            return vkg_fail(VKG_ERROR_NO_DEVICE, "no Vulkan 1.1 device matches VKG_DEVICE/device \"%s\"; devices: %s",
                            want, names);
        return vkg_fail(VKG_ERROR_NO_DEVICE, "no device supports Vulkan 1.1; devices: %s", names);
    }
    *out = pds[best];
    *info = best_info;
    return VKG_SUCCESS;
}

static bool device_has_ext(VkPhysicalDevice pd, const char *name)
{
    uint32_t n = 0;
    if (vkEnumerateDeviceExtensionProperties(pd, NULL, &n, NULL) != VK_SUCCESS) return false;
    VkExtensionProperties *exts = calloc(n ? n : 1, sizeof *exts);
    if (!exts) return false;
    VkResult r = vkEnumerateDeviceExtensionProperties(pd, NULL, &n, exts);
    bool found = (r == VK_SUCCESS || r == VK_INCOMPLETE) && has_ext(exts, n, name);
    free(exts);
    return found;
}

/* instance_api: the apiVersion vkg created its instance with (core 1.2 features need both the
 * instance and the device at 1.2). */
static vkg_status create_device(vkg_context *ctx, uint32_t instance_api)
{
    uint32_t nq = 0;
    vkGetPhysicalDeviceQueueFamilyProperties(ctx->phys, &nq, NULL);
    VkQueueFamilyProperties qf[32];
    nq = VKG_MIN(nq, 32u);
    vkGetPhysicalDeviceQueueFamilyProperties(ctx->phys, &nq, qf);
    /* Prefer a compute queue that also does graphics: it is the one that reliably has timestamps. */
    int fam = -1;
    for (uint32_t i = 0; i < nq; i++)
        if ((qf[i].queueFlags & VK_QUEUE_COMPUTE_BIT) && (fam < 0 || qf[i].timestampValidBits > qf[fam].timestampValidBits))
            fam = (int)i;
    if (fam < 0) return vkg_fail(VKG_ERROR_NO_DEVICE, "device %s has no compute queue", ctx->info.name);
    ctx->queue_family = (uint32_t)fam;
    ctx->info.timestamps = qf[fam].timestampValidBits > 0;

    float prio = 1.0f;
    VkDeviceQueueCreateInfo qci = {.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO,
                                   .queueFamilyIndex = (uint32_t)fam, .queueCount = 1, .pQueuePriorities = &prio};
    const char *exts[4];
    uint32_t next = 0;
    bool v12 = ctx->info.api_version >= VK_API_VERSION_1_2;
    if (ctx->info.push_descriptors) exts[next++] = "VK_KHR_push_descriptor";
    if (ctx->info.fp16_arithmetic && !v12) exts[next++] = "VK_KHR_shader_float16_int8";
    /* Timeline semaphores: core where instance and device are 1.2, else the KHR extension. */
    bool tl_core = ctx->info.timeline_semaphore && v12 && instance_api >= VK_API_VERSION_1_2;
    bool tl_ext = ctx->info.timeline_semaphore && !tl_core && device_has_ext(ctx->phys, "VK_KHR_timeline_semaphore");
    ctx->info.timeline_semaphore = tl_core || tl_ext;
    if (tl_ext) exts[next++] = "VK_KHR_timeline_semaphore";

    VkPhysicalDeviceShaderFloat16Int8Features f16 = {
        .sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SHADER_FLOAT16_INT8_FEATURES,
        .shaderFloat16 = ctx->info.fp16_arithmetic ? VK_TRUE : VK_FALSE};
    VkPhysicalDevice16BitStorageFeatures s16 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_16BIT_STORAGE_FEATURES,
                                                .storageBuffer16BitAccess = ctx->info.storage_16bit ? VK_TRUE : VK_FALSE};
    VkPhysicalDeviceFeatures2 feats = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, .pNext = &s16};
    if (ctx->info.fp16_arithmetic) s16.pNext = &f16;
    VkPhysicalDeviceTimelineSemaphoreFeatures tl = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_TIMELINE_SEMAPHORE_FEATURES,
                                                    .pNext = feats.pNext, .timelineSemaphore = VK_TRUE};
    if (ctx->info.timeline_semaphore) feats.pNext = &tl;

    VkDeviceCreateInfo dci = {.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO, .pNext = &feats,
                              .queueCreateInfoCount = 1, .pQueueCreateInfos = &qci,
                              .enabledExtensionCount = next, .ppEnabledExtensionNames = exts};
    VKG_VK(vkCreateDevice(ctx->phys, &dci, NULL, &ctx->device));
    vkGetDeviceQueue(ctx->device, (uint32_t)fam, 0, &ctx->queue);
    return VKG_SUCCESS;
}

static vkg_status load_pipeline_cache(vkg_context *ctx, const char *path)
{
    void *data = NULL;
    size_t size = 0;
    if (path) {
        size_t plen = strlen(path) + 1;
        ctx->pipeline_cache_path = malloc(plen);
        if (ctx->pipeline_cache_path) memcpy(ctx->pipeline_cache_path, path, plen);
        else return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        FILE *f = fopen(path, "rb");
        if (f) {
            if (fseek(f, 0, SEEK_END) == 0) {
                long len = ftell(f);
                if (len >= 32 && fseek(f, 0, SEEK_SET) == 0 && (data = malloc((size_t)len)) != NULL &&
                    fread(data, 1, (size_t)len, f) == (size_t)len)
                    size = (size_t)len;
            }
            fclose(f);
        }
        /* A cache from another device or driver is ignored, not trusted: check its header. */
        if (size) {
            VkPhysicalDeviceProperties p;
            vkGetPhysicalDeviceProperties(ctx->phys, &p);
            const uint8_t *b = data;
            uint32_t hdr[4];
            memcpy(hdr, b, sizeof hdr);
            if (hdr[0] < 32 || hdr[1] != VK_PIPELINE_CACHE_HEADER_VERSION_ONE || hdr[2] != p.vendorID ||
                hdr[3] != p.deviceID || memcmp(b + 16, p.pipelineCacheUUID, VK_UUID_SIZE) != 0)
                size = 0;
        }
    }
    VkPipelineCacheCreateInfo pci = {.sType = VK_STRUCTURE_TYPE_PIPELINE_CACHE_CREATE_INFO,
                                     .initialDataSize = size, .pInitialData = size ? data : NULL};
    VkResult r = vkCreatePipelineCache(ctx->device, &pci, NULL, &ctx->pipeline_cache);
    free(data);
    if (r != VK_SUCCESS) return vkg_fail_vk(r, "vkCreatePipelineCache");
    return VKG_SUCCESS;
}

static void save_pipeline_cache(vkg_context *ctx)
{
    if (!ctx->pipeline_cache_path || !ctx->pipeline_cache) return;
    size_t size = 0;
    if (vkGetPipelineCacheData(ctx->device, ctx->pipeline_cache, &size, NULL) != VK_SUCCESS || !size) return;
    void *data = malloc(size);
    if (!data) return;
    if (vkGetPipelineCacheData(ctx->device, ctx->pipeline_cache, &size, data) == VK_SUCCESS) {
        FILE *f = fopen(ctx->pipeline_cache_path, "wb");
        if (f) {
            fwrite(data, 1, size, f);
            fclose(f);
        }
    }
    free(data);
}

/* Looks up vkWaitSemaphores (core, else KHR): the one timeline entry point vkg calls. An adopted device that claims the
 * feature without them is refused; a device vkg created falls back to fences. */
static vkg_status load_timeline(vkg_context *ctx, bool external)
{
    if (!ctx->info.timeline_semaphore) return VKG_SUCCESS;
    ctx->wait_semaphores = (PFN_vkWaitSemaphores)vkGetDeviceProcAddr(ctx->device, "vkWaitSemaphores");
    if (!ctx->wait_semaphores)
        ctx->wait_semaphores = (PFN_vkWaitSemaphores)vkGetDeviceProcAddr(ctx->device, "vkWaitSemaphoresKHR");
    if (ctx->wait_semaphores) return VKG_SUCCESS;
    ctx->info.timeline_semaphore = 0;
    if (external)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                        "vkg_context_create: external.enabled_features has VKG_FEATURE_TIMELINE_SEMAPHORE but the "
                        "device has neither vkWaitSemaphores (Vulkan 1.2) nor vkWaitSemaphoresKHR "
                        "(VK_KHR_timeline_semaphore); enable one of them or drop the bit");
    return VKG_SUCCESS;
}

vkg_status vkg_context_vulkan(const vkg_context *ctx, vkg_vulkan_handles *out)
{
    if (!ctx || !out) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_context_vulkan: NULL argument");
    *out = (vkg_vulkan_handles){ctx->instance, ctx->phys, ctx->device, ctx->queue, ctx->queue_family};
    return VKG_SUCCESS;
}

void vkg_memory_destroy_all(vkg_context *ctx);
void vkg_pipelines_destroy_all(vkg_context *ctx);

static bool init_locks(vkg_context *ctx)
{
    pthread_mutex_t *m[] = {&ctx->mem_lock, &ctx->pipe_lock, &ctx->val_lock, &ctx->once_lock, &ctx->queue_lock};
    for (size_t i = 0; i < VKG_ARRAY_LEN(m); i++)
        if (pthread_mutex_init(m[i], NULL) != 0) {
            while (i--) pthread_mutex_destroy(m[i]);
            return false;
        }
    ctx->locks_ready = true;
    return true;
}

static void destroy_locks(vkg_context *ctx)
{
    if (!ctx->locks_ready) return;
    pthread_mutex_destroy(&ctx->mem_lock);
    pthread_mutex_destroy(&ctx->pipe_lock);
    pthread_mutex_destroy(&ctx->val_lock);
    pthread_mutex_destroy(&ctx->once_lock);
    pthread_mutex_destroy(&ctx->queue_lock);
}

vkg_status vkg_context_create(const vkg_context_desc *desc_in, vkg_context **out)
{
    if (!out) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_context_create: out is NULL");
    *out = NULL;
    vkg_context_desc desc = {0};
    if (desc_in) desc = *desc_in;

    vkg_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory creating a context");
    if (!init_locks(ctx)) {
        free(ctx);
        return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "vkg_context_create: pthread_mutex_init failed");
    }
    if ((desc.external.lock_queue == NULL) != (desc.external.unlock_queue == NULL)) {
        vkg_context_destroy(ctx);
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                        "vkg_context_create: give both external.lock_queue and external.unlock_queue, or neither");
    }
    ctx->lock_queue = desc.external.lock_queue;
    ctx->unlock_queue = desc.external.unlock_queue;
    ctx->queue_lock_user = desc.external.queue_lock_user;
    ctx->budget = desc.memory_budget;
    vkg_status st = VKG_SUCCESS;
    bool external = desc.external.device != VK_NULL_HANDLE;
    uint32_t instance_api = 0;

    if (external) {
        if (!desc.external.instance || !desc.external.physical_device || !desc.external.queue) {
            vkg_context_destroy(ctx);
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                            "vkg_context_create: adopting a device needs external.instance, physical_device, "
                            "device and queue");
        }
        ctx->instance = desc.external.instance;
        ctx->phys = desc.external.physical_device;
        ctx->device = desc.external.device;
        ctx->queue = desc.external.queue;
        ctx->queue_family = desc.external.queue_family_index;
        st = fill_info(ctx->phys, 0, &ctx->info);
        if (st == VKG_SUCCESS) {
            uint32_t en = desc.external.enabled_features;
            ctx->info.fp16_arithmetic &= (en & VKG_FEATURE_FP16_ARITHMETIC) != 0;
            ctx->info.storage_16bit &= (en & VKG_FEATURE_STORAGE_16BIT) != 0;
            ctx->info.push_descriptors &= (en & VKG_FEATURE_PUSH_DESCRIPTORS) != 0;
            /* Enabled by the application, whatever the physical device reports (it may have enabled
             * the extension on an older instance): load_timeline checks the entry points. */
            ctx->info.timeline_semaphore = (en & VKG_FEATURE_TIMELINE_SEMAPHORE) != 0;
            uint32_t nq = 0;
            vkGetPhysicalDeviceQueueFamilyProperties(ctx->phys, &nq, NULL);
            VkQueueFamilyProperties qf[32];
            nq = VKG_MIN(nq, 32u);
            vkGetPhysicalDeviceQueueFamilyProperties(ctx->phys, &nq, qf);
            if (ctx->queue_family >= nq || !(qf[ctx->queue_family].queueFlags & VK_QUEUE_COMPUTE_BIT))
                st = vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                              "vkg_context_create: external.queue_family_index %u is not a compute queue family",
                              ctx->queue_family);
            else ctx->info.timestamps = qf[ctx->queue_family].timestampValidBits > 0;
        }
    } else {
        ctx->owns_instance = ctx->owns_device = true;
        ctx->validation = desc.validation > 0 || (desc.validation == 0 && env_true("VKG_VALIDATION"));
        VkDebugUtilsMessengerCreateInfoEXT dbg = {
            .sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT,
            .messageSeverity = VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT,
            .messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT |
                           VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT,
            .pfnUserCallback = on_validation,
            .pUserData = ctx};
        st = create_instance(ctx->validation, &ctx->instance, &dbg, &instance_api);
        if (st == VKG_SUCCESS && ctx->validation) {
            PFN_vkCreateDebugUtilsMessengerEXT create =
                (PFN_vkCreateDebugUtilsMessengerEXT)vkGetInstanceProcAddr(ctx->instance, "vkCreateDebugUtilsMessengerEXT");
            if (!create) st = vkg_fail(VKG_ERROR_UNSUPPORTED, "validation: vkCreateDebugUtilsMessengerEXT unavailable");
            else {
                VkResult r = create(ctx->instance, &dbg, NULL, &ctx->messenger);
                if (r != VK_SUCCESS) st = vkg_fail_vk(r, "vkCreateDebugUtilsMessengerEXT");
            }
        }
        const char *want = desc.device ? desc.device : getenv("VKG_DEVICE");
        if (st == VKG_SUCCESS) st = pick_device(ctx->instance, want, &ctx->phys, &ctx->info);
        if (st == VKG_SUCCESS) st = create_device(ctx, instance_api);
    }
    if (st == VKG_SUCCESS) st = load_timeline(ctx, external);
    /* VKG_DISABLE_TIMELINE=1: sessions signal completion on fences (tests the fallback anywhere). */
    ctx->use_timeline = ctx->info.timeline_semaphore && !env_true("VKG_DISABLE_TIMELINE");

    if (st == VKG_SUCCESS) {
        VkCommandPoolCreateInfo cpi = {.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
                                       .flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT,
                                       .queueFamilyIndex = ctx->queue_family};
        VkResult r = vkCreateCommandPool(ctx->device, &cpi, NULL, &ctx->cmd_pool);
        if (r != VK_SUCCESS) st = vkg_fail_vk(r, "vkCreateCommandPool");
    }
    if (st == VKG_SUCCESS) {
        VkFenceCreateInfo fci = {.sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
        VkResult r = vkCreateFence(ctx->device, &fci, NULL, &ctx->fence);
        if (r != VK_SUCCESS) st = vkg_fail_vk(r, "vkCreateFence");
    }
    if (st == VKG_SUCCESS) st = load_pipeline_cache(ctx, desc.pipeline_cache_path);
    ctx->force_staging = env_true("VKG_FORCE_STAGING");
    if (st == VKG_SUCCESS) {
        VkPhysicalDeviceProperties props;
        vkGetPhysicalDeviceProperties(ctx->phys, &props);
        ctx->max_storage_per_stage = props.limits.maxPerStageDescriptorStorageBuffers;
        ctx->max_texel_per_stage = props.limits.maxPerStageDescriptorSampledImages;
    }
    /* VKG_MATMUL_VARIANT=tiled|texel overrides the device's matmul preset for every op that
     * follows it (tests run both on one device). */
    const char *mv = getenv("VKG_MATMUL_VARIANT");
    ctx->matmul_variant = mv && !strcmp(mv, "tiled") ? 1 : mv && !strcmp(mv, "texel") ? 2 : 0;
    if (st == VKG_SUCCESS) {
        ctx->block_size = desc.block_size ? desc.block_size : (64ull << 20);
        VkDeviceSize a = 64;
        a = VKG_MAX(a, ctx->info.min_storage_offset_alignment);
        a = VKG_MAX(a, ctx->info.min_texel_offset_alignment);
        ctx->alignment = a;
        VkPhysicalDeviceMaintenance3Properties m3 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_MAINTENANCE_3_PROPERTIES};
        VkPhysicalDeviceProperties2 p2 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2, .pNext = &m3};
        vkGetPhysicalDeviceProperties2(ctx->phys, &p2);
        ctx->max_allocation = m3.maxMemoryAllocationSize ? m3.maxMemoryAllocationSize : ctx->info.device_local_bytes;
        st = vkg_context_check_validation(ctx);
    }
    if (st != VKG_SUCCESS) {
        char msg[2048];
        snprintf(msg, sizeof msg, "%s", vkg_last_error());
        vkg_context_destroy(ctx);
        return vkg_fail(st, "%s", msg);
    }
    *out = ctx;
    return VKG_SUCCESS;
}

void vkg_context_destroy(vkg_context *ctx)
{
    if (!ctx) return;
    if (ctx->device) vkDeviceWaitIdle(ctx->device);
    vkg_pipelines_destroy_all(ctx);
    vkg_memory_destroy_all(ctx);
    if (ctx->pipeline_cache) {
        save_pipeline_cache(ctx);
        vkDestroyPipelineCache(ctx->device, ctx->pipeline_cache, NULL);
    }
    free(ctx->pipeline_cache_path);
    if (ctx->fence) vkDestroyFence(ctx->device, ctx->fence, NULL);
    if (ctx->cmd_pool) vkDestroyCommandPool(ctx->device, ctx->cmd_pool, NULL);
    if (ctx->owns_device && ctx->device) vkDestroyDevice(ctx->device, NULL);
    if (ctx->messenger) {
        PFN_vkDestroyDebugUtilsMessengerEXT destroy =
            (PFN_vkDestroyDebugUtilsMessengerEXT)vkGetInstanceProcAddr(ctx->instance, "vkDestroyDebugUtilsMessengerEXT");
        if (destroy) destroy(ctx->instance, ctx->messenger, NULL);
    }
    if (ctx->owns_instance && ctx->instance) vkDestroyInstance(ctx->instance, NULL);
    destroy_locks(ctx);
    free(ctx);
}

static vkg_status run_once_locked(vkg_context *ctx, void (*record)(VkCommandBuffer, void *), void *user);

vkg_status vkg_context_run_once(vkg_context *ctx, void (*record)(VkCommandBuffer, void *), void *user)
{
    VKG_TRY(vkg_context_alive(ctx, "vkg_context_run_once"));
    pthread_mutex_lock(&ctx->once_lock);
    vkg_status st = run_once_locked(ctx, record, user);
    pthread_mutex_unlock(&ctx->once_lock);
    return st == VKG_SUCCESS ? vkg_context_check_validation(ctx) : st;
}

/* The one-shot command buffer and its fence are the context's: the caller holds once_lock. */
static vkg_status run_once_locked(vkg_context *ctx, void (*record)(VkCommandBuffer, void *), void *user)
{
    VkCommandBufferAllocateInfo ai = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO,
                                      .commandPool = ctx->cmd_pool, .level = VK_COMMAND_BUFFER_LEVEL_PRIMARY,
                                      .commandBufferCount = 1};
    VkCommandBuffer cb;
    VKG_VK(vkAllocateCommandBuffers(ctx->device, &ai, &cb));
    VkCommandBufferBeginInfo bi = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
                                   .flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT};
    VkResult r = vkBeginCommandBuffer(cb, &bi);
    const char *call = "vkBeginCommandBuffer";
    if (r == VK_SUCCESS) {
        record(cb, user);
        r = vkEndCommandBuffer(cb);
        call = "vkEndCommandBuffer";
    }
    if (r == VK_SUCCESS) {
        VkSubmitInfo si = {.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO, .commandBufferCount = 1, .pCommandBuffers = &cb};
        r = vkg_queue_submit(ctx, &si, ctx->fence);
        call = "vkQueueSubmit";
        if (r == VK_SUCCESS) {
            r = vkg_wait_fence(ctx, ctx->fence, UINT64_MAX);
            call = "vkWaitForFences";
            vkResetFences(ctx->device, 1, &ctx->fence);
        }
    }
    vkFreeCommandBuffers(ctx->device, ctx->cmd_pool, 1, &cb);
    if (r != VK_SUCCESS) return vkg_fail_vk(r, call);
    return VKG_SUCCESS;
}

void vkg_context_inject_fault(vkg_context *ctx, vkg_fault_site site, uint32_t nth, VkResult result)
{
    ctx->fault_result[site] = result;
    atomic_store(&ctx->fault_countdown[site], nth);
}

VkResult vkg_context_fault(vkg_context *ctx, vkg_fault_site site)
{
    unsigned n = atomic_load(&ctx->fault_countdown[site]);
    while (n > 0) {
        if (atomic_compare_exchange_weak(&ctx->fault_countdown[site], &n, n - 1))
            return n == 1 ? ctx->fault_result[site] : VK_SUCCESS;
    }
    return VK_SUCCESS;
}

VkResult vkg_context_note(vkg_context *ctx, VkResult r)
{
    if (r == VK_ERROR_DEVICE_LOST) atomic_store(&ctx->lost, true);
    return r;
}

vkg_status vkg_context_alive(vkg_context *ctx, const char *call)
{
    if (!atomic_load(&ctx->lost)) return VKG_SUCCESS;
    return vkg_fail(VKG_ERROR_DEVICE_LOST,
                    "%s: the device was lost earlier (VK_ERROR_DEVICE_LOST); destroy every session and model of "
                    "this context and the context, then create a new context", call);
}

VkResult vkg_queue_submit(vkg_context *ctx, const VkSubmitInfo *si, VkFence fence)
{
    if (atomic_load(&ctx->lost)) return VK_ERROR_DEVICE_LOST;
    VkResult r = vkg_context_fault(ctx, VKG_FAULT_SUBMIT);
    if (r != VK_SUCCESS) return vkg_context_note(ctx, r);
    if (ctx->lock_queue) ctx->lock_queue(ctx->queue_lock_user);
    else pthread_mutex_lock(&ctx->queue_lock);
    r = vkQueueSubmit(ctx->queue, 1, si, fence);
    if (ctx->unlock_queue) ctx->unlock_queue(ctx->queue_lock_user);
    else pthread_mutex_unlock(&ctx->queue_lock);
    return vkg_context_note(ctx, r);
}

VkResult vkg_wait_fence(vkg_context *ctx, VkFence fence, uint64_t timeout_ns)
{
    VkResult r = vkWaitForFences(ctx->device, 1, &fence, VK_TRUE, timeout_ns);
    /* An injected failure comes after the real wait: the work has completed, as after a device
     * loss noticed late, so nothing vkg frees afterwards is still in use. */
    VkResult f = r == VK_SUCCESS ? vkg_context_fault(ctx, VKG_FAULT_WAIT) : VK_SUCCESS;
    return vkg_context_note(ctx, f != VK_SUCCESS ? f : r);
}
