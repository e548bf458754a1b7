#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// libvirt's persistent secret store, read the way libvirtd's secret driver keeps it
/// (src/conf/virsecretobj.c; the XML is docs/formatsecret): each secret is `UUID.xml` in one
/// directory (/etc/libvirt/secrets, root only),
///
///     <secret ephemeral='no' private='yes'>
///       <uuid>UUID</uuid>
///       <usage type='iscsi'><target>NAME</target></usage>     (iscsi: CHAP)
///       <usage type='ceph'><name>NAME</name></usage>          (ceph: cephx)
///     </secret>
///
/// and its value, base64, in `UUID.base64` beside it. An ephemeral secret has no value file: its
/// value is only in libvirtd's memory. A pool's `<auth><secret uuid=|usage=/></auth>` names one.
///
/// The value is secret: it is never logged, put on a command line nor said in an error.
public struct LibvirtSecretStore: Sendable {
    public static let defaultDirectory = "/etc/libvirt/secrets"

    /// A secret's usage type and the element that names what it is for.
    public enum Usage: String, Sendable {
        case iscsi, ceph
        var element: String { self == .iscsi ? "target" : "name" }
        /// The mount option that gives the secret instead.
        var option: String { self == .iscsi ? "-o chap_secret_file=PATH" : "-o keyring=PATH" }
    }

    /// How a pool's `<auth>` names its secret.
    public enum Reference: Equatable, Sendable {
        case uuid(String)
        case usage(String)
    }

    /// Reads a file or lists a directory, or throws the errno (a parameter so that tests can
    /// make the store unreadable, which a root test cannot do with modes).
    struct Access: Sendable {
        var list: @Sendable (String) throws(Errno) -> [String]
        var read: @Sendable (String) throws(Errno) -> Data

        static let system = Access(
            list: { (path: String) throws(Errno) -> [String] in
                guard let dir = opendir(path) else { throw Errno(rawValue: errno) }
                defer { closedir(dir) }
                var names: [String] = []
                while let entry = readdir(dir) {
                    names.append(withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) })
                }
                return names.sorted()
            },
            read: { (path: String) throws(Errno) -> Data in
                let fd = open(path, O_RDONLY | O_CLOEXEC)
                guard fd >= 0 else { throw Errno(rawValue: errno) }
                defer { close(fd) }
                var data = Data()
                var buffer = [UInt8](repeating: 0, count: 4096)
                while true {
                    let n = Glibc.read(fd, &buffer, buffer.count)
                    if n < 0, errno == EINTR { continue }
                    guard n >= 0 else { throw Errno(rawValue: errno) }
                    if n == 0 { return data }
                    data.append(contentsOf: buffer[..<n])
                    // A secret is a few bytes; anything this large is not one.
                    guard data.count <= 1 << 20 else { throw Errno(rawValue: EFBIG) }
                }
            })
    }

    /// A libc errno, thrown by `Access`.
    struct Errno: Error, Sendable {
        var rawValue: Int32
        var text: String { String(cString: strerror(rawValue)) }
    }

    public let directory: String
    let access: Access

    public init(directory: String = defaultDirectory) {
        self.init(directory: directory, access: .system)
    }

    init(directory: String, access: Access) {
        self.directory = directory
        self.access = access
    }

    /// The `<secret uuid=|usage=/>` inside a pool definition's `<auth>`; nil when it has none.
    public static func reference(inPool xml: String) -> Reference? {
        guard let auth = PoolSource.firstMatch(#"(<auth[\s>].*?</auth>)"#, in: xml) else { return nil }
        if let uuid = PoolSource.firstMatch(#"<secret\s[^>]*uuid\s*=\s*['"]([^'"]+)['"]"#, in: auth) { return .uuid(uuid) }
        if let usage = PoolSource.firstMatch(#"<secret\s[^>]*usage\s*=\s*['"]([^'"]+)['"]"#, in: auth) { return .usage(usage) }
        return nil
    }

    /// The value of the secret `reference` names, which must be of usage type `usage`, decoded
    /// from base64. `pool` is the libvirt pool, for messages.
    public func value(_ reference: Reference, usage: Usage, pool: String) throws -> Data {
        let uuid: String, definition: String
        switch reference {
        case .uuid(let given):
            guard !given.isEmpty, !given.contains("/"), !given.hasPrefix(".") else {
                throw PoolError.libvirt("libvirt pool \(pool): secret uuid '\(given)' is not a UUID")
            }
            uuid = given
            definition = try readText(uuid + ".xml", pool: pool, usage: usage, missing: "has no secret \(uuid) (no \(uuid).xml)")
            let found = Self.usage(of: definition)
            guard found?.type == usage.rawValue else {
                throw PoolError.libvirt("libvirt pool \(pool): secret \(uuid) in \(directory) has usage type '\(found?.type ?? "none")', not '\(usage.rawValue)'")
            }
        case .usage(let name):
            (uuid, definition) = try find(usage: usage, name: name, pool: pool)
        }
        if PoolSource.firstMatch(#"<secret\s[^>]*ephemeral\s*=\s*['"](yes)['"]"#, in: definition) != nil {
            throw PoolError.libvirt("libvirt pool \(pool): secret \(uuid) is ephemeral: its value is only in libvirtd's memory, which poolfs cannot read; give it with \(usage.option)")
        }
        let encoded = try read(uuid + ".base64", pool: pool, usage: usage,
                               missing: "has no value for secret \(uuid) (no \(directory)/\(uuid).base64: an ephemeral secret, or one never given a value with virsh secret-set-value); give it with \(usage.option)")
        let text = String(decoding: encoded, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        guard let value = Data(base64Encoded: text), !value.isEmpty else {
            throw PoolError.libvirt("libvirt pool \(pool): \(directory)/\(uuid).base64 is not a base64 secret value")
        }
        return value
    }

    /// The one secret of usage type `usage` whose usage element (`<target>`, `<name>`) is `name`.
    func find(usage: Usage, name: String, pool: String) throws -> (uuid: String, definition: String) {
        let what = "a secret of usage type '\(usage.rawValue)' with <\(usage.element)>\(name)</\(usage.element)>"
        let names: [String]
        do {
            names = try access.list(directory)
        } catch {
            throw unreadable(directory, error, pool: pool, usage: usage)
        }
        // libvirtd names each file after its secret's UUID; the value file is found by the name.
        var matches: [(uuid: String, definition: String)] = []
        for file in names where file.hasSuffix(".xml") {
            let definition = try readText(file, pool: pool, usage: usage, missing: "lost \(file) while reading it")
            guard let found = Self.usage(of: definition), found.type == usage.rawValue, found.name == name else { continue }
            matches.append((String(file.dropLast(4)), definition))
        }
        guard let match = matches.first else {
            throw PoolError.libvirt("libvirt pool \(pool) needs \(what), and \(directory) has none; give it with \(usage.option)")
        }
        guard matches.count == 1 else {
            throw PoolError.libvirt("libvirt pool \(pool) needs \(what), and \(directory) has \(matches.count): \(matches.map(\.uuid).joined(separator: ", "))")
        }
        return match
    }

    /// A secret definition's `<usage type=...>` and its naming element (`<target>`, `<name>`).
    static func usage(of definition: String) -> (type: String, name: String?)? {
        guard let type = PoolSource.firstMatch(#"<usage\s[^>]*type\s*=\s*['"]([^'"]+)['"]"#, in: definition) else { return nil }
        let element = Usage(rawValue: type)?.element ?? "name"
        let name = PoolSource.firstMatch(#"<usage\s[^>]*>.*?<\#(element)>\s*([^<]*?)\s*</\#(element)>"#, in: definition)
        return (type, name)
    }

    private func read(_ file: String, pool: String, usage: Usage, missing: String) throws -> Data {
        do {
            return try access.read(directory + "/" + file)
        } catch where error.rawValue == ENOENT {
            throw PoolError.libvirt("libvirt pool \(pool): \(directory) \(missing)")
        } catch {
            throw unreadable(directory + "/" + file, error, pool: pool, usage: usage)
        }
    }

    private func readText(_ file: String, pool: String, usage: Usage, missing: String) throws -> String {
        String(decoding: try read(file, pool: pool, usage: usage, missing: missing), as: UTF8.self)
    }

    private func unreadable(_ path: String, _ error: Errno, pool: String, usage: Usage) -> PoolError {
        if error.rawValue == EACCES || error.rawValue == EPERM {
            return .libvirt("libvirt pool \(pool): cannot read libvirt's secret store (\(path): \(error.text); only root can); give the secret with \(usage.option)")
        }
        return .libvirt("libvirt pool \(pool): cannot read libvirt's secret store (\(path): \(error.text)); give the secret with \(usage.option)")
    }
}
