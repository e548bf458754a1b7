#if canImport(Glibc)
import Glibc
#endif
import FuseKit
import Locking
import Pools
import Block
import Synchronization

/// The tree: volumes at the top, `.snapshots/<volume>/<snapshot>` below, all read-only; and
/// the partitions of each, `.partitions/<volume>/part<N>` and
/// `.partitions/.snapshots/<volume>/<snapshot>/part<N>` (see PartitionTree.swift).
/// Volumes, snapshot and partition files are nodes of the file their volume's name named when
/// looked up (`VolumeKey`): a name that comes to name another file is another node.
public enum Node: Hashable, Sendable, CustomStringConvertible {
    case root
    case snapshots
    case volume(VolumeKey)
    case snapshotDirectory(volume: String)
    case snapshot(VolumeKey, file: String)
    case partitions
    case partitionDirectory(volume: String)
    case partitionSnapshots
    case partitionSnapshotVolume(volume: String)
    case partitionSnapshotDirectory(VolumeKey, file: String)
    /// Partition `number` of the volume's live disk (`snapshot` nil) or of one of its snapshots.
    case partition(VolumeKey, snapshot: String?, number: Int)

    /// The volume file the node reads, for volumes, snapshots and partitions.
    var volumeKey: VolumeKey? {
        switch self {
        case .volume(let key), .snapshot(let key, _), .partition(let key, _, _): return key
        default: return nil
        }
    }

    /// Whether writes to the node go to its volume's live disk (`-o rw`): the volume and its
    /// partitions; snapshots stay read-only.
    var writesLiveDisk: Bool {
        switch self {
        case .volume, .partition(_, nil, _): return true
        default: return false
        }
    }

    public var description: String {
        switch self {
        case .root: return "/"
        case .snapshots: return PoolFileSystem.snapshotsName
        case .volume(let key): return "volume \(key.name)"
        case .snapshotDirectory(let volume): return "\(PoolFileSystem.snapshotsName)/\(volume)"
        case .snapshot(let key, let file): return "snapshot \(key.name)/\(file)"
        case .partitions: return PoolFileSystem.partitionsName
        case .partitionDirectory(let volume): return "\(PoolFileSystem.partitionsName)/\(volume)"
        case .partitionSnapshots: return "\(PoolFileSystem.partitionsName)/\(PoolFileSystem.snapshotsName)"
        case .partitionSnapshotVolume(let volume): return "\(PoolFileSystem.partitionsName)/\(PoolFileSystem.snapshotsName)/\(volume)"
        case .partitionSnapshotDirectory(let key, let file):
            return "\(PoolFileSystem.partitionsName)/\(PoolFileSystem.snapshotsName)/\(key.name)/\(file)"
        case .partition(let key, let snapshot, let number):
            return "partition \(key.name)\(snapshot.map { "@" + $0 } ?? "")/\(PartitionNames.file(number))"
        }
    }
}

/// Maps FUSE operations onto the pool's volumes. Every operation resolves its node afresh through
/// the `VolumeStore`, so changes in the pool show without a remount.
public final class PoolFileSystem: FileSystemOperations {
    public static let snapshotsName = ".snapshots"
    public static let partitionsName = ".partitions"
    /// Seconds the kernel may cache names and attributes: short, since the pool changes under us.
    let timeout = 1.0
    let store: VolumeStore
    let inodes = InodeTable<Node>(root: .root)
    let rootStat: stat
    /// With `-o cow`, where writes go.
    let cow: CowStore?
    /// Files may be opened for writing: `-o cow`, or `-o rw` (volumes only; snapshots stay read-only).
    public var writable: Bool { cow != nil || store.writesImages }
    /// Held while a change to some volume's first sector is checked and made.
    let firstSectorChanges = Locked(())
    /// Raw volume files are opened in FUSE passthrough mode (see `openReply`).
    let passthrough: Bool
    /// Where the kernel is told that nodes changed behind its back.
    let kernelCache: KernelCache?
    /// What each inode's files were at its last open, when its pages may be kept (see
    /// `cacheFingerprint`).
    let lastOpened = Locked<[UInt64: CacheFingerprint]>([:])
    /// Inodes written whose sibling nodes (the same volume's partitions, or their volume) are
    /// yet to be invalidated.
    let siblingsToInvalidate = Locked<Set<UInt64>>([])
    /// Written inodes found to have no sibling node, with the inode table's generation then:
    /// until it changes no sibling can have appeared, and a write queues no invalidation.
    let withoutSiblings = Locked<[UInt64: UInt64]>([:])
    /// Read requests that reached this process (`user.poolfs.read_requests` of the root).
    let readRequests = Atomic<Int>(0)

    public init(store: VolumeStore, cow: CowStore? = nil, passthrough: Bool = false, kernelCache: KernelCache? = nil) {
        self.store = store
        self.cow = cow
        self.passthrough = passthrough && cow == nil
        self.kernelCache = kernelCache
        var st = stat()
        _ = stat(store.pool.statisticsPath, &st)
        rootStat = st
        if let kernelCache {
            // A file changed in place is a new image of the same key: every node of it goes.
            store.changedInPlace.withLock { [inodes] in
                $0 = { key in kernelCache.invalidate { inodes.inodes { $0.volumeKey == key } } }
            }
        }
    }

    // MARK: Resolving nodes

    /// What a node is now: a directory, a volume, or a snapshot of a volume.
    enum Resolved {
        case directory(Attributes)
        case volume(OpenVolume)
        case snapshot(OpenVolume, Snapshot)
        case poolSnapshot(OpenVolume, file: String, Result<any BlockDevice, PoolSnapshotError>)
        case partition(PartitionFile)
    }

    func resolve(_ node: Node) -> Result<Resolved, Errno> {
        switch node {
        case .root:
            return .success(.directory(directoryAttributes(from: rootStat)))
        case .snapshots, .partitions, .partitionSnapshots:
            var a = directoryAttributes(from: rootStat)
            a.mode = S_IFDIR | 0o555
            return .success(.directory(a))
        case .partitionDirectory, .partitionSnapshotVolume, .partitionSnapshotDirectory, .partition:
            return resolvePartitionNode(node)
        case .volume(let key):
            return store.volume(key).map { .volume($0) }
        case .snapshotDirectory(let name):
            guard let volume = store.volume(name) else { return .failure(.noEntry) }
            var a = directoryAttributes(from: volume.fileStat)
            a.mode = S_IFDIR | 0o555
            return .success(.directory(a))
        case .snapshot(let key, let file):
            let volume: OpenVolume
            switch store.volume(key) {
            case .success(let v): volume = v
            case .failure(let e): return .failure(e)
            }
            if let snapshot = volume.snapshot(file: file) { return .success(.snapshot(volume, snapshot)) }
            if let pooled = volume.poolSnapshots.first(where: { $0.file == file }) {
                return .success(.poolSnapshot(volume, file: file, pooled.device))
            }
            return .failure(.noEntry)
        }
    }

    /// Owner, permissions (within `permissions`) and times of `st`, as a node of type `type`.
    /// A file never shows setuid or setgid (a disk image is no program): writes have none to
    /// clear, which lets the kernel leave that to the daemon (FUSE_HANDLE_KILLPRIV_V2) and stop
    /// asking for security.capability before each write.
    func attributes(type: UInt32, from st: stat, permissions: UInt32 = 0o7777) -> Attributes {
        let allowed = type == S_IFREG ? permissions & ~(S_ISUID | S_ISGID) : permissions
        var a = Attributes(mode: type | (st.st_mode & allowed))
        a.uid = st.st_uid
        a.gid = st.st_gid
        a.atime = st.st_atim
        a.mtime = st.st_mtim
        a.ctime = st.st_ctim
        return a
    }

    func directoryAttributes(from st: stat) -> Attributes {
        var a = attributes(type: S_IFDIR, from: st)
        a.links = 2
        return a
    }

    func attributes(_ resolved: Resolved) -> Attributes {
        switch resolved {
        case .directory(let a):
            return a
        case .volume(let v):
            var a = attributes(type: S_IFREG, from: v.fileStat)
            a.size = v.image?.virtualSize ?? 0
            a.blocks = (v.allocatedBytes(snapshot: nil) + 511) / 512
            return a
        case .snapshot(let v, let s):
            // Read-only, dated when the snapshot was taken.
            var a = attributes(type: S_IFREG, from: v.fileStat, permissions: cow != nil ? 0o7777 : 0o7555)
            let date = timespec(tv_sec: Int(s.dateSeconds), tv_nsec: Int(s.dateNanoseconds))
            a.atime = date
            a.mtime = date
            a.ctime = date
            a.size = v.image?.device(of: s)?.size ?? 0
            a.blocks = (v.allocatedBytes(snapshot: s) + 511) / 512
            return a
        case .poolSnapshot(let v, let file, let device):
            var a = attributes(type: S_IFREG, from: v.fileStat, permissions: cow != nil ? 0o7777 : 0o7555)
            if let date = v.poolSnapshotDates[file] {
                a.atime = date
                a.mtime = date
                a.ctime = date
            }
            if case .success(let d) = device {
                a.size = d.size
                a.blocks = (v.allocatedBytes(poolSnapshot: file, device: d) + 511) / 512
            }
            return a
        case .partition(let p):
            return partitionAttributes(p)
        }
    }

    func device(_ inode: UInt64) -> Result<any BlockDevice, Errno> {
        guard let node = inodes.key(of: inode) else { return .failure(.noEntry) }
        return device(of: node)
    }

    func device(of node: Node) -> Result<any BlockDevice, Errno> {
        switch resolve(node) {
        case .failure(let e): return .failure(e)
        case .success(.directory): return .failure(.isDirectory)
        case .success(.volume(let v)):
            guard let image = v.image else { return .failure(.io) }
            return .success(image.live)
        case .success(.snapshot(let v, let s)):
            guard let device = v.image?.device(of: s) else {
                if let why = s.problem { Log.error("\(node): \(why)") }
                return .failure(.io)
            }
            return .success(device)
        case .success(.poolSnapshot(_, _, let device)):
            switch device {
            case .success(let d): return .success(d)
            case .failure(let why):
                Log.error("\(node): \(why)")
                return .failure(.io)
            }
        case .success(.partition(let p)):
            return .success(p.device)
        }
    }

    // MARK: FileSystemOperations

    public func lookup(parent: UInt64, name: String) -> Result<Entry, Errno> {
        guard let parentNode = inodes.key(of: parent) else { return .failure(.noEntry) }
        let child: Node
        switch parentNode {
        case .root where name == Self.snapshotsName:
            child = .snapshots
        case .root where name == Self.partitionsName:
            child = .partitions
        case .root:
            // The name leads to the file it names now.
            guard let volume = store.volume(name) else { return .failure(.noEntry) }
            child = .volume(volume.key)
        case .snapshots:
            child = .snapshotDirectory(volume: name)
        case .snapshotDirectory(let volumeName):
            guard let volume = store.volume(volumeName) else { return .failure(.noEntry) }
            child = .snapshot(volume.key, file: name)
        case .partitions, .partitionDirectory, .partitionSnapshots, .partitionSnapshotVolume, .partitionSnapshotDirectory:
            guard let found = partitionChild(of: parentNode, named: name) else { return .failure(.noEntry) }
            child = found
        case .volume, .snapshot, .partition:
            return .failure(.notDirectory)
        }
        return resolve(child).map { resolved in
            var a = attributes(resolved)
            a.inode = inodes.reference(child)
            return Entry(attributes: a, entryTimeout: timeout, attributeTimeout: timeout)
        }
    }

    public func forget(inode: UInt64, count: UInt64) {
        inodes.forget(inode, count: count)
        if inodes.key(of: inode) == nil { lastOpened.withLock { _ = $0.removeValue(forKey: inode) } }
    }

    public func attributes(of inode: UInt64) -> Result<(Attributes, timeout: Double), Errno> {
        guard let node = inodes.key(of: inode) else { return .failure(.noEntry) }
        return resolve(node).map { resolved in
            var a = attributes(resolved)
            a.inode = inode
            return (a, timeout)
        }
    }

    /// Opens a volume or snapshot file. The handle is counted on the file the node stands for,
    /// before anything else, so that the file stays readable through it even when the pool
    /// replaces or deletes it from here on.
    public func open(inode: UInt64, writing: Bool) -> Result<OpenReply, Errno> {
        guard let node = inodes.key(of: inode) else { return .failure(.noEntry) }
        guard let key = node.volumeKey else { return device(inode).map { _ in .plain } }
        do {
            // The first handle also locks the chain's backing files against writers.
            try store.retain(key)
        } catch {
            return .failure(fail(error, inode: inode))
        }
        let opened = openHandle(inode: inode, node: node, key: key, writing: writing)
        if case .failure = opened { store.release(key) }
        return opened.map { openReply(inode: inode, node: node, key: key, writing: writing) }
    }

    /// How the kernel reads the opened node. A raw volume file (not a partition, a window into
    /// it) is read by the kernel itself: its bytes are the file's. The kernel wants every open of
    /// an inode to agree, and this depends only on the node and the mount. Other nodes keep the
    /// pages the kernel cached when their files are as they were at the last open.
    func openReply(inode: UInt64, node: Node, key: VolumeKey, writing: Bool) -> OpenReply {
        guard case .success(let volume) = store.volume(key) else { return .plain }
        // On a -o rw mount, a raw volume whose format was probed is written through `write`, which
        // guards its first sector (docs/security.md); the kernel would write it unchecked. Every
        // open of an inode must agree on passthrough, so its readers go through the daemon too.
        if passthrough, case .volume = node, let file = Self.rawFile(volume),
           !(store.writesImages && volume.image?.formatDeclared == false) {
            return OpenReply(passthroughFile: file.fd)
        }
        let fingerprint = cacheFingerprint(volume, node: node, writing: writing)
        let previous = lastOpened.withLock { opened in
            defer { opened[inode] = fingerprint }
            return opened[inode]
        }
        return OpenReply(keepCache: fingerprint != nil && previous == fingerprint, directIO: writing)
    }

    /// The file whose bytes are the volume's, from its start to its end: a raw image in a
    /// regular file (block devices are read through the daemon: see docs/mounting.md, "Raw files at page-cache speed").
    static func rawFile(_ volume: OpenVolume) -> HostFile? {
        guard let image = volume.image, image.format == .raw, image.hostFiles.count == 1,
              let raw = image.live as? RawImage, raw.file === image.hostFiles[0], !raw.file.isBlockDevice else { return nil }
        return raw.file
    }

    /// The files of a node whose pages the kernel may keep from one open to the next, as they
    /// are now: regular files (a block device changes without a new mtime), read-only (a writer,
    /// or a copy-on-write overlay, changes what the node reads between opens through another
    /// node), and a qcow2 snapshot or the live disk (not a pool's snapshot). nil: not kept.
    func cacheFingerprint(_ volume: OpenVolume, node: Node, writing: Bool) -> CacheFingerprint? {
        guard cow == nil, !writing, volume.writer == nil, let image = volume.image, !image.hostFiles.isEmpty,
              !image.hostFiles.contains(where: \.isBlockDevice) else { return nil }
        if case .snapshot(_, let file) = node, volume.snapshot(file: file) == nil { return nil }
        // The files as they are now (fstat), not as the volume saw them when opened: the volume
        // may be one the store still trusts a moment after its file changed.
        var files: [FileIdentity] = []
        for file in image.hostFiles {
            var st = stat()
            guard fstat(file.fd, &st) == 0 else { return nil }
            files.append(FileIdentity(st))
        }
        return CacheFingerprint(files: files, generation: volume.generation)
    }

    /// After a write to `inode`: the other nodes of its volume (its partitions, or the volume
    /// of a partition) read the same bytes through their own page caches.
    func invalidateSiblings(of inode: UInt64) {
        guard let kernelCache, let key = inodes.key(of: inode)?.volumeKey else { return }
        // Most written files have no sibling the kernel knows of: no wake-up of the
        // invalidation queue per write (a thread switch per request on a busy host).
        if let generation = withoutSiblings.withLock({ $0[inode] }), generation == inodes.generation { return }
        guard siblingsToInvalidate.withLock({ $0.insert(inode).inserted }) else { return }
        kernelCache.invalidate { [inodes, siblingsToInvalidate, withoutSiblings] in
            // Writes from here on queue another invalidation.
            siblingsToInvalidate.withLock { _ = $0.remove(inode) }
            // Read before the search: a sibling made during it changes the generation.
            let generation = inodes.generation
            let siblings = inodes.inodes { $0.volumeKey == key }.filter { $0 != inode }
            withoutSiblings.withLock { $0[inode] = siblings.isEmpty ? generation : nil }
            return siblings
        }
    }

    private func openHandle(inode: UInt64, node: Node, key: VolumeKey, writing: Bool) -> Result<Void, Errno> {
        guard writing, store.writesImages else {
            // A device made on first use (an LV to activate) is made now, so that open fails, not the reads.
            return device(inode).flatMap { device in
                Result { try (device as? DeferredDevice)?.device() }.map { _ in () }.mapError { fail($0, inode: inode) }
            }
        }
        guard node.writesLiveDisk else { return .failure(.readOnly) }
        do {
            try store.openForWriting(key)
            return .success(())
        } catch let error as Errno {
            return .failure(error)
        } catch {
            return .failure(fail(error, inode: inode))
        }
    }

    public func release(inode: UInt64, writing: Bool) {
        guard let node = inodes.key(of: inode), let key = node.volumeKey else { return }
        if writing, store.writesImages, node.writesLiveDisk { store.releaseWriting(key) }
        store.release(key)
    }

    /// The writer of a volume open for writing (`-o rw`), and where the node's bytes start in
    /// its volume and end (a partition's range: nothing outside it is written).
    func writer(_ inode: UInt64) -> Result<(writer: any VolumeWriter, start: UInt64, size: UInt64), Errno> {
        guard let node = inodes.key(of: inode), node.writesLiveDisk, let key = node.volumeKey else { return .failure(.readOnly) }
        guard let writer = store.writer(key) else { return .failure(.badDescriptor) }
        return device(of: node).map { device in
            // A partition file's window is within its volume, whose writer takes volume offsets.
            guard case .partition = node, let window = device as? PartitionDevice else { return (writer, 0, device.size) }
            return (writer, window.start, window.size)
        }
    }

    /// Runs `body` with the inode's writer, `offset` moved to the volume's and `length` clipped
    /// to the node's end; an engine error is logged and becomes an errno.
    func withWriter(_ inode: UInt64, offset: UInt64, length: UInt64,
                    _ body: (any VolumeWriter, _ at: UInt64, _ length: UInt64) throws -> Void) -> Result<Void, Errno> {
        writer(inode).flatMap { target in
            guard offset < target.size else { return .failure(.noSpace) }
            let n = min(length, target.size - offset)
            return Result { try body(target.writer, target.start + offset, n) }.mapError { fail($0, inode: inode) }
        }
    }

    public func read(inode: UInt64, offset: UInt64, size: Int) -> Result<ReadData, Errno> {
        readRequests.add(1, ordering: .relaxed)
        switch device(inode) {
        case .failure(let e):
            return .failure(e)
        case .success(let device):
            guard offset < device.size else { return .success(ReadData(segments: [], owner: nil)) }
            let n = Int(min(UInt64(size), device.size - offset))
            do {
                // A partition's writes are in its volume's (or snapshot's) overlay, shared.
                if let cow, let node = inodes.key(of: inode), case let target = overlayTarget(node, device: device),
                   let overlay = cow.overlay(for: target.holder, create: false) {
                    return .success(try overlay.read(at: target.start + offset, length: n, base: target.base))
                }
                let plan = try device.plan(at: offset, length: n)
                if plan.readsBlockDevice {
                    // Devices are read here, not spliced: a device that fails (the loop device
                    // of a PV whose file is gone) then fails in this process, which logs it and
                    // answers EIO, rather than inside libfuse's splice, which answers EIO and
                    // tells no one.
                    let buffer = ReplyBuffer(count: n)
                    try plan.execute(into: buffer.bytes)
                    return .success(ReadData(segments: [.memory(UnsafeRawBufferPointer(buffer.bytes))], owner: buffer))
                }
                // The plan holds the files and cached blocks that the segments point into.
                return .success(ReadData(segments: Self.replySegments(plan), owner: plan))
            } catch {
                return .failure(fail(error, inode: inode))
            }
        }
    }

    /// A plan's segments as reply segments, pointing into what the plan holds.
    static func replySegments(_ plan: ReadPlan) -> [ReadData.Segment] {
        plan.segments.map { segment in
            switch segment {
            case .host(let file, let at, let length): return .file(fd: file.fd, offset: at, length: length)
            case .zero(let length): return .zero(length: length)
            case .bytes(let block, let start, let length):
                return .memory(UnsafeRawBufferPointer(rebasing: block.bytes[start..<start + length]))
            }
        }
    }

    /// Runs `change` (a write of `bytes` at `offset`, or zeros there), refused with EPERM when it
    /// would make a probed raw volume's first sector look like another format. Changes that touch
    /// the first sector run one at a time, so two cannot each pass the check and together make a
    /// header.
    func guardingFirstSector<T>(inode: UInt64, offset: UInt64, with bytes: [UInt8],
                                _ change: () -> Result<T, Errno>) -> Result<T, Errno> {
        guard offset < UInt64(FormatMagic.probeLength) else { return change() }
        return firstSectorChanges.withLock { _ in
            if let refusal = bytes.withUnsafeBytes({ headerRefusal(inode: inode, offset: offset, data: $0) }) {
                Log.warning(refusal)
                return .failure(.notPermitted)
            }
            return change()
        }
    }

    /// Why a write into the first sector of a raw volume whose format was probed is refused:
    /// it would make the volume look like another format (QEMU refuses the same write for an
    /// image it probed as raw). nil: allowed.
    func headerRefusal(inode: UInt64, offset: UInt64, data: UnsafeRawBufferPointer) -> String? {
        guard case .volume(let key)? = inodes.key(of: inode), case .success(let volume) = store.volume(key),
              let image = volume.image, image.format == .raw, !image.formatDeclared else { return nil }
        let length = min(UInt64(FormatMagic.probeLength), image.live.size)
        guard var sector = try? image.live.read(at: 0, count: Int(length)) else { return nil }
        let end = min(Int(length), Int(offset) + data.count)
        if Int(offset) < end {
            for i in Int(offset)..<end { sector[i] = data[i - Int(offset)] }
        }
        guard let format = FormatMagic.formatName(ofFirstBytes: sector) else { return nil }
        return "volume \(key.name): a write into its first sector would make this raw volume look like \(format); refused (the format was probed, not declared: see poolfs format set)"
    }

    public func write(inode: UInt64, offset: UInt64, data: UnsafeRawBufferPointer) -> Result<Int, Errno> {
        if store.writesImages {
            // Within the file's end: a partition's write never reaches past it.
            var written = data.count
            defer { invalidateSiblings(of: inode) }
            return guardingFirstSector(inode: inode, offset: offset, with: Array(data.prefix(FormatMagic.probeLength))) {
                withWriter(inode, offset: offset, length: UInt64(data.count)) { writer, at, n in
                    written = Int(n)
                    try writer.write(UnsafeRawBufferPointer(rebasing: data[0..<Int(n)]), at: at)
                }.map { written }
            }
        }
        guard let cow, let node = inodes.key(of: inode) else { return .failure(.readOnly) }
        defer { invalidateSiblings(of: inode) }
        return device(of: node).flatMap { device in
            let target = overlayTarget(node, device: device)
            guard offset < target.size else { return .failure(.noSpace) }
            let n = Int(min(UInt64(data.count), target.size - offset))
            return cow.overlay(for: target.holder, create: true)!.write(UnsafeRawBufferPointer(rebasing: data[0..<n]), at: target.start + offset, base: target.base)
        }
    }

    /// fsync: flushes the volume's writer; files not being written have nothing to flush.
    public func sync(inode: UInt64) -> Result<Void, Errno> {
        guard store.writesImages, case .success(let target) = writer(inode) else { return .success(()) }
        return Result { try target.writer.flush() }.mapError { fail($0, inode: inode) }
    }

    /// fallocate on a disk of fixed size: punching a hole or zeroing a range makes it read as
    /// zeros (zero clusters, freed storage); plain allocation inside the disk has nothing to do.
    public func allocate(inode: UInt64, mode: Int32, offset: UInt64, length: UInt64) -> Result<Void, Errno> {
        let keepSize: Int32 = 0x01, punchHole: Int32 = 0x02, zeroRange: Int32 = 0x10
        return device(inode).flatMap { device in
            let end = offset.addingReportingOverflow(length)
            if mode & ~keepSize == 0 {
                return !end.overflow && end.partialValue <= device.size || mode & keepSize != 0 ? .success(()) : .failure(.notPermitted)
            }
            guard mode & ~(keepSize | punchHole | zeroRange) == 0, offset < device.size else {
                return mode & ~(keepSize | punchHole | zeroRange) == 0 ? .success(()) : .failure(.notSupported)
            }
            let n = min(length, device.size - offset)
            defer { invalidateSiblings(of: inode) }
            if store.writesImages {
                let zeros = [UInt8](repeating: 0, count: Int(min(n, UInt64(FormatMagic.probeLength))))
                return guardingFirstSector(inode: inode, offset: offset, with: zeros) {
                    withWriter(inode, offset: offset, length: n) { try $0.zero(at: $1, length: $2) }
                }
            }
            guard let cow, let node = inodes.key(of: inode) else { return .failure(.readOnly) }
            let target = overlayTarget(node, device: device)
            let overlay = cow.overlay(for: target.holder, create: true)!
            let zeros = [UInt8](repeating: 0, count: Int(min(n, 1 << 20)))
            var at = offset
            while at < offset + n {
                let chunk = Int(min(UInt64(zeros.count), offset + n - at))
                let written = zeros.withUnsafeBytes {
                    overlay.write(UnsafeRawBufferPointer(rebasing: $0[0..<chunk]), at: target.start + at, base: target.base)
                }
                if case .failure(let e) = written { return .failure(e) }
                at += UInt64(chunk)
            }
            return .success(())
        }
    }

    public func list(directory inode: UInt64) -> Result<[DirectoryEntry], Errno> {
        guard let node = inodes.key(of: inode) else { return .failure(.noEntry) }
        var entries = [DirectoryEntry(name: ".", inode: inode, mode: S_IFDIR),
                       DirectoryEntry(name: "..", inode: 1, mode: S_IFDIR)]
        func add(_ name: String, _ child: Node?, _ mode: UInt32) {
            entries.append(DirectoryEntry(name: name, inode: child.flatMap { inodes.inode(of: $0) } ?? 0xffff_ffff, mode: mode))
        }
        switch node {
        case .root:
            add(Self.snapshotsName, .snapshots, S_IFDIR)
            add(Self.partitionsName, .partitions, S_IFDIR)
            // Inode numbers are hints here (a lookup gives the real one): no volume is opened.
            for name in store.volumeNames() { add(name, store.lastKnownVolume(name).map { .volume($0.key) }, S_IFREG) }
        case .snapshots:
            for name in store.volumeNames() { add(name, .snapshotDirectory(volume: name), S_IFDIR) }
        case .snapshotDirectory(let volume):
            // A listing waits (briefly) for the pool's current state, so new snapshots show.
            guard store.volumeNames().contains(volume), let open = store.volume(volume) else { return .failure(.noEntry) }
            for (file, _) in open.snapshotFiles { add(file, .snapshot(open.key, file: file), S_IFREG) }
            for (file, _) in open.poolSnapshots { add(file, .snapshot(open.key, file: file), S_IFREG) }
        case .partitions, .partitionDirectory, .partitionSnapshots, .partitionSnapshotVolume, .partitionSnapshotDirectory:
            switch partitionChildren(of: node) {
            case .failure(let e): return .failure(e)
            case .success(let children): for (name, child, mode) in children { add(name, child, mode) }
            }
        case .volume, .snapshot, .partition:
            return .failure(.notDirectory)
        }
        return .success(entries)
    }

    /// SEEK_DATA / SEEK_HOLE from the allocation map: zeros count as holes, so sparse copies
    /// skip them; the end of the disk is the final hole.
    public func seek(inode: UInt64, offset: UInt64, data: Bool) -> Result<UInt64, Errno> {
        switch device(inode) {
        case .failure(let e): return .failure(e)
        case .success(let device):
            guard offset < device.size else { return .failure(.noDevice) }
            do {
                var at = offset
                let window: UInt64 = 1 << 30
                while at < device.size {
                    let n = min(window, device.size - at)
                    for extent in try device.status(at: at, length: n, detection: .metadataOnly) {
                        let isData = extent.data && !extent.zero
                        if isData == data { return .success(max(extent.start, offset)) }
                    }
                    at += n
                }
                return data ? .failure(.noDevice) : .success(device.size)
            } catch {
                return .failure(fail(error, inode: inode))
            }
        }
    }

    public func extendedAttribute(of inode: UInt64, name: String) -> Result<[UInt8], Errno> {
        extendedAttributes(of: inode).flatMap { attributes in
            guard let value = attributes.first(where: { $0.name == name })?.value else { return .failure(.noData) }
            return .success(Array(value.utf8))
        }
    }

    public func extendedAttributeNames(of inode: UInt64) -> Result<[String], Errno> {
        extendedAttributes(of: inode).map { $0.map(\.name) }
    }

    /// `user.poolfs.*`: what `poolfs ls` knows about the volume or snapshot.
    func extendedAttributes(of inode: UInt64) -> Result<[(name: String, value: String)], Errno> {
        guard let node = inodes.key(of: inode) else { return .failure(.noEntry) }
        return resolve(node).map { resolved in
            switch resolved {
            case .directory where node == .root:
                return [("user.poolfs.read_requests", "\(readRequests.load(ordering: .relaxed))")]
            case .directory:
                return []
            case .volume(let v):
                let pooled = v.properties.map { ("user.poolfs." + $0.key, $0.value) }
                guard let image = v.image else {
                    return [("user.poolfs.error", v.error ?? "unknown")]
                        + (v.recognisedFormat.map { [("user.poolfs.format", $0)] } ?? []) + pooled
                }
                return [
                    ("user.poolfs.format", image.format.rawValue),
                    ("user.poolfs.virtual_size", "\(image.virtualSize)"),
                    ("user.poolfs.backing_chain", VolumeReport.chainDescription(image)),
                    ("user.poolfs.snapshots", "\(image.snapshots.count)"),
                ] + (image.snapshotTableProblem.map { [("user.poolfs.snapshot_error", $0)] } ?? []) + image.chain.compactMap(\.dataFilePath).prefix(1).map { ("user.poolfs.data_file", $0) } + pooled
            case .snapshot(let v, let s):
                return [
                    ("user.poolfs.format", "qcow2-snapshot"),
                    ("user.poolfs.virtual_size", "\(v.image?.device(of: s)?.size ?? 0)"),
                    ("user.poolfs.backing_chain", v.image.map(VolumeReport.chainDescription) ?? ""),
                    ("user.poolfs.snapshot_id", s.id),
                    ("user.poolfs.snapshot_name", s.name),
                    ("user.poolfs.snapshot_date", VolumeReport.isoDate(s.dateSeconds)),
                    ("user.poolfs.vm_state_size", "\(s.vmStateSize)"),
                    ("user.poolfs.vm_clock_ns", "\(s.vmClockNanoseconds)"),
                ] + (s.problem.map { [("user.poolfs.error", $0)] } ?? [])
            case .poolSnapshot(_, _, let device):
                switch device {
                case .success(let d): return [("user.poolfs.format", "raw"), ("user.poolfs.virtual_size", "\(d.size)")]
                case .failure(let why): return [("user.poolfs.error", why.message)]
                }
            case .partition(let p):
                return partitionExtendedAttributes(p)
            }
        }
    }

    public func statistics() -> FileSystemStatistics {
        var st = statvfs()
        _ = statvfs(store.pool.statisticsPath, &st)
        return FileSystemStatistics(blockSize: UInt64(st.f_frsize), blocks: UInt64(st.f_blocks),
                                    freeBlocks: 0, files: UInt64(st.f_files))
    }

    /// Logs an engine error against the volume and turns it into an errno.
    func fail(_ error: any Error, inode: UInt64) -> Errno {
        let what = inodes.key(of: inode).map { "\($0)" } ?? "inode \(inode)"
        Log.error("\(what): \(error)")
        return (error as? Errno) ?? Errno((error as? Qcow2Error)?.errno ?? EIO)
    }
}

/// What a node's files were at an open: the same at the next open means the kernel's cached
/// pages of it are still right.
struct CacheFingerprint: Equatable, Sendable {
    let files: [FileIdentity]
    let generation: String?
}

/// Bytes read into memory for one reply, freed with the reply.
// SAFETY: written once, before the reply is built; only read afterwards.
final class ReplyBuffer: @unchecked Sendable {
    let bytes: UnsafeMutableRawBufferPointer
    init(count: Int) { bytes = .allocate(byteCount: count, alignment: 4096) }
    deinit { bytes.deallocate() }
}
