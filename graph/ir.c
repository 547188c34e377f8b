/* Small accessors of the graph IR. */
#include <string.h>

#include "graph/ir.h"

const vkg_ir_attr *vkg_ir_attr_find(const vkg_ir_node *n, const char *name)
{
    for (uint32_t i = 0; i < n->n_attrs; i++)
        if (strcmp(n->attrs[i].name, name) == 0) return &n->attrs[i];
    return NULL;
}

uint32_t vkg_ir_tensor_find(const vkg_graph *g, const char *name)
{
    for (uint32_t i = 0; i < g->n_tensors; i++)
        if (strcmp(g->tensors[i].name, name) == 0) return i;
    return VKG_IR_NONE;
}

uint32_t vkg_dtype_size(vkg_dtype t)
{
    switch (t) {
    case VKG_DTYPE_F32: return 4;
    case VKG_DTYPE_F16: return 2;
    case VKG_DTYPE_BF16: return 2;
    case VKG_DTYPE_I32: return 4;
    case VKG_DTYPE_U8: return 1;
    }
    return 0;
}

const char *vkg_dtype_name(vkg_dtype t)
{
    switch (t) {
    case VKG_DTYPE_F32: return "f32";
    case VKG_DTYPE_F16: return "f16";
    case VKG_DTYPE_BF16: return "bf16";
    case VKG_DTYPE_I32: return "i32";
    case VKG_DTYPE_U8: return "u8";
    }
    return "unknown";
}
