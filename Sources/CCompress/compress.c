#include "ccompress.h"
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <libdeflate.h>
#include <zlib.h>
#include <zstd.h>

/* Decoder state is kept per thread: FUSE worker threads decode many clusters each, and creating
 * a decoder per cluster costs more than decoding a small one. Threads come and go (Dispatch's
 * workers exit when idle), so a thread's decoders are freed when it exits, by the destructor of
 * a pthread key that holds them; the __thread pointer is the fast path to the same struct. */
struct decoders {
    struct libdeflate_decompressor *deflate;
    ZSTD_DCtx *zstd;
};
static __thread struct decoders *decoders;
static pthread_key_t decoders_key;
static pthread_once_t decoders_once = PTHREAD_ONCE_INIT;
static atomic_long live_decoders;

static void free_decoders(void *p) {
    struct decoders *d = p;
    if (d->deflate) libdeflate_free_decompressor(d->deflate);
    if (d->zstd) ZSTD_freeDCtx(d->zstd);
    free(d);
    atomic_fetch_sub(&live_decoders, 1);
}

static void make_decoders_key(void) {
    /* Without a key, decoders could not be freed: each thread then decodes with a fresh one. */
    if (pthread_key_create(&decoders_key, free_decoders) != 0) decoders_key = (pthread_key_t)-1;
}

/* This thread's decoders, made on first use; NULL when out of memory. */
static struct decoders *thread_decoders(void) {
    if (decoders) return decoders;
    pthread_once(&decoders_once, make_decoders_key);
    if (decoders_key == (pthread_key_t)-1) return NULL;
    struct decoders *d = calloc(1, sizeof *d);
    if (!d) return NULL;
    if (pthread_setspecific(decoders_key, d) != 0) {
        free(d);
        return NULL;
    }
    atomic_fetch_add(&live_decoders, 1);
    decoders = d;
    return d;
}

long poolfs_live_decoder_sets(void) {
    return atomic_load(&live_decoders);
}

/* QEMU's semantics (qcow2_zlib_decompress): success when the output buffer is full, whether or not
 * the stream ends there. */
static int inflate_with_zlib(const void *src, size_t src_len, void *dst, size_t dst_len) {
    z_stream strm;
    memset(&strm, 0, sizeof strm);
    if (inflateInit2(&strm, -12) != Z_OK) return -1;
    strm.next_in = (Bytef *)src;
    strm.avail_in = (uInt)src_len;
    strm.next_out = (Bytef *)dst;
    strm.avail_out = (uInt)dst_len;
    int ret = inflate(&strm, Z_FINISH);
    int ok = (ret == Z_STREAM_END || ret == Z_BUF_ERROR) && strm.avail_out == 0;
    inflateEnd(&strm);
    return ok ? 0 : -1;
}

int poolfs_inflate_raw(const void *src, size_t src_len, void *dst, size_t dst_len) {
    /* Fast path: libdeflate decodes a whole buffer at once, which is exactly a qcow2 cluster.
     * A stream that does not decode to exactly dst_len bytes goes to zlib, which decides. */
    struct decoders *d = thread_decoders();
    if (d && !d->deflate) d->deflate = libdeflate_alloc_decompressor();
    if (d && d->deflate &&
        libdeflate_deflate_decompress(d->deflate, src, src_len, dst, dst_len, NULL) == LIBDEFLATE_SUCCESS)
        return 0;
    return inflate_with_zlib(src, src_len, dst, dst_len);
}

int poolfs_zstd_decompress(const void *src, size_t src_len, void *dst, size_t dst_len) {
    struct decoders *d = thread_decoders();
    if (d && !d->zstd) d->zstd = ZSTD_createDCtx();
    if (!d || !d->zstd) return -1;
    ZSTD_DCtx *zstd_decoder = d->zstd;
    ZSTD_DCtx_reset(zstd_decoder, ZSTD_reset_session_only);
    ZSTD_inBuffer in = { src, src_len, 0 };
    ZSTD_outBuffer out = { dst, dst_len, 0 };
    /* Each call makes progress or fails; the loop is bounded by the input and output sizes. */
    while (out.pos < out.size) {
        size_t before_in = in.pos, before_out = out.pos;
        size_t ret = ZSTD_decompressStream(zstd_decoder, &out, &in);
        if (ZSTD_isError(ret)) return -1;
        if (out.pos == out.size) return 0;
        if (ret == 0 && in.pos == in.size) return -1;              /* frame ended short of a cluster */
        if (in.pos == before_in && out.pos == before_out) return -1; /* no progress: truncated */
    }
    return 0;
}

int poolfs_zlib_decompress(const void *src, size_t src_len, void *dst, size_t dst_len, size_t *out_len) {
    struct decoders *d = thread_decoders();
    if (d && !d->deflate) d->deflate = libdeflate_alloc_decompressor();
    if (!d || !d->deflate) return -1;
    size_t consumed = 0, produced = 0;
    if (libdeflate_zlib_decompress_ex(d->deflate, src, src_len, dst, dst_len, &consumed, &produced) != LIBDEFLATE_SUCCESS)
        return -1;
    *out_len = produced;
    return 0;
}
