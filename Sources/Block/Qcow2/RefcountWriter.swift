/// The refcount structure of an image being written (docs/interop/qcow2.txt, "Host cluster
/// management"): the table in memory, blocks read on demand, and every change written through at
/// once. Callers order their writes so that a refcount on disk is never lower than the number of
/// references on disk: increments before the references, decrements after them.
/// Not thread-safe: the `Qcow2Writer` that owns it serializes every call.
final class RefcountWriter {
    let file: HostFile
    let clusterSize: UInt64
    /// Bits per refcount: 1, 2, 4, ... 64.
    let bits: UInt64
    let entriesPerBlock: UInt64
    let maxRefcount: UInt64
    private(set) var tableOffset: UInt64
    private(set) var table: [UInt64] { didSet { blockOffsetSet = nil } }
    /// The nonzero entries of `table`, for `isBlock`; made again after the table changes.
    private var blockOffsetSet: Set<UInt64>?
    /// Refcount blocks read so far, by table index; always equal to the disk (write-through).
    private var blocks: [UInt64: [UInt8]] = [:]
    /// No cluster below this is handed out again in this session: allocation only moves forward.
    /// A cluster freed while mounted is never reused before a remount, so a read planned against
    /// the old mapping can never see another disk offset's data in it.
    private var nextFree: UInt64
    /// The end of the file as opened, in clusters: the first cluster allocation may hand out.
    /// Metadata from before this session must not refer to it or beyond.
    let firstNewCluster: UInt64
    /// Table indexes of the blocks this session added (they lie at or past `firstNewCluster`).
    private var addedBlocks: Set<UInt64> = []
    /// Blocks kept in memory at most (they are clean: dropping them costs a reread).
    static let blockCacheLimit = 1024

    init(file: HostFile, header: Header) throws(Qcow2Error) {
        self.file = file
        clusterSize = header.clusterSize
        bits = UInt64(1) << UInt64(header.refcountOrder)
        entriesPerBlock = clusterSize * 8 / bits
        maxRefcount = bits == 64 ? .max : (1 << bits) - 1
        tableOffset = header.refcountTableOffset
        let bytes = try file.readBytes(at: header.refcountTableOffset, count: Int(UInt64(header.refcountTableClusters) * clusterSize))
        table = stride(from: 0, to: bytes.count, by: 8).map { BigEndianReader(bytes: bytes).u64($0) }
        nextFree = (file.size + clusterSize - 1) / clusterSize
        firstNewCluster = nextFree
    }

    /// Whether a refcount block lies at `offset` (a set lookup, not a scan of the table).
    func isBlock(_ offset: UInt64) -> Bool {
        if blockOffsetSet == nil { blockOffsetSet = Set(table.filter { $0 != 0 }) }
        return blockOffsetSet!.contains(offset)
    }

    // MARK: Reading and changing counts

    func refcount(ofCluster index: UInt64) throws(Qcow2Error) -> UInt64 {
        let b = index / entriesPerBlock
        guard b < UInt64(table.count), table[Int(b)] != 0 else { return 0 }
        let block = try loadBlock(b)
        return block.withUnsafeBytes { RefcountBlock.entry($0, index % entriesPerBlock, bits: bits) }
    }

    func increment(_ index: UInt64) throws(Qcow2Error) {
        let current = try refcount(ofCluster: index)
        guard current < maxRefcount else {
            throw .writeRefused("refcount of host cluster \(index) would exceed \(maxRefcount) (refcount_bits \(bits))")
        }
        try store(index, current + 1)
    }

    /// Lowers the count by one and returns the new value. A count already at 0 means the image
    /// referenced a cluster it never counted: corruption.
    @discardableResult
    func decrement(_ index: UInt64) throws(Qcow2Error) -> UInt64 {
        let current = try refcount(ofCluster: index)
        guard current > 0 else {
            throw .corrupt("host cluster \(index) is freed but its refcount is already 0", offset: index * clusterSize)
        }
        try store(index, current - 1)
        return current - 1
    }

    /// Allocates `count` contiguous clusters with refcount 1 at the end of the file and returns
    /// the byte offset of the first. The clusters are not written.
    func allocate(_ count: UInt64 = 1) throws(Qcow2Error) -> UInt64 {
        let start = try freeRun(count)
        nextFree = start + count
        for i in start..<start + count { try increment(i) }
        return start * clusterSize
    }

    /// The first run of `count` clusters with refcount 0 at or after `nextFree`. Clusters past
    /// the end of the file are free unless the refcounts say otherwise; refcounts claiming a long
    /// stretch past the end stop the search (a hostile image must not keep it going).
    private func freeRun(_ count: UInt64) throws(Qcow2Error) -> UInt64 {
        var start = nextFree
        var i = start
        let endOfFile = (file.size + clusterSize - 1) / clusterSize
        while i < start + count {
            if try refcount(ofCluster: i) != 0 {
                guard i < endOfFile + Self.maxClaimedPastEnd else {
                    throw .writeRefused("refcounts claim clusters far past the end of the file (cluster \(i)); 'qemu-img check -r all' can repair it")
                }
                start = i + 1
            }
            i += 1
        }
        return start
    }

    /// The first free run of `count` clusters, for a staged structure; nothing is allocated.
    fileprivate func freeRunForStaging(_ count: UInt64) throws(Qcow2Error) -> UInt64 { try freeRun(count) }

    /// Block `b` as the disk holds it.
    fileprivate func loadBlockForStaging(_ b: UInt64) throws(Qcow2Error) -> [UInt8] { try loadBlock(b) }

    /// Clusters past the end of the file that refcounts may claim before allocation gives up.
    static let maxClaimedPastEnd: UInt64 = 1 << 20

    // MARK: Blocks and the table

    private func store(_ index: UInt64, _ value: UInt64) throws(Qcow2Error) {
        let b = index / entriesPerBlock
        if b >= UInt64(table.count) { try growTable(covering: b) }
        if table[Int(b)] == 0 { try addBlock(b) }
        let e = index % entriesPerBlock
        let current = try loadBlock(b).withUnsafeBytes { RefcountBlock.entry($0, e, bits: bits) }
        // Changed in place (a copy of the block per count would cost a cluster's memcpy), then
        // written; memory follows the disk: a write that fails (no space left) is undone.
        let (byteStart, byteCount) = RefcountBlock.set(&blocks[b]!, e, value, bits: bits)
        do {
            try file.write(Array(blocks[b]![byteStart..<byteStart + byteCount]), at: table[Int(b)] + UInt64(byteStart))
        } catch {
            _ = RefcountBlock.set(&blocks[b]!, e, current, bits: bits)
            throw error
        }
    }

    private func loadBlock(_ b: UInt64) throws(Qcow2Error) -> [UInt8] {
        if let block = blocks[b] { return block }
        let entryOffset = tableOffset + b * 8
        let offset = table[Int(b)]
        guard offset & 511 == 0 else {
            throw .corrupt("refcount table entry has reserved bits set (\(offset))", offset: entryOffset)
        }
        try RefcountBlock.checkPlacement(offset, clusterSize: clusterSize, fileSize: file.size, entryOffset: entryOffset)
        // A block from before this session past the end of the file as opened would be a cluster
        // that allocation hands out to data (the file has grown over it since).
        guard addedBlocks.contains(b) || offset / clusterSize < firstNewCluster else {
            throw .corrupt("refcount block at \(offset) is unaligned or past the end of the file", offset: entryOffset)
        }
        let block = try file.readBytes(at: offset, count: Int(clusterSize))
        if blocks.count >= Self.blockCacheLimit { blocks.removeAll(keepingCapacity: true) }
        blocks[b] = block
        return block
    }

    /// A new, empty refcount block for table index `b`, placed at the end of the file and counted
    /// (by itself when it falls in its own range). It is on disk before the table points at it.
    private func addBlock(_ b: UInt64) throws(Qcow2Error) {
        let at = try freeRun(1)
        nextFree = at + 1
        var block = [UInt8](repeating: 0, count: Int(clusterSize))
        let selfCovered = at / entriesPerBlock == b
        if selfCovered { _ = RefcountBlock.set(&block, at % entriesPerBlock, 1, bits: bits) }
        try file.write(block, at: at * clusterSize)
        blocks[b] = block
        if !selfCovered { try increment(at) }
        try file.syncData()
        // Linked in memory only once linked on disk: a block the disk's table does not point at
        // must never receive counts (they would be lost, and the clusters counted there with them).
        try file.write(bigEndianBytes(at * clusterSize), at: tableOffset + b * 8)
        table[Int(b)] = at * clusterSize
        addedBlocks.insert(b)
    }

    /// Moves the table to a larger one at the end of the file, able to index block `b`.
    private func growTable(covering b: UInt64) throws(Qcow2Error) {
        let oldOffset = tableOffset
        let oldClusters = UInt64(table.count) * 8 / clusterSize
        var entries = max(UInt64(table.count) * 2, b + 1)
        var clusters: UInt64 = 0
        var at: UInt64 = 0
        while true {
            clusters = (entries * 8 + clusterSize - 1) / clusterSize
            at = try freeRun(clusters)
            // The new table's clusters and the blocks that count them must be indexable too.
            let last = at + clusters + clusters / entriesPerBlock + 2
            if last / entriesPerBlock < entries && b < entries { break }
            entries *= 2
        }
        guard clusters * clusterSize <= Header.maxRefcountTableBytes else {
            throw .writeRefused("the refcount table would grow past \(Header.maxRefcountTableBytes) bytes")
        }
        nextFree = at + clusters
        let oldTable = table
        table += [UInt64](repeating: 0, count: Int(clusters * clusterSize / 8) - table.count)
        // From here on, new blocks are linked in the new table, which nothing points at yet.
        tableOffset = at * clusterSize
        do {
            for i in at..<at + clusters { try increment(i) }
            var bytes: [UInt8] = []
            bytes.reserveCapacity(table.count * 8)
            for entry in table { bytes += bigEndianBytes(entry) }
            try file.write(bytes, at: tableOffset)
            try file.syncData()
            try file.write(bigEndianBytes(tableOffset) + bigEndianBytes(UInt32(clusters)), at: 48)
        } catch {
            // The header still names the old table: so does memory again. What the attempt
            // counted (the new table's clusters, blocks linked only in it) is leaked, no worse.
            tableOffset = oldOffset
            table = oldTable
            blocks = blocks.filter { b, _ in b < UInt64(oldTable.count) && oldTable[Int(b)] != 0 }
            throw error
        }
        try file.syncData()
        for i in oldOffset / clusterSize..<oldOffset / clusterSize + oldClusters where try decrement(i) == 0 {
            file.punchHole(at: i * clusterSize, length: clusterSize)
        }
    }
}

// MARK: Staging a whole new refcount structure

/// A refcount structure written beside the live one, for a change that must reach the disk at
/// once (snapshots): nothing the header points at is written; the header switches to it.
struct StagedRefcounts {
    /// The first of the clusters the caller asked for; they are counted (refcount 1).
    var contentStart: UInt64
    var tableOffset: UInt64
    var tableClusters: UInt32
    /// New refcount blocks and the new table, at clusters that nothing on disk counts or uses.
    var writes: [(offset: UInt64, bytes: [UInt8])]
    /// Clusters counted before and free in the staged structure, in ascending order: punched
    /// once it is live.
    var freed: [UInt64]
}

extension RefcountWriter {
    /// Stages the current counts plus `deltas` (by cluster index), with `contentClusters` new
    /// contiguous clusters counted once each. Every refcount block that changes is copied to a
    /// new cluster and the table is copied too, so the live structure stays as it is until the
    /// header points at the staged one; the old table and blocks are freed in the staged counts.
    /// Nothing is written here and no count changes.
    func stage(deltas: RefcountDeltas, contentClusters: UInt64) throws(Qcow2Error) -> StagedRefcounts {
        // The table and blocks count themselves: grow their number until it covers them. Placed
        // past everything counted, more clusters only touch more blocks, so this converges.
        var extra: UInt64 = 2
        for _ in 0..<64 {
            let start = try freeRunForStaging(contentClusters + extra)
            let tableStart = start + contentClusters
            var changes = deltas
            for c in start..<start + contentClusters + extra { changes[c] += 1 }
            let oldTableFirst = tableOffset / clusterSize
            let oldTableClusters = (UInt64(table.count) * 8 + clusterSize - 1) / clusterSize
            for c in oldTableFirst..<oldTableFirst + oldTableClusters { changes[c] -= 1 }
            // Each touched block moves; the old copy's count drops, which may touch another block.
            var touched = changes.groupsWithChanges(of: entriesPerBlock)
            var pending = Array(touched)
            while let b = pending.popLast() {
                guard b < UInt64(table.count), table[Int(b)] != 0 else { continue }
                let old = table[Int(b)] / clusterSize
                changes[old] -= 1
                if touched.insert(old / entriesPerBlock).inserted { pending.append(old / entriesPerBlock) }
            }
            let entries = max(UInt64(table.count), (touched.max() ?? 0) + 1)
            let tableClusters = (entries * 8 + clusterSize - 1) / clusterSize
            let needed = tableClusters + UInt64(touched.count)
            guard needed == extra else {
                extra = needed
                continue
            }
            guard tableClusters * clusterSize <= Header.maxRefcountTableBytes else {
                throw .writeRefused("the refcount table would grow past \(Header.maxRefcountTableBytes) bytes")
            }
            var newTable = table + [UInt64](repeating: 0, count: Int(tableClusters * clusterSize / 8) - table.count)
            var writes: [(offset: UInt64, bytes: [UInt8])] = []
            var freed: [UInt64] = []
            // Block by block in order, each block's changes in cluster order: `freed` comes out
            // sorted. (Every change's block is in `touched`.)
            for (n, b) in touched.sorted().enumerated() {
                var block = b < UInt64(table.count) && table[Int(b)] != 0
                    ? try loadBlockForStaging(b) : [UInt8](repeating: 0, count: Int(clusterSize))
                try changes.forEachNonzero(in: b * entriesPerBlock..<(b + 1) * entriesPerBlock) { (cluster, delta) throws(Qcow2Error) in
                    let e = cluster % entriesPerBlock
                    let current = block.withUnsafeBytes { RefcountBlock.entry($0, e, bits: bits) }
                    let value = Int64(bitPattern: current) + delta
                    guard value >= 0 else {
                        throw .corrupt("host cluster \(cluster) is referenced more often than its refcount \(current) says",
                                       offset: cluster * clusterSize)
                    }
                    guard UInt64(value) <= maxRefcount else {
                        throw .writeRefused("refcount of host cluster \(cluster) would exceed \(maxRefcount) (refcount_bits \(bits))")
                    }
                    if value == 0, current > 0 { freed.append(cluster) }
                    _ = RefcountBlock.set(&block, e, UInt64(value), bits: bits)
                }
                let at = (tableStart + tableClusters + UInt64(n)) * clusterSize
                newTable[Int(b)] = at
                writes.append((at, block))
            }
            var tableBytes = [UInt8](repeating: 0, count: newTable.count * 8)
            for (i, entry) in newTable.enumerated() where entry != 0 { tableBytes.storeBigEndian(entry, at: i * 8) }
            writes.append((tableStart * clusterSize, tableBytes))
            return StagedRefcounts(contentStart: start * clusterSize, tableOffset: tableStart * clusterSize,
                                   tableClusters: UInt32(tableClusters), writes: writes, freed: freed)
        }
        throw .writeRefused("the staged refcount structure did not settle on a size")
    }
}
