#include "cfuseshim.h"
#include <errno.h>
#include <malloc.h>
#include <stdlib.h>
#include <sys/uio.h>

/* A reply made of memory only (decompressed clusters, zeros) goes out in one writev. Through
 * fuse_reply_data, libfuse would copy a reply of more than one buffer into a fresh allocation
 * first: at 128 KiB that is an mmap, a page fault per page and an munmap, per reply. */
static int reply_memory(fuse_req_t req, const struct poolfs_segment *segments, size_t count) {
    struct iovec stack[16];
    struct iovec *iov = count <= 16 ? stack : calloc(count, sizeof *iov);
    if (!iov) return fuse_reply_err(req, ENOMEM);
    for (size_t i = 0; i < count; i++) {
        iov[i].iov_base = (void *)segments[i].mem;
        iov[i].iov_len = segments[i].size;
    }
    int ret = fuse_reply_iov(req, iov, (int)count);
    if (iov != stack) free(iov);
    return ret;
}

int poolfs_reply_segments(fuse_req_t req, const struct poolfs_segment *segments, size_t count) {
    if (count == 0) return fuse_reply_buf(req, NULL, 0);
    int files = 0;
    for (size_t i = 0; i < count; i++) files |= segments[i].fd >= 0;
    if (!files) return reply_memory(req, segments, count);
    /* struct fuse_bufvec ends in a one-element array: allocate room for `count` buffers. */
    size_t bytes = sizeof(struct fuse_bufvec) + (count - 1) * sizeof(struct fuse_buf);
    struct fuse_bufvec *vec = calloc(1, bytes);
    if (!vec) return fuse_reply_err(req, ENOMEM);
    vec->count = count;
    enum fuse_buf_copy_flags flags = FUSE_BUF_NO_SPLICE;
    for (size_t i = 0; i < count; i++) {
        struct fuse_buf *buf = &vec->buf[i];
        buf->size = segments[i].size;
        if (segments[i].fd >= 0) {
            buf->flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK | FUSE_BUF_FD_RETRY;
            buf->fd = segments[i].fd;
            buf->pos = (off_t)segments[i].pos;
            flags = FUSE_BUF_SPLICE_MOVE;
        } else {
            buf->mem = (void *)segments[i].mem;
        }
    }
    int ret = fuse_reply_data(req, vec, flags);
    free(vec);
    return ret;
}

void poolfs_configure_connection(struct fuse_conn_info *conn, unsigned max_readahead, unsigned max_read, int splice) {
    if (max_readahead > conn->max_readahead) max_readahead = conn->max_readahead;
    conn->max_readahead = max_readahead;
    conn->max_read = max_read;
    if (splice) {
        if (conn->capable & FUSE_CAP_SPLICE_WRITE) conn->want |= FUSE_CAP_SPLICE_WRITE;
        if (conn->capable & FUSE_CAP_SPLICE_MOVE) conn->want |= FUSE_CAP_SPLICE_MOVE;
    }
    if (conn->capable & FUSE_CAP_PARALLEL_DIROPS) conn->want |= FUSE_CAP_PARALLEL_DIROPS;
    if (conn->capable & FUSE_CAP_ASYNC_READ) conn->want |= FUSE_CAP_ASYNC_READ;
    if (conn->capable & FUSE_CAP_READDIRPLUS) conn->want |= FUSE_CAP_READDIRPLUS;
    conn->want &= ~FUSE_CAP_READDIRPLUS_AUTO;
}

int poolfs_session_loop_mt(struct fuse_session *session, unsigned max_threads) {
    struct fuse_loop_config *config = fuse_loop_cfg_create();
    if (!config) return -1;
    fuse_loop_cfg_set_max_threads(config, max_threads);
    fuse_loop_cfg_set_idle_threads(config, max_threads);
    fuse_loop_cfg_set_clone_fd(config, 0);
    int ret = fuse_session_loop_mt(session, config);
    fuse_loop_cfg_destroy(config);
    return ret;
}

uint32_t poolfs_req_uid(fuse_req_t req) {
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    return ctx ? ctx->uid : 0;
}

void poolfs_tune_malloc(void) {
    mallopt(M_ARENA_MAX, 2);
}
