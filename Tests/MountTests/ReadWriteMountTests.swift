import Foundation
import TestSupport
import Testing

/// `-o rw`: writes go into the images. fio writes and verifies random patterns through the mount;
/// afterwards qemu-img finds the images clean, snapshots and backing files unchanged, and a new
/// mount reads back what fio wrote.
@Suite("read-write mounts", .serialized)
struct ReadWriteMountTests {
    static let volumes = ["vm.qcow2", "top.qcow2", "disk.raw"]

    /// fio's job for `volume`: the same arguments write and, with --verify_only, check again.
    static func fio(_ path: String, seed: Int, verifyOnly: Bool = false) -> String {
        "fio --name=w --filename='\(path)' --rw=randwrite --bsrange=4k-192k --io_size=24M "
            + "--ioengine=psync --randrepeat=1 --randseed=\(seed) --verify=crc32c --verify_fatal=1 "
            + "--fsync=32 --output-format=terse \(verifyOnly ? "--verify_only" : "--do_verify=1")"
    }

    @Test func fioWritesLandInTheImagesAndEverythingElseStays() throws {
        let scratch = try Scratch()
        try scratch.sh("""
            mkdir pool && cd pool &&
            qemu-img create -q -f qcow2 vm.qcow2 64M && qemu-io -c 'write -P 1 0 8M' vm.qcow2 >/dev/null &&
            qemu-img snapshot -c before vm.qcow2 &&
            qemu-img create -q -f qcow2 base.qcow2 64M && qemu-io -c 'write -P 2 0 64M' base.qcow2 >/dev/null &&
            qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 &&
            qemu-img create -q -f qcow2 holes.qcow2 16M && qemu-io -c 'write -P 3 0 16M' holes.qcow2 >/dev/null &&
            truncate -s 32M disk.raw && md5sum base.qcow2 > ../base.md5 && cd .. &&
            cp pool/vm.qcow2 snap.qcow2 && qemu-img snapshot -a before snap.qcow2 && qemu-img convert -O raw snap.qcow2 snap.raw
            """)
        do {
            let mount = try PoolMount(scratch.path("pool"), in: scratch, options: ["rw"])
            defer { mount.unmount() }
            for (i, volume) in Self.volumes.enumerated() {
                try scratch.sh(Self.fio(mount.path(volume), seed: 100 + i))
            }
            // Snapshots stay read-only; the pool's tree takes no changes.
            #expect(throws: ShellError.self) { try scratch.sh("echo x > '\(mount.path(".snapshots/vm.qcow2/before"))'") }
            #expect(throws: ShellError.self) { try scratch.sh("touch '\(mount.path("new.qcow2"))'") }
            // Punched holes read as zeros and become zero clusters.
            try scratch.sh("fallocate -p -o 1M -l 3M '\(mount.path("holes.qcow2"))' && fallocate -z -o 9M -l 100k '\(mount.path("holes.qcow2"))'")
            try scratch.sh("cmp -n 3145728 -i 1048576:0 '\(mount.path("holes.qcow2"))' /dev/zero && cmp -n 102400 -i 9437184:0 '\(mount.path("holes.qcow2"))' /dev/zero")
        }
        for image in ["vm.qcow2", "top.qcow2", "holes.qcow2", "base.qcow2"] {
            try scratch.sh("qemu-img check pool/\(image)")
        }
        try scratch.sh("cd pool && md5sum -c ../base.md5")
        try scratch.sh("cp pool/vm.qcow2 snap.qcow2 && qemu-img snapshot -a before snap.qcow2 && qemu-img convert -O raw snap.qcow2 snap.after && cmp snap.raw snap.after")
        let map = try scratch.sh("qemu-img map --output=json pool/holes.qcow2")
        #expect(map.contains(#""start": 1048576, "length": 3145728, "depth": 0, "present": true, "zero": true, "data": false"#), "punched range is not a zero cluster run:\n\(map)")
        try scratch.sh("qemu-img convert -O raw pool/holes.qcow2 holes.raw && cmp -n 3145728 -i 1048576:0 holes.raw /dev/zero && test $(head -c 1048576 holes.raw | tr -d '\\3' | wc -c) = 0")

        let again = try PoolMount(scratch.path("pool"), in: scratch, options: ["rw"], name: "again")
        defer { again.unmount() }
        for (i, volume) in Self.volumes.enumerated() {
            try scratch.sh(Self.fio(again.path(volume), seed: 100 + i, verifyOnly: true))
        }
    }

    /// What a user does: a new ext4 made through a loop device (mkfs discards the whole disk, the
    /// loop driver turns that into punched holes), files copied in, everything unmounted; the
    /// image checks clean, its snapshot still reads as before, and the files are in the image.
    @Test func mkfsAndFilesThroughALoopDeviceLandInTheImage() throws {
        let scratch = try Scratch()
        try scratch.sh("""
            mkdir pool inside && qemu-img create -q -f qcow2 pool/guest.qcow2 128M &&
            qemu-io -c 'write -P 9 0 32M' pool/guest.qcow2 >/dev/null && qemu-img snapshot -c old pool/guest.qcow2 &&
            cp pool/guest.qcow2 old.qcow2 && qemu-img snapshot -a old old.qcow2 && qemu-img convert -O raw old.qcow2 old.raw &&
            head -c 5000000 /dev/urandom > payload
            """)
        do {
            let mount = try PoolMount(scratch.path("pool"), in: scratch, options: ["rw"])
            defer { mount.unmount() }
            try scratch.sh("mkfs.ext4 -q -F -E discard '\(mount.path("guest.qcow2"))'")
            try scratch.sh("mount -o loop '\(mount.path("guest.qcow2"))' inside && cp payload inside/ && mkdir inside/dir && echo hello > inside/dir/note && umount inside")
        }
        try scratch.sh("qemu-img check pool/guest.qcow2")
        try scratch.sh("cp pool/guest.qcow2 snap.qcow2 && qemu-img snapshot -a old snap.qcow2 && qemu-img convert -O raw snap.qcow2 snap.raw && cmp snap.raw old.raw")
        try scratch.sh("qemu-img convert -O raw pool/guest.qcow2 now.raw && mount -o loop,ro now.raw inside && cmp payload inside/payload && grep -q hello inside/dir/note && umount inside")
        // The discard gave back what the snapshot does not hold: far less than 128 MiB is data.
        let map = try scratch.sh("qemu-img map --output=json pool/guest.qcow2")
        let dataBytes = try (JSONSerialization.jsonObject(with: Data(map.utf8)) as! [[String: Any]])
            .filter { $0["data"] as? Bool == true }.reduce(0) { $0 + (($1["length"] as? NSNumber)?.intValue ?? 0) }
        #expect(dataBytes < 16 << 20, "\(dataBytes) bytes of data after mkfs with discard")
    }

    /// A writer's open is FOPEN_DIRECT_IO: its pages go to the daemon without a copy into the FUSE
    /// file's page cache. The kernel is the oracle: after the write, mincore(2) on a reader's
    /// mapping finds none of the written range cached (a buffered write leaves it all there); the
    /// reader, which read the range before, reads the new bytes; a MAP_SHARED mapping of the
    /// writer (FUSE_DIRECT_IO_ALLOW_MMAP) writes too; and QEMU reads both back from the image.
    /// With `cached_writes` the written range stays cached, and the rest holds as well.
    @Test(arguments: [false, true]) func writersGoUncachedAndStayCoherent(cachedWrites: Bool) throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir pool && qemu-img create -q -f qcow2 pool/vm.qcow2 16M && qemu-io -c 'write -P 1 0 4M' pool/vm.qcow2 >/dev/null")
        do {
            let mount = try PoolMount(scratch.path("pool"), in: scratch, options: cachedWrites ? ["rw,cached_writes"] : ["rw"])
            defer { mount.unmount() }
            let out = try scratch.sh("""
                python3 - '\(mount.path("vm.qcow2"))' <<'EOF'
                import ctypes, mmap, os, sys
                libc = ctypes.CDLL(None, use_errno=True)
                libc.mmap.restype = ctypes.c_void_p
                libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
                libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
                MiB = 1 << 20
                reader = os.open(sys.argv[1], os.O_RDONLY)
                assert os.pread(reader, MiB, 0) == bytes([1]) * MiB
                writer = os.open(sys.argv[1], os.O_RDWR)
                os.pwrite(writer, bytes([7]) * MiB, 0)
                view = libc.mmap(None, MiB, mmap.PROT_READ, mmap.MAP_SHARED, reader, 0)
                assert view != ctypes.c_void_p(-1).value, os.strerror(ctypes.get_errno())
                pages = ctypes.create_string_buffer(MiB // mmap.PAGESIZE)
                assert libc.mincore(view, MiB, pages) == 0, os.strerror(ctypes.get_errno())
                print("cached", sum(b & 1 for b in pages.raw))
                print("reader", os.pread(reader, MiB, 0) == bytes([7]) * MiB)
                shared = mmap.mmap(writer, MiB, mmap.MAP_SHARED, offset=2 * MiB)
                shared[:] = bytes([9]) * MiB
                shared.flush()
                shared.close()
                print("mapped", os.pread(reader, MiB, 2 * MiB) == bytes([9]) * MiB)
                os.close(writer)
                os.close(reader)
                EOF
                """)
            #expect(out == "cached \(cachedWrites ? 256 : 0)\nreader True\nmapped True\n", "\(out)")
        }
        try scratch.sh("qemu-img check pool/vm.qcow2")
        try scratch.sh("qemu-io -c 'read -P 7 0 1M' -c 'read -P 1 1M 1M' -c 'read -P 9 2M 1M' -c 'read -P 1 3M 1M' pool/vm.qcow2 | (! grep Pattern)")
    }

    /// A daemonized `-o rw` mount as a script uses it: `st_blocks` follows the writes, and
    /// `poolfs unmount` returns only when the daemon is done (image flushed, locks released,
    /// process gone), so qemu-img can run right after it.
    @Test func unmountWaitsForTheDaemonToFinish() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir pool mnt && qemu-img create -q -f qcow2 pool/vm.qcow2 64M")
        try scratch.sh("'\(Binary.path)' mount -o rw pool mnt")
        defer { _ = try? scratch.sh("fusermount3 -u mnt") }
        // st_blocks follows the writes while the volume stays open for writing (recounted at
        // most once a second).
        let fd = open(scratch.path("mnt/vm.qcow2"), O_RDWR)
        #expect(fd >= 0)
        usleep(1_100_000)  // past the kernel's attribute timeout: the next stat asks the daemon
        let blocksBefore = try scratch.sh("stat -c %b mnt/vm.qcow2")
        try scratch.sh("head -c 3000000 /dev/urandom > data && dd if=data of=mnt/vm.qcow2 bs=64k conv=notrunc status=none")
        usleep(1_200_000)
        let blocksAfter = try scratch.sh("stat -c %b mnt/vm.qcow2")
        #expect(Int(blocksAfter.dropLast())! >= Int(blocksBefore.dropLast())! + 5_000, "st_blocks \(blocksBefore) -> \(blocksAfter)")
        close(fd)
        usleep(100_000)
        try scratch.sh("'\(Binary.path)' unmount mnt")
        // "r[w]": the pattern must not match the shell that runs pgrep.
        let left = (try? scratch.sh("pgrep -f 'poolfs mount -o r[w] pool mnt'")) ?? ""
        #expect(left.isEmpty, "the daemon is still running after poolfs unmount returned: \(left)")
        try scratch.sh("qemu-img check pool/vm.qcow2 && qemu-img convert -O raw pool/vm.qcow2 vm.raw && cmp -n 3000000 vm.raw data")
    }

    /// One FUSE request per write: the kernel asks for security.capability (GETXATTR) before
    /// every write unless the daemon takes on clearing setuid, setgid and capabilities
    /// (FUSE_HANDLE_KILLPRIV_V2), which poolfs can, as its files never show those bits. The
    /// daemon's read(2) calls (/proc/PID/io `syscr`; one per request) count the requests.
    @Test func eachWriteIsOneRequest() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir pool && qemu-img create -q -f qcow2 pool/vm.qcow2 64M && chmod 6755 pool/vm.qcow2 && head -c 8192000 /dev/urandom > data")
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: ["rw"])
        defer { mount.unmount() }
        let file = mount.path("vm.qcow2")
        #expect(try scratch.sh("stat -c %a '\(file)'") == "755\n", "a volume shows no setuid or setgid bit")
        func reads() throws -> Int {
            let io = try String(contentsOfFile: "/proc/\(mount.process.processIdentifier)/io", encoding: .utf8)
            let line = try #require(io.split(separator: "\n").first { $0.hasPrefix("syscr:") })
            return try #require(Int(line.dropFirst("syscr:".count).trimmingCharacters(in: .whitespaces)))
        }
        let before = try reads()
        try scratch.sh("dd if=data of='\(file)' bs=4k count=2000 conv=notrunc status=none")
        let requests = try reads() - before
        #expect(requests < 2_200, "\(requests) requests for 2000 writes of 4 KiB")
        #expect(try scratch.sh("stat -c %a '\(file)'") == "755\n")
        #expect(PassthroughTests.log(mount).contains("FUSE_HANDLE_KILLPRIV_V2"), "\(PassthroughTests.log(mount))")
        mount.unmount()
        try scratch.sh("qemu-img check pool/vm.qcow2 && qemu-img convert -O raw pool/vm.qcow2 vm.raw && cmp -n 8192000 vm.raw data")
    }

    /// SIGKILL at random moments of a write workload, round after round: qemu-img check may find
    /// leaked clusters but never corruption, and every write fsync acknowledged is in the image.
    /// Each write goes to a slot of its own (96 KiB, across cluster boundaries), spread over the
    /// disk: over a snapshot's clusters (copy on write) and over unallocated space.
    @Test func killedMidWriteLosesNothingAcknowledged() throws {
        let scratch = try Scratch()
        let slot = 96 * 1024, slots = 10_000, perRound = 1_000, rounds = 10
        try scratch.sh("""
            mkdir pool && qemu-img create -q -f qcow2 pool/vm.qcow2 1G && qemu-io -c 'write -P 7 0 256M' pool/vm.qcow2 >/dev/null &&
            qemu-img snapshot -c base pool/vm.qcow2
            """)
        let writer = scratch.path("writer.py")
        try """
        import os, sys
        path, first, count, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
        fd = os.open(path, os.O_WRONLY)
        with open(log, "a") as out:
            for i in range(first, first + count):
                os.pwrite(fd, bytes([i % 251 + 1]) * \(slot), (i * 7919) % \(slots) * \(slot))
                if i % 3 == 0:
                    continue  # written, never synced: may be lost
                os.fsync(fd)
                out.write(f"{i}\\n")
                out.flush()
        """.write(toFile: writer, atomically: true, encoding: .utf8)
        var rng = SplitMix(seed: 42)
        var acknowledged: [Int] = []
        var killedMidWrite = 0
        for round in 0..<rounds {
            let mount = try PoolMount(scratch.path("pool"), in: scratch, options: ["rw"], name: "mnt\(round)")
            defer { mount.unmount() }
            let log = scratch.path("acked\(round)")
            FileManager.default.createFile(atPath: log, contents: nil)
            let python = Process()
            python.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            python.arguments = ["python3", writer, mount.path("vm.qcow2"), "\(round * perRound)", "\(perRound)", log]
            python.standardError = FileHandle.nullDevice
            try python.run()
            // From the first acknowledged write on: python's start-up alone can take longer than
            // the delay on a loaded machine (the soak runs beside this test).
            _ = FileLocks.wait(seconds: 30) { !python.isRunning || ((try? Data(contentsOf: URL(fileURLWithPath: log)))?.isEmpty == false) }
            usleep(UInt32.random(in: 50_000...500_000, using: &rng))
            kill(mount.process.processIdentifier, SIGKILL)
            python.waitUntilExit()
            mount.unmount()
            if python.terminationStatus != 0 { killedMidWrite += 1 }
            acknowledged += try String(contentsOfFile: log, encoding: .utf8).split(separator: "\n").compactMap { Int($0) }

            do {
                try scratch.sh("qemu-img check pool/vm.qcow2")
            } catch let error as ShellError {
                // 3: leaked clusters only. Anything else is corruption.
                #expect(error.status == 3, "round \(round): \(error.output)")
                #expect(!error.output.contains("ERROR"), "round \(round): \(error.output)")
            }
            // qemu-io checks each acknowledged slot's pattern.
            let reads = acknowledged.map { i in "-c 'read -q -P \(i % 251 + 1) \((i * 7919) % slots * slot) \(slot)'" }
            if !reads.isEmpty {
                let output = try scratch.sh("qemu-io -r \(reads.joined(separator: " ")) pool/vm.qcow2")
                #expect(!output.contains("failed"), "round \(round): a write acknowledged by fsync is not in the image: \(output.prefix(500))")
            }
        }
        #expect(killedMidWrite >= rounds / 2, "only \(killedMidWrite) of \(rounds) kills came while the workload ran")
        #expect(acknowledged.count > 100, "the workload hardly ran before each kill: \(acknowledged.count) writes")
        try scratch.sh("qemu-img check -r leaks pool/vm.qcow2 >/dev/null && qemu-img check pool/vm.qcow2")
    }

    /// QEMU's image locks: a running qemu-storage-daemon excludes poolfs's writes and the other way
    /// round; a read-only mount takes only the shared read permission and reports the writer.
    @Test func qemuLocksAreHonoredBothWays() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir pool && qemu-img create -q -f qcow2 pool/vm.qcow2 16M && qemu-io -c 'write -P 5 0 1M' pool/vm.qcow2 >/dev/null")
        let image = scratch.path("pool/vm.qcow2")
        let socket = scratch.path("nbd.sock")
        func startDaemon() throws -> Process {
            let qsd = Process()
            qsd.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            qsd.arguments = ["qemu-storage-daemon",
                             "--blockdev", "driver=file,node-name=file0,filename=\(image)",
                             "--blockdev", "driver=qcow2,node-name=disk0,file=file0",
                             "--nbd-server", "addr.type=unix,addr.path=\(socket)",
                             "--export", "type=nbd,id=exp0,node-name=disk0,writable=on"]
            let out = scratch.path("qsd.log")
            FileManager.default.createFile(atPath: out, contents: nil)
            qsd.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: out))
            qsd.standardError = qsd.standardOutput
            try qsd.run()
            let deadline = Date().addingTimeInterval(10)
            while !FileManager.default.fileExists(atPath: socket), qsd.isRunning, Date() < deadline { usleep(20_000) }
            return qsd
        }
        func stop(_ qsd: Process) {
            // SIGKILL: children of Foundation's Process inherit this process's blocked SIGTERM.
            kill(qsd.processIdentifier, SIGKILL)
            qsd.waitUntilExit()
            try? FileManager.default.removeItem(atPath: socket)
        }

        // A read-only mount does not keep a VM out, and says a writer is there.
        do {
            let mount = try PoolMount(scratch.path("pool"), in: scratch, name: "ro")
            defer { mount.unmount() }
            try scratch.sh("head -c 4096 '\(mount.path("vm.qcow2"))' >/dev/null")
            let qsd = try startDaemon()
            defer { stop(qsd) }
            #expect(qsd.isRunning, "qemu-storage-daemon could not open an image poolfs only reads: \((try? String(contentsOfFile: scratch.path("qsd.log"), encoding: .utf8)) ?? "")")
            let ls = try scratch.sh("'\(Binary.path)' ls --json pool")
            #expect(ls.contains(#""in_use_by_writer" : true"#), "poolfs ls does not report the writer:\n\(ls)")
        }

        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: ["rw"])
        defer { mount.unmount() }
        do {
            let qsd = try startDaemon()
            defer { stop(qsd) }
            #expect(qsd.isRunning)
            let refused = open(mount.path("vm.qcow2"), O_RDWR)
            let why = errno
            if refused >= 0 { close(refused) }
            #expect(refused < 0 && why == EBUSY, "opening an image a VM writes must fail with EBUSY (got \(refused), errno \(why))")
            #expect(try scratch.sh("head -c 1048576 '\(mount.path("vm.qcow2"))' | tr -d '\\5' | wc -c") == "0\n", "reads still work")
        }

        // poolfs writing: QEMU cannot open the image, until the file is closed.
        let fd = open(mount.path("vm.qcow2"), O_RDWR)
        #expect(fd >= 0, "open for writing once the VM is gone: errno \(errno)")
        #expect(throws: ShellError.self, "qemu-io opened an image poolfs is writing") {
            try scratch.sh("qemu-io -c 'read 0 4k' pool/vm.qcow2")
        }
        let qsd = try startDaemon()
        qsd.waitUntilExit()
        #expect(qsd.terminationStatus != 0, "qemu-storage-daemon opened an image poolfs is writing")
        close(fd)
        // The kernel sends the release after close returns: allow it a moment.
        var checked = false
        for _ in 0..<100 where !checked {
            checked = (try? scratch.sh("qemu-img check pool/vm.qcow2")) != nil
            if !checked { usleep(50_000) }
        }
        #expect(checked, "the image stayed locked after the last write handle closed")
    }
}
