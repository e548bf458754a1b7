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

/// RBD pools against a one-node Ceph of the test's own, checked against `rbd export` and
/// `rbd diff`. Each test works in a namespace of its own.
@Suite("RBD pools", .enabled(if: CephCluster.available))
struct RBDTests {
    static func open(_ spec: String, _ cluster: CephCluster, writable: Bool = false, timeout: Double = 10, refresh: Double = 1) throws -> RBDPool {
        var options = RBDPool.Options(confFile: cluster.conf, writable: writable)
        options.timeout = timeout
        return try RBDPool(spec: spec, options: options, refresh: refresh)
    }

    static func data(_ extents: [MapExtent]) -> [Range<UInt64>] {
        var ranges: [Range<UInt64>] = []
        for e in extents where e.data && !e.zero {
            if let last = ranges.last, last.upperBound == e.start { ranges[ranges.count - 1] = last.lowerBound..<e.start + e.length }
            else { ranges.append(e.start..<e.start + e.length) }
        }
        return ranges
    }

    /// Images, snapshots and a clone read as `rbd export` says; allocation as `rbd diff`.
    @Test func imagesSnapshotsAndClonesReadAsTheirExports() throws {
        let cluster = try CephCluster.shared()
        let ns = try cluster.newNamespace()
        let s = cluster.scratch
        let file = "seed-\(UUID().uuidString)"
        // 9 MiB + 4 KiB of random data with a 3 MiB hole, in 4 MiB objects.
        try s.sh("head -c 3M /dev/urandom > \(file) && truncate -s 6M \(file) && head -c 3M /dev/urandom >> \(file) && head -c 4096 /dev/urandom >> \(file)")
        try cluster.makeSampleImages(in: ns, from: file)
        try cluster.rbd("create --size 20M \(ns)/empty")

        let pool = try Self.open(ns, cluster)
        defer { _ = pool.release() }
        #expect(try pool.volumeNames() == ["child", "disk", "empty"])
        for name in ["disk", "child", "empty"] {
            let volume = try #require(pool.volume(name))
            #expect(volume.status.st_mode == S_IFREG | 0o444)
            let image = try pool.openImage(name, volume: volume, cache: BlockCache(capacityBytes: 1 << 20))
            let expected = try cluster.export("\(ns)/\(name)")
            #expect(image.virtualSize == UInt64(expected.count))
            #expect(try image.live.read(at: 0, count: expected.count) == expected, "\(name)")
            #expect(Self.data(try image.live.status()) == (try cluster.diffRanges("\(ns)/\(name)")), "\(name)")
        }
        #expect(Set(pool.snapshots(of: "disk").map(\.name)) == ["before", "after"])
        for snapshot in pool.snapshots(of: "disk") {
            #expect(snapshot.date != nil && snapshot.date!.tv_sec > 1_700_000_000)
            let device = try snapshot.open()
            let expected = try cluster.export("\(ns)/disk@\(snapshot.name)")
            #expect(try device.read(at: 0, count: expected.count) == expected, "\(snapshot.name)")
            #expect(Self.data(try device.status()) == (try cluster.diffRanges("\(ns)/disk@\(snapshot.name)")), "\(snapshot.name)")
        }
        // The clone names its parent; librbd reads through it.
        let child = try pool.openImage("child", volume: try #require(pool.volume("child")), cache: BlockCache(capacityBytes: 1 << 20))
        #expect(child.chain.map(\.path) == ["rbd:\(ns)/child", "rbd:\(ns)/disk@after"])
        #expect(pool.properties(of: "child").contains { $0.key == "rbd.parent" && $0.value == "\(ns)/disk@after" })
        #expect(pool.volume("disk")?.status.st_ino != pool.volume("child")?.status.st_ino)
        // Unaligned reads across object boundaries, many at once.
        let expected = try cluster.export("\(ns)/disk")
        let disk = try pool.openImage("disk", volume: try #require(pool.volume("disk")), cache: BlockCache(capacityBytes: 1 << 20)).live
        let bad = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 8) { t in
            var rng = SplitMix(seed: UInt64(t + 1))
            for _ in 0..<20 {
                let offset = Int(rng.next() % UInt64(expected.count))
                let length = min(expected.count - offset, 1 + Int(rng.next() % (5 << 20)))
                if (try? disk.read(at: UInt64(offset), count: length)) != Array(expected[offset..<offset + length]) { bad.add(1, ordering: .relaxed) }
            }
        }
        #expect(bad.load(ordering: .relaxed) == 0)
    }

    /// More images than the handle cache holds can all be read, in turn.
    @Test func handleCacheIsBounded() throws {
        let cluster = try CephCluster.shared()
        let ns = try cluster.newNamespace()
        for i in 0..<6 { try cluster.rbd("create --size 1M \(ns)/i\(i) && rbd \(cluster.c) bench --io-type write --io-size 4K --io-total 4K \(ns)/i\(i) >/dev/null") }
        var options = RBDPool.Options(confFile: cluster.conf)
        options.handleCapacity = 2
        let pool = try RBDPool(spec: ns, options: options)
        defer { _ = pool.release() }
        for round in 0..<2 {
            for i in 0..<6 {
                let image = try pool.openImage("i\(i)", volume: try #require(pool.volume("i\(i)")), cache: BlockCache(capacityBytes: 1 << 20))
                #expect(try image.live.read(at: 0, count: 1 << 20) == (try cluster.export("\(ns)/i\(i)")), "round \(round) image \(i)")
            }
            #expect(pool.handles.count <= 2)
        }
    }

    /// Images and snapshots made or removed while the pool is open show within the refresh.
    @Test func changesShowWithinTheRefresh() throws {
        let cluster = try CephCluster.shared()
        let ns = try cluster.newNamespace()
        try cluster.rbd("create --size 4M \(ns)/a")
        let pool = try Self.open(ns, cluster, refresh: 0.3)
        defer { _ = pool.release() }
        let before = pool.generation(of: "a")
        try cluster.rbd("snap create \(ns)/a@s1 && rbd \(cluster.c) create --size 1M \(ns)/b")
        func eventually(_ condition: () throws -> Bool) rethrows -> Bool {
            for _ in 0..<30 { if try condition() { return true }; usleep(100_000) }
            return false
        }
        #expect(try eventually { try pool.volumeNames() == ["a", "b"] })
        #expect(eventually { pool.snapshots(of: "a").map(\.name) == ["s1"] })
        #expect(pool.generation(of: "a") != before)
        try cluster.rbd("snap rm \(ns)/a@s1 && rbd \(cluster.c) rm --no-progress \(ns)/b")
        #expect(try eventually { try pool.volumeNames() == ["a"] && pool.snapshots(of: "a").isEmpty })
        #expect(pool.volume("b") == nil)
    }

    /// A listing opens only the images that are new or changed, not every image each time; new,
    /// removed and resized images and new snapshots still show within a few refreshes.
    @Test func listingsOpenOnlyChangedImages() throws {
        let cluster = try CephCluster.shared()
        let ns = try cluster.newNamespace()
        let count = 16
        try cluster.rbd("create --size 1M \(ns)/i0; for i in $(seq 1 \(count - 1)); do rbd \(cluster.c) create --size 1M \(ns)/i$i || exit 1; done")
        let pool = try Self.open(ns, cluster, refresh: 0.2)
        defer { _ = pool.release() }
        let atMount = pool.cluster.opens
        #expect(atMount == count)
        // Listings over 2 s (about ten refreshes): the unchanged images are not opened again.
        let end = RefreshedValue<Bool>.now() + 2
        var listings = 0
        while RefreshedValue<Bool>.now() < end {
            #expect(try pool.volumeNames().count == count)
            listings += 1
            usleep(50_000)
        }
        #expect(pool.cluster.opens - atMount <= RBDPool.rereadBatch, "\(listings) listings")
        let before = pool.cluster.opens
        try cluster.rbd("resize --no-progress --size 3M \(ns)/i1 && rbd \(cluster.c) snap create \(ns)/i2@s1 && "
                        + "rbd \(cluster.c) create --size 2M \(ns)/new && rbd \(cluster.c) rm --no-progress \(ns)/i3")
        func eventually(_ condition: () throws -> Bool) rethrows -> Bool {
            for _ in 0..<30 { if try condition() { return true }; usleep(100_000) }
            return false
        }
        #expect(try eventually {
            let names = try pool.volumeNames()
            return names.contains("new") && !names.contains("i3") && names.count == count
        })
        #expect(eventually { pool.volume("i1")?.status.st_size == 3 << 20 })
        #expect(eventually { pool.snapshots(of: "i2").map(\.name) == ["s1"] })
        #expect(pool.volume("new")?.status.st_size == 2 << 20)
        #expect(pool.volume("i4")?.status.st_size == 1 << 20)
        // The three changed images, and perhaps one more of each for a listing caught midway.
        #expect(pool.cluster.opens - before <= 6)
    }

    /// `-o rw` writes reach the image; an image whose exclusive lock another client holds is in use.
    @Test func writesReachTheImageAndTheLockIsHonoured() throws {
        let cluster = try CephCluster.shared()
        let ns = try cluster.newNamespace()
        try cluster.rbd("create --size 8M \(ns)/w && rbd \(cluster.c) create --size 8M \(ns)/held")
        let pool = try Self.open(ns, cluster, writable: true)
        defer { _ = pool.release() }
        let volume = try #require(pool.volume("w"))
        #expect(volume.status.st_mode == S_IFREG | 0o644)
        do {
            let image = try pool.openWritableImage("w", volume: volume, cache: BlockCache(capacityBytes: 1 << 20))
            let writer = try pool.makeWriter("w", image: image)
            let data = (0..<(5 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 3) }
            try data.withUnsafeBytes { try writer.write($0, at: 1000) }
            try writer.zero(at: 2 << 20, length: 12345)
            try writer.flush()
            var expected = [UInt8](repeating: 0, count: 8 << 20)
            expected.replaceSubrange(1000..<1000 + data.count, with: data)
            expected.replaceSubrange((2 << 20)..<(2 << 20) + 12345, with: [UInt8](repeating: 0, count: 12345))
            #expect(try image.live.read(at: 0, count: 8 << 20) == expected)
            #expect(try cluster.export("\(ns)/w") == expected)
            try writer.close()
        }
        // A second client holds the lock, as a running VM does. (Its `exclusive=True` open
        // crashes python3-rbd 16.2 in a namespace; lock_acquire does the same.)
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        let ready = cluster.scratch.path("held-\(UUID().uuidString)")
        holder.arguments = ["-c", """
            import rados, rbd, time, sys
            c = rados.Rados(conffile=sys.argv[1]); c.connect()
            io = c.open_ioctx('\(CephCluster.pool)'); io.set_namespace('\(ns.split(separator: "/")[1])')
            img = rbd.Image(io, 'held')
            img.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
            img.write(b'x' * 512, 0)
            open(sys.argv[2], 'w').close()
            time.sleep(60)
            """, cluster.conf, ready]
        let log = cluster.scratch.path("holder-\(UUID().uuidString).log")
        FileManager.default.createFile(atPath: log, contents: nil)
        holder.standardError = FileHandle(forWritingAtPath: log)
        holder.standardOutput = FileHandle(forWritingAtPath: log)
        try holder.run()
        defer { kill(holder.processIdentifier, SIGKILL); holder.waitUntilExit() }
        for _ in 0..<100 where !FileManager.default.fileExists(atPath: ready) { usleep(100_000) }
        #expect(FileManager.default.fileExists(atPath: ready), "\((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
        let held = try #require(pool.volume("held"))
        #expect(throws: Qcow2Error.self) { try pool.openWritableImage("held", volume: held, cache: BlockCache(capacityBytes: 1 << 20)) }
        do {
            _ = try pool.openWritableImage("held", volume: held, cache: BlockCache(capacityBytes: 1 << 20))
        } catch let error as Qcow2Error {
            #expect(error.errno == EBUSY, "\(error)")
        }
        // Reading it stays possible.
        let image = try pool.openImage("held", volume: held, cache: BlockCache(capacityBytes: 1 << 20))
        #expect(try image.live.read(at: 0, count: 512) == [UInt8](repeating: UInt8(ascii: "x"), count: 512))
    }

    /// A cluster that stops answering fails reads within the bound; they work again after.
    @Test func frozenOSDFailsReadsInBoundedTimeThenRecovers() throws {
        let cluster = try CephCluster.own()
        defer { cluster.stop() }
        let ns = try cluster.newNamespace()
        try cluster.rbd("create --size 8M \(ns)/f && rbd \(cluster.c) bench --io-type write --io-size 1M --io-total 8M \(ns)/f >/dev/null")
        let pool = try Self.open(ns, cluster, timeout: 3)
        defer { _ = pool.release() }
        let device = try pool.openImage("f", volume: try #require(pool.volume("f")), cache: BlockCache(capacityBytes: 1 << 20)).live
        let expected = try cluster.export("\(ns)/f")
        #expect(try device.read(at: 0, count: 1 << 20) == Array(expected[0..<(1 << 20)]))
        cluster.pauseOSD()
        var resumed = false
        defer { if !resumed { cluster.resumeOSD() } }
        let start = RefreshedValue<Int>.now()
        var failure: (any Error)?
        do { _ = try device.read(at: 2 << 20, count: 3 << 20) } catch { failure = error }
        let took = RefreshedValue<Int>.now() - start
        #expect((failure as? Qcow2Error)?.errno == EIO, "\(String(describing: failure))")
        #expect(took < 6, "a read took \(took) s with the OSD frozen")
        cluster.resumeOSD()
        resumed = true
        var again: [UInt8]?
        for _ in 0..<40 where again == nil {
            again = try? device.read(at: 2 << 20, count: 3 << 20)
            if again == nil { usleep(250_000) }
        }
        #expect(again == Array(expected[(2 << 20)..<(5 << 20)]))
    }

    /// A monitor that is not there fails the open with one line, within the bound.
    @Test func unreachableMonitorFailsWithinTheBound() throws {
        let start = RefreshedValue<Int>.now()
        var options = RBDPool.Options(monHost: "127.0.0.1:\(try TestTarget.freePort())")
        options.timeout = 3
        options.confFile = "/dev/null"
        #expect { try RBDPool(spec: "P", options: options) } throws: { error in
            "\(error)".hasPrefix("rbd: cannot reach Ceph cluster at 127.0.0.1:") && !"\(error)".contains("\n")
        }
        #expect(RefreshedValue<Int>.now() - start < 8)
    }

    /// A libvirt `rbd` pool definition names the pool and its monitors.
    @Test func libvirtPoolNameOpensThePool() throws {
        let cluster = try CephCluster.shared()
        let ns = try cluster.newNamespace()
        try cluster.rbd("create --size 1M \(ns)/vm1")
        let scratch = try Scratch()
        try """
            <pool type='rbd'><name>ceph</name><source><name>\(ns)</name>
            <host name='127.0.0.1' port='\(cluster.port)'/><auth username='admin' type='ceph'><secret usage='x'/></auth>
            </source></pool>
            """.write(toFile: scratch.path("ceph.xml"), atomically: true, encoding: .utf8)
        // The conf says only that the test cluster has no auth; the monitor comes from the definition.
        try "[global]\nauth client required = none\nauth cluster required = none\nauth service required = none\n"
            .write(toFile: scratch.path("noauth.conf"), atomically: true, encoding: .utf8)
        let pool = try PoolSource.open("ceph", type: nil, libvirtDirectory: scratch.dir,
                                       rbd: RBDPool.Options(confFile: scratch.path("noauth.conf")))
        defer { _ = pool.release() }
        #expect(pool.displayName == "rbd:\(ns)")
        #expect(try pool.volumeNames() == ["vm1"])
        #expect((pool as? RBDPool)?.options.monHost == "127.0.0.1:\(cluster.port)")
        #expect((pool as? RBDPool)?.options.id == "admin")
    }

    @Test func libvirtPoolDefinition() throws {
        let xml = """
            <pool type='rbd'>
              <name>vms</name>
              <source>
                <name>rbdpool/ns1</name>
                <host name='10.0.0.1' port='6789'/>
                <host name='10.0.0.2'/>
                <auth username='libvirt' type='ceph'><secret uuid='2ec115d7-3a88-3ceb-bc12-0ac909a6fd87'/></auth>
              </source>
            </pool>
            """
        let parsed = try PoolSource.parseLibvirtRBD(xml, file: "vms.xml")
        #expect(parsed.pool == "rbdpool/ns1")
        #expect(parsed.monHost == "10.0.0.1:6789,10.0.0.2")
        #expect(parsed.user == "libvirt")
        #expect(try PoolSource.parseLibvirt(xml, file: "vms.xml").type == "rbd")
    }
}
