/// A vmdk disk: its extents end to end, and the parent that unallocated grains read through.
final class VmdkDisk: BlockDevice {
    enum Kind: Sendable {
        /// Bytes of a file from a byte offset (FLAT).
        case flat(HostFile, offset: UInt64)
        /// Zeros (ZERO).
        case zero
        case sparse(SparseExtent)
    }

    struct Extent: Sendable {
        /// Where the extent starts in the disk, and its length, in bytes.
        let start: UInt64
        let length: UInt64
        let kind: Kind
    }

    let extents: [Extent]
    let size: UInt64
    let parent: (any BlockDevice)?
    /// The content ID of this disk, which a child's parentCID must name.
    let cid: UInt32

    init(extents: [Extent], parent: (any BlockDevice)?, cid: UInt32) {
        self.extents = extents
        self.size = extents.last.map { $0.start + $0.length } ?? 0
        self.parent = parent
        self.cid = cid
    }

    /// The index of the extent that holds `offset` (< size).
    func extentIndex(at offset: UInt64) -> Int {
        var low = 0, high = extents.count - 1
        while low < high {
            let mid = (low + high + 1) / 2
            if extents[mid].start <= offset { low = mid } else { high = mid - 1 }
        }
        return low
    }

    /// Calls `body` for each extent piece of `[offset, offset + length)`: the extent, the offset
    /// inside it, the length.
    func forEachPiece(from offset: UInt64, length: UInt64, _ body: (Extent, UInt64, UInt64) throws -> Void) rethrows {
        guard length > 0 else { return }
        var at = offset
        let end = offset + length
        var index = extentIndex(at: offset)
        while at < end, index < extents.count {
            let extent = extents[index]
            let n = min(end, extent.start + extent.length) - at
            try body(extent, at - extent.start, n)
            at += n
            index += 1
        }
    }

    func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        try forEachPiece(from: offset, length: UInt64(length)) { extent, inside, n in
            switch extent.kind {
            case .flat(let file, let base):
                plan.appendHost(file, offset: base + inside, length: Int(n))
            case .zero:
                plan.appendZero(Int(n))
            case .sparse(let sparse):
                try planSparse(sparse, extentStart: extent.start, inside: inside, length: n, into: &plan)
            }
        }
    }

    private func planSparse(_ sparse: SparseExtent, extentStart: UInt64, inside: UInt64, length: UInt64,
                            into plan: inout ReadPlan) throws {
        let grainSize = sparse.header.grainSize
        try sparse.walk(from: inside, length: length) { grain, at, n in
            switch grain {
            case .unallocated:
                try planBeneath(parent, at: extentStart + at, length: Int(n), into: &plan)
            case .zero:
                plan.appendZero(Int(n))
            case .data(let host):
                plan.appendHost(sparse.file, offset: host, length: Int(n))
            case .compressed(let marker):
                let block = try sparse.decodedGrain(at: marker, entryOffset: marker)
                let start = Int(at % grainSize)
                guard start + Int(n) <= block.bytes.count else {
                    throw Qcow2Error.corrupt("compressed grain at byte \(marker) decodes to \(block.bytes.count) bytes, short of the \(start + Int(n)) read from it", offset: marker)
                }
                plan.appendBytes(block, start: start, length: Int(n))
            }
        }
    }

    func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        try forEachPiece(from: offset, length: length) { extent, inside, n in
            let guest = extent.start + inside
            switch extent.kind {
            case .flat(let file, let base):
                // QEMU reports flat extents as data, and probes the file beneath for holes.
                appendHostStatus(file, guest: guest, host: base + inside, length: n, depth: 0, holeIsData: true, into: &extents)
            case .zero:
                extents.appendMerging(MapExtent(start: guest, length: n, depth: 0, present: true, zero: true, data: false))
            case .sparse(let sparse):
                try statusSparse(sparse, extentStart: extent.start, inside: inside, length: n, detection: detection, into: &extents)
            }
        }
    }

    private func statusSparse(_ sparse: SparseExtent, extentStart: UInt64, inside: UInt64, length: UInt64,
                              detection: HoleDetection, into extents: inout [MapExtent]) throws {
        try sparse.walk(from: inside, length: length) { grain, at, n in
            let guest = extentStart + at
            switch grain {
            case .unallocated:
                try statusBeneath(parent, at: guest, length: n, detection: detection, into: &extents)
            case .zero:
                extents.appendMerging(MapExtent(start: guest, length: n, depth: 0, present: true, zero: true, data: false))
            case .data(let host):
                if detection == .likeQemu {
                    appendHostStatus(sparse.file, guest: guest, host: host, length: n, depth: 0, holeIsData: true, into: &extents)
                } else {
                    extents.appendMerging(MapExtent(start: guest, length: n, depth: 0, present: true, zero: false, data: true, offset: host))
                }
            case .compressed:
                extents.appendMerging(MapExtent(start: guest, length: n, depth: 0, present: true, zero: false, data: true))
            }
        }
    }
}
