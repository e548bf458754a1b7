import Synchronization

/// Read access to the refcount structure (docs/interop/qcow2.txt, "Host cluster management"):
/// a table of refcount block offsets, each block an array of `refcount_bits`-wide counts.
extension Qcow2Image {
    /// The refcount of host cluster `index` of the image file; 0 where no block covers it.
    func refcount(ofCluster index: UInt64) throws -> UInt64 {
        let clusterSize = layout.clusterSize
        let bitsPerEntry = UInt64(1) << UInt64(header.refcountOrder)
        let entriesPerBlock = clusterSize * 8 / bitsPerEntry
        let tableIndex = index / entriesPerBlock
        guard tableIndex < UInt64(header.refcountTableClusters) * clusterSize / 8 else { return 0 }
        let tableEntryOffset = header.refcountTableOffset + tableIndex * 8
        let tableChunk = tableEntryOffset & ~(clusterSize - 1)
        let table = try cache.block(.init(file: file.id, offset: tableChunk, kind: .refcountTable)) {
            try CachedBlock.read(file, at: tableChunk, count: Int(clusterSize))
        }
        let blockOffset = table.withUnsafeBytes { $0.bigEndianU64(at: Int(tableEntryOffset - tableChunk)) }
            & ~UInt64(511)
        guard blockOffset != 0 else { return 0 }
        guard blockOffset & (clusterSize - 1) == 0, blockOffset < file.size, clusterSize <= file.size - blockOffset else {
            throw Qcow2Error.corrupt("refcount block at \(blockOffset) is unaligned or past the end of the file", offset: tableEntryOffset)
        }
        let block = try cache.block(.init(file: file.id, offset: blockOffset, kind: .refcountBlock)) {
            try CachedBlock.read(file, at: blockOffset, count: Int(clusterSize))
        }
        let entry = index % entriesPerBlock
        return block.withUnsafeBytes { bytes -> UInt64 in
            switch bitsPerEntry {
            case 1, 2, 4:  // packed least significant bits first, as QEMU stores them
                let bit = entry * bitsPerEntry
                return UInt64(bytes[Int(bit / 8)] >> UInt8(bit % 8)) & ((1 << bitsPerEntry) - 1)
            default:
                let width = Int(bitsPerEntry / 8)
                var value: UInt64 = 0
                for i in 0..<width { value = value << 8 | UInt64(bytes[Int(entry) * width + i]) }
                return value
            }
        }
    }

    /// Whether the image looks like it has preallocated metadata: more referenced clusters than
    /// the file really has on disk. QEMU (qcow2_detect_metadata_preallocation) only looks for
    /// host holes under data clusters in such images, so `qemu-img map` does likewise, and so do we.
    var hasMetadataPreallocation: Bool {
        metadataPreallocation.withLock { known in
            if let known { return known }
            let answer = (try? detectMetadataPreallocation()) ?? false
            known = answer
            return answer
        }
    }

    private func detectMetadataPreallocation() throws -> Bool {
        let clusterSize = layout.clusterSize
        let realClusters = file.allocatedBytes / clusterSize
        let threshold = max(realClusters * 10 / 9, realClusters + 2)
        let clusters = (file.size + clusterSize - 1) / clusterSize
        var allocated: UInt64 = 0
        for index in 0..<clusters where try refcount(ofCluster: index) > 0 {
            allocated += 1
            if allocated > threshold { return true }
        }
        return false
    }
}
