/* Device memory: large blocks, each one VkDeviceMemory + one VkBuffer, suballocated first-fit.
 * Unified-memory devices (lavapipe, integrated GPUs) map blocks and copy directly; discrete GPUs
 * copy through a transient host-visible staging buffer. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

typedef struct range {
    VkDeviceSize off, size;
} range;

struct vkg_block {
    vkg_block *next;
    VkDeviceMemory memory;
    VkBuffer buffer;
    VkDeviceSize size;
    void *mapped;
    range *free; /* sorted by offset, coalesced */
    uint32_t nfree, capfree;
    uint32_t live; /* suballocations handed out */
};

static const VkBufferUsageFlags BLOCK_USAGE =
    VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_UNIFORM_TEXEL_BUFFER_BIT |
    VK_BUFFER_USAGE_STORAGE_TEXEL_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT |
    VK_BUFFER_USAGE_TRANSFER_DST_BIT | VK_BUFFER_USAGE_INDIRECT_BUFFER_BIT;

static VkDeviceSize align_up(VkDeviceSize v, VkDeviceSize a) { return (v + a - 1) / a * a; }

/* Chooses a memory type among `bits` having `want`, preferring (in order) `prefer` flags. */
static int find_type(VkPhysicalDevice pd, uint32_t bits, VkMemoryPropertyFlags want, VkMemoryPropertyFlags prefer)
{
    VkPhysicalDeviceMemoryProperties mp;
    vkGetPhysicalDeviceMemoryProperties(pd, &mp);
    int best = -1;
    for (uint32_t t = 0; t < mp.memoryTypeCount; t++) {
        VkMemoryPropertyFlags f = mp.memoryTypes[t].propertyFlags;
        if (!(bits & (1u << t)) || (f & want) != want) continue;
        if (best < 0) best = (int)t;
        if ((f & prefer) == prefer && (mp.memoryTypes[best].propertyFlags & prefer) != prefer) best = (int)t;
    }
    return best;
}

/* A buffer with its own memory: a block (host = false) or a staging buffer (host = true). Mapped
 * when host-visible, unless it is a block and the context forces staging. */
static vkg_status raw_buffer(vkg_context *ctx, VkDeviceSize size, VkBufferUsageFlags usage, bool host,
                             VkBuffer *buf, VkDeviceMemory *mem, void **mapped, bool *is_host_visible)
{
    if (size > ctx->max_allocation)
        return vkg_fail(VKG_ERROR_OUT_OF_DEVICE_MEMORY,
                        "out of device memory: %llu bytes requested; one allocation holds at most %llu",
                        (unsigned long long)size, (unsigned long long)ctx->max_allocation);
    VkBufferCreateInfo bci = {.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, .size = size, .usage = usage,
                              .sharingMode = VK_SHARING_MODE_EXCLUSIVE};
    VKG_VK(vkCreateBuffer(ctx->device, &bci, NULL, buf));
    VkMemoryRequirements req;
    vkGetBufferMemoryRequirements(ctx->device, *buf, &req);
    const VkMemoryPropertyFlags hv = VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT;
    int type;
    if (host) type = find_type(ctx->phys, req.memoryTypeBits, hv, VK_MEMORY_PROPERTY_HOST_CACHED_BIT);
    else if (ctx->info.unified_memory)
        type = find_type(ctx->phys, req.memoryTypeBits, VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT | hv, 0);
    else type = find_type(ctx->phys, req.memoryTypeBits, VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT, 0);
    if (type < 0) type = find_type(ctx->phys, req.memoryTypeBits, 0, VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT);
    if (type < 0) {
        vkDestroyBuffer(ctx->device, *buf, NULL);
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "no memory type fits a storage buffer of %llu bytes",
                        (unsigned long long)size);
    }
    /* Refuse what cannot fit before asking the driver: an oversized vkAllocateMemory is invalid usage. */
    VkPhysicalDeviceMemoryProperties mp;
    vkGetPhysicalDeviceMemoryProperties(ctx->phys, &mp);
    VkDeviceSize heap = mp.memoryHeaps[mp.memoryTypes[type].heapIndex].size;
    if (req.size > heap || req.size > ctx->max_allocation) {
        vkDestroyBuffer(ctx->device, *buf, NULL);
        return vkg_fail(VKG_ERROR_OUT_OF_DEVICE_MEMORY,
                        "out of device memory: %llu bytes requested; the heap holds %llu, one allocation at most %llu",
                        (unsigned long long)size, (unsigned long long)heap, (unsigned long long)ctx->max_allocation);
    }
    VkMemoryAllocateInfo mai = {.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO, .allocationSize = req.size,
                                .memoryTypeIndex = (uint32_t)type};
    VkResult r = host ? VK_SUCCESS : vkg_context_fault(ctx, VKG_FAULT_ALLOC);
    if (r == VK_SUCCESS) r = vkAllocateMemory(ctx->device, &mai, NULL, mem);
    vkg_context_note(ctx, r);
    if (r != VK_SUCCESS) {
        vkDestroyBuffer(ctx->device, *buf, NULL);
        if (r == VK_ERROR_OUT_OF_DEVICE_MEMORY || r == VK_ERROR_OUT_OF_HOST_MEMORY)
            return vkg_fail(VKG_ERROR_OUT_OF_DEVICE_MEMORY,
                            "out of device memory: vkAllocateMemory of %llu bytes failed (%s)",
                            (unsigned long long)req.size, vkg_vk_result_name(r));
        return vkg_fail_vk(r, "vkAllocateMemory");
    }
    r = vkBindBufferMemory(ctx->device, *buf, *mem, 0);
    bool visible = (mp.memoryTypes[type].propertyFlags & hv) == hv;
    *mapped = NULL;
    if (!host && ctx->force_staging) visible = false;
    if (r == VK_SUCCESS && visible) r = vkMapMemory(ctx->device, *mem, 0, VK_WHOLE_SIZE, 0, mapped);
    if (r != VK_SUCCESS) {
        vkDestroyBuffer(ctx->device, *buf, NULL);
        vkFreeMemory(ctx->device, *mem, NULL);
        return vkg_fail_vk(r, visible ? "vkMapMemory" : "vkBindBufferMemory");
    }
    if (is_host_visible) *is_host_visible = visible;
    return VKG_SUCCESS;
}

static vkg_status block_new(vkg_context *ctx, VkDeviceSize size, vkg_block **out)
{
    vkg_block *b = calloc(1, sizeof *b);
    if (!b) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    vkg_status st = raw_buffer(ctx, size, BLOCK_USAGE, false, &b->buffer, &b->memory, &b->mapped, NULL);
    if (st != VKG_SUCCESS) {
        free(b);
        return st;
    }
    b->size = size;
    b->capfree = 8;
    b->free = malloc(b->capfree * sizeof *b->free);
    if (!b->free) {
        vkDestroyBuffer(ctx->device, b->buffer, NULL);
        vkFreeMemory(ctx->device, b->memory, NULL);
        free(b);
        return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    }
    b->free[0] = (range){0, size};
    b->nfree = 1;
    b->next = ctx->blocks;
    ctx->blocks = b;
    *out = b;
    return VKG_SUCCESS;
}

static bool block_take(vkg_block *b, VkDeviceSize size, VkDeviceSize align, VkDeviceSize *off)
{
    for (uint32_t i = 0; i < b->nfree; i++) {
        VkDeviceSize start = align_up(b->free[i].off, align);
        VkDeviceSize end = b->free[i].off + b->free[i].size;
        if (start + size > end) continue;
        /* Alignment padding before `start` stays with the allocation: the free list keeps aligned
         * starts only, so a later free gives it back whole. */
        VkDeviceSize used_end = start + size;
        b->free[i].size = end - used_end;
        b->free[i].off = used_end;
        if (b->free[i].size == 0) {
            memmove(&b->free[i], &b->free[i + 1], (b->nfree - i - 1) * sizeof *b->free);
            b->nfree--;
        }
        *off = start;
        b->live++;
        return true;
    }
    return false;
}

static vkg_status block_give(vkg_block *b, VkDeviceSize off, VkDeviceSize size)
{
    uint32_t i = 0;
    while (i < b->nfree && b->free[i].off < off) i++;
    bool merge_prev = i > 0 && b->free[i - 1].off + b->free[i - 1].size == off;
    bool merge_next = i < b->nfree && off + size == b->free[i].off;
    if (merge_prev && merge_next) {
        b->free[i - 1].size += size + b->free[i].size;
        memmove(&b->free[i], &b->free[i + 1], (b->nfree - i - 1) * sizeof *b->free);
        b->nfree--;
    } else if (merge_prev) {
        b->free[i - 1].size += size;
    } else if (merge_next) {
        b->free[i].off = off;
        b->free[i].size += size;
    } else {
        if (b->nfree == b->capfree) {
            range *n = realloc(b->free, 2 * b->capfree * sizeof *n);
            if (!n) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
            b->free = n;
            b->capfree *= 2;
        }
        memmove(&b->free[i + 1], &b->free[i], (b->nfree - i) * sizeof *b->free);
        b->free[i] = (range){off, size};
        b->nfree++;
    }
    b->live--;
    return VKG_SUCCESS;
}

static VkDeviceSize blocks_bytes(const vkg_context *ctx)
{
    VkDeviceSize n = 0;
    for (const vkg_block *b = ctx->blocks; b; b = b->next) n += b->size;
    return n;
}

/* Size of the next block for a request of `need` bytes: the usual block size, trimmed to what the
 * budget leaves (never below need). 0 when the budget cannot hold need: the message is set. */
static VkDeviceSize next_block_size(vkg_context *ctx, VkDeviceSize need)
{
    VkDeviceSize bs = VKG_MAX(ctx->block_size, need);
    if (!ctx->budget) return bs;
    VkDeviceSize held = blocks_bytes(ctx), left = ctx->budget > held ? ctx->budget - held : 0;
    if (need > left) {
        vkg_fail(VKG_ERROR_OUT_OF_DEVICE_MEMORY,
                 "out of the context's device-memory budget: %llu bytes needed, %llu left of the budget of %llu "
                 "(%llu held)", (unsigned long long)need, (unsigned long long)left, (unsigned long long)ctx->budget,
                 (unsigned long long)held);
        return 0;
    }
    return VKG_MIN(bs, left);
}

static vkg_status buf_take(vkg_context *ctx, VkDeviceSize need, vkg_block **out, VkDeviceSize *off)
{
    for (vkg_block *b = ctx->blocks; b; b = b->next)
        if (block_take(b, need, ctx->alignment, off)) {
            *out = b;
            return VKG_SUCCESS;
        }
    VkDeviceSize bs = next_block_size(ctx, need);
    if (!bs) return VKG_ERROR_OUT_OF_DEVICE_MEMORY;
    VKG_TRY(block_new(ctx, bs, out));
    block_take(*out, need, ctx->alignment, off);
    return VKG_SUCCESS;
}

vkg_status vkg_buf_create(vkg_context *ctx, VkDeviceSize size, vkg_buf **out)
{
    if (!ctx || !out) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_buf_create: NULL argument");
    *out = NULL;
    /* Zero-size tensors are legal; they still get a distinct, bindable range. */
    VkDeviceSize need = align_up(size ? size : 4, ctx->alignment);
    vkg_buf *buf = calloc(1, sizeof *buf);
    if (!buf) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");

    VkDeviceSize off = 0;
    vkg_block *b = NULL;
    pthread_mutex_lock(&ctx->mem_lock);
    vkg_status st = buf_take(ctx, need, &b, &off);
    pthread_mutex_unlock(&ctx->mem_lock);
    if (st != VKG_SUCCESS) {
        free(buf);
        if (st == VKG_ERROR_OUT_OF_DEVICE_MEMORY)
            return vkg_fail_prefix(st, "allocating a buffer of %llu bytes", (unsigned long long)size);
        return st;
    }
    buf->ctx = ctx;
    buf->block = b;
    buf->buffer = b->buffer;
    buf->offset = off;
    buf->size = size;
    buf->mapped = b->mapped ? (char *)b->mapped + off : NULL;
    *out = buf;
    return VKG_SUCCESS;
}

void vkg_buf_destroy(vkg_buf *buf)
{
    if (!buf) return;
    vkg_context *ctx = buf->ctx;
    vkg_block *b = buf->block;
    VkDeviceSize need = align_up(buf->size ? buf->size : 4, ctx->alignment);
    pthread_mutex_lock(&ctx->mem_lock);
    block_give(b, buf->offset, need);
    if (b->live == 0) { /* release empty blocks so peak device memory follows live buffers */
        vkg_block **pp = &ctx->blocks;
        while (*pp != b) pp = &(*pp)->next;
        *pp = b->next;
        vkDestroyBuffer(ctx->device, b->buffer, NULL);
        vkFreeMemory(ctx->device, b->memory, NULL);
        free(b->free);
        free(b);
    }
    pthread_mutex_unlock(&ctx->mem_lock);
    free(buf);
}

VkDeviceSize vkg_mem_block_bytes(const vkg_context *ctx)
{
    vkg_memory_stats ms;
    vkg_context_memory_stats((vkg_context *)ctx, &ms);
    return ms.allocated;
}

vkg_status vkg_context_memory_stats(vkg_context *ctx, vkg_memory_stats *out)
{
    if (!ctx || !out) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_context_memory_stats: NULL argument");
    *out = (vkg_memory_stats){0, 0, ctx->budget};
    pthread_mutex_lock(&ctx->mem_lock);
    for (const vkg_block *b = ctx->blocks; b; b = b->next) {
        VkDeviceSize free_bytes = 0;
        for (uint32_t i = 0; i < b->nfree; i++) free_bytes += b->free[i].size;
        out->allocated += b->size;
        out->used += b->size - free_bytes;
    }
    pthread_mutex_unlock(&ctx->mem_lock);
    return VKG_SUCCESS;
}

/* Free space in held blocks plus what the budget leaves for new ones. Free ranges are counted whole,
 * so this is an upper bound: fragmentation can still make a request that passes it fail later. */
VkDeviceSize vkg_mem_available(vkg_context *ctx)
{
    if (!ctx->budget) return UINT64_MAX;
    vkg_memory_stats ms;
    vkg_context_memory_stats(ctx, &ms);
    VkDeviceSize left = ctx->budget > ms.allocated ? ctx->budget - ms.allocated : 0;
    return left + (ms.allocated - ms.used);
}

void vkg_memory_destroy_all(vkg_context *ctx)
{
    while (ctx->blocks) {
        vkg_block *b = ctx->blocks;
        ctx->blocks = b->next;
        vkDestroyBuffer(ctx->device, b->buffer, NULL);
        vkFreeMemory(ctx->device, b->memory, NULL);
        free(b->free);
        free(b);
    }
}

typedef struct copy_job {
    VkBuffer src, dst;
    VkBufferCopy region;
} copy_job;

static void record_copy(VkCommandBuffer cb, void *user)
{
    copy_job *j = user;
    vkCmdCopyBuffer(cb, j->src, j->dst, 1, &j->region);
    /* Uploaded data is read by later submissions' shaders, downloads by the host. */
    VkMemoryBarrier mb = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER, .srcAccessMask = VK_ACCESS_TRANSFER_WRITE_BIT,
                          .dstAccessMask = VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_HOST_READ_BIT};
    vkCmdPipelineBarrier(cb, VK_PIPELINE_STAGE_TRANSFER_BIT, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_HOST_BIT,
                         0, 1, &mb, 0, NULL, 0, NULL);
}

static vkg_status check_range(const vkg_buf *buf, VkDeviceSize offset, VkDeviceSize size, const char *what)
{
    if (!buf) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: buffer is NULL", what);
    if (offset > buf->size || size > buf->size - offset)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: range [%llu, +%llu) is outside the buffer of %llu bytes",
                        what, (unsigned long long)offset, (unsigned long long)size, (unsigned long long)buf->size);
    return VKG_SUCCESS;
}

static vkg_status staged_copy(vkg_buf *buf, VkDeviceSize offset, void *host, VkDeviceSize size, bool upload)
{
    vkg_context *ctx = buf->ctx;
    VkBuffer sb;
    VkDeviceMemory sm;
    void *map;
    VKG_TRY(raw_buffer(ctx, size, VK_BUFFER_USAGE_TRANSFER_SRC_BIT | VK_BUFFER_USAGE_TRANSFER_DST_BIT, true, &sb,
                       &sm, &map, NULL));
    copy_job j;
    if (upload) {
        memcpy(map, host, size);
        j = (copy_job){sb, buf->buffer, {0, buf->offset + offset, size}};
    } else {
        j = (copy_job){buf->buffer, sb, {buf->offset + offset, 0, size}};
    }
    vkg_status st = vkg_context_run_once(ctx, record_copy, &j);
    if (st == VKG_SUCCESS && !upload) memcpy(host, map, size);
    vkDestroyBuffer(ctx->device, sb, NULL);
    vkFreeMemory(ctx->device, sm, NULL);
    return st;
}

vkg_status vkg_buf_upload(vkg_buf *buf, VkDeviceSize offset, const void *src, VkDeviceSize size)
{
    VKG_TRY(check_range(buf, offset, size, "vkg_buf_upload"));
    if (size == 0) return VKG_SUCCESS;
    if (buf->mapped) {
        memcpy((char *)buf->mapped + offset, src, size);
        return VKG_SUCCESS;
    }
    return staged_copy(buf, offset, (void *)src, size, true);
}

vkg_status vkg_buf_download(vkg_buf *buf, VkDeviceSize offset, void *dst, VkDeviceSize size)
{
    VKG_TRY(check_range(buf, offset, size, "vkg_buf_download"));
    if (size == 0) return VKG_SUCCESS;
    if (buf->mapped) {
        memcpy(dst, (char *)buf->mapped + offset, size);
        return VKG_SUCCESS;
    }
    return staged_copy(buf, offset, dst, size, false);
}

VkDeviceSize vkg_mem_footprint(const vkg_context *ctx, VkDeviceSize size)
{
    return align_up(size ? size : 4, ctx->alignment);
}
