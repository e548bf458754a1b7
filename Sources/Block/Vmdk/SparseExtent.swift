import Locking

/// One sparse extent: its header, its grain directory (read whole at open: at most QEMU's 32 Mi
/// entries, and never more than the file holds), grain tables read through the shared cache,
/// and compressed grains decoded through it too.
final class SparseExtent: Sendable {
    /// What a grain of the extent is.
    enum Grain: Equatable {
        /// No grain: the parent's bytes, or zeros.
        case unallocated
        /// A zeroed grain (grain table entry 1 in an extent with zeroed grains): zeros, never the parent's.
        case zero
        /// Stored at this byte of the file.
        case data(UInt64)
        /// A compressed grain (with its marker, if the extent has markers) at this byte.
        case compressed(UInt64)
    }

    let file: HostFile
    let header: SparseHeader
    let cache: BlockCache
    /// Grain table positions in sectors (as stored, 4 bytes each); 0: none.
    let sectors: [UInt32]
    /// Compressed grains being decoded now, by byte position.
    let decodingTable = Locked<[UInt64: PendingDecode]>([:])

    var length: UInt64 { header.capacity * 512 }

    init(file: HostFile, cache: BlockCache) throws {
        self.file = file
        self.cache = cache
        header = try SparseHeader.read(file)
        sectors = try Self.readDirectory(file, header)
    }

    /// The grain directory, each entry checked: a grain table lies inside the file.
    private static func readDirectory(_ file: HostFile, _ header: SparseHeader) throws -> [UInt32] {
        let count = Int(header.directoryEntries)
        let raw = try file.readBytes(at: header.directoryOffset, count: count * 4)
        let b = VmdkLittleEndian(bytes: raw)
        var tables = [UInt32](repeating: 0, count: count)
        let tableBytes = UInt64(header.tableBytes)
        for i in 0..<count {
            let at = UInt64(b.u32(i * 4)) * 512
            guard at == 0 || (at <= file.size && tableBytes <= file.size - at) else {
                throw Qcow2Error.corrupt("grain directory entry \(i) points at a grain table at byte \(at), past the end of the file (\(file.size) bytes)",
                                         offset: header.directoryOffset + UInt64(i) * 4)
            }
            tables[i] = b.u32(i * 4)
        }
        return tables
    }

    /// Byte position of the grain table of directory entry `index`; 0: none.
    func directory(_ index: Int) -> UInt64 { UInt64(sectors[index]) * 512 }

    /// The grain table of directory entry `index`, through the cache; nil when it has none.
    func table(_ index: Int) throws -> CachedBlock? {
        let at = directory(index)
        guard at != 0 else { return nil }
        let count = header.tableBytes
        return try cache.block(.init(file: file.id, offset: at, kind: .table)) {
            guard at + UInt64(count) <= file.size else {
                throw Qcow2Error.corrupt("grain table at byte \(at) runs past the end of the file (\(file.size) bytes)",
                                         offset: header.directoryOffset + UInt64(index) * 4)
            }
            return try CachedBlock.read(file, at: at, count: count)
        }
    }

    /// Grain `slot` of `table` (at directory entry `index`), classified and checked.
    func grain(_ table: CachedBlock, index: Int, slot: Int) throws -> Grain {
        let entry = table.bytes.vmdkU32(at: slot * 4)
        if entry == 0 { return .unallocated }
        if entry == 1 && header.zeroedGrains { return .zero }
        let at = UInt64(entry) * 512
        guard at < file.size else {
            let guest = (UInt64(index) * header.entriesPerTable + UInt64(slot)) * header.grainSize
            throw Qcow2Error.corrupt("grain of extent offset \(guest) is at byte \(at), past the end of the file (\(file.size) bytes)",
                                     offset: directory(index) + UInt64(slot) * 4)
        }
        return header.compressed ? .compressed(at) : .data(at)
    }

    /// Walks `[offset, offset + length)` of the extent in runs of one kind: `body` gets each
    /// run's grain (for data, the byte where the run starts), extent offset and length. A run of
    /// unallocated grains, or a directory entry without a table, comes as one run.
    func walk(from offset: UInt64, length: UInt64, _ body: (Grain, UInt64, UInt64) throws -> Void) throws {
        var at = offset
        let end = offset + length
        let grainSize = header.grainSize
        var pending: (start: UInt64, length: UInt64)?
        func flush() throws {
            if let run = pending { try body(.unallocated, run.start, run.length); pending = nil }
        }
        func unallocated(_ n: UInt64) {
            if let run = pending { pending = (run.start, run.length + n) } else { pending = (at, n) }
        }
        while at < end {
            let index = Int(at / header.tableSpan)
            let spanEnd = min(end, (UInt64(index) + 1) * header.tableSpan)
            guard let table = try table(index) else {
                unallocated(spanEnd - at)
                at = spanEnd
                continue
            }
            while at < spanEnd {
                let slot = Int((at % header.tableSpan) / grainSize)
                let n = min(spanEnd, (at / grainSize + 1) * grainSize) - at
                let grain = try grain(table, index: index, slot: slot)
                if grain == .unallocated {
                    unallocated(n)
                } else {
                    try flush()
                    switch grain {
                    case .data(let host): try body(.data(host + at % grainSize), at, n)
                    default: try body(grain, at, n)
                    }
                }
                at += n
            }
        }
        try flush()
    }
}
