/* Small helpers shared by the C tests: a validated context, seeded data, tolerant comparison.
 * Every check prints what it compared; the process exits non-zero on the first failed check. */
#ifndef VKG_TEST_HARNESS_H
#define VKG_TEST_HARNESS_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "runtime/kernels/kernels.h"

extern int h_failures;
extern int h_checks;

#define CHECK(cond, ...)                                                                           \
    do {                                                                                           \
        h_checks++;                                                                                \
        if (!(cond)) {                                                                             \
            h_failures++;                                                                          \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);                        \
            fprintf(stderr, __VA_ARGS__);                                                          \
            fprintf(stderr, "\n");                                                                 \
        }                                                                                          \
    } while (0)

/* Asserts a vkg call succeeded; on failure prints the status and message and returns 1 from the
 * enclosing function (which returns int). */
#define OK(call)                                                                                   \
    do {                                                                                           \
        vkg_status h__s = (call);                                                                  \
        h_checks++;                                                                                \
        if (h__s != VKG_SUCCESS) {                                                                 \
            h_failures++;                                                                          \
            fprintf(stderr, "FAIL %s:%d: %s -> %s: %s\n", __FILE__, __LINE__, #call,              \
                    vkg_status_name(h__s), vkg_last_error());                                      \
            return 1;                                                                              \
        }                                                                                          \
    } while (0)

/* A context with the validation layer on (tests always run validated). */
vkg_context *h_context(void);
/* Ends a test program: checks no validation message arrived, destroys ctx, prints the tally. */
int h_finish(vkg_context *ctx, const char *name);

/* Ends building a test graph: if st (the status of the writer calls so far) is a success, the
 * serialized graph (malloc'd, owned by the caller) with its size; exits the test otherwise.
 * Destroys w either way. */
void *h_writer_finish(vkg_writer *w, vkg_status st, size_t *size);

/* Deterministic pseudo-random floats in [lo, hi). */
void h_fill(float *p, size_t n, uint32_t seed, float lo, float hi);
/* Buffer holding a copy of host data (n bytes). */
vkg_buf *h_upload(vkg_context *ctx, const void *data, size_t bytes);
/* Downloads n floats; returns malloc'd memory owned by the caller. */
float *h_download(vkg_buf *b, size_t n);

/* Compares element-wise: |got - want| <= atol + rtol * |want| (+ bound[i] if bound is given).
 * Prints the worst element and returns 1 if any element exceeds its tolerance or is NaN. */
int h_compare(const char *what, const float *got, const float *want, const double *bound, size_t n, double atol,
              double rtol);

/* Submits cmd again and checks that the n floats of y come out bit-identical to the first run. */
int h_check_deterministic(vkg_cmd *cmd, vkg_buf *y, size_t n, const char *what);

/* --inject-fault: perturb one output element by 1% before comparing; h_compare then passes only if
 * it catches the difference. Proves the tolerances would fail a wrong kernel. */
extern int h_inject_fault;
void h_maybe_fault(float *got, size_t n);

#endif
