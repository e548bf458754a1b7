#include "ccompress.h"
#include <string.h>
#include <zlib.h>
#include <zstd.h>

int poolfs_inflate_raw(const void *src, size_t src_len, void *dst, size_t dst_len) {
    z_stream strm;
    memset(&strm, 0, sizeof strm);
    if (inflateInit2(&strm, -12) != Z_OK) return -1;
    strm.next_in = (Bytef *)src;
    strm.avail_in = (uInt)src_len;
    strm.next_out = (Bytef *)dst;
    strm.avail_out = (uInt)dst_len;
    int ret = inflate(&strm, Z_FINISH);
    /* qcow2 compressed data may be followed by padding: a full output buffer is success. */
    int ok = (ret == Z_STREAM_END || ret == Z_BUF_ERROR) && strm.avail_out == 0;
    inflateEnd(&strm);
    return ok ? 0 : -1;
}

int poolfs_zstd_decompress(const void *src, size_t src_len, void *dst, size_t dst_len) {
    ZSTD_DCtx *dctx = ZSTD_createDCtx();
    if (!dctx) return -1;
    ZSTD_inBuffer in = { src, src_len, 0 };
    ZSTD_outBuffer out = { dst, dst_len, 0 };
    int result = -1;
    /* Each call makes progress or fails; the loop is bounded by the input and output sizes. */
    while (out.pos < out.size) {
        size_t before_in = in.pos, before_out = out.pos;
        size_t ret = ZSTD_decompressStream(dctx, &out, &in);
        if (ZSTD_isError(ret)) break;
        if (out.pos == out.size) { result = 0; break; }
        if (ret == 0 && in.pos == in.size) break;          /* frame ended short of a cluster */
        if (in.pos == before_in && out.pos == before_out) break; /* no progress: truncated */
    }
    ZSTD_freeDCtx(dctx);
    return result;
}
