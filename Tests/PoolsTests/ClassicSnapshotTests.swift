import Foundation
@testable import Pools
import Block
import Synchronization
import TestSupport
import Testing

/// A persistent exception store as dm-snap-persistent.c lays it out, written byte by byte here
/// without the reader's code: header in chunk 0, records E to an area at chunk 1 + i × (E + 1).
struct StoreImage: Sendable {
    struct Exception: Sendable {
        var old: UInt64
        var new: UInt64
    }

    var chunkSize = 1024
    var chunks = 140
    var magic: UInt32 = 0x7041_6E53
    var valid: UInt32 = 1
    var version: UInt32 = 1
    /// The header's chunk_size; chunkSize / 512 unless set.
    var sectors: UInt32?
    /// In table order. A record with new 0 is written as given (it ends the table).
    var records: [Exception] = []
    /// Cut the COW to this many bytes.
    var length: Int?
    /// Fill unused bytes (data chunks, areas past the table's end) with seeded noise, not zeros.
    var noise = true

    var exceptionsPerArea: Int { chunkSize / 16 }

    /// COW chunks in the order `persistent_prepare_exception` hands them out: from chunk 2,
    /// stepping over each metadata area.
    static func allocation(_ count: Int, chunkSize: Int) -> [UInt64] {
        let stride = UInt64(chunkSize / 16 + 1)
        var next: UInt64 = 2
        var chunks: [UInt64] = []
        for _ in 0..<count {
            chunks.append(next)
            next += 1
            if next % stride == 1 { next += 1 }
        }
        return chunks
    }

    var bytes: [UInt8] {
        var bytes = [UInt8](repeating: 0, count: chunkSize * chunks)
        if noise {
            var random = SplitMix(seed: 0x5A_AD)
            for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: random.next()) }
        }
        func put(_ value: UInt64, width: Int, at offset: Int) {
            for i in 0..<width where offset + i < bytes.count { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
        }
        bytes.replaceSubrange(0..<min(chunkSize, bytes.count), with: [UInt8](repeating: 0, count: min(chunkSize, bytes.count)))
        put(UInt64(magic), width: 4, at: 0)
        put(UInt64(valid), width: 4, at: 4)
        put(UInt64(version), width: 4, at: 8)
        put(UInt64(sectors ?? UInt32(chunkSize / 512)), width: 4, at: 12)
        // The kernel zeroes an area before it writes into it, and the one after a full area.
        let e = exceptionsPerArea
        for area in 0...(records.count / e) {
            let start = (1 + area * (e + 1)) * chunkSize
            guard start + chunkSize <= bytes.count else { break }
            bytes.replaceSubrange(start..<start + chunkSize, with: [UInt8](repeating: 0, count: chunkSize))
        }
        for (k, record) in records.enumerated() {
            let at = (1 + (k / e) * (e + 1)) * chunkSize + (k % e) * 16
            put(record.old, width: 8, at: at)
            put(record.new, width: 8, at: at + 8)
        }
        if let length { bytes.removeLast(bytes.count - length) }
        return bytes
    }
}

/// Plan calls in the order devices saw them.
final class CallLog: Sendable {
    let calls = Mutex<[Recording.Call]>([])
}

/// A device that logs each plan call, to count how many calls a read takes.
final class Recording: BlockDevice {
    struct Call: Equatable, Sendable, CustomStringConvertible {
        var device: String
        var offset: UInt64
        var length: Int
        var description: String { "\(device)@\(offset)+\(length)" }
    }

    let inner: any BlockDevice
    let label: String
    let log: CallLog

    init(_ inner: any BlockDevice, _ label: String, log: CallLog) {
        self.inner = inner; self.label = label; self.log = log
    }

    var size: UInt64 { inner.size }

    func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        log.calls.withLock { $0.append(Call(device: label, offset: offset, length: length)) }
        try inner.plan(at: offset, length: length, into: &plan)
    }

    func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        try inner.status(at: offset, length: length, detection: detection, into: &extents)
    }
}

struct Hostile: CustomTestStringConvertible, Sendable {
    var label: String
    var store: StoreImage
    var originSize = 300 * 1024 + 700
    var error: ExceptionStoreError
    var testDescription: String { label }
}

private let snap = "vg/snap"

private func allocated(_ olds: [UInt64], chunkSize: Int = 1024) -> [StoreImage.Exception] {
    zip(olds, StoreImage.allocation(olds.count, chunkSize: chunkSize)).map { .init(old: $0, new: $1) }
}

private let hostile: [Hostile] = [
    Hostile(label: "COW shorter than the header", store: StoreImage(length: 8),
            error: .cowTooSmall(snapshot: snap, size: 8, needed: 16)),
    Hostile(label: "COW of the header chunk alone", store: StoreImage(chunks: 1),
            error: .cowTooSmall(snapshot: snap, size: 1024, needed: 2048)),
    Hostile(label: "1 GiB chunks in an 8 KiB COW", store: StoreImage(chunks: 8, sectors: 1 << 21),
            error: .cowTooSmall(snapshot: snap, size: 8192, needed: 2 << 30)),
    Hostile(label: "magic 0 (never formatted)", store: StoreImage(magic: 0),
            error: .unformatted(snapshot: snap)),
    Hostile(label: "qcow2 magic", store: StoreImage(magic: 0xFB49_4651),
            error: .badMagic(snapshot: snap, found: 0xFB49_4651)),
    Hostile(label: "chunk size 0", store: StoreImage(sectors: 0),
            error: .badChunkSize(snapshot: snap, sectors: 0)),
    Hostile(label: "chunk size not a power of two", store: StoreImage(sectors: 3),
            error: .badChunkSize(snapshot: snap, sectors: 3)),
    Hostile(label: "chunk size above INT_MAX >> 9 sectors", store: StoreImage(sectors: 1 << 22),
            error: .badChunkSize(snapshot: snap, sectors: 1 << 22)),
    Hostile(label: "the kernel checks the chunk size before validity", store: StoreImage(valid: 0, sectors: 6),
            error: .badChunkSize(snapshot: snap, sectors: 6)),
    Hostile(label: "version 2", store: StoreImage(version: 2),
            error: .unsupportedVersion(snapshot: snap, version: 2)),
    Hostile(label: "invalidated (overflowed)", store: StoreImage(valid: 0, records: allocated([1, 2, 3])),
            error: .invalidated(snapshot: snap)),
    Hostile(label: "copy in metadata area 0", store: StoreImage(records: [.init(old: 0, new: 1)]),
            error: .newChunkIsMetadata(snapshot: snap, chunk: 1, offset: 1024)),
    Hostile(label: "copy in metadata area 1",
            store: StoreImage(records: allocated([0, 1]) + [.init(old: 2, new: 66)]),
            error: .newChunkIsMetadata(snapshot: snap, chunk: 66, offset: 1024 + 32)),
    Hostile(label: "copy past the end of the COW",
            store: StoreImage(chunks: 10, records: [.init(old: 0, new: 2), .init(old: 1, new: 10)]),
            error: .newChunkPastEnd(snapshot: snap, chunk: 10, cowChunks: 10, offset: 1024 + 16)),
    Hostile(label: "copy in a partial last chunk of the COW",
            store: StoreImage(chunks: 11, records: [.init(old: 0, new: 10)], length: 10 * 1024 + 512),
            error: .newChunkPastEnd(snapshot: snap, chunk: 10, cowChunks: 10, offset: 1024)),
    Hostile(label: "origin chunk past the end (the partial one is fine)",
            store: StoreImage(records: allocated([100, 101])), originSize: 100 * 1024 + 1,
            error: .oldChunkPastEnd(snapshot: snap, chunk: 101, originChunks: 101, offset: 1024 + 16)),
    Hostile(label: "one origin chunk copied twice",
            store: StoreImage(records: allocated([5, 6, 5, 7])),
            error: .duplicateOldChunk(snapshot: snap, chunk: 5, offset: 1024 + 32)),
    Hostile(label: "every area full to the end of the COW",
            store: StoreImage(chunks: 131, records: allocated(Array(0..<128))),
            error: .unterminated(snapshot: snap, offset: 131 * 1024)),
    Hostile(label: "the next area only partly inside the COW",
            store: StoreImage(chunks: 132, records: allocated(Array(0..<128)), length: 131 * 1024 + 512),
            error: .unterminated(snapshot: snap, offset: 131 * 1024)),
]

@Suite("classic snapshots")
struct ClassicSnapshotTests {
    /// Origin and COW files in `scratch`, opened as raw devices so reads go through real plans.
    struct Fixture {
        let origin: [UInt8]
        let cow: [UInt8]
        let originDevice: RawImage
        let cowDevice: RawImage

        init(_ scratch: Scratch, store: StoreImage, originSize: Int, seed: UInt64 = 1) throws {
            var random = SplitMix(seed: seed)
            origin = (0..<originSize).map { _ in UInt8(truncatingIfNeeded: random.next()) }
            cow = store.bytes
            try scratch.write("origin", origin)
            try scratch.write("cow", cow)
            originDevice = RawImage(file: try HostFile(path: scratch.path("origin")))
            cowDevice = RawImage(file: try HostFile(path: scratch.path("cow")))
        }

        /// What the snapshot must read: the origin with each record's COW chunk over its chunk.
        func expected(_ store: StoreImage) -> [UInt8] {
            var bytes = origin
            let size = store.chunkSize
            for record in store.records.prefix(while: { $0.new != 0 }) {
                let at = Int(record.old) * size
                let n = min(size, bytes.count - at)
                let from = Int(record.new) * size
                bytes.replaceSubrange(at..<at + n, with: cow[from..<from + n])
            }
            return bytes
        }
    }

    static let originSize = 300 * 1024 + 700

    /// 100 exceptions over two areas (E = 64 for 1 KiB chunks): a run of 20 origin chunks whose
    /// copies straddle metadata area 1, the first chunk, the partial last one, three chunks
    /// copied in reverse, and 75 scattered ones. Area 2 holds noise the reader must not see.
    static func mixedStore() -> StoreImage {
        var random = SplitMix(seed: 7)
        let scattered = Array((60..<290).shuffled(using: &random).prefix(75)).map(UInt64.init)
        let olds: [UInt64] = Array(scattered[0..<55]) + Array(10...29) + [0, 300, 50, 49, 48] + Array(scattered[55...])
        return StoreImage(records: allocated(olds))
    }

    @Test func readsMatchTheOriginWithItsCopiesOver() throws {
        let scratch = try Scratch()
        let store = Self.mixedStore()
        let fixture = try Fixture(scratch, store: store, originSize: Self.originSize)
        let device = try ClassicSnapshotDevice(origin: fixture.originDevice, cow: fixture.cowDevice, name: snap)
        let expected = fixture.expected(store)
        #expect(device.size == UInt64(Self.originSize))
        #expect(device.chunkSize == 1024)
        #expect(device.exceptionCount == 100)
        #expect(expected != fixture.origin)

        #expect(try device.read(at: 0, count: expected.count) == expected)
        var ranges: [(Int, Int)] = [
            (0, 1), (1023, 2), (10 * 1024 - 100, 300), (29 * 1024 + 1000, 100), (47 * 1024 + 5, 4 * 1024),
            (300 * 1024 - 10, 710), (300 * 1024 + 699, 1), (9 * 1024, 22 * 1024),
        ]
        var random = SplitMix(seed: 11)
        for _ in 0..<300 {
            let at = Int(random.next() % UInt64(expected.count))
            ranges.append((at, Int(random.next() % UInt64(min(9000, expected.count - at))) + 1))
        }
        for (at, n) in ranges {
            #expect(try device.read(at: UInt64(at), count: n) == Array(expected[at..<at + n]), "read of \(n) at \(at)")
        }
    }

    @Test(arguments: [0, 1, 63, 64, 65, 128])
    func tablesEndAtTheFirstEmptyRecord(count: Int) throws {
        let scratch = try Scratch()
        let store = StoreImage(records: allocated((0..<UInt64(count)).map { $0 * 2 }))
        let fixture = try Fixture(scratch, store: store, originSize: Self.originSize)
        let device = try ClassicSnapshotDevice(origin: fixture.originDevice, cow: fixture.cowDevice, name: snap)
        #expect(device.exceptionCount == count)
        #expect(try device.read(at: 0, count: Self.originSize) == fixture.expected(store))
    }

    @Test func recordsAfterTheEndAreNotRead() throws {
        let scratch = try Scratch()
        // What follows the end record would be refused (it names a metadata area) if it were read.
        let store = StoreImage(records: [.init(old: 3, new: 2), .init(old: 9, new: 0), .init(old: 7, new: 1)])
        let fixture = try Fixture(scratch, store: store, originSize: Self.originSize)
        let device = try ClassicSnapshotDevice(origin: fixture.originDevice, cow: fixture.cowDevice, name: snap)
        #expect(device.exceptionCount == 1)
        #expect(try device.read(at: 0, count: Self.originSize) == fixture.expected(store))
    }

    /// One plan call per stretch that one device serves contiguously, worked out chunk by chunk.
    @Test func eachContiguousStretchIsOnePlanCall() throws {
        let scratch = try Scratch()
        let store = Self.mixedStore()
        let fixture = try Fixture(scratch, store: store, originSize: Self.originSize)
        let log = CallLog()
        let device = try ClassicSnapshotDevice(origin: Recording(fixture.originDevice, "origin", log: log),
                                               cow: Recording(fixture.cowDevice, "cow", log: log), name: snap)
        log.calls.withLock { $0.removeAll() }    // the table reads
        _ = try device.plan(at: 0, length: Self.originSize)

        let copies = Dictionary(uniqueKeysWithValues: store.records.map { ($0.old, $0.new) })
        var expected: [Recording.Call] = []
        for chunk in 0..<UInt64(301) {
            let n = min(1024, Self.originSize - Int(chunk) * 1024)
            let call = copies[chunk].map { Recording.Call(device: "cow", offset: $0 * 1024, length: n) }
                ?? Recording.Call(device: "origin", offset: chunk * 1024, length: n)
            if let last = expected.last, last.device == call.device, last.offset + UInt64(last.length) == call.offset {
                expected[expected.count - 1].length += n
            } else {
                expected.append(call)
            }
        }
        #expect(log.calls.withLock { $0 } == expected)
        #expect(expected.contains(Recording.Call(device: "cow", offset: 57 * 1024, length: 9 * 1024)))
    }

    /// Runs longer than 512 chunks are stored split but still read as one call.
    @Test func longRunsAreSplitInStorageAndJoinedInReads() throws {
        let scratch = try Scratch()
        let chunk = 16 << 10                           // E = 1024: 600 copies fit in area 0
        let store = StoreImage(chunkSize: chunk, chunks: 604, records: allocated(Array(0..<600), chunkSize: chunk), noise: false)
        let fixture = try Fixture(scratch, store: store, originSize: 610 * chunk)
        let log = CallLog()
        let device = try ClassicSnapshotDevice(origin: Recording(fixture.originDevice, "origin", log: log),
                                               cow: Recording(fixture.cowDevice, "cow", log: log), name: snap)
        #expect(device.runs == [ExceptionRun(oldChunk: 0, newChunk: 2, count: 512),
                                ExceptionRun(oldChunk: 512, newChunk: 514, count: 88)])
        log.calls.withLock { $0.removeAll() }
        _ = try device.plan(at: 100, length: 605 * chunk)
        #expect(log.calls.withLock { $0 } == [Recording.Call(device: "cow", offset: UInt64(2 * chunk + 100), length: 600 * chunk - 100),
                                        Recording.Call(device: "origin", offset: UInt64(600 * chunk), length: 5 * chunk + 100)])
        #expect(MemoryLayout<ExceptionRun>.stride == 16)
    }

    @Test func statusTakesTheCopiesFromTheCowAndTheRestFromTheOrigin() throws {
        let scratch = try Scratch()
        let store = Self.mixedStore()
        let fixture = try Fixture(scratch, store: store, originSize: Self.originSize)
        // The origin keeps data in its first 128 KiB only; the rest is a hole.
        let data = 128 << 10
        try scratch.write("sparse", Array(fixture.origin[0..<data]))
        try scratch.sh("truncate -s \(Self.originSize) sparse")
        let origin = RawImage(file: try HostFile(path: scratch.path("sparse")))
        let device = try ClassicSnapshotDevice(origin: origin, cow: fixture.cowDevice, name: snap)

        let copies = Dictionary(uniqueKeysWithValues: store.records.map { ($0.old, $0.new) })
        var expected: [MapExtent] = []
        for chunk in 0..<UInt64(301) {
            let start = chunk * 1024
            let n = min(1024, UInt64(Self.originSize) - start)
            if let new = copies[chunk] {
                expected.appendMerging(MapExtent(start: start, length: n, depth: 0, present: true, zero: false, data: true, offset: new * 1024))
            } else {
                let hole = start >= data
                expected.appendMerging(MapExtent(start: start, length: n, depth: 0, present: true, zero: hole, data: !hole, offset: start))
            }
        }
        #expect(try device.status() == expected)
        #expect(try device.status(at: 10 * 1024 + 5, length: 3000).first?.start == 10 * 1024 + 5)
        let allocated = expected.filter { $0.data && !$0.zero }.reduce(0) { $0 + $1.length }
        #expect(try device.allocatedBytes() == allocated)
        #expect(allocated > UInt64(data))
    }

    @Test(arguments: hostile)
    func hostileStoresAreRefusedWithWhatAndWhere(_ test: Hostile) throws {
        let scratch = try Scratch()
        let fixture = try Fixture(scratch, store: test.store, originSize: test.originSize)
        #expect(throws: test.error) {
            try ClassicSnapshotDevice(origin: fixture.originDevice, cow: fixture.cowDevice, name: snap)
        }
        #expect(test.error.description.hasPrefix("vg/snap: "))
    }

    /// A full-size table: 512-byte chunks (E = 32), 3971 areas in a 64 MiB COW. Full to the end it
    /// is refused at the COW's end; one record short it loads into one run per area.
    @Test func aTableAsLargeAsTheCowIsBounded() throws {
        let scratch = try Scratch()
        let areas = 3971
        let chunks = 1 + areas * 33
        let full = StoreImage(chunkSize: 512, chunks: chunks, records: allocated(Array(0..<UInt64(areas * 32)), chunkSize: 512), noise: false)
        try scratch.write("cow", full.bytes)
        try scratch.sh("truncate -s \(areas * 32 * 512) origin")
        let origin = RawImage(file: try HostFile(path: scratch.path("origin")))
        let cow = RawImage(file: try HostFile(path: scratch.path("cow")))
        #expect(throws: ExceptionStoreError.unterminated(snapshot: snap, offset: UInt64(chunks * 512))) {
            try ClassicSnapshotDevice(origin: origin, cow: cow, name: snap)
        }

        var short = full
        short.records.removeLast()
        var bytes = short.bytes
        bytes.replaceSubrange((chunks - 2) * 512..<(chunks - 1) * 512, with: repeated(0xEE, 512))   // the last copy
        try scratch.write("cow", bytes)
        let device = try ClassicSnapshotDevice(origin: origin, cow: RawImage(file: try HostFile(path: scratch.path("cow"))), name: snap)
        #expect(device.exceptionCount == areas * 32 - 1)
        #expect(device.runs.count == areas)
        let last = UInt64(areas * 32 - 2)
        #expect(try device.read(at: (last - 1) * 512, count: 1536) == repeated(0, 512) + repeated(0xEE, 512) + repeated(0, 512))
    }

    /// 1 GiB chunks (the kernel's largest) in sparse files: metadata is read in slices, never a
    /// chunk-sized buffer, and offsets past 4 GiB come out right.
    @Test func hugeChunksAreReadInSlices() throws {
        let scratch = try Scratch()
        let gib: UInt64 = 1 << 30
        try scratch.sh("truncate -s \(3 * gib) cow && truncate -s \(5 * gib + 300) origin")
        let cowFile = try HostFile(path: scratch.path("cow"), writable: true)
        let originFile = try HostFile(path: scratch.path("origin"), writable: true)
        try cowFile.write([0x53, 0x6E, 0x41, 0x70, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0x20, 0], at: 0)
        // Area 0 at 1 GiB: origin chunk 4 is in COW chunk 2.
        try cowFile.write([4, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0], at: gib)
        try cowFile.write([UInt8](repeating: 0xC0, count: 100), at: 2 * gib + 50)
        try originFile.write([UInt8](repeating: 0x0A, count: 100), at: 4 * gib + 50)
        try originFile.write([UInt8](repeating: 0x0B, count: 100), at: 3 * gib + 50)
        let device = try ClassicSnapshotDevice(origin: RawImage(file: originFile), cow: RawImage(file: cowFile), name: snap)
        #expect(device.chunkSize == gib)
        #expect(device.exceptionCount == 1)
        #expect(try device.read(at: 4 * gib + 40, count: 120) == repeated(0, 10) + repeated(0xC0, 100) + repeated(0, 10))
        #expect(try device.read(at: 3 * gib + 50, count: 100) == repeated(0x0B, 100))
        #expect(try device.read(at: 5 * gib + 290, count: 20) == repeated(0, 10))
    }

    @Test func manyThreadsReadOneTable() throws {
        let scratch = try Scratch()
        let store = Self.mixedStore()
        let fixture = try Fixture(scratch, store: store, originSize: Self.originSize)
        let device = try ClassicSnapshotDevice(origin: fixture.originDevice, cow: fixture.cowDevice, name: snap)
        let expected = fixture.expected(store)
        let wrong = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 8) { thread in
            var random = SplitMix(seed: UInt64(thread))
            for _ in 0..<100 {
                let at = Int(random.next() % UInt64(expected.count))
                let n = Int(random.next() % UInt64(min(20_000, expected.count - at))) + 1
                if (try? device.read(at: UInt64(at), count: n)) != Array(expected[at..<at + n]) {
                    wrong.add(1, ordering: .relaxed)
                }
            }
        }
        #expect(wrong.load(ordering: .relaxed) == 0)
    }
}

private func repeated(_ byte: UInt8, _ count: Int) -> [UInt8] { [UInt8](repeating: byte, count: count) }
