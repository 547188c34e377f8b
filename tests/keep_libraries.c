/* Sanitizer builds only: a dlclose that keeps libraries mapped. The Vulkan loader unloads the driver
 * and layers at vkDestroyInstance; LeakSanitizer then cannot name the module that made an allocation,
 * and tests/lsan.supp (which suppresses leaks by the driver's and layer's library names) cannot
 * match. Loaded with LD_PRELOAD by scripts/test.sh. */
#include <dlfcn.h>

int dlclose(void *handle)
{
    (void)handle;
    return 0;
}
