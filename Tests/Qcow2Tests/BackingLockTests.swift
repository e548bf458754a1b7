import Foundation
import Block
import TestSupport
import Testing

/// QEMU's consistent read of a backing chain (`Image.lockBackingChain`), with QEMU's own tools as
/// the oracle: the same lock bytes as `qemu-io -r` on the overlay, QEMU writers refused, QEMU
/// readers admitted, and each lock dropped only by its own release.
@Suite("backing chain locks", .serialized)
struct BackingLockTests {
    static let cache = BlockCache(capacityBytes: 1 << 20)

    /// base.qcow2 <- mid.qcow2 <- top.qcow2, and other.qcow2 over base.qcow2 too.
    static func chain(in scratch: Scratch) throws {
        try scratch.sh("""
            qemu-img create -q -f qcow2 base.qcow2 4M && qemu-io -c 'write -P 0x11 0 1M' base.qcow2 >/dev/null &&
            qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 &&
            qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 &&
            qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 other.qcow2
            """)
    }



    /// qemu-io holding `file` open (`qemu-io -r` with `readOnly`) until stopped, its locks in place.
    static func qemuHolding(_ file: String, readOnly: Bool, in scratch: Scratch) throws -> Process {
        let qemu = Process()
        qemu.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        qemu.arguments = ["qemu-io"] + (readOnly ? ["-r"] : []) + ["-c", "sleep 60000", file]
        // QEMU opens a relative data file name from its working directory.
        qemu.currentDirectoryURL = URL(fileURLWithPath: scratch.dir)
        qemu.standardOutput = FileHandle.nullDevice
        qemu.standardError = FileHandle.nullDevice
        try qemu.run()
        #expect(FileLocks.wait { !FileLocks.on(scratch.path(file)).isEmpty }, "qemu-io took no lock on \(file)")
        usleep(300_000)  // the rest of its locks, on the files below
        return qemu
    }

    static func stop(_ qemu: Process) {
        // SIGKILL: children of Foundation's Process inherit this process's blocked SIGTERM.
        kill(qemu.processIdentifier, SIGKILL)
        qemu.waitUntilExit()
    }

    /// The bytes QEMU locks on each backing file while it reads the overlay are the bytes this
    /// lock takes: consistent read used (100), write and resize refused (201, 203). The top file
    /// is left alone.
    @Test func locksTheBytesQemuLocks() throws {
        let scratch = try Scratch()
        try Self.chain(in: scratch)
        let below = ["base.qcow2", "mid.qcow2"].map(scratch.path)
        let qemu = try Self.qemuHolding("top.qcow2", readOnly: true, in: scratch)
        let qemuBytes = below.map(FileLocks.bytes)
        Self.stop(qemu)
        #expect(qemuBytes == [[100, 201, 203], [100, 201, 203]], "QEMU itself: \(qemuBytes)")
        #expect(below.allSatisfy { FileLocks.on($0).isEmpty })

        let image = try Image.open(path: scratch.path("top.qcow2"), cache: Self.cache)
        let lock = try image.lockBackingChain()
        #expect(below.map(FileLocks.bytes) == qemuBytes)
        #expect(below.allSatisfy { FileLocks.on($0).allSatisfy { $0.kind == "OFDLCK" && $0.type == "READ" } })
        #expect(FileLocks.on(scratch.path("top.qcow2")).isEmpty)
        lock.release()
        #expect(below.allSatisfy { FileLocks.on($0).isEmpty }, "release gives every byte back")
    }

    /// A raw backing file and the external data file of a backing image: QEMU 7.2 locks only
    /// some of these bytes there (100 on a raw backing file; 100 and 203 on a data file), this
    /// lock refuses writers on both all the same, since either write changes what is read.
    @Test func rawBackingFilesAndDataFilesAreLockedToo() throws {
        let scratch = try Scratch()
        try scratch.sh("""
            qemu-img create -q -f raw base.raw 4M &&
            qemu-img create -q -f qcow2 -o data_file=mid.data -b base.raw -F raw mid.qcow2 &&
            qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
            """)
        let below = ["base.raw", "mid.qcow2", "mid.data"].map(scratch.path)
        let qemu = try Self.qemuHolding("top.qcow2", readOnly: true, in: scratch)
        let qemuBytes = below.map(FileLocks.bytes)
        Self.stop(qemu)
        let image = try Image.open(path: scratch.path("top.qcow2"), cache: Self.cache)
        let lock = try image.lockBackingChain()
        for (file, theirs) in zip(below, qemuBytes) {
            #expect(FileLocks.bytes(of: file) == [100, 201, 203], "\(file)")
            #expect(Set(theirs).isSubset(of: [100, 201, 203]), "QEMU takes nothing more: \(file) \(theirs)")
        }
        #expect(FileLocks.qemuWriteRefused("-f raw base.raw", in: scratch))
        #expect(FileLocks.qemuWriteRefused("-f raw mid.data", in: scratch))
        lock.release()
        #expect(scratch.attempt("qemu-io -f raw -c 'write 0 4k' base.raw").ok)
    }

    /// While held, qemu-io and qemu-img cannot write or resize a backing file, at any depth;
    /// `qemu-io -r` still reads it, and the top stays open to writers (a VM may run on it).
    /// Once released, writing works.
    @Test func qemuWritersAreRefusedAndReadersAdmitted() throws {
        let scratch = try Scratch()
        try Self.chain(in: scratch)
        let image = try Image.open(path: scratch.path("top.qcow2"), cache: Self.cache)
        let lock = try image.lockBackingChain()
        #expect(FileLocks.qemuWriteRefused("base.qcow2", in: scratch))
        #expect(FileLocks.qemuWriteRefused("mid.qcow2", in: scratch))
        let resize = scratch.attempt("qemu-img resize -q base.qcow2 8M")
        #expect(!resize.ok && resize.output.contains(FileLocks.qemuRefusal), "\(resize.output)")
        let read = scratch.attempt("qemu-io -r -c 'read -P 0x11 0 1M' base.qcow2")
        #expect(read.ok && !read.output.contains("failed"), "\(read.output)")
        #expect(scratch.attempt("qemu-io -c 'write -P 0x33 0 4k' top.qcow2").ok)
        lock.release()
        #expect(scratch.attempt("qemu-io -c 'write -P 0x22 0 4k' base.qcow2").ok)
        #expect(scratch.attempt("qemu-io -c 'write -P 0x22 0 4k' mid.qcow2").ok)
    }

    /// Two overlays of one base each hold their own lock on it: releasing one, closing its image,
    /// or opening and closing the base once more leaves the other in place.
    @Test func locksOfTwoOverlaysAreTheirOwn() throws {
        let scratch = try Scratch()
        try Self.chain(in: scratch)
        let otherLock: BackingChainLock
        do {
            let top = try Image.open(path: scratch.path("top.qcow2"), cache: Self.cache)
            let other = try Image.open(path: scratch.path("other.qcow2"), cache: Self.cache)
            let topLock = try top.lockBackingChain()
            otherLock = try other.lockBackingChain()
            topLock.release()
            // top's image, its lock and a passing open of the base all close their descriptors here.
            _ = try HostFile(path: scratch.path("base.qcow2"))
        }
        #expect(FileLocks.qemuWriteRefused("base.qcow2", in: scratch), "other.qcow2 still reads base.qcow2")
        #expect(scratch.attempt("qemu-io -c 'write -P 0x22 0 4k' mid.qcow2").ok, "only top.qcow2 read mid.qcow2")
        otherLock.release()
        #expect(scratch.attempt("qemu-io -c 'write -P 0x22 0 4k' base.qcow2").ok)
    }

    /// A writer of a backing file, QEMU or this process through another descriptor, keeps the
    /// lock from being taken, and the lock keeps the writer out: QEMU refuses to open an overlay
    /// in the first case too.
    @Test func aWriterOfABackingFileExcludesTheLock() throws {
        let scratch = try Scratch()
        try Self.chain(in: scratch)
        let image = try Image.open(path: scratch.path("top.qcow2"), cache: Self.cache)
        do {
            let qemu = try Self.qemuHolding("base.qcow2", readOnly: false, in: scratch)
            defer { Self.stop(qemu) }
            #expect(throws: Qcow2Error.self) { try image.lockBackingChain() }
            let overlay = scratch.attempt("qemu-io -r -c 'read 0 4k' top.qcow2")
            #expect(!overlay.ok && overlay.output.contains(#"Failed to get shared "write" lock"#), "QEMU agrees: \(overlay.output)")
        }
        #expect(FileLocks.wait { FileLocks.on(scratch.path("base.qcow2")).isEmpty }, "a failed lock holds nothing")

        let writer = try HostFile(path: scratch.path("base.qcow2"), writable: true)
        try writer.lockForWriting()
        #expect(throws: Qcow2Error.self) { try image.lockBackingChain() }
        writer.unlockWriting()
        let lock = try image.lockBackingChain()
        #expect(throws: Qcow2Error.self) { try writer.lockForWriting() }
        lock.release()
        try writer.lockForWriting()
        writer.unlockWriting()
    }
}
