/* Status names and the per-thread error message. */
#include <stdio.h>
#include <string.h>

#include "internal.h"

static _Thread_local char vkg_errbuf[2048];

const char *vkg_status_name(vkg_status s)
{
    switch (s) {
    case VKG_SUCCESS: return "VKG_SUCCESS";
    case VKG_TIMEOUT: return "VKG_TIMEOUT";
    case VKG_ERROR_INVALID_ARGUMENT: return "VKG_ERROR_INVALID_ARGUMENT";
    case VKG_ERROR_OUT_OF_HOST_MEMORY: return "VKG_ERROR_OUT_OF_HOST_MEMORY";
    case VKG_ERROR_OUT_OF_DEVICE_MEMORY: return "VKG_ERROR_OUT_OF_DEVICE_MEMORY";
    case VKG_ERROR_NO_DEVICE: return "VKG_ERROR_NO_DEVICE";
    case VKG_ERROR_VULKAN: return "VKG_ERROR_VULKAN";
    case VKG_ERROR_UNSUPPORTED: return "VKG_ERROR_UNSUPPORTED";
    case VKG_ERROR_VALIDATION: return "VKG_ERROR_VALIDATION";
    case VKG_ERROR_INVALID_GRAPH: return "VKG_ERROR_INVALID_GRAPH";
    case VKG_ERROR_IO: return "VKG_ERROR_IO";
    case VKG_ERROR_DEVICE_LOST: return "VKG_ERROR_DEVICE_LOST";
    }
    return "VKG_ERROR_UNKNOWN";
}

const char *vkg_last_error(void) { return vkg_errbuf; }

vkg_status vkg_fail(vkg_status status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(vkg_errbuf, sizeof vkg_errbuf, fmt, ap);
    va_end(ap);
    return status;
}

vkg_status vkg_fail_prefix(vkg_status status, const char *fmt, ...)
{
    char prefix[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(prefix, sizeof prefix, fmt, ap);
    va_end(ap);
    size_t pl = strlen(prefix) + 2, old = strlen(vkg_errbuf);
    if (old + pl >= sizeof vkg_errbuf) old = sizeof vkg_errbuf - pl - 1; /* keep the head of the old message */
    memmove(vkg_errbuf + pl, vkg_errbuf, old);
    vkg_errbuf[pl + old] = '\0';
    memcpy(vkg_errbuf, prefix, pl - 2);
    vkg_errbuf[pl - 2] = ':';
    vkg_errbuf[pl - 1] = ' ';
    return status;
}

const char *vkg_vk_result_name(VkResult r)
{
    switch (r) {
#define C(x) case x: return #x;
    C(VK_SUCCESS) C(VK_NOT_READY) C(VK_TIMEOUT) C(VK_EVENT_SET) C(VK_EVENT_RESET) C(VK_INCOMPLETE)
    C(VK_ERROR_OUT_OF_HOST_MEMORY) C(VK_ERROR_OUT_OF_DEVICE_MEMORY) C(VK_ERROR_INITIALIZATION_FAILED)
    C(VK_ERROR_DEVICE_LOST) C(VK_ERROR_MEMORY_MAP_FAILED) C(VK_ERROR_LAYER_NOT_PRESENT)
    C(VK_ERROR_EXTENSION_NOT_PRESENT) C(VK_ERROR_FEATURE_NOT_PRESENT) C(VK_ERROR_INCOMPATIBLE_DRIVER)
    C(VK_ERROR_TOO_MANY_OBJECTS) C(VK_ERROR_FORMAT_NOT_SUPPORTED) C(VK_ERROR_FRAGMENTED_POOL)
    C(VK_ERROR_UNKNOWN) C(VK_ERROR_OUT_OF_POOL_MEMORY) C(VK_ERROR_INVALID_EXTERNAL_HANDLE)
    C(VK_ERROR_FRAGMENTATION) C(VK_PIPELINE_COMPILE_REQUIRED)
#undef C
    default: return "VkResult(unknown)";
    }
}

vkg_status vkg_fail_vk(VkResult r, const char *call)
{
    vkg_status s = VKG_ERROR_VULKAN;
    if (r == VK_ERROR_OUT_OF_DEVICE_MEMORY) s = VKG_ERROR_OUT_OF_DEVICE_MEMORY;
    else if (r == VK_ERROR_OUT_OF_HOST_MEMORY) s = VKG_ERROR_OUT_OF_HOST_MEMORY;
    else if (r == VK_ERROR_DEVICE_LOST) s = VKG_ERROR_DEVICE_LOST;
    return vkg_fail(s, "%s failed: %s (%d)", call, vkg_vk_result_name(r), (int)r);
}
