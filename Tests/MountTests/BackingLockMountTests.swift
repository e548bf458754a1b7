import Foundation
import TestSupport
import Testing

/// QEMU's consistent read through a mount: while a process holds an overlay open, the files
/// below it refuse writers (qemu-io, qemu-img, and with `-o rw` the mount itself) and admit
/// readers; once the last handle is closed, writing them works again.
@Suite("backing files of open overlays", .serialized)
struct BackingLockMountTests {

    /// base.qcow2 <- mid.qcow2 <- over.qcow2 (with a snapshot), and other.qcow2 over base.qcow2.
    static func makePool(in scratch: Scratch) throws {
        try scratch.sh("""
            mkdir pool && cd pool &&
            qemu-img create -q -f qcow2 base.qcow2 4M && qemu-io -c 'write -P 0x11 0 1M' base.qcow2 >/dev/null &&
            qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 &&
            qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 over.qcow2 && qemu-img snapshot -c snap over.qcow2 &&
            qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 other.qcow2
            """)
    }

    /// A process holding `path` open on descriptor 3 (`exec 3<`), until `close`.
    final class Holder {
        let process = Process()

        init(_ path: String, in scratch: Scratch) throws {
            let opened = scratch.path("held-\(UUID().uuidString)")
            process.executableURL = URL(fileURLWithPath: "/bin/sh")
            process.arguments = ["-c", #"exec 3<"$1" && touch "$2" && exec sleep 600"#, "sh", path, opened]
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle.nullDevice
            try process.run()
            guard FileLocks.wait(until: { FileManager.default.fileExists(atPath: opened) || !process.isRunning }),
                  process.isRunning else {
                close()
                throw ShellError(command: "exec 3<\(path)", status: process.terminationStatus, output: "could not open")
            }
        }

        /// Ends the process, and so its descriptor: the kernel then sends the release.
        func close() {
            guard process.isRunning else { return }
            // SIGKILL: children of Foundation's Process inherit this process's blocked SIGTERM.
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }

        deinit { close() }
    }



    /// Waits (the kernel sends a release after close returns) until qemu-io writes `file`.
    static func qemuWrites(_ file: String, in scratch: Scratch) -> Bool {
        FileLocks.wait { scratch.attempt("qemu-io -c 'write -P 0x11 0 4k' pool/\(file)").ok }
    }

    /// 0 when `path` opens with `flags` (and is closed again), else the errno.
    static func openError(_ path: String, _ flags: Int32) -> Int32 {
        let fd = open(path, flags)
        guard fd >= 0 else { return errno }
        close(fd)
        return 0
    }

    static func log(_ mount: PoolMount) -> String {
        (try? String(contentsOfFile: mount.log, encoding: .utf8)) ?? ""
    }

    @Test(arguments: [[String](), ["rw"]])
    func anOpenOverlayKeepsWritersOffItsBackingFiles(options: [String]) throws {
        let scratch = try Scratch()
        try Self.makePool(in: scratch)
        let rw = options.contains("rw")
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: options)
        defer { mount.unmount() }

        // Listed, read and closed: the overlay's image stays cached, nothing stays locked.
        try scratch.sh("ls -l '\(mount.mountpoint)' >/dev/null && head -c 4096 '\(mount.path("over.qcow2"))' >/dev/null")
        #expect(Self.qemuWrites("base.qcow2", in: scratch), "a base stays writable while no overlay is open")

        let over = try Holder(mount.path("over.qcow2"), in: scratch)
        #expect(FileLocks.qemuWriteRefused("pool/base.qcow2", in: scratch), "qemu-io wrote the base of an open overlay")
        #expect(FileLocks.qemuWriteRefused("pool/mid.qcow2", in: scratch), "qemu-io wrote the middle of an open overlay's chain")
        let resize = scratch.attempt("qemu-img resize -q pool/base.qcow2 8M")
        #expect(!resize.ok && resize.output.contains(FileLocks.qemuRefusal), "qemu-img resized the base of an open overlay: \(resize.output)")
        let read = scratch.attempt("qemu-io -r -c 'read -P 0x11 0 1M' pool/base.qcow2")
        #expect(read.ok && !read.output.contains("failed"), "qemu-io -r must still read the base: \(read.output)")
        #expect(Self.openError(mount.path("base.qcow2"), O_RDONLY) == 0, "the mount still reads the base")
        if rw {
            #expect(Self.openError(mount.path("base.qcow2"), O_RDWR) == EBUSY)
            #expect(Self.openError(mount.path("mid.qcow2"), O_RDWR) == EBUSY)
            #expect(Self.log(mount).contains("base.qcow2 is a backing file of over.qcow2"), "the log names the overlay:\n\(Self.log(mount))")
        }

        // The overlay changes on disk (its top is shared with writers) and the mount reopens its
        // image: the lock belongs to the open file, not to the image that was cached.
        #expect(scratch.attempt("qemu-io -c 'write -P 0x44 64k 4k' pool/over.qcow2").ok, "the overlay itself stays writable")
        let reread = try scratch.sh("head -c 69632 '\(mount.path("over.qcow2"))' | tail -c 4096 | tr -d '\\104' | wc -c")
        #expect(reread == "0\n", "the mount reads the overlay as changed")
        #expect(FileLocks.qemuWriteRefused("pool/base.qcow2", in: scratch), "reopening the overlay's image dropped the lock")

        // A second overlay of the same base: closing the first leaves the base locked.
        let other = try Holder(mount.path("other.qcow2"), in: scratch)
        over.close()
        #expect(Self.qemuWrites("mid.qcow2", in: scratch), "mid.qcow2 stayed locked after over.qcow2 was closed")
        #expect(FileLocks.qemuWriteRefused("pool/base.qcow2", in: scratch), "closing one overlay unlocked the base of another")
        if rw {
            #expect(Self.openError(mount.path("base.qcow2"), O_RDWR) == EBUSY)
            #expect(Self.log(mount).contains("base.qcow2 is a backing file of other.qcow2"), "\(Self.log(mount))")
        }
        other.close()
        #expect(Self.qemuWrites("base.qcow2", in: scratch), "the base stayed locked after its last overlay was closed")
        if rw {
            let fd = open(mount.path("base.qcow2"), O_RDWR)
            #expect(fd >= 0, "the mount refuses to write the base with no overlay open: errno \(errno)")
            #expect(pwrite(fd, [UInt8](repeating: 0x55, count: 4096), 4096, 0) == 4096)
            close(fd)
            #expect(FileLocks.wait { scratch.attempt("qemu-io -r -c 'read -P 0x55 0 4k' pool/base.qcow2").output.contains("read 4096/4096") },
                    "the write through the mount is in the base")
        }

        // An internal snapshot of the overlay reads the same chain.
        let snapshot = try Holder(mount.path(".snapshots/over.qcow2/snap"), in: scratch)
        #expect(FileLocks.qemuWriteRefused("pool/base.qcow2", in: scratch), "an open snapshot of the overlay left its base writable")
        snapshot.close()
        #expect(Self.qemuWrites("base.qcow2", in: scratch))
    }

    /// The other way round: while a backing file is written, by QEMU or through this mount,
    /// the overlay does not open (EBUSY), as QEMU does not open it either.
    @Test(arguments: [[String](), ["rw"]])
    func anOverlayDoesNotOpenWhileItsBaseIsWritten(options: [String]) throws {
        let scratch = try Scratch()
        try Self.makePool(in: scratch)
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: options)
        defer { mount.unmount() }
        do {
            let qemu = Process()
            qemu.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            qemu.arguments = ["qemu-io", "-c", "sleep 60000", scratch.path("pool/base.qcow2")]
            qemu.standardOutput = FileHandle.nullDevice
            qemu.standardError = FileHandle.nullDevice
            try qemu.run()
            defer {
                kill(qemu.processIdentifier, SIGKILL)
                qemu.waitUntilExit()
            }
            #expect(FileLocks.wait { FileLocks.bytes(of: scratch.path("pool/base.qcow2")).contains(101) }, "qemu-io did not lock the base")
            #expect(Self.openError(mount.path("over.qcow2"), O_RDONLY) == EBUSY)
            #expect(Self.log(mount).contains("holds 'write'"), "\(Self.log(mount))")
            let qemuRead = scratch.attempt("qemu-io -r -c 'read 0 4k' pool/over.qcow2")
            #expect(!qemuRead.ok && qemuRead.output.contains(#"Failed to get shared "write" lock"#), "QEMU agrees: \(qemuRead.output)")
            #expect(Self.openError(mount.path("base.qcow2"), O_RDONLY) == 0, "the base itself still reads")
        }
        #expect(Self.openError(mount.path("over.qcow2"), O_RDONLY) == 0)
        guard options.contains("rw") else { return }

        // close() returns before the kernel sends RELEASE, so the overlay opened just above may
        // still hold its base for a moment: the base opens for writing once it is let go.
        var base: Int32 = -1
        #expect(FileLocks.wait { base = open(mount.path("base.qcow2"), O_RDWR); return base >= 0 }, "errno \(errno)")
        #expect(Self.openError(mount.path("over.qcow2"), O_RDONLY) == EBUSY)
        #expect(Self.openError(mount.path("other.qcow2"), O_RDWR) == EBUSY)
        #expect(Self.log(mount).contains("its backing file base.qcow2 is open for writing through this mount"), "\(Self.log(mount))")
        let qemuRead = scratch.attempt("qemu-io -r -c 'read 0 4k' pool/over.qcow2")
        #expect(!qemuRead.ok && qemuRead.output.contains(#"Failed to get shared "write" lock"#), "QEMU agrees: \(qemuRead.output)")
        close(base)
        #expect(FileLocks.wait { Self.openError(mount.path("over.qcow2"), O_RDONLY) == 0 })
    }
}
