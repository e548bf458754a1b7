#ifndef CHOSTIO_H
#define CHOSTIO_H

#include <stdint.h>
#include <sys/xattr.h>

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

/// openat2(2) of `path` beneath the directory `dirfd` with RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS
/// (no "..", absolute path or symbolic link may lead out of it), `flags` | O_CLOEXEC. Retries
/// EINTR. A descriptor, or -errno (-EXDEV: the path leads out of the directory; -ENOSYS: the
/// kernel has no openat2).
int poolfs_open_beneath(int dirfd, const char *path, int flags);

/// The filesystem type (statfs f_type) of the open file `fd`, or -1 with errno.
long long poolfs_fs_type(int fd);

/// posix_spawnp(3) of a command whose `argc` arguments and `envc` "NAME=value" strings are packed,
/// each NUL-terminated, in `args` and `env`. The child reads /dev/null, writes to `out_fd` and
/// `err_fd`, inherits no other descriptor (a FUSE daemon's /dev/fuse must not outlive it in an
/// lvm helper), and starts with no signal blocked or ignored. Sets `*pid`; 0 or an errno value.
int poolfs_spawn(const char *args, int argc, const char *env, int envc, int out_fd, int err_fd, int *pid);
/// Waits up to `timeout_ms` for child `pid` (waitpid(2), WNOHANG, polled with a growing sleep).
/// 0 once it exited, with `*status` its exit code or 128 + the signal that ended it; -ETIMEDOUT
/// while it runs; another -errno on failure.
int poolfs_wait(int pid, int timeout_ms, int *status);

/// mallopt(M_MMAP_THRESHOLD, mmap_threshold) and mallopt(M_TRIM_THRESHOLD, trim_threshold): for
/// a short-lived command whose work allocates and frees the same few MB over and over, kept
/// rather than mapped and page-faulted in afresh each time.
void poolfs_keep_freed_memory(int mmap_threshold, int trim_threshold);

#endif
