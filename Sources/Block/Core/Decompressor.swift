import CCompress

/// Compressed clusters: raw deflate (compression_type 0) or zstd (compression_type 1).
enum Decompressor {
    /// Decodes `input` into exactly `output.count` bytes (one cluster).
    static func decompress(_ src: UnsafeRawBufferPointer, into output: UnsafeMutableRawBufferPointer,
                           kind: Header.Compression, offset: UInt64) throws {
        let status = switch kind {
        case .zlib: poolfs_inflate_raw(src.baseAddress, src.count, output.baseAddress, output.count)
        case .zstd: poolfs_zstd_decompress(src.baseAddress, src.count, output.baseAddress, output.count)
        }
        guard status == 0 else {
            throw Qcow2Error.corrupt("\(kind) compressed cluster does not decompress to \(output.count) bytes", offset: offset)
        }
    }

    /// Threads that hold decoders now: each keeps its own, freed when it exits.
    static var liveDecoderSets: Int { poolfs_live_decoder_sets() }
}
