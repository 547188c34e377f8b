/* Compute pipelines from embedded SPIR-V, created once per (shader, bindings, push size, constants)
 * and cached for the context's lifetime; the VkPipelineCache makes re-creation cheap across runs. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"
#include "shader_table.h"

static bool same_desc(const vkg_pipeline_desc *a, const vkg_pipeline_desc *b)
{
    if (strcmp(a->shader, b->shader) != 0 || a->nbindings != b->nbindings || a->push_size != b->push_size ||
        a->nspec != b->nspec)
        return false;
    return memcmp(a->bindings, b->bindings, a->nbindings * sizeof a->bindings[0]) == 0 &&
           memcmp(a->spec, b->spec, a->nspec * sizeof a->spec[0]) == 0;
}

static void destroy_pipeline(vkg_context *ctx, vkg_pipeline *p)
{
    if (!p) return;
    if (p->pipeline) vkDestroyPipeline(ctx->device, p->pipeline, NULL);
    if (p->layout) vkDestroyPipelineLayout(ctx->device, p->layout, NULL);
    if (p->set_layout) vkDestroyDescriptorSetLayout(ctx->device, p->set_layout, NULL);
    free(p);
}

void vkg_pipelines_destroy_all(vkg_context *ctx)
{
    for (uint32_t i = 0; i < ctx->npipelines; i++) destroy_pipeline(ctx, ctx->pipelines[i]);
    free(ctx->pipelines);
    ctx->pipelines = NULL;
    ctx->npipelines = ctx->cap_pipelines = 0;
}

static vkg_status build(vkg_context *ctx, const vkg_pipeline_desc *d, vkg_pipeline *p)
{
    const vkg_shader_blob *blob = vkg_shader_find(d->shader);
    if (!blob) return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "no embedded shader named \"%s\"", d->shader);
    if (d->push_size > ctx->info.max_push_constants)
        return vkg_fail(VKG_ERROR_UNSUPPORTED, "shader %s needs %u bytes of push constants; device allows %u",
                        d->shader, d->push_size, ctx->info.max_push_constants);

    VkDescriptorSetLayoutBinding b[VKG_MAX_BINDINGS];
    for (uint32_t i = 0; i < d->nbindings; i++)
        b[i] = (VkDescriptorSetLayoutBinding){
            .binding = i,
            .descriptorType = d->bindings[i] == VKG_BIND_UNIFORM_TEXEL ? VK_DESCRIPTOR_TYPE_UNIFORM_TEXEL_BUFFER
                                                                      : VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
            .descriptorCount = 1,
            .stageFlags = VK_SHADER_STAGE_COMPUTE_BIT};
    VkDescriptorSetLayoutCreateInfo dl = {.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO,
                                          .bindingCount = d->nbindings, .pBindings = b};
    VKG_VK(vkCreateDescriptorSetLayout(ctx->device, &dl, NULL, &p->set_layout));

    VkPushConstantRange pr = {.stageFlags = VK_SHADER_STAGE_COMPUTE_BIT, .offset = 0, .size = d->push_size};
    VkPipelineLayoutCreateInfo pl = {.sType = VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO, .setLayoutCount = 1,
                                     .pSetLayouts = &p->set_layout, .pushConstantRangeCount = d->push_size ? 1 : 0,
                                     .pPushConstantRanges = &pr};
    VKG_VK(vkCreatePipelineLayout(ctx->device, &pl, NULL, &p->layout));

    VkShaderModuleCreateInfo mi = {.sType = VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO, .codeSize = blob->size,
                                   .pCode = blob->code};
    VkShaderModule mod;
    VKG_VK(vkCreateShaderModule(ctx->device, &mi, NULL, &mod));

    VkSpecializationMapEntry me[VKG_MAX_SPEC];
    for (uint32_t i = 0; i < d->nspec; i++)
        me[i] = (VkSpecializationMapEntry){.constantID = i, .offset = i * 4, .size = 4};
    VkSpecializationInfo si = {.mapEntryCount = d->nspec, .pMapEntries = me, .dataSize = d->nspec * 4,
                               .pData = d->spec};
    VkComputePipelineCreateInfo ci = {
        .sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO,
        .stage = {.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO, .stage = VK_SHADER_STAGE_COMPUTE_BIT,
                  .module = mod, .pName = "main", .pSpecializationInfo = d->nspec ? &si : NULL},
        .layout = p->layout};
    VkResult r = vkCreateComputePipelines(ctx->device, ctx->pipeline_cache, 1, &ci, NULL, &p->pipeline);
    vkDestroyShaderModule(ctx->device, mod, NULL);
    if (r != VK_SUCCESS) return vkg_fail_prefix(vkg_fail_vk(r, "vkCreateComputePipelines"), "shader %s", d->shader);
    return vkg_context_check_validation(ctx);
}

/* Sessions recorded on several threads share the list; a pipeline, once listed, never moves. */
static vkg_status pipeline_get_locked(vkg_context *ctx, const vkg_pipeline_desc *d, const vkg_pipeline **out);

vkg_status vkg_pipeline_get(vkg_context *ctx, const vkg_pipeline_desc *d, const vkg_pipeline **out)
{
    if (d->nbindings > VKG_MAX_BINDINGS || d->nspec > VKG_MAX_SPEC)
        return vkg_fail(VKG_ERROR_INVALID_ARGUMENT, "pipeline %s: too many bindings or constants", d->shader);
    pthread_mutex_lock(&ctx->pipe_lock);
    vkg_status st = pipeline_get_locked(ctx, d, out);
    pthread_mutex_unlock(&ctx->pipe_lock);
    return st;
}

static vkg_status pipeline_get_locked(vkg_context *ctx, const vkg_pipeline_desc *d, const vkg_pipeline **out)
{
    for (uint32_t i = 0; i < ctx->npipelines; i++)
        if (same_desc(&ctx->pipelines[i]->desc, d)) {
            *out = ctx->pipelines[i];
            return VKG_SUCCESS;
        }
    if (ctx->npipelines == ctx->cap_pipelines) {
        uint32_t cap = ctx->cap_pipelines ? 2 * ctx->cap_pipelines : 16;
        vkg_pipeline **n = realloc(ctx->pipelines, cap * sizeof *n);
        if (!n) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
        ctx->pipelines = n;
        ctx->cap_pipelines = cap;
    }
    vkg_pipeline *p = calloc(1, sizeof *p);
    if (!p) return vkg_fail(VKG_ERROR_OUT_OF_HOST_MEMORY, "out of host memory");
    p->desc = *d;
    vkg_status st = build(ctx, d, p);
    if (st != VKG_SUCCESS) {
        destroy_pipeline(ctx, p);
        return st;
    }
    /* desc.shader points at the blob table's static name, not at the caller's string. */
    p->desc.shader = vkg_shader_find(d->shader)->name;
    ctx->pipelines[ctx->npipelines++] = p;
    *out = p;
    return VKG_SUCCESS;
}
