#if canImport(Glibc)
import Glibc
#endif

/// A lock the daemon holds for as long as it serves a mountpoint, so that `poolfs unmount` can
/// return only once the daemon has finished: flushed what was open for writing, released its
/// image locks and exited. The kernel unmounts first; the daemon's last work comes after.
/// An flock on a file named after the mountpoint's real path, in /run (or /tmp when /run is not
/// writable); a file left behind is harmless, since only a live daemon holds the lock.
enum MountLock {
    static func path(for mountpoint: String) -> String {
        // FNV-1a: a stable, short name for any path.
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in mountpoint.utf8 { hash = (hash ^ UInt64(byte)) &* 0x0100_0000_01b3 }
        let directory = access("/run", W_OK) == 0 ? "/run" : "/tmp"
        return "\(directory)/poolfs-\(String(hash, radix: 16)).lock"
    }

    /// Takes the lock for `mountpoint`; the descriptor stays open (and inherited by the daemon
    /// when it forks) until the process exits. Nil when the lock file cannot be made.
    static func hold(_ mountpoint: String) -> Int32? {
        let fd = open(path(for: mountpoint), O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return nil }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            close(fd)
            return nil
        }
        return fd
    }

    /// Waits until no daemon holds the lock for `mountpoint`, at most `seconds`; false on timeout.
    static func waitForRelease(_ mountpoint: String, seconds: Double) -> Bool {
        let fd = open(path(for: mountpoint), O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return true }
        defer { close(fd) }
        var waited = 0.0
        while flock(fd, LOCK_SH | LOCK_NB) != 0 {
            guard waited < seconds else { return false }
            usleep(20_000)
            waited += 0.02
        }
        return true
    }
}
