#if canImport(Glibc)
import Glibc
#endif

/// An errno to reply with. Operations return it; FuseKit sends it.
public struct Errno: Error, Equatable, Sendable {
    public let code: Int32
    public init(_ code: Int32) { self.code = code }
    public static let noEntry = Errno(ENOENT)
    public static let io = Errno(EIO)
    public static let readOnly = Errno(EROFS)
    public static let noData = Errno(ENODATA)
    public static let range = Errno(ERANGE)
    public static let invalid = Errno(EINVAL)
    public static let notDirectory = Errno(ENOTDIR)
    public static let isDirectory = Errno(EISDIR)
    public static let noDevice = Errno(ENXIO)
    public static let notPermitted = Errno(EPERM)
    public static let noSpace = Errno(ENOSPC)
    public static let notSupported = Errno(EOPNOTSUPP)
    public static let badDescriptor = Errno(EBADF)
    public static let stale = Errno(ESTALE)
}

/// The attributes of an inode, as `stat` reports them.
public struct Attributes: Sendable {
    public var inode: UInt64 = 0
    public var mode: UInt32
    public var links: UInt32 = 1
    public var uid: UInt32 = 0
    public var gid: UInt32 = 0
    public var size: UInt64 = 0
    /// In 512-byte units.
    public var blocks: UInt64 = 0
    public var atime = timespec()
    public var mtime = timespec()
    public var ctime = timespec()

    public init(mode: UInt32) { self.mode = mode }

    var stat: Glibc.stat {
        var st = Glibc.stat()
        st.st_ino = UInt(inode)
        st.st_mode = mode
        st.st_nlink = UInt(links)
        st.st_uid = uid
        st.st_gid = gid
        st.st_size = Int(clamping: size)
        st.st_blocks = Int(clamping: blocks)
        st.st_blksize = 65536
        st.st_atim = atime
        st.st_mtim = mtime
        st.st_ctim = ctime
        return st
    }
}

/// The reply to lookup: an inode the kernel now holds one more reference to.
public struct Entry: Sendable {
    public var attributes: Attributes
    /// Seconds the kernel may trust the name and the attributes.
    public var entryTimeout: Double
    public var attributeTimeout: Double

    public init(attributes: Attributes, entryTimeout: Double, attributeTimeout: Double) {
        self.attributes = attributes
        self.entryTimeout = entryTimeout
        self.attributeTimeout = attributeTimeout
    }
}

public struct DirectoryEntry: Sendable {
    public var name: String
    public var inode: UInt64
    public var mode: UInt32
    public init(name: String, inode: UInt64, mode: UInt32) {
        self.name = name; self.inode = inode; self.mode = mode
    }
}

/// The bytes of a read reply, in order. `owner` keeps `memory` segments alive until sent.
public struct ReadData: Sendable {
    /// SAFETY: memory segments point into `owner`'s immutable storage, which outlives the reply.
    public enum Segment: @unchecked Sendable {
        case file(fd: Int32, offset: UInt64, length: Int)
        case zero(length: Int)
        case memory(UnsafeRawBufferPointer)
    }
    public var segments: [Segment]
    public var owner: (any Sendable)?

    public init(segments: [Segment], owner: (any Sendable)?) {
        self.segments = segments
        self.owner = owner
    }
}

/// How the kernel is to read an opened file: the reply to open.
public struct OpenReply: Sendable, Equatable {
    /// A file whose bytes are the node's, from offset 0 to its end: the kernel reads, writes and
    /// maps it itself (FUSE passthrough) when the mount has passthrough; otherwise ignored. Must
    /// be the same file for every open of the node, and stay open until `open` returns.
    public var passthroughFile: Int32?
    /// The pages the kernel has cached for the node are still right (FOPEN_KEEP_CACHE).
    public var keepCache: Bool
    /// The kernel is to send this open's reads and writes as they come, from and into the
    /// caller's own pages (FOPEN_DIRECT_IO), when the server's configuration allows it and the
    /// kernel maps such opens shared: a buffered write would first be copied into the FUSE
    /// file's page cache, which only the daemon's copy reads. Ignored with `passthroughFile`.
    public var directIO: Bool

    public init(passthroughFile: Int32? = nil, keepCache: Bool = false, directIO: Bool = false) {
        self.passthroughFile = passthroughFile
        self.keepCache = keepCache
        self.directIO = directIO
    }

    public static let plain = OpenReply()
}

public struct FileSystemStatistics: Sendable {
    public var blockSize: UInt64
    public var blocks: UInt64
    public var freeBlocks: UInt64
    public var files: UInt64
    public init(blockSize: UInt64, blocks: UInt64, freeBlocks: UInt64, files: UInt64) {
        self.blockSize = blockSize; self.blocks = blocks; self.freeBlocks = freeBlocks; self.files = files
    }
}

/// What a filesystem implements. Every method runs on a libfuse worker thread, many at once; each
/// returns its result and FuseKit sends exactly one reply. Operations on the tree (create, rename,
/// unlink...) are answered EROFS by FuseKit itself; writes to files go to `write` when the
/// filesystem is `writable`.
public protocol FileSystemOperations: AnyObject, Sendable {
    /// Whether files may be opened for writing.
    var writable: Bool { get }
    /// Writes into a file of fixed size; returns the bytes written.
    func write(inode: UInt64, offset: UInt64, data: UnsafeRawBufferPointer) -> Result<Int, Errno>
    /// fsync: what was written to the file is on stable storage.
    func sync(inode: UInt64) -> Result<Void, Errno>
    /// fallocate: `mode` as fallocate(2) takes it (punching holes, zeroing ranges).
    func allocate(inode: UInt64, mode: Int32, offset: UInt64, length: UInt64) -> Result<Void, Errno>
    /// The end of an `open`; `writing` as it was opened. Every successful open gets one.
    func release(inode: UInt64, writing: Bool)
    func lookup(parent: UInt64, name: String) -> Result<Entry, Errno>
    func forget(inode: UInt64, count: UInt64)
    func attributes(of inode: UInt64) -> Result<(Attributes, timeout: Double), Errno>
    /// Opening a file; `writing` only when the filesystem is `writable`.
    func open(inode: UInt64, writing: Bool) -> Result<OpenReply, Errno>
    func read(inode: UInt64, offset: UInt64, size: Int) -> Result<ReadData, Errno>
    func list(directory inode: UInt64) -> Result<[DirectoryEntry], Errno>
    func seek(inode: UInt64, offset: UInt64, data: Bool) -> Result<UInt64, Errno>
    func extendedAttribute(of inode: UInt64, name: String) -> Result<[UInt8], Errno>
    func extendedAttributeNames(of inode: UInt64) -> Result<[String], Errno>
    func statistics() -> FileSystemStatistics
}

extension FileSystemOperations {
    public var writable: Bool { false }
    public func write(inode: UInt64, offset: UInt64, data: UnsafeRawBufferPointer) -> Result<Int, Errno> {
        .failure(.readOnly)
    }
    public func sync(inode: UInt64) -> Result<Void, Errno> { .success(()) }
    public func allocate(inode: UInt64, mode: Int32, offset: UInt64, length: UInt64) -> Result<Void, Errno> {
        .failure(.readOnly)
    }
    public func release(inode: UInt64, writing: Bool) {}
}
