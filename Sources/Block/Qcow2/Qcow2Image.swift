import Dispatch
import Foundation
import Synchronization
import Locking

/// An open qcow2 file: its checked header, extensions and snapshot table, its data file and its
/// backing device. Reads go through a `Qcow2View`, which picks the L1 table: the live one or a
/// snapshot's.
public final class Qcow2Image: Sendable {
    public let file: HostFile
    /// The external data file, or `file` itself.
    public let dataFile: HostFile
    public let header: Header
    public let backingFormat: String?
    public let backingFileName: String?
    public let externalDataFileName: String?
    /// Every entry of the snapshot table that could be read, those with a `problem` included.
    public let snapshots: [Snapshot]
    /// Why entries at the end of the snapshot table could not be read (they lie past the end of
    /// the file), or nil. The live disk and the other snapshots stay readable, as in QEMU.
    public let snapshotTableProblem: String?
    public let backing: (any BlockDevice)?
    let layout: ClusterLayout
    let cache: BlockCache
    let metadataPreallocation = Locked<Bool?>(nil)
    /// Metadata a writer changed but has not written back yet (L1 chunks, L2 tables): readers
    /// look here before the cache, so they see every acknowledged write. Empty unless writing.
    let unwritten = Locked<[BlockCache.Key: CachedBlock]>([:])
    let hasUnwritten = Atomic<Bool>(false)
    /// Odd while a writer writes metadata back and replaces it in the cache; bumped twice per
    /// write-back. A reader that loaded a block from disk inserts it only if no write-back ran
    /// meanwhile, so a version older than the disk never lands in the cache.
    let writeBacks = Atomic<UInt64>(0)
    /// Where the last read with compressed clusters ended, to see sequential reads.
    let compressedReadEnd = Atomic<UInt64>(.max)
    /// Whether a decode-ahead runs now (at most one per image).
    let decodingAhead = Atomic<Bool>(false)
    /// Compressed clusters being decoded now, by host offset. A read that needs one of them waits
    /// for it rather than decoding it a second time: the decode-ahead and the reads it runs ahead
    /// of meet on the same clusters.
    let decoding = Locked<[UInt64: PendingDecode]>([:])

    init(file: HostFile, cache: BlockCache, openBacking: (String, String?) throws -> (any BlockDevice)?,
         openDataFile: (String) throws -> HostFile) throws {
        self.file = file
        self.cache = cache
        let probe = try file.readBytes(at: 0, count: Int(min(file.size, 128)))
        guard probe.count >= 72, BigEndianReader(bytes: probe).u32(0) == Header.magic else {
            throw Qcow2Error.notQcow2(path: file.path)
        }
        // The version first: a qcow (version 1) image has no cluster_bits at byte 20.
        let version = BigEndianReader(bytes: probe).u32(4)
        guard version == 2 || version == 3 else { throw Qcow2Error.unsupportedVersion(version) }
        let clusterBits = BigEndianReader(bytes: probe).u32(20)
        guard (9...21).contains(clusterBits) else {
            throw Qcow2Error.corrupt("cluster_bits \(clusterBits) is outside 9...21", offset: 20)
        }
        let firstCluster = try file.readBytes(at: 0, count: Int(min(file.size, 1 << UInt64(clusterBits))))
        let header = try Header.parse(firstCluster, fileSize: file.size, path: file.path)
        let extensions = try HeaderExtensions.parse(cluster: firstCluster, header: header)
        if extensions.encrypted { throw Qcow2Error.encrypted(method: 2) }
        let unknown = header.incompatibleFeatures & ~Header.Incompatible.known
        if unknown != 0 {
            let bit = unknown.trailingZeroBitCount
            let name = extensions.featureNames[.init(type: 0, bit: UInt8(bit))]
            throw Qcow2Error.unsupportedFeature(bit: bit, name: name)
        }
        self.header = header
        self.backingFormat = extensions.backingFormat
        self.externalDataFileName = extensions.externalDataFile
        layout = ClusterLayout(clusterBits: UInt64(header.clusterBits), l2Bits: UInt64(header.l2Bits),
                               extendedL2: header.extendedL2, hasDataFile: header.hasExternalDataFile)
        if header.hasExternalDataFile {
            guard let name = extensions.externalDataFile, !name.isEmpty else {
                throw Qcow2Error.corrupt("external data file bit set but no data file name extension", offset: 72)
            }
            dataFile = try openDataFile(name)
        } else {
            dataFile = file
        }
        if header.backingFileOffset != 0, header.backingFileSize > 0 {
            let start = Int(header.backingFileOffset)
            // As QEMU reads it: the name ends at a NUL, and a name of NULs only is no backing file.
            if let name = ChainResolver.name(from: firstCluster[start..<start + Int(header.backingFileSize)]) {
                backingFileName = name
                backing = try openBacking(name, extensions.backingFormat)
            } else {
                backingFileName = nil
                backing = nil
            }
        } else {
            backingFileName = nil
            backing = nil
        }
        let table = try SnapshotTable.read(file, header: header)
        snapshots = table.snapshots
        snapshotTableProblem = table.unreadable
    }

    public var live: Qcow2View {
        Qcow2View(image: self, l1Offset: header.l1TableOffset, l1Size: header.l1Size, size: header.size)
    }

    /// A snapshot's view: its own L1 table and its own size (the disk size recorded with it).
    public func view(of snapshot: Snapshot) -> Qcow2View {
        Qcow2View(image: self, l1Offset: snapshot.l1TableOffset, l1Size: snapshot.l1Size,
                  size: snapshot.diskSize ?? header.size)
    }

    /// The L2 table at `offset`, through the cache.
    func l2Table(at offset: UInt64, entryOffset: UInt64) throws -> CachedBlock {
        let size = layout.clusterSize
        guard offset & (size - 1) == 0 else {
            throw Qcow2Error.corrupt("L1 entry points to unaligned L2 table offset \(offset)", offset: entryOffset)
        }
        return try metadataBlock(.init(file: file.id, offset: offset, kind: .l2)) {
            // Checked only when read from the file: a writer's new table that is not written
            // yet may lie past the end of the file, and comes from the writer. A table must start
            // inside the file (as a data cluster must); the part past the end reads as zeros, as
            // QEMU reads it (iotest 060: an L2 table at the L1 table's cluster, which a new image
            // ends 8 bytes into).
            guard offset < file.size else {
                throw Qcow2Error.corrupt("L2 table at \(offset) lies past the end of the file", offset: entryOffset)
            }
            let stored = Int(min(size, file.size - offset))
            return try CachedBlock(count: Int(size)) { table in
                try file.read(into: UnsafeMutableRawBufferPointer(rebasing: table[0..<stored]), at: offset)
                UnsafeMutableRawBufferPointer(rebasing: table[stored...]).initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
    }

    /// A metadata block as the image stands now: a writer's unwritten version, or the cache's.
    func metadataBlock(_ key: BlockCache.Key, load: () throws -> CachedBlock) throws -> CachedBlock {
        guard hasUnwritten.load(ordering: .acquiring) else { return try cache.block(key, load: load) }
        if let pending = unwritten.withLock({ $0[key] }) { return pending }
        let before = writeBacks.load(ordering: .acquiring)
        return try cache.block(key, load: load, insertIf: {
            before & 1 == 0 && writeBacks.load(ordering: .acquiring) == before
        })
    }

    /// L1 entry `index` of the table at `l1Offset`, read through the cache one cluster at a time.
    func l1Entry(l1Offset: UInt64, l1Size: UInt32, index: UInt64) throws -> UInt64 {
        let byte = index * 8
        let chunkStart = byte & ~(layout.clusterSize - 1)
        let chunkBytes = min(layout.clusterSize, UInt64(l1Size) * 8 - chunkStart)
        let chunk = try metadataBlock(.init(file: file.id, offset: l1Offset + chunkStart, kind: .l1)) {
            try CachedBlock.read(file, at: l1Offset + chunkStart, count: Int(chunkBytes))
        }
        let at = Int(byte - chunkStart)
        guard at + 8 <= chunk.bytes.count else {
            throw Qcow2Error.corrupt("L1 table chunk is shorter than expected", offset: l1Offset + chunkStart)
        }
        return chunk.withUnsafeBytes { $0.bigEndianU64(at: at) }
    }

    func decodedKey(_ entry: UInt64) -> BlockCache.Key {
        .init(file: file.id, offset: layout.compressedExtent(entry).offset, kind: .decoded)
    }

    /// The decoded bytes of a compressed cluster, through the cache; decoded once however many
    /// threads ask for it together.
    func decompressedCluster(_ entry: UInt64, entryOffset: UInt64) throws -> CachedBlock {
        let key = decodedKey(entry)
        if let hit = cache.cached(key) { return hit }
        let (pending, isOwner) = decoding.withLock { table in
            if let running = table[key.offset] { return (running, false) }
            let started = PendingDecode()
            table[key.offset] = started
            return (started, true)
        }
        guard isOwner else { return try pending.wait() }
        // Another owner may have finished between the cache lookup and the claim: the cache says.
        let result = Result { try cache.block(key) { try decode(entry, entryOffset: entryOffset) } }
        decoding.withLock { _ = $0.removeValue(forKey: key.offset) }
        pending.finish(result)
        return try result.get()
    }

    /// Reads and decodes one compressed cluster.
    private func decode(_ entry: UInt64, entryOffset: UInt64) throws -> CachedBlock {
        let (offset, length) = layout.compressedExtent(entry)
        guard offset < file.size else {
            throw Qcow2Error.corrupt("compressed cluster at \(offset) lies past the end of the file", offset: entryOffset)
        }
        let stored = Int(min(length, file.size - offset))
        let clusterSize = Int(layout.clusterSize)
        // Read into memory that is neither zeroed first nor kept: it is overwritten at once.
        let input = UnsafeMutableRawBufferPointer.allocate(byteCount: stored, alignment: 16)
        defer { input.deallocate() }
        try file.read(into: input, at: offset)
        return try CachedBlock(count: clusterSize) { output in
            try Decompressor.decompress(UnsafeRawBufferPointer(input), into: output, kind: header.compression, offset: offset)
        }
    }
}

/// One cluster's decode under way: its owner finishes it, any other thread waits for it.
final class PendingDecode: Sendable {
    private let done = DispatchGroup()
    private let result = Locked<Result<CachedBlock, any Error>?>(nil)

    init() { done.enter() }

    func finish(_ outcome: Result<CachedBlock, any Error>) {
        result.withLock { $0 = outcome }
        done.leave()
    }

    func wait() throws -> CachedBlock {
        done.wait()
        return try result.withLock { $0 }!.get()
    }
}

/// One readable state of a qcow2 image: an L1 table and the size it maps.
public struct Qcow2View: BlockDevice {
    public let image: Qcow2Image
    let l1Offset: UInt64
    let l1Size: UInt32
    public let size: UInt64

    /// Calls `body` with each run of the range, in order; a run never crosses a cluster.
    func walk(from offset: UInt64, length: UInt64,
              _ body: (ClusterRun, _ guest: UInt64, _ length: UInt64, _ entryOffset: UInt64) throws -> Void) throws {
        let layout = image.layout
        var pos = offset
        let end = offset + length
        while pos < end {
            let l1Index = pos >> (layout.clusterBits + layout.l2Bits)
            let l1EntryOffset = l1Offset + l1Index * 8
            guard l1Index < UInt64(l1Size) else {
                // Past the L1 table (a snapshot's disk size may exceed what its table maps): all
                // unallocated, in one run, however large: one L2 span at a time would never end.
                try body(.unallocated, pos, end - pos, l1EntryOffset)
                return
            }
            let spanEnd = min(end, (l1Index + 1) * layout.l2Span)
            let l1 = try image.l1Entry(l1Offset: l1Offset, l1Size: l1Size, index: l1Index)
            let l2Offset = l1 & ClusterLayout.offsetMask
            guard l2Offset != 0 else {
                try body(.unallocated, pos, spanEnd - pos, l1EntryOffset)
                pos = spanEnd
                continue
            }
            let table = try image.l2Table(at: l2Offset, entryOffset: l1EntryOffset)
            try table.withUnsafeBytes { l2 in
                while pos < spanEnd {
                    let index = (pos >> layout.clusterBits) & ((1 << layout.l2Bits) - 1)
                    let at = Int(index) * layout.l2EntryBytes
                    let entry = l2.bigEndianU64(at: at)
                    let bitmap = layout.extendedL2 ? l2.bigEndianU64(at: at + 8) : 0
                    let inCluster = pos & (layout.clusterSize - 1)
                    let entryOffset = l2Offset + UInt64(at)
                    let (run, n) = try layout.classify(entry: entry, bitmap: bitmap, inCluster: inCluster,
                                                       limit: spanEnd - pos, entryOffset: entryOffset)
                    try body(run, pos, n, entryOffset)
                    pos += n
                }
            }
        }
    }

    public func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        // Walk first, decode what is compressed (in parallel), then lay out the plan.
        var runs: [(run: ClusterRun, guest: UInt64, length: UInt64, entryOffset: UInt64)] = []
        try walk(from: offset, length: UInt64(length)) { runs.append(($0, $1, $2, $3)) }
        let compressed = runs.compactMap { r -> (entry: UInt64, entryOffset: UInt64)? in
            if case .compressed(let entry) = r.run { return (entry, r.entryOffset) }
            return nil
        }
        let decoded = try decodeCompressed(compressed)
        if !compressed.isEmpty { decodeAhead(after: offset, length: UInt64(length)) }
        let backing = image.backing
        let dataFile = image.dataFile
        let clusterMask = image.layout.clusterSize - 1
        var pendingStart: UInt64 = 0
        var pendingLength: UInt64 = 0
        for (run, guest, n, entryOffset) in runs {
            if case .unallocated = run {
                if pendingLength == 0 { pendingStart = guest }
                pendingLength += n
                continue
            }
            if pendingLength > 0 {
                try planBeneath(backing, at: pendingStart, length: Int(pendingLength), into: &plan)
                pendingLength = 0
            }
            switch run {
            case .unallocated:
                break
            case .zero:
                plan.appendZero(Int(n))
            case .data(let host):
                try checkInsideFile(dataFile, host: host, guest: guest, entryOffset: entryOffset)
                plan.appendHost(dataFile, offset: host, length: Int(n))
            case .compressed(let entry):
                plan.appendBytes(decoded[entry]!, start: Int(guest & clusterMask), length: Int(n))
            }
        }
        if pendingLength > 0 {
            try planBeneath(backing, at: pendingStart, length: Int(pendingLength), into: &plan)
        }
    }

    /// A data cluster must start inside the file that holds it. The last cluster may end past
    /// the end of the file (QEMU reads zeros there, and `qemu-img check` allows less than a
    /// cluster), but a cluster that starts at or past the end is data the file has lost (an image
    /// truncated while in use): reading it as zeros would make lost data look like an empty disk.
    /// Checked against the size the file had when opened, or grew to by this process's writes;
    /// a file that shrank since is reopened before the next read.
    func checkInsideFile(_ file: HostFile, host: UInt64, guest: UInt64, entryOffset: UInt64) throws {
        let cluster = host & ~(image.layout.clusterSize - 1)
        guard cluster < file.size else {
            throw Qcow2Error.corrupt("the data of guest offset \(guest) is at \(host), past the end of \(file.path) (\(file.size) bytes)",
                                     offset: entryOffset)
        }
    }

    /// The decoded clusters for these compressed entries. Clusters not cached yet are decoded on
    /// up to `parallelDecoders` threads at once: one large read of a compressed image then uses
    /// every core instead of one.
    func decodeCompressed(_ entries: [(entry: UInt64, entryOffset: UInt64)]) throws -> [UInt64: CachedBlock] {
        var decoded: [UInt64: CachedBlock] = [:]
        var missing: [(entry: UInt64, entryOffset: UInt64)] = []
        var queued = Set<UInt64>()  // two L2 entries may share a compressed cluster
        for e in entries where decoded[e.entry] == nil && !queued.contains(e.entry) {
            if let hit = image.cache.cached(image.decodedKey(e.entry)) {
                decoded[e.entry] = hit
            } else {
                queued.insert(e.entry)
                missing.append(e)
            }
        }
        if missing.count == 1 {
            decoded[missing[0].entry] = try image.decompressedCluster(missing[0].entry, entryOffset: missing[0].entryOffset)
        } else if missing.count > 1 {
            let results = DecodeResults(count: missing.count)
            let image = self.image
            let work = missing
            DispatchQueue.concurrentPerform(iterations: min(missing.count, Self.parallelDecoders)) { worker in
                var i = worker
                while i < work.count {
                    results.store(i, Result { try image.decompressedCluster(work[i].entry, entryOffset: work[i].entryOffset) })
                    i += Self.parallelDecoders
                }
            }
            for (i, e) in missing.enumerated() { decoded[e.entry] = try results.get(i) }
        }
        return decoded
    }

    static let parallelDecoders = max(1, min(8, ProcessInfo.processInfo.activeProcessorCount))

    /// On a sequential read of compressed clusters, decodes the next stretch in the background,
    /// so that decoding overlaps the reply of this read and the kernel's next request finds its
    /// clusters decoded. Best effort: errors are left for the read that needs those clusters.
    func decodeAhead(after offset: UInt64, length: UInt64) {
        let end = offset + length
        guard image.compressedReadEnd.exchange(end, ordering: .relaxed) == offset, end < size else { return }
        guard !image.decodingAhead.exchange(true, ordering: .acquiring) else { return }
        let window = min(Self.decodeAheadBytes, size - end)
        DispatchQueue.global().async { [self] in
            defer { image.decodingAhead.store(false, ordering: .releasing) }
            var entries: [(entry: UInt64, entryOffset: UInt64)] = []
            try? walk(from: end, length: window) { run, _, _, entryOffset in
                if case .compressed(let entry) = run { entries.append((entry, entryOffset)) }
            }
            _ = try? decodeCompressed(entries)
        }
    }

    static let decodeAheadBytes: UInt64 = 2 << 20

    public func allocatedBytes(shouldStop: () -> Bool) throws -> UInt64? {
        try allocationCount(shouldStop: shouldStop)?.bytes
    }

    /// `allocatedBytes`, and how many L2 tables it walked: each distinct table once, however
    /// many L1 entries point to it (an image may point all its L1 entries at one table), so the
    /// work grows with the tables the file holds, not with the disk size it claims. What an
    /// overlay leaves unallocated is counted in its backing file, range by range.
    public func allocationCount(shouldStop: () -> Bool = { false }) throws -> (bytes: UInt64, tablesWalked: Int)? {
        let span = image.layout.l2Span
        let backing = image.backing
        struct Table { var data: UInt64; var unallocated: [(start: UInt64, length: UInt64)] }
        var tables: [UInt64: Table] = [:]
        var walked = 0
        var total: UInt64 = 0
        func beneath(_ start: UInt64, _ length: UInt64) throws {
            guard let backing, length > 0 else { return }
            var extents: [MapExtent] = []
            try statusBeneath(backing, at: start, length: length, detection: .metadataOnly, into: &extents)
            for extent in extents where extent.data && !extent.zero { total += extent.length }
        }
        // The table of one L1 entry's span, relative to the span's start.
        func table(spanStart: UInt64, length: UInt64) throws -> Table {
            var table = Table(data: 0, unallocated: [])
            walked += 1
            try walk(from: spanStart, length: length) { run, guest, n, _ in
                switch run {
                case .data, .compressed: table.data += n
                case .zero: break
                case .unallocated:
                    if backing != nil { table.unallocated.append((guest - spanStart, n)) }
                }
            }
            return table
        }
        let mapped = min(UInt64(l1Size), (size + span - 1) / span)
        for index in 0..<mapped {
            if shouldStop() { return nil }
            let start = index * span
            let length = min(span, size - start)
            let l2Offset = try image.l1Entry(l1Offset: l1Offset, l1Size: l1Size, index: index) & ClusterLayout.offsetMask
            guard l2Offset != 0 else {
                try beneath(start, length)
                continue
            }
            let counted: Table
            if length == span, let known = tables[l2Offset] {
                counted = known
            } else {
                counted = try table(spanStart: start, length: length)
                if length == span { tables[l2Offset] = counted }
            }
            total += counted.data
            for run in counted.unallocated { try beneath(start + run.start, run.length) }
        }
        // Past what the L1 table maps: unallocated.
        if mapped * span < size { try beneath(mapped * span, size - mapped * span) }
        return (total, walked)
    }

    public func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        let backing = image.backing
        let dataFile = image.dataFile
        let probeHoles = detection == .likeQemu && image.hasMetadataPreallocation
        try walk(from: offset, length: length) { run, guest, n, _ in
            switch run {
            case .unallocated:
                try statusBeneath(backing, at: guest, length: n, detection: detection, into: &extents)
            case .zero:
                extents.appendMerging(MapExtent(start: guest, length: n, depth: 0, present: true, zero: true, data: false))
            case .data(let host):
                if probeHoles {
                    appendHostStatus(dataFile, guest: guest, host: host, length: n, depth: 0, holeIsData: true, into: &extents)
                } else {
                    extents.appendMerging(MapExtent(start: guest, length: n, depth: 0, present: true, zero: false, data: true, offset: host))
                }
            case .compressed:
                extents.appendMerging(MapExtent(start: guest, length: n, depth: 0, present: true, zero: false, data: true))
            }
        }
    }
}

/// One slot per cluster being decoded; each worker writes only its own slots.
private final class DecodeResults: Sendable {
    private let slots: Locked<[Result<CachedBlock, any Error>?]>
    init(count: Int) { slots = Locked(Array(repeating: nil, count: count)) }
    func store(_ i: Int, _ result: Result<CachedBlock, any Error>) { slots.withLock { $0[i] = result } }
    func get(_ i: Int) throws -> CachedBlock { try slots.withLock { $0[i] }!.get() }
}
