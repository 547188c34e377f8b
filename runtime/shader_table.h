#ifndef VKG_SHADER_TABLE_H
#define VKG_SHADER_TABLE_H
#include <stddef.h>
#include <stdint.h>

/* One embedded SPIR-V module; the table is generated at build time by shaders/CMakeLists.txt. */
typedef struct vkg_shader_blob {
    const char *name;
    const uint32_t *code;
    size_t size; /* bytes */
} vkg_shader_blob;

/* Returns NULL when no blob has this name. The returned memory is static. */
const vkg_shader_blob *vkg_shader_find(const char *name);

#endif
