#if canImport(Glibc)
import Glibc
#endif

/// Where files that an image names (backing files, external data files) may be opened from:
/// beneath the pool's own directory, and beneath directories the administrator allowed
/// (`-o backing_dirs=`). Nothing else. See docs/security.md.
public struct TrustPolicy: Sendable {
    /// Each allowed directory as given (absolute) and with its symbolic links resolved: a name
    /// may use either spelling; it is opened beneath the resolved one.
    public let roots: [(given: String, real: String)]
    /// The directory of a network share that the pool serves: names are resolved beneath it
    /// (RemoteFile.swift), and `roots` are not used.
    public private(set) var remote: (any RemoteDirectory)?

    /// `directories`: the pool's directory first, then the allowed ones. A directory that does
    /// not exist allows nothing.
    public init(directories: [String]) {
        roots = directories.compactMap { directory in
            guard directory.hasPrefix("/"), let resolved = realpath(directory, nil) else { return nil }
            defer { free(resolved) }
            return (Self.trimmed(directory), String(cString: resolved))
        }
    }

    /// No file an image names may be opened (pools whose volumes are not files in a directory,
    /// with no `backing_dirs=`).
    public static let nothing = TrustPolicy(directories: [])

    /// Names resolved beneath `directory` of a network share, and nowhere else.
    public init(remote directory: any RemoteDirectory) {
        roots = []
        remote = directory
    }

    static func trimmed(_ path: String) -> String {
        var path = path
        while path.count > 1, path.hasSuffix("/") { path.removeLast() }
        return path
    }

    /// The allowed directory that `path` (absolute) lies in, lexically, and the rest of the path
    /// beneath it.
    public func root(of path: String) -> (real: String, rest: String)? {
        for root in roots {
            for prefix in [root.given, root.real] {
                let base = prefix == "/" ? "" : prefix
                if path.hasPrefix(base + "/") {
                    let rest = path.dropFirst(base.count).drop { $0 == "/" }
                    if !rest.isEmpty { return (root.real, String(rest)) }
                }
            }
        }
        return nil
    }
}

/// The one place that turns a name found inside an image into an open file (docs/security.md):
/// - a name is cut at its first NUL, as QEMU reads it; an empty name names nothing;
/// - a protocol prefix (a ':' before any '/': `file:`, `json:`, `nbd:`, `host_device:`) is
///   refused, not read as a path;
/// - a relative name is taken relative to the directory of the image that names it, an absolute
///   one as is; either must lie in an allowed directory, and is opened beneath it with openat2
///   `RESOLVE_BENEATH`, so no `..` or symbolic link leads out of it;
/// - only a regular file is accepted (never a FIFO, socket or device), opened
///   `O_NONBLOCK|O_NOCTTY`, so no open waits.
public enum ChainResolver {
    /// The name stored in `bytes`, cut at the first NUL; nil when nothing is left.
    public static func name(from bytes: some Collection<UInt8>) -> String? {
        let kept = bytes.prefix { $0 != 0 }
        return kept.isEmpty ? nil : String(decoding: kept, as: UTF8.self)
    }

    /// Whether QEMU would read `name` as a protocol rather than a file name: a ':' before the
    /// first '/' (QEMU's path_has_protocol).
    public static func hasProtocol(_ name: String) -> Bool {
        let head = name.prefix { $0 != "/" }
        return head.contains(":")
    }

    /// Opens the file `name`, named as `what` ("backing file", "data file") by the image at
    /// `imagePath`, under `policy`.
    public static func open(_ name: String, what: String, namedBy imagePath: String, policy: TrustPolicy,
                            writable: Bool = false) throws(Qcow2Error) -> HostFile {
        if let remote = policy.remote {
            if writable { throw .io(errno: EROFS, operation: "open", path: name) }
            return try openRemote(name, what: what, namedBy: imagePath, in: remote)
        }
        if hasProtocol(name) {
            throw .refused("\(what) '\(Printable.escaped(name))' of \(imagePath) names a protocol; poolfs reads only files in the pool")
        }
        let path = name.hasPrefix("/") ? name : Image.directory(of: imagePath) + "/" + name
        guard path.hasPrefix("/"), let (root, rest) = policy.root(of: path) else {
            let allowed = policy.roots.isEmpty ? "this pool allows none" : "allowed: " + policy.roots.map(\.given).joined(separator: ", ")
            throw .refused("\(what) \(Printable.escaped(path)) of \(imagePath) is outside the pool (\(allowed); see -o backing_dirs=)")
        }
        let directory = try HostFile.openDirectory(root)
        defer { HostFile.closeDirectory(directory) }
        do {
            return try HostFile.openBeneath(directory: directory, relativePath: rest, path: path, writable: writable)
        } catch .refused(let why) {
            throw .refused("\(what) of \(imagePath): \(why)")
        }
    }
}

/// Names as people may see them: control characters, DEL and invalid UTF-8 escaped as `\xNN`
/// (and the backslash as `\\`), so a name cannot forge a log line or send a terminal an escape
/// sequence.
public enum Printable {
    public static func escaped(_ text: String) -> String { escaping(text, backslash: true) }

    /// `text` with control characters, DEL and invalid UTF-8 escaped, backslashes left alone:
    /// for whole messages, whose names may carry them.
    public static func controlsEscaped(_ text: String) -> String { escaping(text, backslash: false) }

    private static func escaping(_ text: String, backslash: Bool) -> String {
        let escapes = { (scalar: Unicode.Scalar) in scalar == "\\" ? backslash : needsEscape(scalar) }
        guard text.unicodeScalars.contains(where: escapes) else { return text }
        var out = ""
        for scalar in text.unicodeScalars {
            if scalar == "\\" && backslash {
                out += "\\\\"
            } else if escapes(scalar) {
                out += scalar.value < 0x100 ? "\\x" + hex(UInt8(scalar.value)) : "\\u{fffd}"
            } else {
                out.unicodeScalars.append(scalar)
            }
        }
        return out
    }

    /// C0 and C1 controls, DEL, and U+FFFD (what invalid UTF-8 decoded to).
    static func needsEscape(_ scalar: Unicode.Scalar) -> Bool {
        switch scalar.value {
        case 0..<0x20, 0x7f, 0x80..<0xa0, 0xfffd: return true
        default: return false
        }
    }

    static func hex(_ byte: UInt8) -> String {
        let digits = Array("0123456789abcdef")
        return String([digits[Int(byte >> 4)], digits[Int(byte & 15)]])
    }
}
