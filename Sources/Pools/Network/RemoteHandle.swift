#if canImport(Glibc)
import Glibc
#endif
import Block
import Locking

/// An open file of a network share that opens itself again after a failure: a call that
/// fails (a server killed, restarted, or not answering in time) drops the handle, and the next
/// call opens the file by its path again, refusing it (ESTALE) if the path now leads to another
/// file than the one first opened (another inode: replaced while the server was away).
///
/// `Handle` closes what it holds in its deinit: a call still running on a dropped handle keeps
/// it alive until it returns.
final class RemoteHandle<Handle: AnyObject & Sendable>: Sendable {
    private let slot = Locked<Handle?>(nil)
    private let reopen: @Sendable () throws(Qcow2Error) -> (Handle, stat)
    let inode: UInt64
    let path: String

    init(path: String, open: @escaping @Sendable () throws(Qcow2Error) -> (Handle, stat)) throws(Qcow2Error) {
        let (handle, st) = try open()
        self.path = path
        self.reopen = open
        self.inode = UInt64(st.st_ino)
        slot.withLock { $0 = handle }
    }

    /// Runs `body` on the open handle (opening it again first if a call failed since); a failure
    /// drops the handle. A handle that served earlier calls and now fails at once (not by
    /// timing out: a server restarted, an NFSv4 lease expired while idle) is opened again and
    /// the call tried once more, so the restart costs the reader nothing.
    func with<T>(_ body: (Handle) throws(Qcow2Error) -> T) throws(Qcow2Error) -> T {
        let (handle, fresh) = try current()
        let start = ContinuousClock.now
        do {
            return try body(handle)
        } catch {
            slot.withLock { held in if held === handle { held = nil } }
            guard !fresh, ContinuousClock.now - start < .seconds(1) else { throw error }
        }
        let (again, _) = try current()
        do {
            return try body(again)
        } catch {
            slot.withLock { held in if held === again { held = nil } }
            throw error
        }
    }

    /// The open handle, and whether it was opened by this call.
    private func current() throws(Qcow2Error) -> (Handle, Bool) {
        if let handle = slot.withLock({ $0 }) { return (handle, false) }
        let (handle, st) = try reopen()
        guard UInt64(st.st_ino) == inode else {
            throw .io(errno: ESTALE, operation: "reopen (the name leads to another file now)", path: path)
        }
        return slot.withLock { held in
            if let held { return (held, false) }
            held = handle
            return (handle, true)
        }
    }
}

/// A `stat` from the fields the client libraries give.
func makeStat(size: UInt64, blocks: UInt64, ino: UInt64, dev: UInt64, nlink: UInt64, mode: UInt32, uid: UInt32, gid: UInt32,
              mtime: (Int64, Int64), ctime: (Int64, Int64)) -> stat {
    var st = stat()
    st.st_size = off_t(Int64(bitPattern: size))
    st.st_blocks = blkcnt_t(Int64(bitPattern: blocks))
    st.st_ino = ino_t(ino)
    st.st_dev = dev_t(dev)
    st.st_nlink = nlink_t(nlink)
    st.st_mode = mode_t(mode)
    st.st_uid = uid_t(uid)
    st.st_gid = gid_t(gid)
    st.st_mtim = timespec(tv_sec: Int(mtime.0), tv_nsec: Int(mtime.1))
    st.st_ctim = timespec(tv_sec: Int(ctime.0), tv_nsec: Int(ctime.1))
    st.st_atim = st.st_mtim
    st.st_blksize = 4096
    return st
}
