#if canImport(Glibc)
import Glibc
#endif
import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import CHostIO
import Locking
import Block

/// A dir pool's format decisions (docs/security.md, "Formats"). A guest writes what it likes
/// into its own raw disk, a qcow2 header included; so a volume's format is decided once and
/// kept where only root can change it, never probed afresh:
/// 1. a declaration wins: a libvirt domain that uses the file as a disk with
///    `<driver type='raw|qcow2'/>`, or the administrator's `poolfs format set`;
/// 2. then the decision recorded in the file's `trusted.poolfs.format` extended attribute
///    (trusted.* attributes are read and written by CAP_SYS_ADMIN only);
/// 3. otherwise the content is probed, and the result recorded there. Where the filesystem
///    keeps no such attributes, the decision is kept in memory for the life of the mount.
public final class FormatDecisions: Sendable {
    public static let attribute = "trusted.poolfs.format"
    public static let defaultDomainDirectories = ["/etc/libvirt/qemu", "/run/libvirt/qemu"]

    private let domains: LibvirtDomainDisks
    /// Decisions kept in memory for files whose filesystem refused the attribute, by file.
    private let remembered = Locked<[String: Image.Format]>([:])
    private let warned = Locked<Set<UInt64>>([])
    /// Told (once per filesystem) when decisions cannot be recorded on the files.
    private let warn: @Sendable (String) -> Void

    public init(domainDirectories: [String] = defaultDomainDirectories, warn: @escaping @Sendable (String) -> Void = { _ in }) {
        domains = LibvirtDomainDisks(directories: domainDirectories)
        self.warn = warn
    }

    /// The format of `file` (its path as the pool names it), deciding and recording it on
    /// first sight.
    public func decide(_ file: HostFile) throws -> Image.FormatDecision {
        if let declared = domains.format(of: file.path) {
            // Kept on the file too: when the domain goes (undefined, a transient one stopped),
            // the file stays what it was declared.
            if Self.recorded(fd: file.fd).map({ $0 != (declared, true) }) ?? true {
                Self.record(fd: file.fd, declared, declared: true)
            }
            return Image.FormatDecision(format: declared, declared: true)
        }
        if let recorded = Self.recorded(fd: file.fd) {
            return Image.FormatDecision(format: recorded.format, declared: recorded.declared)
        }
        if let kept = remembered.withLock({ $0[Self.key(file)] }) {
            return Image.FormatDecision(format: kept, declared: false)
        }
        let probed = try Image.probe(file)
        let code = Self.record(fd: file.fd, probed, declared: false)
        if code != 0 {
            remembered.withLock { $0[Self.key(file)] = probed }
            let first = warned.withLock { $0.insert(file.identity.device).inserted }
            if first {
                let why = Self.keepsTrustedAttributes(fd: file.fd) ? String(cString: strerror(code))
                    : "a network or FUSE filesystem, whose trusted attributes others can set"
                warn("formats of images on the filesystem of \(file.path) are kept in memory only: it keeps no \(Self.attribute) attribute (\(why))")
            }
        }
        return Image.FormatDecision(format: probed, declared: false)
    }

    private static func key(_ file: HostFile) -> String { "\(file.identity.device):\(file.identity.inode)" }

    /// What the attribute of the open file says: a format, and whether it was declared.
    /// The value is the format's name, then " declared" when an administrator set it.
    public static func recorded(fd: Int32) -> (format: Image.Format, declared: Bool)? {
        guard keepsTrustedAttributes(fd: fd) else { return nil }
        var buffer = [UInt8](repeating: 0, count: 64)
        let n = fgetxattr(fd, attribute, &buffer, buffer.count)
        guard n > 0 else { return nil }
        return parse(String(decoding: buffer[0..<n], as: UTF8.self))
    }

    static func parse(_ value: String) -> (format: Image.Format, declared: Bool)? {
        let words = value.split(separator: " ")
        guard let first = words.first, let format = Image.Format(rawValue: String(first)) else { return nil }
        return (format, words.dropFirst().first == "declared")
    }

    /// Records `format` on the open file; 0 or the errno of fsetxattr(2).
    @discardableResult
    public static func record(fd: Int32, _ format: Image.Format, declared: Bool) -> Int32 {
        guard keepsTrustedAttributes(fd: fd) else { return EOPNOTSUPP }
        let value = Array((format.rawValue + (declared ? " declared" : "")).utf8)
        return fsetxattr(fd, attribute, value, value.count, 0) == 0 ? 0 : errno
    }

    /// Whether the file's filesystem keeps trusted.* attributes that only this host's root can
    /// set. Not so for network and FUSE filesystems: a gluster client of any uid sets trusted.*
    /// on the brick (measured with gluster 10.3), and a FUSE filesystem answers what its daemon
    /// likes. Decisions for files there are kept in memory for the mount.
    static func keepsTrustedAttributes(fd: Int32) -> Bool {
        let type = poolfs_fs_type(fd)
        guard type >= 0 else { return false }
        let untrusted: Set<UInt32> = [0x6573_5546 /* FUSE */, 0x6969 /* NFS */, 0x517b /* SMB */,
                                      0xff53_4d42 /* CIFS */, 0xfe53_4d42 /* SMB2 */, 0x00c3_6400 /* Ceph */]
        return !untrusted.contains(UInt32(truncatingIfNeeded: type))
    }

    /// Drops the decision: the next open probes the file again. 0 or the errno.
    public static func reset(fd: Int32) -> Int32 {
        fremovexattr(fd, attribute) == 0 || errno == ENODATA ? 0 : errno
    }

    /// Where a decision for the file at `path` comes from now, for `poolfs format show`.
    public func describe(path: String, fd: Int32) -> String {
        if let declared = domains.format(of: path) { return "\(declared.rawValue) (declared by a libvirt domain)" }
        if let recorded = Self.recorded(fd: fd) {
            return "\(recorded.format.rawValue) (\(recorded.declared ? "declared with poolfs format set" : "probed and recorded"))"
        }
        return "undecided (probed at the next open)"
    }
}

/// The formats libvirt domains declare for their disk files: `<disk type='file'>` with
/// `<driver type=...>` and `<source file=...>`, read from the domain XML directories, again
/// whenever a directory or file changes (checked at most once a second).
final class LibvirtDomainDisks: Sendable {
    private let directories: [String]
    private struct Snapshot {
        var stamp: [String] = []
        var formats: [String: Image.Format] = [:]
        var checkedAt: Double = -1
    }
    private let state = Locked(Snapshot())

    init(directories: [String]) {
        self.directories = directories
    }

    func format(of path: String) -> Image.Format? {
        let formats = current()
        if formats.isEmpty { return nil }
        if let found = formats[path] { return found }
        guard let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return formats[String(cString: resolved)]
    }

    private func current() -> [String: Image.Format] {
        let now = Date().timeIntervalSince1970
        if let fresh = state.withLock({ now - $0.checkedAt < 1 ? $0.formats : nil }) { return fresh }
        let files = directories.flatMap { directory in
            ((try? FileManager.default.contentsOfDirectory(atPath: directory)) ?? [])
                .filter { $0.hasSuffix(".xml") }.sorted().map { directory + "/" + $0 }
        }
        let stamp = files.map { file -> String in
            var st = stat()
            return stat(file, &st) == 0 ? "\(file) \(st.st_ino) \(st.st_mtim.tv_sec).\(st.st_mtim.tv_nsec) \(st.st_size)" : file
        }
        if let same = state.withLock({ $0.stamp == stamp ? $0.formats : nil }) {
            state.withLock { $0.checkedAt = now }
            return same
        }
        var formats: [String: Image.Format] = [:]
        for file in files {
            guard let data = FileManager.default.contents(atPath: file) else { continue }
            for disk in Self.disks(in: data) {
                guard let format = Image.Format(rawValue: disk.format) else { continue }
                formats[disk.file] = format
                if let resolved = realpath(disk.file, nil) {
                    formats[String(cString: resolved)] = format
                    free(resolved)
                }
            }
        }
        state.withLock { $0 = Snapshot(stamp: stamp, formats: formats, checkedAt: now) }
        return formats
    }

    /// The file disks of one domain definition, with their driver types.
    static func disks(in xml: Data) -> [(file: String, format: String)] {
        let reader = DomainDiskReader()
        let parser = XMLParser(data: xml)
        parser.delegate = reader
        parser.shouldResolveExternalEntities = false
        _ = parser.parse()
        return reader.disks
    }
}

/// Collects `<devices><disk><driver type><source file>` from one domain XML.
private final class DomainDiskReader: NSObject, XMLParserDelegate {
    var disks: [(file: String, format: String)] = []
    private var inDisk = false
    private var depthInDisk = 0
    private var format: String?
    private var file: String?

    func parser(_ parser: XMLParser, didStartElement element: String, namespaceURI: String?, qualifiedName: String?,
                attributes: [String: String] = [:]) {
        if inDisk {
            depthInDisk += 1
            // Only the disk's own driver and source, not those of its <backingStore>.
            guard depthInDisk == 1 else { return }
            if element == "driver" { format = attributes["type"] }
            if element == "source" { file = attributes["file"] }
        } else if element == "disk", attributes["type"] == "file" {
            inDisk = true
            depthInDisk = 0
            format = nil
            file = nil
        }
    }

    func parser(_ parser: XMLParser, didEndElement element: String, namespaceURI: String?, qualifiedName: String?) {
        guard inDisk else { return }
        if depthInDisk > 0 {
            depthInDisk -= 1
            return
        }
        if let file, let format { disks.append((file, format)) }
        inDisk = false
    }
}
