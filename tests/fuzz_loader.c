/* libFuzzer target for the .vkg reader: any input must end in a clean status, never a crash,
 * a sanitizer report or a leak. Seeds: `test_graph_file seeds DIR`. */
#include <stddef.h>
#include <stdint.h>

#include "graph/ir.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    vkg_graph *g = NULL;
    /* copy = true: the reader must not keep pointers into libFuzzer's buffer. */
    if (vkg_graph_parse(data, size, "<fuzz>", true, &g) == VKG_SUCCESS) vkg_graph_free(g);
    return 0;
}
