import Foundation
import TestSupport
import Testing

/// `poolfs snapshot` through the built binary, on a dir pool of mixed volumes.
@Suite("poolfs snapshot")
struct SnapshotCommandTests {
    @Test func createWriteRevertDeleteOnAMixedPool() throws {
        let scratch = try Scratch()
        try scratch.sh("""
            mkdir pool && cd pool &&
            qemu-img create -q -f qcow2 plain.qcow2 4M && qemu-io -c 'write -P 1 0 1M' plain.qcow2 >/dev/null &&
            qemu-img create -q -f qcow2 -o cluster_size=4k older.qcow2 4M && qemu-io -c 'write -P 2 0 512k' older.qcow2 >/dev/null &&
            qemu-img snapshot -c before older.qcow2 &&
            qemu-img create -q -f qcow2 src.img 4M && qemu-io -c 'write -P 3 0 2M' src.img >/dev/null &&
            qemu-img convert -c -O qcow2 src.img packed.qcow2 && rm src.img &&
            qemu-img create -q -f qcow2 ../base.qcow2 4M && qemu-io -c 'write -P 4 0 4M' ../base.qcow2 >/dev/null &&
            qemu-img create -q -f qcow2 -o extended_l2=on -b ../base.qcow2 -F qcow2 overlay.qcow2 && qemu-io -c 'write -P 5 8k 4k' overlay.qcow2 >/dev/null &&
            qemu-img create -q -f qcow2 held.qcow2 4M &&
            qemu-img create -q -f raw disk.raw 1M
            """)
        let qcow2 = ["older", "overlay", "packed", "plain"].map { "\($0).qcow2" }
        for v in qcow2 { try scratch.sh("qemu-img convert -O raw pool/\(v) \(v).before") }
        let held = try BackingHolder("pool/held.qcow2", in: scratch)
        defer { held.stop() }

        let create = runPoolfs("snapshot create --jobs 3 pool class", in: scratch)
        #expect(create.status != 0, "a skipped volume fails the command")
        #expect(create.output.contains("disk.raw") && create.output.contains("raw file"), "\(create.output)")
        #expect(create.output.contains("held.qcow2") && create.output.contains("in use"), "\(create.output)")
        for v in qcow2 {
            #expect(create.output.split(separator: "\n").contains { $0.hasPrefix(v + " ") && $0.contains(" done") }, "\(v): \(create.output)")
            try scratch.sh("qemu-img check pool/\(v) && qemu-img snapshot -l pool/\(v) | grep -q ' class '")
        }
        let again = runPoolfs("snapshot create pool class plain.qcow2", in: scratch)
        #expect(again.status != 0 && again.output.contains("exists"), "\(again.output)")

        for v in qcow2 { try scratch.sh("qemu-io -c 'write -P 0x77 0 3M' pool/\(v) >/dev/null") }
        let revert = runPoolfs("snapshot revert --json pool class \(qcow2.joined(separator: " "))", in: scratch)
        #expect(revert.status == 0, "\(revert.output)")
        let rows = try JSONSerialization.jsonObject(with: Data(revert.output.utf8[revert.output.utf8.firstIndex(of: UInt8(ascii: "["))!...])) as! [[String: Any]]
        #expect(rows.count == 4 && rows.allSatisfy { $0["status"] as? String == "done" }, "\(revert.output)")
        for v in qcow2 {
            try scratch.sh("qemu-img check pool/\(v) && qemu-img compare -f qcow2 -F raw pool/\(v) \(v).before")
        }

        let delete = runPoolfs("snapshot delete pool class \(qcow2.joined(separator: " "))", in: scratch)
        #expect(delete.status == 0, "\(delete.output)")
        for v in qcow2 {
            try scratch.sh("qemu-img check pool/\(v) && ! qemu-img snapshot -l pool/\(v) | grep -q ' class '")
        }
        #expect(try scratch.sh("qemu-img snapshot -l pool/older.qcow2").contains(" before "))
        held.stop()
        try scratch.sh("qemu-img check pool/held.qcow2 && test -z \"$(qemu-img snapshot -l pool/held.qcow2)\"")

        let lvm = runPoolfs("snapshot revert --type logical vg0 class", in: scratch)
        // Without device-mapper: refused with that reason, before lvm2 is asked anything (with it,
        // vg0 does not exist).
        let control = open("/dev/mapper/control", O_RDWR)
        if control >= 0 { close(control) }
        #expect(lvm.status != 0 && lvm.output.contains(control >= 0 ? "vg0" : "this kernel has none (/dev/mapper/control cannot be opened)"), "\(lvm.output)")
        let noactivate = runPoolfs("snapshot create --type logical -o noactivate vg0 class", in: scratch)
        #expect(noactivate.status != 0 && noactivate.output.contains("-o noactivate does without it"), "\(noactivate.output)")
    }
}

/// `poolfs snapshot` on a dir pool that is mounted at the same time: the mount shows the new
/// snapshot file and, after a revert, the reverted bytes: through a file already open within the
/// attribute timeout (1 s), through a new open at once.
@Suite("poolfs snapshot on a mounted pool")
struct MountedSnapshotCommandTests {
    /// `count` bytes at `offset` of the open file.
    static func read(_ file: FileHandle, at offset: UInt64, count: Int) throws -> Data {
        try file.seek(toOffset: offset)
        return try file.read(upToCount: count) ?? Data()
    }

    /// Polls `condition` for up to `seconds`.
    static func within(_ seconds: Double, _ condition: () throws -> Bool) rethrows -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        repeat {
            if try condition() { return true }
            usleep(20_000)
        } while Date() < deadline
        return try condition()
    }

    @Test func theMountShowsTheNewSnapshotAndTheRevertedBytes() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir pool && qemu-img create -q -f qcow2 pool/vm.qcow2 4M && qemu-io -c 'write -P 0x11 0 1M' pool/vm.qcow2 >/dev/null")
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        let before = Data(repeating: 0x11, count: 1 << 20), after = Data(repeating: 0x22, count: 1 << 20)
        let open = try FileHandle(forReadingFrom: URL(fileURLWithPath: mount.path("vm.qcow2")))
        defer { try? open.close() }
        #expect(try Self.read(open, at: 0, count: 1 << 20) == before)

        let create = runPoolfs("snapshot create pool class", in: scratch)
        #expect(create.status == 0, "\(create.output)")
        let snapshot = mount.path(".snapshots/vm.qcow2/class")
        #expect(Self.within(1.5) { FileManager.default.fileExists(atPath: snapshot) }, "no \(snapshot)")

        try scratch.sh("qemu-io -c 'write -P 0x22 0 1M' pool/vm.qcow2 >/dev/null")
        #expect(try Self.within(1.5) { try Self.read(open, at: 0, count: 1 << 20) == after }, "the write shows through the open file")
        #expect(try contents(snapshot).prefix(1 << 20) == before, "the snapshot keeps the old bytes")

        let revert = runPoolfs("snapshot revert pool class", in: scratch)
        #expect(revert.status == 0, "\(revert.output)")
        #expect(try contents(mount.path("vm.qcow2")).prefix(1 << 20) == before, "a new open reads the reverted bytes at once")
        #expect(try Self.within(1.5) { try Self.read(open, at: 0, count: 1 << 20) == before }, "no stale pages in the open file")
        try scratch.sh("qemu-img check -q pool/vm.qcow2")
    }
}

/// qemu-io holding an image open for writing, as a running VM does, until stopped.
final class BackingHolder {
    let process = Process()
    init(_ file: String, in scratch: Scratch) throws {
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["qemu-io", "-c", "sleep 60000", file]
        process.currentDirectoryURL = URL(fileURLWithPath: scratch.dir)
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        #expect(FileLocks.wait { !FileLocks.on(scratch.path(file)).isEmpty }, "qemu-io took no lock on \(file)")
    }
    func stop() {
        guard process.isRunning else { return }
        // SIGKILL: children of Foundation's Process inherit this process's blocked SIGTERM.
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }
}

/// `poolfs snapshot` through the built binary on an RBD pool of the shared cluster.
@Suite("poolfs snapshot on rbd pools", .enabled(if: CephCluster.available))
struct RBDSnapshotCommandTests {
    @Test func createWriteRevertDeleteThroughTheCommand() throws {
        let cluster = try CephCluster.shared()
        let ns = try cluster.newNamespace()
        let scratch = try Scratch()
        try scratch.sh("head -c 2M /dev/urandom > seed && truncate -s 4M seed")
        for image in ["a", "b"] { try cluster.rbd("import --no-progress \(scratch.path("seed")) \(ns)/\(image)") }
        let pool = "--type rbd -o conf=\(cluster.conf) \(ns)"

        let create = runPoolfs("snapshot create \(pool) class", in: scratch)
        #expect(create.status == 0, "\(create.output)")
        #expect(create.output.split(separator: "\n").filter { $0.contains(" done") }.count == 2, "\(create.output)")
        try cluster.rbd("bench --io-type write --io-pattern rand --io-size 4K --io-total 256K \(ns)/a >/dev/null")
        try cluster.rbd("bench --io-type write --io-pattern rand --io-size 4K --io-total 256K \(ns)/b >/dev/null")
        let seed = Array(try contents(scratch.path("seed")))
        #expect(try cluster.export("\(ns)/a") != seed)

        let revert = runPoolfs("snapshot revert --json \(pool) class a", in: scratch)
        #expect(revert.status == 0, "\(revert.output)")
        #expect(revert.output.contains("\"done\""), "\(revert.output)")
        #expect(try cluster.export("\(ns)/a") == seed)
        #expect(try cluster.export("\(ns)/b") != seed, "only the volume named")

        let missing = runPoolfs("snapshot revert \(pool) nope", in: scratch)
        #expect(missing.status != 0 && missing.output.contains("no such snapshot"), "\(missing.output)")

        let delete = runPoolfs("snapshot delete \(pool) class", in: scratch)
        #expect(delete.status == 0, "\(delete.output)")
        #expect(try !cluster.rbd("snap ls \(ns)/a").contains(" class ") && !cluster.rbd("snap ls \(ns)/b").contains(" class "))
    }
}
