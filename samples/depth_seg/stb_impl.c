/* The stb implementations, in their own translation unit (third-party code, built with -w). */
#define STB_IMAGE_IMPLEMENTATION
#define STBI_ONLY_PNG
#define STBI_ONLY_JPEG
#define STB_IMAGE_WRITE_IMPLEMENTATION
#include "stb_wrap.h"
