/* Strided box copy. */
#include "copy.h"

enum { COPY_WG = 256 };

vkg_status vkg_copy(vkg_cmd *cmd, const vkg_copy_args *a)
{
    vkg_context *ctx = vkg_cmd_context(cmd);
    if (!a->src.buf || !a->dst.buf) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "copy: src or dst has no buffer");
    if (a->rank == 0 || a->rank > VKG_MAX_RANK)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "copy: rank %u outside 1..%d", a->rank, VKG_MAX_RANK);
    /* The last element the box touches on each side must lie inside that side's extent. */
    uint64_t n = 1, smax = a->src_off, dmax = a->dst_off;
    for (uint32_t d = 0; d < a->rank; d++) {
        n *= a->shape[d];
        if (a->shape[d]) {
            smax += (uint64_t)(a->shape[d] - 1) * a->src_stride[d];
            dmax += (uint64_t)(a->shape[d] - 1) * a->dst_stride[d];
        }
    }
    if (n == 0) return VKG_SUCCESS;
    if (n > UINT32_MAX || smax >= a->src_elems || dmax >= a->dst_elems || a->src_elems > UINT32_MAX ||
        a->dst_elems > UINT32_MAX)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT,
                        "copy: box of %llu elements reaches src element %llu of %llu, dst element %llu of %llu",
                        (unsigned long long)n, (unsigned long long)smax, (unsigned long long)a->src_elems,
                        (unsigned long long)dmax, (unsigned long long)a->dst_elems);
    struct {
        uint32_t n, gx, rank, src_off, dst_off, shape[8], ss[8], ds[8];
    } pc = {(uint32_t)n, 0, a->rank, a->src_off, a->dst_off, {0}, {0}, {0}};
    for (uint32_t d = 0; d < a->rank; d++) {
        pc.shape[d] = a->shape[d];
        pc.ss[d] = a->src_stride[d];
        pc.ds[d] = a->dst_stride[d];
    }
    uint32_t gy;
    vkg_grid_1d(ctx, (n + COPY_WG - 1) / COPY_WG, &pc.gx, &gy);
    vkg_pipeline_desc pd = {.shader = "copy", .nbindings = 2, .push_size = sizeof pc, .nspec = 1, .spec = {COPY_WG}};
    const vkg_pipeline *p;
    VKG_TRY(vkg_pipeline_get(ctx, &pd, &p));
    /* Each side binds only the elements the box spans, [off, max], from the aligned offset at or
     * below off: a concat writes disjoint windows of its output (no barriers between its copies),
     * and a box of a tensor over maxStorageBufferRange can still be copied when its window fits. */
    uint64_t al = VKG_MAX(ctx->info.min_storage_offset_alignment, 4);
    VkDeviceSize s0 = (a->src.offset + (VkDeviceSize)a->src_off * 4) / al * al;
    VkDeviceSize d0 = (a->dst.offset + (VkDeviceSize)a->dst_off * 4) / al * al;
    s0 = VKG_MAX(s0, a->src.offset);
    d0 = VKG_MAX(d0, a->dst.offset);
    pc.src_off = (uint32_t)((a->src.offset + (VkDeviceSize)a->src_off * 4 - s0) / 4);
    pc.dst_off = (uint32_t)((a->dst.offset + (VkDeviceSize)a->dst_off * 4 - d0) / 4);
    vkg_binding b[2] = {{a->src.buf, s0, a->src.offset + (smax + 1) * 4 - s0, 0, false},
                        {a->dst.buf, d0, a->dst.offset + (dmax + 1) * 4 - d0, 0, true}};
    return vkg_cmd_dispatch(cmd, p, b, &pc, pc.gx, gy, 1, "copy");
}
