/// Refcount changes by host cluster index, for a snapshot operation (SnapshotWriter.swift) and
/// the refcount structure staged from them (RefcountWriter.swift). A revert after gigabytes were
/// written changes the count of every cluster written: tens of thousands of changes per image,
/// which a dictionary spends most of its time hashing. So the clusters of the file as opened are
/// an array indexed by cluster (up to `denseLimit` of them), and only the rest (the staged
/// structure's own clusters past the end, and clusters of files too large for the array) go in a
/// dictionary. Iteration is in cluster order, which the staging relies on (runs to punch, blocks
/// in order).
struct RefcountDeltas {
    /// Clusters below this are counted in `dense`.
    let denseCount: UInt64
    private var dense: [Int64]
    private var sparse: [UInt64: Int64] = [:]
    /// 16 MiB of counts at most (2 Mi clusters: a 128 GiB file of 64 KiB clusters).
    static let denseLimit: UInt64 = 1 << 21

    init(clusters: UInt64) {
        denseCount = min(clusters, Self.denseLimit)
        dense = [Int64](repeating: 0, count: Int(denseCount))
    }

    subscript(cluster: UInt64) -> Int64 {
        get { cluster < denseCount ? dense[Int(cluster)] : sparse[cluster, default: 0] }
        set {
            if cluster < denseCount {
                dense[Int(cluster)] = newValue
            } else {
                sparse[cluster] = newValue
            }
        }
    }

    /// The clusters in `range` whose count changes (by a delta other than 0), in ascending order.
    func forEachNonzero(in range: Range<UInt64>, _ body: (UInt64, Int64) throws(Qcow2Error) -> Void) throws(Qcow2Error) {
        let denseEnd = min(range.upperBound, denseCount)
        if range.lowerBound < denseEnd {
            try dense.withUnsafeBufferPointer { (d) throws(Qcow2Error) in
                for i in Int(range.lowerBound)..<Int(denseEnd) where d[i] != 0 { try body(UInt64(i), d[i]) }
            }
        }
        guard range.upperBound > denseCount, !sparse.isEmpty else { return }
        for (c, v) in sparse.filter({ range.contains($0.key) && $0.value != 0 }).sorted(by: { $0.key < $1.key }) {
            try body(c, v)
        }
    }

    /// The clusters whose count changes, each `per` clusters counted once (the refcount blocks
    /// that change, with `per` the entries of a block).
    func groupsWithChanges(of per: UInt64) -> Set<UInt64> {
        var groups: Set<UInt64> = []
        dense.withUnsafeBufferPointer { d in
            var last = UInt64.max
            for i in d.indices where d[i] != 0 && UInt64(i) / per != last {
                last = UInt64(i) / per
                groups.insert(last)
            }
        }
        for (c, v) in sparse where v != 0 { groups.insert(c / per) }
        return groups
    }
}

/// A set of host cluster indexes, an array of flags below `denseCount` as in `RefcountDeltas`.
struct ClusterSet {
    let denseCount: UInt64
    private var dense: [Bool]
    private var sparse: Set<UInt64> = []

    init(clusters: UInt64) {
        denseCount = min(clusters, RefcountDeltas.denseLimit)
        dense = [Bool](repeating: false, count: Int(denseCount))
    }

    func contains(_ cluster: UInt64) -> Bool {
        cluster < denseCount ? dense[Int(cluster)] : sparse.contains(cluster)
    }

    mutating func insert(_ cluster: UInt64) {
        if cluster < denseCount {
            dense[Int(cluster)] = true
        } else {
            sparse.insert(cluster)
        }
    }
}
