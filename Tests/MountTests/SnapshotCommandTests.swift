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
            qemu-img create -q -f qcow2 served.qcow2 4M && qemu-io -c 'write -P 6 0 1M' served.qcow2 >/dev/null &&
            qemu-img snapshot -c lesson served.qcow2 && qemu-io -c 'write -P 7 0 64k' served.qcow2 >/dev/null &&
            qemu-img create -q -f raw disk.raw 1M
            """)
        let qcow2 = ["older", "overlay", "packed", "plain"].map { "\($0).qcow2" }
        for v in qcow2 { try scratch.sh("qemu-img convert -O raw pool/\(v) \(v).before") }
        let held = try BackingHolder("pool/held.qcow2", in: scratch)
        defer { held.stop() }
        // A running qemu-storage-daemon holds served.qcow2 (with a snapshot 'lesson' of its own):
        // every operation skips it, naming the daemon, and leaves its bytes alone.
        let servedBefore = try scratch.sh("sha256sum < pool/served.qcow2")
        let qsd = try QsdHolder("pool/served.qcow2", in: scratch)
        defer { qsd.stop() }
        let servedReason = "qemu-storage-daemon (pid \(qsd.process.processIdentifier))"

        let create = runPoolfs("snapshot create --jobs 3 pool class", in: scratch)
        #expect(create.status != 0, "a skipped volume fails the command")
        #expect(create.output.contains("disk.raw") && create.output.contains("raw file"), "\(create.output)")
        #expect(create.output.contains("held.qcow2") && create.output.contains("in use"), "\(create.output)")
        #expect(create.output.split(separator: "\n").contains { $0.hasPrefix("held.qcow2 ") && $0.contains("in use: qemu-io (pid \(held.process.processIdentifier))") },
                "\(create.output)")
        #expect(create.output.split(separator: "\n").contains { $0.hasPrefix("served.qcow2 ") && $0.contains("skipped") && $0.contains("in use: \(servedReason)") },
                "\(create.output)")
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

        for (verb, dry) in [("revert", ""), ("delete", ""), ("revert", "--dry-run ")] {
            let served = runPoolfs("snapshot \(verb) \(dry)pool lesson served.qcow2", in: scratch)
            #expect(served.status != 0 && served.output.split(separator: "\n").contains { $0.hasPrefix("served.qcow2 ") && $0.contains("skipped") && $0.contains("in use: \(servedReason)") },
                    "\(verb) \(dry): \(served.output)")
        }

        let delete = runPoolfs("snapshot delete pool class \(qcow2.joined(separator: " "))", in: scratch)
        #expect(delete.status == 0, "\(delete.output)")
        for v in qcow2 {
            try scratch.sh("qemu-img check pool/\(v) && ! qemu-img snapshot -l pool/\(v) | grep -q ' class '")
        }
        #expect(try scratch.sh("qemu-img snapshot -l pool/older.qcow2").contains(" before "))
        held.stop()
        try scratch.sh("qemu-img check pool/held.qcow2 && test -z \"$(qemu-img snapshot -l pool/held.qcow2)\"")
        qsd.stop()
        #expect(try scratch.sh("sha256sum < pool/served.qcow2") == servedBefore, "the daemon's image was written")
        try scratch.sh("qemu-img check pool/served.qcow2 && qemu-img snapshot -l pool/served.qcow2 | grep -q ' lesson ' && ! qemu-img snapshot -l pool/served.qcow2 | grep -q ' class ' && qemu-io -c 'read -P 7 0 64k' pool/served.qcow2 | grep -q 'read 65536'")

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

/// qemu-storage-daemon serving an image (a qcow2 blockdev over a file blockdev, no export), as a
/// storage daemon for a VM does, until stopped by its pid.
final class QsdHolder {
    let process = Process()
    init(_ file: String, in scratch: Scratch) throws {
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["qemu-storage-daemon", "--blockdev", "driver=file,node-name=f,filename=\(file)",
                             "--blockdev", "driver=qcow2,node-name=q,file=f"]
        process.currentDirectoryURL = URL(fileURLWithPath: scratch.dir)
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        #expect(FileLocks.wait { FileLocks.bytes(of: scratch.path(file)).contains(101) }, "qemu-storage-daemon took no write lock on \(file)")
    }
    func stop() {
        guard process.isRunning else { return }
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

/// `poolfs snapshot revert` killed (SIGKILL) at random points of its run: each image is always in
/// its old state or its new one, never between, and `qemu-img check` finds no corruption. The
/// delays are drawn in [0, the command's measured duration]; `POOLFS_KILL_SEED` replays a run
/// (the seed is printed and named in every failure).
@Suite("poolfs snapshot revert killed")
struct SnapshotCommandKilledRevertTests {
    static let volumes = ["plain", "small", "tiny", "packed", "subclusters"].map { "\($0).qcow2" }

    /// Varied images, each with snapshot `class` (taken by qemu-img) and many clusters written
    /// after it, so a revert has work: rewritten L2 tables, freed clusters, refcount blocks.
    static let setup = """
        mkdir pool && cd pool &&
        qemu-img create -q -f qcow2 plain.qcow2 64M && qemu-io -c 'write -P 1 0 24M' plain.qcow2 >/dev/null &&
        qemu-img create -q -f qcow2 -o cluster_size=4k small.qcow2 32M && qemu-io -c 'write -P 2 0 8M' small.qcow2 >/dev/null &&
        qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=4 tiny.qcow2 8M && qemu-io -c 'write -P 3 0 2M' tiny.qcow2 >/dev/null &&
        qemu-img create -q -f qcow2 src.img 16M && qemu-io -c 'write -P 4 0 12M' src.img >/dev/null &&
        qemu-img convert -c -O qcow2 -o cluster_size=16k src.img packed.qcow2 && rm src.img &&
        qemu-img create -q -f qcow2 ../base.qcow2 16M && qemu-io -c 'write -P 5 0 16M' ../base.qcow2 >/dev/null &&
        qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=32k -b ../base.qcow2 -F qcow2 subclusters.qcow2 &&
        qemu-io -c 'write -P 6 4k 2k' -c 'write -P 6 1M 1M' subclusters.qcow2 >/dev/null &&
        for v in *.qcow2; do qemu-img snapshot -c class $v; done &&
        qemu-io -c 'write -P 0x71 8M 40M' -c 'write -P 0x72 0 64k' plain.qcow2 >/dev/null &&
        qemu-io -c 'write -P 0x71 4M 20M' small.qcow2 >/dev/null &&
        qemu-io -c 'write -P 0x71 1M 6M' tiny.qcow2 >/dev/null &&
        qemu-io -c 'write -P 0x71 2M 6M' -c 'write -z 10M 1M' packed.qcow2 >/dev/null &&
        qemu-io -c 'write -P 0x71 6k 4k' -c 'write -P 0x72 3M 8M' subclusters.qcow2 >/dev/null
        """

    /// Which state each image is in: "old", "new", or what is wrong with it.
    static func states(_ scratch: Scratch) -> [String] {
        // One shell for all: exit status 3 of qemu-img check is leaks only, which a crash may
        // leave; 2 is corruption.
        let script = volumes.map { v in
            """
            qemu-img check pool/\(v) >check.out 2>&1; s=$?
            if [ $s -ne 0 ] && [ $s -ne 3 ]; then echo "\(v): qemu-img check exited $s: $(head -c 300 check.out | tr '\\n' ' ')"
            elif qemu-img compare -q -f qcow2 -F raw pool/\(v) \(v).new; then echo new
            elif qemu-img compare -q -f qcow2 -F raw pool/\(v) \(v).old; then echo old
            else echo "\(v): neither the old nor the new bytes"; fi
            """
        }.joined(separator: "\n")
        let out = scratch.attempt(script).output
        return out.split(separator: "\n").map(String.init)
    }

    @Test func eachImageIsOldOrNewAfterAKillAtAnyPoint() throws {
        let seed = ProcessInfo.processInfo.environment["POOLFS_KILL_SEED"].flatMap { UInt64($0) } ?? UInt64.random(in: 1...999_999)
        print("SnapshotCommandKilledRevertTests: seed \(seed) (POOLFS_KILL_SEED=\(seed) replays it)")
        var rng = SplitMix(seed: seed)
        let scratch = try Scratch()
        try scratch.sh(Self.setup)
        for v in Self.volumes {
            try scratch.sh("""
                mkdir -p copies && qemu-img convert -O raw pool/\(v) \(v).old && cp pool/\(v) copies/\(v) &&
                qemu-img snapshot -a class copies/\(v) && qemu-img convert -O raw copies/\(v) \(v).new && rm copies/\(v) &&
                ! cmp -s \(v).old \(v).new
                """)
        }
        try scratch.sh("cp -a pool template")

        /// Starts the revert, `jobs` volumes at a time (1: one after another, so a kill lands
        /// between volumes more often); with `killAfter`, SIGKILLs it then. Whether it ran to the end.
        func revert(jobs: Int = 8, killAfter delay: Double?) throws -> (finished: Bool, seconds: Double) {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: Binary.path)
            process.arguments = ["snapshot", "revert", "--jobs", String(jobs), "pool", "class"]
            process.currentDirectoryURL = URL(fileURLWithPath: scratch.dir)
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            let start = Date()
            try process.run()
            if let delay {
                usleep(UInt32(delay * 1e6))
                kill(process.processIdentifier, SIGKILL)
            }
            process.waitUntilExit()
            let seconds = Date().timeIntervalSince(start)
            return (process.terminationReason == .exit && process.terminationStatus == 0, seconds)
        }

        // The command's duration, for the delays: the longer of two full runs, one per --jobs.
        var duration = 0.0
        for jobs in [1, 8] {
            let run = try revert(jobs: jobs, killAfter: nil)
            #expect(run.finished, "seed \(seed): the revert failed")
            #expect(Self.states(scratch) == Self.volumes.map { _ in "new" }, "seed \(seed): a full revert")
            duration = max(duration, run.seconds)
            try scratch.sh("rm -rf pool && cp -a template pool")
        }
        var outcomes: [String] = []
        for trial in 0..<6 {
            let delay = Double.random(in: 0...duration, using: &rng)
            let jobs = trial % 2 == 0 ? 1 : 8
            let run = try revert(jobs: jobs, killAfter: delay)
            let states = Self.states(scratch)
            outcomes.append("--jobs \(jobs), \(String(format: "%.3f", delay)) s: \(run.finished ? "finished" : "killed") \(states.joined(separator: ","))")
            #expect(states.allSatisfy { $0 == "old" || $0 == "new" },
                    "seed \(seed), trial \(trial), killed after \(delay) s: \(states)")
            // Finished: every image is new. Killed: whatever it reached stays, and a second
            // revert completes it.
            if run.finished { #expect(states.allSatisfy { $0 == "new" }, "seed \(seed), trial \(trial): \(states)") }
            let again = try revert(killAfter: nil)
            #expect(again.finished, "seed \(seed), trial \(trial): the revert after the kill failed")
            #expect(Self.states(scratch) == Self.volumes.map { _ in "new" }, "seed \(seed), trial \(trial): after the second revert")
            try scratch.sh("rm -rf pool && cp -a template pool")
        }
        print("SnapshotCommandKilledRevertTests: seed \(seed), duration \(String(format: "%.3f", duration)) s:\n  " + outcomes.joined(separator: "\n  "))
        #expect(outcomes.contains { $0.contains("old") && $0.contains("new") } || outcomes.contains { $0.contains("killed") },
                "seed \(seed): no kill landed during the revert: \(outcomes)")
    }
}
