extension QedDisk {
    /// Bytes that hold data, from the tables: each distinct L2 table is walked once however
    /// many L1 entries name it (so the work grows with the tables in the file, not the size
    /// the header claims), and what this image leaves unallocated is counted in the backing
    /// file range by range, up to `backingRunBudget` ranges (beyond, a hostile table of
    /// alternating runs named by every L1 entry, the rest of the backing is not counted).
    public func allocatedBytes(shouldStop: () -> Bool) throws -> UInt64? {
        struct Table { var data: UInt64 = 0; var unallocated: [(start: UInt64, length: UInt64)] = [] }
        var memo: [UInt64: Table] = [:]
        var total: UInt64 = 0
        var budget = Self.backingRunBudget
        var l1Chunk: QedTables.Chunk?
        let span = header.l2Span
        let spans = (size + span - 1) / span
        for index in 0..<spans {
            if shouldStop() { return nil }
            let start = index * span
            let length = min(span, size - start)
            var table = Table()
            if let l2 = try tables.l2Table(index: index, chunk: &l1Chunk) {
                if length == span, let known = memo[l2] {
                    table = known
                } else {
                    try walk(start, length) { entry, at, n in
                        switch entry {
                        case .data: table.data += n
                        case .zero: break
                        case .unallocated: table.unallocated.append((at - start, n))
                        }
                    }
                    if length == span { memo[l2] = table }
                }
            } else {
                table.unallocated = [(0, length)]
            }
            total += table.data
            guard let backing else { continue }
            for run in table.unallocated where budget > 0 {
                budget -= 1
                var below: [MapExtent] = []
                try statusBeneath(backing, at: start + run.start, length: run.length, detection: .metadataOnly, into: &below)
                for extent in below where extent.data && !extent.zero { total += extent.length }
            }
        }
        return total
    }

    static let backingRunBudget = 1 << 16
}
