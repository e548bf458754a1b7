/// `st_blocks` for a vmdk: counted from the grain tables (each distinct table once, however many
/// directory entries point at it), from the host file's holes for flat extents, and from the
/// parent for what this disk leaves unallocated; never by walking a huge sparse disk byte range
/// by byte range.
extension VmdkDisk {
    func allocatedBytes(shouldStop: () -> Bool) throws -> UInt64? {
        try allocationCount(shouldStop: shouldStop)?.bytes
    }

    /// `allocatedBytes`, and how many grain tables it read: each distinct table once, however
    /// many directory entries point at it.
    func allocationCount(shouldStop: () -> Bool = { false }) throws -> (bytes: UInt64, tablesWalked: Int)? {
        var total: UInt64 = 0
        var walked = 0
        for extent in extents {
            if shouldStop() { return nil }
            switch extent.kind {
            case .zero: break
            case .flat:
                guard let n = try counted(extent.start, extent.length, shouldStop: shouldStop) else { return nil }
                total += n
            case .sparse(let sparse):
                guard let n = try sparseAllocation(sparse, extentStart: extent.start, walked: &walked, shouldStop: shouldStop) else { return nil }
                total += n
            }
        }
        return (total, walked)
    }

    /// Data bytes of `[start, start + length)` from `status`, in 4 GiB windows.
    private func counted(_ start: UInt64, _ length: UInt64, beneath: Bool = false, shouldStop: () -> Bool) throws -> UInt64? {
        var total: UInt64 = 0
        var at = start
        while at < start + length {
            if shouldStop() { return nil }
            let n = min(UInt64(1) << 32, start + length - at)
            var found: [MapExtent] = []
            if beneath {
                try statusBeneath(parent, at: at, length: n, detection: .metadataOnly, into: &found)
            } else {
                try status(at: at, length: n, detection: .metadataOnly, into: &found)
            }
            for extent in found where extent.data && !extent.zero { total += extent.length }
            at += n
        }
        return total
    }

    private func sparseAllocation(_ sparse: SparseExtent, extentStart: UInt64, walked: inout Int,
                                  shouldStop: () -> Bool) throws -> UInt64? {
        struct Table { var data: UInt64; var unallocated: [(start: UInt64, length: UInt64)] }
        let span = sparse.header.tableSpan
        let grainSize = sparse.header.grainSize
        var tables: [UInt64: Table] = [:]
        var total: UInt64 = 0
        for index in sparse.sectors.indices {
            if index % 1024 == 0, shouldStop() { return nil }
            let start = UInt64(index) * span
            let length = min(span, sparse.length - start)
            let at = sparse.directory(index)
            var table: Table
            if at != 0, length == span, let known = tables[at] {
                table = known
            } else {
                table = Table(data: 0, unallocated: [])
                if let block = try sparse.table(index) {
                    walked += 1
                    let grains = Int((length + grainSize - 1) / grainSize)
                    for slot in 0..<grains {
                        let n = min(grainSize, length - UInt64(slot) * grainSize)
                        switch try sparse.grain(block, index: index, slot: slot) {
                        case .data, .compressed: table.data += n
                        case .zero: break
                        case .unallocated:
                            let from = UInt64(slot) * grainSize
                            if let last = table.unallocated.last, last.start + last.length == from {
                                table.unallocated[table.unallocated.count - 1].length += n
                            } else {
                                table.unallocated.append((from, n))
                            }
                        }
                    }
                    if length == span { tables[at] = table }
                } else {
                    table.unallocated = [(0, length)]
                }
            }
            total += table.data
            guard parent != nil else { continue }
            for run in table.unallocated {
                guard let n = try counted(extentStart + start + run.start, run.length, beneath: true, shouldStop: shouldStop) else { return nil }
                total += n
            }
        }
        return total
    }
}
