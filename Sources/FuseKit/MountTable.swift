#if canImport(Glibc)
import Glibc
#endif

/// The mounts of this process's namespace, from /proc/self/mountinfo: read without touching any
/// mount point, which for a FUSE mount that does not serve yet would hang.
public struct MountTable: Sendable {
    public struct Entry: Sendable, Equatable {
        /// "MAJOR:MINOR" of the mounted filesystem.
        public var device: String
        public var mountpoint: String
        /// "ext4", "fuse.poolfs", ...
        public var type: String
    }

    /// In the table's order: a later entry is mounted over an earlier one at the same path.
    public let entries: [Entry]

    /// The table now; empty when /proc cannot be read.
    public static func current() -> MountTable {
        MountTable(text: readText("/proc/self/mountinfo") ?? "")
    }

    /// Parses mountinfo text, whose paths escape space, tab, newline and backslash in octal.
    public init(text: String) {
        entries = text.split(separator: "\n").compactMap { line in
            let halves = line.split(separator: " - ", maxSplits: 1)
            let fields = halves[0].split(separator: " ")
            guard halves.count == 2, fields.count >= 5, let type = halves[1].split(separator: " ").first else { return nil }
            return Entry(device: String(fields[2]), mountpoint: Self.unescape(fields[4]), type: String(type))
        }
    }

    static func unescape(_ field: Substring) -> String {
        let raw = Array(field.utf8)
        var bytes: [UInt8] = []
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

    static func readText(_ path: String) -> String? {
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
}
