/* The .safetensors reader: u64 little-endian header length n, n bytes of JSON
 * {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data,
 * which data_offsets index from its first byte. The JSON is parsed by cJSON; everything it says is
 * checked against the file before a byte of data is read. */
#include "loaders/safetensors.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/internal.h"

/* ---- half floats ---- */

float vkg_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, bits;
    if (e == 31) bits = sign | 0x7f800000u | (m << 13);
    else if (e) bits = sign | ((e + 112u) << 23) | (m << 13);
    else if (!m) bits = sign;
    else { /* subnormal: normalise the mantissa */
        e = 113;
        while (!(m & 0x400u)) {
            m <<= 1;
            e--;
        }
        bits = sign | (e << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t vkg_f32_to_f16(float f)
{
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u); /* NaN stays NaN */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504: inf */
    if (ax < 0x38800000u) { /* below the smallest normal half: a subnormal or zero */
        if (ax < 0x33000000u) return (uint16_t)sign; /* below half the smallest subnormal */
        uint32_t m = (ax & 0x7fffffu) | 0x800000u, shift = 126u - (ax >> 23); /* 14..24 */
        uint32_t h = m >> shift, rest = m & ((1u << shift) - 1u), halfway = 1u << (shift - 1u);
        if (rest > halfway || (rest == halfway && (h & 1u))) h++;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((ax >> 23) - 112u) << 10 | ((ax >> 13) & 0x3ffu), rest = ax & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++; /* a carry into the exponent is right */
    return (uint16_t)(sign | h);
}

float vkg_st_get(const vkg_st_tensor *t, uint64_t i)
{
    const uint8_t *p = t->data + i * (t->dtype == VKG_DTYPE_F32 ? 4 : 2);
    uint32_t bits;
    switch (t->dtype) {
    case VKG_DTYPE_F16: return vkg_f16_to_f32((uint16_t)(p[0] | p[1] << 8));
    case VKG_DTYPE_BF16: bits = (uint32_t)(p[0] | p[1] << 8) << 16; break;
    default: bits = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; break;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* ---- the header ---- */

void vkg_st_free(vkg_st_file *f)
{
    if (!f) return;
    free(f->path);
    free(f->bytes);
    free(f->tensors);
    free(f->names);
    free(f);
}

/* A JSON number that is an integer in [0, 2^53] (exact in a double). */
static bool json_u53(const cJSON *v, uint64_t *out)
{
    if (!cJSON_IsNumber(v)) return false;
    double d = v->valuedouble;
    if (!(d >= 0 && d <= 9007199254740992.0) || (double)(uint64_t)d != d) return false;
    *out = (uint64_t)d;
    return true;
}

static vkg_status entry_fail(const vkg_st_file *f, const char *name, const char *what)
{
    return vkg_fail(VKG_ERROR_INVALID_GRAPH, "%s: tensor \"%s\": %s", f->path, name, what);
}

static vkg_status parse_dtype(const vkg_st_file *f, const char *name, const cJSON *e, vkg_dtype *dt)
{
    const cJSON *d = cJSON_GetObjectItemCaseSensitive(e, "dtype");
    if (!cJSON_IsString(d)) return entry_fail(f, name, "\"dtype\" is missing or not a string");
    if (!strcmp(d->valuestring, "F32")) *dt = VKG_DTYPE_F32;
    else if (!strcmp(d->valuestring, "F16")) *dt = VKG_DTYPE_F16;
    else if (!strcmp(d->valuestring, "BF16")) *dt = VKG_DTYPE_BF16;
    else
        return vkg_fail(VKG_ERROR_INVALID_GRAPH, "%s: tensor \"%s\": dtype %.32s is not supported (F32, F16 or BF16)",
                        f->path, name, d->valuestring);
    return VKG_SUCCESS;
}

static vkg_status parse_shape(const vkg_st_file *f, const char *name, const cJSON *e, vkg_st_tensor *t)
{
    const cJSON *s = cJSON_GetObjectItemCaseSensitive(e, "shape");
    if (!cJSON_IsArray(s)) return entry_fail(f, name, "\"shape\" is missing or not a list");
    int rank = cJSON_GetArraySize(s);
    if (rank > VKG_MAX_DIMS) return entry_fail(f, name, "\"shape\" has more than 8 dims");
    t->rank = (uint32_t)rank;
    t->numel = 1;
    uint32_t i = 0;
    for (const cJSON *d = s->child; d; d = d->next, i++) {
        uint64_t v;
        if (!json_u53(d, &v)) return entry_fail(f, name, "\"shape\" holds something other than non-negative integers");
        t->dims[i] = (int64_t)v;
        if (__builtin_mul_overflow(t->numel, v, &t->numel) || t->numel > (1ull << 53))
            return entry_fail(f, name, "\"shape\" overflows");
    }
    return VKG_SUCCESS;
}

/* data_offsets [begin, end) inside the data section, holding exactly numel elements of dtype. */
static vkg_status parse_offsets(const vkg_st_file *f, const char *name, const cJSON *e, uint64_t data_size,
                                const uint8_t *data, vkg_st_tensor *t)
{
    const cJSON *o = cJSON_GetObjectItemCaseSensitive(e, "data_offsets");
    uint64_t begin, end;
    if (!cJSON_IsArray(o) || cJSON_GetArraySize(o) != 2 || !json_u53(o->child, &begin) || !json_u53(o->child->next, &end))
        return entry_fail(f, name, "\"data_offsets\" is missing or not two non-negative integers");
    uint64_t want = t->numel * (t->dtype == VKG_DTYPE_F32 ? 4u : 2u);
    if (begin > end || end > data_size)
        return vkg_fail(VKG_ERROR_INVALID_GRAPH, "%s: tensor \"%s\": data_offsets [%llu, %llu) lie outside the %llu data bytes",
                        f->path, name, (unsigned long long)begin, (unsigned long long)end, (unsigned long long)data_size);
    if (end - begin != want)
        return vkg_fail(VKG_ERROR_INVALID_GRAPH, "%s: tensor \"%s\": data_offsets [%llu, %llu) hold %llu bytes; its dtype and "
                        "shape need %llu", f->path, name, (unsigned long long)begin, (unsigned long long)end,
                        (unsigned long long)(end - begin), (unsigned long long)want);
    t->data = data + begin;
    return VKG_SUCCESS;
}

static vkg_status parse_entry(vkg_st_file *f, const cJSON *e, uint64_t data_size, const uint8_t *data, vkg_st_tensor *t)
{
    const char *name = e->string;
    if (!cJSON_IsObject(e)) return entry_fail(f, name, "the header entry is not an object");
    VKG_TRY(parse_dtype(f, name, e, &t->dtype));
    VKG_TRY(parse_shape(f, name, e, t));
    return parse_offsets(f, name, e, data_size, data, t);
}

/* Copies the names into one block owned by f (cJSON's tree is freed after parsing). */
static vkg_status keep_names(vkg_st_file *f, const cJSON *root)
{
    size_t total = 1;
    for (const cJSON *e = root->child; e; e = e->next) total += strlen(e->string) + 1;
    if (!(f->names = malloc(total))) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory", f->path);
    char *p = f->names;
    uint32_t i = 0;
    for (const cJSON *e = root->child; e; e = e->next) {
        if (!strcmp(e->string, "__metadata__")) continue;
        size_t len = strlen(e->string) + 1;
        memcpy(p, e->string, len);
        f->tensors[i++].name = p;
        p += len;
    }
    return VKG_SUCCESS;
}

static vkg_status check_unique(const vkg_st_file *f)
{
    for (uint32_t i = 0; i < f->n_tensors; i++)
        for (uint32_t j = 0; j < i; j++)
            if (!strcmp(f->tensors[i].name, f->tensors[j].name))
                return vkg_fail(VKG_ERROR_INVALID_GRAPH, "%s: tensor \"%s\" appears twice in the header", f->path,
                                f->tensors[i].name);
    return VKG_SUCCESS;
}

static vkg_status parse_header(vkg_st_file *f, const cJSON *root, uint64_t data_size, const uint8_t *data)
{
    if (!cJSON_IsObject(root)) return vkg_fail(VKG_ERROR_INVALID_GRAPH, "%s: the header is not a JSON object", f->path);
    uint32_t n = 0;
    for (const cJSON *e = root->child; e; e = e->next) {
        if (!e->string) return vkg_fail(VKG_ERROR_INVALID_GRAPH, "%s: a header entry has no name", f->path);
        n += strcmp(e->string, "__metadata__") != 0;
    }
    f->n_tensors = n;
    if (!(f->tensors = calloc(n ? n : 1, sizeof *f->tensors)))
        return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory", f->path);
    uint32_t i = 0;
    for (const cJSON *e = root->child; e; e = e->next)
        if (strcmp(e->string, "__metadata__") != 0) VKG_TRY(parse_entry(f, e, data_size, data, &f->tensors[i++]));
    VKG_TRY(keep_names(f, root));
    return check_unique(f);
}

static vkg_status parse_file(vkg_st_file *f)
{
    if (f->size < 8)
        return vkg_fail(VKG_ERROR_INVALID_GRAPH, "%s: %zu bytes is too short for a safetensors file (8-byte header length)",
                        f->path, f->size);
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | f->bytes[i];
    if (n > VKG_ST_MAX_HEADER || n > f->size - 8)
        return vkg_fail(VKG_ERROR_INVALID_GRAPH, "%s: header length %llu does not fit: the file has %zu bytes after the "
                        "length (and headers are at most %u bytes)", f->path, (unsigned long long)n, f->size - 8,
                        VKG_ST_MAX_HEADER);
    const char *json = (const char *)f->bytes + 8, *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(json, (size_t)n, &end, 0);
    if (!root) {
        size_t at = end && end >= json ? (size_t)(end - json) : 0;
        return vkg_fail(VKG_ERROR_INVALID_GRAPH, "%s: the header is not valid JSON (error near byte %zu of %llu)", f->path, at,
                        (unsigned long long)n);
    }
    vkg_status s = parse_header(f, root, f->size - 8 - n, f->bytes + 8 + n);
    cJSON_Delete(root);
    return s;
}

static vkg_status new_file(const char *source, vkg_st_file **out)
{
    *out = calloc(1, sizeof **out);
    if (*out) (*out)->path = strdup(source);
    if (!*out || !(*out)->path) {
        vkg_st_free(*out);
        *out = NULL;
        return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory", source);
    }
    return VKG_SUCCESS;
}

static vkg_status finish(vkg_st_file *f, vkg_st_file **out)
{
    vkg_status s = parse_file(f);
    if (s != VKG_SUCCESS) {
        vkg_st_free(f);
        return s;
    }
    *out = f;
    return VKG_SUCCESS;
}

vkg_status vkg_st_parse(const void *data, size_t size, const char *source, vkg_st_file **out)
{
    vkg_st_file *f;
    VKG_TRY(new_file(source, &f));
    if (!(f->bytes = malloc(size ? size : 1))) {
        vkg_st_free(f);
        return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory (%zu bytes)", source, size);
    }
    if (size) memcpy(f->bytes, data, size);
    f->size = size;
    return finish(f, out);
}

static vkg_status read_all(vkg_st_file *f)
{
    FILE *fp = fopen(f->path, "rb");
    if (!fp) return vkg_fail(VKG_ERROR_IO, "%s: cannot open: %s", f->path, strerror(errno));
    vkg_status s = VKG_SUCCESS;
    long len = -1;
    if (fseek(fp, 0, SEEK_END) == 0) len = ftell(fp);
    if (len < 0 || fseek(fp, 0, SEEK_SET) != 0) s = vkg_fail(VKG_ERROR_IO, "%s: cannot determine its size", f->path);
    else if (!(f->bytes = malloc(len ? (size_t)len : 1)))
        s = vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory (%ld bytes)", f->path, len);
    else if (fread(f->bytes, 1, (size_t)len, fp) != (size_t)len)
        s = vkg_fail(VKG_ERROR_IO, "%s: cannot read %ld bytes", f->path, len);
    f->size = (size_t)(len > 0 ? len : 0);
    fclose(fp);
    return s;
}

vkg_status vkg_st_read(const char *path, vkg_st_file **out)
{
    vkg_st_file *f;
    VKG_TRY(new_file(path, &f));
    vkg_status s = read_all(f);
    if (s != VKG_SUCCESS) {
        vkg_st_free(f);
        return s;
    }
    return finish(f, out);
}
