#define _GNU_SOURCE
#include "chostio.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <string.h>

static int fallocate_mode(int fd, int mode, uint64_t offset, uint64_t length) {
    int r;
    do {
        r = fallocate(fd, mode, (off_t)offset, (off_t)length);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int poolfs_punch_hole(int fd, uint64_t offset, uint64_t length) {
    return fallocate_mode(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

int poolfs_zero_range(int fd, uint64_t offset, uint64_t length) {
    return fallocate_mode(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
}

static struct flock byte_lock(uint64_t byte, short type) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)byte;
    fl.l_len = 1;
    fl.l_type = type;
    return fl;
}

int poolfs_ofd_lock_byte(int fd, uint64_t byte, int exclusive, int unlock) {
    struct flock fl = byte_lock(byte, unlock ? F_UNLCK : (exclusive ? F_WRLCK : F_RDLCK));
    return fcntl(fd, F_OFD_SETLK, &fl) < 0 ? -errno : 0;
}

int poolfs_ofd_byte_locked(int fd, uint64_t byte) {
    struct flock fl = byte_lock(byte, F_WRLCK);
    if (fcntl(fd, F_OFD_GETLK, &fl) < 0) return -errno;
    return fl.l_type != F_UNLCK;
}
