import Foundation
import Block
import TestSupport
import Testing

@Suite("mounted dir pools")
struct MountTests {
    @Test func everyVolumeAndSnapshotReadsAsQemuImg() throws {
        let scratch = try Scratch()
        try SamplePool.build(in: scratch)
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        let listed = try FileManager.default.contentsOfDirectory(atPath: mount.mountpoint).sorted()
        #expect(listed == [".partitions", ".snapshots"] + SamplePool.volumes)
        for volume in SamplePool.volumes {
            try scratch.sh("qemu-img convert -O raw pool/\(volume) expected.raw")
            #expect(try contents(mount.path(volume)) == contents(scratch.path("expected.raw")), "\(volume)")
        }
        for (volume, file, id) in SamplePool.snapshots {
            try scratch.sh("cp pool/\(volume) pool/.revert.tmp && qemu-img snapshot -a \(id) pool/.revert.tmp && qemu-img convert -O raw pool/.revert.tmp expected.raw && rm pool/.revert.tmp")
            #expect(try contents(mount.path(".snapshots/\(volume)/\(file)")) == contents(scratch.path("expected.raw")), "\(volume) snapshot \(file)")
        }
        #expect(try FileManager.default.contentsOfDirectory(atPath: mount.path(".snapshots/vm.qcow2")).sorted()
                == ["daily@1", "daily@2", "lesson%2F1"])
    }

    /// The kernel leaves a FUSE mount 128 KiB of readahead; the daemon raises it after INIT, and
    /// finds its mount in /proc/self/mountinfo even under a name that the table escapes.
    @Test(arguments: [([String](), 2048), (["readahead=512K"], 512)])
    func readaheadIsRaised(options: [String], expectedKiB: Int) throws {
        #expect(getuid() == 0, "raising a mount's readahead needs root; run these tests as root")
        let scratch = try Scratch()
        try SamplePool.build(in: scratch)
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: options, name: "mount point\\1")
        defer { mount.unmount() }
        var st = stat()
        #expect(stat(mount.path("vm.qcow2"), &st) == 0)
        let (major, minor) = (Int((st.st_dev >> 8) & 0xfff | (st.st_dev >> 32) & ~0xfff), Int(st.st_dev & 0xff | (st.st_dev >> 12) & ~0xff))
        let setting = try String(contentsOfFile: "/sys/class/bdi/\(major):\(minor)/read_ahead_kb", encoding: .utf8)
        #expect(Int(setting.trimmingCharacters(in: .whitespacesAndNewlines)) == expectedKiB)
        // Requests are capped at max_read (512 KiB): the mount's options say so.
        let table = try String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)
        #expect(table.split(separator: "\n").contains { $0.contains("\(major):\(minor)") && $0.contains("max_read=524288") })
        try scratch.sh("qemu-img convert -O raw pool/vm.qcow2 expected.raw")
        #expect(try contents(mount.path("vm.qcow2")) == contents(scratch.path("expected.raw")))
    }

    @Test func sparseMapMatchesQemuImgMap() throws {
        let scratch = try Scratch()
        try SamplePool.build(in: scratch)
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        for volume in SamplePool.volumes {
            #expect(try dataRanges(of: mount.path(volume)) == qemuDataRanges("pool/\(volume)", in: scratch), "\(volume)")
        }
        // A sparse copy skips the holes and still has every byte.
        try scratch.sh("cp --sparse=always '\(mount.path("vm.qcow2"))' copy.raw && qemu-img convert -O raw pool/vm.qcow2 expected.raw && cmp copy.raw expected.raw")
        let usage = try scratch.sh("du -k copy.raw").split(separator: "\t").first.flatMap { Int($0) } ?? -1
        #expect(usage < 12 * 1024, "cp --sparse=always wrote \(usage) KiB of a 12 MiB disk with 5 MiB of data")
    }

    @Test func attributesFollowImagesAndSnapshots() throws {
        let scratch = try Scratch()
        try SamplePool.build(in: scratch)
        try scratch.sh("chmod 640 pool/vm.qcow2 && chown 1234:5678 pool/vm.qcow2 && touch -d '2001-02-03 04:05:06' pool/vm.qcow2")
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        let fm = FileManager.default
        let live = try fm.attributesOfItem(atPath: mount.path("vm.qcow2"))
        let image = try fm.attributesOfItem(atPath: scratch.path("pool/vm.qcow2"))
        #expect(live[.size] as? UInt64 == 12 << 20)
        #expect(live[.posixPermissions] as? Int == 0o640)
        #expect(live[.ownerAccountID] as? Int == 1234)
        #expect(live[.groupOwnerAccountID] as? Int == 5678)
        #expect(live[.modificationDate] as? Date == image[.modificationDate] as? Date)
        let snap = try fm.attributesOfItem(atPath: mount.path(".snapshots/vm.qcow2/daily@1"))
        #expect(snap[.size] as? UInt64 == 4 << 20)
        #expect(snap[.posixPermissions] as? Int == 0o440)
        let info = try scratch.sh("qemu-img info --output=json pool/vm.qcow2")
        let json = try JSONSerialization.jsonObject(with: Data(info.utf8)) as! [String: Any]
        let first = (json["snapshots"] as! [[String: Any]])[0]
        let date = (first["date-sec"] as! NSNumber).doubleValue + (first["date-nsec"] as! NSNumber).doubleValue / 1e9
        #expect(abs(((snap[.modificationDate] as? Date)?.timeIntervalSince1970 ?? 0) - date) < 0.001)
        // st_blocks counts the data bytes: here 4 MiB of 0x01 less the 64 KiB zeroed, plus 1 MiB and 64 KiB.
        var st = stat()
        #expect(stat(mount.path("vm.qcow2"), &st) == 0)
        #expect(st.st_blocks * 512 == (4 << 20) - (64 << 10) + (1 << 20) + (64 << 10))
        #expect(stat(mount.path(".snapshots/vm.qcow2/daily@1"), &st) == 0)
        #expect(st.st_blocks * 512 == 4 << 20)
    }

    @Test func extendedAttributesDescribeVolumes() throws {
        let scratch = try Scratch()
        try SamplePool.build(in: scratch)
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        func xattr(_ file: String, _ name: String) -> String? {
            var buffer = [UInt8](repeating: 0, count: 4096)
            let n = c_getxattr(mount.path(file), name, &buffer, buffer.count)
            return n < 0 ? nil : String(decoding: buffer[0..<n], as: UTF8.self)
        }
        #expect(xattr("top.qcow2", "user.poolfs.format") == "qcow2")
        #expect(xattr("top.qcow2", "user.poolfs.virtual_size") == "\(8 << 20)")
        #expect(xattr("top.qcow2", "user.poolfs.backing_chain")
                == "\(scratch.path("pool"))/mid.qcow2 (qcow2)\n\(scratch.path("pool"))/base.raw (raw)")
        #expect(xattr("plain.img", "user.poolfs.format") == "raw")
        #expect(xattr(".snapshots/vm.qcow2/lesson%2F1", "user.poolfs.snapshot_name") == "lesson/1")
        #expect(xattr(".snapshots/vm.qcow2/daily@2", "user.poolfs.snapshot_id") == "2")
        #expect(xattr(".snapshots/vm.qcow2/daily@2", "user.poolfs.vm_state_size") == "0")
        #expect(xattr(".snapshots/vm.qcow2/daily@2", "user.poolfs.snapshot_date")?.hasSuffix("Z") == true)
        #expect(xattr("vm.qcow2", "user.poolfs.nothing") == nil && errno == ENODATA)
    }

    @Test func partitionsInsideAVolumeAreReachable() throws {
        let scratch = try Scratch()
        try scratch.sh("""
            mkdir pool files && echo 'hello from inside' > files/greeting.txt &&
            truncate -s 64M disk.raw && printf 'label: dos\\nstart=2048, type=83\\n' | sfdisk -q disk.raw &&
            mkfs.ext4 -q -F -d files -E offset=1048576 disk.raw 60M &&
            qemu-img convert -O qcow2 disk.raw pool/guest.qcow2
            """)
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        let fdisk = try scratch.sh("fdisk -l '\(mount.path("guest.qcow2"))'")
        #expect(fdisk.contains("guest.qcow2p1") && fdisk.contains(" 2048 "), "\(fdisk)")
        try scratch.sh("mkdir inside && mount -o loop,ro,offset=1048576 '\(mount.path("guest.qcow2"))' inside")
        defer { _ = try? scratch.sh("umount inside") }
        #expect(try String(contentsOfFile: scratch.path("inside/greeting.txt"), encoding: .utf8) == "hello from inside\n")
        // losetup -P needs a kernel that scans loop partitions: check on a plain file first.
        let plainLoop = try scratch.sh("losetup -P -r --show -f disk.raw").trimmingCharacters(in: .whitespacesAndNewlines)
        let scans = FileManager.default.fileExists(atPath: "/sys/block/\((plainLoop as NSString).lastPathComponent)/\((plainLoop as NSString).lastPathComponent)p1")
        try scratch.sh("losetup -d \(plainLoop)")
        if scans {
            let loop = try scratch.sh("losetup -P -r --show -f '\(mount.path("guest.qcow2"))'").trimmingCharacters(in: .whitespacesAndNewlines)
            defer { _ = try? scratch.sh("losetup -d \(loop)") }
            let name = (loop as NSString).lastPathComponent
            #expect(FileManager.default.fileExists(atPath: "/sys/block/\(name)/\(name)p1"))
        } else {
            print("SKIPPED: losetup -P partition check: this kernel does not create loop partitions even for a plain file")
        }
    }

    @Test func poolChangesShowWithoutARemount() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir pool && qemu-img create -q -f qcow2 pool/a.qcow2 1M && qemu-io -c 'write -P 0x11 0 64k' pool/a.qcow2 >/dev/null")
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        let fm = FileManager.default
        func eventually(_ what: String, _ condition: () throws -> Bool) rethrows {
            let deadline = Date().addingTimeInterval(5)
            while try !condition(), Date() < deadline { usleep(100_000) }
            #expect(try condition(), "\(what)")
        }
        #expect(try fm.contentsOfDirectory(atPath: mount.path(".snapshots/a.qcow2")).isEmpty)
        try scratch.sh("qemu-img snapshot -c fresh pool/a.qcow2 && qemu-io -c 'write -P 0x22 0 64k' pool/a.qcow2 >/dev/null")
        try eventually("new snapshot listed") { fm.fileExists(atPath: mount.path(".snapshots/a.qcow2/fresh")) }
        try eventually("live volume shows the write made after opening") { try contents(mount.path("a.qcow2")).first == 0x22 }
        #expect(try contents(mount.path(".snapshots/a.qcow2/fresh")).first == 0x11)
        try scratch.sh("cp pool/a.qcow2 pool/b.qcow2")
        try eventually("added volume") { try fm.contentsOfDirectory(atPath: mount.mountpoint).contains("b.qcow2") }
        try scratch.sh("mv pool/b.qcow2 pool/c.qcow2")
        try eventually("renamed volume") {
            let names = try fm.contentsOfDirectory(atPath: mount.mountpoint)
            return names.contains("c.qcow2") && !names.contains("b.qcow2")
        }
        try eventually("renamed volume readable") { try contents(mount.path("c.qcow2")).first == 0x22 }
        try scratch.sh("qemu-img resize -q pool/c.qcow2 2M && qemu-img snapshot -d fresh pool/c.qcow2")
        try eventually("resize seen") { (try? fm.attributesOfItem(atPath: mount.path("c.qcow2"))[.size] as? UInt64) == 2 << 20 }
        try eventually("deleted snapshot gone") { !fm.fileExists(atPath: mount.path(".snapshots/c.qcow2/fresh")) }
        try scratch.sh("rm pool/c.qcow2")
        try eventually("removed volume") { !fm.fileExists(atPath: mount.path("c.qcow2")) }
    }

    @Test func aBrokenVolumeFailsAloneWithEIO() throws {
        let scratch = try Scratch()
        try scratch.sh("""
            mkdir pool && qemu-img create -q -f qcow2 pool/good.qcow2 1M && qemu-io -c 'write -P 0x33 0 1M' pool/good.qcow2 >/dev/null &&
            qemu-img create -q -f qcow2 pool/corrupt.qcow2 1M &&
            printf '\\377\\377\\377\\377' | dd of=pool/corrupt.qcow2 bs=1 seek=36 conv=notrunc status=none &&
            qemu-img create -q -f qcow2 pool/base.qcow2 1M && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 pool/orphan.qcow2 && rm pool/base.qcow2 &&
            qemu-img create -q -f qcow2 pool/future.qcow2 1M &&
            printf '\\200' | dd of=pool/future.qcow2 bs=1 seek=72 conv=notrunc status=none
            """)
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        for broken in ["corrupt.qcow2", "orphan.qcow2", "future.qcow2"] {
            let fd = open(mount.path(broken), O_RDONLY)
            let code = errno
            if fd >= 0 { close(fd) }
            #expect(fd < 0 && code == EIO, "\(broken): open should fail with EIO")
        }
        #expect(try contents(mount.path("good.qcow2")) == Data(repeating: 0x33, count: 1 << 20))
        let json = try scratch.sh("'\(Binary.path)' ls --json pool")
        let reports = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [[String: Any]]
        let errors = Dictionary(uniqueKeysWithValues: reports.map { ($0["name"] as! String, $0["error"] as? String) })
        #expect(errors["good.qcow2"]! == nil)
        #expect(errors["corrupt.qcow2"]??.contains("l1_size") == true)
        #expect(errors["orphan.qcow2"]??.contains("No such file") == true)
        #expect(errors["future.qcow2"]??.contains("unsupported incompatible feature bit 63") == true)
        let log = try String(contentsOfFile: mount.log, encoding: .utf8)
        #expect(log.contains("volume corrupt.qcow2"), "the reason is logged: \(log)")
    }

    @Test func writesAreRefused() throws {
        let scratch = try Scratch()
        try SamplePool.build(in: scratch)
        let before = try scratch.sh("sha256sum pool/*")
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        for path in [mount.path("vm.qcow2"), mount.path(".snapshots/vm.qcow2/daily@1")] {
            #expect(open(path, O_WRONLY) < 0 && errno == EROFS, "\(path)")
            #expect(truncate(path, 0) < 0 && errno == EROFS)
        }
        #expect(mkdir(mount.path("new"), 0o755) < 0 && errno == EROFS)
        #expect(creat(mount.path("new.qcow2"), 0o644) < 0 && errno == EROFS)
        #expect(unlink(mount.path("vm.qcow2")) < 0 && errno == EROFS)
        #expect(try scratch.sh("sha256sum pool/*") == before)
    }

    @Test func manyReadersAtOnce() throws {
        let scratch = try Scratch()
        try SamplePool.build(in: scratch)
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: ["cache_size=256K", "threads=8"])
        defer { mount.unmount() }
        var expected: [String: Data] = [:]
        for volume in SamplePool.volumes {
            try scratch.sh("qemu-img convert -O raw pool/\(volume) \(volume).raw")
            expected[volume] = try contents(scratch.path("\(volume).raw"))
        }
        let failures = Mutex(0)
        let wanted = expected
        let root = mount.mountpoint
        DispatchQueue.concurrentPerform(iterations: 16) { worker in
            var generator = SystemRandomNumberGenerator()
            for round in 0..<40 {
                let volume = SamplePool.volumes[(worker + round) % SamplePool.volumes.count]
                let want = wanted[volume]!
                let offset = Int.random(in: 0..<want.count, using: &generator)
                let count = min(Int.random(in: 1...(300 << 10), using: &generator), want.count - offset)
                let fd = open(root + "/" + volume, O_RDONLY)
                var got = [UInt8](repeating: 0, count: count)
                let n = pread(fd, &got, count, off_t(offset))
                close(fd)
                if n != count || Data(got) != want[offset..<offset + count] { failures.withLock { $0 += 1 } }
            }
        }
        #expect(failures.withLock { $0 } == 0)
    }
}

import Synchronization
extension Mutex: @retroactive @unchecked Sendable {}

/// getxattr(2) from <sys/xattr.h>, which Glibc's module map leaves out.
@_silgen_name("getxattr")
func c_getxattr(_ path: UnsafePointer<CChar>, _ name: UnsafePointer<CChar>, _ value: UnsafeMutableRawPointer?, _ size: Int) -> Int
