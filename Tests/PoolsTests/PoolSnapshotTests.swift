#if canImport(Glibc)
import Glibc
#endif
import Foundation
@testable import Pools
import Block
import TestSupport
import Testing

/// `Pool.snapshot` on zfs pools: the exact zfs command lines, checked through the fake runner
/// (this machine has no zfs module), and zfs's errors carried as they came.
@Suite("zfs snapshots")
struct ZfsSnapshotTests {
    static let list = ZfsPoolTests.list
    static func runner(_ extra: [String: Result<String, CommandError>] = [:]) -> FakeRunner {
        var outputs: [String: Result<String, CommandError>] = ["zfs list": .success(list), "zfs snapshot": .success(""),
                                                               "zfs rollback": .success(""), "zfs destroy": .success("")]
        outputs.merge(extra) { $1 }
        return FakeRunner(outputs)
    }

    /// The commands run, other than the listing.
    static func changes(_ runner: FakeRunner) -> [[String]] {
        runner.calls.withLock { $0.filter { $0[1] != "list" } }
    }

    @Test func createRevertDeleteRunTheseCommands() throws {
        let runner = Self.runner()
        let pool = try ZfsPool(dataset: "tank/vms", runner: runner)
        try pool.snapshot(.create(replace: false), "class", of: "web", dryRun: false)
        try pool.snapshot(.create(replace: false), "class", of: "sub%2Fdb", dryRun: false)
        try pool.snapshot(.create(replace: true), "monday", of: "web", dryRun: false)
        try pool.snapshot(.revert(force: false), "monday", of: "web", dryRun: false)
        try pool.snapshot(.revert(force: true), "nightly 1", of: "sub%2Fdb", dryRun: false)
        try pool.snapshot(.delete, "monday", of: "web", dryRun: false)
        #expect(Self.changes(runner) == [
            ["zfs", "snapshot", "tank/vms/web@class"],
            ["zfs", "snapshot", "tank/vms/sub/db@class"],
            ["zfs", "destroy", "tank/vms/web@monday"],        // --replace: the old one goes first
            ["zfs", "snapshot", "tank/vms/web@monday"],
            ["zfs", "rollback", "tank/vms/web@monday"],
            ["zfs", "rollback", "-r", "tank/vms/sub/db@nightly 1"],  // --force
            ["zfs", "destroy", "tank/vms/web@monday"],
        ])
    }

    @Test func skipsAndRefusalsRunNothing() throws {
        let runner = Self.runner()
        let pool = try ZfsPool(dataset: "tank/vms", runner: runner)
        #expect(throws: SnapshotError.exists("monday")) { try pool.snapshot(.create(replace: false), "monday", of: "web", dryRun: false) }
        #expect(throws: SnapshotSkip.noSuchSnapshot) { try pool.snapshot(.revert(force: true), "monday", of: "sub%2Fdb", dryRun: false) }
        #expect(throws: SnapshotSkip.noSuchSnapshot) { try pool.snapshot(.delete, "class", of: "web", dryRun: false) }
        #expect(throws: SnapshotError.noSuchVolume("nope")) { try pool.snapshot(.create(replace: false), "class", of: "nope", dryRun: false) }
        // zfs destroy would read % as a range of snapshots.
        for name in ["a%b", "a@b", "a/b", ""] {
            #expect(throws: ZfsPoolError.badSnapshotName(name)) { try pool.snapshot(.delete, name, of: "web", dryRun: false) }
        }
        try pool.snapshot(.create(replace: true), "monday", of: "web", dryRun: true)
        try pool.snapshot(.revert(force: false), "monday", of: "web", dryRun: true)
        try pool.snapshot(.delete, "monday", of: "web", dryRun: true)
        #expect(Self.changes(runner).isEmpty)
    }

    @Test func aRollbackPastLaterSnapshotsFailsWithWhatZfsSaid() throws {
        let refused = CommandError(commandLine: "zfs rollback tank/vms/web@monday", status: 1, stderr: """
            cannot rollback to 'tank/vms/web@monday': more recent snapshots or bookmarks exist
            use '-r' to force deletion of the following snapshots and bookmarks:
            tank/vms/web@tuesday

            """)
        let pool = try ZfsPool(dataset: "tank/vms", runner: Self.runner(["zfs rollback": .failure(refused)]))
        #expect(throws: refused) { try pool.snapshot(.revert(force: false), "monday", of: "web", dryRun: false) }
        #expect(refused.description.contains("`zfs rollback tank/vms/web@monday` exited with status 1: cannot rollback"))
    }
}

/// `Pool.snapshot` on a dir pool, checked with qemu-io and qemu-img.
@Suite("dir pool snapshots")
struct DirectorySnapshotTests {
    @Test func qcow2IsSnapshottedAndRawIsSkipped() throws {
        let scratch = try Scratch()
        try scratch.sh("""
            mkdir pool && qemu-img create -q -f qcow2 pool/a.qcow2 4M && qemu-io -c 'write -P 0x11 0 1M' pool/a.qcow2 >/dev/null
            qemu-img create -q -f raw pool/b.raw 1M
            """)
        let pool = try DirectoryPool(path: scratch.path("pool"))
        #expect(pool.snapshotRefusal == nil)
        try pool.snapshot(.create(replace: false), "class", of: "a.qcow2", dryRun: false)
        #expect(try scratch.sh("qemu-img snapshot -l pool/a.qcow2").contains(" class "))
        try scratch.sh("qemu-io -c 'write -P 0x22 512K 1M' pool/a.qcow2 >/dev/null")
        try pool.snapshot(.revert(force: false), "class", of: "a.qcow2", dryRun: false)
        try scratch.sh("qemu-img check -q pool/a.qcow2 && ! qemu-io -c 'read -P 0x11 0 1M' -c 'read -P 0 1M 3M' pool/a.qcow2 | grep -q 'verification failed'")
        #expect(throws: SnapshotError.exists("class")) { try pool.snapshot(.create(replace: false), "class", of: "a.qcow2", dryRun: false) }
        #expect(throws: SnapshotSkip.noSuchSnapshot) { try pool.snapshot(.revert(force: false), "nope", of: "a.qcow2", dryRun: false) }
        #expect(throws: SnapshotSkip.cannotHoldSnapshots("raw file: cannot hold internal snapshots")) {
            try pool.snapshot(.create(replace: false), "class", of: "b.raw", dryRun: false)
        }
        try pool.snapshot(.delete, "class", of: "a.qcow2", dryRun: false)
        #expect(try !scratch.sh("qemu-img snapshot -l pool/a.qcow2").contains(" class "))
        try scratch.sh("qemu-img check -q pool/a.qcow2")
    }
}

/// `Pool.snapshot` on an RBD pool, against the test's own namespace of the shared cluster, checked
/// with `rbd snap ls` and `rbd export`. Data is written by python3-rbd in a process of its own,
/// so that its exclusive lock is given back before poolfs looks.
@Suite("rbd snapshots", .enabled(if: CephCluster.available))
struct RBDSnapshotTests {
    static func python(_ cluster: CephCluster, _ ns: String, _ body: String) -> [String] {
        ["-c", """
            import rados, rbd, time, sys
            c = rados.Rados(conffile=sys.argv[1]); c.connect()
            io = c.open_ioctx('\(CephCluster.pool)'); io.set_namespace('\(ns.split(separator: "/")[1])')
            \(body)
            """, cluster.conf]
    }

    /// Writes `byte` over `[offset, offset + count)` of `image`.
    static func write(_ cluster: CephCluster, _ ns: String, _ image: String, _ byte: UInt8, at offset: Int, count: Int) throws {
        let args = python(cluster, ns, "img = rbd.Image(io, '\(image)'); img.write(bytes([\(byte)]) * \(count), \(offset)); img.close(); c.shutdown()")
        try cluster.scratch.sh("/usr/bin/python3 " + args.map { "'\($0.replacingOccurrences(of: "'", with: "'\\''"))'" }.joined(separator: " "))
    }

    @Test func createWriteRevertDelete() throws {
        let cluster = try CephCluster.shared()
        let ns = try cluster.newNamespace()
        try cluster.rbd("create --size 8M \(ns)/a")
        try Self.write(cluster, ns, "a", 0x11, at: 0, count: 1 << 20)
        let before = try cluster.export("\(ns)/a")
        let pool = try RBDTests.open(ns, cluster)
        defer { _ = pool.release() }
        #expect(pool.snapshotRefusal == nil)

        try pool.snapshot(.create(replace: false), "class", of: "a", dryRun: false)
        #expect(try cluster.rbd("snap ls \(ns)/a").contains(" class "))
        #expect(throws: SnapshotError.exists("class")) { try pool.snapshot(.create(replace: false), "class", of: "a", dryRun: false) }
        try pool.snapshot(.create(replace: true), "class", of: "a", dryRun: false)
        #expect(try cluster.rbd("snap ls \(ns)/a").components(separatedBy: " class ").count == 2, "replaced, not added")

        try Self.write(cluster, ns, "a", 0x22, at: 512 << 10, count: 2 << 20)
        #expect(try cluster.export("\(ns)/a") != before)
        try pool.snapshot(.revert(force: false), "class", of: "a", dryRun: false)
        #expect(try cluster.export("\(ns)/a") == before)
        #expect(throws: SnapshotSkip.noSuchSnapshot) { try pool.snapshot(.revert(force: false), "nope", of: "a", dryRun: false) }

        try pool.snapshot(.delete, "class", of: "a", dryRun: true)
        #expect(try cluster.rbd("snap ls \(ns)/a").contains(" class "), "a dry run changes nothing")
        try pool.snapshot(.delete, "class", of: "a", dryRun: false)
        #expect(try !cluster.rbd("snap ls \(ns)/a").contains(" class "))
        #expect(throws: SnapshotSkip.noSuchSnapshot) { try pool.snapshot(.delete, "class", of: "a", dryRun: false) }
    }

    /// An image whose exclusive lock another client holds, as a running VM does, is skipped with
    /// its holder and left as it was.
    @Test func aLockedImageIsSkipped() throws {
        let cluster = try CephCluster.shared()
        let ns = try cluster.newNamespace()
        try cluster.rbd("create --size 8M \(ns)/held")
        let pool = try RBDTests.open(ns, cluster)
        defer { _ = pool.release() }
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        let ready = cluster.scratch.path("held-\(UUID().uuidString)")
        // (Its `exclusive=True` open crashes python3-rbd 16.2 in a namespace; lock_acquire does the same.)
        holder.arguments = Self.python(cluster, ns, """
            img = rbd.Image(io, 'held')
            img.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
            open(sys.argv[2], 'w').close()
            time.sleep(60)
            """) + [ready]
        holder.standardOutput = FileHandle.nullDevice
        holder.standardError = FileHandle.nullDevice
        try holder.run()
        defer { kill(holder.processIdentifier, SIGKILL); holder.waitUntilExit() }
        for _ in 0..<100 where !FileManager.default.fileExists(atPath: ready) { usleep(100_000) }
        #expect(FileManager.default.fileExists(atPath: ready))
        for operation in [SnapshotOperation.create(replace: false), .revert(force: false), .delete] {
            do {
                try pool.snapshot(operation, "class", of: "held", dryRun: false)
                Issue.record("\(operation.verb) of a held image was done")
            } catch SnapshotSkip.inUse(let why) {
                #expect(why.contains("exclusive lock is held by"), "\(why)")
            }
        }
        #expect(try cluster.rbd("snap ls \(ns)/held").isEmpty)
    }
}
