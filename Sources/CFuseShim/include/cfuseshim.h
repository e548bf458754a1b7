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

/// The high half of an open file's fh when it is a passthrough open: the low half is the backing id.
#define POOLFS_PASSTHROUGH_FH_TAG 0x70617373u

/// Routes the session's I/O (mounted already) through the shim, which completes the INIT and
/// OPEN replies libfuse 3.14 cannot make: asks for FUSE passthrough when `passthrough`, and for
/// FUSE_HANDLE_KILLPRIV_V2 when `handle_killpriv`, and for FUSE_DIRECT_IO_ALLOW_MMAP when
/// `direct_io_mmap`, each if the kernel offers it. Data replies still splice.
/// fuse_session_custom_io's return.
int poolfs_session_custom_io(struct fuse_session *session, int passthrough, int handle_killpriv,
                             int direct_io_mmap);

/// Whether the INIT reply asked for FUSE_HANDLE_KILLPRIV_V2.
int poolfs_killpriv_negotiated(void);

/// Whether the INIT reply asked for FUSE_DIRECT_IO_ALLOW_MMAP (MAP_SHARED of a FOPEN_DIRECT_IO open).
int poolfs_direct_io_mmap_negotiated(void);

/// Whether the INIT reply asked for FUSE passthrough (the kernel may still have refused it).
int poolfs_passthrough_negotiated(void);

/// ioctl(FUSE_DEV_IOC_BACKING_OPEN) of `fd`: a backing id (> 0), or -errno.
int poolfs_backing_open(struct fuse_session *session, int fd);

/// ioctl(FUSE_DEV_IOC_BACKING_CLOSE): 0 or -errno.
int poolfs_backing_close(struct fuse_session *session, int backing_id);

/// fuse_reply_open: as a passthrough open of `backing_id` (> 0), whose reads and writes still
/// come to the daemon when `direct_io` (FOPEN_DIRECT_IO); else as FOPEN_DIRECT_IO when
/// `direct_io`; else with FOPEN_KEEP_CACHE when `keep_cache`.
int poolfs_reply_open(fuse_req_t req, struct fuse_file_info *fi, int backing_id, int keep_cache, int direct_io);

/// Whether open(2) flags have O_DIRECT (which Swift's Glibc hides behind _GNU_SOURCE).
int poolfs_is_direct_open(int flags);

/// Whether an open file's fh is a passthrough open's (see poolfs_reply_open).
int poolfs_is_passthrough_fh(uint64_t fh);

/// fuse_lowlevel_notify_inval_inode of the whole file: its cached pages and attributes go.
int poolfs_notify_inval_inode(struct fuse_session *session, uint64_t inode);

#endif
