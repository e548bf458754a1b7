#if canImport(Glibc)
import Glibc
#endif
import Block
import Locking

/// A remote file that can keep the pool's format decision on the server, as the
/// `trusted.poolfs.format` attribute of a local file does (FormatDecisions): a gluster file,
/// through glfs_fgetxattr/glfs_fsetxattr, which gluster lets only root clients do in the
/// trusted.* namespace. NFS has no extended attributes in libnfs 4.0 (and no trusted.* ones in
/// any version of the protocol).
protocol FormatAttributeFile: RemoteFile {
    /// The attribute's value, or nil when the file has none (or it cannot be had).
    func formatAttribute() -> String?
    /// Sets the attribute: 0, or the errno.
    func setFormatAttribute(_ value: String) -> Int32
}

/// A network pool's format decisions (docs/network-pools.md, "Trust"): a file's format is
/// probed once and kept for the life of the mount, keyed by the remote file's identity (its
/// inode or NFS fileid, and its path beneath the pool), so a guest that writes a qcow2 header
/// into its raw disk on the share does not turn it into a qcow2 while mounted. Where the server
/// keeps the decision (gluster, `FormatAttributeFile`), it is recorded there and read back first,
/// so it outlives the mount as on a local dir pool.
final class NetworkFormatDecisions: Sendable {
    private let remembered = Locked<[String: Image.FormatDecision]>([:])
    /// The pool's directory as file paths begin (`location + "/"`).
    let base: String

    init(location: String) {
        base = location + "/"
    }

    func decide(_ file: HostFile) throws -> Image.FormatDecision {
        let key = "\(file.identity.inode):\(file.path.hasPrefix(base) ? String(file.path.dropFirst(base.count)) : file.path)"
        let attributes = file.remote as? any FormatAttributeFile
        if let value = attributes?.formatAttribute(), let recorded = FormatDecisions.parse(value) {
            let decision = Image.FormatDecision(format: recorded.format, declared: recorded.declared)
            remembered.withLock { $0[key] = decision }
            return decision
        }
        if let kept = remembered.withLock({ $0[key] }) { return kept }
        let decision = Image.FormatDecision(format: try Image.probe(file), declared: false)
        // Kept in memory even when recorded on the server: an attribute that cannot be read
        // back (a server not answering for a moment) must not mean a probe afresh.
        remembered.withLock { $0[key] = $0[key] ?? decision }
        _ = attributes?.setFormatAttribute(decision.format.rawValue)
        return remembered.withLock { $0[key] ?? decision }
    }
}
