#if canImport(Glibc)
import Glibc
#endif
import CHostIO
import Synchronization
import Locking

/// An open image file. Every libc call the engine makes lives in this file; EINTR is retried here
/// and nowhere else. Reads use pread, so one `HostFile` serves any number of threads at once.
///
/// A file of a network pool has no descriptor (`fd` is -1): `remote` reads it through its client
/// library (RemoteFile.swift), and is read-only. Callers that hand `fd` to the kernel (FUSE
/// splice and passthrough, fstat, xattrs) check `isRemote` first.
public final class HostFile: Sendable {
    public let path: String
    public let fd: Int32
    /// The network file this reads, when it is one.
    public let remote: (any RemoteFile)?
    public var isRemote: Bool { remote != nil }
    /// Unique for the life of the process: cache keys use it, so a reopened file never sees
    /// entries cached from its previous incarnation.
    public let id: UInt64
    /// The file's size: as opened, then grown by this process's own writes. The engine is
    /// reopened when anyone else changes the file.
    public var size: UInt64 { currentSize.load(ordering: .acquiring) }
    private let currentSize: Atomic<UInt64>
    /// Opened for writing as well as reading.
    public let writable: Bool
    /// A block device (an LVM physical volume, a zvol), not a regular file.
    public let isBlockDevice: Bool
    public let identity: FileIdentity
    /// Bytes the file really occupies on disk (st_blocks × 512) when it was opened.
    public let allocatedBytes: UInt64
    /// Owner, group and mode (type and permission bits) when it was opened.
    public let owner: uid_t
    public let group: gid_t
    public let mode: mode_t

    public var isRegularFile: Bool { mode & S_IFMT == S_IFREG }

    var typeName: String { Self.typeName(of: mode) }

    static func typeName(of mode: mode_t) -> String {
        switch mode & S_IFMT {
        case S_IFBLK: return "a block device"
        case S_IFCHR: return "a character device"
        case S_IFIFO: return "a FIFO"
        case S_IFSOCK: return "a socket"
        case S_IFDIR: return "a directory"
        default: return "not a regular file"
        }
    }

    private static let nextID = Atomic<UInt64>(1)

    /// What a writer did to the file, in order, for tests that replay a power loss or make a
    /// write fail.
    public enum Change: Sendable {
        case write(offset: UInt64, bytes: [UInt8])
        /// The range reads as zeros now (a hole punched or zeroed).
        case zero(offset: UInt64, length: UInt64)
        /// fdatasync returned: everything before is on stable storage.
        case barrier
    }
    private let observer = Locked<(@Sendable (Change) -> Void)?>(nil)
    private let faults = Locked<(@Sendable (Change) -> Int32?)?>(nil)
    private let observed = Atomic<Bool>(false)

    /// Calls `body` with each change this process makes to the file from now on (tests).
    public func observeChanges(_ body: @escaping @Sendable (Change) -> Void) {
        observer.withLock { $0 = body }
        observed.store(true, ordering: .releasing)
    }

    /// Asks `body` before each write and fdatasync from now on (tests): an errno it returns
    /// fails the call, as a full disk or a failing device would, and nothing is written.
    public func injectFaults(_ body: @escaping @Sendable (Change) -> Int32?) {
        faults.withLock { $0 = body }
        observed.store(true, ordering: .releasing)
    }

    private func report(_ change: @autoclosure () -> Change) {
        guard observed.load(ordering: .acquiring) else { return }
        let body = observer.withLock { $0 }
        body?(change())
    }

    /// The errno a test makes this change fail with, if any.
    private func injectedFault(_ change: @autoclosure () -> Change) -> Int32? {
        guard observed.load(ordering: .acquiring), let body = faults.withLock({ $0 }) else { return nil }
        return body(change())
    }

    /// Wraps open(2) with O_RDONLY (or O_RDWR) | O_NONBLOCK | O_NOCTTY | O_CLOEXEC, then
    /// fstat(2). O_NONBLOCK: a FIFO put where an image was never blocks the open (and a FIFO or
    /// socket is refused); it changes nothing for regular files and block devices.
    public convenience init(path: String, writable: Bool = false) throws(Qcow2Error) {
        let fd = retryingEINTR { open(path, (writable ? O_RDWR : O_RDONLY) | O_NONBLOCK | O_NOCTTY | O_CLOEXEC) }
        guard fd >= 0 else { throw .io(errno: Glibc.errno, operation: "open", path: path) }
        try self.init(descriptor: fd, path: path, writable: writable)
    }

    /// Opens `relativePath` beneath the directory open as `directory` (poolfs_open_beneath:
    /// openat2 with RESOLVE_BENEATH, O_NONBLOCK | O_NOCTTY), then fstat(2); only a regular file
    /// is accepted. `path` is what messages call it. Throws `.refused` when the path leads out
    /// of the directory or names something other than a regular file.
    public static func openBeneath(directory: Int32, relativePath: String, path: String,
                                   writable: Bool) throws(Qcow2Error) -> HostFile {
        let fd = poolfs_open_beneath(directory, relativePath, (writable ? O_RDWR : O_RDONLY) | O_NONBLOCK | O_NOCTTY)
        if fd == -EXDEV || fd == -ELOOP {
            throw .refused("\(path) leads outside the pool (through '..' or a symbolic link)")
        }
        guard fd >= 0 else { throw .io(errno: -fd, operation: "open", path: path) }
        let file = try HostFile(descriptor: fd, path: path, writable: writable)
        guard file.isRegularFile else {
            throw .refused("\(path) is not a regular file (\(file.typeName)); only regular files are read as images")
        }
        return file
    }

    /// A directory's descriptor (O_DIRECTORY) for `openBeneath`; the caller closes it.
    public static func openDirectory(_ path: String) throws(Qcow2Error) -> Int32 {
        let fd = retryingEINTR { open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
        guard fd >= 0 else { throw .io(errno: Glibc.errno, operation: "open", path: path) }
        return fd
    }

    public static func closeDirectory(_ fd: Int32) { close(fd) }

    /// Where the open descriptor leads now, symbolic links resolved (readlink of /proc/self/fd).
    public var openedPath: String? {
        if remote != nil { return nil }
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        let n = readlink("/proc/self/fd/\(fd)", &buffer, buffer.count - 1)
        guard n > 0 else { return nil }
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// A second, read-only open of the file `other` has open, with an open file description of
    /// its own, so that OFD locks taken through it are held and dropped apart from `other`'s.
    /// open(2) of /proc/self/fd/N reaches the same file even if its path names another one by
    /// now; without /proc, the path is opened and must still name the same file.
    public convenience init(reopening other: HostFile) throws(Qcow2Error) {
        if other.remote != nil { throw .io(errno: EOPNOTSUPP, operation: "reopen", path: other.path) }
        var fd = retryingEINTR { open("/proc/self/fd/\(other.fd)", O_RDONLY | O_CLOEXEC) }
        if fd < 0 { fd = retryingEINTR { open(other.path, O_RDONLY | O_CLOEXEC) } }
        guard fd >= 0 else { throw .io(errno: Glibc.errno, operation: "open", path: other.path) }
        try self.init(descriptor: fd, path: other.path, writable: false)
        guard identity.device == other.identity.device, identity.inode == other.identity.inode else {
            throw .io(errno: ESTALE, operation: "reopen", path: other.path)
        }
    }

    /// Takes `fd` over: it is closed on failure and when the object goes.
    private init(descriptor fd: Int32, path: String, writable: Bool) throws(Qcow2Error) {
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let code = Glibc.errno
            close(fd)
            throw .io(errno: code, operation: "fstat", path: path)
        }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            close(fd)
            throw .io(errno: EISDIR, operation: "open", path: path)
        }
        if (st.st_mode & S_IFMT) == S_IFIFO || (st.st_mode & S_IFMT) == S_IFSOCK {
            close(fd)
            throw .refused("\(path) is \(Self.typeName(of: st.st_mode)), not an image")
        }
        self.path = path
        self.fd = fd
        self.remote = nil
        self.id = Self.nextID.add(1, ordering: .relaxed).oldValue
        self.identity = FileIdentity(st)
        self.allocatedBytes = UInt64(st.st_blocks) * 512
        self.owner = st.st_uid
        self.group = st.st_gid
        self.mode = st.st_mode
        self.isBlockDevice = (st.st_mode & S_IFMT) == S_IFBLK
        self.currentSize = Atomic(isBlockDevice ? Self.blockDeviceSize(fd) : UInt64(st.st_size))
        self.writable = writable
    }

    /// A file of a network share, read through `remote`; `path` is what messages call it
    /// (its URL). Only a regular file is accepted.
    public init(remote: any RemoteFile, path: String) throws(Qcow2Error) {
        let st = try remote.status()
        guard st.st_mode & S_IFMT == S_IFREG else {
            throw .refused("\(path) is not a regular file (\(Self.typeName(of: st.st_mode))); only regular files are read as images")
        }
        self.path = path
        self.fd = -1
        self.remote = remote
        self.id = Self.nextID.add(1, ordering: .relaxed).oldValue
        self.identity = FileIdentity(st)
        self.allocatedBytes = UInt64(st.st_blocks) * 512
        self.owner = st.st_uid
        self.group = st.st_gid
        self.mode = st.st_mode
        self.isBlockDevice = false
        self.currentSize = Atomic(UInt64(st.st_size))
        self.writable = false
    }

    deinit { if fd >= 0 { close(fd) } }

    /// Reads exactly `buffer.count` bytes at `offset` with pread(2). The end of the file comes
    /// first only when the file is shorter than its reader thought (a table past the end, or a
    /// file truncated since the read was planned): an error, never zeros. Where QEMU reads zeros
    /// past the end, the plan says so (`ReadPlan.appendHost`).
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(Qcow2Error) {
        var done = 0
        while done < buffer.count {
            if let remote {
                let n = try remote.read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), at: offset + UInt64(done))
                if n == 0 {
                    throw .corrupt("read of \(buffer.count) bytes runs past the end of \(path)", offset: offset)
                }
                done += n
                continue
            }
            let n = retryingEINTR {
                pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            }
            if n < 0 { throw .io(errno: Glibc.errno, operation: "pread", path: path) }
            if n == 0 {
                throw .corrupt("read of \(buffer.count) bytes runs past the end of \(path)", offset: offset)
            }
            done += n
        }
    }

    /// Reads `count` bytes at `offset` that must lie inside the file (metadata).
    public func readBytes(at offset: UInt64, count: Int) throws(Qcow2Error) -> [UInt8] {
        guard offset <= size, UInt64(count) <= size - offset else {
            throw .corrupt("\(count)-byte table at \(offset) lies past the end of the file (\(size) bytes)", offset: offset)
        }
        var bytes = [UInt8](repeating: 0, count: count)
        var failure: Qcow2Error?
        bytes.withUnsafeMutableBytes { buffer in
            do throws(Qcow2Error) { try read(into: buffer, at: offset) } catch { failure = error }
        }
        if let failure { throw failure }
        return bytes
    }

    /// Writes all of `buffer` at `offset` with pwrite(2); the file grows as needed.
    public func write(_ buffer: UnsafeRawBufferPointer, at offset: UInt64) throws(Qcow2Error) {
        if remote != nil { throw .io(errno: EROFS, operation: "pwrite", path: path) }
        if let code = injectedFault(.write(offset: offset, bytes: Array(buffer))) {
            throw .io(errno: code, operation: "pwrite", path: path)
        }
        report(.write(offset: offset, bytes: Array(buffer)))
        var done = 0
        while done < buffer.count {
            let n = retryingEINTR {
                pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            }
            if n < 0 { throw .io(errno: Glibc.errno, operation: "pwrite", path: path) }
            done += n
        }
        let end = offset + UInt64(buffer.count)
        var seen = currentSize.load(ordering: .relaxed)
        while seen < end {
            let (exchanged, original) = currentSize.compareExchange(expected: seen, desired: end, ordering: .acquiringAndReleasing)
            if exchanged { break }
            seen = original
        }
    }

    public func write(_ bytes: [UInt8], at offset: UInt64) throws(Qcow2Error) {
        var failure: Qcow2Error?
        bytes.withUnsafeBytes { buffer in
            do throws(Qcow2Error) { try write(buffer, at: offset) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    /// fdatasync(2): everything written so far is on stable storage.
    public func syncData() throws(Qcow2Error) {
        if remote != nil { throw .io(errno: EROFS, operation: "fdatasync", path: path) }
        if let code = injectedFault(.barrier) { throw .io(errno: code, operation: "fdatasync", path: path) }
        guard retryingEINTR({ fdatasync(fd) }) == 0 else { throw .io(errno: Glibc.errno, operation: "fdatasync", path: path) }
        report(.barrier)
    }

    /// Frees the bytes' storage; they read as zeros afterwards. False where the filesystem cannot.
    @discardableResult
    public func punchHole(at offset: UInt64, length: UInt64) -> Bool {
        if remote != nil { return false }
        guard poolfs_punch_hole(fd, offset, length) == 0 else { return false }
        report(.zero(offset: offset, length: length))
        return true
    }

    /// Makes the bytes read as zeros, cheaply where the filesystem can (fallocate ZERO_RANGE),
    /// otherwise by writing zeros.
    public func zero(at offset: UInt64, length: UInt64) throws(Qcow2Error) {
        if remote != nil { throw .io(errno: EROFS, operation: "fallocate", path: path) }
        if poolfs_zero_range(fd, offset, length) == 0 {
            report(.zero(offset: offset, length: length))
            return
        }
        let chunk = [UInt8](repeating: 0, count: Int(min(length, 1 << 20)))
        var at = offset
        while at < offset + length {
            let n = Int(min(UInt64(chunk.count), offset + length - at))
            try write(n == chunk.count ? chunk : Array(chunk[0..<n]), at: at)
            at += UInt64(n)
        }
    }

    /// The next offset at or after `offset` holding data (lseek SEEK_DATA), or nil when only a
    /// hole follows. Filesystems without hole support report everything as data.
    public func nextData(from offset: UInt64) -> UInt64? {
        if let remote {
            switch remote.seek(from: offset, hole: false) {
            case .at(let at): return at
            case .none: return nil
            case .unknown: return offset
            }
        }
        let r = lseek(fd, off_t(offset), seekData)
        if r < 0 { return Glibc.errno == ENXIO ? nil : offset }
        return UInt64(r)
    }

    /// The next hole at or after `offset` (lseek SEEK_HOLE); the end of the file counts as a hole.
    public func nextHole(from offset: UInt64) -> UInt64 {
        if let remote {
            if case .at(let at) = remote.seek(from: offset, hole: true) { return min(at, size) }
            return size
        }
        let r = lseek(fd, off_t(offset), seekHole)
        return r < 0 ? size : UInt64(r)
    }

    /// Whether the file changed since it was opened, by stat(2) of its path: also sees the path
    /// now naming another file.
    public func changedOnDisk() -> Bool {
        if let remote { return remote.statusByName().map(FileIdentity.init) != identity }
        return FileIdentity(path: path) != identity
    }

    /// Whether the open file was modified since it was opened, by fstat(2) of its descriptor:
    /// cheaper than a path lookup, blind to the path being replaced.
    public func modifiedInPlace() -> Bool {
        if let remote { return (try? remote.status()).map(FileIdentity.init) != identity }
        var st = stat()
        guard fstat(fd, &st) == 0 else { return true }
        return FileIdentity(st) != identity
    }

    /// The file's status now: fstat(2) of its descriptor, or the network file's. nil when it
    /// cannot be had.
    public func currentStatus() -> stat? {
        if let remote { return try? remote.status() }
        var st = stat()
        return fstat(fd, &st) == 0 ? st : nil
    }

    /// Whether the open file's size or modification time changed since it was opened (fstat(2)
    /// of its descriptor). Unlike `modifiedInPlace`, blind to the ctime that a rename over the
    /// file or its deletion changes: for a file no name leads to any more.
    public func contentChanged() -> Bool {
        var st = stat()
        if let remote {
            guard let now = try? remote.status() else { return true }
            st = now
        } else {
            guard fstat(fd, &st) == 0 else { return true }
        }
        let now = FileIdentity(st)
        return now.size != identity.size || now.mtime.tv_sec != identity.mtime.tv_sec || now.mtime.tv_nsec != identity.mtime.tv_nsec
    }

    private static func blockDeviceSize(_ fd: Int32) -> UInt64 {
        let end = lseek(fd, 0, SEEK_END)
        return end < 0 ? 0 : UInt64(end)
    }
}

/// What tells one version of a file from another: device, inode, size and both timestamps.
public struct FileIdentity: Equatable, Sendable {
    public let device: UInt64
    public let inode: UInt64
    public let size: Int64
    public let mtime: timespec
    public let ctime: timespec

    public init(_ st: stat) {
        device = UInt64(st.st_dev)
        inode = UInt64(st.st_ino)
        size = Int64(st.st_size)
        mtime = st.st_mtim
        ctime = st.st_ctim
    }

    /// stat(2) of `path`; nil when it cannot be stat'ed.
    public init?(path: String) {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        self.init(st)
    }

    public static func == (a: FileIdentity, b: FileIdentity) -> Bool {
        a.device == b.device && a.inode == b.inode && a.size == b.size
            && a.mtime.tv_sec == b.mtime.tv_sec && a.mtime.tv_nsec == b.mtime.tv_nsec
            && a.ctime.tv_sec == b.ctime.tv_sec && a.ctime.tv_nsec == b.ctime.tv_nsec
    }
}

extension timespec: @retroactive @unchecked Sendable {}

/// lseek whence values from <unistd.h> that Glibc's module hides behind _GNU_SOURCE.
let seekData: Int32 = 3
let seekHole: Int32 = 4

@inline(__always)
func retryingEINTR<T: BinaryInteger>(_ call: () -> T) -> T {
    while true {
        let r = call()
        if r >= 0 || Glibc.errno != EINTR { return r }
    }
}
