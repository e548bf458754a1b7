#ifndef CHOSTIO_H
#define CHOSTIO_H

#include <stdint.h>

/// fallocate(2) with FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE; -errno on failure.
int poolfs_punch_hole(int fd, uint64_t offset, uint64_t length);
/// fallocate(2) with FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE; -errno on failure.
int poolfs_zero_range(int fd, uint64_t offset, uint64_t length);

/// Takes (exclusive != 0: write, else read) or drops (unlock != 0) an open-file-description lock
/// on one byte, without waiting; -errno on failure (-EAGAIN: someone else holds a conflicting lock).
int poolfs_ofd_lock_byte(int fd, uint64_t byte, int exclusive, int unlock);
/// Whether another open file description holds a lock on `byte` that conflicts with an exclusive
/// lock: 1 yes, 0 no, -errno on failure.
int poolfs_ofd_byte_locked(int fd, uint64_t byte);

#endif
