import Block

/// One thin LV read from its pool's metadata and data device, without device-mapper: byte `o`
/// is virtual block `o / B` (B = the pool's data block size) at `o % B`; the device's mapping
/// tree (see `ThinPoolMetadata`) maps the virtual block to a data block at `data block × B` of
/// the `_tdata` LV, or to nothing, which reads as zeros (`process_bio` in `dm-thin.c` maps an
/// unprovisioned block to zeros on a read).
///
/// The mapping is fixed for the life of the object. A read costs one descent from the device's
/// root (a handful of cached nodes) to the leaf that covers its first block, then a walk along
/// that leaf's sorted entries; a range that runs past the leaf descends again at the next key.
/// Consecutive data blocks become one read of the data device.
public final class ThinDevice: BlockDevice {
    public let size: UInt64
    /// lvm2's thin_id.
    public let id: UInt64
    public let details: ThinDeviceDetails
    let pool: ThinPoolMetadata
    let root: UInt64
    /// The top-level leaf that names `root`, for messages.
    let rootParent: UInt64
    let data: any BlockDevice
    /// Data blocks a mapping may name: those of the data device that the pool's space map covers.
    let dataBlocks: UInt64

    init(pool: ThinPoolMetadata, id: UInt64, details: ThinDeviceDetails, root: UInt64, rootParent: UInt64,
         size: UInt64, data: any BlockDevice, dataBlocks: UInt64) {
        self.pool = pool; self.id = id; self.details = details; self.root = root; self.rootParent = rootParent
        self.size = size; self.data = data; self.dataBlocks = dataBlocks
    }

    public func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        var run: (data: UInt64, length: UInt64)?
        func flush(_ plan: inout ReadPlan) throws {
            guard let pending = run else { return }
            try data.plan(at: pending.data, length: Int(pending.length), into: &plan)
            run = nil
        }
        try forEachRun(at: offset, length: UInt64(length)) { _, n, at in
            if let at {
                if let pending = run, pending.data + pending.length == at {
                    run = (pending.data, pending.length + n)
                } else {
                    try flush(&plan)
                    run = (at, n)
                }
            } else {
                try flush(&plan)
                plan.appendZero(Int(n))
            }
        }
        try flush(&plan)
    }

    /// Mapped blocks take the data device's status (data, or zero over its host holes); unmapped
    /// blocks are holes that read as zeros, so st_blocks, SEEK_DATA and SEEK_HOLE follow the mapping.
    public func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        var run: (guest: UInt64, data: UInt64, length: UInt64)?
        var below: [MapExtent] = []
        func flush(_ extents: inout [MapExtent]) throws {
            guard let pending = run else { return }
            below.removeAll(keepingCapacity: true)
            try data.status(at: pending.data, length: pending.length, detection: detection, into: &below)
            for var extent in below {
                extent.start = pending.guest + (extent.start - pending.data)
                extents.appendMerging(extent)
            }
            run = nil
        }
        try forEachRun(at: offset, length: length) { guest, n, at in
            if let at {
                if let pending = run, pending.data + pending.length == at {
                    run = (pending.guest, pending.data, pending.length + n)
                } else {
                    try flush(&extents)
                    run = (guest, at, n)
                }
            } else {
                try flush(&extents)
                extents.appendMerging(MapExtent(start: guest, length: n, depth: 0, present: false, zero: true, data: false))
            }
        }
        try flush(&extents)
    }

    /// Calls `body(offset, length, dataOffset)` for each piece of the range in order: a part of
    /// one mapped block with its byte offset on the data device, or a run of unmapped bytes (nil).
    func forEachRun(at offset: UInt64, length: UInt64, _ body: (UInt64, UInt64, UInt64?) throws -> Void) throws {
        guard length > 0 else { return }
        try ThinMetadataError.inPool(pool.name) {
            let blockSize = pool.dataBlockSize
            let end = offset + length
            let endBlock = (end - 1) / blockSize + 1
            var pos = offset
            while pos < end {
                var block = pos / blockSize
                let at = try pool.seek(.mappings, root: root, referencedBy: rootParent, key: block)
                let leaf = at.leaf
                var i = at.index
                while pos < end {
                    if i < leaf.count, leaf.key(i) == block {
                        let dataBlock = try dataBlock(leaf, i)
                        let within = pos % blockSize
                        let n = min(blockSize - within, end - pos)
                        try body(pos, n, dataBlock * blockSize + within)
                        pos += n
                        block += 1
                        i += 1
                    } else {
                        // Unmapped up to the leaf's next key, or to the end of its range (which,
                        // after a walk that matched the leaf's last key, may be where `pos` is).
                        let next = i < leaf.count ? leaf.key(i) : at.end
                        let stop = next.map { $0 < endBlock ? $0 * blockSize : end } ?? end
                        if stop > pos {
                            try body(pos, stop - pos, nil)
                            pos = stop
                        }
                        // Past the leaf: descend again from the root at `pos`, the next range.
                        guard i < leaf.count else { break }
                        block = leaf.key(i)
                    }
                }
            }
        }
    }

    /// The data block of entry `i`, which must lie inside the data device.
    private func dataBlock(_ leaf: ThinBtreeNode, _ i: Int) throws -> UInt64 {
        let dataBlock = ThinMapping.dataBlock(leaf.value64(i))
        guard dataBlock < dataBlocks else {
            throw ThinMetadataError.dataBlockPastEnd(device: id, virtualBlock: leaf.key(i), dataBlock: dataBlock, dataBlocks: dataBlocks)
        }
        return dataBlock
    }

    /// Every mapping of the device in virtual block order, as `thin_dump` lists them.
    public func forEachMapping(_ body: (ThinMapping) throws -> Void) throws {
        try ThinMetadataError.inPool(pool.name) {
            try pool.forEachEntry(.mappings, root: root, referencedBy: rootParent, from: 0) { leaf, i in
                try body(ThinMapping(virtualBlock: leaf.key(i), blockTime: leaf.value64(i)))
            }
        }
    }
}

/// One entry of a thin device's mapping tree: a block-time value, `(data block << 24) | time`
/// (`pack_block_time` in `dm-thin-metadata.c`).
public struct ThinMapping: Equatable, Sendable, CustomStringConvertible {
    public var virtualBlock: UInt64
    public var dataBlock: UInt64
    /// The pool's snapshot counter when the block was provisioned (24 bits).
    public var time: UInt32

    public init(virtualBlock: UInt64, dataBlock: UInt64, time: UInt32) {
        self.virtualBlock = virtualBlock; self.dataBlock = dataBlock; self.time = time
    }

    init(virtualBlock: UInt64, blockTime: UInt64) {
        self.init(virtualBlock: virtualBlock, dataBlock: Self.dataBlock(blockTime), time: UInt32(blockTime & 0xFF_FFFF))
    }

    static func dataBlock(_ blockTime: UInt64) -> UInt64 { blockTime >> 24 }

    public var description: String { "\(virtualBlock)→\(dataBlock)@\(time)" }
}
