#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Locking
import Block

/// A libvirt `rbd` pool: the images of one Ceph pool (and namespace), read through librbd. Each
/// image is a raw volume; each of its RBD snapshots a read-only volume of its own.
///
/// The image list is asked again once older than a second, on a thread of its own
/// (`RefreshedValue`): images and snapshots made or removed, and resized images, show at the next
/// listing, and no read waits for it. A listing is `rbd_list2` and one small header read per
/// image, all at once; only images that are new or changed are opened for their info (`list`),
/// so a pool of hundreds of images is not opened image by image every second. Image data is
/// never read at mount: devices open their image on first read, through a cache of at most
/// `handleCapacity` open handles.
///
/// Every librados call is bounded: the conf sets `client_mount_timeout`, `rados_mon_op_timeout`
/// and `rados_osd_op_timeout` to `timeout` seconds, and each asynchronous read or write waits at
/// most that long plus a little (`RBDBatch`). So an unreachable cluster fails the mount with
/// one line, and a cluster that goes away fails reads with EIO; they work again when it returns
/// (librados reconnects on its own).
public final class RBDPool: Pool {
    public struct Options: Sendable {
        /// The Ceph conf file; nil reads Ceph's default places (/etc/ceph/ceph.conf), if any.
        public var confFile: String?
        /// The client id (`admin` for client.admin).
        public var id: String?
        public var keyring: String?
        /// The cephx key itself (base64), from libvirt's secret store: passed to librados by
        /// `rados_conf_set("key")`, never on a command line nor in a message.
        public var key: String?
        /// Why the libvirt pool's secret could not be had, said if connecting fails.
        public var keyProblem: String?
        public var monHost: String?
        public var writable = false
        /// Seconds any cluster operation may take.
        public var timeout = 10.0
        public var handleCapacity = 64
        public init(confFile: String? = nil, id: String? = nil, keyring: String? = nil, monHost: String? = nil, writable: Bool = false) {
            self.confFile = confFile; self.id = id; self.keyring = keyring; self.monHost = monHost; self.writable = writable
        }
    }

    struct SnapshotInfo: Sendable {
        var id: UInt64
        var name: String
        var size: UInt64
        var taken: timespec
    }

    /// What one listing found of an image.
    struct ImageInfo: Sendable {
        var id: String
        var name: String
        var size: UInt64
        var objectSize: UInt64
        var wholeObject: Bool
        var created: timespec
        var snapshots: [SnapshotInfo]
        var parent: String?
    }

    public let pool: String
    public let namespace: String
    public let options: Options
    public var displayName: String { "rbd:" + poolSpec }
    public var statisticsPath: String { "/" }
    var poolSpec: String { namespace.isEmpty ? pool : pool + "/" + namespace }
    let cluster: RBDCluster
    let handles: RBDHandleCache
    private let images: RefreshedValue<[String: ImageInfo]>
    private let device: UInt64

    /// `POOL[/NAMESPACE]`; connects (bounded by `options.timeout`) and lists the images.
    public init(spec: String, options: Options, refresh: Double = 1.0) throws {
        let parts = spec.split(separator: "/", maxSplits: 1).map(String.init)
        guard let pool = parts.first, !pool.isEmpty else { throw PoolError.libvirt("rbd: no pool name in '\(spec)' (POOL[/NAMESPACE])") }
        self.pool = pool
        namespace = parts.count > 1 ? parts[1] : ""
        self.options = options
        let seconds = "\(Int(options.timeout.rounded(.up)))"
        var settings = [("client_mount_timeout", seconds), ("rados_mon_op_timeout", seconds), ("rados_osd_op_timeout", seconds),
                        ("log_to_stderr", "false"), ("err_to_stderr", "false"),
                        // Reads and writes go straight to the OSDs: what -o rw wrote is what any
                        // other handle (a snapshot's, `rbd export`) reads, and flush is simple.
                        ("rbd_cache", "false")]
        if let keyring = options.keyring { settings.append(("keyring", keyring)) }
        if let key = options.key { settings.append(("key", key)) }
        if let monHost = options.monHost { settings.append(("mon_host", monHost)) }
        let cluster: RBDCluster
        do {
            cluster = try RBDCluster(id: options.id, confFile: options.confFile, settings: settings, pool: pool, namespace: namespace)
        } catch {
            let where_ = options.monHost.map { " at \($0)" } ?? options.confFile.map { " (conf \($0))" } ?? ""
            let note = options.keyProblem.map { " (and the pool's libvirt secret was not used: \($0))" } ?? ""
            throw PoolError.libvirt("rbd: cannot reach Ceph cluster\(where_) for pool \(pool): \(error)\(note)")
        }
        self.cluster = cluster
        handles = RBDHandleCache(capacity: options.handleCapacity)
        device = ISCSIPool.fnv1a(cluster.fsid() + "/" + pool + "/" + namespace)
        let known = Locked<[String: Known]>([:]), timeout = options.timeout
        images = try RefreshedValue(lifetime: refresh) { try Self.list(cluster, known: known, timeout: timeout) }
    }

    /// What the listings last read of one image, by id: its info, the header it was read at
    /// (nil if the header could not be read then) and when.
    struct Known: Sendable {
        var info: ImageInfo
        var header: RBDHeader?
        var read: Double
    }

    /// Images whose info is read again per listing although their header did not change, the
    /// oldest first once older than `rereadAge` seconds: what the header does not show (a
    /// flattened clone's parent, an invalidated fast-diff map) is at most that old plus
    /// `images / rereadBatch` listings.
    static let rereadBatch = 4
    static let rereadAge = 60.0

    /// `rbd_list2`, then every image's header at once (`RBDCluster.headers`, one small read per
    /// image, no open). Only an image that is new, renamed, or whose size or snapshot ids
    /// changed, plus a few of the oldest (`rereadBatch`), is opened read-only for its size,
    /// features, snapshots, parent and creation time; every other keeps what was read of it.
    /// An image whose header could not be read at all (a format-1 image) is opened each time;
    /// one whose header did not answer this time, or that cannot be opened, keeps its last
    /// info. An image that rbd_list2 no longer lists is gone.
    static func list(_ cluster: RBDCluster, known: Locked<[String: Known]>, timeout: Double) throws -> [String: ImageInfo] {
        let listed = try cluster.listImages()
        let headers = cluster.headers(of: listed.map(\.id), seconds: timeout)
        let now = RefreshedValue<Bool>.now()
        let previous = known.withLock { $0 }
        let stale = Set(previous.values.filter { now - $0.read >= rereadAge }.sorted { $0.read < $1.read }
                            .prefix(rereadBatch).map(\.info.id))
        var next: [String: Known] = [:]
        for (id, name) in listed {
            let header = headers[id]
            if let old = previous[id], old.info.name == name, !stale.contains(id),
               header == nil ? old.header != nil : header == old.header {
                next[id] = old
            } else if let info = read(cluster, id: id, name: name) {
                next[id] = Known(info: info, header: header, read: now)
            } else if let old = previous[id], old.info.name == name {
                next[id] = old
            }
        }
        known.withLock { $0 = next }
        var found: [String: ImageInfo] = [:]
        for entry in next.values { found[FileNames.escape(entry.info.name)] = entry.info }
        return found
    }

    /// One image's size, features, snapshots and parent from a short read-only open; nil if it
    /// cannot be opened (removed meanwhile).
    static func read(_ cluster: RBDCluster, id: String, name: String) -> ImageInfo? {
        guard let image = try? cluster.open(name, readOnly: true),
              let stat = try? image.stat(), let features = try? image.features() else { return nil }
        let fastDiff = features.features & RBDFeatures.fastDiff != 0 && features.flags & RBDFeatures.fastDiffInvalid == 0
        let snapshots = ((try? image.snapshots()) ?? []).map { SnapshotInfo(id: $0.id, name: $0.name, size: $0.size, taken: $0.time) }
        return ImageInfo(id: id, name: name, size: stat.size, objectSize: stat.objectSize, wholeObject: fastDiff,
                         created: (try? image.createTimestamp()) ?? timespec(), snapshots: snapshots,
                         parent: (try? image.parent()) ?? nil)
    }

    public func volumeNames() throws -> [String] {
        images.fresh.keys.sorted()
    }

    public func volume(_ name: String) -> PoolVolume? {
        guard let image = images.value[name] else { return nil }
        var st = stat()
        st.st_mode = S_IFREG | (options.writable ? 0o644 : 0o444)
        st.st_nlink = 1
        st.st_size = off_t(clamping: image.size)
        st.st_blksize = blksize_t(clamping: image.objectSize)
        st.st_dev = dev_t(truncatingIfNeeded: device)
        st.st_ino = ino_t(truncatingIfNeeded: ISCSIPool.fnv1a(image.id))
        st.st_atim = image.created
        st.st_mtim = image.created
        st.st_ctim = image.created
        return PoolVolume(path: nil, status: st)
    }

    func image(_ name: String) throws -> ImageInfo {
        guard let image = images.value[name] else { throw PoolError.notFound("\(displayName) has no image \(name)") }
        return image
    }

    /// The live image read through a cached read-only handle. The key holds the size, so a
    /// resized image (whose read-only handle would keep its old size) gets a fresh handle.
    func liveDevice(_ info: ImageInfo) -> RBDImageDevice {
        let cluster = cluster, handles = handles, key = "\(info.id)\u{0}\(info.size)"
        return RBDImageDevice(path: "rbd:\(poolSpec)/\(info.name)", size: info.size, objectSize: info.objectSize,
                              wholeObject: info.wholeObject, timeout: options.timeout) {
            try handles.handle(key) { try cluster.open(info.name, readOnly: true) }
        }
    }

    public func openImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        let info = try image(name)
        return Image.wrapping(liveDevice(info), path: "rbd:\(poolSpec)/\(info.name)", backing: parentImage(info))
    }

    /// A stand-in naming a clone's parent in the chain (`backing_chain`); librbd itself reads
    /// through the parent when the clone is read.
    private func parentImage(_ info: ImageInfo) -> Image? {
        info.parent.map { Image.wrapping(NoDataDevice(), path: "rbd:" + $0) }
    }

    public var writeRefusal: String? { nil }

    /// Opens the image read-write and takes its exclusive lock, so that no other client (a
    /// running VM) writes it meanwhile; an image whose lock another client holds is in use (EBUSY).
    public func openWritableImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        guard options.writable else { throw Qcow2Error.writeRefused("\(displayName) was opened read-only") }
        let info = try image(name)
        let path = "rbd:\(poolSpec)/\(info.name)"
        let handle: RBDImageHandle
        do {
            handle = try cluster.open(info.name, readOnly: false)
            let owners = try handle.lockOwners()
            guard owners.isEmpty else { throw Qcow2Error.inUse("\(path): its exclusive lock is held by \(owners.joined(separator: ", "))") }
        } catch let error as RBDError {
            throw Qcow2Error.io(errno: EIO, operation: error.description, path: path)
        }
        do {
            try handle.acquireExclusiveLock()
        } catch {
            throw Qcow2Error.inUse("\(path): cannot take its exclusive lock: \(error)")
        }
        let size = (try? handle.stat().size) ?? info.size
        let device = RBDImageDevice(path: path, size: size, objectSize: info.objectSize, wholeObject: info.wholeObject,
                                    timeout: options.timeout) { handle }
        return Image.wrapping(device, path: path, backing: parentImage(info))
    }

    public func makeWriter(_ name: String, image: Image) throws -> any VolumeWriter {
        guard options.writable, let device = image.live as? RBDImageDevice, let handle = try? device.image() else {
            throw Qcow2Error.writeRefused("\(image.path) was opened read-only")
        }
        return RBDImageWriter(device: device, handle: handle)
    }

    /// The image id, size and snapshot ids: a re-created or resized image, or one whose
    /// snapshots changed, is opened anew.
    public func generation(of name: String) -> String? {
        guard let image = images.value[name] else { return nil }
        return "\(image.id)/\(image.size)/" + image.snapshots.map { "\($0.id)" }.joined(separator: ",")
    }

    public func snapshots(of name: String) -> [PoolSnapshot] {
        guard let info = images.value[name] else { return [] }
        let cluster = cluster, handles = handles, timeout = options.timeout, spec = poolSpec
        return info.snapshots.map { snapshot in
            PoolSnapshot(name: snapshot.name, date: snapshot.taken) {
                let key = "\(info.id)@\(snapshot.id)"
                return RBDImageDevice(path: "rbd:\(spec)/\(info.name)@\(snapshot.name)", size: snapshot.size,
                                      objectSize: info.objectSize, wholeObject: info.wholeObject, timeout: timeout) {
                    try handles.handle(key) { try cluster.open(info.name, snapshot: snapshot.name, readOnly: true) }
                }
            }
        }
    }

    public func properties(of name: String) -> [(key: String, value: String)] {
        guard let image = images.value[name] else { return [] }
        var properties = [(key: "rbd.pool", value: pool), (key: "rbd.image", value: image.name), (key: "rbd.id", value: image.id),
                          (key: "rbd.object_size", value: "\(image.objectSize)"), (key: "rbd.snapshots", value: "\(image.snapshots.count)")]
        if !namespace.isEmpty { properties.append((key: "rbd.namespace", value: namespace)) }
        if let parent = image.parent { properties.append((key: "rbd.parent", value: parent)) }
        return properties
    }

    public func release() -> [String] {
        // A listing still running in the background, or an image handle still being closed (on
        // its queue), keeps the cluster connected: a process that exits meanwhile runs librados's
        // static destructors under its busy threads, which aborts (boost::bad_get, SIGSEGV).
        // Each wait is bounded like every cluster operation.
        images.settle(seconds: options.timeout + 1)
        handles.removeAll()
        if !RBDImageHandle.waitForCloses(seconds: options.timeout + 1) {
            return ["rbd:\(poolSpec): image handles still closing after \(Int(options.timeout + 1)) s"]
        }
        return []
    }
}

/// Stands for a layer poolfs does not read itself (an RBD clone's parent).
struct NoDataDevice: BlockDevice {
    var size: UInt64 { 0 }
    func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws { plan.appendZero(length) }
    func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        extents.appendMerging(MapExtent(start: offset, length: length, depth: 0, present: false, zero: true, data: false))
    }
}

extension RBDPool {
    public var snapshotRefusal: String? { nil }

    /// librbd's snapshot calls on a read-write handle of the image. An image whose exclusive
    /// lock another client holds (a running VM) is skipped with the holder, as
    /// `openWritableImage` refuses it; otherwise the lock is taken for the operation's time, so
    /// that no client starts writing meanwhile. `--replace` removes the old snapshot and then
    /// takes the new one: a failure between the two leaves the image without it.
    public func snapshot(_ operation: SnapshotOperation, _ name: String, of volume: String, dryRun: Bool) throws {
        guard let info = images.value[volume] else { throw SnapshotError.noSuchVolume(volume) }
        let path = "rbd:\(poolSpec)/\(info.name)"
        let handle = try cluster.open(info.name, readOnly: false)
        let owners = try handle.lockOwners()
        guard owners.isEmpty else { throw SnapshotSkip.inUse("\(path): its exclusive lock is held by \(owners.joined(separator: ", "))") }
        let exists = try handle.snapshots().contains { $0.name == name }
        switch operation {
        case .create(let replace):
            if exists, !replace { throw SnapshotError.exists(name) }
        case .revert, .delete:
            if !exists { throw SnapshotSkip.noSuchSnapshot }
        }
        var locked = true
        do {
            try handle.acquireExclusiveLock()
        } catch let error where error.code == EINVAL {
            // The image has no exclusive-lock feature: there is no lock to take.
            locked = false
        } catch {
            throw SnapshotSkip.inUse("\(path): cannot take its exclusive lock: \(error)")
        }
        // rbd_close would give the lock back too, but later (RBDImageHandle closes on a queue).
        defer { if locked { try? handle.releaseExclusiveLock() } }
        if dryRun { return }
        switch operation {
        case .create:
            if exists { try handle.removeSnapshot(name) }
            try handle.createSnapshot(name)
        case .revert:
            try handle.rollback(to: name)
        case .delete:
            try handle.removeSnapshot(name)
        }
    }
}
