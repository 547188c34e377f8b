/*
 * vkg: a Vulkan compute graph runtime. This header is the whole public API.
 *
 * Conventions (sokol / SQLite style):
 *  - Every call that can fail returns a vkg_status; on failure vkg_last_error() gives a message
 *    for the calling thread naming what failed (file, tensor, node, Vulkan call and VkResult).
 *  - Description structs (*_desc) are zero-initialised by the caller; zero always means "default".
 *  - Handles are opaque. An object created by vkg_X_create is owned by the caller and released with
 *    vkg_X_destroy; destroy functions accept NULL.
 *  - Threads (docs/EMBEDDING.md, "Threads"): a context and a model may be used from any number of
 *    threads at once; a session from one thread at a time (one session per thread: weights are
 *    shared, activations are per session). Destroy functions need every other call on that object,
 *    and on objects made from it, to have returned. Errors are per thread.
 */
#ifndef VKG_H
#define VKG_H

#include <stddef.h>
#include <stdint.h>
#include <vulkan/vulkan_core.h>

#include "vkg_version.h" /* VKG_VERSION_MAJOR/MINOR/PATCH, VKG_VERSION, VKG_VERSION_STRING */

#ifdef __cplusplus
extern "C" {
#endif

/* VKG_API marks the public functions. The library is compiled with -fvisibility=hidden and
 * VKG_BUILD_LIBRARY, so the shared libvkg.so exports exactly these; in an application it is empty. */
#ifndef VKG_API
#if defined(VKG_BUILD_LIBRARY) && (defined(__GNUC__) || defined(__clang__))
#define VKG_API __attribute__((visibility("default")))
#else
#define VKG_API
#endif
#endif

typedef enum vkg_status {
    VKG_SUCCESS = 0,
    VKG_TIMEOUT = 1,                    /* not an error: vkg_session_wait's time ran out before the run completed */
    VKG_ERROR_INVALID_ARGUMENT = -1,    /* a caller passed something the call cannot accept */
    VKG_ERROR_OUT_OF_HOST_MEMORY = -2,
    VKG_ERROR_OUT_OF_DEVICE_MEMORY = -3, /* message names the size requested */
    VKG_ERROR_NO_DEVICE = -4,           /* no Vulkan device, or none matches VKG_DEVICE */
    VKG_ERROR_VULKAN = -5,              /* a Vulkan call failed; message names it and its VkResult */
    VKG_ERROR_UNSUPPORTED = -6,         /* the device lacks a feature or limit the request needs */
    VKG_ERROR_VALIDATION = -7,          /* the validation layer reported a message (VKG_VALIDATION=1) */
    VKG_ERROR_INVALID_GRAPH = -8,       /* a graph file or graph description is malformed */
    VKG_ERROR_IO = -9,                  /* a file could not be read or written */
    VKG_ERROR_DEVICE_LOST = -10         /* the device is gone (VK_ERROR_DEVICE_LOST): recreate everything */
} vkg_status;

/* Element types of tensors. Zero is fp32, the default everywhere. */
typedef enum vkg_dtype {
    VKG_DTYPE_F32 = 0,
    VKG_DTYPE_F16 = 1,
    VKG_DTYPE_BF16 = 2,
    VKG_DTYPE_I32 = 3,
    VKG_DTYPE_U8 = 4
} vkg_dtype;

/* Static name of a status, e.g. "VKG_ERROR_VULKAN". */
VKG_API const char *vkg_status_name(vkg_status status);

/* Message of the most recent failure on the calling thread ("" if none). Valid until the next
 * failing vkg call on this thread. */
VKG_API const char *vkg_last_error(void);

/* The version of the library actually linked: VKG_MAKE_VERSION encoding and "major.minor.patch".
 * Compare with the header's VKG_VERSION to catch an application built against other headers:
 * within 0.x only the same minor version is compatible, from 1.0 the same major. */
VKG_API uint32_t vkg_version(void);
VKG_API const char *vkg_version_string(void);

/* ---------------------------------------------------------------------------------------------- */
/* Devices                                                                                        */

/* Everything vkg detected about a device, in one place. Optional features are 0 when absent. */
typedef struct vkg_device_info {
    uint32_t index; /* position in vkEnumeratePhysicalDevices order; what VKG_DEVICE=<n> selects */
    char name[256];
    char driver_name[256];
    char driver_info[256];
    uint32_t vendor_id, device_id;
    uint32_t api_version, driver_version;
    VkPhysicalDeviceType type;
    int is_cpu; /* a software rasteriser such as lavapipe */

    /* optional features (detected, and enabled when vkg creates the device) */
    int fp16_arithmetic;   /* shaderFloat16 */
    int storage_16bit;     /* storageBuffer16BitAccess */
    int subgroup_size;     /* 0 when subgroups are unavailable in compute */
    uint32_t subgroup_ops; /* VkSubgroupFeatureFlags supported in compute */
    int subgroup_size_control;
    uint32_t min_subgroup_size, max_subgroup_size;
    int push_descriptors;  /* VK_KHR_push_descriptor */
    int timestamps;        /* compute queue writes timestamps */
    double timestamp_period_ns;
    int cooperative_matrix; /* VK_KHR_cooperative_matrix or VK_NV_cooperative_matrix present */
    int texel_rgba32f;     /* R32G32B32A32_SFLOAT usable as a uniform texel buffer */
    int texel_rgba16f;     /* R16G16B16A16_SFLOAT usable as a uniform texel buffer */
    int timeline_semaphore; /* timelineSemaphore (Vulkan 1.2 core or VK_KHR_timeline_semaphore) */

    /* limits */
    uint64_t max_storage_buffer_range;
    uint64_t max_uniform_buffer_range;
    uint64_t max_texel_buffer_elements;
    uint32_t max_shared_memory;
    uint32_t max_workgroup_invocations;
    uint32_t max_workgroup_size[3];
    uint32_t max_workgroup_count[3];
    uint32_t max_push_constants;
    uint64_t min_storage_offset_alignment;
    uint64_t min_texel_offset_alignment;
    uint64_t device_local_bytes; /* size of the largest device-local heap */
    int unified_memory;          /* a device-local memory type is also host-visible and coherent */
} vkg_device_info;

/* Fills up to *count infos and sets *count to the number of devices. infos may be NULL to query the
 * count. Creates and destroys a temporary instance. */
VKG_API vkg_status vkg_enumerate_devices(vkg_device_info *infos, uint32_t *count);

/* ---------------------------------------------------------------------------------------------- */
/* Context                                                                                        */

typedef struct vkg_context vkg_context;

/* Bits for vkg_context_desc.external.enabled_features: the optional features the host enabled on
 * the VkDevice it hands over. vkg uses nothing the host did not enable. */
enum {
    VKG_FEATURE_FP16_ARITHMETIC = 1u << 0,
    VKG_FEATURE_STORAGE_16BIT = 1u << 1,
    VKG_FEATURE_PUSH_DESCRIPTORS = 1u << 2,
    /* timelineSemaphore enabled (VkPhysicalDeviceVulkan12Features or VkPhysicalDeviceTimelineSemaphoreFeatures,
     * core 1.2 or the extension VK_KHR_timeline_semaphore). Without it, sessions signal their completion
     * on a fence and vkg_submit_desc cannot carry timeline values. */
    VKG_FEATURE_TIMELINE_SEMAPHORE = 1u << 3
};

typedef struct vkg_context_desc {
    /* Device choice when vkg creates the device: an index ("1") or a case-insensitive substring of
     * the device name ("llvmpipe"). NULL: the environment variable VKG_DEVICE, else the best device
     * (discrete > integrated > virtual > CPU, then largest device-local heap). */
    const char *device;
    /* 0: follow VKG_VALIDATION (=1 enables); 1: on; -1: off. With validation on, every message of
     * VK_LAYER_KHRONOS_validation becomes a VKG_ERROR_VALIDATION from the next call that waits on
     * the device, and from vkg_context_check_validation. */
    int validation;
    /* Optional file holding a VkPipelineCache: read at create (if present and valid for this
     * device), written at destroy. */
    const char *pipeline_cache_path;
    /* Bytes per device-memory block from which buffers are suballocated. 0: 64 MiB. */
    uint64_t block_size;
    /* Most bytes of device memory the context may hold (weights, activations, inputs and outputs
     * of every model and session; host-visible staging copies are not counted). 0: no limit. A load
     * or session that would exceed it fails with VKG_ERROR_OUT_OF_DEVICE_MEMORY, and the message
     * says how many bytes it needed and how many the budget had left. */
    uint64_t memory_budget;
    /* Adopt a host application's Vulkan objects instead of creating them. Set instance, physical
     * device, device and queue (a queue of a family with compute); vkg never destroys them. */
    struct {
        VkInstance instance;
        VkPhysicalDevice physical_device;
        VkDevice device;
        VkQueue queue;
        uint32_t queue_family_index;
        uint32_t enabled_features; /* VKG_FEATURE_* bits */
        /* vkQueueSubmit needs the queue externally synchronized. If the application submits to this
         * queue from other threads while vkg calls run, give a lock that its own submissions also
         * take: vkg holds it around each of its vkQueueSubmit calls only (never while waiting).
         * Both or neither; NULL: vkg uses a mutex of its own, which guards vkg's submissions only. */
        void (*lock_queue)(void *user);
        void (*unlock_queue)(void *user);
        void *queue_lock_user;
    } external;
} vkg_context_desc;

/* Creates a context. On success *out is owned by the caller (vkg_context_destroy). */
VKG_API vkg_status vkg_context_create(const vkg_context_desc *desc, vkg_context **out);
VKG_API void vkg_context_destroy(vkg_context *ctx);

/* The detected features and limits. Owned by ctx; valid for its lifetime. */
VKG_API const vkg_device_info *vkg_context_device_info(const vkg_context *ctx);

/* VKG_ERROR_VALIDATION with the first message if the validation layer reported anything since the
 * last check (the count is reset); VKG_SUCCESS otherwise. */
VKG_API vkg_status vkg_context_check_validation(vkg_context *ctx);

/* Number of validation messages received over the context's lifetime. */
VKG_API uint64_t vkg_context_validation_count(const vkg_context *ctx);

/* Device memory of a context: what it holds in blocks (what the driver sees), what of that is in
 * use by weights and sessions, and the budget (0: none). */
typedef struct vkg_memory_stats {
    uint64_t allocated;
    uint64_t used;
    uint64_t budget;
} vkg_memory_stats;
VKG_API vkg_status vkg_context_memory_stats(vkg_context *ctx, vkg_memory_stats *out);

/* The Vulkan objects a context runs on: the adopted ones, or those vkg created (an application may
 * then create its own command pools, buffers and semaphores on that device, e.g. for
 * vkg_session_record and vkg_session_bind_buffer). Owned by vkg when it created them: never destroy
 * them; they live as long as the context. */
typedef struct vkg_vulkan_handles {
    VkInstance instance;
    VkPhysicalDevice physical_device;
    VkDevice device;
    VkQueue queue;               /* the queue every vkg submission goes to */
    uint32_t queue_family_index; /* its family: record vkg work in command buffers of this family */
} vkg_vulkan_handles;
VKG_API vkg_status vkg_context_vulkan(const vkg_context *ctx, vkg_vulkan_handles *out);


/* ---------------------------------------------------------------------------------------------- */
/* Graphs: the .vkg file format (docs/graph-format.md)                                             */

typedef enum vkg_tensor_role {
    VKG_ROLE_INTERMEDIATE = 0,
    VKG_ROLE_INPUT = 1,
    VKG_ROLE_OUTPUT = 2,
    VKG_ROLE_CONSTANT = 3
} vkg_tensor_role;

typedef enum vkg_attr_type {
    VKG_ATTR_INT = 1,
    VKG_ATTR_FLOAT = 2,
    VKG_ATTR_STRING = 3,
    VKG_ATTR_INTS = 4,
    VKG_ATTR_FLOATS = 5
} vkg_attr_type;

#define VKG_MAX_DIMS 8
#define VKG_NO_TENSOR 0xFFFFFFFFu /* an absent optional node input */

/* A tensor's description. dims[i] < 0 marks a symbolic size named sym[i] (e.g. "batch"). */
typedef struct vkg_tensor_info {
    const char *name;
    vkg_dtype dtype;
    vkg_tensor_role role;
    uint32_t rank;
    int64_t dims[VKG_MAX_DIMS];
    const char *sym[VKG_MAX_DIMS];
} vkg_tensor_info;

/* ---- the C writer: builds a graph in code and serializes it ---- */

typedef struct vkg_writer vkg_writer;

typedef struct vkg_writer_tensor {
    const char *name;
    vkg_dtype dtype;
    vkg_tensor_role role;
    uint32_t rank;
    int64_t dims[VKG_MAX_DIMS];  /* < 0: symbolic, named by sym[i] */
    const char *sym[VKG_MAX_DIMS];
    const void *data;            /* constants: data_size bytes, copied by the writer */
    uint64_t data_size;
} vkg_writer_tensor;

typedef struct vkg_writer_attr {
    const char *name;
    vkg_attr_type type;
    uint32_t count;        /* INTS/FLOATS: number of elements; others ignored */
    int64_t i;
    double f;
    const char *s;
    const int64_t *ints;
    const double *floats;
} vkg_writer_attr;

/* *out is owned by the caller (vkg_writer_destroy). */
VKG_API vkg_status vkg_writer_create(vkg_writer **out);
VKG_API void vkg_writer_destroy(vkg_writer *w);
/* Adds a tensor and returns its id. The writer checks nothing a reader would refuse beyond what it
 * needs to serialize (tests write malformed files on purpose through the raw bytes instead). */
VKG_API vkg_status vkg_writer_add_tensor(vkg_writer *w, const vkg_writer_tensor *t, uint32_t *id);
VKG_API vkg_status vkg_writer_add_node(vkg_writer *w, const char *op, const char *name, const uint32_t *inputs,
                                       uint32_t n_inputs, const uint32_t *outputs, uint32_t n_outputs,
                                       const vkg_writer_attr *attrs, uint32_t n_attrs);
VKG_API vkg_status vkg_writer_add_input(vkg_writer *w, uint32_t tensor);
VKG_API vkg_status vkg_writer_add_output(vkg_writer *w, uint32_t tensor);
VKG_API vkg_status vkg_writer_add_metadata(vkg_writer *w, const char *key, const char *value);
VKG_API vkg_status vkg_writer_save(const vkg_writer *w, const char *path);
/* *data is malloc'd and owned by the caller (free). */
VKG_API vkg_status vkg_writer_to_memory(const vkg_writer *w, void **data, size_t *size);

/* ---- models: a loaded, validated graph with its weights on the device ---- */

typedef struct vkg_model vkg_model;

/* Maps, validates and uploads a .vkg file. *out is owned by the caller (vkg_model_destroy), and
 * must be destroyed before ctx. */
VKG_API vkg_status vkg_model_load(vkg_context *ctx, const char *path, vkg_model **out);
/* Same from bytes in memory (an app's own assets); the bytes are copied. */
VKG_API vkg_status vkg_model_load_memory(vkg_context *ctx, const void *data, size_t size, vkg_model **out);
VKG_API void vkg_model_destroy(vkg_model *model);

VKG_API uint32_t vkg_model_input_count(const vkg_model *model);
VKG_API uint32_t vkg_model_output_count(const vkg_model *model);
/* Strings in *out are owned by the model. */
VKG_API vkg_status vkg_model_input(const vkg_model *model, uint32_t i, vkg_tensor_info *out);
VKG_API vkg_status vkg_model_output(const vkg_model *model, uint32_t i, vkg_tensor_info *out);
/* Metadata value for key (e.g. "producer"), NULL if absent. Owned by the model. */
VKG_API const char *vkg_model_metadata(const vkg_model *model, const char *key);

/* ---- sessions: a model at concrete input shapes, recorded once, run many times ---- */

typedef struct vkg_session vkg_session;

typedef struct vkg_dim_binding {
    const char *name; /* a symbolic dimension of the model's inputs, e.g. "batch" */
    int64_t value;
} vkg_dim_binding;

typedef struct vkg_session_desc {
    const vkg_dim_binding *dims; /* every symbol the inputs use must be bound */
    uint32_t n_dims;
    int profile;                 /* record a GPU timestamp after every dispatch */
} vkg_session_desc;

/* Infers every shape, plans activation memory, records the whole graph into one command buffer.
 * *out is owned by the caller (vkg_session_destroy); destroy sessions before their model. */
VKG_API vkg_status vkg_session_create(vkg_model *model, const vkg_session_desc *desc, vkg_session **out);
VKG_API void vkg_session_destroy(vkg_session *s);
/* The concrete description of any tensor of the session (inputs, outputs, intermediates). */
VKG_API vkg_status vkg_session_tensor(const vkg_session *s, const char *name, vkg_tensor_info *out);
/* Copies bytes into a graph input; `bytes` must equal its size. Refused for a tensor bound to an
 * application buffer and while a submit is not yet waited for. */
VKG_API vkg_status vkg_session_set_input(vkg_session *s, const char *name, const void *data, size_t bytes);
/* vkg_session_submit with no semaphores, then vkg_session_wait without a time limit. */
VKG_API vkg_status vkg_session_run(vkg_session *s);
/* Copies a graph output to host memory; same refusals as set_input. */
VKG_API vkg_status vkg_session_get_output(vkg_session *s, const char *name, void *data, size_t bytes);

/* ---- zero copy, asynchronous runs, recording into the application's command buffers
 *      (docs/EMBEDDING.md section 5 has the full synchronization contract) ---- */

/* Binds bytes [offset, offset + size) of the application's `buffer` as the memory of graph input or
 * output `tensor`, instead of vkg's own buffer (set_input/get_output then refuse that tensor: the
 * application reads and writes the buffer itself). Requirements, each checked with a message:
 *  - tensor is a graph input or output (not an intermediate, a constant, or a view of another tensor);
 *  - offset is a multiple of max(64, minStorageBufferOffsetAlignment, minTexelBufferOffsetAlignment);
 *  - size >= the tensor's bytes rounded up to a multiple of 16 (vkg reads and writes whole 4-byte
 *    words and 16-byte texels at a tensor's end: the padding may be overwritten);
 *  - buffer was created on the context's device with VK_BUFFER_USAGE_STORAGE_BUFFER_BIT and
 *    VK_BUFFER_USAGE_UNIFORM_TEXEL_BUFFER_BIT (kernels read some inputs through texel views), and
 *    offset + size lies within it (not checkable by vkg: the validation layer reports it).
 * buffer = VK_NULL_HANDLE unbinds (vkg allocates its own buffer again). vkg never destroys `buffer`;
 * it must outlive the binding. Binding re-records the session's command buffer: refused while a
 * submit is not waited for, and command buffers holding an earlier vkg_session_record of this
 * session must have completed and be recorded again. */
VKG_API vkg_status vkg_session_bind_buffer(vkg_session *s, const char *tensor, VkBuffer buffer, VkDeviceSize offset,
                                           VkDeviceSize size);

/* Records one run of the session into the application's command buffer `cb`: it must be in the
 * recording state, primary, from a pool of the context's queue family, outside a render pass, and
 * submitted to a queue of that family. vkg records:
 *   first, a global memory barrier COMPUTE_SHADER|DRAW_INDIRECT -> COMPUTE_SHADER|DRAW_INDIRECT
 *     (SHADER_WRITE -> SHADER_READ|SHADER_WRITE|INDIRECT_COMMAND_READ), ordering this run after earlier
 *     runs of the same session on the queue; it does NOT cover the application's own work:
 *     before vkg_session_record, make the writes to bound input buffers available and visible to
 *     VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT / VK_ACCESS_SHADER_READ_BIT, and order earlier accesses to
 *     bound output buffers before VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT / VK_ACCESS_SHADER_WRITE_BIT;
 *   then the dispatches (binding compute pipelines, descriptor sets and push constants: rebind your
 *     own compute state afterwards) with the barriers between them;
 *   last, a global memory barrier COMPUTE_SHADER / SHADER_WRITE -> HOST|TRANSFER /
 *     HOST_READ|TRANSFER_READ. Outputs are written at COMPUTE_SHADER with SHADER_WRITE: to consume
 *     them at another stage, record your own barrier from COMPUTE_SHADER / SHADER_WRITE.
 * Inputs and outputs not bound to application buffers are vkg's: set_input before submitting cb,
 * get_output after cb completed (the trailing barrier makes them host-readable). Profiling
 * timestamps are not recorded. The recording uses the session's descriptor sets: do not destroy the
 * session, nor bind buffers to it, until every command buffer holding a recording has completed.
 * May be called any number of times, into as many command buffers. */
VKG_API vkg_status vkg_session_record(vkg_session *s, VkCommandBuffer cb);

/* Optional semaphores for vkg_session_submit. Zero-initialised: none. */
typedef struct vkg_submit_desc {
    const VkSemaphore *wait_semaphores; /* vkg's work starts after these are signalled (waited at ALL_COMMANDS) */
    const uint64_t *wait_values;        /* per wait semaphore, for timeline ones (ignored for binary); NULL: none is a timeline */
    uint32_t n_wait;
    const VkSemaphore *signal_semaphores; /* signalled when vkg's work completed, its writes available */
    const uint64_t *signal_values;        /* per signal semaphore, for timeline ones; NULL: none is a timeline */
    uint32_t n_signal;
} vkg_submit_desc;

/* Submits the session's command buffer on the context's queue and returns at once (desc may be
 * NULL). Completion: vkg_session_wait, or on the GPU the session's timeline semaphore reaching
 * vkg_session_timeline_value, or your signal semaphores (both signalled with all of vkg's writes
 * available). vkg's command buffer starts with no barrier: your GPU work on bound buffers must be
 * ordered before it by wait_semaphores (or have completed, seen by a host wait), and so must any
 * pending execution of a vkg_session_record of this session. Refused (VKG_ERROR_INVALID_ARGUMENT)
 * while an earlier submit of the session has not been waited for with vkg_session_wait. Timeline
 * values in desc need timeline semaphores enabled (vkg_device_info.timeline_semaphore). */
VKG_API vkg_status vkg_session_submit(vkg_session *s, const vkg_submit_desc *desc);
/* Waits up to timeout_ns (0: poll; UINT64_MAX: forever) for the latest submit. VKG_SUCCESS when it
 * completed (or nothing was submitted), VKG_TIMEOUT when not yet, VKG_ERROR_DEVICE_LOST, or
 * VKG_ERROR_VALIDATION (devices vkg created, validation on). */
VKG_API vkg_status vkg_session_wait(vkg_session *s, uint64_t timeout_ns);
/* The session's timeline semaphore (VK_NULL_HANDLE when the device has no timeline semaphores or
 * VKG_DISABLE_TIMELINE=1), and the value it reaches when the latest submit completes (the number of
 * submits so far). Wait on it from the GPU (a wait semaphore of your vkQueueSubmit) or the host
 * (vkWaitSemaphores); never signal it. */
VKG_API VkSemaphore vkg_session_timeline(const vkg_session *s);
VKG_API uint64_t vkg_session_timeline_value(const vkg_session *s);
/* Without timeline semaphores: the fence the latest submit signals (reset by the next submit), else
 * VK_NULL_HANDLE. Wait on it if you like; never reset it. */
VKG_API VkFence vkg_session_fence(const vkg_session *s);
/* Bytes of the activation arena (intermediates sharing memory by lifetime), and what the same
 * tensors would take without sharing. */
VKG_API uint64_t vkg_session_planned_bytes(const vkg_session *s);
VKG_API uint64_t vkg_session_unshared_bytes(const vkg_session *s);
/* Dispatches and memory barriers in the recorded command buffer: each run replays all of them. */
VKG_API uint32_t vkg_session_dispatch_count(const vkg_session *s);
VKG_API uint32_t vkg_session_barrier_count(const vkg_session *s);
/* After a profiled run: the i-th dispatch's node name, op and GPU time. */
VKG_API vkg_status vkg_session_profile(const vkg_session *s, uint32_t i, const char **node, const char **op, double *ns);

/* ---------------------------------------------------------------------------------------------- */
/* LoRA adapters (PEFT files), merged into a loaded model's weights                               */

/* A PEFT LoRA adapter read for one model: adapter_model.safetensors (lora_A (r, in) and lora_B
 * (out, r) per module, keys "base_model.model.<module path>.lora_A[.<name>].weight") with
 * adapter_config.json (r, lora_alpha, target_modules, use_rslora). Module paths resolve to the
 * model's constants "<module path>.weight" used as the weight of linear nodes. docs/EMBEDDING.md,
 * "LoRA adapter files", lists what is refused and how names match. */
typedef struct vkg_adapter vkg_adapter;

/* Reads and checks an adapter against model. dir is the folder holding adapter_model.safetensors and
 * adapter_config.json, or the path of either file (the other is looked for beside it). Keys and
 * target_modules entries that match no weight of the model are not an error: they are listed by
 * vkg_adapter_unmatched. Malformed files fail with VKG_ERROR_INVALID_GRAPH (VKG_ERROR_IO when
 * unreadable), naming the file and the tensor. *out is owned by the caller (vkg_adapter_destroy)
 * and belongs to model: destroy it before the model. It does not change the model's weights. */
VKG_API vkg_status vkg_adapter_load(vkg_model *model, const char *dir, vkg_adapter **out);
/* Destroying an applied adapter leaves its weights merged; vkg_model_apply_adapter(model, NULL, 0)
 * still restores them. */
VKG_API void vkg_adapter_destroy(vkg_adapter *a);
/* Weights the adapter changes, and the adapter keys and target_modules entries it cannot apply. */
VKG_API uint32_t vkg_adapter_matched_count(const vkg_adapter *a);
VKG_API uint32_t vkg_adapter_unmatched_count(const vkg_adapter *a);
/* The i-th unmatched name with its reason, "name: reason"; NULL when i is out of range. Owned by
 * the adapter. */
VKG_API const char *vkg_adapter_unmatched(const vkg_adapter *a, uint32_t i);
/* Makes the model's weights W0 + scale * (lora_alpha / r) * B A for every matched weight (alpha /
 * sqrt(r) with use_rslora), computed on the host in double and rounded once to float, then to the
 * weight's dtype; sessions of the model see the new weights at their next run, at no cost per run.
 * One adapter is applied at a time: a previous one is first undone. a = NULL unloads: the original
 * bytes of the file are uploaded again (outputs then match the base model bit for bit). On failure
 * the model is left with its original weights. Threads: must not overlap a run, submit or pending
 * recorded execution of any session of this model (wait for them first), nor another
 * vkg_model_apply_adapter on the same model. */
VKG_API vkg_status vkg_model_apply_adapter(vkg_model *model, const vkg_adapter *a, float scale);

#ifdef __cplusplus
}
#endif
#endif /* VKG_H */
