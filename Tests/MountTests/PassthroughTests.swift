import Foundation
import TestSupport
import Testing

/// FUSE passthrough for raw volume files (the kernel reads them itself), and page caches kept
/// from one open to the next for images that did not change. How many reads reached the daemon
/// is the root's `user.poolfs.read_requests`.
@Suite("passthrough and kept caches", .serialized)
struct PassthroughTests {
    static func readRequests(_ mount: PoolMount, _ scratch: Scratch) throws -> Int {
        let text = try scratch.sh("getfattr --absolute-names --only-values -n user.poolfs.read_requests '\(mount.mountpoint)'")
        return try #require(Int(text.trimmingCharacters(in: .whitespacesAndNewlines)))
    }

    static func log(_ mount: PoolMount) -> String {
        (try? String(contentsOfFile: mount.log, encoding: .utf8)) ?? ""
    }

    /// The first four bytes at `offset` of `path`, in hex, read by a new open.
    static func head(_ path: String, _ scratch: Scratch, offset: Int = 0) throws -> String {
        try scratch.sh("od -An -tx1 -j \(offset) -N4 '\(path)' | tr -d ' \\n'")
    }

    static func makePool(_ scratch: Scratch) throws {
        try scratch.sh("""
            mkdir pool && head -c 8M /dev/urandom > pool/disk.raw &&
            qemu-img create -q -f qcow2 pool/vm.qcow2 8M && qemu-io -c 'write -P 0x11 0 4M' pool/vm.qcow2 >/dev/null
            """)
    }

    @Test func rawVolumesAreReadByTheKernel() throws {
        let scratch = try Scratch()
        try Self.makePool(scratch)
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        try scratch.sh("cmp '\(mount.path("disk.raw"))' pool/disk.raw")
        try scratch.sh("""
            python3 -c "import mmap,sys; f=open(sys.argv[1],'rb'); m=mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ); sys.exit(m[:]!=open(sys.argv[2],'rb').read())" '\(mount.path("disk.raw"))' pool/disk.raw
            """)
        #expect(Self.log(mount).contains("reads of raw volumes: FUSE passthrough"), "\(Self.log(mount))")
        #expect(try Self.readRequests(mount, scratch) == 0, "raw reads reached the daemon")
        // qcow2 is still read by the daemon.
        try scratch.sh("qemu-img convert -O raw pool/vm.qcow2 vm.raw && cmp '\(mount.path("vm.qcow2"))' vm.raw")
        #expect(try Self.readRequests(mount, scratch) > 0)
    }

    @Test(arguments: [("nopassthrough", "-o nopassthrough"), ("cow", "-o cow")])
    func optionsKeepTheDaemonPath(option: String, reason: String) throws {
        let scratch = try Scratch()
        try Self.makePool(scratch)
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: [option])
        defer { mount.unmount() }
        try scratch.sh("cmp '\(mount.path("disk.raw"))' pool/disk.raw")
        #expect(Self.log(mount).contains("reads of raw volumes: through the daemon: \(reason)"), "\(Self.log(mount))")
        #expect(try Self.readRequests(mount, scratch) > 0)
        if option == "cow" {
            // Writes go to the overlay, never to the file.
            try scratch.sh("dd if=/dev/zero of='\(mount.path("disk.raw"))' bs=4k count=1 conv=notrunc status=none")
            #expect(try Self.head(mount.path("disk.raw"), scratch) == "00000000")
            try scratch.sh("! cmp -s '\(mount.path("disk.raw"))' pool/disk.raw")
        }
    }

    @Test func writableMountsWriteTheFileThroughTheKernel() throws {
        let scratch = try Scratch()
        try Self.makePool(scratch)
        // Only a declared raw volume: a probed one is written through the daemon, which keeps its
        // first sector from turning into another format's header (TrustBoundaryFormatTests).
        #expect(runPoolfs("format set raw pool/disk.raw", in: scratch).status == 0)
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: ["rw"])
        defer { mount.unmount() }
        try scratch.sh("head -c 1M /dev/urandom > patch && dd if=patch of='\(mount.path("disk.raw"))' bs=64k seek=16 conv=notrunc,fsync status=none")
        try scratch.sh("cmp -n 1048576 -i 0:1048576 patch pool/disk.raw && cmp '\(mount.path("disk.raw"))' pool/disk.raw")
        try scratch.sh("qemu-img compare -f raw -F raw -U '\(mount.path("disk.raw"))' pool/disk.raw")
        #expect(try Self.readRequests(mount, scratch) == 0)
        #expect(Self.log(mount).contains("reads of raw volumes: FUSE passthrough"))
        // O_DIRECT at any alignment, as without passthrough: those reads and writes come to the daemon.
        try scratch.sh("""
            python3 - '\(mount.path("disk.raw"))' <<'PY'
            import os, sys
            fd = os.open(sys.argv[1], os.O_RDWR | os.O_DIRECT)
            os.pwrite(fd, b'direct', 4097)
            assert os.pread(fd, 2581, 4095)[2:8] == b'direct'
            assert open('pool/disk.raw', 'rb').read()[4097:4103] == b'direct'
            PY
            """)
        // The writer's lock is held while open, as without passthrough.
        try scratch.sh("""
            exec 3<>'\(mount.path("disk.raw"))'; ! qemu-io -c 'read 0 4k' pool/disk.raw 2>/dev/null; exec 3>&-
            """)
    }

    @Test func aReplacedFileIsReadOnANewOpenAndTheOldStaysOnItsHandle() throws {
        let scratch = try Scratch()
        try Self.makePool(scratch)
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        try scratch.sh("""
            exec 3<'\(mount.path("disk.raw"))' &&
            mv pool/disk.raw old.raw && head -c 8M /dev/urandom > pool/disk.raw && sleep 1.2 &&
            cmp '\(mount.path("disk.raw"))' pool/disk.raw && cmp /dev/fd/3 old.raw
            """)
        #expect(try Self.readRequests(mount, scratch) == 0)
    }

    @Test func aSecondReadOfAnUnchangedImageStaysInTheKernel() throws {
        let scratch = try Scratch()
        try Self.makePool(scratch)
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        try scratch.sh("cat '\(mount.path("vm.qcow2"))' > /dev/null")
        let first = try Self.readRequests(mount, scratch)
        #expect(first > 0)
        try scratch.sh("cat '\(mount.path("vm.qcow2"))' > /dev/null")
        #expect(try Self.readRequests(mount, scratch) == first, "the second read reached the daemon")
    }

    /// An image rewritten by qemu-io: a new open reads the new bytes at once, an open handle
    /// once the attributes expire (1 s), as before.
    @Test func aRewrittenImageIsNeverReadStale() throws {
        let scratch = try Scratch()
        try Self.makePool(scratch)
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        let file = mount.path("vm.qcow2")
        for (round, pattern) in ["77", "78", "79"].enumerated() {
            try scratch.sh("cat '\(file)' > /dev/null && cat '\(file)' > /dev/null")
            try scratch.sh("qemu-io -c 'write -P 0x\(pattern) \(round)M 1M' pool/vm.qcow2 >/dev/null")
            #expect(try Self.head(file, scratch, offset: round << 20) == String(repeating: pattern, count: 4))
        }
        try scratch.sh("""
            python3 - '\(file)' <<'PY'
            import os, subprocess, sys, time
            fd = os.open(sys.argv[1], os.O_RDONLY)
            assert os.pread(fd, 4, 0) == b'\\x77' * 4
            subprocess.run(['qemu-io', '-c', 'write -P 0x66 0 1M', 'pool/vm.qcow2'], check=True, stdout=subprocess.DEVNULL)
            time.sleep(1.2)
            got = os.pread(fd, 4, 0)
            assert got == b'\\x66' * 4, got
            PY
            """)
    }

    /// A raw file written in place (read through the daemon here, where pages are kept).
    @Test func aRawFileWrittenInPlaceIsNeverReadStale() throws {
        let scratch = try Scratch()
        try Self.makePool(scratch)
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: ["nopassthrough"])
        defer { mount.unmount() }
        let file = mount.path("disk.raw")
        try scratch.sh("cat '\(file)' > /dev/null && cat '\(file)' > /dev/null")
        let kept = try Self.readRequests(mount, scratch)
        try scratch.sh("cat '\(file)' > /dev/null")
        #expect(try Self.readRequests(mount, scratch) == kept)
        try scratch.sh("""
            exec 3<'\(file)' && head -c 4k /dev/zero | tr '\\0' '\\125' > p && dd if=p of=pool/disk.raw bs=4k seek=2 conv=notrunc status=none &&
            cmp '\(file)' pool/disk.raw && sleep 1.2 && cmp /dev/fd/3 pool/disk.raw
            """)
    }
}
