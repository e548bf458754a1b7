/// VirtualBox disk images (vdi), static and dynamic, read-only: docs/formats/vdi.md.
public enum VdiReader: ImageFormatReader {
    public static var format: Image.Format { .vdi }

    public static func open(_ context: FormatContext) throws -> FormatOpening {
        let file = context.file
        let head = try file.readBytes(at: 0, count: Int(min(file.size, UInt64(VdiHeader.length))))
        let header = try VdiHeader.parse(head, fileSize: file.size)
        return FormatOpening(live: VdiDisk(file: file, header: header, cache: context.cache))
    }
}

/// The virtual disk of a vdi image: 1 MiB blocks, each either stored at
/// `offset_data + entry * block_size` or, for the map entries 0xffffffff (never allocated) and
/// 0xfffffffe (discarded), zeros.
final class VdiDisk: BlockDevice {
    static let unallocated: UInt32 = 0xffff_ffff
    static let discarded: UInt32 = 0xffff_fffe

    let file: HostFile
    let header: VdiHeader
    let map: VdiBlockMap

    var size: UInt64 { header.diskSize }

    init(file: HostFile, header: VdiHeader, cache: BlockCache) {
        self.file = file
        self.header = header
        self.map = VdiBlockMap(file: file, header: header, cache: cache)
    }

    /// Where block `index` is stored in the file; nil for a block that reads as zeros.
    func hostOffset(ofBlock index: UInt64, _ chunk: inout VdiBlockMap.Chunk?) throws -> UInt64? {
        let entry = try map.entry(index, in: &chunk)
        guard entry < Self.discarded else { return nil }
        return header.offsetData + UInt64(entry) * header.blockBytes
    }

    public func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        try forEachBlock(offset, UInt64(length)) { start, n, host in
            // Past the end of the file reads zeros, as in QEMU (a truncated dynamic image).
            if let host { plan.appendHost(file, offset: host, length: Int(n)) } else { plan.appendZero(Int(n)) }
        }
    }

    /// QEMU's `vdi_co_block_status`: unallocated blocks are zero and present (the driver says
    /// ZERO, so the block layer calls them allocated); stored blocks are data, and in a static
    /// image (BDRV_BLOCK_RECURSE) also zero where the file has a hole or has ended.
    public func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        try forEachBlock(offset, length) { start, n, host in
            guard let host else {
                return extents.appendMerging(MapExtent(start: start, length: n, depth: 0, present: true, zero: true, data: false))
            }
            if header.isStatic && detection == .likeQemu {
                appendHostStatus(file, guest: start, host: host, length: n, depth: 0, holeIsData: true, into: &extents)
            } else {
                extents.appendMerging(MapExtent(start: start, length: n, depth: 0, present: true, zero: false, data: true, offset: host))
            }
        }
    }

    /// Stored blocks times the block size (the last one clipped to the disk), counted from the
    /// map: at most one entry per 1 MiB of disk, and the map lies inside the file.
    public func allocatedBytes(shouldStop: () -> Bool) throws -> UInt64? {
        var total: UInt64 = 0
        var index: UInt64 = 0
        var chunk: VdiBlockMap.Chunk?
        while index < header.blocksUsed {
            if shouldStop() { return nil }
            let end = min(header.blocksUsed, index + VdiBlockMap.entriesPerChunk)
            for block in index..<end where try hostOffset(ofBlock: block, &chunk) != nil {
                total += min(header.blockBytes, size - block * header.blockBytes)
            }
            index = end
        }
        return total
    }

    /// Calls `body` for each piece of the range that lies in one block, with the host offset
    /// of the piece or nil for zeros.
    private func forEachBlock(_ offset: UInt64, _ length: UInt64,
                              _ body: (_ start: UInt64, _ length: UInt64, _ host: UInt64?) throws -> Void) throws {
        var at = offset
        let end = offset + length
        var chunk: VdiBlockMap.Chunk?
        while at < end {
            let index = at / header.blockBytes
            let within = at % header.blockBytes
            let n = min(end - at, header.blockBytes - within)
            try body(at, n, try hostOffset(ofBlock: index, &chunk).map { $0 + within })
            at += n
        }
    }
}
