#if canImport(Glibc)
import Glibc
#endif
import Foundation
@testable import Pools
import Qcow2
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
