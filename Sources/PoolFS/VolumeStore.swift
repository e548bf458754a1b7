#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import FuseKit
import Pools
import Block
import Synchronization
import Locking

/// A volume's name and the file it named when the kernel looked it up. An image replaced under
/// the same name (renamed over, deleted and made again) is another file: another key, so another
/// node and another inode number. The kernel then keeps the two files' page caches apart, and
/// what is open on the old file stays on it.
public struct VolumeKey: Hashable, Sendable, CustomStringConvertible {
    public let name: String
    public let device: UInt64
    public let inode: UInt64

    public var description: String { name }
}

/// One volume as last opened: the image or why it failed, and what is derived from it lazily.
public final class OpenVolume: Sendable {
    public let name: String
    /// The volume's file or device, for volumes that have one.
    public let path: String?
    /// The image file as stat'ed when opened (or the attributes its pool gave, for a volume
    /// with no file); a different one means reopen.
    public let identity: FileIdentity
    public let fileStat: stat
    public let key: VolumeKey
    public let image: Image?
    public let error: String?
    /// The format the volume's image was recognised as, when it could not be read.
    public let recognisedFormat: String?
    public let snapshotFiles: [(file: String, snapshot: Snapshot)]
    /// Position in `snapshotFiles` by file name.
    private let snapshotIndex: [String: Int]
    /// Snapshots the pool keeps as volumes (LVM): opened now, or why they cannot be read.
    public let poolSnapshots: [(file: String, device: Result<any BlockDevice, PoolSnapshotError>)]
    /// When the pool's snapshots were taken, by file, where the pool says (RBD).
    public let poolSnapshotDates: [String: timespec]
    /// Where writes go while the volume is open for writing (`-o rw`); its files then change
    /// only through it, so they are not checked for changes.
    public let writer: (any VolumeWriter)?
    /// What the pool said of the volume when opened (see `Pool.properties`).
    public let properties: [(key: String, value: String)]
    /// The pool's layout token when opened (see `Pool.generation`).
    let generation: String?
    /// When it was opened (monotonic nanoseconds).
    let openedAt: Int64
    /// When the volume's path was last checked (monotonic nanoseconds).
    let pathCheckedAt = Atomic<Int64>(0)
    /// When the open descriptors were last found unmodified (monotonic nanoseconds; 0: never).
    let descriptorsCheckedAt = Atomic<Int64>(0)
    private let allocation = Locked<[String: (bytes: UInt64, at: Int64)]>([:])
    private let partitionTables = Locked<[String: (table: Result<PartitionTable?, PoolSnapshotError>, at: Int64)]>([:])

    convenience init(name: String, entry: PoolVolume, pool: any Pool, cache: BlockCache) {
        self.init(name: name, entry: entry, pool: pool, opened: Result { try pool.openImage(name, volume: entry, cache: cache) }, writer: nil)
    }

    init(name: String, entry: PoolVolume, pool: any Pool, opened: Result<Image, any Error>, writer: (any VolumeWriter)?) {
        self.name = name
        self.writer = writer
        self.path = entry.path
        let st = Self.fileStatus(of: try? opened.get(), entry: entry)
        self.fileStat = st
        self.identity = FileIdentity(st)
        self.key = VolumeKey(name: name, device: identity.device, inode: identity.inode)
        self.openedAt = Self.monotonicNanoseconds()
        self.generation = pool.generation(of: name)
        self.properties = pool.properties(of: name)
        let pooled = pool.snapshots(of: name)
        self.poolSnapshots = pooled.map { snapshot in
            (SnapshotNames.escape(snapshot.name), Result { try snapshot.open() }.mapError { PoolSnapshotError(message: "\($0)") })
        }
        self.poolSnapshotDates = Dictionary(pooled.compactMap { s in s.date.map { (SnapshotNames.escape(s.name), $0) } },
                                            uniquingKeysWith: { first, _ in first })
        do {
            let image = try opened.get()
            self.image = image
            self.error = nil
            self.recognisedFormat = nil
            let files = SnapshotNames.files(for: image.snapshots)
            self.snapshotFiles = files
            self.snapshotIndex = Dictionary(files.enumerated().map { ($0.element.file, $0.offset) }, uniquingKeysWith: { first, _ in first })
            // QEMU's shared-read permission: a VM may still open the image for writing.
            if writer == nil { image.hostFiles.first?.lockForSharedReading() }
        } catch {
            self.image = nil
            self.error = "\(error)"
            self.recognisedFormat = (error as? Qcow2Error)?.recognisedFormat
            self.snapshotFiles = []
            self.snapshotIndex = [:]
        }
    }

    /// The stat of the file opened (fstat of its descriptor), not of the path: a file renamed
    /// over the path between the open and a stat must not lend the image its identity. What the
    /// pool said for volumes not read through their own file (LVs read through their PVs, LUNs)
    /// or that failed to open.
    static func fileStatus(of image: Image?, entry: PoolVolume) -> Glibc.stat {
        if entry.path != nil, let file = image?.hostFiles.first, var st = file.currentStatus() {
            // Never more than the chain's other files grant (docs/security.md).
            st.st_mode &= ~image!.hiddenPermissions
            return st
        }
        return entry.status
    }

    /// The snapshot shown as `file`: one lookup, however many snapshots the image has.
    public func snapshot(file: String) -> Snapshot? {
        snapshotIndex[file].map { snapshotFiles[$0].snapshot }
    }

    /// Data bytes of the live disk (`snapshot` nil) or of a snapshot: computed once per opened
    /// image, except the live disk of a volume open for writing, recounted at most once a second.
    func allocatedBytes(snapshot: Snapshot?) -> UInt64 {
        allocatedBytes(key: snapshot.map { "\($0.id)" } ?? "", changing: writer != nil && snapshot == nil) { [image] in
            snapshot.map { image?.device(of: $0) } ?? image?.live
        }
    }

    /// Data bytes of a partition of the live disk (`snapshot` nil) or of a snapshot.
    func allocatedBytes(partition number: Int, snapshot: String?, device: any BlockDevice) -> UInt64 {
        allocatedBytes(key: "partition/\(snapshot ?? "")/\(number)", changing: writer != nil && snapshot == nil) { device }
    }

    /// The partition table of the live disk (`snapshot` nil) or of a snapshot: read on first use
    /// and kept, except the live disk of a volume open for writing, read again at most once a
    /// second. Disks with 4 KiB sectors are tried when none is found with 512-byte sectors.
    func partitionTable(snapshot file: String?, device: any BlockDevice) -> Result<PartitionTable?, PoolSnapshotError> {
        let key = file ?? ""
        let now = Self.monotonicNanoseconds()
        if let known = partitionTables.withLock({ $0[key] }),
           !(writer != nil && file == nil) || now - known.at < Self.recountWrittenAfter {
            return known.table
        }
        let table = Result {
            try PartitionTable.read(device) ?? PartitionTable.read(device, sectorSize: 4096)
        }.mapError { PoolSnapshotError(message: "\($0)") }
        // A failure (a read error) is not kept: the next look tries again.
        if case .success = table { partitionTables.withLock { $0[key] = (table, now) } }
        return table
    }

    /// Data bytes of a snapshot the pool keeps (an LVM snapshot), once per opened volume.
    func allocatedBytes(poolSnapshot file: String, device: any BlockDevice) -> UInt64 {
        allocatedBytes(key: "pool/" + file, changing: false) { device }
    }

    /// The count, off the request path (docs/security.md, "Bounded work"): a lookup waits for it
    /// at most `AllocationCounter.inlineWait`; past that it shows what it knew before, or the
    /// host files' own allocation (bounded by the disk size), and the count goes on beside it,
    /// for at most `AllocationCounter.budget`. A count that runs out of budget leaves the host
    /// files' figure for good.
    private func allocatedBytes(key: String, changing: Bool, device: @escaping @Sendable () -> (any BlockDevice)?) -> UInt64 {
        let now = Self.monotonicNanoseconds()
        let known = allocation.withLock { $0[key] }
        if let known, !changing || now - known.at < Self.recountWrittenAfter { return known.bytes }
        let standIn = known?.bytes ?? min(image?.virtualSize ?? 0, image?.hostFiles.reduce(0) { $0 + $1.allocatedBytes } ?? 0)
        let counted = AllocationCounter.shared.count(key: "\(ObjectIdentifier(self).hashValue)/\(key)") { [allocation] shouldStop in
            let bytes = (try? device()?.allocatedBytes(shouldStop: shouldStop)) ?? 0
            allocation.withLock { $0[key] = (bytes ?? standIn, Self.monotonicNanoseconds()) }
            if bytes == nil { Log.warning("st_blocks of \(key.isEmpty ? "a volume" : "snapshot " + key): counting stopped at its budget; showing its files' allocation") }
        }
        if counted { return allocation.withLock { $0[key]?.bytes } ?? standIn }
        return standIn
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
    /// in place since (fstat of each open descriptor), looked at once per `descriptorCheckInterval`
    /// at most: every read request asks, and at 80,000 4 KiB reads a second one fstat per file
    /// per request was 6% of the daemon's time.
    func isFreshByDescriptors(generation current: String?, now: Int64, pathCheckInterval: Int64,
                              descriptorCheckInterval: Int64) -> Bool {
        guard let image, now - pathCheckedAt.load(ordering: .relaxed) < pathCheckInterval, current == generation else {
            return false
        }
        if now - descriptorsCheckedAt.load(ordering: .relaxed) < descriptorCheckInterval { return true }
        guard !image.hostFiles.contains(where: { $0.modifiedInPlace() }) else { return false }
        descriptorsCheckedAt.store(now, ordering: .relaxed)
        return true
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
///
/// A name stands for one file at a time, the one it names now. What the kernel has open is
/// counted per file (`VolumeKey`): when the name comes to name another file, or nothing, the
/// volume of the old file is kept, with its descriptors, for as long as something has it open,
/// so an open image replaced or deleted in the pool keeps reading (and writing) the old file
/// until closed, as a local file would.
public final class VolumeStore: Sendable {
    public let pool: any Pool
    public let cache: BlockCache
    /// Whether volumes that fail to open are logged (a mount) or only reported (`poolfs ls`).
    let logsFailures: Bool
    /// `-o rw`: volumes opened for writing write into their images.
    public let writesImages: Bool

    private struct State {
        /// The volume each name stands for now.
        var current: [String: OpenVolume] = [:]
        /// Handles the kernel has open, per file.
        var handles: [VolumeKey: Int] = [:]
        /// Volumes of files with open handles that their name no longer names.
        var kept: [VolumeKey: OpenVolume] = [:]
        /// While a file has handles open, its backing files are locked for consistent reading,
        /// as QEMU locks them. The locks follow the kernel's open and release of the file, not
        /// the cached `OpenVolume`, which a stat alone opens and which outlives every use:
        /// writing a backing file stays allowed whenever no overlay above it is open, as it is
        /// with QEMU.
        var locks: [VolumeKey: BackingChainLock] = [:]

        /// Makes `name` stand for `fresh` (nil: nothing); the volume it stood for is kept while
        /// handles are open on its file. Returns the volume kept, if any.
        mutating func replace(_ name: String, with fresh: OpenVolume?) -> OpenVolume? {
            var keeping: OpenVolume?
            if let old = current[name], old.key != fresh?.key, handles[old.key, default: 0] > 0 {
                kept[old.key] = old
                keeping = old
            }
            if let fresh { kept[fresh.key] = nil }
            current[name] = fresh
            return keeping
        }
    }
    private let state = Locked(State())
    /// Told when a volume's file (or a file of its chain) is found changed in place: the same
    /// key, another image.
    public let changedInPlace = Locked<(@Sendable (VolumeKey) -> Void)?>(nil)
    /// Volumes open for writing and their write handles, per file; the writer closes with the last.
    private let writing = Locked<[VolumeKey: (volume: OpenVolume, handles: Int)]>([:])

    /// `pool`'s volumes under the names the tree shows (`TreeNames`).
    public init(pool: any Pool, cache: BlockCache, logsFailures: Bool = true, writesImages: Bool = false) {
        self.pool = TreeNamedPool(pool)
        self.cache = cache
        self.logsFailures = logsFailures
        self.writesImages = writesImages
    }

    // MARK: Handles

    /// Counts one more open handle on the file `key` stands for (for reading or writing); the
    /// first locks the backing files of its chain for consistent reading (`BackingChainLock`).
    /// Fails when another program, or this mount, writes one of them.
    public func retain(_ key: VolumeKey) throws {
        let counted = state.withLock { s in
            guard s.handles[key, default: 0] > 0 else { return false }
            s.handles[key]! += 1
            return true
        }
        if counted { return }
        var lock = BackingChainLock()
        // Nothing to read: the reads will fail, the count must still match the releases.
        if let image = try? volume(key).get().image {
            do {
                lock = try image.lockBackingChain()
            } catch {
                throw writerInThisMount(of: image).map { Qcow2Error.inUse("its backing file \($0) is open for writing through this mount") } ?? error
            }
        }
        // Another open may have taken the first handle meanwhile: its lock stands, this one goes.
        let extra: BackingChainLock? = state.withLock { s in
            s.handles[key, default: 0] += 1
            guard s.locks[key] == nil else { return lock }
            s.locks[key] = lock
            return nil
        }
        extra?.release()
    }

    /// Ends one handle; the last unlocks the backing files, and a volume kept for the file is let
    /// go (its descriptors close), as is the current one where the pool closes idle volumes.
    public func release(_ key: VolumeKey) {
        let closesIdle = pool.closesIdleVolumes
        let last: (lock: BackingChainLock?, kept: OpenVolume?, idle: OpenVolume?)? = state.withLock { s in
            let left = s.handles[key, default: 1] - 1
            guard left <= 0 else {
                s.handles[key] = left
                return nil
            }
            s.handles[key] = nil
            var idle: OpenVolume?
            if closesIdle, let current = s.current[key.name], current.key == key, current.writer == nil {
                idle = s.current.removeValue(forKey: key.name)
            }
            return (s.locks.removeValue(forKey: key), s.kept.removeValue(forKey: key), idle)
        }
        // Released outside the lock.
        last?.lock?.release()
    }

    /// The open volumes whose chain has the file `target` below their top, by name.
    func overlaysHolding(_ target: FileIdentity) -> [String] {
        return state.withLock { s in
            s.locks.filter { _, lock in
                lock.files.contains { $0.identity.device == target.device && $0.identity.inode == target.inode }
            }.keys.map(\.name).sorted()
        }
    }

    /// The volume this mount writes that is a backing file of `image`, if any.
    private func writerInThisMount(of image: Image) -> String? {
        let below = image.backing?.hostFiles.map(\.identity) ?? []
        return writing.withLock { writing in
            writing.first { _, open in
                guard let top = open.volume.image?.hostFiles.first?.identity else { return false }
                return below.contains { $0.device == top.device && $0.inode == top.inode }
            }?.key.name
        }
    }

    /// Opens the file `key` stands for for writing, or counts one more handle on its open
    /// writer. Fails when another program holds the image (a running VM), when an overlay open
    /// through this mount reads it as a backing file, or it cannot be written safely, or the
    /// name names another file now (ESTALE: the kernel looks it up again).
    public func openForWriting(_ key: VolumeKey) throws {
        try writing.withLock { writing in
            if let open = writing[key] {
                writing[key]!.handles = open.handles + 1
                return
            }
            guard let entry = pool.volume(key.name) else { throw PoolError.notFound(key.name) }
            // The lock would refuse it too; this says which overlay holds it.
            let overlays = entry.path == nil ? [] : overlaysHolding(entry.identity)
            if !overlays.isEmpty {
                throw Qcow2Error.inUse("\(key.name) is a backing file of \(overlays.joined(separator: ", ")), open through this mount: it stays read-only until they are closed")
            }
            let image = try pool.openWritableImage(key.name, volume: entry, cache: cache)
            // The volume opened is the one the key names (not a file put in its place meanwhile).
            // A pool whose volumes are read through another file than the one stat'ed (an LV
            // through its dm device, a PV stat'ed), or through no file, is asked again.
            let top = image.hostFiles.first.flatMap { $0.path == entry.path ? $0.identity : nil }
            guard let opened = top ?? pool.volume(key.name)?.identity,
                  opened.device == key.device, opened.inode == key.inode else { throw Errno.stale }
            let writer = try pool.makeWriter(key.name, image: image)
            let volume = OpenVolume(name: key.name, entry: entry, pool: pool, opened: .success(image), writer: writer)
            replace(key.name, with: volume)
            writing[key] = (volume, 1)
        }
    }

    /// Ends one write handle; the last flushes the volume, marks it clean and unlocks it. The
    /// next use reopens it read-only.
    public func releaseWriting(_ key: VolumeKey) {
        writing.withLock { writing in
            guard let open = writing[key] else { return }
            if open.handles > 1 {
                writing[key]!.handles = open.handles - 1
                return
            }
            writing[key] = nil
            // Flushed before it leaves the table: until then readers get the writer's image, whose
            // tables the file does not have yet; an image opened from the file now would be older
            // than what the writer acknowledged.
            close(open.volume)
            state.withLock { s in
                if s.current[key.name] === open.volume { s.current[key.name] = nil }
                if s.kept[key] === open.volume { s.kept[key] = nil }
            }
        }
    }

    /// The writer of the file `key` stands for, while it is open for writing.
    public func writer(_ key: VolumeKey) -> (any VolumeWriter)? {
        writing.withLock { $0[key]?.volume.writer }
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

    // MARK: Lookups

    /// How often a volume's path is looked up again: an image modified in place is seen within
    /// `descriptorCheckInterval` (fstat of its descriptors); one replaced or renamed in the pool
    /// within this.
    static let pathCheckInterval: Int64 = 100_000_000
    /// How long a volume's descriptors found unmodified stay trusted (nanoseconds): a change made
    /// in place (a VM writing its image) shows in reads that start 1 ms after it, or one tick of
    /// CLOCK_MONOTONIC_COARSE (4 ms at HZ=250), which the times are read from. Pages the kernel
    /// caches meanwhile are dropped as for any other change (`changedInPlace`).
    static let descriptorCheckInterval: Int64 = 1_000_000

    /// The volume `key` stands for: the name's current volume while the name still names that
    /// file, or the volume kept for handles still open on it. Fails with ESTALE when the name
    /// names another file now and nothing is open on the old one (the kernel looks the name up
    /// again), with ENOENT when the name names nothing, and with EIO when a kept file was
    /// changed since it was replaced (its cached metadata cannot be trusted, and the name no
    /// longer leads to it to open it again).
    public func volume(_ key: VolumeKey) -> Result<OpenVolume, Errno> {
        let current = volume(key.name)
        if let current, current.key == key { return .success(current) }
        guard let kept = state.withLock({ $0.kept[key] }) else {
            return .failure(current == nil ? .noEntry : .stale)
        }
        if kept.writer == nil, let image = kept.image, image.hostFiles.contains(where: { $0.contentChanged() }) {
            Log.error("volume \(key.name): the file it named when opened was replaced in the pool, then changed; close it and open it again")
            return .failure(.io)
        }
        return .success(kept)
    }

    /// The current state of volume `name`, or nil when the pool has no such volume.
    public func volume(_ name: String) -> OpenVolume? {
        let now = OpenVolume.monotonicNanoseconds()
        let known = state.withLock { $0.current[name] }
        if let known, known.writer != nil {
            // Written through us: its file changes only through us, so only whether the name
            // still names it is checked.
            if now - known.pathCheckedAt.load(ordering: .relaxed) < Self.pathCheckInterval { return known }
            if let id = pool.volume(name)?.identity, id.device == known.key.device, id.inode == known.key.inode {
                known.pathCheckedAt.store(now, ordering: .relaxed)
                return known
            }
        } else if let known,
                  known.isFreshByDescriptors(generation: pool.generation(of: name), now: now, pathCheckInterval: Self.pathCheckInterval,
                                             descriptorCheckInterval: Self.descriptorCheckInterval) {
            return known
        }
        guard let entry = pool.volume(name) else {
            replace(name, with: nil)
            return nil
        }
        if let known = state.withLock({ $0.current[name] }), known.writer == nil, known.path == entry.path,
           !known.isStale(currentIdentity: entry.identity, generation: pool.generation(of: name), now: now) {
            known.pathCheckedAt.store(now, ordering: .relaxed)
            return known
        }
        // Opening reads the header and snapshot table: done outside the lock.
        let fresh = OpenVolume(name: name, entry: entry, pool: pool, cache: cache)
        fresh.pathCheckedAt.store(now, ordering: .relaxed)
        if logsFailures, let error = fresh.error { Log.warning("volume \(name): \(error)") }
        if let writer = replace(name, with: fresh, unlessWritten: true) { return writer }
        if let previous = known, previous.key == fresh.key, previous.image != nil,
           let changed = changedInPlace.withLock({ $0 }) {
            changed(fresh.key)
        }
        return fresh
    }

    /// What `name` stood for when last looked at, without looking again (readdir's inode hints).
    func lastKnownVolume(_ name: String) -> OpenVolume? {
        state.withLock { $0.current[name] }
    }

    public func volumeNames() -> [String] {
        let names = (try? pool.volumeNames()) ?? []
        // Forget volumes that left the pool, so their files close (unless open).
        let present = Set(names)
        let gone = state.withLock { $0.current.keys.filter { !present.contains($0) } }
        for name in gone { replace(name, with: nil) }
        return names
    }

    /// `State.replace`, saying in the log when an open file is kept.
    /// With `unlessWritten`, a volume of the same file opened for writing meanwhile stays (the
    /// file does not have its writer's unflushed tables) and is returned instead.
    @discardableResult
    private func replace(_ name: String, with fresh: OpenVolume?, unlessWritten: Bool = false) -> OpenVolume? {
        let (writer, kept): (OpenVolume?, OpenVolume?) = state.withLock { s in
            if unlessWritten, let current = s.current[name], current.writer != nil, current.key == fresh?.key { return (current, nil) }
            return (nil, s.replace(name, with: fresh))
        }
        if let writer { return writer }
        guard let kept else { return nil }
        let what = fresh == nil ? "left the pool" : "names another file now"
        Log.info("volume \(name): \(what) while open; what is open stays on the old file (\(kept.path ?? "a volume with no path"), inode \(kept.key.inode)) until closed")
        return nil
    }
}

/// Why a pool snapshot cannot be read, as its open said.
public struct PoolSnapshotError: Error, CustomStringConvertible {
    public var message: String
    public var description: String { message }
}

/// Runs st_blocks counts on one thread beside the request path, each with a budget.
final class AllocationCounter: Sendable {
    static let shared = AllocationCounter()
    /// How long a lookup waits for a count before it shows the stand-in.
    static let inlineWait = 0.25
    /// How long one count may run.
    static let budget: Int64 = 10_000_000_000

    private let queue = DispatchQueue(label: "poolfs.st_blocks")
    private let pending = Locked<[String: DispatchSemaphore]>([:])

    /// Starts `work` for `key` unless it runs already, and waits up to `inlineWait` for it.
    /// Whether it finished meanwhile.
    func count(key: String, _ work: @escaping @Sendable (_ shouldStop: () -> Bool) -> Void) -> Bool {
        let (done, start) = pending.withLock { pending -> (DispatchSemaphore, Bool) in
            if let running = pending[key] { return (running, false) }
            let made = DispatchSemaphore(value: 0)
            pending[key] = made
            return (made, true)
        }
        if start {
            queue.async { [pending] in
                let deadline = OpenVolume.monotonicNanoseconds() + Self.budget
                work { OpenVolume.monotonicNanoseconds() > deadline }
                pending.withLock { _ = $0.removeValue(forKey: key) }
                // Every waiter wakes: a waiter takes one signal and passes it on.
                done.signal()
            }
        }
        guard done.wait(timeout: .now() + Self.inlineWait) == .success else { return false }
        done.signal()
        return true
    }
}
