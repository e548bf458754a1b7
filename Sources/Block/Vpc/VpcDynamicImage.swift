/// A dynamic VHD: guest block `i` lives at `512 * BAT[i] + bitmapSize` in the file, or reads as
/// zeros when `BAT[i]` is 0xFFFFFFFF. QEMU ignores the sector bitmaps on reads (every sector
/// of an allocated block is read from the file), and so does poolfs.
final class VpcDynamicImage: BlockDevice {
    let file: HostFile
    let size: UInt64
    let bat: VpcBat
    let blockSize: UInt64
    let bitmapSize: UInt64

    init(file: HostFile, size: UInt64, bat: VpcBat, blockSize: UInt64, bitmapSize: UInt64) {
        self.file = file
        self.size = size
        self.bat = bat
        self.blockSize = blockSize
        self.bitmapSize = bitmapSize
    }

    /// Where guest `offset` lives in the file, nil when its block is not allocated, and how many
    /// bytes of the same block follow it.
    func locate(_ offset: UInt64) throws -> (host: UInt64?, run: UInt64) {
        let index = offset / blockSize
        let inBlock = offset % blockSize
        let entry = try bat.entry(index)
        let host = entry == VpcBat.unallocated ? nil : 512 * UInt64(entry) + bitmapSize + inBlock
        return (host, blockSize - inBlock)
    }

    func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        var at = offset
        var left = UInt64(length)
        while left > 0 {
            let (host, run) = try locate(at)
            let n = min(run, left)
            if let host { plan.appendHost(file, offset: host, length: Int(n)) } else { plan.appendZero(Int(n)) }
            at += n
            left -= n
        }
    }

    /// As QEMU's vpc_co_block_status: allocated blocks are data (no look at host holes),
    /// unallocated ones read as zeros. Runs of blocks come from one scan of the table.
    func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        let end = offset + length
        var at = offset
        try bat.scan(from: offset / blockSize) { index, entry in
            guard at < end else { return false }
            let inBlock = at - index * blockSize
            let n = min(blockSize - inBlock, end - at)
            let host = entry == VpcBat.unallocated ? nil : 512 * UInt64(entry) + bitmapSize + inBlock
            extents.appendMerging(MapExtent(start: at, length: n, depth: 0, present: true, zero: host == nil,
                                            data: host != nil, offset: host))
            at += n
            return true
        }
        // Past the table (QEMU reads such blocks as not allocated).
        if at < end {
            extents.appendMerging(MapExtent(start: at, length: end - at, depth: 0, present: true, zero: true, data: false))
        }
    }

    /// Allocated blocks times the block size (the last one clipped to the disk), from the BAT.
    func allocatedBytes(shouldStop: () -> Bool) throws -> UInt64? {
        let blocks = (size + blockSize - 1) / blockSize
        var total: UInt64 = 0
        var stopped = false
        try bat.scan(from: 0) { index, entry in
            guard index < blocks else { return false }
            if index % VpcBat.chunkEntries == 0, shouldStop() { stopped = true; return false }
            if entry != VpcBat.unallocated { total += min(blockSize, size - index * blockSize) }
            return true
        }
        return stopped ? nil : total
    }
}
