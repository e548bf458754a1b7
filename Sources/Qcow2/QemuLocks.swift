import CHostIO

/// QEMU's image locking (block/file-posix.c), so that poolfs and QEMU programs see each other.
/// QEMU holds a shared OFD lock on byte 100 + p for each permission p it uses, and on byte
/// 200 + p for each permission it refuses to share. Two users conflict when one uses what the
/// other refuses to share.
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
        let uses: [QemuPermission] = [.consistentRead, .write]
        let refuses: [QemuPermission] = [.write, .resize]
        try checkLocks(uses: uses, refuses: refuses)
        var taken: [UInt64] = []
        for byte in uses.map(\.useByte) + refuses.map(\.unshareByte) {
            let r = poolfs_ofd_lock_byte(fd, byte, 0, 0)
            guard r == 0 else {
                for t in taken { _ = poolfs_ofd_lock_byte(fd, t, 0, 1) }
                throw .inUse("\(path): cannot take lock byte \(byte) (errno \(-r))")
            }
            taken.append(byte)
        }
        // Someone may have taken theirs between the check and ours: look again.
        do throws(Qcow2Error) {
            try checkLocks(uses: uses, refuses: refuses)
        } catch {
            unlockWriting()
            throw error
        }
    }

    /// Gives back the write permission and the refusals, keeping the shared read.
    public func unlockWriting() {
        for byte in [QemuPermission.write.useByte, QemuPermission.write.unshareByte, QemuPermission.resize.unshareByte] {
            _ = poolfs_ofd_lock_byte(fd, byte, 0, 1)
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
