/// The two-level table of a QED image: an L1 table at `l1_table_offset` whose entries name L2
/// tables, whose entries name data clusters (0: unallocated, 1: zero). Both levels are
/// `table_size` clusters of little-endian u64, read through the shared cache in chunks (a table
/// may be 1 GiB), each offset checked as QEMU's `qed_find_cluster` checks it.
struct QedTables: Sendable {
    /// 4096 entries (32 KiB) per cache block.
    static let entriesPerChunk: UInt64 = 4096

    enum Entry: Equatable {
        case unallocated
        case zero
        case data(UInt64)
    }

    let file: HostFile
    let header: QedHeader
    let cache: BlockCache

    /// A run of entries of one table as read from the file.
    struct Chunk {
        let table: UInt64
        let start: UInt64
        let block: CachedBlock

        func contains(_ table: UInt64, _ index: UInt64) -> Bool {
            self.table == table && index >= start && index - start < UInt64(block.bytes.count / 8)
        }

        func entry(_ index: UInt64) -> UInt64 {
            block.withUnsafeBytes { $0.littleEndianU64(at: Int(index - start) * 8) }
        }
    }

    /// Entry `index` of the table at `table` (already checked with `isValidTable`).
    func rawEntry(table: UInt64, index: UInt64, chunk: inout Chunk?) throws -> UInt64 {
        if chunk?.contains(table, index) != true {
            let start = index / Self.entriesPerChunk * Self.entriesPerChunk
            let offset = table + start * 8
            let count = Int(min(Self.entriesPerChunk, header.tableEntries - start) * 8)
            let block = try cache.block(.init(file: file.id, offset: offset, kind: .table)) {
                // The file may have shrunk since the offset was checked.
                guard offset + UInt64(count) <= file.size else {
                    throw Qcow2Error.corrupt("table at \(table) lies past the end of the file", offset: table)
                }
                return try CachedBlock.read(file, at: offset, count: count)
            }
            guard block.bytes.count == count else {
                throw Qcow2Error.corrupt("table chunk at \(offset) is shorter than expected", offset: offset)
            }
            chunk = Chunk(table: table, start: start, block: block)
        }
        return chunk!.entry(index)
    }

    /// The L2 table that maps guest offset `at`, or nil when the L1 entry is 0. An L2 offset
    /// that fails QEMU's table check is an error for this range, as in QEMU (-EINVAL).
    func l2Table(at guest: UInt64, chunk: inout Chunk?) throws -> UInt64? {
        try l2Table(index: guest / header.l2Span, chunk: &chunk)
    }

    /// The L2 table of L1 entry `index`, or nil when the entry is 0.
    func l2Table(index: UInt64, chunk: inout Chunk?) throws -> UInt64? {
        let l2 = try rawEntry(table: header.l1TableOffset, index: index, chunk: &chunk)
        if l2 == 0 { return nil }
        guard header.isValidTable(at: l2) else {
            throw Qcow2Error.corrupt("L1 entry \(index) names an L2 table at \(l2) that is not cluster-aligned, inside the header, or past the end of the file",
                                     offset: header.l1TableOffset + index * 8)
        }
        return l2
    }

    /// The entry of the L2 table at `l2` for guest offset `at`.
    func cluster(at guest: UInt64, l2: UInt64, chunk: inout Chunk?) throws -> Entry {
        let index = guest % header.l2Span / header.clusterSize
        let value = try rawEntry(table: l2, index: index, chunk: &chunk)
        switch value {
        case 0: return .unallocated
        case 1: return .zero
        default:
            guard header.isValidCluster(at: value) else {
                throw Qcow2Error.corrupt("L2 entry \(index) names a data cluster at \(value) that is not cluster-aligned, inside the header, or past the end of the file",
                                         offset: l2 + index * 8)
            }
            return .data(value)
        }
    }
}
