#if canImport(Glibc)
import Glibc
#endif

/// The readahead window of a FUSE mount.
///
/// The kernel keeps the smaller of its default (128 KiB) and what the daemon asks for in init, so
/// a sequential read reaches the daemon as one 128 KiB request at a time, each waiting on the last,
/// and both cores sit partly idle. Root can raise the window through the mount's backing device
/// (`/sys/class/bdi/MAJOR:MINOR/read_ahead_kb`). With a window of 2 MiB and requests of at most
/// 512 KiB, four requests are in flight and the worker threads serve them in parallel: on a 2-core
/// machine, sequential reads went from 1.0-1.5 GB/s to 1.7-2.4 GB/s.
public enum MountReadahead {
    /// Sets the window of the FUSE mount at `mountpoint` (a canonical path, as the mount table
    /// shows it) to `bytes`; false when the mount is not found or sysfs refuses (not root).
    static func set(_ bytes: UInt32, mountpoint: String) -> Bool {
        guard let device = device(of: mountpoint, in: .current()) else { return false }
        return writeText("/sys/class/bdi/\(device)/read_ahead_kb", "\(bytes / 1024)\n")
    }

    /// The device of the newest FUSE mount at `mountpoint`.
    public static func device(of mountpoint: String, in table: MountTable) -> String? {
        table.entries.last { $0.mountpoint == mountpoint && $0.type.hasPrefix("fuse") }?.device
    }

    private static func writeText(_ path: String, _ text: String) -> Bool {
        let fd = open(path, O_WRONLY)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        return write(fd, bytes, bytes.count) == bytes.count
    }
}
