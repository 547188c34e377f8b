/* The vkg command line: devices, inspect, run, bench (a graph file or --kernels). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench/kernels_bench.h"
#include "cmd_graph.h"
#include "vkg.h"

static const char *type_name(VkPhysicalDeviceType t)
{
    switch (t) {
    case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return "discrete GPU";
    case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return "integrated GPU";
    case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return "virtual GPU";
    case VK_PHYSICAL_DEVICE_TYPE_CPU: return "CPU";
    default: return "other";
    }
}

static void print_subgroup_ops(uint32_t ops)
{
    static const struct { uint32_t bit; const char *name; } names[] = {
        {VK_SUBGROUP_FEATURE_BASIC_BIT, "basic"}, {VK_SUBGROUP_FEATURE_VOTE_BIT, "vote"},
        {VK_SUBGROUP_FEATURE_ARITHMETIC_BIT, "arithmetic"}, {VK_SUBGROUP_FEATURE_BALLOT_BIT, "ballot"},
        {VK_SUBGROUP_FEATURE_SHUFFLE_BIT, "shuffle"}, {VK_SUBGROUP_FEATURE_SHUFFLE_RELATIVE_BIT, "shuffle_relative"},
        {VK_SUBGROUP_FEATURE_CLUSTERED_BIT, "clustered"}, {VK_SUBGROUP_FEATURE_QUAD_BIT, "quad"}};
    int any = 0;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        if (ops & names[i].bit) printf("%s%s", any++ ? " " : "", names[i].name);
    if (!any) printf("none");
    printf("\n");
}

static void print_info(const vkg_device_info *d, int chosen)
{
    printf("[%u] %s%s\n", d->index, d->name, chosen ? "  (default)" : "");
    printf("    type                 %s\n", type_name(d->type));
    printf("    driver               %s %s\n", d->driver_name, d->driver_info);
    printf("    vendor/device id     0x%04x / 0x%04x\n", d->vendor_id, d->device_id);
    printf("    Vulkan               %u.%u.%u\n", VK_API_VERSION_MAJOR(d->api_version),
           VK_API_VERSION_MINOR(d->api_version), VK_API_VERSION_PATCH(d->api_version));
    printf("    fp16 arithmetic      %s\n", d->fp16_arithmetic ? "yes" : "no");
    printf("    16-bit storage       %s\n", d->storage_16bit ? "yes" : "no");
    printf("    subgroup size        %d", d->subgroup_size);
    if (d->subgroup_size_control) printf(" (control: %u..%u)", d->min_subgroup_size, d->max_subgroup_size);
    printf("\n    subgroup ops         ");
    print_subgroup_ops(d->subgroup_ops);
    printf("    push descriptors     %s\n", d->push_descriptors ? "yes" : "no");
    printf("    timeline semaphores  %s\n", d->timeline_semaphore ? "yes" : "no (runs end on a fence)");
    printf("    timestamps           %s (period %.3g ns)\n", d->timestamps ? "yes" : "no", d->timestamp_period_ns);
    printf("    cooperative matrix   %s\n", d->cooperative_matrix ? "yes" : "no");
    printf("    texel rgba32f/16f    %s / %s\n", d->texel_rgba32f ? "yes" : "no", d->texel_rgba16f ? "yes" : "no");
    printf("    max storage binding  %llu MiB\n", (unsigned long long)(d->max_storage_buffer_range >> 20));
    printf("    max texel elements   %llu\n", (unsigned long long)d->max_texel_buffer_elements);
    printf("    shared memory        %u KiB\n", d->max_shared_memory >> 10);
    printf("    workgroup            %u invocations, size %u x %u x %u, count %u x %u x %u\n",
           d->max_workgroup_invocations, d->max_workgroup_size[0], d->max_workgroup_size[1], d->max_workgroup_size[2],
           d->max_workgroup_count[0], d->max_workgroup_count[1], d->max_workgroup_count[2]);
    printf("    push constants       %u bytes\n", d->max_push_constants);
    printf("    alignment            storage %llu, texel %llu\n", (unsigned long long)d->min_storage_offset_alignment,
           (unsigned long long)d->min_texel_offset_alignment);
    printf("    device-local memory  %llu MiB%s\n", (unsigned long long)(d->device_local_bytes >> 20),
           d->unified_memory ? " (host-visible: unified)" : "");
}

static int fail(vkg_status s)
{
    fprintf(stderr, "vkg: %s: %s\n", vkg_status_name(s), vkg_last_error());
    return 1;
}

static int cmd_devices(void)
{
    uint32_t n = 16;
    vkg_device_info infos[16];
    vkg_status s = vkg_enumerate_devices(infos, &n);
    if (s != VKG_SUCCESS) return fail(s);
    if (n == 0) {
        fprintf(stderr, "vkg: no Vulkan devices\n");
        return 1;
    }
    /* Ask a context which one vkg would choose (honours VKG_DEVICE). */
    vkg_context *ctx = NULL;
    vkg_context_desc cd = {.validation = -1};
    s = vkg_context_create(&cd, &ctx);
    uint32_t chosen = s == VKG_SUCCESS ? vkg_context_device_info(ctx)->index : UINT32_MAX;
    vkg_context_destroy(ctx);
    for (uint32_t i = 0; i < n && i < 16; i++) print_info(&infos[i], infos[i].index == chosen);
    if (s != VKG_SUCCESS) return fail(s);
    return 0;
}

static int usage(void)
{
    fprintf(stderr,
            "usage: vkg devices\n"
            "       vkg inspect FILE [--dim NAME=N ...]\n"
            "       vkg run FILE --input NAME=x.npy ... --out DIR [--dim NAME=N ...]\n"
            "       vkg bench FILE [--runs N] [--warmup N] [--profile] [--dim NAME=N ...]\n"
            "         run, bench, inspect: [--adapter DIR [--adapter-scale S]] merges a PEFT LoRA adapter\n"
            "         (adapter_model.safetensors + adapter_config.json) into the weights first\n"
            "       vkg bench --kernels [--quick] [--matmul-only | --only moe] [--variant texel|tiled|all] [--reps N] [--json FILE]\n"
            "environment: VKG_DEVICE=<index|name substring>, VKG_VALIDATION=1\n");
    return 2;
}

static int cmd_bench(int argc, char **argv)
{
    vkg_bench_opts o = {0};
    int kernels = 0;
    for (int i = 0; i < argc; i++)
        if (!strcmp(argv[i], "--kernels")) kernels = 1;
    if (!kernels) return vkg_cmd_bench_graph(argc, argv);
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--kernels")) kernels = 1;
        else if (!strcmp(argv[i], "--quick")) o.quick = true;
        else if (!strcmp(argv[i], "--matmul-only")) o.matmul_only = true;
        else if (!strcmp(argv[i], "--only") && i + 1 < argc && !strcmp(argv[i + 1], "moe")) {
            o.moe_only = true;
            i++;
        } else if (!strcmp(argv[i], "--json") && i + 1 < argc) o.json_path = argv[++i];
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) o.reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--variant") && i + 1 < argc) {
            const char *v = argv[++i];
            if (!strcmp(v, "texel")) o.variant = VKG_MM_TEXEL;
            else if (!strcmp(v, "tiled")) o.variant = VKG_MM_TILED;
            else if (!strcmp(v, "all")) o.all_variants = true;
            else return usage();
        } else return usage();
    }
    vkg_context *ctx;
    vkg_status s = vkg_context_create(NULL, &ctx);
    if (s != VKG_SUCCESS) return fail(s);
    s = vkg_bench_kernels(ctx, &o, stdout);
    vkg_context_destroy(ctx);
    return s == VKG_SUCCESS ? 0 : fail(s);
}

int main(int argc, char **argv)
{
    if (argc < 2) return usage();
    if (!strcmp(argv[1], "devices")) return cmd_devices();
    if (!strcmp(argv[1], "bench")) return cmd_bench(argc - 2, argv + 2);
    if (!strcmp(argv[1], "inspect")) return vkg_cmd_inspect(argc - 2, argv + 2);
    if (!strcmp(argv[1], "run")) return vkg_cmd_run(argc - 2, argv + 2);
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage();
        return 0;
    }
    return usage();
}
