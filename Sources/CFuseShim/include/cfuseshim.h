#ifndef POOLFS_CFUSESHIM_H
#define POOLFS_CFUSESHIM_H
/* The few libfuse operations that Swift cannot express directly: versioned macros, flexible array
 * members (struct fuse_bufvec) and capability bit masks. */
#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>
#include <stddef.h>
#include <stdint.h>

/// One piece of a read reply: `size` bytes from `fd` at `pos` (fd >= 0), or from `mem`.
struct poolfs_segment {
    int fd;
    uint64_t pos;
    const void *mem;
    size_t size;
};

/// Replies to a read with the segments in order, through fuse_reply_data. File-descriptor
/// segments are spliced to /dev/fuse without a copy when the kernel allows splice.
int poolfs_reply_segments(fuse_req_t req, const struct poolfs_segment *segments, size_t count);

/// Sets readahead and the largest read request (as the mount's max_read option says), and asks
/// for splice writes/moves and parallel directory operations when the kernel offers them.
void poolfs_configure_connection(struct fuse_conn_info *conn, unsigned max_readahead, unsigned max_read, int splice);

/// fuse_session_loop_mt with a config of `max_threads` workers (libfuse 3.12 API).
int poolfs_session_loop_mt(struct fuse_session *session, unsigned max_threads);

/// Keeps the daemon's memory near its cache size: cached clusters (32 KiB and up) are mmap'd by
/// malloc and so returned to the system when evicted, and worker threads share few arenas instead
/// of each fragmenting its own.
void poolfs_tune_malloc(void);

/// The request's caller, for logs.
uint32_t poolfs_req_uid(fuse_req_t req);

#endif
