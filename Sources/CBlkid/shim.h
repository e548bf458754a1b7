// libblkid (util-linux): partition table probing. Only Pools/PartitionTable.swift and the sketch
// it probes (Pools/PartitionSketch.swift) import this.
#ifndef CBLKID_SHIM_H
#define CBLKID_SHIM_H
#include <blkid.h>

// memfd_create(2), for the anonymous file libblkid probes (the "sketch"). Glibc declares it only
// under _GNU_SOURCE, and defining that here would make this module's system headers differ from
// the Glibc module's; the prototype is glibc's (<bits/mman-shared.h>), MFD_CLOEXEC is 1.
extern int memfd_create(const char *name, unsigned int flags);

static inline int cblkid_memfd_create(const char *name) {
    return memfd_create(name, 1U /* MFD_CLOEXEC */);
}
#endif
