#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// A storage pool: where its volumes are and how to list them.
public protocol Pool: Sendable {
    /// What the pool is called in messages: its directory, volume group or dataset.
    var displayName: String { get }
    /// Where statfs looks for sizes.
    var statisticsPath: String { get }
    /// The names of the pool's volumes now, sorted.
    func volumeNames() throws -> [String]
    /// The file or device of a volume, or nil if the pool has no such volume now.
    func volumePath(_ name: String) -> String?
}

public enum PoolError: Error, CustomStringConvertible, Equatable {
    case notFound(String)
    case notADirectory(String)
    case unsupportedType(String)
    case libvirt(String)

    public var description: String {
        switch self {
        case .notFound(let what): return "pool \(what) does not exist"
        case .notADirectory(let path): return "pool \(path) is not a directory"
        case .unsupportedType(let type): return "pool type '\(type)' is not supported yet (supported: dir)"
        case .libvirt(let why): return why
        }
    }
}

/// A libvirt `dir` pool: every regular file in one directory is a volume, named as the file is.
public struct DirectoryPool: Pool {
    public let path: String
    public var displayName: String { path }
    public var statisticsPath: String { path }
    /// The name the tree reserves for snapshots; a file so named is not shown.
    static let reserved: Set<String> = [".snapshots", ".", ".."]

    public init(path: String) throws {
        var st = stat()
        guard stat(path, &st) == 0 else { throw PoolError.notFound(path) }
        guard st.st_mode & S_IFMT == S_IFDIR else { throw PoolError.notADirectory(path) }
        // Absolute, because a daemonized mount runs in /.
        guard let resolved = realpath(path, nil) else { throw PoolError.notFound(path) }
        self.path = String(cString: resolved)
        free(resolved)
    }

    public func volumeNames() throws -> [String] {
        guard let dir = opendir(path) else { throw PoolError.notFound(path) }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if Self.reserved.contains(name) { continue }
            let type = entry.pointee.d_type
            if type == UInt8(DT_REG) || ((type == UInt8(DT_UNKNOWN) || type == UInt8(DT_LNK)) && isRegular(path + "/" + name)) {
                names.append(name)
            }
        }
        return names.sorted()
    }

    public func volumePath(_ name: String) -> String? {
        guard !Self.reserved.contains(name), !name.utf8.contains(UInt8(ascii: "/")) else { return nil }
        let full = path + "/" + name
        return isRegular(full) ? full : nil
    }

    private func isRegular(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && st.st_mode & S_IFMT == S_IFREG
    }
}

/// What the user named on the command line: a directory, or the name of a libvirt pool whose
/// definition (/etc/libvirt/storage/NAME.xml) gives its type and target path.
public enum PoolSource {
    public static let libvirtStorageDirectory = "/etc/libvirt/storage"

    public static func open(_ source: String, type: String?,
                            libvirtDirectory: String = libvirtStorageDirectory) throws -> any Pool {
        var path = source
        var resolvedType = type
        if !source.contains("/"), !FileManager.default.fileExists(atPath: source) {
            let definition = libvirtDirectory + "/" + source + ".xml"
            guard let xml = try? String(contentsOfFile: definition, encoding: .utf8) else {
                throw PoolError.notFound("\(source) (no such directory, and no libvirt pool definition \(definition))")
            }
            let parsed = try parseLibvirt(xml, file: definition)
            path = parsed.path
            if let type, type != parsed.type {
                throw PoolError.libvirt("libvirt pool \(source) has type '\(parsed.type)', not '\(type)'")
            }
            resolvedType = parsed.type
        }
        switch resolvedType ?? "dir" {
        case "dir", "fs", "netfs":
            return try DirectoryPool(path: path)
        case let other:
            throw PoolError.unsupportedType(other)
        }
    }

    /// The pool's type attribute and its `<target><path>`.
    static func parseLibvirt(_ xml: String, file: String) throws -> (type: String, path: String) {
        func firstMatch(_ pattern: String) -> String? {
            guard let regex = try? NSRegularExpression(pattern: pattern, options: [.dotMatchesLineSeparators]),
                  let match = regex.firstMatch(in: xml, range: NSRange(xml.startIndex..., in: xml)),
                  let range = Range(match.range(at: 1), in: xml) else { return nil }
            return String(xml[range])
        }
        guard let type = firstMatch(#"<pool\s[^>]*type\s*=\s*['"]([^'"]+)['"]"#) else {
            throw PoolError.libvirt("\(file): no <pool type=...>")
        }
        guard let path = firstMatch(#"<target>.*?<path>\s*([^<]*?)\s*</path>"#) else {
            throw PoolError.libvirt("\(file): no <target><path>")
        }
        return (type, path)
    }
}
