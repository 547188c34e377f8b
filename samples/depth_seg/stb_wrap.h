/* stb_image (PNG/JPEG reading) and stb_image_write (PNG writing) from Debian's libstb-dev: the
 * declarations only; stb_impl.c holds the implementations, compiled without our warning flags. */
#ifndef VKG_SAMPLE_STB_WRAP_H
#define VKG_SAMPLE_STB_WRAP_H
#include <stb/stb_image.h>
#include <stb/stb_image_write.h>
#endif
