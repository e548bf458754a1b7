#ifndef POOLFS_CCOMPRESS_H
#define POOLFS_CCOMPRESS_H
#include <stddef.h>

/// Inflates raw deflate data (no zlib header, window bits -12, as qcow2 writes it) into exactly
/// `dst_len` bytes. Returns 0 on success, -1 when the stream is corrupt or too short.
int poolfs_inflate_raw(const void *src, size_t src_len, void *dst, size_t dst_len);

/// Decompresses a zstd stream into exactly `dst_len` bytes. Trailing input after the output is
/// full is ignored, as qcow2 pads compressed clusters to a sector. Returns 0 or -1.
int poolfs_zstd_decompress(const void *src, size_t src_len, void *dst, size_t dst_len);

/// Decompresses one zlib stream (RFC 1950: header, deflate data, Adler-32, as zlib's compress()
/// writes it: vmdk's streamOptimized grains) into at most `dst_len` bytes; trailing input after
/// the stream is ignored, as zlib's uncompress() does. Stores the decoded length in `*out_len`.
/// Returns 0, or -1 when the stream is corrupt, truncated or larger than `dst_len`.
int poolfs_zlib_decompress(const void *src, size_t src_len, void *dst, size_t dst_len, size_t *out_len);

/// How many threads hold decoders now (each thread's are freed when it exits); for tests.
long poolfs_live_decoder_sets(void);

#endif
