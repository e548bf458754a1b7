import CCompress

/// streamOptimized grains: each a grain marker (the grain's first sector, 8 bytes; the
/// compressed size, 4 bytes) then a zlib stream (RFC 1950) of the grain's bytes. The last grain
/// of a disk whose size is not a multiple of the grain size holds only what is left.
extension SparseExtent {
    /// The decoded grain at byte `at` of the file, through the cache; decoded once however many
    /// threads ask for it together. Its length is what the stream holds (a short last grain).
    func decodedGrain(at: UInt64, entryOffset: UInt64) throws -> CachedBlock {
        let key = BlockCache.Key(file: file.id, offset: at, kind: .decoded)
        if let hit = cache.cached(key) { return hit }
        let (pending, isOwner) = decodingTable.withLock { table in
            if let running = table[at] { return (running, false) }
            let started = PendingDecode()
            table[at] = started
            return (started, true)
        }
        guard isOwner else { return try pending.wait() }
        let result = Result { try cache.block(key) { try decode(at: at) } }
        decodingTable.withLock { _ = $0.removeValue(forKey: at) }
        pending.finish(result)
        return try result.get()
    }

    /// Where the compressed bytes of the grain at `at` are, and how many.
    func compressedExtent(at: UInt64) throws -> (offset: UInt64, length: Int) {
        let grainSize = header.grainSize
        guard header.hasMarkers else {
            // No marker: QEMU takes one grain's worth of bytes as the stream.
            return (at, Int(min(grainSize, file.size - at)))
        }
        guard file.size - at >= 12 else {
            throw Qcow2Error.corrupt("grain marker at byte \(at) is cut off by the end of the file", offset: at)
        }
        let marker = VmdkLittleEndian(bytes: try file.readBytes(at: at, count: 12))
        let size = UInt64(marker.u32(8))
        guard size > 0, size <= 2 * grainSize else {
            throw Qcow2Error.corrupt("grain marker at byte \(at) says \(size) compressed bytes (1 to \(2 * grainSize) allowed)", offset: at + 8)
        }
        guard size <= file.size - at - 12 else {
            throw Qcow2Error.corrupt("compressed grain at byte \(at) (\(size) bytes) runs past the end of the file (\(file.size) bytes)", offset: at + 8)
        }
        return (at + 12, Int(size))
    }

    private func decode(at: UInt64) throws -> CachedBlock {
        let (offset, length) = try compressedExtent(at: at)
        let grainSize = Int(header.grainSize)
        let input = UnsafeMutableRawBufferPointer.allocate(byteCount: max(length, 1), alignment: 16)
        defer { input.deallocate() }
        try file.read(into: UnsafeMutableRawBufferPointer(rebasing: input[0..<length]), at: offset)
        var decoded = 0
        let full = try CachedBlock(count: grainSize) { output in
            guard poolfs_zlib_decompress(input.baseAddress, length, output.baseAddress, output.count, &decoded) == 0 else {
                throw Qcow2Error.corrupt("compressed grain at byte \(at) is not a zlib stream of at most \(grainSize) bytes", offset: offset)
            }
        }
        guard decoded > 0 else {
            throw Qcow2Error.corrupt("compressed grain at byte \(at) decodes to no bytes", offset: offset)
        }
        guard decoded < grainSize else { return full }
        // A short grain (the disk's last): kept at its true length, so that reading past it fails as in QEMU.
        return CachedBlock(count: decoded) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: full.bytes[0..<decoded])) }
    }
}
