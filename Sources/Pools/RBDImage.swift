#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Locking
import Block

/// Open image handles, at most `capacity` of them, the least recently used closed first. A handle
/// is closed only once its last reader lets go of it (`RBDImageHandle.deinit`), so eviction
/// never cuts off a read in flight.
final class RBDHandleCache: Sendable {
    private struct Entry {
        var handle: RBDImageHandle
        var used: UInt64
    }
    private let capacity: Int
    private let entries = Locked<(map: [String: Entry], tick: UInt64)>(([:], 0))

    init(capacity: Int = 64) {
        self.capacity = max(1, capacity)
    }

    /// The handle kept under `key`, opened by `open` when there is none (outside the lock: an
    /// open waits for the cluster).
    func handle(_ key: String, open: () throws -> RBDImageHandle) throws -> RBDImageHandle {
        let known = entries.withLock { state -> RBDImageHandle? in
            state.tick += 1
            state.map[key]?.used = state.tick
            return state.map[key]?.handle
        }
        if let known { return known }
        let opened = try open()
        return entries.withLock { state in
            state.tick += 1
            if let raced = state.map[key] { return raced.handle }
            if state.map.count >= capacity, let oldest = state.map.min(by: { $0.value.used < $1.value.used })?.key {
                state.map[oldest] = nil
            }
            state.map[key] = Entry(handle: opened, used: state.tick)
            return opened
        }
    }

    /// Forgets every handle (unmount); each closes when its last reader is done.
    func removeAll() {
        entries.withLock { $0.map.removeAll() }
    }

    var count: Int { entries.withLock { $0.map.count } }
}

/// An RBD image (its live state or one snapshot) as a raw disk, read through librbd.
///
/// Nothing is opened until the first read: the handle comes from the pool's cache at each read
/// (or is the writer's own read-write handle). A read is split at object boundaries and every
/// part goes out at once (`rbd_aio_read`), so a large read runs on several OSD requests in
/// parallel; all of them share one deadline. When the deadline passes, the read fails with EIO
/// and the buffer stays allocated until librbd is done with it (`BufferStillInUse`).
public final class RBDImageDevice: BlockDevice {
    public let size: UInt64
    let objectSize: UInt64
    /// fast-diff is on and valid: allocation is asked whole objects at a time.
    let wholeObject: Bool
    /// `rbd:POOL/IMAGE[@SNAP]`, in messages.
    public let path: String
    let timeout: Double
    private let handle: @Sendable () throws -> RBDImageHandle

    init(path: String, size: UInt64, objectSize: UInt64, wholeObject: Bool, timeout: Double,
         handle: @escaping @Sendable () throws -> RBDImageHandle) {
        self.path = path
        self.size = size
        self.objectSize = max(4096, objectSize)
        self.wholeObject = wholeObject
        self.timeout = timeout
        self.handle = handle
    }

    func image() throws -> RBDImageHandle {
        do { return try handle() } catch let error as RBDError { throw io(error) }
    }

    func io(_ error: RBDError) -> Qcow2Error {
        .io(errno: error.code == EROFS || error.code == ENOENT ? error.code : EIO, operation: error.description, path: path)
    }

    public func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        guard length > 0 else { return }
        try plan.appendRead(count: length, start: 0, length: length) { buffer in
            try read(into: buffer, at: offset)
        }
    }

    /// Reads `buffer.count` bytes at `offset`, one `rbd_aio_read` per object the range touches.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        let image = try image()
        let batch = RBDBatch(image)
        var failure: RBDError?
        var done = 0
        while done < buffer.count {
            let at = offset + UInt64(done)
            let n = min(buffer.count - done, Int(objectSize - at % objectSize))
            do {
                try image.startRead(UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + n]), at: at, in: batch)
            } catch {
                failure = error
                break
            }
            done += n
        }
        do {
            try batch.wait("read \(buffer.count) bytes at \(offset)", seconds: timeout)
        } catch let error {
            if case .timedOut = error {
                throw BufferStillInUse(io(error)) { release in batch.whenFinished(release) }
            }
            failure = failure ?? error
        }
        if let failure { throw io(failure) }
    }

    /// Data where `rbd_diff_iterate2` (parent included) reports extents, holes between them.
    public func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        guard length > 0 else { return }
        let found: [(offset: UInt64, length: UInt64)]
        do { found = try image().allocated(offset: offset, length: length, wholeObject: wholeObject) } catch let error as RBDError { throw io(error) }
        let end = offset + length
        var at = offset
        for extent in found {
            let start = max(at, extent.offset), stop = min(end, extent.offset + extent.length)
            guard stop > start else { continue }
            if start > at {
                extents.appendMerging(MapExtent(start: at, length: start - at, depth: 0, present: true, zero: true, data: false, offset: at))
            }
            extents.appendMerging(MapExtent(start: start, length: stop - start, depth: 0, present: true, zero: false, data: true, offset: start))
            at = stop
        }
        if at < end {
            extents.appendMerging(MapExtent(start: at, length: end - at, depth: 0, present: true, zero: true, data: false, offset: at))
        }
    }
}

/// Writes to an image opened read-write (`-o rw`), which holds its exclusive lock: `rbd_aio_write`,
/// `rbd_aio_write_zeroes`, `rbd_aio_flush` on fsync, each bounded by the device's deadline. The
/// data is copied first, so a write that times out never leaves librbd reading freed memory.
public final class RBDImageWriter: VolumeWriter {
    let device: RBDImageDevice
    let handle: RBDImageHandle
    private let closed = Locked(false)

    init(device: RBDImageDevice, handle: RBDImageHandle) {
        self.device = device
        self.handle = handle
    }

    private func check(_ offset: UInt64, _ length: UInt64) throws {
        guard !closed.withLock({ $0 }) else { throw Qcow2Error.writeRefused("\(device.path) is closed for writing") }
        guard offset <= device.size, length <= device.size - offset else {
            throw Qcow2Error.writeRefused("\(length) bytes at \(offset) run past the end of the disk (\(device.size) bytes)")
        }
    }

    /// Runs one operation in a batch of its own and waits for it; on a timeout, `release` runs
    /// when the operation ends, else now.
    private func run(_ operation: String, release: (@Sendable () -> Void)? = nil,
                     _ start: (RBDBatch) throws(RBDError) -> Void) throws {
        let batch = RBDBatch(handle)
        do {
            try start(batch)
            try batch.wait(operation, seconds: device.timeout)
        } catch {
            if case .timedOut = error, let release { batch.whenFinished(release) } else { release?() }
            throw device.io(error)
        }
        release?()
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try check(offset, UInt64(data.count))
        guard data.count > 0 else { return }
        let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: data.count, alignment: 64)
        copy.copyMemory(from: data)
        // SAFETY: freed exactly once, after the write ended (or never started).
        let owned = UnsafeSendable(copy)
        try run("write \(data.count) bytes at \(offset)", release: { owned.value.deallocate() }) { batch throws(RBDError) in
            try handle.startWrite(UnsafeRawBufferPointer(owned.value), at: offset, in: batch)
        }
    }

    public func zero(at offset: UInt64, length: UInt64) throws {
        try check(offset, length)
        guard length > 0 else { return }
        try run("zero \(length) bytes at \(offset)") { batch throws(RBDError) in
            try handle.startWriteZeroes(at: offset, length: length, in: batch)
        }
    }

    public func flush() throws {
        try run("flush") { batch throws(RBDError) in try handle.startFlush(in: batch) }
    }

    /// Flushes and gives the exclusive lock back at once: the volume may stay open for reading
    /// through this handle, and a VM must be able to take the image meanwhile.
    public func close() throws {
        guard !closed.withLock({ was in defer { was = true }; return was }) else { return }
        try flush()
        do { try handle.releaseExclusiveLock() } catch { throw device.io(error) }
    }
}
