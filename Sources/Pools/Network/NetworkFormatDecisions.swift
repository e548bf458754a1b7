import Block
import Locking

/// A network pool's format decisions (docs/network-pools.md, "Trust"): a file's format is
/// probed once and kept for the life of the mount, keyed by the remote file's identity (its
/// inode, or NFS fileid, and its path beneath the pool), so a guest that writes a qcow2 header
/// into its raw disk on the share does not turn it into a qcow2 while mounted.
///
/// Kept in memory only, never on the share: NFS has no trusted.* attributes, and gluster lets
/// any client set them. Measured: a libgfapi client running as nobody set
/// `trusted.poolfs.format` = "vmdk declared" on a root-owned 0644 file of the volume, so an
/// attribute read back from a brick would let anyone who reaches the volume declare formats.
final class NetworkFormatDecisions: Sendable {
    private let remembered = Locked<[String: Image.FormatDecision]>([:])
    /// The pool's directory as file paths begin (`location + "/"`).
    let base: String

    init(location: String) {
        base = location + "/"
    }

    func decide(_ file: HostFile) throws -> Image.FormatDecision {
        let relative = file.path.hasPrefix(base) ? String(file.path.dropFirst(base.count)) : file.path
        let key = "\(file.identity.inode):\(relative)"
        if let kept = remembered.withLock({ $0[key] }) { return kept }
        let decision = Image.FormatDecision(format: try Image.probe(file), declared: false)
        // Two opens racing: the first decision stays.
        return remembered.withLock { kept in
            if let first = kept[key] { return first }
            kept[key] = decision
            return decision
        }
    }
}
