#ifndef VKG_MOE_BENCH_H
#define VKG_MOE_BENCH_H
#include <stdbool.h>
#include <stdio.h>

#include "runtime/kernels/kernels.h"

/* The MoE rows of `vkg bench --kernels` (bench/RESULTS.md): moe_lora_ffn (naive, shared_base, dense),
 * deepseek_ffn (against dense FFNs of the active and of the full width), moe_ffn (decoder shapes).
 * json, when given, receives records continuing a JSON list (*first tracks the comma). */
vkg_status vkg_bench_moe(vkg_context *ctx, int reps, bool quick, FILE *out, FILE *json, bool *first);
#endif
