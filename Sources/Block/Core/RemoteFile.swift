#if canImport(Glibc)
import Glibc
#endif

/// A file read through a network client library (libgfapi, libnfs) rather than a descriptor:
/// what a `HostFile` of a network pool reads from. Implementations bound every call in time (a
/// dead server fails the call with EIO or ETIMEDOUT, never hangs it) and reconnect on their own
/// after a server restart.
public protocol RemoteFile: Sendable {
    /// Reads up to `buffer.count` bytes at `offset`: how many were read, 0 at the end of the file.
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(Qcow2Error) -> Int
    /// The open file's status now (fstat).
    func status() throws(Qcow2Error) -> stat
    /// The status of whatever the file's name leads to now (lstat); nil when it cannot be had.
    func statusByName() -> stat?
    /// lseek SEEK_DATA (`hole` false) or SEEK_HOLE (`hole` true) from `offset`, where the server
    /// can answer.
    func seek(from offset: UInt64, hole: Bool) -> RemoteSeek
}

/// What a server answers to SEEK_DATA or SEEK_HOLE.
public enum RemoteSeek: Sendable {
    case at(UInt64)
    /// ENXIO: no data (or no hole) after the offset.
    case none
    /// The server or its client library cannot say: everything counts as data.
    case unknown
}

/// The directory of a network share that a pool serves, where files that its images name are
/// opened (the remote counterpart of a `TrustPolicy` root, docs/security.md).
public protocol RemoteDirectory: Sendable {
    /// How paths in it are shown: `gluster://HOST/VOLUME/DIR`, `nfs://HOST/EXPORT/DIR`. Every
    /// `HostFile` it opens is called `location + "/" + relativePath`.
    var location: String { get }
    /// Opens the regular file at `relativePath` (components checked: none empty, `.` or `..`)
    /// beneath the directory, following no symbolic link.
    func open(relativePath: String) throws(Qcow2Error) -> HostFile
}

extension ChainResolver {
    /// Opens a file named inside an image of a network pool: a name relative to the naming
    /// image's directory, which must stay beneath the pool's directory of the share. An absolute
    /// name would be a file of this host (QEMU opens it so): refused, as is every protocol.
    static func openRemote(_ name: String, what: String, namedBy imagePath: String,
                           in directory: any RemoteDirectory) throws(Qcow2Error) -> HostFile {
        if hasProtocol(name) {
            throw .refused("\(what) '\(Printable.escaped(name))' of \(imagePath) names a protocol; poolfs reads only files in the pool")
        }
        if name.hasPrefix("/") {
            throw .refused("\(what) \(Printable.escaped(name)) of \(imagePath) is an absolute path, a file of this host: a network pool opens only names relative to its images")
        }
        let base = directory.location + "/"
        guard imagePath.hasPrefix(base) else {
            throw .refused("\(imagePath) is not in \(directory.location)")
        }
        var components = Image.directory(of: String(imagePath.dropFirst(base.count)))
            .split(separator: "/").map(String.init).filter { $0 != "." }
        for part in name.split(separator: "/", omittingEmptySubsequences: true).map(String.init) {
            switch part {
            case ".": continue
            case "..":
                guard !components.isEmpty else {
                    throw .refused("\(what) \(Printable.escaped(name)) of \(imagePath) leads outside the pool (\(directory.location))")
                }
                components.removeLast()
            default: components.append(part)
            }
        }
        guard !components.isEmpty else { throw .refused("\(what) '\(Printable.escaped(name))' of \(imagePath) names the pool's directory") }
        do {
            return try directory.open(relativePath: components.joined(separator: "/"))
        } catch .refused(let why) {
            throw .refused("\(what) of \(imagePath): \(why)")
        }
    }
}
