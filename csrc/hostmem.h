/*
 * Host memory: faulting in frames ahead of their first use.
 *
 * A migration target writes every page of the incoming guest into frames it has never touched,
 * so the host kernel takes a page fault (and, on a virtual machine, the hypervisor backs the
 * page) inside the loop that decrypts and stores the pages. madvise(MADV_POPULATE_WRITE)
 * (Linux 5.14) faults a range in as writable without changing what it holds; called from
 * another thread on the frames about to be stored to (HostMemory.populating), it takes that
 * cost off the storing thread.
 */
#ifndef SEVCORE_HOSTMEM_H
#define SEVCORE_HOSTMEM_H

#include "sevcore.h"

/* cdef:begin */
/* Fault in [addr, addr + len) writable, contents unchanged: 0, or -errno (-EINVAL where the
 * kernel lacks MADV_POPULATE_WRITE or the range is not page aligned, -ENOMEM where it is not
 * mapped or memory ran out, -EFAULT). */
int sc_populate_write(uint8_t *addr, size_t len);
/* cdef:end */

#endif
