import Foundation
import TestSupport
import Synchronization
import Testing

/// `.partitions/` of every pool and `--type disk`: partitions found by libblkid, checked against
/// `sfdisk --json` (where they start and end) and against the bytes of the disk at that place
/// (`dd` of the raw file, or of `qemu-img convert` of a qcow2).
@Suite("partitions", .serialized)
struct PartitionMountTests {
    /// A partition as sfdisk reports it, in bytes.
    struct Expected { var number: Int, start: UInt64, size: UInt64, type: String }

    /// An MBR disk with two primaries, an extended partition (3) and three logical ones (5-7),
    /// and an ext4 filesystem holding hello.txt in partition 1; a GPT disk with named partitions;
    /// each filled with random bytes first, so that every partition's bytes are its own.
    static func makeDisks(_ scratch: Scratch) throws {
        try scratch.sh("""
            mkdir -p pool root && echo 'hello from part1' > root/hello.txt &&
            head -c 64M /dev/urandom > pool/guest.raw &&
            printf 'label: dos\\n,8M,83\\n,10M,83\\n,,5\\n,6M,83\\n,7M,8e\\n,,83\\n' | sfdisk -q pool/guest.raw &&
            mkfs.ext4 -q -F -d root -E offset=1048576 pool/guest.raw 8M &&
            head -c 48M /dev/urandom > gpt.raw &&
            printf 'label: gpt\\nsize=4M,type=L,name=boot\\nsize=12M,type=L,name=root\\ntype=S,name=swap\\n' | sfdisk -q gpt.raw &&
            qemu-img convert -O qcow2 gpt.raw pool/gpt.qcow2 &&
            qemu-img convert -O qcow2 pool/guest.raw pool/guest.qcow2 &&
            qemu-img create -q -f qcow2 pool/plain.qcow2 16M
            """)
    }

    static func partitions(_ image: String, in scratch: Scratch) throws -> [Expected] {
        let json = try scratch.sh("sfdisk --json '\(image)'")
        let table = (try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [String: Any])["partitiontable"] as! [String: Any]
        let sector = (table["sectorsize"] as? NSNumber)?.uint64Value ?? 512
        let device = table["device"] as! String
        return (table["partitions"] as! [[String: Any]]).map { p in
            let node = p["node"] as! String
            return Expected(number: Int(node.dropFirst(device.count))!, start: (p["start"] as! NSNumber).uint64Value * sector,
                            size: (p["size"] as! NSNumber).uint64Value * sector, type: "\(p["type"]!)")
        }
    }

    static func isExtended(_ p: Expected) -> Bool { ["5", "f", "85"].contains(p.type) }

    func xattr(_ path: String, _ name: String) -> String? {
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = c_getxattr(path, name, &buffer, buffer.count)
        return n < 0 ? nil : String(decoding: buffer[0..<n], as: UTF8.self)
    }

    /// Every partition file has the partition's size and bytes, the extended one is no file.
    func check(_ directory: String, against raw: String, expected: [Expected], names: (Int) -> String, scratch: Scratch) throws {
        let listed = Set(try FileManager.default.contentsOfDirectory(atPath: directory).filter { !$0.hasPrefix(".") })
        let files = expected.filter { !Self.isExtended($0) }
        #expect(listed == Set(files.map { names($0.number) }), "\(directory) lists \(listed.sorted())")
        for p in files {
            let file = directory + "/" + names(p.number)
            let size = try FileManager.default.attributesOfItem(atPath: file)[.size] as? UInt64
            #expect(size == p.size, "\(file): size")
            try same(file, raw, p.start)
            #expect(xattr(file, "user.poolfs.start_sector") == "\(p.start / 512)", "\(file): start sector")
        }
    }

    /// `count` bytes of `a` at `aOffset` equal those of `b` at `bOffset` (all of `a` by default).
    func same(_ a: String, _ b: String, _ bOffset: UInt64, sourceLocation: SourceLocation = #_sourceLocation) throws {
        try same(a, 0, b, bOffset, count: nil, sourceLocation: sourceLocation)
    }

    func same(_ a: String, _ aOffset: UInt64, _ b: String, _ bOffset: UInt64, count: UInt64?,
              sourceLocation: SourceLocation = #_sourceLocation) throws {
        let fa = try FileHandle(forReadingFrom: URL(fileURLWithPath: a)), fb = try FileHandle(forReadingFrom: URL(fileURLWithPath: b))
        defer { try? fa.close(); try? fb.close() }
        try fa.seek(toOffset: aOffset)
        try fb.seek(toOffset: bOffset)
        var left = count ?? UInt64.max
        var at: UInt64 = 0
        while left > 0 {
            let n = Int(min(left, 1 << 20))
            let x = try fa.read(upToCount: n) ?? Data()
            if count == nil, x.isEmpty { return }
            let y = try fb.read(upToCount: x.count) ?? Data()
            guard x == y, x.count == n || count == nil else {
                Issue.record("\(a)+\(aOffset) and \(b)+\(bOffset) differ within \(at)..<\(at + UInt64(n))", sourceLocation: sourceLocation)
                return
            }
            left -= UInt64(x.count)
            at += UInt64(x.count)
        }
    }

    @Test func everyVolumeShowsItsPartitionsAsSfdiskSeesThem() throws {
        let scratch = try Scratch()
        try Self.makeDisks(scratch)
        try scratch.sh("qemu-img convert -O raw pool/guest.qcow2 guest.qcow2.raw")
        let mbr = try Self.partitions(scratch.path("pool/guest.raw"), in: scratch)
        let gpt = try Self.partitions(scratch.path("gpt.raw"), in: scratch)
        #expect(mbr.map(\.number) == [1, 2, 3, 5, 6, 7] && gpt.map(\.number) == [1, 2, 3])
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        #expect(Set(try FileManager.default.contentsOfDirectory(atPath: mount.path(".partitions")))
                == [".snapshots", "guest.raw", "guest.qcow2", "gpt.qcow2", "plain.qcow2"])
        let part = { (n: Int) in "part\(n)" }
        try check(mount.path(".partitions/guest.raw"), against: scratch.path("pool/guest.raw"), expected: mbr, names: part, scratch: scratch)
        try check(mount.path(".partitions/guest.qcow2"), against: scratch.path("guest.qcow2.raw"), expected: mbr, names: part, scratch: scratch)
        try check(mount.path(".partitions/gpt.qcow2"), against: scratch.path("gpt.raw"), expected: gpt, names: part, scratch: scratch)
        #expect(try FileManager.default.contentsOfDirectory(atPath: mount.path(".partitions/plain.qcow2")).isEmpty)
        #expect(xattr(mount.path(".partitions/gpt.qcow2/part2"), "user.poolfs.partition_label") == "root")
        #expect(xattr(mount.path(".partitions/gpt.qcow2/part2"), "user.poolfs.partition_table") == "gpt")
        #expect(xattr(mount.path(".partitions/guest.raw/part6"), "user.poolfs.partition_type") == "0x8e")
        // What users do with it: the kernel mounts the filesystem of a qcow2's partition, with no offset.
        let target = scratch.path("guest")
        try FileManager.default.createDirectory(atPath: target, withIntermediateDirectories: true)
        try scratch.sh("mount -o loop,ro '\(mount.path(".partitions/guest.qcow2/part1"))' '\(target)'")
        defer { _ = scratch.attempt("umount '\(target)'") }
        #expect(try scratch.sh("cat '\(target)/hello.txt'") == "hello from part1\n")
        // Partition files are read-only in a read-only mount.
        #expect(!scratch.attempt("echo x > '\(mount.path(".partitions/guest.raw/part2"))'").ok)
    }

    @Test func snapshotsHavePartitionsOfTheirOwn() throws {
        let scratch = try Scratch()
        try Self.makeDisks(scratch)
        let gpt = try Self.partitions(scratch.path("gpt.raw"), in: scratch)
        try scratch.sh("""
            qemu-img snapshot -c before pool/gpt.qcow2 &&
            qemu-io -c 'write -P 0x5a \(gpt[1].start) 1M' pool/gpt.qcow2 >/dev/null
            """)
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        #expect(try FileManager.default.contentsOfDirectory(atPath: mount.path(".partitions/.snapshots/gpt.qcow2")) == ["before"])
        try check(mount.path(".partitions/.snapshots/gpt.qcow2/before"), against: scratch.path("gpt.raw"),
                  expected: gpt, names: { "part\($0)" }, scratch: scratch)
        try scratch.sh("head -c 1048576 /dev/zero | tr '\\0' 'Z' > z")
        try same(scratch.path("z"), mount.path(".partitions/gpt.qcow2/part2"), 0)
    }

    @Test func copyOnWritePartitionsShareTheirVolumesOverlay() throws {
        let scratch = try Scratch()
        try Self.makeDisks(scratch)
        let mbr = try Self.partitions(scratch.path("pool/guest.raw"), in: scratch)
        try scratch.sh("md5sum pool/guest.raw > guest.md5")
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: ["cow"])
        defer { mount.unmount() }
        let p5 = mbr.first { $0.number == 5 }!
        try scratch.sh("head -c 100000 /dev/urandom > patch && dd if=patch of='\(mount.path(".partitions/guest.raw/part5"))' bs=1000 seek=7 conv=notrunc status=none")
        try same(scratch.path("patch"), mount.path(".partitions/guest.raw/part5"), 7000)
        try same(scratch.path("patch"), mount.path("guest.raw"), p5.start + 7000)
        // Nothing past the partition's end is written: a write across it stops there.
        _ = scratch.attempt("dd if=patch of='\(mount.path(".partitions/guest.raw/part5"))' bs=1000 count=1 seek=\(p5.size - 500) oflag=seek_bytes conv=notrunc status=none")
        try same(mount.path("guest.raw"), p5.start + p5.size, scratch.path("pool/guest.raw"), p5.start + p5.size, count: 65536)
        try scratch.sh("md5sum -c guest.md5")
    }

    @Test func readWritePartitionsWriteTheirRangeOnly() throws {
        let scratch = try Scratch()
        try Self.makeDisks(scratch)
        let mbr = try Self.partitions(scratch.path("pool/guest.raw"), in: scratch)
        let p2 = mbr.first { $0.number == 2 }!, p6 = mbr.first { $0.number == 6 }!
        try scratch.sh("cp pool/guest.raw before.raw && head -c \(p2.size) /dev/urandom > new2 && head -c \(p6.size) /dev/urandom > new6")
        do {
            let mount = try PoolMount(scratch.path("pool"), in: scratch, options: ["rw"])
            defer { mount.unmount() }
            try scratch.sh("dd if=new2 of='\(mount.path(".partitions/guest.raw/part2"))' bs=64k conv=notrunc,fsync status=none")
            try scratch.sh("dd if=new6 of='\(mount.path(".partitions/guest.qcow2/part6"))' bs=64k conv=notrunc,fsync status=none")
            // A write past a partition's end is refused, not carried into the next partition.
            #expect(!scratch.attempt("printf x | dd of='\(mount.path(".partitions/guest.raw/part2"))' bs=1 seek=\(p2.size) conv=notrunc status=none").ok)
            try scratch.sh("cmp '\(mount.path(".partitions/guest.raw/part2"))' new2")
        }
        let pool = scratch.path("pool/guest.raw"), before = scratch.path("before.raw"), after = scratch.path("after.raw")
        try same(pool, 0, before, 0, count: p2.start)
        try same(scratch.path("new2"), pool, p2.start)
        try same(pool, p2.start + p2.size, before, p2.start + p2.size, count: nil)
        try scratch.sh("qemu-img check -q pool/guest.qcow2 && qemu-img convert -O raw pool/guest.qcow2 after.raw")
        try same(scratch.path("new6"), after, p6.start)
        try same(after, 0, before, 0, count: p6.start)
        try same(after, p6.start + p6.size, before, p6.start + p6.size, count: nil)
    }

    @Test func diskPoolsOfImagesAndBlockDevices() throws {
        let scratch = try Scratch()
        try Self.makeDisks(scratch)
        try scratch.sh("qemu-img convert -O raw pool/guest.qcow2 guest.qcow2.raw")
        let mbr = try Self.partitions(scratch.path("pool/guest.raw"), in: scratch)
        do {
            let mount = try PoolMount(scratch.path("pool/guest.qcow2"), in: scratch, options: ["type=disk"], name: "qcow2")
            defer { mount.unmount() }
            try check(mount.mountpoint, against: scratch.path("guest.qcow2.raw"), expected: mbr, names: { "part\($0)" }, scratch: scratch)
            #expect(xattr(mount.path("part5"), "user.poolfs.partition_number") == "5")
            // The partitions of a partition: none here, but the tree is there.
            #expect(try FileManager.default.contentsOfDirectory(atPath: mount.path(".partitions/part1")).isEmpty)
        }
        let loop = try scratch.sh("losetup -f --show -r '\(scratch.path("pool/guest.raw"))'").trimmingCharacters(in: .whitespacesAndNewlines)
        defer { _ = scratch.attempt("losetup -d \(loop)") }
        let base = String(loop.split(separator: "/").last!)
        let mount = try PoolMount(loop, in: scratch, options: ["type=disk"], name: "device")
        defer { mount.unmount() }
        try check(mount.mountpoint, against: scratch.path("pool/guest.raw"), expected: mbr, names: { "\(base)p\($0)" }, scratch: scratch)
        let json = try scratch.sh("'\(Binary.path)' ls --type disk --json '\(loop)'")
        #expect(json.contains("\"partition_type\" : \"0x8e\"") && json.contains("\"start_sector\" : \"\(mbr[0].start / 512)\""), "\(json)")
    }

    /// Two partitions of a qcow2 disk written at once share the disk's one writer.
    @Test func readWriteDiskPoolsWriteEachPartitionsRange() throws {
        let scratch = try Scratch()
        try Self.makeDisks(scratch)
        try scratch.sh("qemu-img convert -O raw pool/guest.qcow2 before.raw")
        let mbr = try Self.partitions(scratch.path("pool/guest.raw"), in: scratch)
        let p2 = mbr.first { $0.number == 2 }!, p7 = mbr.first { $0.number == 7 }!
        try scratch.sh("head -c \(p2.size) /dev/urandom > new2 && head -c \(p7.size) /dev/urandom > new7")
        do {
            let mount = try PoolMount(scratch.path("pool/guest.qcow2"), in: scratch, options: ["type=disk", "rw"])
            defer { mount.unmount() }
            // Both open at once (from two threads: sh here cannot wait for jobs of its own).
            let failures = Mutex<[String]>([])
            let commands = [2, 7].map { n in "dd if=new\(n) of='\(mount.path("part\(n)"))' bs=64k conv=notrunc,fsync status=none" }
            let directory = scratch.dir
            DispatchQueue.concurrentPerform(iterations: 2) { i in
                do {
                    _ = try Shell.run(commands[i], in: directory)
                } catch {
                    failures.withLock { $0.append("\(error)") }
                }
            }
            #expect(failures.withLock { $0 }.isEmpty)
            try scratch.sh("cmp '\(mount.path("part2"))' new2 && cmp '\(mount.path("part7"))' new7")
        }
        try scratch.sh("qemu-img check -q pool/guest.qcow2 && qemu-img convert -O raw pool/guest.qcow2 after.raw")
        let after = scratch.path("after.raw"), before = scratch.path("before.raw")
        try same(scratch.path("new2"), after, p2.start)
        try same(scratch.path("new7"), after, p7.start)
        try same(after, 0, before, 0, count: p2.start)
        try same(after, p2.start + p2.size, before, p2.start + p2.size, count: p7.start - p2.start - p2.size)
        try same(after, p7.start + p7.size, before, p7.start + p7.size, count: nil)
    }

    @Test func aTableChangedWhileMountedShowsAndNoTableIsAnEmptyPool() throws {
        let scratch = try Scratch()
        try scratch.sh("truncate -s 32M disk.raw && printf 'label: gpt\\n,4M,L\\n' | sfdisk -q disk.raw && truncate -s 8M empty.raw")
        let mount = try PoolMount(scratch.path("disk.raw"), in: scratch, options: ["type=disk"])
        defer { mount.unmount() }
        #expect(try FileManager.default.contentsOfDirectory(atPath: mount.mountpoint).sorted() == [".partitions", ".snapshots", "part1"])
        try scratch.sh("printf ',8M,L\\n' | sfdisk -q --append disk.raw")
        #expect(FileLocks.wait(seconds: 5) {
            (try? FileManager.default.contentsOfDirectory(atPath: mount.mountpoint).sorted()) == [".partitions", ".snapshots", "part1", "part2"]
        })
        #expect((try FileManager.default.attributesOfItem(atPath: mount.path("part2"))[.size] as? UInt64) == 8 << 20)
        let empty = try PoolMount(scratch.path("empty.raw"), in: scratch, options: ["type=disk"], name: "empty")
        defer { empty.unmount() }
        #expect(try FileManager.default.contentsOfDirectory(atPath: empty.mountpoint).sorted() == [".partitions", ".snapshots"])
        #expect(try String(contentsOfFile: empty.log, encoding: .utf8).contains("no partition table"))
    }
}
