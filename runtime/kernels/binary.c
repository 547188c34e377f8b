/* Elementwise add / multiply with NumPy broadcasting. */
#include <string.h>

#include "kernels.h"

enum { BINARY_WG = 256 };

vkg_status vkg_broadcast_shape(const uint32_t *a, uint32_t ar, const uint32_t *b, uint32_t br, uint32_t *out,
                               uint32_t *out_rank)
{
    if (ar > VKG_MAX_RANK || br > VKG_MAX_RANK)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "broadcast: rank %u exceeds %d", VKG_MAX(ar, br), VKG_MAX_RANK);
    uint32_t r = VKG_MAX(ar, br);
    for (uint32_t i = 0; i < r; i++) {
        uint32_t da = i < r - ar ? 1 : a[i - (r - ar)];
        uint32_t db = i < r - br ? 1 : b[i - (r - br)];
        if (da != db && da != 1 && db != 1)
            return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                            "broadcast: dimension %u (from the left of the %u-d result) is %u in a and %u in b; "
                            "expected equal sizes or one of them 1", i, r, da, db);
        out[i] = da == 1 ? db : da;
    }
    *out_rank = r;
    return VKG_SUCCESS;
}

vkg_status vkg_binary(vkg_cmd *cmd, vkg_binop op, vkg_tref a, const uint32_t *a_shape, uint32_t a_rank, vkg_tref b,
                      const uint32_t *b_shape, uint32_t b_rank, vkg_tref y)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    if (op != VKG_BIN_ADD && op != VKG_BIN_MUL) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "binary: unknown op %d", (int)op);
    if (!a.buf || !b.buf || !y.buf) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "binary: a, b or y has no buffer");
    uint32_t shape[VKG_MAX_RANK], rank;
    VKG_TRY(vkg_broadcast_shape(a_shape, a_rank, b_shape, b_rank, shape, &rank));

    /* Right-aligned element strides; 0 where an operand broadcasts. */
    uint32_t sa[VKG_MAX_RANK], sb[VKG_MAX_RANK];
    uint64_t na = 1, nb = 1, n = 1;
    for (int i = (int)rank - 1; i >= 0; i--) {
        int ia = i - (int)(rank - a_rank), ib = i - (int)(rank - b_rank);
        uint32_t da = ia >= 0 ? a_shape[ia] : 1, db = ib >= 0 ? b_shape[ib] : 1;
        sa[i] = da == 1 ? 0 : (uint32_t)na;
        sb[i] = db == 1 ? 0 : (uint32_t)nb;
        na *= da;
        nb *= db;
        n *= shape[i];
    }
    if (n > UINT32_MAX || na > UINT32_MAX || nb > UINT32_MAX)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "binary: tensor exceeds 2^32 elements");
    if (n == 0) return VKG_SUCCESS;

    /* Merge neighbouring dimensions that are contiguous for both operands: fewer divisions per element. */
    struct { uint32_t n, gx, rank, pad, shape[8], sa[8], sb[8]; } pc;
    memset(&pc, 0, sizeof pc);
    uint32_t r = 0;
    for (uint32_t i = 0; i < rank; i++) {
        if (shape[i] == 1) continue;
        if (r > 0 && pc.sa[r - 1] == sa[i] * shape[i] && pc.sb[r - 1] == sb[i] * shape[i]) {
            pc.shape[r - 1] *= shape[i];
            pc.sa[r - 1] = sa[i];
            pc.sb[r - 1] = sb[i];
            continue;
        }
        pc.shape[r] = shape[i];
        pc.sa[r] = sa[i];
        pc.sb[r] = sb[i];
        r++;
    }
    pc.rank = r;
    pc.n = (uint32_t)n;
    uint32_t gy;
    vkg_grid_1d(ctx, (n + BINARY_WG - 1) / BINARY_WG, &pc.gx, &gy);
    vkg_pipeline_desc pd = {.shader = "binary", .nbindings = 3, .push_size = sizeof pc, .nspec = 2,
                            .spec = {BINARY_WG, (uint32_t)op}};
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    vkg_binding bb[3] = {{a.buf, a.offset, na * 4, 0, false}, {b.buf, b.offset, nb * 4, 0, false},
                         {y.buf, y.offset, n * 4, 0, true}};
    return vkg_cmd_dispatch(cmd, p, bb, &pc, pc.gx, gy, 1, op == VKG_BIN_ADD ? "add" : "mul");
}

vkg_status vkg_add_n(vkg_cmd *cmd, const vkg_tref *x, uint32_t count, vkg_tref y, uint64_t n, float scale)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    if (count < 2 || count > VKG_ADD_N_MAX)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "add_n: %u inputs; 2 to %d are supported", count, VKG_ADD_N_MAX);
    if (!y.buf) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "add_n: y has no buffer");
    for (uint32_t i = 0; i < count; i++)
        if (!x[i].buf) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "add_n: input %u has no buffer", i);
    if (n > UINT32_MAX) return vkg_fail(VKG_ERROR_UNSUPPORTED, "add_n: tensor exceeds 2^32 elements");
    if (n == 0) return VKG_SUCCESS;
    struct { uint32_t n, gx, count; float scale; } pc = {(uint32_t)n, 0, count, scale};
    uint32_t gy;
    vkg_grid_1d(ctx, (n + BINARY_WG - 1) / BINARY_WG, &pc.gx, &gy);
    vkg_pipeline_desc pd = {.shader = "add_n", .nbindings = VKG_ADD_N_MAX + 1, .push_size = sizeof pc, .nspec = 1,
                            .spec = {BINARY_WG}};
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    vkg_binding b[VKG_ADD_N_MAX + 1];
    for (uint32_t i = 0; i < VKG_ADD_N_MAX; i++) {
        vkg_tref r = x[i < count ? i : 0];
        b[i] = (vkg_binding){r.buf, r.offset, n * 4, 0, false};
    }
    b[VKG_ADD_N_MAX] = (vkg_binding){y.buf, y.offset, n * 4, 0, true};
    return vkg_cmd_dispatch(cmd, p, b, &pc, pc.gx, gy, 1, "add_n");
}
