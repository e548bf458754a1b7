#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Block

/// How network pools connect (`-o net_timeout=`).
public struct NetworkPoolOptions: Sendable {
    /// The bound on every call to the server, in seconds: a server that does not answer in time
    /// fails the read with EIO.
    public var timeout: Double = 10
    public init() {}
}

/// The network pool types: `gluster` (a gluster:// URL or a libvirt gluster pool) and `netfs`
/// (an nfs:// URL or a libvirt netfs pool), and the libvirt `netfs`/`fs` pools whose share is
/// mounted at their target (served as a dir pool) or not (read natively, or refused).
extension PoolSource {
    static func networkType(of source: String) -> String? {
        if source.hasPrefix("gluster://") || source.hasPrefix("gluster+tcp://") { return "gluster" }
        if source.hasPrefix("nfs://") { return "netfs" }
        return nil
    }

    /// A pool named by URL on the command line.
    static func openNetworkURL(_ source: String, type: String, options: NetworkPoolOptions) throws -> any Pool {
        if type == "gluster" {
            guard let address = GlusterAddress(url: source) else {
                throw PoolError.libvirt("\(source): not gluster://HOST[:PORT]/VOLUME[/DIR]")
            }
            return NetworkPool(client: try GlusterClient(address, timeout: options.timeout), kind: "gluster")
        }
        guard let address = try NFSAddress(url: source) else {
            throw PoolError.libvirt("\(source): a netfs pool given by URL takes nfs://HOST[:PORT]/EXPORT[/DIR]")
        }
        return NetworkPool(client: try NFSClient(address, timeout: options.timeout), kind: "NFS")
    }

    /// A libvirt `gluster` pool: `<source><host name= port=/><dir path=/><name>VOLUME</name>`.
    static func openLibvirtGluster(_ xml: String, file: String, options: NetworkPoolOptions) throws -> any Pool {
        func firstMatch(_ pattern: String) -> String? { Self.firstMatch(pattern, in: xml) }
        guard let host = firstMatch(#"<source>.*?<host\s[^>]*name\s*=\s*['"]([^'"]+)['"]"#) else {
            throw PoolError.libvirt("\(file): no <source><host name=...>")
        }
        guard let volume = firstMatch(#"<source>.*?<name>\s*([^<]*?)\s*</name>"#), !volume.isEmpty, !volume.contains("/") else {
            throw PoolError.libvirt("\(file): no <source><name> (the gluster volume)")
        }
        let port = firstMatch(#"<source>.*?<host\s[^>]*port\s*=\s*['"]([0-9]+)['"]"#).flatMap(Int.init) ?? 24007
        let dir = firstMatch(#"<source>.*?<dir\s[^>]*path\s*=\s*['"]([^'"]*)['"]"#) ?? "/"
        guard !dir.split(separator: "/").contains(where: { $0 == ".." || $0 == "." }) else {
            throw PoolError.libvirt("\(file): <dir path='\(dir)'> has '.' or '..'")
        }
        let address = GlusterAddress(host: host, port: port, volume: volume, directory: dir)
        return NetworkPool(client: try GlusterClient(address, timeout: options.timeout), kind: "gluster")
    }

    /// A libvirt `netfs` or `fs` pool. Mounted at its target (the mount table says so, with
    /// this source): a dir pool of the target. Not mounted: an NFS or glusterfs share is read
    /// natively; anything else is refused, and the local target directory is never listed.
    static func openLibvirtMountable(_ xml: String, type: String, target: String, file: String, name: String,
                                     trust: PoolTrust, options: NetworkPoolOptions,
                                     mountTable: String = "/proc/self/mountinfo") throws -> any Pool {
        func firstMatch(_ pattern: String) -> String? { Self.firstMatch(pattern, in: xml) }
        let format = firstMatch(#"<source>.*?<format\s[^>]*type\s*=\s*['"]([^'"]+)['"]"#) ?? "auto"
        let host = firstMatch(#"<source>.*?<host\s[^>]*name\s*=\s*['"]([^'"]+)['"]"#)
        let port = firstMatch(#"<source>.*?<host\s[^>]*port\s*=\s*['"]([0-9]+)['"]"#).flatMap(Int.init)
        let dir = firstMatch(#"<source>.*?<dir\s[^>]*path\s*=\s*['"]([^'"]*)['"]"#)
        let device = firstMatch(#"<source>.*?<device\s[^>]*path\s*=\s*['"]([^'"]+)['"]"#)
        let expected: String? = type == "fs" ? device : host.flatMap { h in dir.map { "\(h):\($0)" } }
        if let mounted = MountTable.source(mountedAt: target, table: mountTable) {
            guard let expected, MountTable.sameSource(mounted.source, expected, fstype: mounted.fstype) else {
                throw PoolError.libvirt("libvirt pool \(name): \(target) has \(mounted.source) (\(mounted.fstype)) mounted, not the pool's source \(expected ?? "(none given)")")
            }
            return try DirectoryPool(path: target, trust: trust)
        }
        let notMounted = "libvirt pool \(name) (\(type), \(format)) is not mounted at \(target)"
        guard type == "netfs" else {
            throw PoolError.libvirt("\(notMounted): poolfs reads a filesystem pool only when its device is mounted there (start the pool in libvirt, or mount \(device ?? "its device"))")
        }
        guard let host, let dir else { throw PoolError.libvirt("\(file): no <source><host name=...> and <dir path=...>") }
        switch format {
        case "nfs", "auto":
            let version = firstMatch(#"<protocol\s[^>]*ver\s*=\s*['"]([0-9]+)['"]"#).flatMap(Int.init)
            guard version == nil || version == 3 || version == 4 else {
                throw PoolError.libvirt("\(notMounted), and poolfs reads NFS versions 3 and 4 only, not \(version!)")
            }
            return try openNFS(host: host, port: port ?? 0, path: dir, versions: version.map { [$0] } ?? [4, 3], options: options)
        case "glusterfs":
            let parts = dir.split(separator: "/").map(String.init)
            guard let volume = parts.first else { throw PoolError.libvirt("\(file): <dir path='\(dir)'> names no gluster volume") }
            let address = GlusterAddress(host: host, port: port ?? 24007, volume: volume, directory: parts.dropFirst().joined(separator: "/"))
            return NetworkPool(client: try GlusterClient(address, timeout: options.timeout), kind: "gluster")
        default:
            throw PoolError.libvirt("\(notMounted): poolfs reads \(format) shares only when mounted there (it reads NFS and glusterfs shares natively); mount it, or start the pool in libvirt")
        }
    }

    /// NFS at each version in turn (libvirt's default: whatever the server speaks, 4 first).
    static func openNFS(host: String, port: Int, path: String, versions: [Int], options: NetworkPoolOptions) throws -> any Pool {
        var failures: [String] = []
        for version in versions {
            do {
                let client = try NFSClient(NFSAddress(host: host, port: port, path: path, version: version), timeout: options.timeout)
                return NetworkPool(client: client, kind: "NFS")
            } catch {
                failures.append("\(error)")
            }
        }
        throw PoolError.libvirt(failures.joined(separator: "; "))
    }
}

/// /proc/self/mountinfo, for what is mounted where.
enum MountTable {
    /// The source and type of the filesystem mounted at `path` (the last one mounted there).
    static func source(mountedAt path: String, table: String) -> (source: String, fstype: String)? {
        guard let text = try? String(contentsOfFile: table, encoding: .utf8) else { return nil }
        var resolved = path
        if let real = realpath(path, nil) {
            resolved = String(cString: real)
            free(real)
        }
        var found: (String, String)?
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: false).map(String.init)
            guard fields.count > 4, let dash = fields.firstIndex(of: "-"), dash + 2 < fields.count else { continue }
            let point = unescape(fields[4])
            if point == resolved || point == path { found = (unescape(fields[dash + 2]), fields[dash + 1]) }
        }
        return found
    }

    /// Whether a mount's source is the pool's: the same host:dir (a trailing '/' aside; gluster's
    /// FUSE client shows host:volume without the '/'), or the same device.
    static func sameSource(_ mounted: String, _ expected: String, fstype: String) -> Bool {
        func normal(_ s: String) -> String {
            var s = s
            while s.count > 1, s.hasSuffix("/") { s.removeLast() }
            if fstype.hasPrefix("fuse.glusterfs"), let colon = s.firstIndex(of: ":") {
                let rest = s[s.index(after: colon)...].drop { $0 == "/" }
                s = String(s[..<colon]) + ":" + rest
            }
            return s
        }
        if normal(mounted) == normal(expected) { return true }
        guard expected.hasPrefix("/"), let a = realpath(mounted, nil), let b = realpath(expected, nil) else { return false }
        defer { free(a); free(b) }
        return strcmp(a, b) == 0
    }

    /// mountinfo escapes space, tab, newline and backslash as \ooo.
    static func unescape(_ field: String) -> String {
        guard field.contains("\\") else { return field }
        var bytes: [UInt8] = []
        let utf8 = Array(field.utf8)
        var i = 0
        while i < utf8.count {
            if utf8[i] == UInt8(ascii: "\\"), i + 3 < utf8.count,
               let value = UInt8(String(decoding: utf8[(i + 1)...(i + 3)], as: UTF8.self), radix: 8) {
                bytes.append(value)
                i += 4
            } else {
                bytes.append(utf8[i])
                i += 1
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
