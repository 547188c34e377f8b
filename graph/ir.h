/* The in-memory graph: what loaders/ produce from a .vkg file (or the C writer's bytes) and what the
 * executor consumes. Everything in a vkg_graph is owned by it and freed by vkg_graph_free. Once
 * vkg_graph_parse returned VKG_SUCCESS, every id is in range, every string is NUL-terminated, nodes
 * are in topological order and every node passed its op's schema check. */
#ifndef VKG_GRAPH_IR_H
#define VKG_GRAPH_IR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "vkg.h"

enum {
    VKG_IR_MAX_RANK = 8,
    VKG_IR_NONE = 0xFFFFFFFFu /* an absent optional input */
};

typedef struct vkg_ir_attr {
    const char *name;
    vkg_attr_type type;
    uint32_t count;        /* 1 for INT/FLOAT/STRING */
    int64_t i;             /* INT */
    double f;              /* FLOAT */
    const char *s;         /* STRING */
    const int64_t *ints;   /* INTS, count elements */
    const double *floats;  /* FLOATS, count elements */
} vkg_ir_attr;

typedef struct vkg_ir_tensor {
    const char *name;
    vkg_dtype dtype;
    vkg_tensor_role role;
    uint32_t rank;
    int64_t dims[VKG_IR_MAX_RANK];      /* fixed sizes; -1 where symbolic */
    const char *sym[VKG_IR_MAX_RANK];   /* symbol name where symbolic, else NULL */
    const void *data;                   /* constants: points into the file image; else NULL */
    uint64_t data_size;                 /* bytes */
    uint32_t producer;                  /* index of the node writing it, VKG_IR_NONE for inputs/constants */
} vkg_ir_tensor;

typedef struct vkg_ir_node {
    const char *op;
    const char *name;
    uint32_t n_inputs, n_outputs, n_attrs;
    const uint32_t *inputs;  /* tensor ids, VKG_IR_NONE for absent optional inputs */
    const uint32_t *outputs;
    const vkg_ir_attr *attrs;
} vkg_ir_node;

typedef struct vkg_graph {
    const char *source; /* file name or "<memory>", for messages */
    uint32_t n_tensors, n_nodes, n_inputs, n_outputs, n_meta;
    vkg_ir_tensor *tensors;
    vkg_ir_node *nodes; /* topological order */
    uint32_t *inputs, *outputs;
    const char **meta_keys, **meta_values;
    uint32_t version_major, version_minor;

    /* ownership: one arena for all parsed records and strings, plus the file image */
    void *arena;
    const void *image;  /* the file bytes; constants point into it */
    size_t image_size;
    void *image_owned;  /* malloc'd copy (load from memory) or NULL */
    void *image_mapped; /* mmap'd file or NULL */
} vkg_graph;

/* Parses and validates a whole file image. `source` names it in messages. With copy = true the
 * bytes are copied (the caller may free them afterwards); otherwise they must outlive the graph.
 * On failure returns VKG_ERROR_INVALID_GRAPH (or OUT_OF_HOST_MEMORY) with a message naming the
 * source, the section and the tensor/node at fault. *out is owned by the caller. */
vkg_status vkg_graph_parse(const void *data, size_t size, const char *source, bool copy, vkg_graph **out);
/* Maps `path` read-only and parses it; the mapping lives as long as the graph. */
vkg_status vkg_graph_load_file(const char *path, vkg_graph **out);
void vkg_graph_free(vkg_graph *g);

/* CRC-32 (IEEE, as zlib.crc32): start with crc = 0, chain by passing the previous result. */
uint32_t vkg_crc32(uint32_t crc, const void *data, size_t n);

/* Attribute lookup; NULL when the node has no attribute of that name. */
const vkg_ir_attr *vkg_ir_attr_find(const vkg_ir_node *n, const char *name);
/* Index of the tensor called `name`, or VKG_IR_NONE. */
uint32_t vkg_ir_tensor_find(const vkg_graph *g, const char *name);
/* Bytes per element of a dtype (f32 4, f16 2, bf16 2, i32 4, u8 1); 0 for an unknown dtype. */
uint32_t vkg_dtype_size(vkg_dtype t);
const char *vkg_dtype_name(vkg_dtype t);

/* ---- op registry (graph/ops.c) ---- */

/* Checks one node against its op's schema: the op exists, arity, attribute names and types, the
 * dtypes and roles of its inputs (e.g. linear's weight is an f32/f16 constant), and every shape
 * relation that fixed dims already decide. Called by the loader for every node. On failure returns
 * VKG_ERROR_INVALID_GRAPH with a message naming the node, its op and what was expected. */
vkg_status vkg_op_validate(const vkg_graph *g, const vkg_ir_node *n);
/* Whether an op of this name exists. */
bool vkg_op_known(const char *op);

#endif
