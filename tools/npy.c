#include "npy.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "graph/ir.h"
#include "runtime/internal.h"

static const struct { const char *descr; vkg_dtype dtype; } kinds[] = {
    {"<f4", VKG_DTYPE_F32}, {"<f2", VKG_DTYPE_F16}, {"<i4", VKG_DTYPE_I32}, {"|u1", VKG_DTYPE_U8}};

/* Finds 'key': in the header dict and returns a pointer just past the colon, or NULL. */
static const char *dict_value(const char *h, const char *key)
{
    char k[32];
    snprintf(k, sizeof k, "'%s'", key);
    const char *p = strstr(h, k);
    if (!p) return NULL;
    p = strchr(p + strlen(k), ':');
    if (!p) return NULL;
    p++;
    while (*p == ' ') p++;
    return p;
}

vkg_status vkg_npy_read(const char *path, vkg_npy *out)
{
    memset(out, 0, sizeof *out);
    FILE *f = fopen(path, "rb");
    if (!f) return vkg_fail(VKG_ERROR_IO, "%s: cannot open", path);
    uint8_t pre[12];
    char *hdr = NULL;
    vkg_status st = VKG_SUCCESS;
    if (fread(pre, 1, 10, f) != 10 || memcmp(pre, "\x93NUMPY", 6) != 0) {
        st = vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: not a .npy file (bad magic)", path);
        goto done;
    }
    uint32_t hlen;
    if (pre[6] == 1) hlen = (uint32_t)pre[8] | (uint32_t)pre[9] << 8;
    else if ((pre[6] == 2 || pre[6] == 3) && fread(pre + 10, 1, 2, f) == 2)
        hlen = (uint32_t)pre[8] | (uint32_t)pre[9] << 8 | (uint32_t)pre[10] << 16 | (uint32_t)pre[11] << 24;
    else {
        st = vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: unsupported .npy version %u", path, pre[6]);
        goto done;
    }
    if (hlen > (1u << 20) || !(hdr = calloc(hlen + 1, 1)) || fread(hdr, 1, hlen, f) != hlen) {
        st = vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: truncated .npy header", path);
        goto done;
    }
    const char *d = dict_value(hdr, "descr"), *fo = dict_value(hdr, "fortran_order"), *sh = dict_value(hdr, "shape");
    if (!d || !fo || !sh || *sh != '(') {
        st = vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: malformed .npy header", path);
        goto done;
    }
    if (strncmp(fo, "True", 4) == 0) {
        st = vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: Fortran-order arrays are not supported (save C order)", path);
        goto done;
    }
    bool found = false;
    for (size_t i = 0; i < VKG_ARRAY_LEN(kinds); i++)
        if (strncmp(d + 1, kinds[i].descr, 3) == 0 && d[4] == '\'') {
            out->dtype = kinds[i].dtype;
            found = true;
        }
    if (!found) {
        st = vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: dtype %.8s is not supported (float32, float16, int32, uint8, "
                      "little-endian)", path, d);
        goto done;
    }
    const char *p = sh + 1;
    uint64_t numel = 1;
    while (*p && *p != ')') {
        while (*p == ' ' || *p == ',') p++;
        if (*p == ')') break;
        char *end;
        long long v = strtoll(p, &end, 10);
        if (end == p || v < 0 || out->rank == VKG_MAX_DIMS || (v && numel > UINT64_MAX / 8 / (uint64_t)v)) {
            st = vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: bad or too large shape in header", path);
            goto done;
        }
        out->dims[out->rank++] = v;
        numel *= (uint64_t)v;
        p = end;
    }
    out->bytes = numel * vkg_dtype_size(out->dtype);
    out->data = malloc(out->bytes ? out->bytes : 1);
    if (!out->data) {
        st = vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "%s: out of host memory", path);
        goto done;
    }
    if (fread(out->data, 1, out->bytes, f) != out->bytes)
        st = vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "%s: data truncated (expected %llu bytes)", path,
                      (unsigned long long)out->bytes);
done:
    free(hdr);
    fclose(f);
    if (st != VKG_SUCCESS) vkg_npy_free(out);
    return st;
}

vkg_status vkg_npy_write(const char *path, vkg_dtype dtype, uint32_t rank, const int64_t *dims, const void *data)
{
    const char *descr = NULL;
    for (size_t i = 0; i < VKG_ARRAY_LEN(kinds); i++)
        if (kinds[i].dtype == dtype) descr = kinds[i].descr;
    if (!descr) return vkg_fail(VKG_ERROR_UNSUPPORTED, "%s: cannot write dtype %s", path, vkg_dtype_name(dtype));
    char shape[256] = "";
    size_t len = 0;
    uint64_t numel = 1;
    for (uint32_t i = 0; i < rank; i++) {
        len += (size_t)snprintf(shape + len, sizeof shape - len, "%lld,%s", (long long)dims[i], rank > 1 && i + 1 < rank ? " " : "");
        numel *= (uint64_t)dims[i];
    }
    if (rank > 1) shape[len - 1] = '\0'; /* (2, 3) rather than (2, 3,); (5,) keeps its comma */
    char hdr[512];
    int n = snprintf(hdr, sizeof hdr, "{'descr': '%s', 'fortran_order': False, 'shape': (%s), }", descr, shape);
    int total = 10 + n + 1;
    int pad = (64 - total % 64) % 64;
    FILE *f = fopen(path, "wb");
    if (!f) return vkg_fail(VKG_ERROR_IO, "%s: cannot create", path);
    uint16_t hl = (uint16_t)(n + pad + 1);
    uint8_t pre[10] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0, (uint8_t)(hl & 0xff), (uint8_t)(hl >> 8)};
    bool ok = fwrite(pre, 1, 10, f) == 10 && fwrite(hdr, 1, (size_t)n, f) == (size_t)n;
    for (int i = 0; i < pad && ok; i++) ok = fputc(' ', f) != EOF;
    ok = ok && fputc('\n', f) != EOF;
    uint64_t bytes = numel * vkg_dtype_size(dtype);
    ok = ok && fwrite(data, 1, bytes, f) == bytes;
    ok = (fclose(f) == 0) && ok;
    return ok ? VKG_SUCCESS : vkg_fail(VKG_ERROR_IO, "%s: write failed", path);
}

void vkg_npy_free(vkg_npy *n)
{
    free(n->data);
    n->data = NULL;
}
