#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Foundation
@testable import Pools
import Block
import Synchronization
import TestSupport
import Testing

@Suite("iSCSI pools", .serialized)
struct ISCSITests {
    /// Random bytes in a file of the scratch directory.
    static func randomFile(_ scratch: Scratch, _ name: String, size: Int, seed: UInt64) throws -> [UInt8] {
        var rng = SplitMix(seed: seed)
        var bytes = [UInt8](repeating: 0, count: size)
        for i in stride(from: 0, to: size, by: 8) {
            withUnsafeBytes(of: rng.next()) { word in for j in 0..<min(8, size - i) { bytes[i + j] = word[j] } }
        }
        try scratch.write(name, bytes)
        return bytes
    }

    @Test func lunsReadAsTheirFiles() throws {
        let scratch = try Scratch()
        // Sizes in whole 512-byte blocks, not whole MiB.
        let one = try Self.randomFile(scratch, "one.raw", size: 3 << 20 + 7 * 512, seed: 1)
        let two = try Self.randomFile(scratch, "two.raw", size: 5 << 20 + 4096, seed: 2)
        try scratch.sh("qemu-img create -q -f qcow2 img.qcow2 4M && qemu-io -c 'write -P 0x5a 1M 512K' -c 'write -P 0x11 3M 4K' img.qcow2 >/dev/null && qemu-img convert -O raw img.qcow2 three.raw")
        let three = try scratch.bytes("three.raw")
        let target = try TestTarget(scratch: scratch)
        defer { target.stop() }
        try target.define(luns: ["one.raw", "two.raw", "three.raw"])
        let pool = try ISCSIPool(url: target.url, options: .init())
        // LUN 0 (tgtd's controller) is not a disk.
        #expect(try pool.volumeNames() == ["unit:0:0:1", "unit:0:0:2", "unit:0:0:3"])
        for (name, bytes) in [("unit:0:0:1", one), ("unit:0:0:2", two), ("unit:0:0:3", three)] {
            let volume = try #require(pool.volume(name))
            #expect(volume.path == nil)
            #expect(UInt64(volume.status.st_size) == UInt64(bytes.count))
            #expect(volume.status.st_mode == S_IFREG | 0o444)
            let image = try pool.openImage(name, volume: volume, cache: BlockCache(capacityBytes: 1 << 20))
            #expect(image.virtualSize == UInt64(bytes.count))
            #expect(try image.live.read(at: 0, count: bytes.count) == bytes, "\(name)")
        }
        #expect(try pool.volume("unit:0:0:1")?.status.st_ino == 2)
        #expect(pool.volume("unit:0:0:0") == nil)

        // Many unaligned reads at once, from several threads.
        let device = try pool.device("unit:0:0:2")
        let mismatches = Atomic<Int>(0)
        let errors = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 8) { thread in
            var rng = SplitMix(seed: UInt64(100 + thread))
            for _ in 0..<60 {
                let offset = Int(rng.next() % UInt64(two.count))
                let length = min(two.count - offset, 1 + Int(rng.next() % (700 << 10)))
                do {
                    if try device.read(at: UInt64(offset), count: length) != Array(two[offset..<offset + length]) {
                        mismatches.add(1, ordering: .relaxed)
                    }
                } catch { errors.add(1, ordering: .relaxed) }
            }
        }
        #expect(mismatches.load(ordering: .relaxed) == 0)
        #expect(errors.load(ordering: .relaxed) == 0)
    }

    @Test func throughput() throws {
        let scratch = try Scratch()
        let size = 64 << 20
        _ = try Self.randomFile(scratch, "big.raw", size: size, seed: 9)
        let target = try TestTarget(scratch: scratch)
        defer { target.stop() }
        try target.define(luns: ["big.raw"])
        let pool = try ISCSIPool(url: target.url, options: .init())
        let device = try pool.device("unit:0:0:1")
        // One thread, 128 KiB reads (what FUSE sends without readahead), then 1 MiB reads (split
        // into concurrent chunks), then 4 threads of 128 KiB reads.
        for (label, request, threads) in [("1 thread, 128 KiB", 128 << 10, 1), ("1 thread, 1 MiB", 1 << 20, 1), ("4 threads, 128 KiB", 128 << 10, 4)] {
            let start = monotonicNow()
            DispatchQueue.concurrentPerform(iterations: threads) { t in
                var buffer = [UInt8](repeating: 0, count: request)
                var offset = t * request
                while offset < size {
                    _ = try? buffer.withUnsafeMutableBytes { try device.read(into: $0, at: UInt64(offset)) }
                    offset += request * threads
                }
            }
            let seconds = monotonicNow() - start
            print("iSCSI read throughput, \(label): \(Int(Double(size) / seconds / 1e6)) MB/s")
        }
    }

    @Test func addedLunShows() throws {
        let scratch = try Scratch()
        _ = try Self.randomFile(scratch, "one.raw", size: 1 << 20, seed: 3)
        let four = try Self.randomFile(scratch, "four.raw", size: 2 << 20 + 512, seed: 4)
        let target = try TestTarget(scratch: scratch)
        defer { target.stop() }
        try target.define(luns: ["one.raw"])
        let pool = try ISCSIPool(url: target.url, options: .init())
        #expect(try pool.volumeNames() == ["unit:0:0:1"])
        try target.addLun(4, file: "four.raw")
        let start = monotonicNow()
        while try !pool.volumeNames().contains("unit:0:0:4") {
            #expect(monotonicNow() - start < 2.5, "LUN 4 did not show")
            if monotonicNow() - start > 3 { return }
            usleep(100_000)
        }
        let device = try pool.device("unit:0:0:4")
        #expect(try device.read(at: 0, count: four.count) == four)
    }

    @Test func targetThatGoesAwayFailsWithinBoundAndComesBack() throws {
        let scratch = try Scratch()
        let one = try Self.randomFile(scratch, "one.raw", size: 1 << 20, seed: 5)
        let target = try TestTarget(scratch: scratch)
        defer { target.stop() }
        try target.define(luns: ["one.raw"])
        let pool = try ISCSIPool(url: target.url, options: .init())
        let device = try pool.device("unit:0:0:1")
        #expect(try device.read(at: 0, count: 4096) == Array(one[0..<4096]))

        target.stop()
        let start = monotonicNow()
        #expect(throws: (any Error).self) { try device.read(at: 8192, count: 4096) }
        let failedAfter = monotonicNow() - start
        print("iSCSI read with the target gone failed after \(failedAfter) s")
        #expect(failedAfter < 15)

        try target.start()
        try target.define(luns: ["one.raw"])
        #expect(try device.read(at: 65536, count: 100_000) == Array(one[65536..<165_536]))
    }

    @Test func hungTargetFailsWithinBound() throws {
        let scratch = try Scratch()
        _ = try Self.randomFile(scratch, "one.raw", size: 1 << 20, seed: 6)
        let target = try TestTarget(scratch: scratch)
        defer { target.stop() }
        try target.define(luns: ["one.raw"])
        let pool = try ISCSIPool(url: target.url, options: .init())
        let device = try pool.device("unit:0:0:1")
        _ = try device.read(at: 0, count: 512)
        // A target that stops answering but keeps its connections: only timeouts end the wait.
        let pid = try #require(target.pid)
        kill(pid, SIGSTOP)
        defer { kill(pid, SIGCONT) }
        let start = monotonicNow()
        #expect(throws: (any Error).self) { try device.read(at: 8192, count: 4096) }
        let failedAfter = monotonicNow() - start
        print("iSCSI read with the target stopped failed after \(failedAfter) s")
        #expect(failedAfter < 15)
        kill(pid, SIGCONT)
        #expect(try device.read(at: 0, count: 512).count == 512)
    }

    @Test func chapAndWrongTarget() throws {
        let scratch = try Scratch()
        _ = try Self.randomFile(scratch, "one.raw", size: 1 << 20, seed: 7)
        let target = try TestTarget(scratch: scratch)
        defer { target.stop() }
        try target.define(luns: ["one.raw"])
        try target.requireCHAP(user: "alice", password: "s3cretpassw0rd")
        let good = try ISCSIPool(url: target.url, options: .init(chapUser: "alice", chapSecret: "s3cretpassw0rd"))
        #expect(try good.volumeNames() == ["unit:0:0:1"])
        do {
            _ = try ISCSIPool(url: target.url, options: .init(chapUser: "alice", chapSecret: "wrong"))
            Issue.record("a wrong CHAP secret logged in")
        } catch let error as ISCSIError {
            guard case .login = error else { Issue.record("\(error)"); return }
            print("wrong CHAP: \(error)")
        }
        do {
            _ = try ISCSIPool(url: target.url, options: .init())
            Issue.record("no CHAP logged in to a CHAP target")
        } catch let error as ISCSIError {
            print("no CHAP: \(error)")
        }
        do {
            _ = try ISCSIPool(url: "iscsi://127.0.0.1:\(target.port)/iqn.2026-01.org.poolfs.test:nosuch", options: .init())
            Issue.record("a wrong IQN logged in")
        } catch let error as ISCSIError {
            print("wrong IQN: \(error)")
            #expect("\(error)".contains("nosuch"))
        }
        let refused = try TestTarget.freePort()
        do {
            _ = try ISCSIPool(url: "iscsi://127.0.0.1:\(refused)/\(TestTarget.iqn)", options: .init())
            Issue.record("a refused connection logged in")
        } catch let error as ISCSIError {
            print("refused: \(error)")
        }
    }

    @Test func writerWritesTheLun() throws {
        let scratch = try Scratch()
        var bytes = try Self.randomFile(scratch, "one.raw", size: 2 << 20, seed: 8)
        let target = try TestTarget(scratch: scratch)
        defer { target.stop() }
        try target.define(luns: ["one.raw"])
        let pool = try ISCSIPool(url: target.url, options: .init(writable: true))
        let volume = try #require(pool.volume("unit:0:0:1"))
        #expect(volume.status.st_mode == S_IFREG | 0o644)
        let image = try pool.openWritableImage("unit:0:0:1", volume: volume, cache: BlockCache(capacityBytes: 1 << 20))
        let writer = try pool.makeWriter("unit:0:0:1", image: image)
        // Aligned, unaligned within one block, unaligned across blocks and chunks.
        for (offset, length, fill) in [(0, 4096, UInt8(0xaa)), (1000, 10, 0xbb), (70_000, 1_300_000, 0xcc)] {
            let data = [UInt8](repeating: fill, count: length)
            try data.withUnsafeBytes { try writer.write($0, at: UInt64(offset)) }
            bytes.replaceSubrange(offset..<offset + length, with: data)
        }
        try writer.zero(at: 1_500_000, length: 200_001)
        bytes.replaceSubrange(1_500_000..<1_700_001, with: [UInt8](repeating: 0, count: 200_001))
        try writer.flush()
        #expect(try image.live.read(at: 0, count: bytes.count) == bytes)
        try writer.close()
        #expect(try scratch.bytes("one.raw") == bytes)
        // Read-only pools refuse.
        let readOnly = try ISCSIPool(url: target.url, options: .init())
        #expect(throws: (any Error).self) { try readOnly.openWritableImage("unit:0:0:1", volume: volume, cache: BlockCache(capacityBytes: 1 << 20)) }
    }

    @Test func allocationFromGetLBAStatus() throws {
        let scratch = try Scratch()
        try scratch.sh("truncate -s 8M sparse.raw && printf 'data' | dd of=sparse.raw bs=1 seek=3000000 conv=notrunc 2>/dev/null && dd if=/dev/urandom of=sparse.raw bs=64K seek=100 count=2 conv=notrunc 2>/dev/null")
        let target = try TestTarget(scratch: scratch)
        defer { target.stop() }
        try target.define(luns: ["sparse.raw"], thin: true)
        let pool = try ISCSIPool(url: target.url, options: .init())
        let device = try pool.device("unit:0:0:1")
        #expect(device.thinProvisioned)
        let extents = try device.status()
        print("GET LBA STATUS extents: \(extents)")
        let file = try HostFile(path: scratch.path("sparse.raw"))
        var expected: [MapExtent] = []
        appendHostStatus(file, guest: 0, host: 0, length: file.size, depth: 0, holeIsData: false, into: &expected)
        #expect(extents.map { [$0.start, $0.length, $0.data ? 1 : 0] } == expected.map { [$0.start, $0.length, $0.data ? 1 : 0] })
        // Without thin provisioning the whole LUN is data.
        let plain = try TestTarget(scratch: scratch)
        defer { plain.stop() }
        try plain.define(luns: ["sparse.raw"])
        let whole = try ISCSIPool(url: plain.url, options: .init()).device("unit:0:0:1")
        #expect(try whole.status().map(\.data) == [true])
    }

    @Test(arguments: [
        ("iscsi://host/iqn.a:b", "host", 3260, "iqn.a:b"),
        ("iscsi://10.0.0.1:3261/iqn.a:b/1", "10.0.0.1", 3261, "iqn.a:b"),
        ("iscsi://[::1]:3262/iqn.a:b", "::1", 3262, "iqn.a:b"),
    ])
    func urls(url: String, host: String, port: Int, target: String) throws {
        let parsed = try ISCSIPool.parse(url)
        #expect(parsed.host == host && parsed.port == port && parsed.target == target)
    }

    @Test func libvirtDefinition() throws {
        let xml = """
        <pool type='iscsi-direct'>
          <name>san</name>
          <source>
            <host name='192.0.2.5' port='3261'/>
            <device path='iqn.2026-01.example:disks'/>
            <initiator><iqn name='iqn.2026-01.example:host1'/></initiator>
            <auth type='chap' username='alice'><secret usage='libvirtiscsi'/></auth>
          </source>
        </pool>
        """
        #expect(try PoolSource.parseLibvirt(xml, file: "san.xml").type == "iscsi-direct")
        let parsed = try PoolSource.parseLibvirtISCSI(xml, file: "san.xml")
        #expect(parsed.url == "iscsi://192.0.2.5:3261/iqn.2026-01.example:disks")
        #expect(parsed.initiator == "iqn.2026-01.example:host1")
        #expect(parsed.chapUser == "alice")
    }
}
