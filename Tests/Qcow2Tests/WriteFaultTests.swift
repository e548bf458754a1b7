import Foundation
import Block
import Synchronization
import TestSupport
import Testing

/// Writes that fail under the writer: a disk that fills up, a barrier that fails. Running out of
/// space is not corruption: the write fails with ENOSPC, nothing is marked corrupt, the image
/// checks clean but for leaks, and once there is space again the same writer goes on.
@Suite("qcow2 writes that fail")
struct WriteFaultTests {
    /// 512-byte clusters and 64-bit refcounts: a refcount block covers 32 KiB of the file and the
    /// first refcount table 2 MiB. The file starts 34 KiB short of 2 MiB, so the workload allocates
    /// data clusters, L2 tables, refcount blocks and, about halfway, a new refcount table: the
    /// disk can fill up at any of them.
    static let setup = "qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 img.qcow2 4M && qemu-io -c 'write -P 1 0 1950k' img.qcow2 >/dev/null"
    static let steps = 40

    /// A disk that fills up: with `fullAt` set, the `fullAt`-th write that needs new space
    /// (past the end of the file, or into a hole) and every later one fail with ENOSPC until
    /// `freed`; writes over bytes already stored still succeed, as on a real filesystem.
    final class Disk: Sendable {
        struct State {
            var stored: Set<UInt64> = []  // 512-byte blocks written past the original end
            var needingSpace = 0
            var freed = false
        }
        let originalBlocks: UInt64
        let fullAt: Int?
        let state = Mutex(State())

        init(fileSize: UInt64, fullAt: Int?) {
            originalBlocks = (fileSize + 511) / 512
            self.fullAt = fullAt
        }

        func decide(_ change: HostFile.Change) -> Int32? {
            guard case .write(let offset, let bytes) = change, !bytes.isEmpty else { return nil }
            let blocks = offset / 512...(offset + UInt64(bytes.count) - 1) / 512
            return state.withLock { s in
                guard blocks.contains(where: { $0 >= originalBlocks && !s.stored.contains($0) }) else { return nil }
                defer { s.needingSpace += 1 }
                if let fullAt, s.needingSpace >= fullAt, !s.freed { return ENOSPC }
                s.stored.formUnion(blocks)
                return nil
            }
        }

        var writesNeedingSpace: Int { state.withLock { $0.needingSpace } }
        func free() { state.withLock { $0.freed = true } }
    }

    /// Runs the workload on a fresh copy, with the disk full from write `fullAt` on for six
    /// steps, closes the writer and checks that every byte written and not failed since reads
    /// back. Returns how many writes needed space before the close, and how many calls failed.
    static func run(_ scratch: Scratch, fullAt: Int?) throws -> (points: Int, failures: Int) {
        try scratch.sh("cp pristine.qcow2 img.qcow2")
        let size = 4 << 20
        var expected = try scratch.bytes("pristine.raw")
        var unknown: [Range<Int>] = []
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 64 << 10), writable: true)
        let disk = Disk(fileSize: image.hostFiles[0].size, fullAt: fullAt)
        image.hostFiles[0].injectFaults { disk.decide($0) }
        let writer = try image.makeWriter()
        var rng = SplitMix(seed: 2024)
        var failures = 0
        var fullSince: Int?
        for step in 0..<steps {
            if let since = fullSince, step - since >= 6 { disk.free() }
            let offset = Int.random(in: 0..<size, using: &rng)
            let length = min(Int.random(in: 1...4000, using: &rng), size - offset)
            let bytes = [UInt8](repeating: UInt8(step + 10), count: length)
            do {
                if step % 4 == 3 {
                    try writer.flush()
                } else {
                    try bytes.withUnsafeBytes { try writer.write($0, at: UInt64(offset)) }
                    expected.replaceSubrange(offset..<offset + length, with: bytes)
                    unknown = unknown.flatMap { $0.subtracting(offset..<offset + length) }
                }
            } catch Qcow2Error.io(ENOSPC, _, _) {
                failures += 1
                if fullSince == nil { fullSince = step }
                if step % 4 != 3 { unknown.append(offset..<offset + length) }
            }
            if fullSince == nil, fullAt != nil, disk.writesNeedingSpace > fullAt! { fullSince = step }
        }
        let points = disk.writesNeedingSpace
        disk.free()
        try writer.close()
        try scratch.sh("qemu-img convert -O raw img.qcow2 now.raw")
        // A failed write leaves its range unknown, unless a later write covered it.
        let now = try scratch.bytes("now.raw")
        var replayed = expected
        for range in unknown { replayed.replaceSubrange(range, with: now[range]) }
        #expect(Data(replayed) == Data(now), "full at write \(fullAt ?? -1): the image does not read as written")
        return (points, failures)
    }

    @Test("a disk that fills up at any write fails that write with ENOSPC, and only with leaks")
    func fullDiskAtEveryPoint() throws {
        let scratch = try Scratch()
        try scratch.sh("\(Self.setup) && cp img.qcow2 pristine.qcow2 && qemu-img convert -O raw img.qcow2 pristine.raw")
        let clean = try Self.run(scratch, fullAt: nil)
        let points = clean.points
        #expect(clean.failures == 0)
        // The workload moves the refcount table (its offset is the header's bytes 48-55).
        let header = try scratch.bytes("img.qcow2")
        #expect(header[48..<56] != [0, 0, 0, 0, 0, 0, 2, 0], "the refcount table did not move")
        #expect(points > 100, "only \(points) writes needed space")
        for fullAt in 0..<points {
            let run = try Self.run(scratch, fullAt: fullAt)
            #expect(run.failures > 0, "full at write \(fullAt): no write failed")
            do {
                try scratch.sh("qemu-img check img.qcow2")
            } catch let error as ShellError {
                // 3: leaked clusters only. Anything else is corruption.
                #expect(error.status == 3 && !error.output.contains("ERROR"), "full at write \(fullAt) of \(points): \(error.output.prefix(600))")
                if error.status != 3 { return }
            }
            let bytes = try scratch.bytes("img.qcow2")
            #expect(bytes[79] & 2 == 0, "full at write \(fullAt): the image was marked corrupt")
        }
    }

    /// After a failed fdatasync, Linux may have dropped the pages it could not write, and the
    /// next fdatasync succeeds without them: the writer stops rather than acknowledge writes it
    /// cannot vouch for, without marking the image corrupt; opened again, the image is written.
    @Test("a failed barrier stops the writer without marking the image corrupt")
    func failedBarrierStopsTheWriter() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 img.qcow2 4M")
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 1 << 20), writable: true)
        let failing = Atomic<Bool>(true)
        image.hostFiles[0].injectFaults { change in
            if case .barrier = change, failing.load(ordering: .relaxed) { return EIO }
            return nil
        }
        let writer = try image.makeWriter()
        let bytes = [UInt8](repeating: 7, count: 65536)
        try bytes.withUnsafeBytes { try writer.write($0, at: 0) }
        #expect(throws: Qcow2Error.io(errno: EIO, operation: "fdatasync", path: scratch.path("img.qcow2"))) { try writer.flush() }
        failing.store(false, ordering: .relaxed)
        #expect(throws: Qcow2Error.self, "a write after a failed barrier") { try bytes.withUnsafeBytes { try writer.write($0, at: 65536) } }
        #expect(throws: Qcow2Error.self, "a flush after a failed barrier") { try writer.flush() }
        try? writer.close()
        // Leaks at most: the cluster and L2 table the failed flush could not link.
        try scratch.sh("qemu-img check img.qcow2 >/dev/null || test $? = 3")
        let again = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 1 << 20), writable: true)
        let second = try again.makeWriter()
        try bytes.withUnsafeBytes { try second.write($0, at: 65536) }
        try second.close()
        try scratch.sh("(qemu-img check img.qcow2 >/dev/null || test $? = 3) && qemu-io -r -c 'read -P 7 64k 64k' img.qcow2 | grep -q 'read 65536'")
    }
}

extension Range where Bound == Int {
    /// What is left of this range outside `other`: none, one or two ranges.
    func subtracting(_ other: Range<Int>) -> [Range<Int>] {
        guard overlaps(other) else { return [self] }
        return [lowerBound..<other.lowerBound, other.upperBound..<upperBound].filter { !$0.isEmpty }
    }
}
