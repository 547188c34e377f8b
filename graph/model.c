/* vkg_model: a validated graph plus its constants in device memory, shared by sessions. */
#include <stdlib.h>
#include <string.h>

#include "graph/exec.h"

const vkg_graph *vkg_model_graph(const vkg_model *m) { return m->g; }

/* Uploads every constant into one buffer at its distance from the first constant in the file's
 * WEIGHTS section. Constants sit on 64-byte multiples there, so device offsets stay 64-aligned. */
static vkg_status upload_constants(vkg_model *m)
{
    const vkg_graph *g = m->g;
    const uint8_t *lo = NULL, *hi = NULL;
    for (uint32_t i = 0; i < g->n_tensors; i++) {
        const vkg_ir_tensor *t = &g->tensors[i];
        if (t->role != VKG_ROLE_CONSTANT || !t->data) continue;
        const uint8_t *p = t->data;
        if (!lo || p < lo) lo = p;
        if (!hi || p + t->data_size > hi) hi = p + t->data_size;
    }
    if (!lo) return VKG_SUCCESS;
    m->weights_base = lo;
    VkDeviceSize end = (VkDeviceSize)(hi - lo);
    vkg_status s = vkg_buf_create(m->ctx, end, &m->weights);
    if (s != VKG_SUCCESS) return vkg_fail_prefix(s, "%s: uploading %llu bytes of weights", g->source, (unsigned long long)end);
    /* Constants are contiguous in the file (zero padding between them): one copy moves them all. */
    return vkg_buf_upload(m->weights, 0, m->weights_base, end);
}

static vkg_status model_init(vkg_context *ctx, vkg_graph *g, vkg_model **out)
{
    vkg_model *m = calloc(1, sizeof *m);
    if (!m) {
        vkg_graph_free(g);
        return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    }
    m->ctx = ctx;
    m->g = g;
    vkg_status s = vkg_context_alive(ctx, "vkg_model_load");
    if (s == VKG_SUCCESS) s = upload_constants(m);
    if (s == VKG_SUCCESS) s = vkg_context_check_validation(ctx);
    if (s != VKG_SUCCESS) {
        vkg_model_destroy(m);
        return s;
    }
    *out = m;
    return VKG_SUCCESS;
}

vkg_status vkg_model_load(vkg_context *ctx, const char *path, vkg_model **out)
{
    if (!ctx || !path || !out) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_model_load: NULL argument");
    *out = NULL;
    vkg_graph *g;
    VKG_TRY(vkg_graph_load_file(path, &g));
    return model_init(ctx, g, out);
}

vkg_status vkg_model_load_memory(vkg_context *ctx, const void *data, size_t size, vkg_model **out)
{
    if (!ctx || !data || !out) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_model_load_memory: NULL argument");
    *out = NULL;
    vkg_graph *g;
    VKG_TRY(vkg_graph_parse(data, size, "<memory>", true, &g));
    return model_init(ctx, g, out);
}

void vkg_model_destroy(vkg_model *m)
{
    if (!m) return;
    vkg_buf_destroy(m->weights);
    free(m->adapted);
    vkg_graph_free(m->g);
    free(m);
}

uint32_t vkg_model_input_count(const vkg_model *m) { return m ? m->g->n_inputs : 0; }
uint32_t vkg_model_output_count(const vkg_model *m) { return m ? m->g->n_outputs : 0; }

void vkg_ir_tensor_info(const vkg_ir_tensor *t, vkg_tensor_info *out)
{
    memset(out, 0, sizeof *out);
    out->name = t->name;
    out->dtype = t->dtype;
    out->role = t->role;
    out->rank = t->rank;
    for (uint32_t i = 0; i < t->rank; i++) {
        out->dims[i] = t->sym[i] ? -1 : t->dims[i];
        out->sym[i] = t->sym[i];
    }
}

vkg_status vkg_model_input(const vkg_model *m, uint32_t i, vkg_tensor_info *out)
{
    if (!m || !out || i >= m->g->n_inputs)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_model_input: index %u out of range", i);
    vkg_ir_tensor_info(&m->g->tensors[m->g->inputs[i]], out);
    return VKG_SUCCESS;
}

vkg_status vkg_model_output(const vkg_model *m, uint32_t i, vkg_tensor_info *out)
{
    if (!m || !out || i >= m->g->n_outputs)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "vkg_model_output: index %u out of range", i);
    vkg_ir_tensor_info(&m->g->tensors[m->g->outputs[i]], out);
    return VKG_SUCCESS;
}

const char *vkg_model_metadata(const vkg_model *m, const char *key)
{
    if (!m || !key) return NULL;
    for (uint32_t i = 0; i < m->g->n_meta; i++)
        if (strcmp(m->g->meta_keys[i], key) == 0) return m->g->meta_values[i];
    return NULL;
}
