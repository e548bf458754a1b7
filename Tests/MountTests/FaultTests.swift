import Foundation
import TestSupport
import Testing

/// Faults under a live mount: the filesystem holding the pool fills up, an image is truncated,
/// replaced or deleted while open, a backing file goes away, an LVM physical volume vanishes.
/// Each gets a clear errno and a log line; none crashes the daemon, disturbs another volume or
/// loses what fsync acknowledged. Every command that touches the mount runs under `timeout`,
/// so a hang fails the test instead of stopping the run.
@Suite("faults under a live mount", .serialized)
struct FaultTests {
    /// Writes a Python script into the scratch directory and runs it under a time limit; its
    /// last line of output is JSON.
    static func python(_ script: String, _ arguments: [String], in scratch: Scratch, seconds: Int = 120) throws -> [String: Any] {
        let file = scratch.path("script-\(UUID().uuidString).py")
        try script.write(toFile: file, atomically: true, encoding: .utf8)
        let quoted = arguments.map { "'\($0)'" }.joined(separator: " ")
        let output = try scratch.sh("timeout \(seconds) python3 '\(file)' \(quoted)")
        let last = output.split(separator: "\n").last.map(String.init) ?? ""
        return try JSONSerialization.jsonObject(with: Data(last.utf8)) as! [String: Any]
    }

    /// Reads through one descriptor with O_DIRECT, so every read reaches the daemon: `rd(offset)`
    /// is the first byte read there as hex, or the errno.
    static let directReader = """
        import errno, json, mmap, os, sys, time
        buf = mmap.mmap(-1, 65536)
        def rd(fd, off):
            try:
                n = os.preadv(fd, [buf], off)
                return buf[:1].hex() if n > 0 else "eof"
            except OSError as e:
                return e.errno

        """

    static func log(of mount: PoolMount) -> String {
        (try? String(contentsOfFile: mount.log, encoding: .utf8)) ?? ""
    }

    /// Descriptors of the daemon that point at deleted files.
    static func deletedFilesHeld(by mount: PoolMount, in scratch: Scratch) throws -> String {
        try scratch.sh("ls -l /proc/\(mount.process.processIdentifier)/fd | grep '(deleted)' || true")
    }

    // MARK: 1. The pool's filesystem fills up

    /// `-o rw` into images on a 32 MiB ext4 that a filler file brings to its last few hundred
    /// KiB, round after round: writes fail with ENOSPC (never EIO), the writer does not give up
    /// (the image is not marked corrupt), and once the filler is deleted the same descriptor
    /// writes again. Afterwards qemu-img check finds at most leaked clusters and every write
    /// fsync acknowledged is in the image. One image has 512-byte clusters, so that running out
    /// of space lands in refcount block and refcount table allocation too; the other has a
    /// snapshot, so writes copy shared clusters.
    @Test func aFullFilesystemGivesENOSPCAndWritingResumesOnceThereIsSpace() throws {
        let scratch = try Scratch()
        try scratch.sh("truncate -s 32M fs.img && mkfs.ext4 -q -F -m 0 fs.img && mkdir fs && mount -o loop fs.img fs")
        defer { _ = try? scratch.sh("umount fs || umount -l fs") }
        try scratch.sh("""
            mkdir fs/pool && cd fs/pool &&
            qemu-img create -q -f qcow2 -o cluster_size=512 tiny.qcow2 16M && qemu-io -c 'write -P 0x5a 0 6M' tiny.qcow2 >/dev/null &&
            qemu-img create -q -f qcow2 vm.qcow2 16M && qemu-io -c 'write -P 0x6b 0 4M' vm.qcow2 >/dev/null &&
            qemu-img snapshot -c base vm.qcow2
            """)
        let workload = """
            import errno, json, os, sys
            path, filler, slot, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
            nslots = (16 << 20) // slot
            fd = os.open(path, os.O_RDWR)
            acked, errors, i = [], [], 0
            def where(i): return (i * 7919) % nslots * slot
            def write(i):
                data = bytes([i % 251 + 1]) * slot
                if os.pwrite(fd, data, where(i)) != slot: raise OSError(errno.EIO, "short write")
                os.fsync(fd)
            def fill(leave):
                st = os.statvfs(os.path.dirname(filler))
                size = st.f_bavail * st.f_frsize - leave
                f = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
                while size > 0:
                    try:
                        os.posix_fallocate(f, 0, size)
                        break
                    except OSError as e:
                        if e.errno != errno.ENOSPC: raise
                        size -= 65536
                os.close(f)
            for r in range(rounds):
                fill([200 << 10, 700 << 10, 400 << 10, 1 << 20, 300 << 10][r % 5])
                failures = 0
                while failures < 4:
                    try:
                        write(i)
                        acked.append(i)
                    except OSError as e:
                        errors.append(e.errno)
                        failures += 1
                    i += 1
                # Reads of acknowledged data work while the filesystem is full.
                for j in acked[-3:]:
                    if os.pread(fd, slot, where(j)) != bytes([j % 251 + 1]) * slot: raise SystemExit(f"slot {j} reads wrong while full")
                os.remove(filler)
                for _ in range(8):
                    write(i)  # must succeed now: an exception fails the script
                    acked.append(i)
                    i += 1
            assert i < nslots
            os.close(fd)
            print(json.dumps({"acked": acked, "errors": errors}))
            """
        let images = [("tiny.qcow2", 24 << 10), ("vm.qcow2", 96 << 10)]
        var acknowledged: [String: [Int]] = [:]
        do {
            let mount = try PoolMount(scratch.path("fs/pool"), in: scratch, options: ["rw"])
            defer { mount.unmount() }
            for (image, slot) in images {
                let result = try Self.python(workload, [mount.path(image), scratch.path("fs/filler"), "\(slot)", "5"], in: scratch, seconds: 300)
                let errors = result["errors"] as! [Int]
                #expect(!errors.isEmpty && errors.allSatisfy { $0 == ENOSPC }, "\(image): every failed write or fsync must be ENOSPC: \(errors)")
                acknowledged[image] = result["acked"] as? [Int] ?? []
            }
            #expect(Self.log(of: mount).contains("No space left on device"), "the log says why writes failed:\n\(Self.log(of: mount))")
        }
        for (image, slot) in images {
            do {
                try scratch.sh("qemu-img check fs/pool/\(image)")
            } catch let error as ShellError {
                // 3: leaked clusters only. Anything else is corruption.
                #expect(error.status == 3 && !error.output.contains("ERROR"), "\(image): \(error.output)")
            }
            let info = try scratch.sh("qemu-img info --output=json fs/pool/\(image)")
            #expect(info.contains(#""corrupt": false"#), "\(image) was marked corrupt:\n\(info)")
            let nslots = (16 << 20) / slot
            let reads = (acknowledged[image] ?? []).map { i in "-c 'read -q -P \(i % 251 + 1) \((i * 7919) % nslots * slot) \(slot)'" }
            #expect(reads.count > 40, "\(image): only \(reads.count) writes acknowledged")
            let output = try scratch.sh("qemu-io -r \(reads.joined(separator: " ")) fs/pool/\(image)")
            #expect(!output.contains("failed"), "\(image): a write fsync acknowledged is not in the image: \(output.prefix(500))")
        }
        try scratch.sh("cp fs/pool/vm.qcow2 snap.qcow2 && qemu-img snapshot -a base snap.qcow2")
        #expect(try !scratch.sh("qemu-io -r -c 'read -q -P 0x6b 0 4M' snap.qcow2").contains("failed"), "the snapshot changed")
    }

    // MARK: 2. An image truncated while open

    @Test func clustersCutOffAnOpenImageFailWithEIONotZeros() throws {
        let scratch = try Scratch()
        // a.qcow2 keeps its data from host offset 327680 on: guest offset g lies at 327680 + g.
        try scratch.sh("""
            mkdir pool && qemu-img create -q -f qcow2 pool/a.qcow2 8M && qemu-io -c 'write -P 0x44 0 8M' pool/a.qcow2 >/dev/null &&
            qemu-img map --output=json pool/a.qcow2 | grep -q '"offset": 327680' &&
            qemu-img create -q -f qcow2 pool/b.qcow2 1M && qemu-io -c 'write -P 0x55 0 1M' pool/b.qcow2 >/dev/null
            """)
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        let result = try Self.python(Self.directReader + """
            fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECT)
            before = [rd(fd, 0), rd(fd, 7 << 20)]
            os.truncate(sys.argv[2], 2 << 20)
            time.sleep(0.2)
            after = [rd(fd, 0), rd(fd, 1 << 20), rd(fd, 7 << 20), rd(fd, 8 << 20)]
            other = os.open(sys.argv[3], os.O_RDONLY | os.O_DIRECT)
            print(json.dumps({"before": before, "after": after, "other": rd(other, 0)}))
            """, [mount.path("a.qcow2"), scratch.path("pool/a.qcow2"), mount.path("b.qcow2")], in: scratch)
        #expect(result["before"] as? [AnyHashable] == ["44", "44"])
        // 1 MiB still lies inside the file; 7 MiB (host offset 7667712) does not: EIO, not zeros.
        #expect(result["after"] as? [AnyHashable] == ["44", "44", EIO, "eof"], "\(result)")
        #expect(result["other"] as? String == "55", "another volume keeps working")
        let log = Self.log(of: mount)
        #expect(log.contains("volume a.qcow2: corrupt image: the data of guest offset 7340032 is at 7667712, past the end of"), "\(log)")
    }

    // MARK: 3 and 4. An image replaced or deleted while open

    /// A descriptor open before `mv new.qcow2 a.qcow2` keeps reading the old file (its bytes and
    /// its size) until closed; the tree shows the new file, as another inode; once closed, the
    /// daemon holds nothing of the old file.
    @Test func anOpenImageReplacedInThePoolKeepsReadingTheOldFileUntilClosed() throws {
        let scratch = try Scratch()
        try scratch.sh("""
            mkdir pool && qemu-img create -q -f qcow2 pool/a.qcow2 4M && qemu-io -c 'write -P 0x11 0 4M' pool/a.qcow2 >/dev/null &&
            qemu-img create -q -f qcow2 new.qcow2 6M && qemu-io -c 'write -P 0x22 0 6M' new.qcow2 >/dev/null
            """)
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        let result = try Self.python(Self.directReader + """
            mnt, new, target = sys.argv[1], sys.argv[2], sys.argv[3]
            fd = os.open(mnt, os.O_RDONLY | os.O_DIRECT)
            before = rd(fd, 0)
            os.rename(new, target)
            time.sleep(0.3)
            soon = [rd(fd, 3 << 16), rd(fd, 0)]
            time.sleep(1.3)  # past the kernel's entry and attribute timeouts
            later = [rd(fd, 5 << 16), rd(fd, 4 << 20)]
            fresh = os.open(mnt, os.O_RDONLY | os.O_DIRECT)
            print(json.dumps({"before": before, "soon": soon, "later": later, "old_size": os.fstat(fd).st_size,
                              "new": rd(fresh, 5 << 20), "new_size": os.stat(mnt).st_size,
                              "same_inode": os.fstat(fd).st_ino == os.fstat(fresh).st_ino}))
            os.close(fd)
            os.close(fresh)
            """, [mount.path("a.qcow2"), scratch.path("new.qcow2"), scratch.path("pool/a.qcow2")], in: scratch)
        #expect(result["before"] as? String == "11")
        #expect(result["soon"] as? [AnyHashable] == ["11", "11"], "\(result)")
        #expect(result["later"] as? [AnyHashable] == ["11", "eof"], "the old file, with its old size: \(result)")
        #expect(result["old_size"] as? Int == 4 << 20)
        #expect(result["new"] as? String == "22" && result["new_size"] as? Int == 6 << 20, "the tree shows the new file: \(result)")
        #expect(result["same_inode"] as? Bool == false)
        #expect(Self.log(of: mount).contains("volume a.qcow2: names another file now while open; what is open stays on the old file"), "\(Self.log(of: mount))")
        usleep(300_000)  // the kernel sends the release after close returns
        #expect(try Self.deletedFilesHeld(by: mount, in: scratch).isEmpty, "the old file stays open after its last close")
    }

    /// With `-o rw`, a file open for writing that the pool replaces goes on taking the writes
    /// until closed (a hard link keeps the old file to check); the new file is left alone.
    @Test func anImageReplacedWhileOpenForWritingTakesTheWritesUntilClosed() throws {
        let scratch = try Scratch()
        try scratch.sh("""
            mkdir pool && qemu-img create -q -f qcow2 pool/vm.qcow2 4M && ln pool/vm.qcow2 old.qcow2 &&
            qemu-img create -q -f qcow2 new.qcow2 6M && qemu-io -c 'write -P 0x22 0 6M' new.qcow2 >/dev/null && md5sum new.qcow2 > new.md5
            """)
        do {
            let mount = try PoolMount(scratch.path("pool"), in: scratch, options: ["rw"])
            defer { mount.unmount() }
            let result = try Self.python(Self.directReader + """
                mnt, new, target = sys.argv[1], sys.argv[2], sys.argv[3]
                fd = os.open(mnt, os.O_RDWR | os.O_DIRECT)
                buf[:] = b"\\x41" * 65536
                os.pwritev(fd, [buf], 0)
                os.fsync(fd)
                os.rename(new, target)
                time.sleep(1.3)
                buf[:] = b"\\x42" * 65536
                os.pwritev(fd, [buf], 1 << 20)
                os.fsync(fd)
                mine = [rd(fd, 0), rd(fd, 1 << 20)]
                other = os.open(mnt, os.O_RDONLY | os.O_DIRECT)
                print(json.dumps({"mine": mine, "tree": rd(other, 1 << 20), "size": os.stat(mnt).st_size}))
                os.close(other)
                os.close(fd)
                """, [mount.path("vm.qcow2"), scratch.path("new.qcow2"), scratch.path("pool/vm.qcow2")], in: scratch)
            #expect(result["mine"] as? [AnyHashable] == ["41", "42"], "\(result)")
            #expect(result["tree"] as? String == "22" && result["size"] as? Int == 6 << 20, "the tree shows the new file: \(result)")
        }
        try scratch.sh("qemu-img check old.qcow2 && qemu-io -r -c 'read -P 0x41 0 64k' -c 'read -P 0x42 1M 64k' old.qcow2 | grep -c 'read 65536' | grep -q 2")
        try scratch.sh("mv pool/vm.qcow2 new.qcow2 && md5sum -c new.md5")
    }

    @Test func anOpenImageDeletedFromThePoolKeepsReadingUntilClosedAndLeavesTheTree() throws {
        let scratch = try Scratch()
        try scratch.sh("""
            mkdir pool && qemu-img create -q -f qcow2 pool/c.qcow2 4M && qemu-io -c 'write -P 0x33 0 4M' pool/c.qcow2 >/dev/null &&
            qemu-img create -q -f raw pool/raw.img 4M && qemu-io -f raw -c 'write -P 0x34 0 4M' pool/raw.img >/dev/null
            """)
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        for (volume, pattern) in [("c.qcow2", "33"), ("raw.img", "34")] {
            let result = try Self.python(Self.directReader + """
                mnt, target, root = sys.argv[1], sys.argv[2], sys.argv[3]
                fd = os.open(mnt, os.O_RDONLY | os.O_DIRECT)
                before = rd(fd, 0)
                os.remove(target)
                time.sleep(0.3)
                soon = rd(fd, 1 << 16)
                listed = os.path.basename(mnt) in os.listdir(root)
                time.sleep(1.3)
                print(json.dumps({"before": before, "soon": soon, "later": rd(fd, 3 << 20), "size": os.fstat(fd).st_size,
                                  "listed": listed, "exists": os.path.exists(mnt)}))
                os.close(fd)
                """, [mount.path(volume), scratch.path("pool/\(volume)"), mount.mountpoint], in: scratch)
            #expect(result["before"] as? String == pattern && result["soon"] as? String == pattern
                    && result["later"] as? String == pattern, "\(volume): \(result)")
            #expect(result["size"] as? Int == 4 << 20)
            #expect(result["listed"] as? Bool == false && result["exists"] as? Bool == false, "\(volume) left the tree: \(result)")
            #expect(Self.log(of: mount).contains("volume \(volume): left the pool while open"), "\(Self.log(of: mount))")
        }
        usleep(300_000)
        #expect(try Self.deletedFilesHeld(by: mount, in: scratch).isEmpty, "a deleted image stays open after its last close")
    }

    // MARK: 5. A backing file goes away

    @Test func aBackingFileThatDisappearsFailsTheOpenAndSaysWhy() throws {
        let scratch = try Scratch()
        try scratch.sh("""
            mkdir pool && qemu-img create -q -f qcow2 base.qcow2 1M && qemu-io -c 'write -P 0x66 0 1M' base.qcow2 >/dev/null &&
            qemu-img create -q -f qcow2 -b \(scratch.path("base.qcow2")) -F qcow2 pool/over.qcow2 &&
            qemu-img create -q -f qcow2 pool/good.qcow2 1M && qemu-io -c 'write -P 0x67 0 1M' pool/good.qcow2 >/dev/null
            """)
        // The base lies outside the pool, in a directory the mount allows.
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: ["backing_dirs=\(scratch.dir)"])
        defer { mount.unmount() }
        #expect(try scratch.sh("timeout 10 head -c 1 '\(mount.path("over.qcow2"))' | od -An -tx1") == " 66\n")
        try scratch.sh("mv base.qcow2 base.away && sleep 0.3")
        #expect(throws: ShellError.self, "opening the overlay must fail") { try scratch.sh("timeout 10 head -c 1 '\(mount.path("over.qcow2"))' >/dev/null") }
        let open = try scratch.sh("timeout 10 python3 -c \"import os\ntry: os.open('\(mount.path("over.qcow2"))', os.O_RDONLY)\nexcept OSError as e: print(e.errno)\"")
        #expect(open == "\(EIO)\n")
        let why = try scratch.sh("timeout 10 getfattr --only-values -n user.poolfs.error '\(mount.path("over.qcow2"))'")
        #expect(why.contains(scratch.path("base.qcow2")) && why.contains("No such file or directory"), "\(why)")
        let ls = try scratch.sh("timeout 10 '\(Binary.path)' ls -o backing_dirs=\(scratch.dir) pool")
        #expect(ls.contains("error: open \(scratch.path("base.qcow2")): No such file or directory"), "\(ls)")
        #expect(Self.log(of: mount).contains("volume over.qcow2: open \(scratch.path("base.qcow2")): No such file or directory"))
        #expect(try scratch.sh("timeout 10 head -c 1 '\(mount.path("good.qcow2"))' | od -An -tx1") == " 67\n", "other volumes keep working")
        // The backing file back: the overlay opens again (a failed open is retried after 2 s).
        try scratch.sh("mv base.away base.qcow2 && sleep 2.2")
        #expect(try scratch.sh("timeout 10 head -c 1 '\(mount.path("over.qcow2"))' | od -An -tx1") == " 66\n")
    }

    // MARK: 6. An LVM physical volume vanishes

    /// A VG on two loop devices mounted with `-o noactivate`: after the first PV's loop device is
    /// detached (deferred while poolfs holds it open) and its file truncated, reads of the LV on
    /// it fail with EIO at once, logged; the LV on the other PV reads on.
    @Test func aVanishedPhysicalVolumeGivesEIOWithoutHanging() throws {
        let scratch = try Scratch()
        let group = try LoopVolumeGroup("poolfsflt\(getpid())", in: scratch)
        let loops = group.loops
        defer {
            group.remove()
            _ = try? scratch.sh("losetup -d \(loops.joined(separator: " ")) 2>/dev/null")
        }
        let vg = group.name, lvm = LoopVolumeGroup.lvm
        try group.createVolume("-L 12M -n data")
        try scratch.sh("\(lvm) lvcreate -q --driverloaded n -an -Zn -L 8M -n other \(vg) \(loops[1])")
        #expect(try scratch.sh("\(lvm) lvs --noheadings -o seg_pe_ranges \(vg)/other").trimmingCharacters(in: .whitespacesAndNewlines) == "\(loops[1]):0-1")
        // pe_start is 1 MiB: `data` is pv0's bytes 1-13 MiB, `other` pv1's bytes 1-9 MiB.
        try scratch.sh("""
            head -c 12582912 /dev/urandom > data.expected && dd if=data.expected of=pv0 bs=1M seek=1 conv=notrunc status=none &&
            head -c 8388608 /dev/urandom > other.expected && dd if=other.expected of=pv1 bs=1M seek=1 conv=notrunc status=none
            """)
        let mount = try PoolMount(vg, in: scratch, options: ["type=logical", "noactivate"])
        defer { mount.unmount() }
        try scratch.sh("timeout 20 cmp '\(mount.path("data"))' data.expected && timeout 20 cmp '\(mount.path("other"))' other.expected")

        // The kernel keeps the detach until poolfs closes the device; its cached pages go too.
        try scratch.sh("losetup -d \(loops[0]) && truncate -s 0 pv0 && blockdev --flushbufs \(loops[0])")
        let started = Date()
        do {
            try scratch.sh("timeout 20 dd if='\(mount.path("data"))' of=/dev/null bs=64k iflag=direct status=none")
            Issue.record("reading an LV whose PV is gone succeeded")
        } catch let error as ShellError {
            #expect(error.status == 1 && error.output.contains("Input/output error"), "\(error)")
        }
        #expect(Date().timeIntervalSince(started) < 10, "the failing read took \(Date().timeIntervalSince(started)) s")
        #expect(Self.log(of: mount).contains("volume data: pread \(loops[0]): Input/output error"), "\(Self.log(of: mount))")
        try scratch.sh("timeout 20 cmp '\(mount.path("other"))' other.expected")
        #expect(try scratch.sh("timeout 10 ls '\(mount.mountpoint)'").split(separator: "\n").sorted() == ["data", "other"])
    }
}
