import Foundation
import Synchronization

// Internal snapshots written (docs/interop/qcow2.txt, "Snapshots" and "Host cluster management"):
// what `qemu-img snapshot -c`, `-a` and `-d` do, with the same refcounts: a cluster is counted
// once per L2 entry per L1 table that reaches it, an L2 table once per L1 table that points at it,
// and COPIED is set in the active tables exactly where the count is 1.
//
// Crash safety. QEMU (block/qcow2-snapshot.c) raises refcounts, then rewrites COPIED flags in the
// L2 tables, then the L1 table, in place: a crash in between leaves flags that disagree with the
// counts, which `qemu-img check` reports as errors. Here nothing the header points at is written.
// Everything that changes is written to clusters past the end of the file that nothing uses or
// counts: a new active L1 table, a copy of each L2 table whose COPIED flags change (the original
// stays with whoever else uses it), the new snapshot table, a copy of every refcount block whose
// counts change and a new refcount table. Then a barrier, then one write inside the header's first
// sector (bytes 24-95: size, L1, refcount table, snapshot table, autoclear bits) switches the
// image from the old state to the new, then a barrier, then the clusters only the old state used
// are punched (their count is already 0), still under the write lock (`PendingPunch`: a command
// may punch after switching other images). A crash before the header write leaves the old state
// untouched, with uncounted clusters past its end that no check reports; after it, the new state.

extension Qcow2Image {
    /// Takes an internal snapshot of the live state, as `qemu-img snapshot -c name` does (vm
    /// state size 0, vm clock 0, icount -1). A snapshot of that name already there is an error,
    /// unless `replace`: then it is deleted in the same step. Takes QEMU's write lock for the
    /// duration: an image another program writes fails with `Qcow2Error.inUse`. This object
    /// still shows the state it was opened with: open the image again to see the new one.
    @discardableResult
    public func createSnapshot(name: String, date: Date = Date(), replace: Bool = false) throws -> Snapshot {
        let (snapshot, punch) = try SnapshotTransaction.run(self) { t in try t.create(name: name, date: date, replace: replace) }
        punch.run()
        return snapshot
    }

    /// Makes the live state that of the snapshot named `idOrName` (its id first, as QEMU looks it
    /// up), disk size included, as `qemu-img snapshot -a` does. Locking as `createSnapshot`.
    public func revertToSnapshot(_ idOrName: String) throws {
        try revertToSnapshotLeavingPunch(idOrName).run()
    }

    /// Deletes the snapshot `idOrName` and frees what only it used, as `qemu-img snapshot -d`.
    /// Locking as `createSnapshot`.
    public func deleteSnapshot(_ idOrName: String) throws {
        try deleteSnapshotLeavingPunch(idOrName).run()
    }

    /// `revertToSnapshot`, done and durable, except that the freed clusters are punched (and the
    /// write lock given back) when the caller runs the returned `PendingPunch`: a command
    /// reverting many images switches them all first, so that no image's fdatasync waits on the
    /// journal commit of another's holes (and, on a filesystem mounted with `discard`, their
    /// discards).
    public func revertToSnapshotLeavingPunch(_ idOrName: String) throws -> PendingPunch {
        try SnapshotTransaction.run(self) { t in try t.revert(idOrName) }.1
    }

    /// `deleteSnapshot`, the freed clusters left to punch as with `revertToSnapshotLeavingPunch`.
    public func deleteSnapshotLeavingPunch(_ idOrName: String) throws -> PendingPunch {
        try SnapshotTransaction.run(self) { t in try t.delete(idOrName) }.1
    }
}

/// The clusters a snapshot operation freed, not yet punched, with the image's write lock still
/// held: in the image's counts they are free already, and no other writer may reuse one before
/// its hole is made (the hole would zero what it wrote). `run()` punches them, one call per run
/// of clusters, and gives the lock back; the end of the object does so if nobody did.
public final class PendingPunch: Sendable {
    let file: HostFile
    /// Runs of free clusters, as (first cluster, count), in ascending order.
    let runs: [Run]
    let clusterSize: UInt64
    private let done = Atomic<Bool>(false)

    struct Run: Sendable {
        var first: UInt64
        var count: UInt64
    }

    init(file: HostFile, runs: [Run], clusterSize: UInt64) {
        self.file = file
        self.runs = runs
        self.clusterSize = clusterSize
    }

    public func run() {
        guard !done.exchange(true, ordering: .acquiringAndReleasing) else { return }
        for run in runs { file.punchHole(at: run.first * clusterSize, length: run.count * clusterSize) }
        file.unlockWriting()
    }

    deinit { run() }
}

/// One snapshot operation on an image, under its write lock: the state as read from the disk
/// now, the refcount changes gathered so far, and the commit.
final class SnapshotTransaction {
    let file: HostFile
    let header: Header
    let layout: ClusterLayout
    let clusterSize: UInt64
    let snapshots: [Snapshot]
    /// Each snapshot table entry as stored, padding excluded, and the table's length in bytes.
    let entries: [[UInt8]]
    let tableBytes: UInt64
    let refcounts: RefcountWriter
    let activeL1: [UInt64]
    /// Clusters of the header, the refcount structure, the L1 tables and the snapshot table:
    /// an L2 entry or an L1 entry that points into one of them is corruption.
    let metadata: ClusterSet
    /// Refcount changes by cluster index.
    var deltas: RefcountDeltas
    var tables: [UInt64: [UInt8]] = [:]

    /// Clusters only the old state used, once `commit` made the new one live: to be punched.
    var freedRuns: [PendingPunch.Run] = []

    /// Runs `body` under the write lock, which the returned `PendingPunch` gives back once it
    /// has punched what the operation freed (on an error, it is given back at once).
    static func run<R>(_ image: Qcow2Image, _ body: (SnapshotTransaction) throws -> R) throws -> (R, PendingPunch) {
        let file = image.file
        guard file.writable else { throw Qcow2Error.writeRefused("\(file.path) was opened read-only") }
        try file.lockForWriting()
        do {
            let t = try SnapshotTransaction(file: file, clusterSize: image.layout.clusterSize)
            let result = try body(t)
            return (result, PendingPunch(file: file, runs: t.freedRuns, clusterSize: t.clusterSize))
        } catch {
            file.unlockWriting()
            throw error
        }
    }

    /// Reads the header and tables afresh, under the lock: what another program wrote before
    /// it let go counts.
    private init(file: HostFile, clusterSize: UInt64) throws {
        self.file = file
        let first = try file.readBytes(at: 0, count: Int(min(file.size, clusterSize)))
        header = try Header.parse(first, fileSize: file.size, path: file.path)
        guard !header.isMarkedCorrupt else {
            throw Qcow2Error.writeRefused("\(file.path) is marked corrupt; 'qemu-img check -r all' can repair it")
        }
        guard !header.isDirty else {
            throw Qcow2Error.writeRefused("\(file.path) was not closed cleanly (dirty bit, lazy refcounts); run 'qemu-img check -r all' first")
        }
        guard !header.hasExternalDataFile else {
            // QEMU refuses too: data file clusters are not counted, so nothing could share them.
            throw Qcow2Error.writeRefused("\(file.path) has an external data file, which cannot hold internal snapshots")
        }
        layout = ClusterLayout(clusterBits: UInt64(header.clusterBits), l2Bits: UInt64(header.l2Bits),
                               extendedL2: header.extendedL2, hasDataFile: false)
        self.clusterSize = header.clusterSize
        snapshots = try SnapshotTable.readAll(file, header: header)
        (entries, tableBytes) = try Self.rawEntries(file, header: header)
        refcounts = try RefcountWriter(file: file, header: header)
        activeL1 = try Self.readL1(file, header.l1TableOffset, header.l1Size)
        deltas = RefcountDeltas(clusters: refcounts.firstNewCluster)
        // A `let` once made: read for every L2 entry, a `var` would be checked for exclusive access.
        var metadata = ClusterSet(clusters: refcounts.firstNewCluster)
        let clusterSize = header.clusterSize
        func mark(_ offset: UInt64, _ bytes: UInt64) {
            guard bytes > 0 else { return }
            for c in offset / clusterSize...(offset + bytes - 1) / clusterSize { metadata.insert(c) }
        }
        metadata.insert(0)
        mark(header.refcountTableOffset, UInt64(header.refcountTableClusters) * clusterSize)
        for block in refcounts.table where block != 0 { metadata.insert(block / clusterSize) }
        mark(header.l1TableOffset, UInt64(header.l1Size) * 8)
        mark(header.snapshotsOffset, tableBytes)
        for s in snapshots { mark(s.l1TableOffset, UInt64(s.l1Size) * 8) }
        self.metadata = metadata
    }

    // MARK: Operations

    func create(name: String, date: Date, replace: Bool) throws -> Snapshot {
        let same = snapshots.indices.filter { snapshots[$0].name == name }
        guard same.isEmpty || replace else {
            throw Qcow2Error.writeRefused("\(file.path) already has a snapshot named '\(name)'")
        }
        let nextID = (snapshots.map { UInt64($0.id) ?? 0 }.max() ?? 0) + 1
        let seconds = date.timeIntervalSince1970.rounded(.down)
        let snapshot = Snapshot(
            id: String(nextID), name: name, l1TableOffset: header.l1TableOffset, l1Size: header.l1Size,
            dateSeconds: UInt32(clamping: Int64(seconds)),
            dateNanoseconds: UInt32(clamping: Int64((date.timeIntervalSince1970 - seconds) * 1e9)),
            vmClockNanoseconds: 0, vmStateSize: 0, diskSize: header.size, icount: .max, extraDataSize: 24)
        // The snapshot keeps the live L1 table and every table it reaches, with the references
        // the live state had; the live state gets a new L1 table reaching the same tables.
        var kept = entries
        for i in same.reversed() {
            try drop(snapshots[i])
            kept.remove(at: i)
        }
        try commit(active: activeL1.map { $0 & ClusterLayout.offsetMask }, size: header.size, entries: kept + [Self.encode(snapshot)])
        return snapshot
    }

    func revert(_ idOrName: String) throws {
        let s = try find(idOrName)
        let size = s.diskSize ?? header.size
        var l1 = try Self.readL1(file, s.l1TableOffset, s.l1Size).map { $0 & ClusterLayout.offsetMask }
        let needed = Int((size + layout.l2Span - 1) / layout.l2Span)
        if l1.count < needed { l1 += [UInt64](repeating: 0, count: needed - l1.count) }
        try dropActive()
        try commit(active: l1, size: size, entries: nil)
    }

    func delete(_ idOrName: String) throws {
        let s = try find(idOrName)
        var kept = entries
        kept.remove(at: snapshots.firstIndex(of: s)!)
        try drop(s)
        // Counts that fall to 1 set COPIED in the live tables: they are rewritten as well.
        try dropActive()
        try commit(active: activeL1.map { $0 & ClusterLayout.offsetMask }, size: header.size, entries: kept)
    }

    func find(_ idOrName: String) throws -> Snapshot {
        guard let s = snapshots.first(where: { $0.id == idOrName }) ?? snapshots.first(where: { $0.name == idOrName }) else {
            throw Qcow2Error.writeRefused("\(file.path) has no snapshot '\(idOrName)'")
        }
        return s
    }

    // MARK: Counting references

    /// The references of the live L1 table go away, and the table itself.
    func dropActive() throws {
        for (i, entry) in activeL1.enumerated() {
            try path(entry, -1, entryOffset: header.l1TableOffset + UInt64(i) * 8)
        }
        count(header.l1TableOffset, UInt64(header.l1Size) * 8, -1)
    }

    /// The references of a snapshot's L1 table go away, and the table itself.
    func drop(_ s: Snapshot) throws {
        guard s.l1TableOffset != header.l1TableOffset else {
            throw Qcow2Error.corrupt("snapshot \(s.id) uses the live L1 table", offset: s.l1TableOffset)
        }
        for (i, entry) in try Self.readL1(file, s.l1TableOffset, s.l1Size).enumerated() {
            try path(entry, -1, entryOffset: s.l1TableOffset + UInt64(i) * 8)
        }
        count(s.l1TableOffset, UInt64(s.l1Size) * 8, -1)
    }

    /// Adds `sign` to the count of the L2 table an L1 entry points at and to every cluster the
    /// table's entries refer to (QEMU's qcow2_update_snapshot_refcount, check_refcounts_l1).
    func path(_ l1Entry: UInt64, _ sign: Int64, entryOffset: UInt64) throws {
        let offset = l1Entry & ClusterLayout.offsetMask
        guard offset != 0 else { return }
        let table = try l2Table(offset, entryOffset: entryOffset)
        // Counted in a local, swapped in and out (no copy): a class property would be checked
        // for exclusive access at every entry, which cost as much as the counting.
        var local = RefcountDeltas(clusters: 0)
        swap(&local, &deltas)
        defer { swap(&local, &deltas) }
        local[offset / clusterSize] += sign
        let firstNew = refcounts.firstNewCluster
        try table.withUnsafeBytes { bytes in
            for at in stride(from: 0, to: bytes.count, by: layout.l2EntryBytes) {
                let entry = bytes.bigEndianU64(at: at)
                // A plain entry that passes `referenced`'s checks, counted without building a
                // range (most entries of a table); anything else goes through `referenced`,
                // which says what is wrong.
                if entry & ClusterLayout.compressedFlag == 0 {
                    let host = entry & ClusterLayout.offsetMask
                    guard host != 0 else { continue }
                    let c = host / clusterSize
                    if host & (clusterSize - 1) == 0, c < firstNew, !metadata.contains(c) {
                        local[c] += sign
                        continue
                    }
                }
                guard let clusters = try referenced(entry, entryOffset: offset + UInt64(at)) else { continue }
                for c in clusters { local[c] += sign }
            }
        }
    }

    /// The host clusters an L2 entry holds a reference to, checked against the file and the
    /// metadata; compressed data counts every cluster of the 512-byte sectors it spans.
    func referenced(_ entry: UInt64, entryOffset: UInt64) throws -> ClosedRange<UInt64>? {
        let clusters: ClosedRange<UInt64>
        if entry & ClusterLayout.compressedFlag != 0 {
            let (offset, length) = layout.compressedExtent(entry)
            let start = offset & ~511
            clusters = start / clusterSize...(start + length + (offset & 511) - 1) / clusterSize
        } else {
            let host = entry & ClusterLayout.offsetMask
            guard host != 0 else { return nil }
            guard host & (clusterSize - 1) == 0 else {
                throw Qcow2Error.corrupt("L2 entry points to unaligned cluster offset \(host)", offset: entryOffset)
            }
            clusters = host / clusterSize...host / clusterSize
        }
        guard clusters.lowerBound < refcounts.firstNewCluster, !clusters.contains(where: { metadata.contains($0) }) else {
            throw Qcow2Error.corrupt("L2 entry refers to host cluster \(clusters.lowerBound), past the end of the file or metadata",
                                    offset: entryOffset)
        }
        return clusters
    }

    func count(_ offset: UInt64, _ bytes: UInt64, _ sign: Int64) {
        guard bytes > 0 else { return }
        for c in offset / clusterSize...(offset + bytes - 1) / clusterSize { deltas[c] += sign }
    }


    func final(_ cluster: UInt64) throws -> Int64 {
        Int64(bitPattern: try refcounts.refcount(ofCluster: cluster)) + deltas[cluster]
    }

    // MARK: Reading

    static func readL1(_ file: HostFile, _ offset: UInt64, _ size: UInt32) throws -> [UInt64] {
        let bytes = try file.readBytes(at: offset, count: Int(size) * 8)
        let reader = BigEndianReader(bytes: bytes)
        return (0..<Int(size)).map { reader.u64($0 * 8) }
    }

    func l2Table(_ offset: UInt64, entryOffset: UInt64) throws -> [UInt8] {
        if let t = tables[offset] { return t }
        guard offset & (clusterSize - 1) == 0, offset / clusterSize < refcounts.firstNewCluster,
              !metadata.contains(offset / clusterSize) else {
            throw Qcow2Error.corrupt("L2 table at \(offset) is unaligned, past the end of the file or metadata", offset: entryOffset)
        }
        let t = try file.readBytes(at: offset, count: Int(clusterSize))
        tables[offset] = t
        return t
    }

    /// The stored bytes of each entry (fixed part, extra data, id, name) and the table's length,
    /// padding included; `SnapshotTable.readAll` has checked every bound already.
    static func rawEntries(_ file: HostFile, header: Header) throws -> ([[UInt8]], UInt64) {
        var out: [[UInt8]] = []
        var at = header.snapshotsOffset
        for _ in 0..<header.nbSnapshots {
            let fixed = BigEndianReader(bytes: try file.readBytes(at: at, count: 40))
            let length = 40 + Int(fixed.u32(36)) + Int(fixed.u16(12)) + Int(fixed.u16(14))
            out.append(try file.readBytes(at: at, count: length))
            at += (UInt64(length) + 7) & ~7
        }
        return (out, at - header.snapshotsOffset)
    }

    /// A snapshot table entry as QEMU writes it, with the 24 bytes of extra data of version 3
    /// (vm_state_size_large, disk_size, icount).
    static func encode(_ s: Snapshot) -> [UInt8] {
        let id = Array(s.id.utf8), name = Array(s.name.utf8)
        var e = bigEndianBytes(s.l1TableOffset) + bigEndianBytes(s.l1Size)
        e += bigEndianBytes(UInt16(id.count)) + bigEndianBytes(UInt16(name.count))
        e += bigEndianBytes(s.dateSeconds) + bigEndianBytes(s.dateNanoseconds) + bigEndianBytes(s.vmClockNanoseconds)
        e += bigEndianBytes(UInt32(truncatingIfNeeded: s.vmStateSize)) + bigEndianBytes(UInt32(24))
        e += bigEndianBytes(s.vmStateSize) + bigEndianBytes(s.diskSize ?? 0) + bigEndianBytes(s.icount ?? .max)
        return e + id + name
    }

    // MARK: Commit

    /// Writes the new state beside the old and switches the header to it. `active` holds the L2
    /// table offsets of the new live L1 table (flags are computed here); `entries`, when given,
    /// is the new snapshot table. The references of the old live L1 table must already be
    /// dropped, unless a snapshot keeps that table.
    func commit(active: [UInt64], size: UInt64, entries newEntries: [[UInt8]]?) throws {
        if let newEntries, newEntries.count > Int(Header.maxSnapshots) {
            throw Qcow2Error.writeRefused("\(file.path) would have more than \(Header.maxSnapshots) snapshots")
        }
        // The new live L1 shares every table first; where a table's COPIED flags must change,
        // a copy is used instead and the original keeps its other users.
        var seen: Set<UInt64> = []
        for (i, offset) in active.enumerated() where offset != 0 {
            guard seen.insert(offset).inserted else {
                throw Qcow2Error.corrupt("L2 table at \(offset) appears twice in one L1 table", offset: UInt64(i) * 8)
            }
            try path(offset, 1, entryOffset: UInt64(i) * 8)
        }
        var l1 = active
        var copies: [(index: Int, bytes: [UInt8])] = []
        for (i, offset) in active.enumerated() where offset != 0 {
            let table = tables[offset]!
            let wanted = try withCopiedFlags(table)
            if wanted == table {
                l1[i] = offset | (try final(offset / clusterSize) == 1 ? ClusterLayout.copiedFlag : 0)
            } else {
                deltas[offset / clusterSize] -= 1
                copies.append((i, wanted))
            }
        }
        let newTable = newEntries.map { $0.map { $0 + [UInt8](repeating: 0, count: (8 - $0.count % 8) % 8) }.joined() }.map(Array.init)
        if newEntries != nil {
            guard UInt64(newTable!.count) <= SnapshotTable.maxTableBytes else {
                throw Qcow2Error.writeRefused("the snapshot table of \(file.path) would exceed \(SnapshotTable.maxTableBytes) bytes")
            }
            if header.nbSnapshots > 0 { count(header.snapshotsOffset, tableBytes, -1) }
        }
        let l1Clusters = clustersFor(UInt64(l1.count) * 8)
        let tableClusters = clustersFor(UInt64(newTable?.count ?? 0))
        let staged = try refcounts.stage(deltas: deltas, contentClusters: l1Clusters + tableClusters + UInt64(copies.count))
        let l1Offset = staged.contentStart
        let snapshotsOffset = newTable == nil ? header.snapshotsOffset
            : newTable!.isEmpty ? 0 : l1Offset + l1Clusters * clusterSize
        var writes: [(offset: UInt64, bytes: [UInt8])] = []
        for (n, copy) in copies.enumerated() {
            let at = l1Offset + (l1Clusters + tableClusters + UInt64(n)) * clusterSize
            l1[copy.index] = at | ClusterLayout.copiedFlag
            writes.append((at, copy.bytes))
        }
        var l1Bytes = [UInt8](repeating: 0, count: Int(l1Clusters * clusterSize))
        for (i, entry) in l1.enumerated() { l1Bytes.storeBigEndian(entry, at: i * 8) }
        writes.append((l1Offset, l1Bytes))
        if let newTable, !newTable.isEmpty {
            writes.append((snapshotsOffset, newTable + [UInt8](repeating: 0, count: Int(tableClusters * clusterSize) - newTable.count)))
        }
        for (offset, bytes) in writes + staged.writes { try file.write(bytes, at: offset) }
        try file.syncData()

        // The switch: one write inside the first sector.
        let fieldsEnd = header.version >= 3 ? 96 : 72
        var fields = try file.readBytes(at: 0, count: fieldsEnd)
        fields.storeBigEndian(size, at: 24)
        fields.replaceSubrange(36..<40, with: bigEndianBytes(UInt32(l1.count)))
        fields.storeBigEndian(l1Offset, at: 40)
        fields.storeBigEndian(staged.tableOffset, at: 48)
        fields.replaceSubrange(56..<60, with: bigEndianBytes(staged.tableClusters))
        if let newEntries {
            fields.replaceSubrange(60..<64, with: bigEndianBytes(UInt32(newEntries.count)))
            fields.storeBigEndian(snapshotsOffset, at: 64)
        }
        if header.version >= 3 {
            // Autoclear bits we do not maintain (bitmaps) must be cleared by whoever writes.
            fields.storeBigEndian(header.autoclearFeatures & 2, at: 88)
        }
        try file.write(Array(fields[24...]), at: 24)
        try file.syncData()
        // Runs of freed clusters go back in one call each (a revert may free gigabytes), after
        // this barrier: the caller punches them (`PendingPunch`). Gathered in a local: a revert
        // of 2 GiB frees 32,768 clusters, and a class property would be checked for exclusive
        // access at each.
        var runs: [PendingPunch.Run] = []
        for cluster in staged.freed {
            if let last = runs.last, last.first + last.count == cluster {
                runs[runs.count - 1].count += 1
            } else {
                runs.append(PendingPunch.Run(first: cluster, count: 1))
            }
        }
        freedRuns = runs
    }

    /// The table with COPIED set on each entry whose cluster is counted exactly once in the new
    /// state, and clear on the others (compressed entries, which never carry it, are left).
    func withCopiedFlags(_ table: [UInt8]) throws -> [UInt8] {
        var out = table
        var local = RefcountDeltas(clusters: 0)  // as in `path`
        swap(&local, &deltas)
        defer { swap(&local, &deltas) }
        for at in stride(from: 0, to: table.count, by: layout.l2EntryBytes) {
            let entry = table.withUnsafeBytes { $0.bigEndianU64(at: at) }
            guard entry & ClusterLayout.compressedFlag == 0 else { continue }
            let host = entry & ClusterLayout.offsetMask
            let copied = try host != 0 && Int64(bitPattern: refcounts.refcount(ofCluster: host / clusterSize)) + local[host / clusterSize] == 1
            let wanted = copied ? entry | ClusterLayout.copiedFlag : entry & ~ClusterLayout.copiedFlag
            if wanted != entry { out.storeBigEndian(wanted, at: at) }
        }
        return out
    }

    func clustersFor(_ bytes: UInt64) -> UInt64 { (bytes + clusterSize - 1) / clusterSize }
}
