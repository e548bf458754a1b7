/* FUSE passthrough and kept page caches on libfuse 3.14, which cannot negotiate passthrough (it
 * came in 3.17). The session's I/O goes through fuse_session_custom_io(), which sees every
 * request as read from /dev/fuse and every reply as written; the few replies libfuse cannot
 * express are completed there:
 *
 * - INIT: the request's flags/flags2 are kept; the reply (struct fuse_init_out) gets
 *   FUSE_INIT_EXT in flags (bit 30), FUSE_PASSTHROUGH in flags2 (bit 5, flag bit 37) and
 *   max_stack_depth 1 (byte 36), when the kernel offered FUSE_PASSTHROUGH and the reply does not
 *   ask for the writeback cache (the kernel refuses the two together: process_init_reply); and
 *   FUSE_HANDLE_KILLPRIV_V2 in flags (bit 28) when asked for and offered. With it the kernel
 *   marks the superblock SB_NOSEC and stops asking for security.capability (GETXATTR, from
 *   file_remove_privs) before every write: the daemon is then the one to clear setuid, setgid
 *   and capabilities on write, truncate and chown (FUSE_WRITE_KILL_SUIDGID,
 *   FATTR_KILL_SUIDGID, FUSE_OPEN_KILL_SUIDGID). poolfs has nothing to clear: its files never
 *   show those mode bits and it has no security.* attributes (PoolFileSystem.attributes).
 *   And FUSE_DIRECT_IO_ALLOW_MMAP in flags2 (bit 4, flag bit 36; kernel 6.6) when asked for and
 *   offered: writers' opens are FOPEN_DIRECT_IO (the kernel hands the daemon the writer's own
 *   pages instead of copying them into the FUSE file's page cache first), and without it the
 *   kernel refuses MAP_SHARED of such an open (fuse_file_mmap: ENODEV).
 * - OPEN: the request's unique is kept; the reply (struct fuse_open_out { u64 fh; u32 open_flags;
 *   i32 backing_id; }) whose fh carries POOLFS_PASSTHROUGH_FH_TAG in its high half gets
 *   FOPEN_PASSTHROUGH (bit 7) and the backing id from the low half. Only OPEN replies are looked
 *   at: an OPENDIR or read reply of the same size is never mistaken for one.
 *
 * Data replies still splice: splice_send is provided (libfuse offers FUSE_CAP_SPLICE_WRITE only
 * then); it carries read data only, never an INIT or OPEN reply. splice_receive is not: requests
 * must be read into memory to be seen, and poolfs never asked for FUSE_CAP_SPLICE_READ.
 *
 * One session per process (the daemon serves one mount): the state is static. */
#define _GNU_SOURCE
#include "cfuseshim.h"
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

/* include/uapi/linux/fuse.h (7.40), which bookworm's headers predate. */
enum {
    OP_OPEN = 14,
    OP_INIT = 26,
    IN_HEADER_SIZE = 40,           /* struct fuse_in_header */
    OUT_HEADER_SIZE = 16,          /* struct fuse_out_header */
    INIT_OUT_MIN = 40,             /* through max_stack_depth */
    OPEN_OUT_SIZE = 16,            /* struct fuse_open_out */
};
#define INIT_WRITEBACK_CACHE (1u << 16)
#define INIT_HANDLE_KILLPRIV_V2 (1u << 28)
#define INIT_EXT (1u << 30)
#define INIT2_DIRECT_IO_ALLOW_MMAP (1u << 4)  /* FUSE_DIRECT_IO_ALLOW_MMAP >> 32 */
#define INIT2_PASSTHROUGH (1u << 5)  /* FUSE_PASSTHROUGH >> 32 */
#define FOPEN_PASSTHROUGH_FLAG (1u << 7)

struct backing_map {
    int32_t fd;
    uint32_t flags;
    uint64_t padding;
};
#define DEV_IOC_BACKING_OPEN _IOW(229, 1, struct backing_map)
#define DEV_IOC_BACKING_CLOSE _IOW(229, 2, uint32_t)

/* OPEN requests in flight: at most one per worker thread, and poolfs allows 256. */
#define OPENS_MAX 512

static struct {
    int wanted;
    int killpriv_wanted;
    int direct_mmap_wanted;
    atomic_uint_fast64_t init_unique;   /* 0 until INIT is read */
    atomic_uint kernel_flags;           /* INIT's flags */
    atomic_uint kernel_flags2;          /* INIT's flags2 (0 without FUSE_INIT_EXT) */
    atomic_int negotiated;
    atomic_int killpriv_negotiated;
    atomic_int direct_mmap_negotiated;
    atomic_int opens_pending;
    pthread_mutex_t lock;
    uint64_t opens[OPENS_MAX];
    int open_count;
} pt = { .lock = PTHREAD_MUTEX_INITIALIZER };

static uint32_t load32(const void *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t load64(const void *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static void store32(void *p, uint32_t v) { memcpy(p, &v, 4); }

static void remember_open(uint64_t unique) {
    pthread_mutex_lock(&pt.lock);
    if (pt.open_count < OPENS_MAX) {
        pt.opens[pt.open_count++] = unique;
        atomic_fetch_add(&pt.opens_pending, 1);
    }
    pthread_mutex_unlock(&pt.lock);
}

/* Whether `unique` is an OPEN in flight; forgets it. */
static int take_open(uint64_t unique) {
    int found = 0;
    pthread_mutex_lock(&pt.lock);
    for (int i = 0; i < pt.open_count; i++) {
        if (pt.opens[i] == unique) {
            pt.opens[i] = pt.opens[--pt.open_count];
            atomic_fetch_sub(&pt.opens_pending, 1);
            found = 1;
            break;
        }
    }
    pthread_mutex_unlock(&pt.lock);
    return found;
}

static ssize_t io_read(int fd, void *buf, size_t len, void *userdata) {
    (void)userdata;
    ssize_t n = read(fd, buf, len);
    if (n < IN_HEADER_SIZE) return n;
    const unsigned char *in = buf;
    uint32_t opcode = load32(in + 4);
    uint64_t unique = load64(in + 8);
    if (opcode == OP_OPEN && atomic_load(&pt.negotiated)) {
        remember_open(unique);
    } else if (opcode == OP_INIT && n >= IN_HEADER_SIZE + 20) {
        /* struct fuse_init_in: major 0, minor 4, max_readahead 8, flags 12, flags2 16 */
        uint32_t flags = load32(in + IN_HEADER_SIZE + 12);
        atomic_store(&pt.kernel_flags, flags);
        atomic_store(&pt.kernel_flags2, (flags & INIT_EXT) ? load32(in + IN_HEADER_SIZE + 16) : 0);
        atomic_store(&pt.init_unique, unique);
    }
    return n;
}

/* The INIT reply, with passthrough, FUSE_HANDLE_KILLPRIV_V2 and FUSE_DIRECT_IO_ALLOW_MMAP asked
 * for when wanted and offered. */
static void complete_init(struct iovec *payload, unsigned char *copy, size_t room) {
    int passthrough = pt.wanted && (atomic_load(&pt.kernel_flags2) & INIT2_PASSTHROUGH);
    int killpriv = pt.killpriv_wanted && (atomic_load(&pt.kernel_flags) & INIT_HANDLE_KILLPRIV_V2);
    int direct_mmap = pt.direct_mmap_wanted && (atomic_load(&pt.kernel_flags2) & INIT2_DIRECT_IO_ALLOW_MMAP);
    if (!passthrough && !killpriv && !direct_mmap) return;
    if (payload->iov_len < INIT_OUT_MIN || payload->iov_len > room) return;
    memcpy(copy, payload->iov_base, payload->iov_len);
    /* struct fuse_init_out: flags 12, flags2 32, max_stack_depth 36 */
    uint32_t flags = load32(copy + 12);
    if (killpriv) {
        flags |= INIT_HANDLE_KILLPRIV_V2;
        atomic_store(&pt.killpriv_negotiated, 1);
    }
    if (passthrough && !(flags & INIT_WRITEBACK_CACHE)) {
        flags |= INIT_EXT;
        store32(copy + 32, load32(copy + 32) | INIT2_PASSTHROUGH);
        /* Backing files on ordinary filesystems (stack depth 0); FILESYSTEM_MAX_STACK_DEPTH is 2. */
        store32(copy + 36, 1);
        atomic_store(&pt.negotiated, 1);
    }
    if (direct_mmap) {
        flags |= INIT_EXT;
        store32(copy + 32, load32(copy + 32) | INIT2_DIRECT_IO_ALLOW_MMAP);
        atomic_store(&pt.direct_mmap_negotiated, 1);
    }
    store32(copy + 12, flags);
    payload->iov_base = copy;
}

/* An OPEN reply whose fh names a backing id, made a passthrough open. */
static void complete_open(struct iovec *payload, unsigned char *copy) {
    if (payload->iov_len != OPEN_OUT_SIZE) return;
    uint64_t fh = load64(payload->iov_base);
    if ((fh >> 32) != POOLFS_PASSTHROUGH_FH_TAG) return;
    memcpy(copy, payload->iov_base, OPEN_OUT_SIZE);
    store32(copy + 8, load32(copy + 8) | FOPEN_PASSTHROUGH_FLAG);
    store32(copy + 12, (uint32_t)fh);
    payload->iov_base = copy;
}

static ssize_t io_writev(int fd, struct iovec *iov, int count, void *userdata) {
    (void)userdata;
    if (count < 1 || iov[0].iov_len < OUT_HEADER_SIZE) return writev(fd, iov, count);
    const unsigned char *out = iov[0].iov_base;
    int32_t error = (int32_t)load32(out + 4);
    uint64_t unique = load64(out + 8);
    int init = unique != 0 && unique == atomic_load(&pt.init_unique);
    int open = !init && unique != 0 && atomic_load(&pt.opens_pending) > 0 && take_open(unique);
    if (!(init || open) || error != 0 || count != 2) return writev(fd, iov, count);
    /* The reply's memory is libfuse's: the patched payload is a copy. */
    unsigned char copy[128];
    struct iovec patched[2] = { iov[0], iov[1] };
    if (init) {
        atomic_store(&pt.init_unique, 0);
        complete_init(&patched[1], copy, sizeof copy);
    } else {
        complete_open(&patched[1], copy);
    }
    return writev(fd, patched, 2);
}

static ssize_t io_splice_send(int fdin, off_t *offin, int fdout, off_t *offout, size_t len,
                              unsigned int flags, void *userdata) {
    (void)userdata;
    return splice(fdin, offin, fdout, offout, len, flags);
}

int poolfs_session_custom_io(struct fuse_session *session, int passthrough, int handle_killpriv,
                             int direct_io_mmap) {
    pt.wanted = passthrough;
    pt.killpriv_wanted = handle_killpriv;
    pt.direct_mmap_wanted = direct_io_mmap;
    const struct fuse_custom_io io = {
        .writev = io_writev,
        .read = io_read,
        .splice_send = io_splice_send,
        .splice_receive = NULL,
    };
    return fuse_session_custom_io(session, &io, fuse_session_fd(session));
}

int poolfs_passthrough_negotiated(void) {
    return atomic_load(&pt.negotiated);
}

int poolfs_killpriv_negotiated(void) {
    return atomic_load(&pt.killpriv_negotiated);
}

int poolfs_direct_io_mmap_negotiated(void) {
    return atomic_load(&pt.direct_mmap_negotiated);
}

int poolfs_backing_open(struct fuse_session *session, int fd) {
    struct backing_map map = { .fd = fd, .flags = 0, .padding = 0 };
    int id = ioctl(fuse_session_fd(session), DEV_IOC_BACKING_OPEN, &map);
    return id < 0 ? -errno : id;
}

int poolfs_backing_close(struct fuse_session *session, int backing_id) {
    uint32_t id = (uint32_t)backing_id;
    return ioctl(fuse_session_fd(session), DEV_IOC_BACKING_CLOSE, &id) < 0 ? -errno : 0;
}

int poolfs_reply_open(fuse_req_t req, struct fuse_file_info *fi, int backing_id, int keep_cache, int direct_io) {
    if (backing_id > 0) {
        /* The kernel refuses FOPEN_KEEP_CACHE on a passthrough open (FOPEN_PASSTHROUGH_MASK);
         * FOPEN_DIRECT_IO it takes, and then sends reads and writes to the daemon. */
        fi->fh = ((uint64_t)POOLFS_PASSTHROUGH_FH_TAG << 32) | (uint32_t)backing_id;
        fi->keep_cache = 0;
        fi->direct_io = direct_io ? 1 : 0;
    } else if (direct_io) {
        /* Nothing of this open is cached; its writes drop what other opens cached of their range
         * (fuse_direct_io: invalidate_inode_pages2_range). */
        fi->keep_cache = 0;
        fi->direct_io = 1;
    } else {
        fi->keep_cache = keep_cache ? 1 : 0;
    }
    return fuse_reply_open(req, fi);
}

int poolfs_is_direct_open(int flags) {
    return (flags & O_DIRECT) != 0;
}

int poolfs_is_passthrough_fh(uint64_t fh) {
    return (fh >> 32) == POOLFS_PASSTHROUGH_FH_TAG;
}

int poolfs_notify_inval_inode(struct fuse_session *session, uint64_t inode) {
    return fuse_lowlevel_notify_inval_inode(session, inode, 0, 0);
}
