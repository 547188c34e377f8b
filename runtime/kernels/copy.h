/* Strided box copy (shaders/copy.comp): patchify, token insertion, slicing, broadcasting, concat,
 * permute. */
#ifndef VKG_KERNEL_COPY_H
#define VKG_KERNEL_COPY_H

#include "kernels.h"

typedef struct vkg_copy_args {
    vkg_tref src, dst;          /* f32 tensors; each binds only the window the box spans */
    uint64_t src_elems, dst_elems; /* extent of each tensor in floats (the box must stay inside) */
    uint32_t src_off, dst_off;  /* first element of the box, in floats from src/dst */
    uint32_t rank;              /* 1..8 */
    uint32_t shape[VKG_MAX_RANK];
    uint32_t src_stride[VKG_MAX_RANK], dst_stride[VKG_MAX_RANK]; /* in floats; 0 broadcasts */
} vkg_copy_args;

/* Checks that the box stays inside both extents, then records one dispatch. */
vkg_status vkg_copy(vkg_cmd *cmd, const vkg_copy_args *a);

#endif
