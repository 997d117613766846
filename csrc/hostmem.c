#include "hostmem.h"

#include <errno.h>
#include <sys/mman.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23 /* include/uapi/asm-generic/mman-common.h, Linux 5.14 */
#endif

int sc_populate_write(uint8_t *addr, size_t len)
{
    if (len == 0)
        return 0;
    if (addr == NULL || ((uintptr_t)addr & 4095) != 0)
        return -EINVAL;
    if (madvise(addr, len, MADV_POPULATE_WRITE) != 0)
        return -errno;
    return 0;
}
