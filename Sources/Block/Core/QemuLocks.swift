import CHostIO

/// QEMU's image locking (block/file-posix.c), so that poolfs and QEMU programs see each other.
/// QEMU holds a shared OFD lock on byte 100 + p for each permission p it uses, and on byte
/// 200 + p for each permission it refuses to share. Two users conflict when one uses what the
/// other refuses to share. A program reading an image also takes consistent read on each backing
/// file below it and refuses write and resize there (`BackingChainLock`).
public enum QemuPermission: UInt64, CaseIterable, Sendable {
    case consistentRead = 0, write = 1, writeUnchanged = 2, resize = 3

    var useByte: UInt64 { 100 + rawValue }
    var unshareByte: UInt64 { 200 + rawValue }

    var name: String {
        switch self {
        case .consistentRead: return "consistent read"
        case .write: return "write"
        case .writeUnchanged: return "write unchanged"
        case .resize: return "resize"
        }
    }
}

extension HostFile {
    /// Takes QEMU's shared "consistent read" permission, refusing nothing to others: a VM can
    /// still open the image for writing. Best effort; false when the lock cannot be taken.
    @discardableResult
    public func lockForSharedReading() -> Bool {
        poolfs_ofd_lock_byte(fd, QemuPermission.consistentRead.useByte, 0, 0) == 0
    }

    /// Whether another program holds the image for writing (QEMU's "write" permission).
    public var writerPresent: Bool {
        poolfs_ofd_byte_locked(fd, QemuPermission.write.useByte) == 1
    }

    /// Takes what QEMU takes to write an image: consistent read and write, refusing write and
    /// resize to others. Fails, holding nothing new, when another program writes the image or
    /// refuses to share writing (a running VM does both).
    public func lockForWriting() throws(Qcow2Error) {
        try takeLocks(uses: [.consistentRead, .write], refuses: [.write, .resize])
    }

    /// Gives back the write permission and the refusals, keeping the shared read.
    public func unlockWriting() {
        for byte in [QemuPermission.write.useByte, QemuPermission.write.unshareByte, QemuPermission.resize.unshareByte] {
            _ = poolfs_ofd_lock_byte(fd, byte, 0, 1)
        }
    }

    /// Takes what QEMU takes on a backing file while an overlay above it is read (block.c
    /// bdrv_default_perms_for_cow): consistent read, refusing write and resize to others, so that
    /// nothing changes what the overlay reads. Readers still share it. Fails, holding none of
    /// these bytes, when another program writes the file or refuses to share reading it.
    public func lockForConsistentReading() throws(Qcow2Error) {
        try takeLocks(uses: [.consistentRead], refuses: [.write, .resize])
    }

    /// Gives back what `lockForConsistentReading` took.
    public func unlockConsistentReading() {
        for byte in [QemuPermission.consistentRead.useByte, QemuPermission.write.unshareByte, QemuPermission.resize.unshareByte] {
            _ = poolfs_ofd_lock_byte(fd, byte, 0, 1)
        }
    }

    /// QEMU's raw_check_lock_bytes, raw_apply_lock_bytes, then the check again: two programs
    /// that take conflicting locks at the same moment each see the other's on the second look,
    /// so at most one of them succeeds. On failure the bytes taken here are given back.
    private func takeLocks(uses: [QemuPermission], refuses: [QemuPermission]) throws(Qcow2Error) {
        try checkLocks(uses: uses, refuses: refuses)
        var taken: [UInt64] = []
        func giveBack() { for t in taken { _ = poolfs_ofd_lock_byte(fd, t, 0, 1) } }
        for byte in uses.map(\.useByte) + refuses.map(\.unshareByte) {
            let r = poolfs_ofd_lock_byte(fd, byte, 0, 0)
            guard r == 0 else {
                giveBack()
                throw .inUse("\(path): cannot take lock byte \(byte) (errno \(-r))")
            }
            taken.append(byte)
        }
        do throws(Qcow2Error) {
            try checkLocks(uses: uses, refuses: refuses)
        } catch {
            giveBack()
            throw error
        }
    }

    private func checkLocks(uses: [QemuPermission], refuses: [QemuPermission]) throws(Qcow2Error) {
        for p in uses where poolfs_ofd_byte_locked(fd, p.unshareByte) == 1 {
            throw .inUse("\(path): another program (a VM, qemu-img, qemu-storage-daemon) refuses to share '\(p.name)'")
        }
        for p in refuses where poolfs_ofd_byte_locked(fd, p.useByte) == 1 {
            throw .inUse("\(path): another program (a VM, qemu-img, qemu-storage-daemon) holds '\(p.name)'")
        }
    }
}

/// QEMU's consistent read of a chain: while held, every backing file of an image (and any
/// external data file of one) refuses writers, as with a QEMU program reading the image.
/// It holds descriptors of its own, so its locks are its own: closing the image's files, or
/// another lock on the same backing file, leaves them in place; `release` (or the end of the
/// object) gives back exactly these.
public final class BackingChainLock: Sendable {
    /// The locked files, top first: each a separate open of a file of the image's chain.
    public let files: [HostFile]

    init(files: [HostFile]) {
        self.files = files
    }

    /// Holds nothing: the lock of an image without backing files.
    public convenience init() {
        self.init(files: [])
    }

    /// Gives the locks back; the descriptors close when the object goes.
    public func release() {
        for file in files { file.unlockConsistentReading() }
    }

    deinit { release() }
}

extension Image {
    /// Locks every backing file below this image for consistent reading (see `BackingChainLock`):
    /// the top file is not touched. Fails with `inUse` when another program writes a backing
    /// file, holding nothing.
    public func lockBackingChain() throws(Qcow2Error) -> BackingChainLock {
        var files: [HostFile] = []
        do throws(Qcow2Error) {
            // Files of network shares take no lock: neither libgfapi nor libnfs (nor QEMU's
            // gluster and nfs drivers) offer QEMU's byte locks (docs/network-pools.md).
            for file in backing?.hostFiles ?? [] where !file.isRemote {
                let own = try HostFile(reopening: file)
                try own.lockForConsistentReading()
                files.append(own)
            }
        } catch {
            // Unlocked, not just closed: a child being spawned may hold the descriptors a moment.
            for file in files { file.unlockConsistentReading() }
            throw error
        }
        return BackingChainLock(files: files)
    }
}
