/* NumPy .npy files (format versions 1.0-3.0), little-endian, C order. */
#ifndef VKG_NPY_H
#define VKG_NPY_H
#include <stdint.h>

#include "vkg.h"

typedef struct vkg_npy {
    vkg_dtype dtype;
    uint32_t rank;
    int64_t dims[VKG_MAX_DIMS];
    void *data;     /* malloc'd, owned by the struct (vkg_npy_free) */
    uint64_t bytes;
} vkg_npy;

/* Reads path; VKG_ERROR_IO if unreadable, VKG_ERROR_INVALID_ARGUMENT naming the file and what is
 * wrong (big-endian, Fortran order, unsupported dtype, truncated data). */
vkg_status vkg_npy_read(const char *path, vkg_npy *out);
vkg_status vkg_npy_write(const char *path, vkg_dtype dtype, uint32_t rank, const int64_t *dims, const void *data);
void vkg_npy_free(vkg_npy *n);
#endif
