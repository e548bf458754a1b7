/// The one place that decodes L1 and L2 entry bits (docs/interop/qcow2.txt, "Cluster mapping").
struct ClusterLayout: Sendable {
    let clusterBits: UInt64
    let l2Bits: UInt64
    let extendedL2: Bool
    let hasDataFile: Bool

    static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00  // bits 9-55 of L1 and L2 entries
    static let compressedFlag: UInt64 = 1 << 62
    static let copiedFlag: UInt64 = 1 << 63
    static let zeroFlag: UInt64 = 1 << 0

    var clusterSize: UInt64 { 1 << clusterBits }
    var subclusterBits: UInt64 { extendedL2 ? clusterBits - 5 : clusterBits }
    var l2EntryBytes: Int { extendedL2 ? 16 : 8 }
    /// Bytes of virtual disk one L2 table maps.
    var l2Span: UInt64 { 1 << (clusterBits + l2Bits) }

    /// Compressed descriptor: bits 0..x-1 host offset, x..61 additional 512-byte sectors.
    var compressedOffsetBits: UInt64 { 62 - (clusterBits - 8) }

    func compressedExtent(_ entry: UInt64) -> (offset: UInt64, length: UInt64) {
        let x = compressedOffsetBits
        let offset = entry & ((1 << x) - 1)
        let sectors = ((entry & ~Self.compressedFlag & ~Self.copiedFlag) >> x) + 1
        return (offset, sectors * 512 - (offset & 511))
    }
}

/// What a run of virtual bytes inside one cluster maps to.
enum ClusterRun: Equatable {
    case unallocated
    case zero
    /// Stored data: `host` is where the run's first byte lives in the data file.
    case data(host: UInt64)
    /// A compressed cluster; the descriptor is the raw L2 entry.
    case compressed(entry: UInt64)
}

extension ClusterLayout {
    /// Classifies the run that starts `inCluster` bytes into the cluster mapped by `entry`
    /// (and `bitmap`, with extended L2) and returns its length, at most `limit`.
    /// `entryOffset` is the entry's position in the file, for error messages.
    func classify(entry: UInt64, bitmap: UInt64, inCluster: UInt64, limit: UInt64,
                  entryOffset: UInt64) throws(Qcow2Error) -> (ClusterRun, UInt64) {
        let toClusterEnd = min(limit, clusterSize - inCluster)
        if entry & Self.compressedFlag != 0 {
            guard !hasDataFile else {
                throw .corrupt("compressed cluster in an image with an external data file", offset: entryOffset)
            }
            return (.compressed(entry: entry), toClusterEnd)
        }
        let host = entry & Self.offsetMask
        // Offset 0 means unallocated, except in external data files where the COPIED flag
        // (refcount 1, always true there) marks a real cluster at offset 0.
        let allocated = host != 0 || (hasDataFile && entry & Self.copiedFlag != 0)
        if allocated, host & (clusterSize - 1) != 0 {
            throw .corrupt("L2 entry points to unaligned cluster offset \(host)", offset: entryOffset)
        }
        guard extendedL2 else {
            if entry & Self.zeroFlag != 0 { return (.zero, toClusterEnd) }
            return (allocated ? .data(host: host + inCluster) : .unallocated, toClusterEnd)
        }
        // Extended L2: bits 0-31 of the bitmap say "allocated", bits 32-63 "reads as zero".
        let scBits = subclusterBits
        let scSize: UInt64 = 1 << scBits
        let first = inCluster >> scBits
        let kindOf = { (sc: UInt64) throws(Qcow2Error) -> ClusterRun in
            let isAllocated = bitmap & (1 << sc) != 0
            let isZero = bitmap & (1 << (sc + 32)) != 0
            if isAllocated && isZero {
                throw .corrupt("subcluster \(sc) is marked both allocated and zero", offset: entryOffset + 8)
            }
            if isZero { return .zero }
            if isAllocated {
                guard allocated else {
                    throw .corrupt("subcluster \(sc) is allocated in an unallocated cluster", offset: entryOffset + 8)
                }
                return .data(host: host + (sc << scBits))
            }
            return .unallocated
        }
        let kind = try kindOf(first)
        var end = min((first + 1) << scBits, inCluster + toClusterEnd)
        var sc = first + 1
        while end < inCluster + toClusterEnd {
            let next = try kindOf(sc)
            let continues: Bool
            switch (kind, next) {
            // Subclusters of one cluster are contiguous on the host, so data runs always join.
            case (.zero, .zero), (.unallocated, .unallocated), (.data, .data): continues = true
            default: continues = false
            }
            guard continues else { break }
            end = min(end + scSize, inCluster + toClusterEnd)
            sc += 1
        }
        if case .data(let h) = kind { return (.data(host: h + (inCluster & (scSize - 1))), end - inCluster) }
        return (kind, end - inCluster)
    }
}
