#if canImport(Glibc)
import Glibc
#endif
import Block
import CNFS
import Locking
import Synchronization

/// Where an NFS pool is: libnfs's URL form `nfs://HOST[:PORT]/EXPORT[/DIR][?version=3|4]`
/// (`nfsport=` as libnfs takes it too), or a libvirt netfs pool's `<host name= port=/>`,
/// `<dir path=/>` and `<protocol ver=/>`. The whole path is mounted: NFSv4 looks it up from the
/// server's root, and NFSv3 servers mount a directory beneath an export.
public struct NFSAddress: Sendable, Equatable {
    public var host: String
    /// 0: ask the server's portmapper (NFSv3); NFSv4 uses 2049 then.
    public var port: Int
    public var path: String
    public var version: Int

    public init(host: String, port: Int = 0, path: String, version: Int = 3) {
        self.host = host
        self.port = port
        self.path = "/" + path.split(separator: "/").joined(separator: "/")
        self.version = version
    }

    /// Parses an `nfs://` URL; throws with the reason when it is one poolfs cannot take.
    public init?(url text: String) throws {
        guard text.hasPrefix("nfs://") else { return nil }
        var rest = text.dropFirst("nfs://".count)
        var query: Substring = ""
        if let mark = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: mark)...]
            rest = rest[..<mark]
        }
        guard let (host, port, path) = parseHostPortPath(rest, defaultPort: 0) else {
            throw PoolError.libvirt("\(text): not nfs://HOST[:PORT]/EXPORT[/DIR]")
        }
        let parts = path.split(separator: "/")
        guard !parts.isEmpty, !parts.contains(where: { $0 == ".." || $0 == "." }) else {
            throw PoolError.libvirt("\(text): no export path, or one with '.' or '..'")
        }
        var version = 3
        var nfsPort = port
        for argument in query.split(separator: "&") {
            let pair = argument.split(separator: "=", maxSplits: 1).map(String.init)
            switch (pair.first, pair.count == 2 ? Int(pair[1]) : nil) {
            case ("version", let v?) where v == 3 || v == 4: version = v
            case ("nfsport", let p?) where (1...65535).contains(p): nfsPort = p
            default:
                throw PoolError.libvirt("\(text): poolfs takes version=3|4 and nfsport=PORT in an NFS URL, not '\(argument)'")
            }
        }
        self.init(host: host, port: nfsPort, path: path, version: version)
    }

    public var url: String {
        let host = self.host.contains(":") ? "[\(self.host)]" : self.host
        return "nfs://\(host)\(port == 0 ? "" : ":\(port)")\(path)" + (version == 3 ? "" : "?version=\(version)")
    }
}

/// One libnfs connection (a context, mounted): not thread safe, so every call holds its lock.
/// Calls are bounded by nfs_set_timeout; a failed one leaves the connection to be dropped.
final class NFSConnection: @unchecked Sendable {
    let mount: OpaquePointer
    let lock = Locked<Void>(())
    /// A call on it failed: it sends nothing more (not even a CLOSE, which would wait out the
    /// timeout again on a server that does not answer).
    let failed = Atomic<Bool>(false)
    /// The process that made it: a daemon (after `poolfs mount` forks) makes its own.
    let process = getpid()

    init(_ address: NFSAddress, timeoutMs: Int32) throws(Qcow2Error) {
        var out: OpaquePointer?
        var error = [CChar](repeating: 0, count: 512)
        let r = pnfs_connect(address.host, Int32(address.port), address.path, Int32(address.version), timeoutMs, &out, &error, error.count)
        guard r == 0, let out else {
            let said = String(cString: error)
            throw .io(errno: r == -ELIBACC ? ELIBACC : EIO,
                      operation: "NFSv\(address.version) mount" + (said.isEmpty ? "" : " (\(said))"), path: address.url)
        }
        mount = out
    }

    deinit { if process == getpid() { pnfs_disconnect(mount) } }

    var lastError: String { String(cString: pnfs_error(mount)) }
}

/// A share's client: one connection for listings and lookups, one per open file (each file's
/// reads run one at a time on its own connection). A connection whose call failed is dropped,
/// and the next call connects again: that is how a server restart is survived.
final class NFSClient: ShareClient, @unchecked Sendable {
    let address: NFSAddress
    let timeoutMs: Int32
    private let main = Locked<NFSConnection?>(nil)
    var location: String { address.url }
    let breaker: ServerBreaker

    init(_ address: NFSAddress, timeout: Double) throws {
        self.address = address
        timeoutMs = Int32(max(1, timeout.rounded(.up)) * 1000)
        breaker = ServerBreaker(timeout: max(1, timeout.rounded(.up)), location: address.url)
        guard pnfs_load() == 0 else {
            throw PoolError.libvirt("\(address.url): libnfs cannot be loaded (install libnfs13)")
        }
        do {
            let connection = try NFSConnection(address, timeoutMs: timeoutMs)
            main.withLock { $0 = connection }
            let st = try lstat("")
            guard st.st_mode & S_IFMT == S_IFDIR else { throw PoolError.notADirectory(address.url) }
        } catch let error as Qcow2Error {
            throw PoolError.libvirt("\(address.url): cannot mount the NFS export: \(error)")
        }
    }

    func failure(_ r: Int64, _ operation: String, _ relativePath: String, _ connection: NFSConnection) -> Qcow2Error {
        connection.failed.store(true, ordering: .relaxed)
        let code = Int32(-r)
        let said = connection.lastError
        return .io(errno: readerErrno(code), operation: "NFS \(operation)" + (said.isEmpty ? "" : " (\(said))"),
                   path: location + (relativePath.isEmpty ? "" : "/" + relativePath))
    }

    /// The path on the server's mount of `relativePath`: libnfs takes paths relative to the mount.
    func mountPath(_ relativePath: String) -> String { "/" + relativePath }

    /// Runs `body` on the shared connection (connecting again if the last call failed).
    private func withMain<T>(_ body: (NFSConnection) throws(Qcow2Error) -> T) throws(Qcow2Error) -> T {
        try breaker.guarded { () throws(Qcow2Error) -> T in try withMainNow(body) }
    }

    private func withMainNow<T>(_ body: (NFSConnection) throws(Qcow2Error) -> T) throws(Qcow2Error) -> T {
        let connection: NFSConnection
        if let held = main.withLock({ $0 }), held.process == getpid() {
            connection = held
        } else {
            connection = try NFSConnection(address, timeoutMs: timeoutMs)
            main.withLock { if $0?.process != getpid() { $0 = connection } }
        }
        do {
            return try connection.lock.withLock { _ throws(Qcow2Error) in try body(connection) }
        } catch {
            main.withLock { if $0 === connection { $0 = nil } }
            throw error
        }
    }

    func list(_ relativePath: String) throws(Qcow2Error) -> [(name: String, type: UInt8)] {
        try withMain { (c) throws(Qcow2Error) in
            var records: UnsafeMutablePointer<CChar>?
            var length = 0
            let r = pnfs_list(c.mount, mountPath(relativePath), &records, &length)
            guard r == 0 else { throw failure(Int64(r), "readdir", relativePath, c) }
            defer { free(records) }
            guard let records else { return [] }
            return parseRecords(UnsafeRawBufferPointer(start: records, count: length))
        }
    }

    func lstat(_ relativePath: String) throws(Qcow2Error) -> stat {
        try withMain { (c) throws(Qcow2Error) in
            var s = pnfs_stat()
            let r = pnfs_lstat(c.mount, mountPath(relativePath), &s)
            guard r == 0 else { throw failure(Int64(r), "lstat", relativePath, c) }
            return Self.stat(s)
        }
    }

    func open(_ relativePath: String) throws(Qcow2Error) -> any RemoteFile {
        try NFSFile(client: self, relativePath: relativePath)
    }

    static func stat(_ s: pnfs_stat) -> stat {
        makeStat(size: s.size, blocks: s.blocks, ino: s.ino, dev: s.dev, nlink: s.nlink, mode: s.mode, uid: s.uid, gid: s.gid,
                 mtime: (s.mtime_sec, s.mtime_nsec), ctime: (s.ctime_sec, s.ctime_nsec))
    }

    /// An open file on a connection of its own; both go together.
    final class Handle: @unchecked Sendable {
        let connection: NFSConnection
        let file: OpaquePointer
        init(_ connection: NFSConnection, _ file: OpaquePointer) {
            self.connection = connection
            self.file = file
        }
        deinit {
            // On a failed connection the file's small struct is left (libnfs frees it only with
            // a CLOSE call); the server drops its state with the connection's lease.
            if !connection.failed.load(ordering: .relaxed), connection.process == getpid() {
                connection.lock.withLock { _ in pnfs_close(connection.mount, file) }
            }
        }
    }

    func openHandle(_ relativePath: String) throws(Qcow2Error) -> (Handle, stat) {
        try breaker.guarded { () throws(Qcow2Error) in try openHandleNow(relativePath) }
    }

    private func openHandleNow(_ relativePath: String) throws(Qcow2Error) -> (Handle, stat) {
        let connection = try NFSConnection(address, timeoutMs: timeoutMs)
        return try connection.lock.withLock { _ throws(Qcow2Error) -> (Handle, stat) in
            var out: OpaquePointer?
            let r = pnfs_open(connection.mount, mountPath(relativePath), &out)
            guard r == 0, let out else { throw failure(Int64(r), "open", relativePath, connection) }
            let handle = Handle(connection, out)
            var s = pnfs_stat()
            let f = pnfs_fstat(connection.mount, out, &s)
            guard f == 0 else { throw failure(Int64(f), "fstat", relativePath, connection) }
            return (handle, Self.stat(s))
        }
    }
}

/// A file of an NFS export, read with NFS READ; libnfs 4.0 cannot ask for holes (NFSv4.2
/// SEEK), so every byte counts as data and allocation comes from the format's own map.
final class NFSFile: RemoteFile, @unchecked Sendable {
    let client: NFSClient
    let relativePath: String
    let handle: RemoteHandle<NFSClient.Handle>

    init(client: NFSClient, relativePath: String) throws(Qcow2Error) {
        self.client = client
        self.relativePath = relativePath
        handle = try RemoteHandle(path: client.location + "/" + relativePath) { () throws(Qcow2Error) in
            try client.openHandle(relativePath)
        }
    }

    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(Qcow2Error) -> Int {
        try handle.with { (h) throws(Qcow2Error) -> Int in try client.breaker.guarded { () throws(Qcow2Error) -> Int in
            try h.connection.lock.withLock { _ throws(Qcow2Error) -> Int in
                let n = pnfs_pread(h.connection.mount, h.file, buffer.baseAddress, UInt64(buffer.count), offset)
                guard n >= 0 else { throw client.failure(n, "read", relativePath, h.connection) }
                return Int(n)
            }
        } }
    }

    func status() throws(Qcow2Error) -> stat {
        try handle.with { (h) throws(Qcow2Error) -> stat in try client.breaker.guarded { () throws(Qcow2Error) -> stat in
            try h.connection.lock.withLock { _ throws(Qcow2Error) -> stat in
                var s = pnfs_stat()
                let r = pnfs_fstat(h.connection.mount, h.file, &s)
                guard r == 0 else { throw client.failure(Int64(r), "fstat", relativePath, h.connection) }
                return NFSClient.stat(s)
            }
        } }
    }

    func statusByName() -> stat? { try? client.lstat(relativePath) }

    func seek(from offset: UInt64, hole: Bool) -> RemoteSeek { .unknown }
}
