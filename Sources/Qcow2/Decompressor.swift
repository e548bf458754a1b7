import CCompress

/// Compressed clusters: raw deflate (compression_type 0) or zstd (compression_type 1).
enum Decompressor {
    static func decompress(_ input: [UInt8], kind: Header.Compression, clusterSize: Int, offset: UInt64) throws -> [UInt8] {
        var output = [UInt8](repeating: 0, count: clusterSize)
        let status = input.withUnsafeBytes { src in
            output.withUnsafeMutableBytes { dst in
                switch kind {
                case .zlib: poolfs_inflate_raw(src.baseAddress, src.count, dst.baseAddress, dst.count)
                case .zstd: poolfs_zstd_decompress(src.baseAddress, src.count, dst.baseAddress, dst.count)
                }
            }
        }
        guard status == 0 else {
            throw Qcow2Error.corrupt("\(kind) compressed cluster does not decompress to \(clusterSize) bytes", offset: offset)
        }
        return output
    }
}
