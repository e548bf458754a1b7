import Foundation
import Block
import Synchronization
import TestSupport
import Testing

/// Random writes into real images of every layout, the same writes applied to a plain buffer:
/// afterwards `qemu-img check` must find nothing wrong, `qemu-img compare` must match the buffer,
/// and every snapshot must read as before.
@Suite("qcow2 writes")
struct WriterTests {
    typealias Case = ImageCase
    static let data = ImageCase.data
    static let moreData = "qemu-io -c 'write -P 0x33 512k 1M' -c 'write -P 0x44 3M 64k' img.qcow2 >/dev/null"

    static let cases: [Case] = [
        Case(name: "64k clusters", setup: "qemu-img create -q -f qcow2 img.qcow2 4M && \(data)"),
        Case(name: "snapshots share clusters and L2 tables",
             setup: "qemu-img create -q -f qcow2 img.qcow2 4M && \(data) && qemu-img snapshot -c one img.qcow2 && \(moreData) && qemu-img snapshot -c two img.qcow2"),
        Case(name: "refcount_bits=1", setup: "qemu-img create -q -f qcow2 -o cluster_size=4k,refcount_bits=1 img.qcow2 4M && \(data)"),
        Case(name: "refcount_bits=2", setup: "qemu-img create -q -f qcow2 -o cluster_size=4k,refcount_bits=2 img.qcow2 4M && \(data) && qemu-img snapshot -c one img.qcow2"),
        Case(name: "refcount_bits=4", setup: "qemu-img create -q -f qcow2 -o cluster_size=4k,refcount_bits=4 img.qcow2 4M && \(data) && qemu-img snapshot -c one img.qcow2"),
        Case(name: "refcount_bits=8", setup: "qemu-img create -q -f qcow2 -o cluster_size=4k,refcount_bits=8 img.qcow2 4M && \(data) && qemu-img snapshot -c one img.qcow2"),
        Case(name: "refcount_bits=32", setup: "qemu-img create -q -f qcow2 -o cluster_size=4k,refcount_bits=32 img.qcow2 4M && \(data) && qemu-img snapshot -c one img.qcow2"),
        Case(name: "refcount_bits=64, 512-byte clusters: the refcount table grows",
             setup: "qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 img.qcow2 4M && \(data) && qemu-img snapshot -c one img.qcow2"),
        Case(name: "compressed clusters",
             setup: "qemu-img create -q -f qcow2 src.qcow2 4M && qemu-io -c 'write -P 0x55 0 3M' src.qcow2 >/dev/null && qemu-img convert -c -O qcow2 -o cluster_size=4k src.qcow2 img.qcow2"),
        Case(name: "backing chain, partial clusters",
             setup: "qemu-img create -q -f qcow2 base.qcow2 4M && qemu-io -c 'write -P 0x66 0 4M' base.qcow2 >/dev/null && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2 && qemu-io -c 'write -P 0x77 100k 10k' img.qcow2 >/dev/null"),
        Case(name: "extended L2 over a backing file: subclusters",
             setup: "qemu-img create -q -f qcow2 base.qcow2 4M && qemu-io -c 'write -P 0x66 0 4M' base.qcow2 >/dev/null && qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k -b base.qcow2 -F qcow2 img.qcow2 && qemu-io -c 'write -P 0x77 4k 2k' -c 'write -z 70k 6k' img.qcow2 >/dev/null"),
        Case(name: "version 2 over a backing file",
             setup: "qemu-img create -q -f qcow2 -o compat=0.10 base.qcow2 4M && qemu-io -c 'write -P 0x66 0 4M' base.qcow2 >/dev/null && qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 img.qcow2 && qemu-img snapshot -c one img.qcow2"),
        Case(name: "lazy refcounts", setup: "qemu-img create -q -f qcow2 -o lazy_refcounts=on img.qcow2 4M && \(data)"),
        Case(name: "preallocated metadata", setup: "qemu-img create -q -f qcow2 -o preallocation=metadata img.qcow2 4M && \(data)"),
        Case(name: "external raw data file",
             setup: "qemu-img create -q -f qcow2 -o data_file=img.data,data_file_raw=on img.qcow2 4M && \(data)"),
        Case(name: "external data file",
             setup: "qemu-img create -q -f qcow2 -o data_file=img.data img.qcow2 4M && \(data)"),
    ]

    @Test("random writes leave a clean image with the expected content", arguments: cases)
    func randomWrites(_ c: Case) throws {
        let scratch = try Scratch()
        try scratch.sh(c.setup)
        let snapshots = try snapshotContents(scratch)
        try scratch.sh("qemu-img convert -O raw img.qcow2 before.raw")
        var expected = try scratch.bytes("before.raw")
        let size = UInt64(expected.count)

        // A small cache, so that tables are evicted and reread while unwritten changes exist.
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 256 << 10), writable: true)
        let writer = try image.makeWriter()
        var rng = SplitMix(seed: UInt64(c.name.utf8.count) &* 31 &+ 7)
        for step in 0..<160 {
            let aligned = Bool.random(using: &rng)
            var offset = UInt64.random(in: 0..<size, using: &rng)
            var length = UInt64.random(in: 1...(300 << 10), using: &rng)
            if aligned {
                offset &= ~UInt64(0xffff)
                length = (length + 0xffff) & ~UInt64(0xffff)
            }
            length = min(length, size - offset)
            switch step % 10 {
            case 0...5:
                let byte = UInt8.random(in: 1...255, using: &rng)
                var bytes = [UInt8](repeating: byte, count: Int(length))
                for i in stride(from: 0, to: bytes.count, by: 4093) { bytes[i] = UInt8(truncatingIfNeeded: i) }
                try bytes.withUnsafeBytes { try writer.write($0, at: offset) }
                expected.replaceSubrange(Int(offset)..<Int(offset + length), with: bytes)
            case 6:
                let zeros = [UInt8](repeating: 0, count: Int(length))
                try zeros.withUnsafeBytes { try writer.write($0, at: offset) }
                expected.replaceSubrange(Int(offset)..<Int(offset + length), with: zeros)
            case 7:
                try writer.zero(at: offset, length: length)
                expected.replaceSubrange(Int(offset)..<Int(offset + length), with: [UInt8](repeating: 0, count: Int(length)))
            case 8:
                try writer.flush()
            default:
                let got = try image.live.read(at: offset, count: Int(length))
                #expect(got[...] == expected[Int(offset)..<Int(offset + length)], "\(c.name): read-back at \(offset) after step \(step)")
            }
        }
        try scratch.write("expected.raw", expected)
        try Oracle.expectSame(image.live, as: scratch.path("expected.raw"), "\(c.name): before close")
        try writer.close()

        try scratch.sh("qemu-img check img.qcow2")
        try scratch.sh("qemu-img compare -f qcow2 -F raw img.qcow2 expected.raw")
        let reopened = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 1 << 20))
        try Oracle.expectSame(reopened.live, as: scratch.path("expected.raw"), "\(c.name): reopened")
        #expect(try snapshotContents(scratch) == snapshots, "\(c.name): a snapshot changed")
        if c.setup.contains("data_file_raw") {
            try scratch.sh("cmp img.data expected.raw")
        }
    }

    static let powerLossImages = [
        "qemu-img create -q -f qcow2 -o cluster_size=4k img.qcow2 2M && qemu-io -c 'write -P 1 0 1M' img.qcow2 >/dev/null && qemu-img snapshot -c s img.qcow2 && qemu-io -c 'write -c -P 3 1536k 4k' img.qcow2 >/dev/null",
        "qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 img.qcow2 2M && qemu-io -c 'write -P 1 0 256k' img.qcow2 >/dev/null",
    ]

    /// A power loss keeps what was written before the last completed fdatasync and any part of
    /// what was written after it. Each change the writer makes is recorded; then, for every
    /// barrier, the image as it would be found with none and with a random half of the later
    /// writes must pass `qemu-img check` (leaks allowed, nothing else), and at the barrier that
    /// ends a flush it must hold exactly what was written before that flush.
    @Test("a power loss at any barrier leaves a consistent image with every flushed write",
          arguments: powerLossImages.indices)
    func powerLossAtEveryBarrier(_ which: Int) throws {
        let scratch = try Scratch()
        try scratch.sh(Self.powerLossImages[which])
        try scratch.sh("qemu-img convert -O raw img.qcow2 before.raw")
        var expected = try scratch.bytes("before.raw")
        let initial = try scratch.bytes("img.qcow2")
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 64 << 10), writable: true)
        let changes = Mutex<[HostFile.Change]>([])
        image.hostFiles[0].observeChanges { change in changes.withLock { $0.append(change) } }
        let writer = try image.makeWriter()
        var flushed: [(barriers: Int, content: [UInt8])] = []
        var rng = SplitMix(seed: UInt64(which) + 99)
        let size = UInt64(expected.count)
        for step in 0..<60 {
            let offset = UInt64.random(in: 0..<size, using: &rng)
            let length = min(UInt64.random(in: 1...24_000, using: &rng), size - offset)
            let range = Int(offset)..<Int(offset + length)
            switch UInt64.random(in: 0..<10, using: &rng) {
            case 0...5:
                let bytes = [UInt8](repeating: UInt8(step + 10), count: Int(length))
                try bytes.withUnsafeBytes { try writer.write($0, at: offset) }
                expected.replaceSubrange(range, with: bytes)
            case 6:
                try writer.zero(at: offset, length: length)
                expected.replaceSubrange(range, with: [UInt8](repeating: 0, count: range.count))
            default:
                try writer.flush()
                flushed.append((changes.withLock { log in log.filter { if case .barrier = $0 { true } else { false } }.count }, expected))
            }
        }
        try writer.close()
        let crash = PowerLoss(initial: initial, log: changes.withLock { $0 })
        let barriers = crash.barriers(end: false)
        #expect(barriers.count > 10, "the workload made only \(barriers.count) barriers")
        try crash.replay(at: barriers, trials: 2, rng: &rng) { k, trial, state in
            try scratch.write("crash.qcow2", state)
            do {
                try scratch.sh("qemu-img check crash.qcow2")
            } catch let error as ShellError {
                #expect(error.status == 3 && !error.output.contains("ERROR"),
                        "power loss after barrier \(k + 1) of \(barriers.count), trial \(trial): \(error.output.prefix(400))")
                if !(error.status == 3) { return false }
            }
            if trial == 0, let ack = flushed.last(where: { $0.barriers == k + 1 }) {
                try scratch.write("ack.raw", ack.content)
                #expect(throws: Never.self, "after barrier \(k + 1), the flushed content is not all there") {
                    try scratch.sh("qemu-img compare -q -f qcow2 -F raw crash.qcow2 ack.raw")
                }
            }
            return true
        }
    }

    /// The checksum of every snapshot, each read from a reverted copy by qemu-img.
    func snapshotContents(_ scratch: Scratch) throws -> [String] {
        let list = try scratch.sh("qemu-img snapshot -l img.qcow2 | awk 'NR > 2 { print $1 }'")
        return try list.split(separator: "\n").map { id in
            try scratch.sh("cp img.qcow2 copy.qcow2 && qemu-img snapshot -a \(id) copy.qcow2 && qemu-img convert -O raw copy.qcow2 copy.raw && md5sum < copy.raw && rm copy.qcow2 copy.raw")
        }
    }

    @Test("threads reading their own writes while others write and flush, through a tiny cache")
    func readsSeeWritesUnderConcurrency() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 -o cluster_size=4k img.qcow2 8M && qemu-io -c 'write -P 1 0 8M' img.qcow2 >/dev/null && qemu-img snapshot -c s img.qcow2")
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 64 << 10), writable: true)
        let writer = try image.makeWriter()
        let failures = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 4) { worker in
            var rng = SplitMix(seed: UInt64(worker + 1))
            let region = UInt64(worker) * (2 << 20)
            for step in 0..<200 {
                let offset = region + UInt64.random(in: 0..<(2 << 20) - 20000, using: &rng)
                let bytes = [UInt8](repeating: UInt8(step % 250 + 2), count: Int.random(in: 1...20000, using: &rng))
                do {
                    try bytes.withUnsafeBytes { try writer.write($0, at: offset) }
                    if step % 17 == worker { try writer.flush() }
                    let got = try image.live.read(at: offset, count: bytes.count)
                    if got != bytes { failures.withLock { $0.append("worker \(worker) step \(step): read differs from its write at \(offset)") } }
                } catch {
                    failures.withLock { $0.append("worker \(worker) step \(step): \(error)") }
                }
            }
        }
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0.prefix(5) })")
        try writer.close()
        try scratch.sh("qemu-img check img.qcow2")
    }

    /// Found by the soak: zeros where no L2 table exists yet get a new table at the end of the file
    /// and write nothing else, so until a flush the table lies past the file's end; reads must
    /// take it from the writer, not refuse it as corrupt.
    @Test("zeros that need a new L2 table read back before the table is written")
    func zerosInANewTableReadBack() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 -o cluster_size=512 img.qcow2 1M && qemu-io -c 'write -P 7 0 4k' img.qcow2 >/dev/null")
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 64 << 10), writable: true)
        let writer = try image.makeWriter()
        try writer.zero(at: 512 << 10, length: 4096)
        try [UInt8](repeating: 0, count: 1024).withUnsafeBytes { try writer.write($0, at: 768 << 10) }
        #expect(try image.live.read(at: 512 << 10, count: 4096) == [UInt8](repeating: 0, count: 4096))
        #expect(try image.live.read(at: 768 << 10, count: 1024) == [UInt8](repeating: 0, count: 1024))
        try writer.close()
        try scratch.sh("qemu-img check img.qcow2")
    }

    /// Hostile images: the live state claims metadata as its own (COPIED, refcount 1).
    static let hostile: [(String, @Sendable (_ l1: UInt64, _ l2: UInt64, _ refcountTable: UInt64) -> (at: UInt64, value: UInt64))] = [
        ("a data cluster that is the L1 table", { l1, l2, _ in (l2, l1 | 1 << 63) }),
        ("an L2 table that is the refcount table", { l1, _, refcountTable in (l1, refcountTable | 1 << 63) }),
    ]

    @Test("a write that finds corruption fails, marks the image corrupt and changes nothing else",
          arguments: hostile.indices)
    func corruptionIsReported(_ which: Int) throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 img.qcow2 4M && qemu-io -c 'write -P 1 0 128k' img.qcow2 >/dev/null")
        var file = try scratch.bytes("img.qcow2")
        let be = { (at: Int) in file[at..<at + 8].reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
        let l1 = be(40)
        let l2 = be(Int(l1)) & 0x00ff_ffff_ffff_fe00
        let refcountTable = be(48)
        let (at, value) = Self.hostile[which].1(l1, l2, refcountTable)
        for i in 0..<8 { file[Int(at) + i] = UInt8(truncatingIfNeeded: value >> UInt64(56 - 8 * i)) }
        try scratch.write("img.qcow2", file)
        let metadata = [l1, refcountTable].map { file[Int($0)..<Int($0) + 4096] }

        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 1 << 20), writable: true)
        let writer = try image.makeWriter()
        let bytes = [UInt8](repeating: 9, count: 4096)
        #expect(throws: Qcow2Error.self) { try bytes.withUnsafeBytes { try writer.write($0, at: 0) } }
        // Refused from then on, also where the image is sound.
        #expect(throws: Qcow2Error.self) { try bytes.withUnsafeBytes { try writer.write($0, at: 3 << 20) } }
        try? writer.close()
        let after = try scratch.bytes("img.qcow2")
        let untouched = [l1, refcountTable].map { after[Int($0)..<Int($0) + 4096] } == metadata
        #expect(untouched, "\(Self.hostile[which].0): the L1 or refcount table was overwritten")
        let info = try scratch.sh("qemu-img info -U img.qcow2")
        #expect(info.contains("corrupt: true"), "not marked corrupt:\n\(info)")
        #expect(throws: Qcow2Error.self) {
            _ = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 1 << 20), writable: true).makeWriter()
        }
    }

    @Test("an image left dirty (lazy refcounts) is not written before a repair")
    func dirtyImageRefused() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on img.qcow2 4M")
        var file = try scratch.bytes("img.qcow2")
        file[79] |= 1  // incompatible feature bit 0: dirty
        try scratch.write("img.qcow2", file)
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 1 << 20), writable: true)
        #expect(throws: Qcow2Error.self) { _ = try image.makeWriter() }
        #expect(try scratch.bytes("img.qcow2") == file)
    }

    @Test("while a writer is open, the image is dirty with lazy refcounts and clean after close")
    func dirtyBitLifecycle() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on img.qcow2 4M")
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 1 << 20), writable: true)
        let writer = try image.makeWriter()
        try [UInt8](repeating: 3, count: 70000).withUnsafeBytes { try writer.write($0, at: 5000) }
        #expect(try scratch.bytes("img.qcow2")[79] & 1 == 1, "dirty bit not set while writing")
        try writer.close()
        #expect(try scratch.bytes("img.qcow2")[79] & 1 == 0, "dirty bit left set")
        try scratch.sh("qemu-img check img.qcow2")
    }
}
