import Block

/// A classic LVM snapshot read without device-mapper: the origin LV's bytes, except the chunks the
/// snapshot's COW LV holds copies of. The COW is the kernel's persistent exception store,
/// `drivers/md/dm-snap-persistent.c` (checks of the chunk size from `dm-exception-store.c`,
/// `dm_exception_store_set_chunk_size`). Everything on disk is little-endian; the COW is a run of
/// chunks of `chunk_size` × 512 bytes:
///
/// ```
/// chunk 0              header (struct disk_header), rest of the chunk unused
///   byte  0  u32 magic       "SnAp" = 0x70416E53; 0 means never formatted
///   byte  4  u32 valid       0 once the kernel invalidated the snapshot (the COW overflowed,
///                            an I/O error); any other value is valid
///   byte  8  u32 version     1
///   byte 12  u32 chunk_size  in 512-byte sectors: a power of two, at most INT_MAX >> 9
/// chunk 1 + i × (E + 1)  metadata area i (i = 0, 1, ...), E = chunk bytes / 16 records
///   byte 16k      u64 old_chunk   chunk number in the origin
///   byte 16k + 8  u64 new_chunk   chunk number in the COW holding its copy
/// the E chunks after area i   data chunks, allocated to exceptions in order
/// ```
///
/// The table ends at the first record whose new_chunk is 0 (that would be the header); an area
/// whose E records are all in use continues in the next area (`read_exceptions`,
/// `insert_exceptions`). The kernel always zeroes the next area before it fills one, so a valid
/// store ends inside the COW; a table that runs off its end is corrupt.
///
/// The exceptions are kept as sorted runs of consecutive chunks, 16 bytes a run at most, and a
/// read or status call does one binary search, then walks the runs it covers: each stretch that
/// reads from one device contiguously is one call into that device.
public final class ClassicSnapshotDevice: BlockDevice {
    /// The origin's size: the last chunk may be partial.
    public let size: UInt64
    /// Bytes in a chunk, from the header.
    public let chunkSize: UInt64
    public var exceptionCount: Int { count }

    let origin: any BlockDevice
    let cow: any BlockDevice
    let name: String
    /// Sorted by `oldChunk`, disjoint; immutable after init, so any number of threads read it.
    let runs: [ExceptionRun]
    private let count: Int
    private let chunkShift: UInt64

    /// `origin` is the origin LV's bytes, `cow` the snapshot's COW LV bytes (both usually
    /// ExtentMappedDevice). `name` is used in error messages ("vg/snap").
    public init(origin: any BlockDevice, cow: any BlockDevice, name: String) throws {
        let chunkSize = try Self.readHeader(cow: cow, name: name)
        let layout = StoreLayout(chunkSize: chunkSize, cowSize: cow.size, originSize: origin.size, name: name)
        var records: [Record] = []
        try layout.scanTable(cow) { old, new, at in
            try layout.check(old: old, new: new, at: at)
            records.append(Record(old: old, new: new))
        }
        self.count = records.count
        self.runs = try layout.runs(sorting: &records, cow: cow)
        self.origin = origin
        self.cow = cow
        self.name = name
        self.size = origin.size
        self.chunkSize = chunkSize
        self.chunkShift = UInt64(chunkSize.trailingZeroBitCount)
    }

    /// Decodes chunk 0 (struct disk_header) and returns the chunk size in bytes. Checks in the
    /// kernel's order (`read_header`, then `persistent_read_metadata`): magic, chunk size,
    /// version, valid.
    static func readHeader(cow: any BlockDevice, name: String) throws -> UInt64 {
        guard cow.size >= 16 else { throw ExceptionStoreError.cowTooSmall(snapshot: name, size: cow.size, needed: 16) }
        let header = try cow.read(at: 0, count: 16)
        let magic = header.littleEndianU32(at: 0), valid = header.littleEndianU32(at: 4)
        let version = header.littleEndianU32(at: 8), sectors = header.littleEndianU32(at: 12)
        // The kernel takes magic 0 for a fresh COW and formats it on activation; a reader cannot,
        // and a zeroed COW may as well be the wrong bytes, so it is not shown as the origin.
        guard magic != 0 else { throw ExceptionStoreError.unformatted(snapshot: name) }
        guard magic == snapMagic else { throw ExceptionStoreError.badMagic(snapshot: name, found: magic) }
        // dm_exception_store_set_chunk_size: a power of two, at most INT_MAX >> SECTOR_SHIFT
        // sectors (so 1 GiB). lvm2 itself makes 4 KiB to 512 KiB; larger ones cost nothing here,
        // as metadata is read in bounded slices and data is never buffered by the chunk.
        guard sectors != 0, sectors & (sectors - 1) == 0, sectors <= UInt32(Int32.max) >> 9 else {
            throw ExceptionStoreError.badChunkSize(snapshot: name, sectors: sectors)
        }
        guard version == 1 else { throw ExceptionStoreError.unsupportedVersion(snapshot: name, version: version) }
        guard valid != 0 else { throw ExceptionStoreError.invalidated(snapshot: name) }
        let chunkSize = UInt64(sectors) << 9
        // The header chunk and metadata area 0 are read before anything else.
        guard cow.size >= 2 * chunkSize else {
            throw ExceptionStoreError.cowTooSmall(snapshot: name, size: cow.size, needed: 2 * chunkSize)
        }
        return chunkSize
    }

    static let snapMagic: UInt32 = 0x7041_6E53

    // MARK: Reading

    public func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        try forEachSpan(at: offset, length: UInt64(length)) { at, cowOffset, n in
            if let cowOffset {
                try cow.plan(at: cowOffset, length: Int(n), into: &plan)
            } else {
                try origin.plan(at: at, length: Int(n), into: &plan)
            }
        }
    }

    /// Chunks with an exception report the COW's status, the others the origin's, each moved
    /// onto snapshot offsets.
    public func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        var below: [MapExtent] = []
        try forEachSpan(at: offset, length: length) { at, cowOffset, n in
            below.removeAll(keepingCapacity: true)
            if let cowOffset {
                try cow.status(at: cowOffset, length: n, detection: detection, into: &below)
            } else {
                try origin.status(at: at, length: n, detection: detection, into: &below)
            }
            let from = cowOffset ?? at
            for var extent in below {
                extent.start = extent.start - from + at
                extents.appendMerging(extent)
            }
        }
    }

    /// Calls `body` with each stretch of the range that one device serves contiguously: its
    /// snapshot offset, the COW offset (nil: the origin, at the same offset) and its length.
    func forEachSpan(at offset: UInt64, length: UInt64,
                     _ body: (_ at: UInt64, _ cowOffset: UInt64?, _ length: UInt64) throws -> Void) rethrows {
        let end = offset + length
        var pos = offset
        // Invariant: runs[index] is the first run that ends after the chunk at `pos`.
        var index = firstRun(endingAfter: offset >> chunkShift)
        while pos < end {
            let chunk = pos >> chunkShift
            guard index < runs.count, runs[index].oldChunk <= chunk else {
                let next = index < runs.count ? runs[index].oldChunk << chunkShift : end
                let n = min(end, next) - pos
                try body(pos, nil, n)
                pos += n
                continue
            }
            let run = runs[index]
            var oldEnd = run.oldChunk + run.count
            var newEnd = run.newChunk + run.count
            index += 1
            // Runs split at the 512-chunk limit, or meeting by chance, still read as one.
            while oldEnd << chunkShift < end, index < runs.count,
                  runs[index].oldChunk == oldEnd, runs[index].newChunk == newEnd {
                oldEnd += runs[index].count
                newEnd += runs[index].count
                index += 1
            }
            let n = min(end, oldEnd << chunkShift) - pos
            let cowOffset = (run.newChunk + chunk - run.oldChunk) << chunkShift + (pos & (chunkSize - 1))
            try body(pos, cowOffset, n)
            pos += n
        }
    }

    /// The index of the first run whose last chunk is at or after `chunk` (binary search).
    func firstRun(endingAfter chunk: UInt64) -> Int {
        var low = 0, high = runs.count
        while low < high {
            let mid = (low + high) / 2
            if runs[mid].oldChunk + runs[mid].count <= chunk { low = mid + 1 } else { high = mid }
        }
        return low
    }
}

/// One exception as the table stores it: struct disk_exception.
struct Record {
    var old: UInt64
    var new: UInt64
}

/// `count` consecutive origin chunks from `oldChunk` whose copies lie in consecutive COW chunks
/// from `newChunk`. Every chunk number is below 2^55 (a chunk is at least 512 bytes of a device
/// of less than 2^64), so the top 9 bits of `packed` hold `count - 1`: 16 bytes a run, and runs
/// longer than 512 chunks are split.
struct ExceptionRun: Equatable {
    let oldChunk: UInt64
    private let packed: UInt64

    static let maxCount: UInt64 = 1 << 9
    private static let chunkBits: UInt64 = 55

    init(oldChunk: UInt64, newChunk: UInt64, count: UInt64) {
        precondition(count >= 1 && count <= Self.maxCount && newChunk >> Self.chunkBits == 0, "run out of range")
        self.oldChunk = oldChunk
        self.packed = newChunk | (count - 1) << Self.chunkBits
    }

    var newChunk: UInt64 { packed & (1 << Self.chunkBits - 1) }
    var count: UInt64 { packed >> Self.chunkBits + 1 }
}

/// Where the store's areas and data chunks lie, and the checks every record passes.
struct StoreLayout {
    let chunkSize: UInt64
    /// E: 16-byte records in one metadata area.
    let exceptionsPerArea: UInt64
    /// Whole chunks of the COW: an exception's copy must fit entirely
    /// (`persistent_prepare_exception` allocates only while one more chunk fits).
    let cowChunks: UInt64
    let cowSize: UInt64
    /// Chunks of the origin, the last one possibly partial.
    let originChunks: UInt64
    let name: String

    init(chunkSize: UInt64, cowSize: UInt64, originSize: UInt64, name: String) {
        self.chunkSize = chunkSize
        self.exceptionsPerArea = chunkSize / 16
        self.cowSize = cowSize
        self.cowChunks = cowSize / chunkSize
        self.originChunks = originSize / chunkSize + (originSize % chunkSize == 0 ? 0 : 1)
        self.name = name
    }

    /// Metadata areas sit at chunk 1 + i × (E + 1) (`area_location`).
    func isMetadata(_ chunk: UInt64) -> Bool {
        chunk >= 1 && (chunk - 1) % (exceptionsPerArea + 1) == 0
    }

    /// Reads the table area by area (one read per area, or per MiB of a larger one) and calls
    /// `body` with each record before the one that ends it, and the record's byte offset in the
    /// COW. Stops at the end of the COW: at most one record per COW chunk, in any case.
    func scanTable(_ cow: any BlockDevice, _ body: (_ old: UInt64, _ new: UInt64, _ at: UInt64) throws -> Void) throws {
        let slice = Int(min(chunkSize, 1 << 20))
        var buffer = [UInt8](repeating: 0, count: slice)
        let stride = (exceptionsPerArea + 1) * chunkSize
        var area = chunkSize                          // byte offset of area 0, chunk 1
        while true {
            guard area <= cowSize, chunkSize <= cowSize - area else {
                throw ExceptionStoreError.unterminated(snapshot: name, offset: area)
            }
            var done: UInt64 = 0
            while done < chunkSize {
                let at = area + done
                let n = try buffer.withUnsafeMutableBytes { try cow.read(into: $0, at: at) }
                guard n == slice else { throw ExceptionStoreError.unterminated(snapshot: name, offset: at + UInt64(n)) }
                let ended = try buffer.withUnsafeBytes { raw in
                    for record in Swift.stride(from: 0, to: slice, by: 16) {
                        let new = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: record + 8, as: UInt64.self))
                        if new == 0 { return true }
                        let old = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: record, as: UInt64.self))
                        try body(old, new, at + UInt64(record))
                    }
                    return false
                }
                if ended { return }
                done += UInt64(slice)
            }
            let (next, overflow) = area.addingReportingOverflow(stride)
            guard !overflow else { throw ExceptionStoreError.unterminated(snapshot: name, offset: UInt64.max) }
            area = next
        }
    }

    /// One record's checks; the kernel makes none of them, so a bad record would read the
    /// header, metadata or nothing at all. new_chunk 0 ends the table, so never reaches here.
    func check(old: UInt64, new: UInt64, at: UInt64) throws {
        guard !isMetadata(new) else { throw ExceptionStoreError.newChunkIsMetadata(snapshot: name, chunk: new, offset: at) }
        guard new < cowChunks else {
            throw ExceptionStoreError.newChunkPastEnd(snapshot: name, chunk: new, cowChunks: cowChunks, offset: at)
        }
        guard old < originChunks else {
            throw ExceptionStoreError.oldChunkPastEnd(snapshot: name, chunk: old, originChunks: originChunks, offset: at)
        }
    }

    /// Sorts the records by origin chunk and joins them into runs.
    ///
    /// Two records for one origin chunk are refused. The kernel never writes them (it looks up
    /// completed exceptions before copying a chunk) and does not check for them either:
    /// `dm_add_exception` puts both in one hash bucket and `dm_lookup_exception` returns whichever
    /// the bucket lists first, which depends on the neighbours it merged with. No answer is right.
    func runs(sorting records: inout [Record], cow: any BlockDevice) throws -> [ExceptionRun] {
        records.sort { $0.old < $1.old }
        var runs: [ExceptionRun] = []
        var start = 0
        for i in records.indices {
            if i > 0, records[i].old == records[i - 1].old {
                throw try duplicate(records[i].old, cow: cow)
            }
            let first = records[start]
            let length = UInt64(i - start)
            if i > start, length < ExceptionRun.maxCount,
               records[i].old == first.old + length, records[i].new == first.new + length {
                continue
            }
            if i > start { runs.append(ExceptionRun(oldChunk: first.old, newChunk: first.new, count: length)) }
            start = i
        }
        if start < records.count {
            let first = records[start]
            runs.append(ExceptionRun(oldChunk: first.old, newChunk: first.new, count: UInt64(records.count - start)))
        }
        return runs
    }

    /// The error for a duplicated origin chunk, at the second record that names it: the sorted
    /// records no longer know where they were, so the table is read again (only on this path).
    private func duplicate(_ chunk: UInt64, cow: any BlockDevice) throws -> ExceptionStoreError {
        var seen = false
        var second: UInt64?
        try scanTable(cow) { old, _, at in
            guard old == chunk, second == nil else { return }
            if seen { second = at }
            seen = true
        }
        return .duplicateOldChunk(snapshot: name, chunk: chunk, offset: second ?? 0)
    }
}

/// What is wrong with a snapshot's COW, and where: `offset` is a byte position in the COW.
public enum ExceptionStoreError: Error, Equatable, CustomStringConvertible {
    /// The COW cannot hold the header (16 bytes), or the header chunk and metadata area 0.
    case cowTooSmall(snapshot: String, size: UInt64, needed: UInt64)
    /// Magic 0 at byte 0: never formatted (the kernel would start an empty snapshot on activation).
    case unformatted(snapshot: String)
    /// Byte 0 holds neither "SnAp" nor 0.
    case badMagic(snapshot: String, found: UInt32)
    /// Byte 12: zero, not a power of two, or above the kernel's INT_MAX >> 9 sectors.
    case badChunkSize(snapshot: String, sectors: UInt32)
    /// Byte 8: not version 1.
    case unsupportedVersion(snapshot: String, version: UInt32)
    /// Byte 4 is 0: the kernel dropped the snapshot (it overflowed, or an I/O error); its data is gone.
    case invalidated(snapshot: String)
    /// The record at `offset` puts a copy on a metadata area (chunk 1 + i × (E + 1)).
    case newChunkIsMetadata(snapshot: String, chunk: UInt64, offset: UInt64)
    /// The record at `offset` puts a copy past the last whole chunk of the COW.
    case newChunkPastEnd(snapshot: String, chunk: UInt64, cowChunks: UInt64, offset: UInt64)
    /// The record at `offset` copies a chunk past the end of the origin.
    case oldChunkPastEnd(snapshot: String, chunk: UInt64, originChunks: UInt64, offset: UInt64)
    /// The record at `offset` names an origin chunk an earlier record already holds.
    case duplicateOldChunk(snapshot: String, chunk: UInt64, offset: UInt64)
    /// Every area up to the end of the COW is full: the next area would start at `offset`.
    case unterminated(snapshot: String, offset: UInt64)

    public var description: String {
        switch self {
        case .cowTooSmall(let snapshot, let size, let needed):
            return "\(snapshot): the COW holds \(size) bytes; its header and first metadata area need \(needed)"
        case .unformatted(let snapshot):
            return "\(snapshot): the COW has no exception store header (magic 0 at byte 0): the snapshot was never activated"
        case .badMagic(let snapshot, let found):
            return "\(snapshot): the COW is not a snapshot exception store (magic 0x\(String(found, radix: 16)) at byte 0)"
        case .badChunkSize(let snapshot, let sectors):
            return "\(snapshot): chunk size of \(sectors) sectors at byte 12 of the COW is not a power of two up to 1 GiB"
        case .unsupportedVersion(let snapshot, let version):
            return "\(snapshot): exception store version \(version) at byte 8 of the COW (only 1 exists)"
        case .invalidated(let snapshot):
            return "\(snapshot): the snapshot was invalidated (its COW overflowed or failed; valid = 0 at byte 4)"
        case .newChunkIsMetadata(let snapshot, let chunk, let offset):
            return "\(snapshot): exception at byte \(offset) of the COW keeps its copy in chunk \(chunk), a metadata area"
        case .newChunkPastEnd(let snapshot, let chunk, let cowChunks, let offset):
            return "\(snapshot): exception at byte \(offset) of the COW keeps its copy in chunk \(chunk), past the COW's \(cowChunks) chunks"
        case .oldChunkPastEnd(let snapshot, let chunk, let originChunks, let offset):
            return "\(snapshot): exception at byte \(offset) of the COW copies chunk \(chunk), past the origin's \(originChunks) chunks"
        case .duplicateOldChunk(let snapshot, let chunk, let offset):
            return "\(snapshot): exception at byte \(offset) of the COW copies chunk \(chunk) a second time"
        case .unterminated(let snapshot, let offset):
            return "\(snapshot): the exception table runs to the end of the COW; its next area would start at byte \(offset)"
        }
    }
}

extension Array where Element == UInt8 {
    fileprivate func littleEndianU32(at offset: Int) -> UInt32 {
        (0..<4).reduce(0) { $0 | UInt32(self[offset + $1]) << (8 * $1) }
    }
}
