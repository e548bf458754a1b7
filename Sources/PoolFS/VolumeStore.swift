#if canImport(Glibc)
import Glibc
#endif
import Pools
import Qcow2
import Synchronization
import Locking

/// One volume as last opened: the image or why it failed, and what is derived from it lazily.
public final class OpenVolume: Sendable {
    public let name: String
    public let path: String
    /// The image file as stat'ed when opened; a different stat means reopen.
    public let identity: FileIdentity
    public let fileStat: stat
    public let image: Image?
    public let error: String?
    public let snapshotFiles: [(file: String, snapshot: Snapshot)]
    /// Snapshots the pool keeps as volumes (LVM): opened now, or why they cannot be read.
    public let poolSnapshots: [(file: String, device: Result<any BlockDevice, PoolSnapshotError>)]
    /// Where writes go while the volume is open for writing (`-o rw`); its files then change
    /// only through it, so they are not checked for changes.
    public let writer: (any VolumeWriter)?
    /// The pool's layout token when opened (see `Pool.generation`).
    let generation: String?
    /// When it was opened (monotonic nanoseconds).
    let openedAt: Int64
    /// When the volume's path was last checked (monotonic nanoseconds).
    let pathCheckedAt = Atomic<Int64>(0)
    private let allocation = Locked<[String: (bytes: UInt64, at: Int64)]>([:])

    convenience init(name: String, path: String, pool: any Pool, cache: BlockCache) {
        self.init(name: name, path: path, pool: pool, opened: Result { try pool.openImage(name, path: path, cache: cache) }, writer: nil)
    }

    init(name: String, path: String, pool: any Pool, opened: Result<Image, any Error>, writer: (any VolumeWriter)?) {
        self.name = name
        self.writer = writer
        self.path = path
        var st = Glibc.stat()
        _ = stat(path, &st)
        self.fileStat = st
        self.identity = FileIdentity(st)
        self.openedAt = Self.monotonicNanoseconds()
        self.generation = pool.generation(of: name)
        self.poolSnapshots = pool.snapshots(of: name).map { snapshot in
            (SnapshotNames.escape(snapshot.name), Result { try snapshot.open() }.mapError { PoolSnapshotError(message: "\($0)") })
        }
        do {
            let image = try opened.get()
            self.image = image
            self.error = nil
            self.snapshotFiles = SnapshotNames.files(for: image.snapshots)
            // QEMU's shared-read permission: a VM may still open the image for writing.
            if writer == nil { image.hostFiles.first?.lockForSharedReading() }
        } catch {
            self.image = nil
            self.error = "\(error)"
            self.snapshotFiles = []
        }
    }

    public func snapshot(file: String) -> Snapshot? {
        snapshotFiles.first { $0.file == file }?.snapshot
    }

    /// Data bytes of the live disk (`snapshot` nil) or of a snapshot: computed once per opened
    /// image, except the live disk of a volume open for writing, recounted at most once a second.
    func allocatedBytes(snapshot: Snapshot?) -> UInt64 {
        allocatedBytes(key: snapshot.map { "\($0.id)" } ?? "", changing: writer != nil && snapshot == nil) {
            snapshot.map { image?.device(of: $0) } ?? image?.live
        }
    }

    /// Data bytes of a snapshot the pool keeps (an LVM snapshot), once per opened volume.
    func allocatedBytes(poolSnapshot file: String, device: any BlockDevice) -> UInt64 {
        allocatedBytes(key: "pool/" + file, changing: false) { device }
    }

    private func allocatedBytes(key: String, changing: Bool, device: () -> (any BlockDevice)?) -> UInt64 {
        let now = Self.monotonicNanoseconds()
        if let known = allocation.withLock({ $0[key] }), !changing || now - known.at < Self.recountWrittenAfter {
            return known.bytes
        }
        let bytes = (try? device()?.allocatedBytes()) ?? 0
        allocation.withLock { $0[key] = (bytes, now) }
        return bytes
    }

    /// How often `st_blocks` of a volume being written is recounted (nanoseconds).
    static let recountWrittenAfter: Int64 = 1_000_000_000

    /// Whether this volume must be reopened: its file changed (or went away), a file of its
    /// chain changed, or it failed to open a while ago (a missing backing file may be back).
    func isStale(currentIdentity: FileIdentity?, generation current: String?, now: Int64) -> Bool {
        guard let currentIdentity, currentIdentity == identity, current == generation else { return true }
        guard let image else { return now - openedAt >= Self.retryFailedOpenAfter }
        // The top image was just compared; the rest of the chain and any data file remain.
        return image.hostFiles.dropFirst().contains { $0.changedOnDisk() }
    }

    /// Valid without a path lookup: checked by path recently, and no file of the chain modified
    /// in place since (fstat of each open descriptor).
    func isFreshByDescriptors(generation current: String?, now: Int64, pathCheckInterval: Int64) -> Bool {
        guard let image, now - pathCheckedAt.load(ordering: .relaxed) < pathCheckInterval, current == generation else {
            return false
        }
        return !image.hostFiles.contains { $0.modifiedInPlace() }
    }

    /// How long a volume that failed to open is left alone before the next try (nanoseconds).
    static let retryFailedOpenAfter: Int64 = 2_000_000_000

    static func monotonicNanoseconds() -> Int64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
        return Int64(ts.tv_sec) * 1_000_000_000 + Int64(ts.tv_nsec)
    }
}

/// Volumes by name, opened on first use and reopened whenever their files change, so that no
/// reader sees metadata older than the file. Nothing is opened at mount.
public final class VolumeStore: Sendable {
    public let pool: any Pool
    public let cache: BlockCache
    /// Whether volumes that fail to open are logged (a mount) or only reported (`poolfs ls`).
    let logsFailures: Bool
    /// `-o rw`: volumes opened for writing write into their images.
    public let writesImages: Bool
    private let volumes = Locked<[String: OpenVolume]>([:])
    /// Volumes open for writing and their open handles; the writer closes with the last.
    private let writing = Locked<[String: (volume: OpenVolume, handles: Int)]>([:])
    /// Volumes open through the mount (any mode) and their open handles: while one is open, its
    /// backing files are locked for consistent reading, as QEMU locks them. They follow the
    /// kernel's open and release of the file, not the cached `OpenVolume`, which a stat alone
    /// opens and which outlives every use: writing a backing file stays allowed whenever no
    /// overlay above it is open, as it is with QEMU.
    private let opened = Locked<[String: (lock: BackingChainLock, handles: Int)]>([:])

    public init(pool: any Pool, cache: BlockCache, logsFailures: Bool = true, writesImages: Bool = false) {
        self.pool = pool
        self.cache = cache
        self.logsFailures = logsFailures
        self.writesImages = writesImages
    }

    /// Counts one more open handle on volume `name` (for reading or writing); the first locks
    /// the backing files of its chain for consistent reading (`BackingChainLock`). Fails when
    /// another program, or this mount, writes one of them.
    public func openHandle(_ name: String) throws {
        if opened.withLock({ opened in
            guard opened[name] != nil else { return false }
            opened[name]!.handles += 1
            return true
        }) { return }
        guard let image = volume(name)?.image else {
            // Nothing to read: the reads will fail, the count must still match the releases.
            return count(BackingChainLock(), for: name)
        }
        do {
            count(try image.lockBackingChain(), for: name)
        } catch {
            throw writerInThisMount(of: image).map { Qcow2Error.inUse("its backing file \($0) is open for writing through this mount") } ?? error
        }
    }

    /// Adds a handle with `lock`, or drops `lock` when another open took one meanwhile.
    private func count(_ lock: BackingChainLock, for name: String) {
        let extra: BackingChainLock? = opened.withLock { opened in
            guard opened[name] != nil else {
                opened[name] = (lock, 1)
                return nil
            }
            opened[name]!.handles += 1
            return lock
        }
        extra?.release()
    }

    /// Ends one handle of `openHandle`; the last unlocks the backing files.
    public func releaseHandle(_ name: String) {
        let last: BackingChainLock? = opened.withLock { opened in
            guard let open = opened[name] else { return nil }
            guard open.handles == 1 else {
                opened[name]!.handles = open.handles - 1
                return nil
            }
            opened[name] = nil
            return open.lock
        }
        last?.release()
    }

    /// The open volumes whose chain has the file at `path` below their top, by name.
    func overlaysHolding(_ path: String) -> [String] {
        guard let target = FileIdentity(path: path) else { return [] }
        return opened.withLock { opened in
            opened.filter { _, open in
                open.lock.files.contains { $0.identity.device == target.device && $0.identity.inode == target.inode }
            }.keys.sorted()
        }
    }

    /// The volume this mount writes that is a backing file of `image`, if any.
    private func writerInThisMount(of image: Image) -> String? {
        let below = image.backing?.hostFiles.map(\.identity) ?? []
        return writing.withLock { writing in
            writing.first { _, open in
                guard let top = open.volume.image?.hostFiles.first?.identity else { return false }
                return below.contains { $0.device == top.device && $0.inode == top.inode }
            }?.key
        }
    }

    /// Opens volume `name` for writing, or counts one more handle on its open writer. Fails when
    /// another program holds the image (a running VM), when an overlay open through this mount
    /// reads it as a backing file, or when it cannot be written safely.
    public func openForWriting(_ name: String) throws {
        try writing.withLock { writing in
            if let open = writing[name] {
                writing[name]!.handles = open.handles + 1
                return
            }
            guard let path = pool.volumePath(name) else { throw PoolError.notFound(name) }
            // The lock would refuse it too; this says which overlay holds it.
            let overlays = overlaysHolding(path)
            if !overlays.isEmpty {
                throw Qcow2Error.inUse("\(name) is a backing file of \(overlays.joined(separator: ", ")), open through this mount: it stays read-only until they are closed")
            }
            let image = try pool.openWritableImage(name, path: path, cache: cache)
            let writer = try image.makeWriter()
            let volume = OpenVolume(name: name, path: path, pool: pool, opened: .success(image), writer: writer)
            volumes.withLock { $0[name] = volume }
            writing[name] = (volume, 1)
        }
    }

    /// Ends one write handle; the last flushes the volume, marks it clean and unlocks it. The
    /// next use reopens it read-only.
    public func releaseWriting(_ name: String) {
        writing.withLock { writing in
            guard let open = writing[name] else { return }
            if open.handles > 1 {
                writing[name]!.handles = open.handles - 1
                return
            }
            writing[name] = nil
            volumes.withLock { if $0[name] === open.volume { $0[name] = nil } }
            close(open.volume)
        }
    }

    /// At unmount: flushes and closes every volume still open for writing.
    public func closeWriters() {
        let open = writing.withLock { writing in
            defer { writing.removeAll() }
            return writing.values.map(\.volume)
        }
        open.forEach(close)
    }

    private func close(_ volume: OpenVolume) {
        do {
            try volume.writer?.close()
        } catch {
            Log.error("volume \(volume.name): closing for writing: \(error)")
        }
    }

    /// How often a volume's path is looked up again: an image modified in place is seen at once
    /// (fstat of its descriptors on every call); one replaced or renamed in the pool within this.
    static let pathCheckInterval: Int64 = 100_000_000

    /// The current state of volume `name`, or nil when the pool has no such volume.
    public func volume(_ name: String) -> OpenVolume? {
        let now = OpenVolume.monotonicNanoseconds()
        let known = volumes.withLock { $0[name] }
        if let known, known.writer != nil { return known }
        if let known,
           known.isFreshByDescriptors(generation: pool.generation(of: name), now: now, pathCheckInterval: Self.pathCheckInterval) {
            return known
        }
        guard let path = pool.volumePath(name) else {
            volumes.withLock { $0[name] = nil }
            return nil
        }
        if let known = volumes.withLock({ $0[name] }), known.path == path,
           !known.isStale(currentIdentity: FileIdentity(path: path), generation: pool.generation(of: name), now: now) {
            known.pathCheckedAt.store(now, ordering: .relaxed)
            return known
        }
        // Opening reads the header and snapshot table: done outside the lock.
        let fresh = OpenVolume(name: name, path: path, pool: pool, cache: cache)
        fresh.pathCheckedAt.store(now, ordering: .relaxed)
        if logsFailures, let error = fresh.error { Log.warning("volume \(name): \(error)") }
        volumes.withLock { $0[name] = fresh }
        return fresh
    }

    public func volumeNames() -> [String] {
        let names = (try? pool.volumeNames()) ?? []
        // Forget volumes that left the pool, so their files close.
        let present = Set(names)
        volumes.withLock { open in
            for (name, volume) in open where !present.contains(name) && volume.writer == nil { open[name] = nil }
        }
        return names
    }
}

/// Why a pool snapshot cannot be read, as its open said.
public struct PoolSnapshotError: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}
