/* Internal runtime API shared by runtime/, graph/, loaders/, tools/, bench/ and tests/.
 * Not installed: applications use include/vkg.h only. */
#ifndef VKG_INTERNAL_H
#define VKG_INTERNAL_H

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <vulkan/vulkan.h>

#include "vkg.h"

#define VKG_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define VKG_MIN(a, b) ((a) < (b) ? (a) : (b))
#define VKG_MAX(a, b) ((a) > (b) ? (a) : (b))

/* ---- errors (runtime/error.c) ---- */

/* Records a formatted message for this thread and returns status, so failures read
 * `return vkg_fail(VKG_ERROR_X, "...", ...);`. */
vkg_status vkg_fail(vkg_status status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prepends "context: " to the current message (for callers that add which tensor/node failed). */
vkg_status vkg_fail_prefix(vkg_status status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
const char *vkg_vk_result_name(VkResult r);
/* Maps a failed VkResult to a status and records "<call> failed: <VkResult>". */
vkg_status vkg_fail_vk(VkResult r, const char *call);

#define VKG_VK(call)                                                                              \
    do {                                                                                          \
        VkResult vkg__r = (call);                                                                 \
        if (vkg__r != VK_SUCCESS) return vkg_fail_vk(vkg__r, #call);                              \
    } while (0)

#define VKG_TRY(expr)                                                                             \
    do {                                                                                          \
        vkg_status vkg__s = (expr);                                                               \
        if (vkg__s != VKG_SUCCESS) return vkg__s;                                                 \
    } while (0)

/* ---- memory (runtime/memory.c) ---- */

typedef struct vkg_block vkg_block;

/* A suballocated range of one device-memory block. Owned by whoever called vkg_buf_create. */
typedef struct vkg_buf {
    vkg_context *ctx;
    vkg_block *block;
    VkBuffer buffer;      /* the block's VkBuffer; bind with offset */
    VkDeviceSize offset;  /* of this range within buffer */
    VkDeviceSize size;    /* bytes requested */
    void *mapped;         /* host pointer when the block is host-visible, else NULL */
    /* Bytes from `offset` that bindings may touch once rounded up to whole words or texels. 0 for
     * vkg's own allocations (padded to the context's alignment); set for an application's VkBuffer
     * wrapped by vkg_session_bind_buffer (block NULL), whose range ends where the application said. */
    VkDeviceSize capacity;
} vkg_buf;

vkg_status vkg_buf_create(vkg_context *ctx, VkDeviceSize size, vkg_buf **out);
void vkg_buf_destroy(vkg_buf *buf);
/* Host <-> device copies; through a mapping on unified memory, through a staging buffer otherwise.
 * Both wait for completion. */
vkg_status vkg_buf_upload(vkg_buf *buf, VkDeviceSize offset, const void *src, VkDeviceSize size);
vkg_status vkg_buf_download(vkg_buf *buf, VkDeviceSize offset, void *dst, VkDeviceSize size);
/* Bytes currently allocated from device memory blocks (for tests and reports). */
VkDeviceSize vkg_mem_block_bytes(const vkg_context *ctx);
/* Bytes of device memory new buffers can still get within the context's budget (UINT64_MAX without
 * one): an upper bound, since free ranges are counted whole. */
VkDeviceSize vkg_mem_available(vkg_context *ctx);
/* A buffer of `size` bytes takes this many bytes of a block. */
VkDeviceSize vkg_mem_footprint(const vkg_context *ctx, VkDeviceSize size);

/* ---- pipelines (runtime/pipeline.c) ---- */

enum { VKG_MAX_BINDINGS = 12, VKG_MAX_SPEC = 16 };

typedef enum vkg_bind_kind {
    VKG_BIND_STORAGE = 0,       /* std430 storage buffer */
    VKG_BIND_UNIFORM_TEXEL = 1  /* samplerBuffer */
} vkg_bind_kind;

typedef struct vkg_pipeline_desc {
    const char *shader; /* embedded blob name */
    uint32_t nbindings;
    vkg_bind_kind bindings[VKG_MAX_BINDINGS];
    uint32_t push_size; /* bytes */
    uint32_t nspec;     /* constants with constant_id 0..nspec-1, all 32-bit */
    uint32_t spec[VKG_MAX_SPEC];
} vkg_pipeline_desc;

typedef struct vkg_pipeline {
    vkg_pipeline_desc desc;
    VkDescriptorSetLayout set_layout;
    VkPipelineLayout layout;
    VkPipeline pipeline;
} vkg_pipeline;

/* Returns the context's cached pipeline for desc, creating it on first use. Owned by ctx. */
vkg_status vkg_pipeline_get(vkg_context *ctx, const vkg_pipeline_desc *desc, const vkg_pipeline **out);

/* ---- command recording (runtime/command.c) ---- */

/* One binding of a dispatch: a byte range of a buffer, seen as a storage buffer or as a texel buffer
 * of `format`. */
typedef struct vkg_binding {
    const vkg_buf *buf;
    VkDeviceSize offset;
    VkDeviceSize range; /* bytes; 0 = to the end of buf */
    VkFormat format;    /* texel bindings only */
    bool write;         /* the shader writes it (drives barriers) */
} vkg_binding;

typedef struct vkg_cmd vkg_cmd;

/* Starts recording. *out is owned by the caller (vkg_cmd_destroy). `profile` records a GPU
 * timestamp after every dispatch when the device supports timestamps. */
vkg_status vkg_cmd_begin(vkg_context *ctx, bool profile, vkg_cmd **out);
/* Records one dispatch; inserts a barrier first only if it reads or writes memory that an earlier,
 * not yet fenced-off dispatch of this command buffer wrote (or writes what one read). `label` names
 * the dispatch in profiles (kept by pointer: static strings). */
vkg_status vkg_cmd_dispatch(vkg_cmd *cmd, const vkg_pipeline *p, const vkg_binding *bindings,
                            const void *push, uint32_t gx, uint32_t gy, uint32_t gz, const char *label);
/* The same with the grid read on the device from 3 u32 (x, y, z) at args_offset of args, which an
 * earlier dispatch may have written (the barrier covers the indirect read). The grid must stay
 * within the device's workgroup count limits: the kernel that writes it clamps. */
vkg_status vkg_cmd_dispatch_indirect(vkg_cmd *cmd, const vkg_pipeline *p, const vkg_binding *bindings,
                                     const void *push, const vkg_buf *args, VkDeviceSize args_offset,
                                     const char *label);
/* Ends recording (once); afterwards the command buffer may be submitted any number of times. */
vkg_status vkg_cmd_end(vkg_cmd *cmd);
/* Submits and waits. Ends recording first if needed. Returns VKG_ERROR_VALIDATION if the layer
 * spoke meanwhile. */
vkg_status vkg_cmd_submit_wait(vkg_cmd *cmd);

/* One asynchronous submission of a recorded command buffer: the application's semaphores to wait
 * for (at ALL_COMMANDS) and to signal, with values for timeline semaphores (NULL: all 0, fine for
 * binary ones), and vkg's own completion: `timeline` reaching `timeline_value`, or `fence`. */
typedef struct vkg_cmd_submit_info {
    const VkSemaphore *wait;
    const uint64_t *wait_values;
    uint32_t n_wait;
    const VkSemaphore *signal;
    const uint64_t *signal_values;
    uint32_t n_signal;
    VkSemaphore timeline;
    uint64_t timeline_value;
    VkFence fence;
} vkg_cmd_submit_info;

/* Ends recording if needed and submits on the context's queue without waiting. */
vkg_status vkg_cmd_submit(vkg_cmd *cmd, const vkg_cmd_submit_info *info);
/* After the caller observed a submission's completion: reads the timestamps of a profiled command
 * buffer and reports validation messages. */
vkg_status vkg_cmd_complete(vkg_cmd *cmd);
/* Records the same work (pipelines, descriptor sets, push constants, dispatches, barriers; no
 * timestamps) into `cb`, an application command buffer in the recording state, between a leading
 * barrier that orders it after earlier executions of this work and the trailing barrier that
 * vkg_cmd_end records (shader writes -> host and transfer reads). The descriptor sets stay owned by
 * cmd: it must outlive every execution of cb. */
vkg_status vkg_cmd_replay(const vkg_cmd *cmd, VkCommandBuffer cb);
void vkg_cmd_destroy(vkg_cmd *cmd);
vkg_context *vkg_cmd_context(const vkg_cmd *cmd);
uint32_t vkg_cmd_dispatch_count(const vkg_cmd *cmd);
uint32_t vkg_cmd_barrier_count(const vkg_cmd *cmd);
/* After a profiled submit: GPU time of dispatch i in nanoseconds, and its label. */
vkg_status vkg_cmd_dispatch_time_ns(const vkg_cmd *cmd, uint32_t i, double *ns, const char **label);

/* Splits `groups` workgroups into an x,y grid within the device's per-dimension limit. */
void vkg_grid_1d(const vkg_context *ctx, uint64_t groups, uint32_t *gx, uint32_t *gy);

/* ---- context internals (runtime/context.c) ---- */

struct vkg_context {
    vkg_device_info info;
    bool owns_instance, owns_device;
    VkInstance instance;
    VkPhysicalDevice phys;
    VkDevice device;
    VkQueue queue;
    uint32_t queue_family;
    VkDebugUtilsMessengerEXT messenger;
    bool validation;
    uint64_t validation_total;  /* messages over the lifetime */
    uint64_t validation_unseen; /* since the last check */
    char validation_first[1024];

    /* Thread safety (docs/EMBEDDING.md, "Threads"): objects shared by every session of the context
     * are guarded here; sessions own their command pool, command buffer, descriptor pools and fence.
     *  - mem_lock: the block list and its free lists (every vkg_buf_create / vkg_buf_destroy);
     *  - pipe_lock: the pipeline list;
     *  - val_lock: the validation counters and first message (the layer calls back on any thread);
     *  - once_lock: cmd_pool and fence below, which only vkg_context_run_once uses;
     *  - queue_lock: vkQueueSubmit on `queue` (externally synchronized in Vulkan), or the
     *    application's lock_queue/unlock_queue for an adopted queue.
     * Lock order: once_lock before queue_lock; mem_lock and pipe_lock are never held together, and
     * val_lock is innermost (held only inside the callback and vkg_context_check_validation). */
    pthread_mutex_t mem_lock, pipe_lock, val_lock, once_lock, queue_lock;
    bool locks_ready;
    void (*lock_queue)(void *user);
    void (*unlock_queue)(void *user);
    void *queue_lock_user;
    VkCommandPool cmd_pool;
    VkFence fence;
    /* Set by the first VK_ERROR_DEVICE_LOST: every later submission fails fast with the same status;
     * the application destroys and recreates the context. */
    atomic_bool lost;
    /* Test-only fault injection (vkg_context_inject_fault): the countdown-th call at the site returns
     * `result` instead of reaching the driver. 0: off. */
    atomic_uint fault_countdown[3];
    VkResult fault_result[3];
    /* Device-memory budget: 0 none; otherwise block memory never exceeds it. */
    VkDeviceSize budget;
    /* Timeline semaphores: info.timeline_semaphore says the device has them enabled (application
     * semaphores may be timelines); use_timeline, that sessions signal their completion on one
     * (false with VKG_DISABLE_TIMELINE=1: a fence per session instead). wait_semaphores is
     * vkWaitSemaphores of Vulkan 1.2 or vkWaitSemaphoresKHR. */
    bool use_timeline;
    PFN_vkWaitSemaphores wait_semaphores;
    VkPipelineCache pipeline_cache;
    char *pipeline_cache_path;

    bool force_staging;
    int matmul_variant;
    uint32_t max_storage_per_stage, max_texel_per_stage; /* descriptor limits some kernels exceed the minimum of */    /* VKG_MATMUL_VARIANT: 0 the device's preset, 1 tiled, 2 texel */    /* VKG_FORCE_STAGING=1: never map blocks; tests the discrete-GPU copy path */
    VkDeviceSize block_size;
    VkDeviceSize alignment; /* every suballocation offset is a multiple of this */
    VkDeviceSize max_allocation; /* maxMemoryAllocationSize */
    vkg_block *blocks;

    vkg_pipeline **pipelines;
    uint32_t npipelines, cap_pipelines;
};

/* Runs a one-shot command buffer (uploads, downloads) and waits. */
vkg_status vkg_context_run_once(vkg_context *ctx, void (*record)(VkCommandBuffer, void *), void *user);

/* Where vkg_context_inject_fault makes a Vulkan call fail. */
typedef enum vkg_fault_site {
    VKG_FAULT_SUBMIT = 0, /* vkQueueSubmit */
    VKG_FAULT_WAIT = 1,   /* vkWaitForFences / vkWaitSemaphores after a submit (the work still runs) */
    VKG_FAULT_ALLOC = 2   /* vkAllocateMemory of a device-memory block */
} vkg_fault_site;
/* Tests only: the `nth` (1-based) next call at `site` returns `result` without reaching the driver
 * (lavapipe cannot lose its device or run out of memory on demand). nth = 0 disarms. */
void vkg_context_inject_fault(vkg_context *ctx, vkg_fault_site site, uint32_t nth, VkResult result);
/* The injected result for this call at `site`, or VK_SUCCESS to go ahead. */
VkResult vkg_context_fault(vkg_context *ctx, vkg_fault_site site);
/* Records a Vulkan result: VK_ERROR_DEVICE_LOST marks the context lost for good. Returns r. */
VkResult vkg_context_note(vkg_context *ctx, VkResult r);
/* VKG_ERROR_DEVICE_LOST with a message saying what to do when the device was lost earlier. */
vkg_status vkg_context_alive(vkg_context *ctx, const char *call);
/* vkQueueSubmit on the context's queue under its queue lock, after the lost and fault checks. */
VkResult vkg_queue_submit(vkg_context *ctx, const VkSubmitInfo *si, VkFence fence);
/* Waits for `fence`, noting the result (fault site VKG_FAULT_WAIT). */
VkResult vkg_wait_fence(vkg_context *ctx, VkFence fence, uint64_t timeout_ns);

#endif
