import Synchronization

/// The encoding of a refcount block, for reading and writing alike.
enum RefcountBlock {
    /// Entry `e`: sub-byte widths are packed least significant bits first, as QEMU stores them;
    /// wider ones are big-endian.
    static func entry(_ block: UnsafeRawBufferPointer, _ e: UInt64, bits: UInt64) -> UInt64 {
        if bits < 8 {
            let bit = e * bits
            return UInt64(block[Int(bit / 8)] >> UInt8(bit % 8)) & ((1 << bits) - 1)
        }
        let width = Int(bits / 8)
        var value: UInt64 = 0
        for i in 0..<width { value = value << 8 | UInt64(block[Int(e) * width + i]) }
        return value
    }

    /// Sets entry `e`; returns the byte range that changed.
    static func set(_ block: inout [UInt8], _ e: UInt64, _ value: UInt64, bits: UInt64) -> (start: Int, count: Int) {
        if bits < 8 {
            let bit = e * bits
            let mask = UInt8((1 << bits) - 1) << UInt8(bit % 8)
            let i = Int(bit / 8)
            block[i] = (block[i] & ~mask) | (UInt8(truncatingIfNeeded: value) << UInt8(bit % 8) & mask)
            return (i, 1)
        }
        let width = Int(bits / 8)
        for i in 0..<width {
            block[Int(e) * width + i] = UInt8(truncatingIfNeeded: value >> UInt64(8 * (width - 1 - i)))
        }
        return (Int(e) * width, width)
    }

    /// A block must be cluster-aligned and lie inside the file; `entryOffset` is where the
    /// refcount table points at it, for the error.
    static func checkPlacement(_ offset: UInt64, clusterSize: UInt64, fileSize: UInt64, entryOffset: UInt64) throws(Qcow2Error) {
        guard offset & (clusterSize - 1) == 0, offset < fileSize, clusterSize <= fileSize - offset else {
            throw .corrupt("refcount block at \(offset) is unaligned or past the end of the file", offset: entryOffset)
        }
    }
}

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
        try RefcountBlock.checkPlacement(blockOffset, clusterSize: clusterSize, fileSize: file.size, entryOffset: tableEntryOffset)
        let block = try cache.block(.init(file: file.id, offset: blockOffset, kind: .refcountBlock)) {
            try CachedBlock.read(file, at: blockOffset, count: Int(clusterSize))
        }
        return block.withUnsafeBytes { RefcountBlock.entry($0, index % entriesPerBlock, bits: bitsPerEntry) }
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
