/* A .safetensors reader for adapter files (loaders/adapter.c): the whole file is read into memory
 * (adapters are small) and every header entry is validated before use. Internal to libvkg. */
#ifndef VKG_LOADERS_SAFETENSORS_H
#define VKG_LOADERS_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "vkg.h"

/* The largest header accepted: the format's own readers refuse more than 100 MB too. */
#define VKG_ST_MAX_HEADER (100u * 1000u * 1000u)

typedef struct vkg_st_tensor {
    const char *name;       /* owned by the file */
    vkg_dtype dtype;        /* F32, F16 or BF16 */
    uint32_t rank;
    int64_t dims[VKG_MAX_DIMS];
    uint64_t numel;
    const uint8_t *data;    /* numel elements of dtype, little-endian, inside the file's bytes */
} vkg_st_tensor;

typedef struct vkg_st_file {
    char *path;             /* for messages */
    uint8_t *bytes;         /* the whole file */
    size_t size;
    vkg_st_tensor *tensors; /* header order, __metadata__ left out */
    uint32_t n_tensors;
    char *names;            /* every tensor name, NUL-separated */
} vkg_st_file;

/* Reads and validates `path`. Failures: VKG_ERROR_IO (cannot read) or VKG_ERROR_INVALID_GRAPH
 * (malformed: the message names the file and the tensor). *out is owned by the caller (vkg_st_free). */
vkg_status vkg_st_read(const char *path, vkg_st_file **out);
/* The same from bytes in memory (copied); `source` names them in messages. */
vkg_status vkg_st_parse(const void *data, size_t size, const char *source, vkg_st_file **out);
void vkg_st_free(vkg_st_file *f);
/* Element i of t as float (f16 and bf16 widened exactly). */
float vkg_st_get(const vkg_st_tensor *t, uint64_t i);

/* IEEE half <-> float, round to nearest even (subnormals, inf and NaN kept). */
float vkg_f16_to_f32(uint16_t h);
uint16_t vkg_f32_to_f16(float f);

#endif
