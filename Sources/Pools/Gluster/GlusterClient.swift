#if canImport(Glibc)
import Glibc
#endif
import Block
import CGlusterFS
import Locking

/// Where a gluster pool is: `gluster://HOST[:PORT]/VOLUME[/DIR]` (QEMU's form, without a file),
/// or a libvirt gluster pool's `<host name= port=/>`, `<name>` and `<dir path=/>`.
public struct GlusterAddress: Sendable, Equatable {
    public var host: String
    public var port: Int
    public var volume: String
    /// The pool's directory in the volume, without leading or trailing '/'; empty: its root.
    public var directory: String

    public init(host: String, port: Int = 24007, volume: String, directory: String = "") {
        self.host = host
        self.port = port
        self.volume = volume
        self.directory = directory.split(separator: "/").joined(separator: "/")
    }

    /// Parses `gluster://` (or `gluster+tcp://`) URLs; nil when `text` is not one.
    public init?(url text: String) {
        guard let rest = ["gluster://", "gluster+tcp://"].lazy.compactMap({ text.hasPrefix($0) ? text.dropFirst($0.count) : nil }).first,
              let (host, port, path) = parseHostPortPath(rest, defaultPort: 24007) else { return nil }
        let parts = path.split(separator: "/").map(String.init)
        guard let volume = parts.first, !parts.contains(where: { $0 == ".." || $0 == "." }) else { return nil }
        self.init(host: host, port: port, volume: volume, directory: parts.dropFirst().joined(separator: "/"))
    }

    public var url: String {
        let host = self.host.contains(":") ? "[\(self.host)]" : self.host
        return "gluster://\(host)\(port == 24007 ? "" : ":\(port)")/\(volume)" + (directory.isEmpty ? "" : "/" + directory)
    }
}

/// `HOST[:PORT]/PATH` (HOST may be `[IPv6]`): nil when the host is empty or the port not a port.
func parseHostPortPath(_ text: Substring, defaultPort: Int) -> (String, Int, String)? {
    let slash = text.firstIndex(of: "/") ?? text.endIndex
    var authority = text[..<slash]
    let path = String(text[slash...])
    var host: String
    var port = defaultPort
    if authority.hasPrefix("[") {
        guard let close = authority.firstIndex(of: "]") else { return nil }
        host = String(authority[authority.index(after: authority.startIndex)..<close])
        authority = authority[authority.index(after: close)...]
        if authority.hasPrefix(":") {
            guard let n = Int(authority.dropFirst()), (1...65535).contains(n) else { return nil }
            port = n
        } else if !authority.isEmpty { return nil }
    } else if let colon = authority.lastIndex(of: ":") {
        host = String(authority[..<colon])
        guard let n = Int(authority[authority.index(after: colon)...]), (1...65535).contains(n) else { return nil }
        port = n
    } else {
        host = String(authority)
    }
    guard !host.isEmpty else { return nil }
    return (host, port, path)
}

/// One libgfapi connection to a volume (glfs_t), through CGlusterFS, with every call bounded by
/// `timeout`. The connection is dropped when the pool goes: glfs_fini then runs on a thread
/// nobody waits for (it takes about 10 s).
final class GlusterClient: ShareClient, @unchecked Sendable {
    let address: GlusterAddress
    let timeoutMs: Int32
    /// The connection now; replaced when a call finds it broken (`reconnect`).
    private let current: Locked<Connection>
    /// When a broken connection was last replaced: at most one new glfs_t every 2 s (each
    /// costs threads, and a glfs_fini of 10 s when it goes), however many reads fail meanwhile.
    private let lastReconnect = Locked<ContinuousClock.Instant?>(nil)
    var location: String { address.url }
    let breaker: ServerBreaker

    init(_ address: GlusterAddress, timeout: Double) throws {
        self.address = address
        timeoutMs = Int32(timeout * 1000)
        breaker = ServerBreaker(timeout: timeout, location: address.url)
        guard pgl_load() == 0 else {
            throw PoolError.libvirt("\(address.url): libgfapi cannot be loaded (install glusterfs-common / libgfapi0)")
        }
        let ms = timeoutMs
        let connected = Result { () throws(Qcow2Error) in try GlusterClient.connect(address, timeoutMs: ms) }
        guard case .success(let first) = connected else {
            var code = EIO
            if case .failure(.io(let errno, _, _)) = connected { code = errno }
            let why = code == ETIMEDOUT ? "no answer in \(Int(timeout)) s" : String(cString: strerror(code))
            throw PoolError.libvirt("\(address.url): cannot connect to gluster volume '\(address.volume)' on \(address.host):\(address.port) (\(why)); is the volume started?")
        }
        current = Locked(first)
        // The pool's directory must be a directory.
        do {
            let st = try lstat("")
            guard st.st_mode & S_IFMT == S_IFDIR else { throw PoolError.notADirectory(address.url) }
        } catch let error as Qcow2Error {
            throw PoolError.notFound("\(address.url) (\(error))")
        }
    }

    /// One glfs_t (pgl_volume *, reference-counted in C: calls running past their bound and open
    /// files keep it). Dropped, glfs_fini runs on a thread nobody waits for.
    ///
    /// A connection belongs to the process that made it: `poolfs mount` opens the pool, then
    /// daemonizes (fork), and libgfapi's threads do not cross a fork. The daemon makes its own,
    /// and leaves the inherited one alone.
    final class Connection: @unchecked Sendable {
        let volume: OpaquePointer
        let process = getpid()
        init(_ volume: OpaquePointer) { self.volume = volume }
        deinit { if process == getpid() { pgl_disconnect(volume) } }
    }

    static func connect(_ address: GlusterAddress, timeoutMs: Int32) throws(Qcow2Error) -> Connection {
        var out: OpaquePointer?
        let r = pgl_connect(address.host, Int32(address.port), address.volume, nil, timeoutMs, &out)
        guard r == 0, let out else { throw .io(errno: -r, operation: "gluster connect", path: address.url) }
        return Connection(out)
    }

    /// Runs a call on the current connection. A call that fails for a reason other than the
    /// path (a brick restarted under a glfs_t that no longer finds it) makes a new connection,
    /// and the call is made once more on it.
    private func onVolume<T>(_ body: (OpaquePointer) throws(Qcow2Error) -> T) throws(Qcow2Error) -> T {
        var connection = current.withLock { $0 }
        if connection.process != getpid() {
            let fresh = try Self.connect(address, timeoutMs: timeoutMs)
            connection = current.withLock { held -> Connection in
                if held.process != getpid() { held = fresh }
                return held
            }
        }
        do {
            return try body(connection.volume)
        } catch .io(let code, let operation, let path) where code == EIO && !operation.contains("no answer") {
            let now = ContinuousClock.now
            let due = lastReconnect.withLock { last -> Bool in
                if let last, now - last < .seconds(2) { return false }
                last = now
                return true
            }
            guard due else { throw .io(errno: code, operation: operation, path: path) }
            let fresh = try Self.connect(address, timeoutMs: timeoutMs)
            let used = current.withLock { held -> Connection in
                if held === connection { held = fresh }
                return held
            }
            return try body(used.volume)
        }
    }

    /// The path in the volume of `relativePath` beneath the pool's directory.
    func volumePath(_ relativePath: String) -> String {
        "/" + [address.directory, relativePath].filter { !$0.isEmpty }.joined(separator: "/")
    }

    func failure(_ r: Int64, _ operation: String, _ relativePath: String) -> Qcow2Error {
        let code = Int32(-r)
        let what = code == ETIMEDOUT ? "gluster \(operation) (no answer in \(timeoutMs / 1000) s)" : "gluster \(operation)"
        return .io(errno: readerErrno(code), operation: what, path: location + (relativePath.isEmpty ? "" : "/" + relativePath))
    }

    func list(_ relativePath: String) throws(Qcow2Error) -> [(name: String, type: UInt8)] {
        var records: UnsafeMutablePointer<CChar>?
        var length = 0
        try breaker.guarded { () throws(Qcow2Error) in
            try onVolume { (volume) throws(Qcow2Error) in
                let r = pgl_list(volume, volumePath(relativePath), &records, &length, timeoutMs)
                guard r == 0 else { throw failure(Int64(r), "readdir", relativePath) }
            }
        }
        defer { free(records) }
        guard let records else { return [] }
        return parseRecords(UnsafeRawBufferPointer(start: records, count: length))
    }

    func lstat(_ relativePath: String) throws(Qcow2Error) -> stat {
        var s = pgl_stat()
        try breaker.guarded { () throws(Qcow2Error) in
            try onVolume { (volume) throws(Qcow2Error) in
                let r = pgl_lstat(volume, volumePath(relativePath), &s, timeoutMs)
                guard r == 0 else { throw failure(Int64(r), "lstat", relativePath) }
            }
        }
        return Self.stat(s)
    }

    func open(_ relativePath: String) throws(Qcow2Error) -> any RemoteFile {
        try GlusterFile(client: self, relativePath: relativePath)
    }

    static func stat(_ s: pgl_stat) -> stat {
        makeStat(size: s.size, blocks: s.blocks, ino: s.ino, dev: s.dev, nlink: s.nlink, mode: s.mode, uid: s.uid, gid: s.gid,
                 mtime: (s.mtime_sec, s.mtime_nsec), ctime: (s.ctime_sec, s.ctime_nsec))
    }

    /// An open glfs_fd_t; closed when the last call using it returns.
    final class Handle: @unchecked Sendable {
        let file: OpaquePointer
        init(_ file: OpaquePointer) { self.file = file }
        deinit { pgl_close(file) }
    }

    func openHandle(_ relativePath: String) throws(Qcow2Error) -> (Handle, stat) {
        try breaker.guarded { () throws(Qcow2Error) in try openHandleNow(relativePath) }
    }

    private func openHandleNow(_ relativePath: String) throws(Qcow2Error) -> (Handle, stat) {
        try onVolume { (volume) throws(Qcow2Error) in try openHandle(relativePath, on: volume) }
    }

    private func openHandle(_ relativePath: String, on volume: OpaquePointer) throws(Qcow2Error) -> (Handle, stat) {
        var out: OpaquePointer?
        let r = pgl_open(volume, volumePath(relativePath), &out, timeoutMs)
        guard r == 0, let out else { throw failure(Int64(r), "open", relativePath) }
        let handle = Handle(out)
        var s = pgl_stat()
        let f = pgl_fstat(out, &s, timeoutMs)
        guard f == 0 else { throw failure(Int64(f), "fstat", relativePath) }
        return (handle, Self.stat(s))
    }
}

/// A file of a gluster volume, read with glfs_pread; SEEK_DATA/SEEK_HOLE through glfs_lseek
/// (the seek translator answers them from the brick's filesystem).
final class GlusterFile: RemoteFile, @unchecked Sendable {
    let client: GlusterClient
    let relativePath: String
    let handle: RemoteHandle<GlusterClient.Handle>

    init(client: GlusterClient, relativePath: String) throws(Qcow2Error) {
        self.client = client
        self.relativePath = relativePath
        handle = try RemoteHandle(path: client.location + "/" + relativePath) { () throws(Qcow2Error) in
            try client.openHandle(relativePath)
        }
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(Qcow2Error) -> Int {
        try handle.with { (h) throws(Qcow2Error) -> Int in try client.breaker.guarded { () throws(Qcow2Error) -> Int in
            let n = pgl_pread(h.file, buffer.baseAddress, buffer.count, offset, client.timeoutMs)
            guard n >= 0 else { throw client.failure(n, "pread", relativePath) }
            return Int(n)
        } }
    }

    func status() throws(Qcow2Error) -> stat {
        try handle.with { (h) throws(Qcow2Error) -> stat in try client.breaker.guarded { () throws(Qcow2Error) -> stat in
            var s = pgl_stat()
            let r = pgl_fstat(h.file, &s, client.timeoutMs)
            guard r == 0 else { throw client.failure(Int64(r), "fstat", relativePath) }
            return GlusterClient.stat(s)
        } }
    }

    func statusByName() -> stat? { try? client.lstat(relativePath) }

    func seek(from offset: UInt64, hole: Bool) -> RemoteSeek {
        let r = try? handle.with { (h) throws(Qcow2Error) -> Int64 in
            pgl_lseek(h.file, offset, hole ? 4 : 3, client.timeoutMs)
        }
        guard let r else { return .unknown }
        if r >= 0 { return .at(UInt64(r)) }
        return r == -Int64(ENXIO) ? .none : .unknown
    }
}
