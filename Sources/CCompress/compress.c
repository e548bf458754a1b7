#include "ccompress.h"
#include <string.h>
#include <libdeflate.h>
#include <zlib.h>
#include <zstd.h>

/* Decoder state is kept per thread: FUSE worker threads decode many clusters each, and creating
 * a decoder per cluster costs more than decoding a small one. The number of threads is bounded,
 * so is this memory. */
static __thread struct libdeflate_decompressor *deflate_decoder;
static __thread ZSTD_DCtx *zstd_decoder;

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
    if (!deflate_decoder) deflate_decoder = libdeflate_alloc_decompressor();
    if (deflate_decoder &&
        libdeflate_deflate_decompress(deflate_decoder, src, src_len, dst, dst_len, NULL) == LIBDEFLATE_SUCCESS)
        return 0;
    return inflate_with_zlib(src, src_len, dst, dst_len);
}

int poolfs_zstd_decompress(const void *src, size_t src_len, void *dst, size_t dst_len) {
    if (!zstd_decoder) zstd_decoder = ZSTD_createDCtx();
    if (!zstd_decoder) return -1;
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
