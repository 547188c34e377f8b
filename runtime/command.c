/* Command recording: descriptor sets, texel views, the barriers the data flow needs and nothing more,
 * and optional per-dispatch GPU timestamps. A recorded command buffer can be submitted many times. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

typedef struct access {
    VkBuffer buffer;
    VkDeviceSize begin, end;
    bool write;
    bool indirect; /* read as vkCmdDispatchIndirect's arguments, not by a shader */
} access;

/* What the command buffer holds, kept so vkg_cmd_replay can record it again elsewhere. */
typedef enum op_kind { OP_BARRIER, OP_DISPATCH, OP_DISPATCH_INDIRECT } op_kind;

typedef struct op {
    op_kind kind;
    VkPipelineStageFlags src_stage, dst_stage; /* barriers */
    VkAccessFlags src_access, dst_access;
    VkPipeline pipeline; /* dispatches */
    VkPipelineLayout layout;
    VkDescriptorSet set;
    uint32_t push_offset, push_size; /* bytes in vkg_cmd.push */
    uint32_t grid[3];
    VkBuffer args; /* indirect */
    VkDeviceSize args_offset;
} op;

struct vkg_cmd {
    vkg_context *ctx;
    /* Its own pool (command pools are externally synchronized: sessions record and free on their
     * own threads) and, for vkg_cmd_submit_wait, its own fence. */
    VkCommandPool pool;
    VkFence fence;
    VkCommandBuffer cb;
    bool ended, profile;

    VkDescriptorPool *pools;
    uint32_t npools, pool_left;
    VkBufferView *views;
    uint32_t nviews, capviews;

    /* accesses since the last barrier: a new dispatch that conflicts with one of these needs one */
    access *pending;
    uint32_t npending, cappending;

    op *ops;
    uint32_t nops, capops;
    uint8_t *push;
    uint32_t npush, cappush;

    uint32_t ndispatch, nbarrier;
    VkQueryPool queries;
    uint32_t capqueries;
    const char **labels;
    uint64_t *stamps;
    bool stamps_valid;
};

enum { SETS_PER_POOL = 256, MAX_QUERIES = 4096 };

static vkg_status new_pool(vkg_cmd *c)
{
    VkDescriptorPoolSize sizes[2] = {
        {VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, SETS_PER_POOL * VKG_MAX_BINDINGS},
        {VK_DESCRIPTOR_TYPE_UNIFORM_TEXEL_BUFFER, SETS_PER_POOL * VKG_MAX_BINDINGS}};
    VkDescriptorPoolCreateInfo ci = {.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO,
                                     .maxSets = SETS_PER_POOL, .poolSizeCount = 2, .pPoolSizes = sizes};
    VkDescriptorPool *n = realloc(c->pools, (c->npools + 1) * sizeof *n);
    if (!n) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    c->pools = n;
    VKG_VK(vkCreateDescriptorPool(c->ctx->device, &ci, NULL, &c->pools[c->npools]));
    c->npools++;
    c->pool_left = SETS_PER_POOL;
    return VKG_SUCCESS;
}

vkg_status vkg_cmd_begin(vkg_context *ctx, bool profile, vkg_cmd **out)
{
    *out = NULL;
    vkg_cmd *c = calloc(1, sizeof *c);
    if (!c) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    c->ctx = ctx;
    c->profile = profile && ctx->info.timestamps;
    VkCommandPoolCreateInfo pi = {.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
                                  .queueFamilyIndex = ctx->queue_family};
    VkResult r = vkCreateCommandPool(ctx->device, &pi, NULL, &c->pool);
    if (r != VK_SUCCESS) {
        free(c);
        return vkg_fail_vk(r, "vkCreateCommandPool");
    }
    VkCommandBufferAllocateInfo ai = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO,
                                      .commandPool = c->pool, .level = VK_COMMAND_BUFFER_LEVEL_PRIMARY,
                                      .commandBufferCount = 1};
    r = vkAllocateCommandBuffers(ctx->device, &ai, &c->cb);
    if (r != VK_SUCCESS) {
        vkg_cmd_destroy(c);
        return vkg_fail_vk(r, "vkAllocateCommandBuffers");
    }
    VkCommandBufferBeginInfo bi = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO};
    r = vkBeginCommandBuffer(c->cb, &bi);
    if (r != VK_SUCCESS) {
        vkg_cmd_destroy(c);
        return vkg_fail_vk(r, "vkBeginCommandBuffer");
    }
    if (c->profile) {
        /* Stamp 0 opens the command buffer; stamp i+1 closes dispatch i. Reset inside the command
         * buffer so every submission of it measures afresh. */
        VkQueryPoolCreateInfo qi = {.sType = VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO,
                                    .queryType = VK_QUERY_TYPE_TIMESTAMP, .queryCount = MAX_QUERIES};
        r = vkCreateQueryPool(ctx->device, &qi, NULL, &c->queries);
        c->stamps = calloc(MAX_QUERIES, sizeof *c->stamps);
        if (r != VK_SUCCESS || !c->stamps) {
            vkg_cmd_destroy(c);
            return r != VK_SUCCESS ? vkg_fail_vk(r, "vkCreateQueryPool")
                                   : vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        }
        vkCmdResetQueryPool(c->cb, c->queries, 0, MAX_QUERIES);
        vkCmdWriteTimestamp(c->cb, VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT, c->queries, 0);
    }
    *out = c;
    return VKG_SUCCESS;
}

static vkg_status grow_labels(vkg_cmd *c)
{
    uint32_t cap = c->capqueries ? 2 * c->capqueries : 64;
    const char **l = realloc(c->labels, cap * sizeof *l);
    if (!l) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    c->labels = l;
    c->capqueries = cap;
    return VKG_SUCCESS;
}

/* Bytes per texel of the formats kernels bind; 0 for any other. */
static VkDeviceSize texel_bytes(VkFormat f)
{
    switch (f) {
    case VK_FORMAT_R32G32B32A32_SFLOAT: return 16;
    case VK_FORMAT_R16G16B16A16_SFLOAT:
    case VK_FORMAT_R32G32_UINT: return 8;
    case VK_FORMAT_R32_SFLOAT:
    case VK_FORMAT_R32_UINT: return 4;
    case VK_FORMAT_R16_SFLOAT: return 2;
    default: return 0;
    }
}

static bool overlaps(const access *a, VkBuffer buf, VkDeviceSize b, VkDeviceSize e)
{
    return a->buffer == buf && a->begin < e && b < a->end;
}

static vkg_status add_pending(vkg_cmd *c, access a)
{
    if (c->npending == c->cappending) {
        uint32_t cap = c->cappending ? 2 * c->cappending : 32;
        access *n = realloc(c->pending, cap * sizeof *n);
        if (!n) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        c->pending = n;
        c->cappending = cap;
    }
    c->pending[c->npending++] = a;
    return VKG_SUCCESS;
}

static vkg_status log_op(vkg_cmd *c, const op *o, const void *push)
{
    if (c->nops == c->capops) {
        uint32_t cap = c->capops ? 2 * c->capops : 64;
        op *n = realloc(c->ops, cap * sizeof *n);
        if (!n) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        c->ops = n;
        c->capops = cap;
    }
    op *dst = &c->ops[c->nops];
    *dst = *o;
    if (o->push_size && push) {
        if (c->npush + o->push_size > c->cappush) {
            uint32_t cap = c->cappush ? 2 * c->cappush : 1024;
            while (cap < c->npush + o->push_size) cap *= 2;
            uint8_t *n = realloc(c->push, cap);
            if (!n) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
            c->push = n;
            c->cappush = cap;
        }
        memcpy(c->push + c->npush, push, o->push_size);
        dst->push_offset = c->npush;
        c->npush += o->push_size;
    }
    c->nops++;
    return VKG_SUCCESS;
}

static void record_op(VkCommandBuffer cb, const op *o, const uint8_t *push)
{
    if (o->kind == OP_BARRIER) {
        VkMemoryBarrier mb = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER, .srcAccessMask = o->src_access,
                              .dstAccessMask = o->dst_access};
        vkCmdPipelineBarrier(cb, o->src_stage, o->dst_stage, 0, 1, &mb, 0, NULL, 0, NULL);
        return;
    }
    vkCmdBindPipeline(cb, VK_PIPELINE_BIND_POINT_COMPUTE, o->pipeline);
    vkCmdBindDescriptorSets(cb, VK_PIPELINE_BIND_POINT_COMPUTE, o->layout, 0, 1, &o->set, 0, NULL);
    if (o->push_size) vkCmdPushConstants(cb, o->layout, VK_SHADER_STAGE_COMPUTE_BIT, 0, o->push_size, push + o->push_offset);
    if (o->kind == OP_DISPATCH_INDIRECT) vkCmdDispatchIndirect(cb, o->args, o->args_offset);
    else if (o->grid[0] && o->grid[1] && o->grid[2]) vkCmdDispatch(cb, o->grid[0], o->grid[1], o->grid[2]);
}

static vkg_status dispatch(vkg_cmd *c, const vkg_pipeline *p, const vkg_binding *bindings, const void *push,
                           uint32_t gx, uint32_t gy, uint32_t gz, const vkg_buf *args, VkDeviceSize args_offset,
                           const char *label)
{
    vkg_context *ctx = c->ctx;
    if (c->ended) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_cmd_dispatch after the recording ended");
    const vkg_device_info *di = &ctx->info;
    if (gx > di->max_workgroup_count[0] || gy > di->max_workgroup_count[1] || gz > di->max_workgroup_count[2])
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: grid %ux%ux%u exceeds the device's workgroup count limits %ux%ux%u",
                        label ? label : p->desc.shader, gx, gy, gz, di->max_workgroup_count[0],
                        di->max_workgroup_count[1], di->max_workgroup_count[2]);

    VkDescriptorBufferInfo bi[VKG_MAX_BINDINGS];
    VkBufferView views[VKG_MAX_BINDINGS];
    VkWriteDescriptorSet w[VKG_MAX_BINDINGS];
    access acc[VKG_MAX_BINDINGS + 1];
    uint32_t n = p->desc.nbindings;
    for (uint32_t i = 0; i < n; i++) {
        const vkg_binding *b = &bindings[i];
        if (!b->buf) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: binding %u has no buffer", label, i);
        VkDeviceSize avail = b->buf->size > b->offset ? b->buf->size - b->offset : 0;
        VkDeviceSize range = b->range ? b->range : avail;
        if (b->offset > b->buf->size || range > avail)
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: binding %u range [%llu, +%llu) exceeds its buffer of %llu bytes",
                            label, i, (unsigned long long)b->offset, (unsigned long long)range,
                            (unsigned long long)b->buf->size);
        /* Empty tensors bind a valid, unused word; fp16 data of odd length is read as whole 32-bit
         * words. Both stay inside the allocation, which is padded to a multiple of 64 bytes. */
        range = range ? (range + 3) / 4 * 4 : 4;
        VkDeviceSize abs = b->buf->offset + b->offset;
        /* An application buffer ends where the application said: the rounding must stay inside. */
        VkDeviceSize limit = b->buf->capacity;
        VkDeviceSize whole = b->format != VK_FORMAT_UNDEFINED && p->desc.bindings[i] != VKG_BIND_STORAGE
                                 ? texel_bytes(b->format) : 4;
        if (limit && whole && b->offset + (range + whole - 1) / whole * whole > limit)
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                            "%s: binding %u covers bytes [%llu, %llu) of an application buffer range of %llu bytes "
                            "(whole %llu-byte %s); bind a larger range", label, i, (unsigned long long)b->offset,
                            (unsigned long long)(b->offset + (range + whole - 1) / whole * whole),
                            (unsigned long long)limit, (unsigned long long)whole, whole == 4 ? "words" : "texels");
        acc[i] = (access){b->buf->buffer, abs, abs + range, b->write, false};
        w[i] = (VkWriteDescriptorSet){.sType = VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET, .dstBinding = i,
                                      .descriptorCount = 1};
        if (p->desc.bindings[i] == VKG_BIND_STORAGE) {
            if (range > di->max_storage_buffer_range)
                return vkg_fail(VKG_ERROR_UNSUPPORTED,
                                "%s: binding %u is %llu bytes, over the device's maxStorageBufferRange of %llu",
                                label, i, (unsigned long long)range, (unsigned long long)di->max_storage_buffer_range);
            if (abs % di->min_storage_offset_alignment)
                return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: binding %u offset %llu is not a multiple of %llu",
                                label, i, (unsigned long long)abs, (unsigned long long)di->min_storage_offset_alignment);
            bi[i] = (VkDescriptorBufferInfo){b->buf->buffer, abs, range};
            w[i].descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER;
            w[i].pBufferInfo = &bi[i];
        } else {
            VkDeviceSize texel = texel_bytes(b->format);
            if (!texel)
                return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: binding %u has texel format %d, which vkg does not use",
                                label, i, (int)b->format);
            /* Whole texels only; a partial last texel is read through the allocation's padding
             * (every suballocation is rounded up to 64 bytes), and kernels ignore it. */
            range = (range + texel - 1) / texel * texel;
            if (range / texel > di->max_texel_buffer_elements)
                return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: binding %u has %llu texels, over maxTexelBufferElements %llu",
                                label, i, (unsigned long long)(range / texel),
                                (unsigned long long)di->max_texel_buffer_elements);
            if (abs % di->min_texel_offset_alignment)
                return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: texel binding %u offset %llu is not a multiple of %llu",
                                label, i, (unsigned long long)abs, (unsigned long long)di->min_texel_offset_alignment);
            VkBufferViewCreateInfo vi = {.sType = VK_STRUCTURE_TYPE_BUFFER_VIEW_CREATE_INFO, .buffer = b->buf->buffer,
                                         .format = b->format, .offset = abs, .range = range};
            VKG_VK(vkCreateBufferView(ctx->device, &vi, NULL, &views[i]));
            if (c->nviews == c->capviews) {
                uint32_t cap = c->capviews ? 2 * c->capviews : 32;
                VkBufferView *nv = realloc(c->views, cap * sizeof *nv);
                if (!nv) {
                    vkDestroyBufferView(ctx->device, views[i], NULL);
                    return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
                }
                c->views = nv;
                c->capviews = cap;
            }
            c->views[c->nviews++] = views[i];
            w[i].descriptorType = VK_DESCRIPTOR_TYPE_UNIFORM_TEXEL_BUFFER;
            w[i].pTexelBufferView = &views[i];
        }
    }

    if (c->pool_left == 0) VKG_TRY(new_pool(c));
    VkDescriptorSetAllocateInfo ai = {.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO,
                                      .descriptorPool = c->pools[c->npools - 1], .descriptorSetCount = 1,
                                      .pSetLayouts = &p->set_layout};
    VkDescriptorSet set;
    VKG_VK(vkAllocateDescriptorSets(ctx->device, &ai, &set));
    c->pool_left--;
    for (uint32_t i = 0; i < n; i++) w[i].dstSet = set;
    vkUpdateDescriptorSets(ctx->device, n, w, 0, NULL);

    /* Hazards: read-after-write and write-after-write need the writes made visible; write-after-read
     * needs only ordering, but one global memory barrier covers both and costs the same. */
    uint32_t nacc = n;
    if (args) {
        VkDeviceSize abs = args->offset + args_offset;
        if (args_offset % 4 || args_offset > args->size || args->size - args_offset < 12)
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: indirect arguments at offset %llu do not fit their buffer",
                            label, (unsigned long long)args_offset);
        acc[nacc++] = (access){args->buffer, abs, abs + 12, false, true};
    }
    bool need = false, indirect = args != NULL;
    for (uint32_t i = 0; i < nacc && !need; i++)
        for (uint32_t j = 0; j < c->npending && !need; j++)
            if ((c->pending[j].write || acc[i].write) && overlaps(&c->pending[j], acc[i].buffer, acc[i].begin, acc[i].end))
                need = true;
    if (need) {
        /* Indirect arguments are read by the dispatch itself (the DRAW_INDIRECT stage), before any
         * shader runs: a barrier that guards them names that stage and access. */
        bool src_indirect = false;
        for (uint32_t j = 0; j < c->npending; j++) src_indirect |= c->pending[j].indirect;
        VkMemoryBarrier mb = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER,
                              .srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_SHADER_READ_BIT,
                              .dstAccessMask = VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT |
                                               (indirect ? VK_ACCESS_INDIRECT_COMMAND_READ_BIT : 0)};
        if (src_indirect) mb.srcAccessMask |= VK_ACCESS_INDIRECT_COMMAND_READ_BIT;
        VkPipelineStageFlags src = VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT |
                                   (src_indirect ? VK_PIPELINE_STAGE_DRAW_INDIRECT_BIT : 0);
        VkPipelineStageFlags dst = VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT |
                                   (indirect ? VK_PIPELINE_STAGE_DRAW_INDIRECT_BIT : 0);
        op bo = {.kind = OP_BARRIER, .src_stage = src, .dst_stage = dst, .src_access = mb.srcAccessMask,
                 .dst_access = mb.dstAccessMask};
        VKG_TRY(log_op(c, &bo, NULL));
        record_op(c->cb, &bo, NULL);
        c->npending = 0;
        c->nbarrier++;
    }
    for (uint32_t i = 0; i < nacc; i++) VKG_TRY(add_pending(c, acc[i]));

    if (c->profile && c->ndispatch + 1 >= MAX_QUERIES)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "profiling records at most %d dispatches per command buffer",
                        MAX_QUERIES - 1);
    op d = {.kind = args ? OP_DISPATCH_INDIRECT : OP_DISPATCH, .pipeline = p->pipeline, .layout = p->layout,
            .set = set, .push_size = p->desc.push_size, .grid = {gx, gy, gz},
            .args = args ? args->buffer : VK_NULL_HANDLE, .args_offset = args ? args->offset + args_offset : 0};
    VKG_TRY(log_op(c, &d, push));
    record_op(c->cb, &c->ops[c->nops - 1], c->push);
    if (c->profile) {
        if (c->ndispatch >= c->capqueries) VKG_TRY(grow_labels(c));
        c->labels[c->ndispatch] = label ? label : p->desc.shader;
        vkCmdWriteTimestamp(c->cb, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, c->queries, c->ndispatch + 1);
    }
    c->ndispatch++;
    return VKG_SUCCESS;
}

vkg_status vkg_cmd_dispatch(vkg_cmd *c, const vkg_pipeline *p, const vkg_binding *bindings, const void *push,
                            uint32_t gx, uint32_t gy, uint32_t gz, const char *label)
{
    return dispatch(c, p, bindings, push, gx, gy, gz, NULL, 0, label);
}

vkg_status vkg_cmd_dispatch_indirect(vkg_cmd *c, const vkg_pipeline *p, const vkg_binding *bindings, const void *push,
                                     const vkg_buf *args, VkDeviceSize args_offset, const char *label)
{
    if (!args) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: no indirect argument buffer", label);
    return dispatch(c, p, bindings, push, 0, 0, 0, args, args_offset, label);
}

vkg_status vkg_cmd_end(vkg_cmd *c)
{
    if (c->ended) return VKG_SUCCESS;
    /* Results are read by the host after the fence: make shader writes visible to it. */
    op end = {.kind = OP_BARRIER, .src_stage = VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT,
              .dst_stage = VK_PIPELINE_STAGE_HOST_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT,
              .src_access = VK_ACCESS_SHADER_WRITE_BIT, .dst_access = VK_ACCESS_HOST_READ_BIT | VK_ACCESS_TRANSFER_READ_BIT};
    VKG_TRY(log_op(c, &end, NULL));
    record_op(c->cb, &end, NULL);
    VKG_VK(vkEndCommandBuffer(c->cb));
    c->ended = true;
    return VKG_SUCCESS;
}

vkg_status vkg_cmd_submit_wait(vkg_cmd *c)
{
    vkg_context *ctx = c->ctx;
    VKG_TRY(vkg_cmd_end(c));
    if (!c->fence) {
        VkFenceCreateInfo fci = {.sType = VK_STRUCTURE_TYPE_FENCE_CREATE_INFO};
        VKG_VK(vkCreateFence(ctx->device, &fci, NULL, &c->fence));
    }
    VkSubmitInfo si = {.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO, .commandBufferCount = 1, .pCommandBuffers = &c->cb};
    VkResult r = vkg_queue_submit(ctx, &si, c->fence);
    if (r != VK_SUCCESS) return vkg_fail_vk(r, "vkQueueSubmit");
    r = vkg_wait_fence(ctx, c->fence, UINT64_MAX);
    vkResetFences(ctx->device, 1, &c->fence);
    if (r != VK_SUCCESS) return vkg_fail_vk(r, "vkWaitForFences");
    return vkg_cmd_complete(c);
}

vkg_status vkg_cmd_complete(vkg_cmd *c)
{
    if (c->queries && c->ndispatch) {
        VkResult r = vkGetQueryPoolResults(c->ctx->device, c->queries, 0, c->ndispatch + 1,
                                           (c->ndispatch + 1) * sizeof(uint64_t), c->stamps, sizeof(uint64_t),
                                           VK_QUERY_RESULT_64_BIT | VK_QUERY_RESULT_WAIT_BIT);
        if (r != VK_SUCCESS) return vkg_fail_vk(r, "vkGetQueryPoolResults");
        c->stamps_valid = true;
    }
    return vkg_context_check_validation(c->ctx);
}

vkg_status vkg_cmd_submit(vkg_cmd *c, const vkg_cmd_submit_info *in)
{
    vkg_context *ctx = c->ctx;
    VKG_TRY(vkg_cmd_end(c));
    uint32_t nsig = in->n_signal + (in->timeline ? 1u : 0u);
    bool values = in->timeline || in->wait_values || in->signal_values;
    if (values && !ctx->info.timeline_semaphore)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "timeline semaphore values given, but the device has no timeline "
                        "semaphores enabled for vkg (an adopted device needs VKG_FEATURE_TIMELINE_SEMAPHORE)");
    /* One allocation for every array of the submission. */
    size_t n = (size_t)in->n_wait + nsig;
    uint8_t *mem = malloc(n * (sizeof(VkSemaphore) + sizeof(uint64_t)) + in->n_wait * sizeof(VkPipelineStageFlags) + 1);
    if (!mem) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    uint64_t *wait_v = (uint64_t *)mem, *sig_v = wait_v + in->n_wait;
    VkSemaphore *sig = (VkSemaphore *)(sig_v + nsig);
    VkPipelineStageFlags *stages = (VkPipelineStageFlags *)(sig + nsig);
    for (uint32_t i = 0; i < in->n_wait; i++) {
        wait_v[i] = in->wait_values ? in->wait_values[i] : 0;
        stages[i] = VK_PIPELINE_STAGE_ALL_COMMANDS_BIT;
    }
    for (uint32_t i = 0; i < in->n_signal; i++) {
        sig[i] = in->signal[i];
        sig_v[i] = in->signal_values ? in->signal_values[i] : 0;
    }
    if (in->timeline) {
        sig[in->n_signal] = in->timeline;
        sig_v[in->n_signal] = in->timeline_value;
    }
    VkTimelineSemaphoreSubmitInfo ts = {.sType = VK_STRUCTURE_TYPE_TIMELINE_SEMAPHORE_SUBMIT_INFO,
                                        .waitSemaphoreValueCount = in->n_wait, .pWaitSemaphoreValues = wait_v,
                                        .signalSemaphoreValueCount = nsig, .pSignalSemaphoreValues = sig_v};
    VkSubmitInfo si = {.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO, .pNext = values ? &ts : NULL,
                       .waitSemaphoreCount = in->n_wait, .pWaitSemaphores = in->wait, .pWaitDstStageMask = stages,
                       .commandBufferCount = 1, .pCommandBuffers = &c->cb,
                       .signalSemaphoreCount = nsig, .pSignalSemaphores = sig};
    VkResult r = vkg_queue_submit(ctx, &si, in->fence);
    free(mem);
    if (r != VK_SUCCESS) return vkg_fail_vk(r, "vkQueueSubmit");
    return VKG_SUCCESS;
}

vkg_status vkg_cmd_replay(const vkg_cmd *c, VkCommandBuffer cb)
{
    if (!c->ended) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_cmd_replay: the recording has not ended");
    /* Earlier executions of this work (same memory: the arena, outputs, indirect arguments) finish
     * their accesses before this one starts. */
    op lead = {.kind = OP_BARRIER,
               .src_stage = VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_DRAW_INDIRECT_BIT,
               .dst_stage = VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_DRAW_INDIRECT_BIT,
               .src_access = VK_ACCESS_SHADER_WRITE_BIT,
               .dst_access = VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_INDIRECT_COMMAND_READ_BIT};
    record_op(cb, &lead, NULL);
    for (uint32_t i = 0; i < c->nops; i++) record_op(cb, &c->ops[i], c->push);
    return VKG_SUCCESS;
}

void vkg_cmd_destroy(vkg_cmd *c)
{
    if (!c) return;
    VkDevice dev = c->ctx->device;
    if (c->cb) vkFreeCommandBuffers(dev, c->pool, 1, &c->cb);
    if (c->pool) vkDestroyCommandPool(dev, c->pool, NULL);
    if (c->fence) vkDestroyFence(dev, c->fence, NULL);
    for (uint32_t i = 0; i < c->npools; i++) vkDestroyDescriptorPool(dev, c->pools[i], NULL);
    for (uint32_t i = 0; i < c->nviews; i++) vkDestroyBufferView(dev, c->views[i], NULL);
    if (c->queries) vkDestroyQueryPool(dev, c->queries, NULL);
    free(c->pools);
    free(c->views);
    free(c->pending);
    free(c->ops);
    free(c->push);
    free(c->labels);
    free(c->stamps);
    free(c);
}

vkg_context *vkg_cmd_context(const vkg_cmd *c) { return c->ctx; }
uint32_t vkg_cmd_dispatch_count(const vkg_cmd *c) { return c->ndispatch; }
uint32_t vkg_cmd_barrier_count(const vkg_cmd *c) { return c->nbarrier; }

vkg_status vkg_cmd_dispatch_time_ns(const vkg_cmd *c, uint32_t i, double *ns, const char **label)
{
    if (!c->stamps_valid || i >= c->ndispatch)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "no timestamp for dispatch %u (profiling %s)", i,
                        c->profile ? "on, not yet submitted" : "off or unsupported");
    *ns = (double)(c->stamps[i + 1] - c->stamps[i]) * c->ctx->info.timestamp_period_ns;
    if (label) *label = c->labels[i];
    return VKG_SUCCESS;
}

void vkg_grid_1d(const vkg_context *ctx, uint64_t groups, uint32_t *gx, uint32_t *gy)
{
    uint64_t maxx = ctx->info.max_workgroup_count[0];
    if (groups <= maxx) {
        *gx = (uint32_t)groups;
        *gy = groups ? 1 : 0;
        return;
    }
    *gy = (uint32_t)((groups + maxx - 1) / maxx);
    *gx = (uint32_t)((groups + *gy - 1) / *gy);
}
