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
    /// Sets the window of the FUSE mount at `mountpoint` (a canonical path) to `bytes`; false when
    /// the mount is not found or sysfs refuses (not root).
    static func set(_ bytes: UInt32, mountpoint: String) -> Bool {
        guard let table = readText("/proc/self/mountinfo"),
              let device = device(of: mountpoint, mountinfo: table) else { return false }
        return writeText("/sys/class/bdi/\(device)/read_ahead_kb", "\(bytes / 1024)\n")
    }

    /// The device ("MAJOR:MINOR") of the newest FUSE mount at `mountpoint` in a
    /// /proc/self/mountinfo text, whose paths escape space, tab, newline and backslash as octal.
    public static func device(of mountpoint: String, mountinfo: String) -> String? {
        var found: String?
        for line in mountinfo.split(separator: "\n") {
            let halves = line.split(separator: " - ", maxSplits: 1)
            guard halves.count == 2, halves[1].hasPrefix("fuse") else { continue }
            let fields = halves[0].split(separator: " ")
            guard fields.count >= 5, unescape(fields[4]) == mountpoint else { continue }
            found = String(fields[2])  // later lines are mounted over earlier ones
        }
        return found
    }

    static func unescape(_ field: Substring) -> String {
        var bytes: [UInt8] = []
        let raw = Array(field.utf8)
        var i = 0
        while i < raw.count {
            if raw[i] == UInt8(ascii: "\\"), i + 3 < raw.count,
               let code = UInt8(String(decoding: raw[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
                bytes.append(code)
                i += 4
            } else {
                bytes.append(raw[i])
                i += 1
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    static func canonicalPath(_ path: String) -> String {
        guard let resolved = realpath(path, nil) else { return path }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    private static func readText(_ path: String) -> String? {
        guard let file = fopen(path, "r") else { return nil }
        defer { fclose(file) }
        var text: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = fread(&chunk, 1, chunk.count, file)
            if n == 0 { break }
            text += chunk[..<n]
        }
        return String(decoding: text, as: UTF8.self)
    }

    private static func writeText(_ path: String, _ text: String) -> Bool {
        let fd = open(path, O_WRONLY)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        let bytes = Array(text.utf8)
        return write(fd, bytes, bytes.count) == bytes.count
    }
}
