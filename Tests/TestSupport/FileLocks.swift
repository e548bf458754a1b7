import Foundation

/// The byte-range locks the kernel lists in /proc/locks for one file, whoever holds them.
public enum FileLocks {
    public struct Lock: Hashable, CustomStringConvertible {
        /// POSIX, OFDLCK or FLOCK.
        public var kind: String
        /// READ or WRITE.
        public var type: String
        public var start: UInt64
        public var end: UInt64
        public var description: String { "\(kind) \(type) \(start)-\(end)" }
    }

    /// Every lock on the file at `path`, as /proc/locks lists it ("1: OFDLCK ADVISORY READ -1
    /// fe:00:16229003 100 100"; the device is major:minor in hex).
    public static func on(_ path: String) -> [Lock] {
        var st = stat()
        guard stat(path, &st) == 0,
              let table = try? String(contentsOfFile: "/proc/locks", encoding: .utf8) else { return [] }
        let device = UInt64(st.st_dev)
        let major = ((device >> 8) & 0xfff) | ((device >> 32) & ~0xfff)
        let minor = (device & 0xff) | ((device >> 12) & ~0xff)
        let file = String(format: "%02x:%02x:%llu", major, minor, UInt64(st.st_ino))
        return table.split(separator: "\n").compactMap { line in
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            // A blocked waiter's line starts with "->"; only granted locks count.
            guard fields.count >= 8, fields[1] != "->", fields[5] == file,
                  let start = UInt64(fields[6]), let end = UInt64(fields[7]) else { return nil }
            return Lock(kind: String(fields[1]), type: String(fields[3]), start: start, end: end)
        }
    }

    /// The bytes of `path` locked by anyone, each byte once, in order.
    public static func bytes(of path: String) -> [UInt64] {
        Array(Set(on(path).flatMap { $0.end - $0.start < 4096 ? Array($0.start...$0.end) : [$0.start] })).sorted()
    }

    /// What qemu-io and qemu-img say when another program's lock refuses them "write".
    public static let qemuRefusal = #"Failed to get "write" lock"#

    /// Whether `qemu-io` (with `arguments`: the file, and options such as `-f raw`) fails to open
    /// it for writing with QEMU's lock error.
    public static func qemuWriteRefused(_ arguments: String, in scratch: Scratch) -> Bool {
        let write = scratch.attempt("qemu-io -c 'write -P 0x22 0 4k' \(arguments)")
        return !write.ok && write.output.contains(qemuRefusal)
    }

    /// Waits up to `seconds` for `condition`; whether it came true.
    public static func wait(seconds: Double = 5, until condition: () -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while !condition() {
            guard Date() < deadline else { return false }
            usleep(20_000)
        }
        return true
    }
}
