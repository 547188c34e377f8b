#ifndef VKG_KERNELS_BENCH_H
#define VKG_KERNELS_BENCH_H
#include <stdbool.h>
#include <stdio.h>

#include "runtime/kernels/kernels.h"

typedef struct vkg_bench_opts {
    int reps;                /* 0: 11 (5 with quick) */
    bool quick;              /* two matmul shapes, fewer repetitions: the README's smoke run */
    bool matmul_only;        /* skip the device measurements and the MoE layers */
    bool moe_only;           /* only the MoE layers (bench/moe_bench.c) */
    bool all_variants;       /* every matmul variant the device can run, side by side */
    vkg_mm_variant variant;  /* 0: the device's default */
    const char *json_path;   /* optional: write figures as a JSON list */
} vkg_bench_opts;

/* Prints a table to out; with json_path also writes the figures. */
vkg_status vkg_bench_kernels(vkg_context *ctx, const vkg_bench_opts *opts, FILE *out);
#endif
