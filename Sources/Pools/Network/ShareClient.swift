#if canImport(Glibc)
import Glibc
#endif
import Block

/// What a network pool needs of its share's client library (GlusterClient, NFSClient): the
/// pool's directory listed, a path's lstat and a regular file opened, every call bounded in
/// time. Paths are relative to the pool's directory of the share, checked by the caller.
protocol ShareClient: Sendable {
    /// `gluster://HOST/VOLUME/DIR` or `nfs://HOST/EXPORT/DIR`, as messages and volume paths say it.
    var location: String { get }
    /// The entries of the pool's directory (`relativePath` empty) or a directory beneath it,
    /// with their d_type (DT_UNKNOWN when the server does not say).
    func list(_ relativePath: String) throws(Qcow2Error) -> [(name: String, type: UInt8)]
    /// lstat: symbolic links are not followed.
    func lstat(_ relativePath: String) throws(Qcow2Error) -> stat
    /// Opens a regular file read-only, with O_NOFOLLOW.
    func open(_ relativePath: String) throws(Qcow2Error) -> any RemoteFile
}

/// Records of `pgl_list`/`pnfs_list`: a d_type byte, the name, a NUL; `.` and `..` dropped.
func parseRecords(_ buffer: UnsafeRawBufferPointer) -> [(name: String, type: UInt8)] {
    var entries: [(name: String, type: UInt8)] = []
    var at = 0
    while at < buffer.count {
        let type = buffer[at]
        var end = at + 1
        while end < buffer.count, buffer[end] != 0 { end += 1 }
        let name = String(decoding: UnsafeRawBufferPointer(rebasing: buffer[(at + 1)..<end]), as: UTF8.self)
        if name != ".", name != ".." { entries.append((name, type)) }
        at = end + 1
    }
    return entries
}

/// The network pool's directory as the chain resolver sees it (RemoteDirectory): a file named
/// by an image is opened only if every directory on its way is a real directory (no symbolic
/// link leads out) and the file itself is opened with O_NOFOLLOW.
struct ShareDirectory: RemoteDirectory {
    let client: any ShareClient
    var location: String { client.location }

    func open(relativePath: String) throws(Qcow2Error) -> HostFile {
        let parts = relativePath.split(separator: "/").map(String.init)
        var prefix = ""
        for part in parts.dropLast() {
            prefix += (prefix.isEmpty ? "" : "/") + part
            let st = try client.lstat(prefix)
            guard st.st_mode & S_IFMT == S_IFDIR else {
                throw .refused("\(location)/\(Printable.escaped(prefix)) is not a directory (a symbolic link is not followed in a network pool)")
            }
        }
        let path = location + "/" + relativePath
        let st: stat
        do {
            st = try client.lstat(relativePath)
        } catch .io(let code, let operation, _) {
            throw .io(errno: code, operation: operation, path: path)
        }
        guard st.st_mode & S_IFMT == S_IFREG else {
            let kind = st.st_mode & S_IFMT == S_IFLNK ? "a symbolic link, which a network pool does not follow" : "not a regular file"
            throw .refused("\(Printable.escaped(path)) is \(kind); only regular files are read as images")
        }
        return try HostFile(remote: try client.open(relativePath), path: path)
    }
}

/// The errno a failed network call reports to readers: EIO for every way a server fails
/// (timeouts, lost connections), as a disk that fails would; ENOENT and ESTALE kept.
func readerErrno(_ code: Int32) -> Int32 {
    switch code {
    case ENOENT, ESTALE, ENOTDIR, ELOOP, EACCES, EPERM: return code
    default: return EIO
    }
}
