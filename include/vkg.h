/*
 * vkg: a Vulkan compute graph runtime. This header is the whole public API.
 *
 * Conventions (sokol / SQLite style):
 *  - Every call that can fail returns a vkg_status; on failure vkg_last_error() gives a message
 *    for the calling thread naming what failed (file, tensor, node, Vulkan call and VkResult).
 *  - Description structs (*_desc) are zero-initialised by the caller; zero always means "default".
 *  - Handles are opaque. An object created by vkg_X_create is owned by the caller and released with
 *    vkg_X_destroy; destroy functions accept NULL.
 */
#ifndef VKG_H
#define VKG_H

#include <stddef.h>
#include <stdint.h>
#include <vulkan/vulkan_core.h>

#ifdef __cplusplus
extern "C" {
#endif

#define VKG_VERSION_MAJOR 0
#define VKG_VERSION_MINOR 1
#define VKG_VERSION_PATCH 0

typedef enum vkg_status {
    VKG_SUCCESS = 0,
    VKG_ERROR_INVALID_ARGUMENT = -1,    /* a caller passed something the call cannot accept */
    VKG_ERROR_OUT_OF_HOST_MEMORY = -2,
    VKG_ERROR_OUT_OF_DEVICE_MEMORY = -3, /* message names the size requested */
    VKG_ERROR_NO_DEVICE = -4,           /* no Vulkan device, or none matches VKG_DEVICE */
    VKG_ERROR_VULKAN = -5,              /* a Vulkan call failed; message names it and its VkResult */
    VKG_ERROR_UNSUPPORTED = -6,         /* the device lacks a feature or limit the request needs */
    VKG_ERROR_VALIDATION = -7,          /* the validation layer reported a message (VKG_VALIDATION=1) */
    VKG_ERROR_INVALID_GRAPH = -8,       /* a graph file or graph description is malformed */
    VKG_ERROR_IO = -9,                  /* a file could not be read or written */
    VKG_ERROR_DEVICE_LOST = -10
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
const char *vkg_status_name(vkg_status status);

/* Message of the most recent failure on the calling thread ("" if none). Valid until the next
 * failing vkg call on this thread. */
const char *vkg_last_error(void);

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
vkg_status vkg_enumerate_devices(vkg_device_info *infos, uint32_t *count);

/* ---------------------------------------------------------------------------------------------- */
/* Context                                                                                        */

typedef struct vkg_context vkg_context;

/* Bits for vkg_context_desc.external.enabled_features: the optional features the host enabled on
 * the VkDevice it hands over. vkg uses nothing the host did not enable. */
enum {
    VKG_FEATURE_FP16_ARITHMETIC = 1u << 0,
    VKG_FEATURE_STORAGE_16BIT = 1u << 1,
    VKG_FEATURE_PUSH_DESCRIPTORS = 1u << 2
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
    /* Adopt a host application's Vulkan objects instead of creating them. Set instance, physical
     * device, device and queue (a queue of a family with compute); vkg never destroys them. */
    struct {
        VkInstance instance;
        VkPhysicalDevice physical_device;
        VkDevice device;
        VkQueue queue;
        uint32_t queue_family_index;
        uint32_t enabled_features; /* VKG_FEATURE_* bits */
    } external;
} vkg_context_desc;

/* Creates a context. On success *out is owned by the caller (vkg_context_destroy). */
vkg_status vkg_context_create(const vkg_context_desc *desc, vkg_context **out);
void vkg_context_destroy(vkg_context *ctx);

/* The detected features and limits. Owned by ctx; valid for its lifetime. */
const vkg_device_info *vkg_context_device_info(const vkg_context *ctx);

/* VKG_ERROR_VALIDATION with the first message if the validation layer reported anything since the
 * last check (the count is reset); VKG_SUCCESS otherwise. */
vkg_status vkg_context_check_validation(vkg_context *ctx);

/* Number of validation messages received over the context's lifetime. */
uint64_t vkg_context_validation_count(const vkg_context *ctx);


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
vkg_status vkg_writer_create(vkg_writer **out);
void vkg_writer_destroy(vkg_writer *w);
/* Adds a tensor and returns its id. The writer checks nothing a reader would refuse beyond what it
 * needs to serialize (tests write malformed files on purpose through the raw bytes instead). */
vkg_status vkg_writer_add_tensor(vkg_writer *w, const vkg_writer_tensor *t, uint32_t *id);
vkg_status vkg_writer_add_node(vkg_writer *w, const char *op, const char *name, const uint32_t *inputs,
                               uint32_t n_inputs, const uint32_t *outputs, uint32_t n_outputs,
                               const vkg_writer_attr *attrs, uint32_t n_attrs);
vkg_status vkg_writer_add_input(vkg_writer *w, uint32_t tensor);
vkg_status vkg_writer_add_output(vkg_writer *w, uint32_t tensor);
vkg_status vkg_writer_add_metadata(vkg_writer *w, const char *key, const char *value);
vkg_status vkg_writer_save(const vkg_writer *w, const char *path);
/* *data is malloc'd and owned by the caller (free). */
vkg_status vkg_writer_to_memory(const vkg_writer *w, void **data, size_t *size);

/* ---- models: a loaded, validated graph with its weights on the device ---- */

typedef struct vkg_model vkg_model;

/* Maps, validates and uploads a .vkg file. *out is owned by the caller (vkg_model_destroy), and
 * must be destroyed before ctx. */
vkg_status vkg_model_load(vkg_context *ctx, const char *path, vkg_model **out);
/* Same from bytes in memory (an app's own assets); the bytes are copied. */
vkg_status vkg_model_load_memory(vkg_context *ctx, const void *data, size_t size, vkg_model **out);
void vkg_model_destroy(vkg_model *model);

uint32_t vkg_model_input_count(const vkg_model *model);
uint32_t vkg_model_output_count(const vkg_model *model);
/* Strings in *out are owned by the model. */
vkg_status vkg_model_input(const vkg_model *model, uint32_t i, vkg_tensor_info *out);
vkg_status vkg_model_output(const vkg_model *model, uint32_t i, vkg_tensor_info *out);
/* Metadata value for key (e.g. "producer"), NULL if absent. Owned by the model. */
const char *vkg_model_metadata(const vkg_model *model, const char *key);

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
vkg_status vkg_session_create(vkg_model *model, const vkg_session_desc *desc, vkg_session **out);
void vkg_session_destroy(vkg_session *s);
/* The concrete description of any tensor of the session (inputs, outputs, intermediates). */
vkg_status vkg_session_tensor(const vkg_session *s, const char *name, vkg_tensor_info *out);
/* Copies bytes into a graph input; `bytes` must equal its size. */
vkg_status vkg_session_set_input(vkg_session *s, const char *name, const void *data, size_t bytes);
/* Submits the recorded command buffer once and waits. */
vkg_status vkg_session_run(vkg_session *s);
vkg_status vkg_session_get_output(vkg_session *s, const char *name, void *data, size_t bytes);
/* Bytes of the activation arena (intermediates sharing memory by lifetime), and what the same
 * tensors would take without sharing. */
uint64_t vkg_session_planned_bytes(const vkg_session *s);
uint64_t vkg_session_unshared_bytes(const vkg_session *s);
/* After a profiled run: the i-th dispatch's node name, op and GPU time. */
uint32_t vkg_session_dispatch_count(const vkg_session *s);
vkg_status vkg_session_profile(const vkg_session *s, uint32_t i, const char **node, const char **op, double *ns);

#ifdef __cplusplus
}
#endif
#endif /* VKG_H */
