import Foundation

/// Writes into the live state of a qcow2 image, as QEMU would leave it: `qemu-img check` finds
/// nothing wrong afterwards, and at worst leaked clusters after a crash.
///
/// Allocation moves forward from the end of the file. Refcount increments are written through
/// at once; L2 tables and L1 entries stay in memory (where readers see them) until `flush`, which
/// writes them after a barrier; decrements wait for the next barrier after the L2 change that
/// dropped the reference. So no L2 entry on disk ever points at a cluster whose refcount on disk
/// is 0, and no refcount on disk drops while a reference on disk remains, whatever the moment of
/// a crash or power loss.
public final class Qcow2Writer: VolumeWriter, @unchecked Sendable {
    let image: Qcow2Image
    // SAFETY: `state` is only touched while `lock` is held.
    private let lock = NSLock()
    private let state: Qcow2WriteState

    init(image: Qcow2Image) throws {
        self.image = image
        try image.file.lockForWriting()
        do {
            state = try Qcow2WriteState(image: image)
        } catch {
            image.file.unlockWriting()
            throw error
        }
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try locked { try $0.write(.bytes(data), at: offset, length: UInt64(data.count)) }
    }

    public func zero(at offset: UInt64, length: UInt64) throws {
        try locked { try $0.write(.zeros, at: offset, length: length) }
    }

    public func flush() throws {
        try locked { try $0.flush() }
    }

    public func close() throws {
        lock.lock()
        defer { lock.unlock() }
        guard !state.closed else { return }
        defer {
            state.closed = true
            image.file.unlockWriting()
        }
        try state.guarded { try $0.flush() }
        try state.markClean()
    }

    private func locked<R>(_ body: (Qcow2WriteState) throws -> R) throws -> R {
        lock.lock()
        defer { lock.unlock() }
        return try state.guarded(body)
    }
}

/// What a write puts in its range.
enum WriteSource {
    case bytes(UnsafeRawBufferPointer)
    case zeros
}

/// Everything a writer changes, behind its lock.
final class Qcow2WriteState {
    let image: Qcow2Image
    let file: HostFile
    let dataFile: HostFile
    let layout: ClusterLayout
    let clusterSize: UInt64
    let size: UInt64
    let version: UInt32
    /// External data file: guest offset = host offset, no refcounts (as QEMU allocates).
    let externalData: Bool
    /// data_file_raw: the data file must also read as the disk does.
    let mirroredData: Bool
    let lazyRefcounts: Bool
    var incompatible: UInt64
    var refcounts: RefcountWriter
    let l1Offset: UInt64
    var l1: [UInt64]
    /// Byte offsets (from the start of the L1 table) of chunks changed since the last flush.
    var dirtyL1Chunks: Set<UInt64> = []
    /// L2 tables changed since the last flush, by offset.
    var tables: [UInt64: [UInt8]] = [:]
    /// Of those, the ones allocated since the last flush: nothing on disk points at them yet.
    var newTables: Set<UInt64> = []
    /// Host clusters whose refcount drops once the L2 and L1 changes are on disk.
    var pendingFrees: [UInt64] = []
    /// L2 tables the live L1 points at, for the overlap check.
    var liveTables: Set<UInt64>
    /// L2 tables known to refer to no cluster this session allocates, with the L1 index each
    /// serves: tables read from disk whose entries were checked when first read
    /// (`checkPredates`), and tables made here.
    var checkedTables: [UInt64: Int] = [:]
    /// Host clusters that COPIED entries of checked tables claim (refcount 1: one reference
    /// each), one bit per cluster in pages of 2^18 made on demand: 2 MiB for a fully mapped
    /// 1 TiB image of 64 KiB clusters.
    var claimedClusters: [UInt64: [UInt64]] = [:]
    /// Why writing stopped: the image was found corrupt, or a barrier failed.
    var failure: Qcow2Error?
    var closed = false
    /// Bytes of changed L2 tables kept before a write flushes them (bounds memory).
    static let maxDirtyBytes: UInt64 = 32 << 20
    /// While writes keep coming, they are flushed at least this often (seconds), as a
    /// filesystem's commit interval bounds what a crash without fsync loses.
    static let maxDirtySeconds = 5.0
    var lastFlush = ContinuousClock.now

    init(image: Qcow2Image) throws {
        let header = image.header
        guard !header.isMarkedCorrupt else {
            throw Qcow2Error.writeRefused("\(image.file.path) is marked corrupt; 'qemu-img check -r all' can repair it")
        }
        guard !header.isDirty else {
            throw Qcow2Error.writeRefused("\(image.file.path) was not closed cleanly (dirty bit, lazy refcounts); run 'qemu-img check -r all' first")
        }
        self.image = image
        file = image.file
        dataFile = image.dataFile
        layout = image.layout
        clusterSize = layout.clusterSize
        size = header.size
        version = header.version
        externalData = header.hasExternalDataFile
        mirroredData = header.hasExternalDataFile && header.dataFileRaw
        lazyRefcounts = header.version >= 3 && header.compatibleFeatures & 1 != 0
        incompatible = header.incompatibleFeatures
        refcounts = try RefcountWriter(file: file, header: header)
        l1Offset = header.l1TableOffset
        let l1Bytes = try file.readBytes(at: header.l1TableOffset, count: Int(header.l1Size) * 8)
        let reader = BigEndianReader(bytes: l1Bytes)
        l1 = (0..<Int(header.l1Size)).map { reader.u64($0 * 8) }
        liveTables = Set(l1.map { $0 & ClusterLayout.offsetMask }.filter { $0 != 0 })
        if header.version >= 3 {
            // Autoclear bits we do not maintain (bitmaps) must be cleared by whoever writes.
            let autoclear = header.autoclearFeatures & 2
            if autoclear != header.autoclearFeatures {
                try file.write(bigEndianBytes(autoclear), at: 88)
            }
            if lazyRefcounts {
                // Refcounts may lag until close; a crash leaves the image marked for repair.
                try setIncompatible(incompatible | Header.Incompatible.dirty)
            }
        }
    }

    // MARK: Errors

    /// Runs `body`; corruption found on the way marks the image corrupt and stops all writing.
    ///
    /// Other errors leave the writer as it was, so a write that fails for want of space (ENOSPC
    /// from pwrite) fails alone and the next one may succeed: every step writes what nothing on
    /// disk refers to yet before what refers to it, and memory changes only once the disk did, so
    /// a failed step costs at most leaked clusters. A failed fdatasync is different: Linux may
    /// drop the pages it could not write and the next fdatasync then succeeds without them, so
    /// nothing written since the last good barrier can be trusted to be on disk. Writing stops
    /// (the image is not marked corrupt: what is on disk is consistent) until the volume is
    /// opened again.
    func guarded<R>(_ body: (Qcow2WriteState) throws -> R) throws -> R {
        if closed { throw Qcow2Error.writeRefused("\(file.path) is closed for writing") }
        if let failure { throw failure }
        do {
            return try body(self)
        } catch let error as Qcow2Error {
            switch error {
            case .corrupt:
                failure = error
                markCorrupt()
            case .io(_, "fdatasync", _):
                failure = .writeRefused("\(error) earlier, so what reached the disk since the last flush is unknown; close the file and open it again")
            default:
                break
            }
            throw error
        }
    }

    func markCorrupt() {
        guard version >= 3 else { return }
        try? setIncompatible(incompatible | Header.Incompatible.corrupt)
    }

    func setIncompatible(_ bits: UInt64) throws {
        try file.write(bigEndianBytes(bits), at: 72)
        try file.syncData()
        incompatible = bits
    }

    func markClean() throws {
        if incompatible & Header.Incompatible.dirty != 0, failure == nil {
            try setIncompatible(incompatible & ~Header.Incompatible.dirty)
        }
    }

    // MARK: Writing

    func write(_ source: WriteSource, at offset: UInt64, length: UInt64) throws {
        guard offset <= size, length <= size - offset else {
            throw Qcow2Error.writeRefused("\(length) bytes at \(offset) run past the end of the disk (\(size) bytes)")
        }
        var touched: Set<UInt64> = []
        var l1Touched = false
        defer { publish(tables: touched, l1: l1Touched) }
        var pos = offset
        let end = offset + length
        while pos < end {
            let clusterStart = pos & ~(clusterSize - 1)
            let n = min(end, clusterStart + clusterSize) - pos
            var piece = source
            if case .bytes(let data) = source {
                let from = Int(pos - offset)
                piece = .bytes(UnsafeRawBufferPointer(rebasing: data[from..<from + Int(n)]))
            }
            try writeCluster(piece, at: pos, length: n, touched: &touched, l1Touched: &l1Touched)
            pos += n
        }
        if UInt64(tables.count) * clusterSize > Self.maxDirtyBytes
            || ContinuousClock.now - lastFlush > .seconds(Self.maxDirtySeconds) {
            try flush()
        }
    }

    /// One piece of a write, inside one cluster.
    func writeCluster(_ source: WriteSource, at pos: UInt64, length n: UInt64,
                      touched: inout Set<UInt64>, l1Touched: inout Bool) throws {
        let clusterStart = pos & ~(clusterSize - 1)
        let inCluster = pos - clusterStart
        // The last cluster may extend past the end of the disk: covering up to the end is whole.
        let whole = inCluster == 0 && (n == clusterSize || pos + n == size)
        let l1Index = Int(pos >> (layout.clusterBits + layout.l2Bits))
        let tableOffset = try liveTable(l1Index, touched: &touched, l1Touched: &l1Touched)
        let at = Int((pos >> layout.clusterBits) & ((1 << layout.l2Bits) - 1)) * layout.l2EntryBytes
        let entryOffset = tableOffset + UInt64(at)
        let entry = readU64(tables[tableOffset]!, at)
        let bitmap = layout.extendedL2 ? readU64(tables[tableOffset]!, at + 8) : 0

        if whole, canZeroClusters, isZero(source) {
            // A whole cluster of zeros: a zero cluster, its storage freed.
            try release(entry, entryOffset: entryOffset)
            if layout.extendedL2 {
                setEntry(tableOffset, at, 0, bitmap: 0xffff_ffff_0000_0000)
            } else {
                setEntry(tableOffset, at, version >= 3 ? ClusterLayout.zeroFlag : 0, bitmap: 0)
            }
            touched.insert(tableOffset)
            return
        }

        let compressed = entry & ClusterLayout.compressedFlag != 0
        let host = entry & ClusterLayout.offsetMask
        let allocated = !compressed && (host != 0 || (externalData && entry & ClusterLayout.copiedFlag != 0))
        if allocated, entry & ClusterLayout.copiedFlag != 0 {
            try checkInPlace(host: host, entryOffset: entryOffset)
            // Subclusters (or a preallocated zero cluster) that do not hold data yet must be
            // filled whole: the rest of each comes from what the disk reads there now.
            var fillStart = inCluster
            var fillEnd = inCluster + n
            var newEntry = entry
            var newBitmap = bitmap
            if layout.extendedL2 {
                let sc = layout.subclusterBits
                let first = inCluster >> sc
                let last = (inCluster + n - 1) >> sc
                let mask = (UInt64(1) << (last + 1)) - (UInt64(1) << first)
                if bitmap & mask != mask {
                    fillStart = first << sc
                    fillEnd = (last + 1) << sc
                }
                newBitmap = (bitmap | mask) & ~(mask << 32)
            } else if entry & ClusterLayout.zeroFlag != 0 {
                fillStart = 0
                fillEnd = clusterSize
                newEntry = entry & ~ClusterLayout.zeroFlag
            }
            if fillStart == inCluster, fillEnd == inCluster + n {
                try put(source, at: host + inCluster, length: n)
            } else {
                var buffer = try currentContent(clusterStart + fillStart, length: fillEnd - fillStart)
                overlay(source, into: &buffer, at: Int(inCluster - fillStart), length: Int(n))
                try dataFile.write(buffer, at: host + fillStart)
            }
            if newEntry != entry || newBitmap != bitmap {
                setEntry(tableOffset, at, newEntry, bitmap: newBitmap)
                touched.insert(tableOffset)
            }
            return
        }

        if case .bytes(let data) = source, !externalData, !compressed, host == 0,
           image.backing == nil || (!layout.extendedL2 && entry & ClusterLayout.zeroFlag != 0) {
            // The cluster reads as zeros now, and a new one reads as zeros too: allocation only
            // hands out clusters past the end of the file as opened that nothing wrote since
            // (holes, or past the end). So only the write's own bytes are written, straight from
            // the request, as QEMU does; the file then ends inside the cluster at the latest,
            // which reads as zeros past the end (QEMU's rule, and `ReadPlan.appendHost`).
            let newHost = try allocateData(guestCluster: clusterStart)
            try dataFile.write(data, at: newHost + inCluster)
            try release(entry, entryOffset: entryOffset)
            setEntry(tableOffset, at, newHost | ClusterLayout.copiedFlag, bitmap: layout.extendedL2 ? 0x0000_0000_ffff_ffff : 0)
            touched.insert(tableOffset)
            return
        }

        // Copy on write: a new cluster holding what the disk reads there now, with the write on
        // top (a whole-cluster write needs nothing read).
        var buffer = whole ? [UInt8](repeating: 0, count: Int(clusterSize))
            : try currentContent(clusterStart, length: clusterSize)
        overlay(source, into: &buffer, at: Int(inCluster), length: Int(n))
        let newHost = try allocateData(guestCluster: clusterStart)
        try dataFile.write(buffer, at: newHost)
        try release(entry, entryOffset: entryOffset)
        setEntry(tableOffset, at, newHost | ClusterLayout.copiedFlag, bitmap: layout.extendedL2 ? 0x0000_0000_ffff_ffff : 0)
        touched.insert(tableOffset)
    }

    /// Whether whole clusters can be made to read as zeros from metadata alone.
    var canZeroClusters: Bool {
        // A raw data file must read as the disk does, so its zeros are written there.
        !mirroredData && (version >= 3 || image.backing == nil)
    }

    func isZero(_ source: WriteSource) -> Bool {
        switch source {
        case .zeros: return true
        case .bytes(let data):
            // Word-wise scan; most writes fail on the first word.
            var i = 0
            let count = data.count
            while i + 8 <= count {
                if data.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
                i += 8
            }
            while i < count {
                if data[i] != 0 { return false }
                i += 1
            }
            return true
        }
    }

    func put(_ source: WriteSource, at host: UInt64, length: UInt64) throws {
        switch source {
        case .bytes(let data): try dataFile.write(data, at: host)
        case .zeros: try dataFile.zero(at: host, length: length)
        }
    }

    func overlay(_ source: WriteSource, into buffer: inout [UInt8], at start: Int, length: Int) {
        buffer.withUnsafeMutableBytes { b in
            switch source {
            case .bytes(let data): UnsafeMutableRawBufferPointer(rebasing: b[start..<start + length]).copyMemory(from: data)
            case .zeros: UnsafeMutableRawBufferPointer(rebasing: b[start..<start + length]).initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
    }

    /// What the live disk reads at `offset` now (zeros past its end), through the image's own
    /// read path: backing files, compressed clusters, shared clusters, and this writer's changes.
    func currentContent(_ offset: UInt64, length: UInt64) throws -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: Int(length))
        guard offset < size else { return buffer }
        try buffer.withUnsafeMutableBytes { b in _ = try image.live.read(into: b, at: offset) }
        return buffer
    }

    // MARK: Clusters

    func allocateData(guestCluster: UInt64) throws -> UInt64 {
        if externalData { return guestCluster }
        return try refcounts.allocate()
    }

    /// Schedules the host storage an L2 entry refers to for release once the entry that replaces
    /// it is on disk.
    func release(_ entry: UInt64, entryOffset: UInt64) throws {
        if entry & ClusterLayout.compressedFlag != 0 {
            // QEMU counts whole 512-byte sectors from the sector holding the first byte.
            let (offset, length) = layout.compressedExtent(entry)
            let start = offset & ~511
            let end = start + length + (offset & 511)
            guard start < file.size else {
                throw Qcow2Error.corrupt("compressed cluster at \(offset) lies past the end of the file", offset: entryOffset)
            }
            let first = start / clusterSize
            let last = (end - 1) / clusterSize
            for cluster in first...last { try checkNotMetadata(cluster * clusterSize, entryOffset: entryOffset) }
            pendingFrees += Array(first...last)
            return
        }
        let host = entry & ClusterLayout.offsetMask
        if externalData {
            // Nothing counts data file clusters; its storage is simply given back.
            if entry & ClusterLayout.copiedFlag != 0 { dataFile.punchHole(at: host, length: clusterSize) }
            return
        }
        guard host != 0 else { return }
        guard host & (clusterSize - 1) == 0 else {
            throw Qcow2Error.corrupt("L2 entry points to unaligned cluster offset \(host)", offset: entryOffset)
        }
        try checkNotMetadata(host, entryOffset: entryOffset)
        if entry & ClusterLayout.copiedFlag == 0 {
            // Not COPIED: a snapshot shares the cluster, so it is counted more than once (QEMU
            // sets COPIED exactly when the refcount is 1). At 1, the free would drop it to 0 and
            // punch out data that another reference still reads.
            let refcount = try refcounts.refcount(ofCluster: host / clusterSize)
            guard refcount >= 2 else {
                throw Qcow2Error.corrupt("data cluster at \(host) is shared (not COPIED) but its refcount is \(refcount)", offset: entryOffset)
            }
        }
        pendingFrees.append(host / clusterSize)
    }

    /// Before writing into a cluster in place: its refcount must be exactly 1 and it must not
    /// overlap metadata, or the image is corrupt (QEMU's overlap check, the cached parts).
    func checkInPlace(host: UInt64, entryOffset: UInt64) throws {
        guard host & (clusterSize - 1) == 0 else {
            throw Qcow2Error.corrupt("L2 entry points to unaligned cluster offset \(host)", offset: entryOffset)
        }
        if externalData { return }
        let refcount = try refcounts.refcount(ofCluster: host / clusterSize)
        guard refcount == 1 else {
            throw Qcow2Error.corrupt("data cluster at \(host) is marked COPIED but its refcount is \(refcount)", offset: entryOffset)
        }
        try checkNotMetadata(host, entryOffset: entryOffset)
    }

    /// A data cluster that an L2 entry at `entryOffset` names, to be written or freed, must not be
    /// metadata: freeing it would drop the metadata's refcount to 0 and punch it out of the file.
    func checkNotMetadata(_ host: UInt64, entryOffset: UInt64) throws {
        guard !overlapsMetadata(host) && !liveTables.contains(host) else {
            throw Qcow2Error.corrupt("data cluster at \(host) overlaps the image's metadata", offset: entryOffset)
        }
    }

    /// Whether the cluster at `host` holds the header, the L1 table, the refcount table, a
    /// refcount block or the start of the snapshot table.
    func overlapsMetadata(_ host: UInt64) -> Bool {
        let header = image.header
        let l1Bytes = UInt64(l1.count) * 8
        return host < clusterSize
            || (host + clusterSize > l1Offset && host < l1Offset + l1Bytes)
            || (host + clusterSize > refcounts.tableOffset && host < refcounts.tableOffset + UInt64(refcounts.table.count) * 8)
            || (header.nbSnapshots > 0 && host + clusterSize > header.snapshotsOffset && host <= header.snapshotsOffset)
            || refcounts.isBlock(host)
    }

    // MARK: L1 and L2

    /// The offset of the live L2 table for L1 index `i`, loaded into `tables`, owned by the live
    /// state alone: allocated when missing, copied when a snapshot shares it.
    /// A table made here goes into `touched`: readers must see it before anything points at it.
    func liveTable(_ i: Int, touched: inout Set<UInt64>, l1Touched: inout Bool) throws -> UInt64 {
        let entry = l1[i]
        let offset = entry & ClusterLayout.offsetMask
        let entryOffset = l1Offset + UInt64(i) * 8
        if offset != 0, let owner = checkedTables[offset], owner != i {
            // Two guest ranges writing through one table would each change the other's data.
            throw Qcow2Error.corrupt("L2 table at \(offset) is also the table of L1 entry \(owner)", offset: entryOffset)
        }
        if offset != 0, entry & ClusterLayout.copiedFlag != 0 {
            if tables[offset] == nil {
                let refcount = try refcounts.refcount(ofCluster: offset / clusterSize)
                guard refcount == 1 else {
                    throw Qcow2Error.corrupt("L2 table at \(offset) is marked COPIED but its refcount is \(refcount)", offset: entryOffset)
                }
                guard offset & (clusterSize - 1) == 0, !overlapsMetadata(offset) else {
                    throw Qcow2Error.corrupt("L2 table at \(offset) is unaligned or overlaps other metadata", offset: entryOffset)
                }
                tables[offset] = try tableBytes(offset, l1Index: i, entryOffset: entryOffset)
            }
            return offset
        }
        let content = offset == 0 ? [UInt8](repeating: 0, count: Int(clusterSize))
            : try tableBytes(offset, l1Index: i, entryOffset: entryOffset)
        let fresh = try refcounts.allocate()
        tables[fresh] = content
        newTables.insert(fresh)
        checkedTables[fresh] = i
        if offset != 0 {
            // A snapshot keeps the old table; the live state stops counting it.
            pendingFrees.append(offset / clusterSize)
            liveTables.remove(offset)
        }
        liveTables.insert(fresh)
        l1[i] = fresh | ClusterLayout.copiedFlag
        dirtyL1Chunks.insert(UInt64(i * 8) & ~(clusterSize - 1))
        touched.insert(fresh)
        l1Touched = true
        return fresh
    }

    /// The table at `offset` as L1 entry `l1Index` (at `entryOffset`) sees it now.
    func tableBytes(_ offset: UInt64, l1Index: Int, entryOffset: UInt64) throws -> [UInt8] {
        if let t = tables[offset] { return t }
        let block = try image.l2Table(at: offset, entryOffset: entryOffset)
        let bytes = Array(block.bytes)
        if checkedTables[offset] == nil {
            try checkPredates(table: bytes, at: offset, l1Index: l1Index, entryOffset: entryOffset)
            checkedTables[offset] = l1Index
        }
        return bytes
    }

    /// An L2 table that was on disk before this session, and every cluster its entries refer to,
    /// must start before the end of the file as it was opened (QEMU's check allows a reference
    /// to run past the end by less than a cluster). Allocation hands out clusters from that end
    /// on: a reference beyond it would reach a cluster this writer gives to other data, and a
    /// write or a free through it would silently change that data. So it is corruption, found
    /// the first time the table is read, before anything is written through it.
    ///
    /// With an external data file nothing counts data clusters: a cluster is allocated at its
    /// guest offset, as QEMU does, so every entry must map one to one, or an allocation lands on
    /// data another entry maps; and QEMU writes no compressed clusters there.
    func checkPredates(table: [UInt8], at offset: UInt64, l1Index: Int, entryOffset: UInt64) throws {
        let first = refcounts.firstNewCluster
        guard offset / clusterSize < first else {
            throw Qcow2Error.corrupt("L2 table at \(offset) lies past the end of the file", offset: entryOffset)
        }
        if externalData {
            let tableStart = UInt64(l1Index) << (layout.clusterBits + layout.l2Bits)
            try table.withUnsafeBytes { bytes in
                for (n, at) in stride(from: 0, to: bytes.count, by: layout.l2EntryBytes).enumerated() {
                    let entry = bytes.bigEndianU64(at: at)
                    let host = entry & ClusterLayout.offsetMask
                    let guest = tableStart + UInt64(n) << layout.clusterBits
                    if entry & ClusterLayout.compressedFlag != 0 {
                        throw Qcow2Error.corrupt("compressed cluster in an image with an external data file", offset: offset + UInt64(at))
                    }
                    guard host == guest || (host == 0 && entry & ClusterLayout.copiedFlag == 0) else {
                        throw Qcow2Error.corrupt("L2 entry maps guest offset \(guest) to \(host) in the external data file, not one to one",
                                                offset: offset + UInt64(at))
                    }
                }
            }
            return
        }
        // A COPIED cluster has refcount 1: one reference. Two, in this table or in any other
        // checked before, would write through each other.
        try table.withUnsafeBytes { bytes in
            for at in stride(from: 0, to: bytes.count, by: layout.l2EntryBytes) {
                let entry = bytes.bigEndianU64(at: at)
                let last: UInt64
                if entry & ClusterLayout.compressedFlag != 0 {
                    let (start, length) = layout.compressedExtent(entry)
                    last = (start + length - 1) / clusterSize
                } else {
                    let host = entry & ClusterLayout.offsetMask
                    guard host != 0 else { continue }
                    last = host / clusterSize
                    if entry & ClusterLayout.copiedFlag != 0, !claim(last) {
                        throw Qcow2Error.corrupt("data cluster at \(host) is marked COPIED in two L2 entries", offset: offset + UInt64(at))
                    }
                }
                guard last < first else {
                    throw Qcow2Error.corrupt("L2 entry refers to host cluster \(last), past the end of the file (\(first) clusters)",
                                            offset: offset + UInt64(at))
                }
            }
        }
    }

    /// Marks host cluster `cluster` claimed; false if it already was.
    func claim(_ cluster: UInt64) -> Bool {
        let page = cluster >> 18
        let word = Int((cluster >> 6) & 4095)
        let bit = UInt64(1) << (cluster & 63)
        let current = claimedClusters[page]?[word] ?? 0
        if current & bit != 0 { return false }
        claimedClusters[page, default: [UInt64](repeating: 0, count: 4096)][word] |= bit
        return true
    }

    func setEntry(_ table: UInt64, _ at: Int, _ entry: UInt64, bitmap: UInt64) {
        tables[table]!.storeBigEndian(entry, at: at)
        if layout.extendedL2 { tables[table]!.storeBigEndian(bitmap, at: at + 8) }
    }

    func readU64(_ bytes: [UInt8], _ at: Int) -> UInt64 {
        bytes.withUnsafeBytes { $0.bigEndianU64(at: at) }
    }

    /// Shows readers the tables and L1 chunks this write changed.
    func publish(tables changed: Set<UInt64>, l1 l1Changed: Bool) {
        var blocks: [(BlockCache.Key, CachedBlock)] = []
        for offset in changed {
            guard let t = tables[offset] else { continue }
            blocks.append((.init(file: file.id, offset: offset, kind: .l2), CachedBlock(copying: t)))
        }
        if l1Changed {
            for chunk in dirtyL1Chunks { blocks.append((l1Key(chunk), CachedBlock(copying: l1ChunkBytes(chunk)))) }
        }
        guard !blocks.isEmpty else { return }
        image.unwritten.withLock { pending in
            for (key, block) in blocks { pending[key] = block }
        }
        image.hasUnwritten.store(true, ordering: .releasing)
    }

    func l1Key(_ chunk: UInt64) -> BlockCache.Key {
        .init(file: file.id, offset: l1Offset + chunk, kind: .l1)
    }

    func l1ChunkBytes(_ chunk: UInt64) -> [UInt8] {
        let first = Int(chunk / 8)
        let last = min(l1.count, first + Int(clusterSize / 8))
        var bytes = [UInt8](repeating: 0, count: (last - first) * 8)
        for i in first..<last { bytes.storeBigEndian(l1[i], at: (i - first) * 8) }
        return bytes
    }

    // MARK: Flushing

    /// Data and refcount increments, then (barrier) the L2 tables and L1 entries that refer to
    /// them, then (barrier) the refcount decrements those changes allowed.
    func flush() throws {
        lastFlush = ContinuousClock.now
        if tables.isEmpty, dirtyL1Chunks.isEmpty, pendingFrees.isEmpty {
            try syncFiles()
            return
        }
        image.writeBacks.add(1, ordering: .acquiringAndReleasing)
        defer { image.writeBacks.add(1, ordering: .acquiringAndReleasing) }
        // New tables first: nothing on disk refers to them yet.
        for offset in newTables { try file.write(tables[offset]!, at: offset) }
        if !lazyRefcounts { try syncFiles() }
        for (offset, table) in tables where !newTables.contains(offset) { try file.write(table, at: offset) }
        let l1Chunks = dirtyL1Chunks.map { ($0, l1ChunkBytes($0)) }
        for (chunk, bytes) in l1Chunks { try file.write(bytes, at: l1Offset + chunk) }
        try syncFiles()
        // On disk now: readers can go back to the cache.
        let written = tables.map { (BlockCache.Key(file: file.id, offset: $0.key, kind: .l2), $0.value) }
            + l1Chunks.map { (l1Key($0.0), $0.1) }
        for (key, bytes) in written {
            image.cache.replace(key, with: CachedBlock(copying: bytes))
        }
        image.unwritten.withLock { pending in
            for (key, _) in written { pending[key] = nil }
        }
        tables.removeAll()
        newTables.removeAll()
        dirtyL1Chunks.removeAll()
        let frees = pendingFrees
        pendingFrees.removeAll()
        for cluster in frees where try refcounts.decrement(cluster) == 0 {
            file.punchHole(at: cluster * clusterSize, length: clusterSize)
        }
    }

    func syncFiles() throws {
        if dataFile !== file { try dataFile.syncData() }
        try file.syncData()
    }
}
