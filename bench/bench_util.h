/* Timing helpers shared by the benchmarks. */
#ifndef VKG_BENCH_UTIL_H
#define VKG_BENCH_UTIL_H

/* Monotonic wall clock in seconds. */
double vkg_bench_now_s(void);
/* Median of v[0..n-1]; sorts v in place. */
double vkg_bench_median(double *v, int n);

#endif
