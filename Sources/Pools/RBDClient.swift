#if canImport(Glibc)
import Glibc
#endif
import CRBD
import Dispatch
import Locking

/// The thin layer over librados and librbd (Ceph 16.2): a connection to one pool (and namespace)
/// of a cluster, image handles, and the librbd calls poolfs makes. Every failure is one
/// `RBDError` with the call's name and its errno. No policy: which images are volumes, how many
/// handles stay open, how long a read may take, all live in `RBDPool` and `RBDImageDevice`.
///
/// librados and librbd are thread-safe: one cluster handle and one ioctx serve every thread, and
/// one image handle serves many reads at once.

public enum RBDError: Error, CustomStringConvertible, Equatable {
    /// A librados or librbd call returned `-code`.
    case call(String, code: Int32)
    /// Asynchronous I/O that did not complete by its deadline.
    case timedOut(String, seconds: Double)

    public var description: String {
        switch self {
        case .call(let operation, let code): return "\(operation): \(String(cString: strerror(code)))"
        case .timedOut(let operation, let seconds): return "\(operation): no answer within \(Int(seconds)) s"
        }
    }

    /// The positive errno.
    public var code: Int32 {
        switch self {
        case .call(_, let code): return code
        case .timedOut: return ETIMEDOUT
        }
    }

    /// Turns a librados/librbd return value (negative errno on failure) into a throw.
    @discardableResult
    static func check(_ result: Int32, _ operation: @autoclosure () -> String) throws(RBDError) -> Int32 {
        guard result >= 0 else { throw .call(operation(), code: -result) }
        return result
    }
}

/// A connected cluster (`rados_t`) and an I/O context on one pool and namespace.
// SAFETY: @unchecked Sendable because librados handles are thread-safe; they are destroyed only
// in deinit, when no image handle (which keeps the cluster alive) remains.
public final class RBDCluster: @unchecked Sendable {
    private let cluster: rados_t
    let ioctx: rados_ioctx_t
    public let pool: String
    public let namespace: String
    private let openCount = Locked(0)
    /// How many images (or snapshots) `open` opened so far: each costs several round trips.
    public var opens: Int { openCount.withLock { $0 } }

    /// `rados_create` as client `id`, the conf file (`rados_conf_read_file`; nil reads Ceph's
    /// default search path, and a missing default file is no error), then `settings` in order
    /// (`rados_conf_set`), `rados_connect` and `rados_ioctx_create` on `pool`.
    public init(id: String?, confFile: String?, settings: [(String, String)], pool: String, namespace: String) throws(RBDError) {
        self.pool = pool
        self.namespace = namespace
        var cluster: rados_t?
        try RBDError.check(rados_create(&cluster, id), "rados_create")
        self.cluster = cluster!
        var ioctx: rados_ioctx_t?
        do {
            let read = rados_conf_read_file(cluster, confFile)
            if confFile != nil { try RBDError.check(read, "rados_conf_read_file \(confFile!)") }
            for (key, value) in settings {
                // The cephx key is secret: its name only.
                try RBDError.check(rados_conf_set(cluster, key, value), key == "key" ? "rados_conf_set key" : "rados_conf_set \(key)=\(value)")
            }
            try RBDError.check(rados_connect(cluster), "rados_connect")
            try RBDError.check(rados_ioctx_create(cluster, pool, &ioctx), "rados_ioctx_create \(pool)")
        } catch {
            rados_shutdown(cluster)
            throw error
        }
        self.ioctx = ioctx!
        rados_ioctx_set_namespace(self.ioctx, namespace.isEmpty ? nil : namespace)
    }

    deinit {
        rados_ioctx_destroy(ioctx)
        rados_shutdown(cluster)
    }

    /// The cluster's fsid (`rados_cluster_fsid`).
    public func fsid() -> String {
        var buffer = [CChar](repeating: 0, count: 64)
        guard rados_cluster_fsid(cluster, &buffer, buffer.count - 1) >= 0 else { return "" }
        return Self.string(buffer)
    }

    /// A NUL-terminated C string that a call wrote into `buffer`.
    static func string(_ buffer: [CChar]) -> String {
        String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// The images of the pool's namespace, as (id, name) (`rbd_list2`).
    public func listImages() throws(RBDError) -> [(id: String, name: String)] {
        var capacity = 64
        while true {
            var specs = [rbd_image_spec_t](repeating: rbd_image_spec_t(), count: capacity)
            var count = capacity
            let result = rbd_list2(ioctx, &specs, &count)
            if result == -ERANGE, count > capacity { capacity = count; continue }
            try RBDError.check(result, "rbd_list2 \(pool)")
            defer { rbd_image_spec_list_cleanup(&specs, count) }
            return specs[0..<count].map { (String(cString: $0.id), String(cString: $0.name)) }
        }
    }

    /// Opens `image` (at `snapshot` when given): read-only (`rbd_open_read_only`) or read-write
    /// (`rbd_open`).
    public func open(_ image: String, snapshot: String? = nil, readOnly: Bool) throws(RBDError) -> RBDImageHandle {
        openCount.withLock { $0 += 1 }
        var handle: rbd_image_t?
        let what = snapshot.map { "\(pool)/\(image)@\($0)" } ?? "\(pool)/\(image)"
        if readOnly {
            try RBDError.check(rbd_open_read_only(ioctx, image, &handle, snapshot), "rbd_open_read_only \(what)")
        } else {
            try RBDError.check(rbd_open(ioctx, image, &handle, snapshot), "rbd_open \(what)")
        }
        return RBDImageHandle(handle!, cluster: self, name: what)
    }
}

/// What the header object of a format-2 image (`rbd_header.<id>`) says of it now: the head's
/// size and the ids of its snapshots (of every snapshot namespace, newest first, as the
/// snapshot context lists them).
public struct RBDHeader: Equatable, Sendable {
    public var size: UInt64
    public var snapshots: [UInt64]
}

extension RBDCluster {
    /// Reads the header of each image in `ids` without opening it: one compound read of
    /// `rbd_header.<id>` calling cls_rbd's `get_size` (of the head, CEPH_NOSNAP) and
    /// `get_snapcontext` (`rados_read_op_exec_user_buf`), all sent at once
    /// (`rados_aio_read_op_operate`) and waited for together at most `seconds`. So N images cost
    /// N small OSD reads and one round trip of time, where opening them costs several round trips
    /// each. An image whose read failed (removed meanwhile, a format-1 image) or did not answer in
    /// time is left out.
    public func headers(of ids: [String], seconds: Double) -> [String: RBDHeader] {
        let group = DispatchGroup()
        var reads: [HeaderRead] = []
        for id in ids {
            let read = HeaderRead(id: id, group: group)
            guard read.start(ioctx) else { continue }
            reads.append(read)
        }
        _ = group.wait(timeout: .now() + seconds)
        var found: [String: RBDHeader] = [:]
        for read in reads {
            if let header = read.result.withLock({ $0 }) { found[read.id] = header }
        }
        return found
    }
}

/// One header read in flight. Its buffers are written by librados when the read completes, so
/// the completion holds a reference until then, also when the waiter gave up.
// SAFETY: @unchecked Sendable because the buffers are only touched by librados until the
// completion, then by the completion callback; the result is behind a lock.
final class HeaderRead: @unchecked Sendable {
    let id: String
    private let group: DispatchGroup
    let result = Locked<RBDHeader?>(nil)
    /// `get_size` answers (u8 order, u64 size); `get_snapcontext` (u64 seq, u32 count, u64 ids).
    private let sizeOut = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 8)
    private let snapOut = UnsafeMutableRawBufferPointer.allocate(byteCount: 8 + 4 + 8 * 1024, alignment: 8)
    private let used = UnsafeMutablePointer<Int>.allocate(capacity: 2)
    private let status = UnsafeMutablePointer<Int32>.allocate(capacity: 2)
    private var operation: rados_read_op_t?

    init(id: String, group: DispatchGroup) {
        self.id = id
        self.group = group
        used.initialize(repeating: 0, count: 2)
        status.initialize(repeating: 0, count: 2)
    }

    deinit {
        if let operation { rados_release_read_op(operation) }
        sizeOut.deallocate(); snapOut.deallocate(); used.deallocate(); status.deallocate()
    }

    /// Sends the read; false if it could not be sent (then nothing waits for it).
    func start(_ ioctx: rados_ioctx_t) -> Bool {
        guard let operation = rados_create_read_op() else { return false }
        self.operation = operation
        var head = UInt64(0xffff_ffff_ffff_fffe).littleEndian  // CEPH_NOSNAP
        withUnsafeBytes(of: &head) { input in
            // librados copies the input into the operation.
            rados_read_op_exec_user_buf(operation, "rbd", "get_size", input.baseAddress!.assumingMemoryBound(to: CChar.self), input.count,
                                        sizeOut.baseAddress!.assumingMemoryBound(to: CChar.self), sizeOut.count, used, status)
        }
        rados_read_op_exec_user_buf(operation, "rbd", "get_snapcontext", nil, 0,
                                    snapOut.baseAddress!.assumingMemoryBound(to: CChar.self), snapOut.count, used + 1, status + 1)
        var completion: rados_completion_t?
        // SAFETY: the retain is given back by the callback, which librados calls exactly once.
        let retained = Unmanaged.passRetained(self).toOpaque()
        guard rados_aio_create_completion2(retained, { completion, arg in
            let read = Unmanaged<HeaderRead>.fromOpaque(arg!).takeRetainedValue()
            let result = rados_aio_get_return_value(completion)
            rados_aio_release(completion)
            read.finish(result)
        }, &completion) >= 0 else {
            Unmanaged<HeaderRead>.fromOpaque(retained).release()
            return false
        }
        group.enter()
        guard rados_aio_read_op_operate(operation, ioctx, completion, "rbd_header." + id, 0) >= 0 else {
            // Not started: the callback never runs.
            rados_aio_release(completion)
            Unmanaged<HeaderRead>.fromOpaque(retained).release()
            group.leave()
            return false
        }
        return true
    }

    private func finish(_ returned: Int32) {
        defer { group.leave() }
        guard returned >= 0, status[0] >= 0, status[1] >= 0, used[0] >= 9, used[1] >= 12 else { return }
        let size = sizeOut.loadUnaligned(fromByteOffset: 1, as: UInt64.self).littleEndian
        let count = Int(snapOut.loadUnaligned(fromByteOffset: 8, as: UInt32.self).littleEndian)
        guard 12 + 8 * count <= used[1] else { return }
        let snapshots = (0..<count).map { snapOut.loadUnaligned(fromByteOffset: 12 + 8 * $0, as: UInt64.self).littleEndian }
        result.withLock { $0 = RBDHeader(size: size, snapshots: snapshots) }
    }
}

/// One open image (`rbd_image_t`). Closed when the last reference goes, on a queue of its own:
/// `rbd_close` waits for the image's I/O, and the last reference may be dropped inside a librbd
/// completion callback, where waiting for librbd would deadlock.
// SAFETY: @unchecked Sendable because librbd image handles are thread-safe.
public final class RBDImageHandle: @unchecked Sendable {
    let image: rbd_image_t
    /// Keeps the cluster connected while the image is open.
    let cluster: RBDCluster
    public let name: String
    private static let closer = DispatchQueue(label: "poolfs.rbd.close")

    init(_ image: rbd_image_t, cluster: RBDCluster, name: String) {
        self.image = image
        self.cluster = cluster
        self.name = name
    }

    deinit {
        // SAFETY: the handle is unreachable now; the queue keeps the cluster alive until closed.
        let image = UnsafeSendable(image), cluster = cluster
        Self.closer.async { rbd_close(image.value); _ = cluster }
    }

    /// Waits up to `seconds` for the closes queued so far to end; false if they did not.
    public static func waitForCloses(seconds: Double) -> Bool {
        let done = DispatchSemaphore(value: 0)
        closer.async { done.signal() }
        return done.wait(timeout: .now() + seconds) == .success
    }

    /// Size, object size and (for a clone) nothing of the parent (`rbd_stat`).
    public func stat() throws(RBDError) -> (size: UInt64, objectSize: UInt64) {
        var info = rbd_image_info_t()
        try RBDError.check(rbd_stat(image, &info, MemoryLayout<rbd_image_info_t>.size), "rbd_stat \(name)")
        return (info.size, info.obj_size)
    }

    /// `rbd_get_features` and `rbd_get_flags`.
    public func features() throws(RBDError) -> (features: UInt64, flags: UInt64) {
        var features: UInt64 = 0, flags: UInt64 = 0
        try RBDError.check(rbd_get_features(image, &features), "rbd_get_features \(name)")
        try RBDError.check(rbd_get_flags(image, &flags), "rbd_get_flags \(name)")
        return (features, flags)
    }

    /// The image's id (`rbd_get_id`): stable across renames.
    public func id() throws(RBDError) -> String {
        var buffer = [CChar](repeating: 0, count: 64)
        try RBDError.check(rbd_get_id(image, &buffer, buffer.count - 1), "rbd_get_id \(name)")
        return RBDCluster.string(buffer)
    }

    /// When the image was created (`rbd_get_create_timestamp`).
    public func createTimestamp() throws(RBDError) -> timespec {
        var ts = timespec()
        try RBDError.check(rbd_get_create_timestamp(image, &ts), "rbd_get_create_timestamp \(name)")
        return ts
    }

    /// The snapshots (`rbd_snap_list`), each with its timestamp (`rbd_snap_get_timestamp`).
    public func snapshots() throws(RBDError) -> [(id: UInt64, name: String, size: UInt64, time: timespec)] {
        var capacity: Int32 = 16
        while true {
            var infos = [rbd_snap_info_t](repeating: rbd_snap_info_t(), count: Int(capacity) + 1)
            var count = capacity
            let result = rbd_snap_list(image, &infos, &count)
            if result == -ERANGE, count > capacity { capacity = count; continue }
            try RBDError.check(result, "rbd_snap_list \(name)")
            defer { rbd_snap_list_end(&infos) }
            return try infos[0..<Int(result)].map { info throws(RBDError) in
                var ts = timespec()
                try RBDError.check(rbd_snap_get_timestamp(image, info.id, &ts), "rbd_snap_get_timestamp \(name)")
                return (info.id, String(cString: info.name), info.size, ts)
            }
        }
    }

    /// A clone's parent as pool[/namespace]/image@snapshot (`rbd_get_parent`); nil if none.
    public func parent() throws(RBDError) -> String? {
        var image = rbd_linked_image_spec_t()
        var snap = rbd_snap_spec_t()
        let result = rbd_get_parent(self.image, &image, &snap)
        if result == -ENOENT { return nil }
        try RBDError.check(result, "rbd_get_parent \(name)")
        defer { rbd_linked_image_spec_cleanup(&image); rbd_snap_spec_cleanup(&snap) }
        let namespace = String(cString: image.pool_namespace)
        return String(cString: image.pool_name) + (namespace.isEmpty ? "" : "/" + namespace) + "/"
            + String(cString: image.image_name) + "@" + String(cString: snap.name)
    }

    /// The extents that hold data in `[offset, offset + length)`, including the parent's, whole
    /// objects at a time when `wholeObject` (`rbd_diff_iterate2` from the beginning of time).
    public func allocated(offset: UInt64, length: UInt64, wholeObject: Bool) throws(RBDError) -> [(offset: UInt64, length: UInt64)] {
        final class Found { var extents: [(offset: UInt64, length: UInt64)] = [] }
        let found = Found()
        // SAFETY: `found` outlives the synchronous call that passes it back.
        let result = rbd_diff_iterate2(image, nil, offset, length, 1, wholeObject ? 1 : 0, { offset, length, exists, arg in
            let found = Unmanaged<Found>.fromOpaque(arg!).takeUnretainedValue()
            if exists != 0 { found.extents.append((offset, UInt64(length))) }
            return 0
        }, Unmanaged.passUnretained(found).toOpaque())
        try RBDError.check(result, "rbd_diff_iterate2 \(name)")
        return found.extents.sorted { $0.offset < $1.offset }
    }

    /// The exclusive lock's owners other than this handle (`rbd_lock_get_owners`).
    public func lockOwners() throws(RBDError) -> [String] {
        var mode = RBD_LOCK_MODE_EXCLUSIVE
        var owners = [UnsafeMutablePointer<CChar>?](repeating: nil, count: 8)
        var count = owners.count
        let result = rbd_lock_get_owners(image, &mode, &owners, &count)
        if result == -ENOENT { return [] }
        try RBDError.check(result, "rbd_lock_get_owners \(name)")
        defer { rbd_lock_get_owners_cleanup(&owners, count) }
        return owners[0..<count].compactMap { $0.map { String(cString: $0) } }
    }

    /// Takes the exclusive lock and keeps it until the image is closed (`rbd_lock_acquire`): no
    /// other client can take it over meanwhile.
    public func acquireExclusiveLock() throws(RBDError) {
        try RBDError.check(rbd_lock_acquire(image, RBD_LOCK_MODE_EXCLUSIVE), "rbd_lock_acquire \(name)")
    }

    /// Gives the exclusive lock back (`rbd_lock_release`).
    public func releaseExclusiveLock() throws(RBDError) {
        try RBDError.check(rbd_lock_release(image), "rbd_lock_release \(name)")
    }

    /// Takes a snapshot of the image as it is now (`rbd_snap_create`).
    public func createSnapshot(_ snapshot: String) throws(RBDError) {
        try RBDError.check(rbd_snap_create(image, snapshot), "rbd_snap_create \(name)@\(snapshot)")
    }

    /// Puts the image's data back to the snapshot (`rbd_snap_rollback`); the handle must be
    /// read-write.
    public func rollback(to snapshot: String) throws(RBDError) {
        try RBDError.check(rbd_snap_rollback(image, snapshot), "rbd_snap_rollback \(name)@\(snapshot)")
    }

    /// Removes the snapshot (`rbd_snap_remove`); a protected one fails with EBUSY.
    public func removeSnapshot(_ snapshot: String) throws(RBDError) {
        try RBDError.check(rbd_snap_remove(image, snapshot), "rbd_snap_remove \(name)@\(snapshot)")
    }

    /// Starts a read of `buffer.count` bytes at `offset` into `buffer` (`rbd_aio_read`).
    func startRead(_ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64, in batch: RBDBatch) throws(RBDError) {
        try batch.start("rbd_aio_read \(name)") { rbd_aio_read(image, offset, buffer.count, buffer.baseAddress!.assumingMemoryBound(to: CChar.self), $0) }
    }

    /// Starts a write of `data` at `offset` (`rbd_aio_write`); `data` must live until the batch ends.
    func startWrite(_ data: UnsafeRawBufferPointer, at offset: UInt64, in batch: RBDBatch) throws(RBDError) {
        try batch.start("rbd_aio_write \(name)") { rbd_aio_write(image, offset, data.count, data.baseAddress!.assumingMemoryBound(to: CChar.self), $0) }
    }

    /// Starts zeroing `length` bytes at `offset`, deallocating whole objects where it can
    /// (`rbd_aio_write_zeroes`; unlike `rbd_aio_discard` it never skips a partial range).
    func startWriteZeroes(at offset: UInt64, length: UInt64, in batch: RBDBatch) throws(RBDError) {
        try batch.start("rbd_aio_write_zeroes \(name)") { rbd_aio_write_zeroes(image, offset, Int(length), $0, 0, 0) }
    }

    /// Starts a flush of everything written so far (`rbd_aio_flush`).
    func startFlush(in batch: RBDBatch) throws(RBDError) {
        try batch.start("rbd_aio_flush \(name)") { rbd_aio_flush(image, $0) }
    }
}

/// Asynchronous librbd operations started together and waited for with one deadline.
///
/// Each operation's completion holds a reference to the batch (and the batch to the image), so an
/// operation that outlives its waiter (the cluster stopped answering) still finds both when it
/// completes. Memory librbd writes into must live as long: `whenFinished` hands the job of freeing
/// it to the batch, which runs it after the last completion.
final class RBDBatch: @unchecked Sendable {
    private struct State {
        var pending = 0
        var firstError: RBDError?
        var released = false
        var afterLast: (@Sendable () -> Void)?
    }
    // SAFETY: @unchecked Sendable because every mutable field is behind `state`.
    private let state = Locked(State())
    private let done = DispatchSemaphore(value: 0)
    /// The image the operations run on: not closed before they end.
    private let keep: RBDImageHandle

    init(_ handle: RBDImageHandle) { keep = handle }

    /// Starts one operation: `issue` gets a completion whose callback finishes it.
    fileprivate func start(_ operation: String, _ issue: (rbd_completion_t) -> Int32) throws(RBDError) {
        var completion: rbd_completion_t?
        // SAFETY: the retain is given back by the callback, which librbd calls exactly once.
        let retained = Unmanaged.passRetained(self).toOpaque()
        let created = rbd_aio_create_completion(retained, { completion, arg in
            let batch = Unmanaged<RBDBatch>.fromOpaque(arg!).takeRetainedValue()
            let result = rbd_aio_get_return_value(completion)
            rbd_aio_release(completion)
            batch.finish(result < 0 ? .call("librbd I/O", code: Int32(-result)) : nil)
        }, &completion)
        guard created >= 0 else {
            Unmanaged<RBDBatch>.fromOpaque(retained).release()
            throw .call("rbd_aio_create_completion", code: -created)
        }
        state.withLock { $0.pending += 1 }
        let result = issue(completion!)
        if result < 0 {
            // Not started: the callback never runs.
            rbd_aio_release(completion)
            Unmanaged<RBDBatch>.fromOpaque(retained).release()
            state.withLock { $0.pending -= 1 }
            throw .call(operation, code: -result)
        }
    }

    private func finish(_ error: RBDError?) {
        let last = state.withLock { state -> (@Sendable () -> Void)?? in
            state.pending -= 1
            if state.firstError == nil { state.firstError = error }
            guard state.pending == 0, state.released else { return nil }
            return .some(state.afterLast)
        }
        if let last {
            last?()
            done.signal()
        }
    }

    /// Waits until every started operation completed, at most `seconds`; throws the first
    /// failure. On a timeout the operations keep running: see `whenFinished`.
    func wait(_ operation: String, seconds: Double) throws(RBDError) {
        let deadline = DispatchTime.now() + seconds
        let finished = state.withLock { state -> Bool in
            state.released = true
            return state.pending == 0
        }
        if !finished, done.wait(timeout: deadline) == .timedOut {
            throw .timedOut(operation, seconds: seconds)
        }
        if let error = state.withLock({ $0.firstError }) { throw error }
    }

    /// Runs `release` once every operation has completed: now, or from the last completion.
    func whenFinished(_ release: @escaping @Sendable () -> Void) {
        let now = state.withLock { state -> Bool in
            guard state.pending > 0 else { return true }
            state.afterLast = release
            return false
        }
        if now { release() }
    }
}

/// librbd's feature and flag bits poolfs looks at.
enum RBDFeatures {
    static let fastDiff = UInt64(RBD_FEATURE_FAST_DIFF)
    static let fastDiffInvalid = UInt64(RBD_FLAG_FAST_DIFF_INVALID)
}

struct UnsafeSendable<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
