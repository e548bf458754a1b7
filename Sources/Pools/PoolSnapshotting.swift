#if canImport(Glibc)
import Glibc
#endif
import Block

/// Snapshot operations on one volume of a pool, for `poolfs snapshot create|revert|delete`.
///
/// Each pool type does them its own way (qcow2 internal snapshots written by poolfs's engine,
/// `zfs snapshot`, `rbd_snap_create`), behind one call: `Pool.snapshot(_:_:of:dryRun:)`. It
/// returns when the operation was done (or, in a dry run, could be done now); it throws
/// `SnapshotSkip` when the volume was left alone for a reason that is not a failure (no such
/// snapshot, in use, cannot hold snapshots), and any other error when it failed.
public enum SnapshotOperation: Sendable, Equatable {
    /// Takes a snapshot; one of the same name is replaced when `replace`, else the volume fails.
    case create(replace: Bool)
    /// Puts the volume back to the snapshot. `force` lets pools that keep snapshots in a line
    /// (ZFS) destroy the snapshots taken after it; without it they refuse.
    case revert(force: Bool)
    case delete

    public var verb: String {
        switch self {
        case .create: return "create"
        case .revert: return "revert"
        case .delete: return "delete"
        }
    }
}

/// Why a volume was left untouched: listed as skipped, not failed.
public enum SnapshotSkip: Error, Equatable, CustomStringConvertible {
    /// Revert or delete of a snapshot the volume does not have.
    case noSuchSnapshot
    /// Held by another user (a running VM, qemu-img, another RBD client): what is known of it.
    case inUse(String)
    /// A volume that cannot hold snapshots (a raw file in a dir pool), and why.
    case cannotHoldSnapshots(String)

    public var description: String {
        switch self {
        case .noSuchSnapshot: return "no such snapshot"
        case .inUse(let holder): return "in use: \(holder)"
        case .cannotHoldSnapshots(let why): return why
        }
    }
}

/// Why a snapshot operation failed on a volume, where it is the pool's own refusal.
public enum SnapshotError: Error, Equatable, CustomStringConvertible {
    case unsupported(pool: String)
    case noSuchVolume(String)
    /// Create of a name the volume already has, without `replace`.
    case exists(String)

    public var description: String {
        switch self {
        case .unsupported(let pool): return "\(pool): snapshots are not supported yet for this pool type"
        case .noSuchVolume(let name): return "no such volume \(name)"
        case .exists(let name): return "a snapshot named '\(name)' exists (--replace replaces it)"
        }
    }
}

extension Pool {
    public var snapshotRefusal: String? { "not supported yet for this pool type" }

    public func snapshot(_ operation: SnapshotOperation, _ name: String, of volume: String, dryRun: Bool) throws {
        throw SnapshotError.unsupported(pool: displayName)
    }

    public func snapshotLeavingPunch(_ operation: SnapshotOperation, _ name: String, of volume: String, dryRun: Bool) throws -> PendingPunch? {
        try snapshot(operation, name, of: volume, dryRun: dryRun)
        return nil
    }
}

extension DirectoryPool {
    public var snapshotRefusal: String? { nil }

    /// qcow2 internal snapshots, written by poolfs's own engine as `qemu-img snapshot -c/-a/-d`
    /// writes them. The image is opened for writing, so QEMU's image locks decide whether it is
    /// in use (the skip names the programs holding them, where /proc shows them); a raw file
    /// cannot hold snapshots.
    public func snapshot(_ operation: SnapshotOperation, _ name: String, of volume: String, dryRun: Bool) throws {
        try snapshotLeavingPunch(operation, name, of: volume, dryRun: dryRun)?.run()
    }

    /// `snapshot`, the clusters a revert or delete freed left to punch (`PendingPunch`), the
    /// image still locked until then.
    public func snapshotLeavingPunch(_ operation: SnapshotOperation, _ name: String, of volume: String, dryRun: Bool) throws -> PendingPunch? {
        guard let path = self.volume(volume)?.path else { throw SnapshotError.noSuchVolume(volume) }
        do {
            // The top image alone: a snapshot is written into it, whatever its backing files are.
            var options = imageOptions
            options.skipsBacking = true
            let image = try Image.open(path: path, cache: BlockCache(capacityBytes: 1 << 20), options: options, writable: true)
            // The file opened, wherever a symbolic link led: it must lie in the pool.
            guard let opened = image.hostFiles[0].openedPath, opened.hasPrefix(self.path + "/") else {
                throw SnapshotSkip.cannotHoldSnapshots("a symbolic link to a file outside the pool: poolfs snapshot writes only files in the pool")
            }
            // The kept decision, not the content: a raw disk with a qcow2 header written into it
            // by its guest stays raw (docs/security.md).
            guard let qcow2 = image.qcow2 else { throw SnapshotSkip.cannotHoldSnapshots(Self.noSnapshots(image.format)) }
            switch operation {
            case .create(let replace):
                if qcow2.snapshots.contains(where: { $0.name == name }), !replace { throw SnapshotError.exists(name) }
            case .revert, .delete:
                guard qcow2.snapshots.contains(where: { $0.name == name || $0.id == name }) else { throw SnapshotSkip.noSuchSnapshot }
            }
            if dryRun {
                // The lock decides whether it could be done now.
                try image.hostFiles[0].lockForWriting()
                image.hostFiles[0].unlockWriting()
                return nil
            }
            switch operation {
            case .create(let replace):
                try qcow2.createSnapshot(name: name, replace: replace)
                return nil
            case .revert: return try qcow2.revertToSnapshotLeavingPunch(name)
            case .delete: return try qcow2.deleteSnapshotLeavingPunch(name)
            }
        } catch Qcow2Error.unreadable(let format, _) {
            throw SnapshotSkip.cannotHoldSnapshots(Self.noSnapshots(Image.Format(rawValue: format) ?? .raw))
        } catch Qcow2Error.inUse(let why) {
            // QEMU's locks do not say whose they are; the holder's descriptors do.
            let holders = LockHolders.qemuLocks(on: path)
            throw SnapshotSkip.inUse(holders.isEmpty ? why : "\(holders.map(\.description).joined(separator: ", ")): \(why)")
        }
    }

    /// Why `poolfs snapshot` passes over a volume of `format`: only qcow2 keeps internal
    /// snapshots that qemu-img manages.
    static func noSnapshots(_ format: Image.Format) -> String {
        format == .raw ? "raw file: cannot hold internal snapshots"
            : "\(format.rawValue) image: poolfs writes internal snapshots only into qcow2 images (qemu-img manages none in \(format.rawValue))"
    }
}
