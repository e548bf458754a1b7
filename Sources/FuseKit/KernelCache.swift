import CFuseShim
import Dispatch
import Locking

/// Tells the kernel to drop what it caches of inodes — pages and attributes
/// (fuse_lowlevel_notify_inval_inode) — when their files change behind its back.
///
/// Invalidations run on a queue of their own, never on a FUSE worker: the kernel waits for pages
/// being read to be unlocked, and a page waiting for a read reply that the same worker would
/// send never would be.
public final class KernelCache: Sendable {
    /// SAFETY: the session pointer is used only while `session` is locked, and detached (nil)
    /// before the session is destroyed.
    private struct Session: @unchecked Sendable { let pointer: OpaquePointer }
    private let session = Locked<Session?>(nil)
    private let queue = DispatchQueue(label: "poolfs.kernel-cache")

    public init() {}

    func attach(_ pointer: OpaquePointer) { session.withLock { $0 = Session(pointer: pointer) } }

    /// Waits for an invalidation under way; later ones do nothing.
    func detach() { session.withLock { $0 = nil } }

    /// Invalidates the inodes `inodes` returns when it runs (soon, off the caller's thread). An
    /// inode the kernel no longer has is skipped by the kernel (ENOENT).
    public func invalidate(_ inodes: @escaping @Sendable () -> [UInt64]) {
        queue.async { [session] in
            let list = inodes()
            guard !list.isEmpty else { return }
            session.withLock { s in
                guard let s else { return }
                for inode in list { _ = poolfs_notify_inval_inode(s.pointer, inode) }
            }
        }
    }
}
