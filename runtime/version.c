/* The linked library's version, for applications to compare with the header they compiled against. */
#include "vkg.h"

uint32_t vkg_version(void) { return VKG_VERSION; }

const char *vkg_version_string(void) { return VKG_VERSION_STRING; }
