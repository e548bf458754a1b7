import CFuse3
import CFuseShim
import Locking
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Mounts a `FileSystemOperations` through libfuse's low-level API and serves it until unmounted
/// or signalled (SIGINT, SIGTERM, SIGHUP).
///
/// Callbacks are C function pointers with no captures: each finds the server through
/// `fuse_req_userdata`, an unretained pointer to this object, which `run` keeps alive.
public final class FuseServer: @unchecked Sendable {
    public struct Configuration: Sendable {
        /// Options for libfuse and the kernel (`-o`): allow_other, default_permissions, ro, fsname...
        public var options: [String] = []
        public var foreground = false
        public var threads: UInt32 = 16
        /// The kernel's readahead window for the mount's files (see `MountReadahead`).
        public var maxReadahead: UInt32 = 2 << 20
        /// The largest read request the kernel sends; a readahead window larger than this comes
        /// as several requests at once, which the worker threads serve in parallel.
        public var maxRead: UInt32 = 512 << 10
        public var splice = true
        /// FUSE passthrough for the files whose `open` names a passthrough file, when the kernel
        /// offers it and lets this process register backing files (CAP_SYS_ADMIN).
        public var passthrough = false
        /// Told once whether passthrough is in use: nil, or why not. Told again if the kernel
        /// later refuses a file (then no file gets passthrough from there on).
        public var passthroughDecided: (@Sendable (_ unavailable: String?) -> Void)?
        /// Whether to tell the kernel the filesystem clears setuid, setgid and capabilities itself
        /// (FUSE_HANDLE_KILLPRIV_V2), when it offers that: it then no longer asks for
        /// security.capability before every write. Only for a filesystem whose files never have
        /// those bits nor security.* attributes (see passthrough.c).
        public var handleKillPriv = false
        /// Told once, after the kernel's INIT, whether FUSE_HANDLE_KILLPRIV_V2 was asked for.
        public var killPrivDecided: (@Sendable (Bool) -> Void)?
        /// Whether opens whose `OpenReply.directIO` is set may be FOPEN_DIRECT_IO: asks the
        /// kernel for FUSE_DIRECT_IO_ALLOW_MMAP, without which it refuses MAP_SHARED of such an
        /// open, and grants `directIO` only when it was asked for (kernel 6.6 and later).
        public var directIO = false
        /// Where invalidations of the kernel's cache go (see `KernelCache`).
        public var kernelCache: KernelCache?
        /// Told once whether `maxReadahead` could be set (it needs root), after the kernel's INIT.
        public var readaheadApplied: (@Sendable (Bool) -> Void)?
        public init() {}
    }

    public enum Failure: Error, CustomStringConvertible {
        case session(String)
        case mount(String)
        public var description: String {
            switch self {
            case .session(let why): return why
            case .mount(let why): return why
            }
        }
    }

    let filesystem: any FileSystemOperations
    let configuration: Configuration
    // SAFETY: written once in `run` before the loop starts its worker threads, which read it.
    private var session: OpaquePointer?
    // SAFETY: written once in `run` before the loop starts its worker threads.
    private var mountpoint = ""
    /// Whether the readahead window is still to be set: the kernel answers INIT by keeping the
    /// smaller of its default and the daemon's wish, so it can be raised only after INIT, on the
    /// first request that follows.
    private let readaheadDue = Atomic<Bool>(true)
    /// Whether files may be opened in passthrough mode from now on (see `backingID`).
    private let passthroughActive = Atomic<Bool>(false)
    /// The backing id registered for each inode open in passthrough mode, and its open handles.
    /// The kernel wants every passthrough open of an inode to name the same backing file, so
    /// one id serves them all and is closed after the last release (the kernel holds its own
    /// reference to the file while it is open).
    private let backings = Locked<[UInt64: (id: Int32, handles: Int)]>([:])

    public init(filesystem: any FileSystemOperations, configuration: Configuration) {
        self.filesystem = filesystem
        self.configuration = configuration
    }

    /// Mounts at `mountpoint`, a canonical path (the mount table's spelling, which finds the mount
    /// to raise its readahead); daemonizes unless `foreground` (the parent exits once the mount is
    /// up); serves until unmounted or signalled; then unmounts. `onMounted` runs after mounting,
    /// in the process that serves.
    public func run(mountpoint: String, onMounted: () -> Void = {}) throws {
        var arguments = ["poolfs", "-o", "max_read=\(configuration.maxRead)"]
        for option in configuration.options { arguments += ["-o", option] }
        let argv = arguments.map { strdup($0) }
        defer { argv.forEach { free($0) } }
        var cArgv: [UnsafeMutablePointer<CChar>?] = argv + [nil]
        var ops = Self.operations()
        let session: OpaquePointer? = cArgv.withUnsafeMutableBufferPointer { buffer in
            var args = fuse_args(argc: Int32(arguments.count), argv: buffer.baseAddress, allocated: 0)
            // SAFETY: `run` holds `self` for as long as the session exists.
            let userdata = Unmanaged.passUnretained(self).toOpaque()
            let se = fuse_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size, userdata)
            fuse_opt_free_args(&args)
            return se
        }
        guard let session else { throw Failure.session("fuse: invalid options \(configuration.options)") }
        self.session = session
        defer { fuse_session_destroy(session) }
        guard fuse_set_signal_handlers(session) == 0 else { throw Failure.session("fuse: cannot set signal handlers") }
        Self.unblockTerminationSignals()
        defer { fuse_remove_signal_handlers(session) }
        self.mountpoint = mountpoint
        guard fuse_session_mount(session, mountpoint) == 0 else {
            throw Failure.mount("cannot mount at \(mountpoint) (see the message above)")
        }
        // Detached after the unmount (defers run in reverse), when no read can be pending.
        configuration.kernelCache?.attach(session)
        defer { configuration.kernelCache?.detach() }
        defer { fuse_session_unmount(session) }
        if configuration.passthrough || configuration.handleKillPriv || configuration.directIO,
           poolfs_session_custom_io(session, configuration.passthrough ? 1 : 0, configuration.handleKillPriv ? 1 : 0,
                                    configuration.directIO ? 1 : 0) != 0 {
            throw Failure.session("fuse: cannot route the session's I/O to complete the INIT reply")
        }
        fuse_daemonize(configuration.foreground ? 1 : 0)
        poolfs_tune_malloc()
        onMounted()
        withExtendedLifetime(self) {
            _ = poolfs_session_loop_mt(session, configuration.threads)
        }
    }

    /// A parent may have started us with signals blocked (a thread of a thread pool, some
    /// supervisors): the mask is inherited, and SIGTERM would then never unmount. Unblocked before
    /// libfuse starts its workers, which inherit the mask.
    static func unblockTerminationSignals() {
        var set = sigset_t()
        sigemptyset(&set)
        for signal in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, signal) }
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
    }

    static func server(_ req: fuse_req_t?) -> FuseServer {
        // SAFETY: userdata is the `FuseServer` passed to fuse_session_new, alive during `run`.
        let server = Unmanaged<FuseServer>.fromOpaque(fuse_req_userdata(req)!).takeUnretainedValue()
        if server.readaheadDue.load(ordering: .relaxed) { server.setReadahead() }
        return server
    }

    private func setReadahead() {
        guard readaheadDue.exchange(false, ordering: .relaxed) else { return }
        let applied = MountReadahead.set(configuration.maxReadahead, mountpoint: mountpoint)
        configuration.readaheadApplied?(applied)
        if configuration.passthrough { probePassthrough() }
        if configuration.handleKillPriv { configuration.killPrivDecided?(poolfs_killpriv_negotiated() != 0) }
    }

    /// After INIT: whether the kernel took passthrough and lets us register a backing file,
    /// tried on this program's own file (a regular file, closed again at once).
    private func probePassthrough() {
        guard poolfs_passthrough_negotiated() != 0 else {
            configuration.passthroughDecided?("the kernel does not offer FUSE passthrough")
            return
        }
        let fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            configuration.passthroughDecided?("cannot open /proc/self/exe to try it")
            return
        }
        defer { close(fd) }
        let id = poolfs_backing_open(session, fd)
        guard id > 0 else {
            configuration.passthroughDecided?(Self.backingRefusal(-id))
            return
        }
        _ = poolfs_backing_close(session, id)
        passthroughActive.store(true, ordering: .relaxed)
        configuration.passthroughDecided?(nil)
    }

    static func backingRefusal(_ code: Int32) -> String {
        let why = String(cString: strerror(code))
        return code == EPERM ? "FUSE_DEV_IOC_BACKING_OPEN: \(why) (it needs CAP_SYS_ADMIN)" : "FUSE_DEV_IOC_BACKING_OPEN: \(why)"
    }

    /// The backing id for a passthrough open of `inode` whose bytes are `file`: the inode's
    /// registered one, or a new registration; nil when passthrough is off or the kernel
    /// refuses (which turns it off for files not yet open in passthrough mode, so that no inode
    /// gets opens of both kinds: the kernel would refuse the second kind with ETXTBSY).
    func backingID(inode: UInt64, file: Int32) -> Int32? {
        backings.withLock { table in
            if let known = table[inode] {
                table[inode]!.handles = known.handles + 1
                return known.id
            }
            guard passthroughActive.load(ordering: .relaxed) else { return nil }
            let id = poolfs_backing_open(session, file)
            guard id > 0 else {
                passthroughActive.store(false, ordering: .relaxed)
                configuration.passthroughDecided?(Self.backingRefusal(-id))
                return nil
            }
            table[inode] = (id, 1)
            return id
        }
    }

    /// One passthrough handle of `inode` fewer; the last closes its backing id.
    func releaseBacking(inode: UInt64) {
        backings.withLock { table in
            guard let known = table[inode] else { return }
            if known.handles > 1 {
                table[inode]!.handles = known.handles - 1
                return
            }
            table[inode] = nil
            _ = poolfs_backing_close(session, known.id)
        }
    }
}

// MARK: - Replies: one place sends each kind.

extension FuseServer {
    static func reply(_ req: fuse_req_t?, _ error: Errno) {
        fuse_reply_err(req, error.code)
    }

    static func reply(_ req: fuse_req_t?, entry: Entry) {
        var e = fuse_entry_param()
        e.ino = entry.attributes.inode
        e.attr = entry.attributes.stat
        e.attr_timeout = entry.attributeTimeout
        e.entry_timeout = entry.entryTimeout
        fuse_reply_entry(req, &e)
    }

    /// Zeros for read replies, shared by every thread; never written after it is made.
    nonisolated(unsafe) static let zeros: UnsafeRawBufferPointer = {
        let size = 1 << 20
        return UnsafeRawBufferPointer(start: calloc(size, 1), count: size)
    }()

    static func reply(_ req: fuse_req_t?, data: ReadData) {
        var pieces: [poolfs_segment] = []
        pieces.reserveCapacity(data.segments.count + 4)
        for segment in data.segments {
            switch segment {
            case .file(let fd, let offset, let length):
                pieces.append(poolfs_segment(fd: fd, pos: offset, mem: nil, size: length))
            case .memory(let bytes):
                pieces.append(poolfs_segment(fd: -1, pos: 0, mem: bytes.baseAddress, size: bytes.count))
            case .zero(var length):
                while length > 0 {
                    let n = min(length, zeros.count)
                    pieces.append(poolfs_segment(fd: -1, pos: 0, mem: zeros.baseAddress, size: n))
                    length -= n
                }
            }
        }
        withExtendedLifetime(data.owner) {
            _ = pieces.withUnsafeBufferPointer { poolfs_reply_segments(req, $0.baseAddress, $0.count) }
        }
    }

    static func replyBuffer(_ req: fuse_req_t?, _ bytes: [UInt8], size: Int) {
        if size == 0 { fuse_reply_xattr(req, bytes.count); return }
        guard bytes.count <= size else { return reply(req, .range) }
        bytes.withUnsafeBytes { _ = fuse_reply_buf(req, $0.baseAddress, $0.count) }
    }
}

// MARK: - Operations: C callbacks, one per operation.

extension FuseServer {
    /// Whether open(2) flags ask for writing (truncation counts).
    static func opensForWriting(_ flags: Int32) -> Bool {
        (flags & O_ACCMODE) != O_RDONLY || (flags & O_TRUNC) != 0
    }

    static func operations() -> fuse_lowlevel_ops {
        var ops = fuse_lowlevel_ops()
        ops.`init` = { userdata, conn in
            // SAFETY: userdata is the server, as above.
            let server = Unmanaged<FuseServer>.fromOpaque(userdata!).takeUnretainedValue()
            let c = server.configuration
            poolfs_configure_connection(conn, c.maxReadahead, c.maxRead, c.splice ? 1 : 0)
        }
        ops.lookup = { req, parent, name in
            switch FuseServer.server(req).filesystem.lookup(parent: parent, name: String(cString: name!)) {
            case .success(let entry): FuseServer.reply(req, entry: entry)
            case .failure(let error): FuseServer.reply(req, error)
            }
        }
        ops.forget = { req, ino, count in
            FuseServer.server(req).filesystem.forget(inode: ino, count: count)
            fuse_reply_none(req)
        }
        ops.forget_multi = { req, count, forgets in
            let fs = FuseServer.server(req).filesystem
            for i in 0..<count { fs.forget(inode: forgets![i].ino, count: forgets![i].nlookup) }
            fuse_reply_none(req)
        }
        ops.getattr = { req, ino, _ in
            switch FuseServer.server(req).filesystem.attributes(of: ino) {
            case .success(let (attributes, timeout)):
                var st = attributes.stat
                fuse_reply_attr(req, &st, timeout)
            case .failure(let error): FuseServer.reply(req, error)
            }
        }
        ops.setattr = { req, ino, attr, toSet, _ in
            // Files are disks of a fixed size: a writable mount takes every other change as done.
            let fs = FuseServer.server(req).filesystem
            guard fs.writable else { return FuseServer.reply(req, .readOnly) }
            switch fs.attributes(of: ino) {
            case .success(let (attributes, timeout)):
                if toSet & FUSE_SET_ATTR_SIZE != 0, UInt64(max(attr!.pointee.st_size, 0)) != attributes.size {
                    return FuseServer.reply(req, .notPermitted)
                }
                var st = attributes.stat
                fuse_reply_attr(req, &st, timeout)
            case .failure(let error): FuseServer.reply(req, error)
            }
        }
        ops.open = { req, ino, fi in
            let writing = FuseServer.opensForWriting(fi!.pointee.flags)
            if writing, !FuseServer.server(req).filesystem.writable {
                return FuseServer.reply(req, .readOnly)
            }
            let server = FuseServer.server(req)
            switch server.filesystem.open(inode: ino, writing: writing) {
            case .success(let reply):
                let backing = reply.passthroughFile.flatMap { server.backingID(inode: ino, file: $0) } ?? 0
                // O_DIRECT through passthrough would take the backing file's alignment rules
                // (EINVAL for what the daemon serves): its reads and writes come to the daemon
                // (FOPEN_DIRECT_IO), while the open stays a passthrough one, as the kernel wants
                // every open of an inode in passthrough mode to be.
                // A writer's open served by the daemon is FOPEN_DIRECT_IO (see `OpenReply.directIO`).
                let direct = backing > 0 ? poolfs_is_direct_open(fi!.pointee.flags) != 0
                    : reply.directIO && server.configuration.directIO && poolfs_direct_io_mmap_negotiated() != 0
                // An open the kernel gave up on (interrupted) is never released: neither is its id.
                if poolfs_reply_open(req, fi, backing, reply.keepCache ? 1 : 0, direct ? 1 : 0) != 0, backing > 0 {
                    server.releaseBacking(inode: ino)
                }
            case .failure(let error): FuseServer.reply(req, error)
            }
        }
        ops.read = { req, ino, size, offset, _ in
            switch FuseServer.server(req).filesystem.read(inode: ino, offset: UInt64(max(offset, 0)), size: size) {
            case .success(let data): FuseServer.reply(req, data: data)
            case .failure(let error): FuseServer.reply(req, error)
            }
        }
        ops.release = { req, ino, fi in
            let server = FuseServer.server(req)
            if poolfs_is_passthrough_fh(fi!.pointee.fh) != 0 { server.releaseBacking(inode: ino) }
            server.filesystem.release(inode: ino, writing: FuseServer.opensForWriting(fi!.pointee.flags))
            fuse_reply_err(req, 0)
        }
        ops.opendir = { req, ino, fi in
            switch FuseServer.server(req).filesystem.list(directory: ino) {
            case .success(let entries):
                // SAFETY: released in releasedir, which the kernel sends exactly once per opendir.
                fi!.pointee.fh = UInt64(UInt(bitPattern: Unmanaged.passRetained(Listing(entries)).toOpaque()))
                fuse_reply_open(req, fi)
            case .failure(let error): FuseServer.reply(req, error)
            }
        }
        ops.readdir = { req, ino, size, offset, fi in
            FuseServer.readDirectory(req, ino: ino, size: size, offset: offset, fi: fi, plus: false)
        }
        ops.readdirplus = { req, ino, size, offset, fi in
            FuseServer.readDirectory(req, ino: ino, size: size, offset: offset, fi: fi, plus: true)
        }
        ops.releasedir = { req, _, fi in
            if let pointer = UnsafeRawPointer(bitPattern: UInt(fi!.pointee.fh)) {
                Unmanaged<Listing>.fromOpaque(pointer).release()
            }
            fuse_reply_err(req, 0)
        }
        ops.statfs = { req, _ in
            let s = FuseServer.server(req).filesystem.statistics()
            var st = statvfs()
            st.f_bsize = UInt(s.blockSize)
            st.f_frsize = UInt(s.blockSize)
            st.f_blocks = fsblkcnt_t(s.blocks)
            st.f_bfree = fsblkcnt_t(s.freeBlocks)
            st.f_bavail = fsblkcnt_t(s.freeBlocks)
            st.f_files = fsfilcnt_t(s.files)
            st.f_namemax = 255
            st.f_flag = FuseServer.server(req).filesystem.writable ? 0 : UInt(ST_RDONLY)
            fuse_reply_statfs(req, &st)
        }
        ops.getxattr = { req, ino, name, size in
            switch FuseServer.server(req).filesystem.extendedAttribute(of: ino, name: String(cString: name!)) {
            case .success(let bytes): FuseServer.replyBuffer(req, bytes, size: size)
            case .failure(let error): FuseServer.reply(req, error)
            }
        }
        ops.listxattr = { req, ino, size in
            switch FuseServer.server(req).filesystem.extendedAttributeNames(of: ino) {
            case .success(let names): FuseServer.replyBuffer(req, names.flatMap { Array($0.utf8) + [0] }, size: size)
            case .failure(let error): FuseServer.reply(req, error)
            }
        }
        ops.access = { req, _, mask in
            FuseServer.reply(req, Errno(mask & W_OK != 0 && !FuseServer.server(req).filesystem.writable ? EROFS : 0))
        }
        ops.flush = { req, _, _ in fuse_reply_err(req, 0) }
        ops.fsync = { req, ino, _, _ in
            switch FuseServer.server(req).filesystem.sync(inode: ino) {
            case .success: fuse_reply_err(req, 0)
            case .failure(let error): FuseServer.reply(req, error)
            }
        }
        ops.lseek = { req, ino, offset, whence, _ in
            guard whence == 3 || whence == 4 else { return FuseServer.reply(req, .invalid) }  // SEEK_DATA, SEEK_HOLE
            switch FuseServer.server(req).filesystem.seek(inode: ino, offset: UInt64(max(offset, 0)), data: whence == 3) {
            case .success(let found): fuse_reply_lseek(req, off_t(found))
            case .failure(let error): FuseServer.reply(req, error)
            }
        }
        // Everything that would modify the tree or a file.
        ops.write = { req, ino, buffer, size, offset, _ in
            let data = UnsafeRawBufferPointer(start: buffer, count: size)
            switch FuseServer.server(req).filesystem.write(inode: ino, offset: UInt64(max(offset, 0)), data: data) {
            case .success(let n): fuse_reply_write(req, n)
            case .failure(let error): FuseServer.reply(req, error)
            }
        }
        ops.mknod = { req, _, _, _, _ in FuseServer.reply(req, .readOnly) }
        ops.mkdir = { req, _, _, _ in FuseServer.reply(req, .readOnly) }
        ops.unlink = { req, _, _ in FuseServer.reply(req, .readOnly) }
        ops.rmdir = { req, _, _ in FuseServer.reply(req, .readOnly) }
        ops.symlink = { req, _, _, _ in FuseServer.reply(req, .readOnly) }
        ops.rename = { req, _, _, _, _, _ in FuseServer.reply(req, .readOnly) }
        ops.link = { req, _, _, _ in FuseServer.reply(req, .readOnly) }
        ops.create = { req, _, _, _, _ in FuseServer.reply(req, .readOnly) }
        ops.setxattr = { req, _, _, _, _, _ in FuseServer.reply(req, .readOnly) }
        ops.removexattr = { req, _, _ in FuseServer.reply(req, .readOnly) }
        ops.fallocate = { req, ino, mode, offset, length, _ in
            let fs = FuseServer.server(req).filesystem
            guard fs.writable else { return FuseServer.reply(req, .readOnly) }
            switch fs.allocate(inode: ino, mode: mode, offset: UInt64(max(offset, 0)), length: UInt64(max(length, 0))) {
            case .success: fuse_reply_err(req, 0)
            case .failure(let error): FuseServer.reply(req, error)
            }
        }
        return ops
    }

    /// Adds entries from the opendir snapshot, starting after `offset`, until the buffer is full.
    /// With readdirplus every real entry counts as a lookup; one that does not fit is forgotten.
    static func readDirectory(_ req: fuse_req_t?, ino: fuse_ino_t, size: Int, offset: off_t,
                              fi: UnsafeMutablePointer<fuse_file_info>?, plus: Bool) {
        guard let pointer = UnsafeRawPointer(bitPattern: UInt(fi!.pointee.fh)) else { return reply(req, .io) }
        // SAFETY: the listing stays retained until releasedir.
        let listing = Unmanaged<Listing>.fromOpaque(pointer).takeUnretainedValue()
        let fs = server(req).filesystem
        let buffer = UnsafeMutablePointer<CChar>.allocate(capacity: size)
        defer { buffer.deallocate() }
        var used = 0
        var index = Int(max(offset, 0))
        while index < listing.entries.count {
            let item = listing.entries[index]
            let isDot = item.name == "." || item.name == ".."
            var needed = 0
            if plus {
                var e = fuse_entry_param()
                var looked = false
                if !isDot, case .success(let entry) = fs.lookup(parent: ino, name: item.name) {
                    e.ino = entry.attributes.inode
                    e.attr = entry.attributes.stat
                    e.attr_timeout = entry.attributeTimeout
                    e.entry_timeout = entry.entryTimeout
                    looked = true
                } else {
                    e.attr.st_ino = UInt(item.inode)
                    e.attr.st_mode = item.mode
                }
                needed = fuse_add_direntry_plus(req, buffer + used, size - used, item.name, &e, off_t(index + 1))
                if needed > size - used {
                    if looked { fs.forget(inode: e.ino, count: 1) }
                    break
                }
            } else {
                var st = Glibc.stat()
                st.st_ino = UInt(item.inode)
                st.st_mode = item.mode
                needed = fuse_add_direntry(req, buffer + used, size - used, item.name, &st, off_t(index + 1))
                if needed > size - used { break }
            }
            used += needed
            index += 1
        }
        fuse_reply_buf(req, buffer, used)
    }
}

/// A directory's entries as they were at opendir, so that readdir offsets stay stable.
final class Listing {
    let entries: [DirectoryEntry]
    init(_ entries: [DirectoryEntry]) { self.entries = entries }
}
