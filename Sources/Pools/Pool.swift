#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Block

/// A storage pool: where its volumes are and how to list them.
public protocol Pool: Sendable {
    /// What the pool is called in messages: its directory, volume group or dataset.
    var displayName: String { get }
    /// Where statfs looks for sizes.
    var statisticsPath: String { get }
    /// The names of the pool's volumes now, sorted.
    func volumeNames() throws -> [String]
    /// What volume `name` stands for now, without opening it: its file (if it has one) and its
    /// attributes; nil if the pool has no such volume now.
    func volume(_ name: String) -> PoolVolume?
    /// Opens a volume. Directory pools probe the file's format; LVM pools read raw devices.
    func openImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image
    /// Opens the volume with its top file writable (`-o rw`); pools that cannot be written refuse.
    func openWritableImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image
    /// Where writes to a volume opened by `openWritableImage` go.
    func makeWriter(_ name: String, image: Image) throws -> any VolumeWriter
    /// Why `-o rw` cannot write this pool; nil when it can.
    var writeRefusal: String? { get }
    /// Why the pool shows no volumes although it may hold some (a disk whose partition table
    /// cannot be read), said once at mount and by `poolfs ls`; nil when nothing is wrong.
    var problem: String? { get }
    /// Changes whenever the volume's layout changes in ways its attributes cannot show (an LV
    /// extended or moved); nil when the attributes say it all.
    func generation(of name: String) -> String?
    /// Snapshots the pool keeps as volumes of their own (LVM, ZFS), shown beside qcow2's.
    func snapshots(of name: String) -> [PoolSnapshot]
    /// What the pool knows of a volume beyond its image (a partition's type and start sector, a
    /// LUN's serial), as (key, value): shown as `user.poolfs.KEY` and in `poolfs ls --json`.
    func properties(of name: String) -> [(key: String, value: String)]
    /// Runs before mounting: changes the pool needs for the time of the mount (ZFS snapshot
    /// devices made visible). A failure leaves nothing changed.
    func prepare() throws
    /// Runs after unmounting (and when mounting fails): undoes what `prepare` and reading did
    /// (LVs activated, properties changed), logging rather than throwing what cannot be undone.
    func release() -> [String]
    /// Whether a mount lets a volume go (closing its descriptors) when the last handle on it
    /// closes, rather than keeping it for the next open: an LV whose device a mount keeps open is
    /// in use to lvm2, which then defers merges and refuses renames and removals.
    var closesIdleVolumes: Bool { get }
    /// Why `poolfs snapshot` cannot work on this pool; nil when it can.
    var snapshotRefusal: String? { get }
    /// One snapshot operation on one volume (PoolSnapshotting.swift): returns when done (in a
    /// dry run, when it could be done now), throws `SnapshotSkip` when the volume was left alone
    /// for a reason, any other error when it failed.
    func snapshot(_ operation: SnapshotOperation, _ name: String, of volume: String, dryRun: Bool) throws
    /// `snapshot`, leaving to the caller what can wait until the other volumes are done: the
    /// holes of a dir pool's freed clusters (the volume stays locked until they are punched).
    /// nil when nothing waits; the default runs `snapshot`.
    func snapshotLeavingPunch(_ operation: SnapshotOperation, _ name: String, of volume: String, dryRun: Bool) throws -> PendingPunch?
}

extension Pool {
    /// Images of pools whose volumes are not files in a directory may name no other file.
    public func openImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        guard let path = volume.path else { throw PoolError.notFound(name) }
        var options = Image.Options()
        options.policy = .nothing
        return try Image.open(path: path, cache: cache, options: options)
    }
    public func openWritableImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        throw Qcow2Error.writeRefused("\(displayName): writing is supported in dir pools only")
    }
    public func makeWriter(_ name: String, image: Image) throws -> any VolumeWriter { try image.makeWriter() }
    public var writeRefusal: String? {
        "\(displayName) cannot be written: dir, disk and iSCSI pools can, and LVM pools through device-mapper (not with noactivate, nor on a kernel without it); use -o cow for a writable view"
    }
    public var problem: String? { nil }
    public var closesIdleVolumes: Bool { false }
    public func generation(of name: String) -> String? { nil }
    public func snapshots(of name: String) -> [PoolSnapshot] { [] }
    public func properties(of name: String) -> [(key: String, value: String)] { [] }
    public func prepare() throws {}
    public func release() -> [String] { [] }
}

/// What a pool says of one volume without opening it.
///
/// Volumes that are files (images in a directory, LV and zvol devices) have a `path`, and their
/// attributes are its stat. Volumes that have no file on this host (iSCSI LUNs, RBD images) have
/// none: the pool makes up their attributes, and an `st_dev`/`st_ino` that stays the same while
/// the name stands for the same volume, and changes when it comes to stand for another.
public struct PoolVolume: Sendable {
    /// The file or device the volume is read through, opened, locked and checked against.
    public var path: String?
    /// Mode, owner and times shown for the volume, and its identity (`st_dev`, `st_ino`, size,
    /// times: any change means the volume changed).
    public var status: stat

    public init(path: String?, status: stat) {
        self.path = path
        self.status = status
    }

    /// The volume that is the file at `path` now; nil when it cannot be stat'ed.
    public init?(path: String) {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        self.init(path: path, status: st)
    }

    public var identity: FileIdentity { FileIdentity(status) }
}

/// A snapshot that is a volume of the pool (an LVM snapshot LV, a ZFS snapshot).
public struct PoolSnapshot: Sendable {
    public var name: String
    /// When it was taken, if the pool says (RBD): the snapshot file's times.
    public var date: timespec?
    /// Opens the snapshot's device; throws with a message a user can act on when it cannot be read.
    public var open: @Sendable () throws -> any BlockDevice

    public init(name: String, date: timespec? = nil, open: @escaping @Sendable () throws -> any BlockDevice) {
        self.name = name
        self.date = date
        self.open = open
    }
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
        case .unsupportedType(let type): return "pool type '\(type)' is not supported yet (supported: dir, fs, netfs, logical, zfs, disk, iscsi, iscsi-direct, rbd)"
        case .libvirt(let why): return why
        }
    }
}

/// A libvirt `dir` pool: every regular file in one directory is a volume, named as the file is.
public struct DirectoryPool: Pool {
    public let path: String
    public var displayName: String { path }
    public var statisticsPath: String { path }
    /// Not volumes. A file named as one of the tree's directories is one, shown under an escaped
    /// name (PoolFS's TreeNames).
    static let reserved: Set<String> = [".", ".."]

    /// Where files the images name may be opened from: this directory and `backing_dirs=`.
    public let policy: TrustPolicy
    public let formats: FormatDecisions

    public init(path: String, trust: PoolTrust = PoolTrust()) throws {
        var st = stat()
        guard stat(path, &st) == 0 else { throw PoolError.notFound(path) }
        guard st.st_mode & S_IFMT == S_IFDIR else { throw PoolError.notADirectory(path) }
        // Absolute, because a daemonized mount runs in /.
        guard let resolved = realpath(path, nil) else { throw PoolError.notFound(path) }
        self.path = String(cString: resolved)
        free(resolved)
        policy = TrustPolicy(directories: [self.path] + trust.backingDirectories)
        formats = FormatDecisions(domainDirectories: trust.domainDirectories, warn: trust.warn)
    }

    public var writeRefusal: String? { nil }

    /// How images are opened: names beneath `policy`, formats decided once (FormatDecisions).
    public var imageOptions: Image.Options {
        var options = Image.Options()
        options.policy = policy
        let formats = formats
        let policy = policy
        options.decideFormat = { file in
            // The file opened, wherever a symbolic link in the pool led, must lie in the pool
            // (or an allowed directory) before anything is read from it or recorded on it.
            guard let opened = file.openedPath, policy.root(of: opened) != nil else {
                throw Qcow2Error.refused("\(file.path) leads outside the pool through a symbolic link")
            }
            return try formats.decide(file)
        }
        return options
    }

    public func openImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        guard let path = volume.path else { throw PoolError.notFound(name) }
        return try Image.open(path: path, cache: cache, options: imageOptions)
    }

    public func openWritableImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        guard let path = volume.path else { throw PoolError.notFound(name) }
        return try Image.open(path: path, cache: cache, options: imageOptions, writable: true)
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
        let extents = vmdkExtentNames(among: names)
        return names.filter { !extents.contains($0) }.sorted()
    }

    /// The regular file `name` in the directory (a symbolic link to one included), as stat says.
    public func volume(_ name: String) -> PoolVolume? {
        guard !Self.reserved.contains(name), !name.utf8.contains(UInt8(ascii: "/")),
              let volume = PoolVolume(path: path + "/" + name), volume.status.st_mode & S_IFMT == S_IFREG else { return nil }
        return volume
    }

    private func isRegular(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && st.st_mode & S_IFMT == S_IFREG
    }
}

/// What a mount trusts beyond the pool (docs/security.md): directories outside it where files
/// that images name may be opened (`-o backing_dirs=`), and where libvirt's domain definitions,
/// whose disks declare formats, are.
public struct PoolTrust: Sendable {
    public var backingDirectories: [String] = []
    public var domainDirectories: [String] = FormatDecisions.defaultDomainDirectories
    /// Where a warning goes (the mount's log).
    public var warn: @Sendable (String) -> Void = { _ in }
    public init() {}
}

/// What the user named on the command line: a directory, or the name of a libvirt pool whose
/// definition (/etc/libvirt/storage/NAME.xml) gives its type and target path.
public enum PoolSource {
    public static let libvirtStorageDirectory = "/etc/libvirt/storage"

    public static func open(_ source: String, type: String?,
                            libvirtDirectory: String = libvirtStorageDirectory,
                            secretsDirectory: String = LibvirtSecretStore.defaultDirectory,
                            runner: any CommandRunner = SystemCommandRunner(),
                            lvmMode: LogicalPool.Mode = LogicalPool.Mode.forThisHost(noactivate: false),
                            writable: Bool = false, lvmCowSize: LogicalPool.CowSize = .default,
                            iscsi: ISCSIPool.Options = ISCSIPool.Options(),
                            rbd: RBDPool.Options = RBDPool.Options(),
                            trust: PoolTrust = PoolTrust()) throws -> any Pool {
        var path = source
        var resolvedType = type
        var iscsi = iscsi
        iscsi.writable = writable
        var rbd = rbd
        rbd.writable = writable
        if type == nil, source.hasPrefix("iscsi://") { resolvedType = "iscsi" }
        if type != "logical", type != "zfs", type != "rbd", !source.contains("/"), !FileManager.default.fileExists(atPath: source) {
            let definition = libvirtDirectory + "/" + source + ".xml"
            guard let xml = try? String(contentsOfFile: definition, encoding: .utf8) else {
                throw PoolError.notFound("\(source) (no such directory, and no libvirt pool definition \(definition))")
            }
            let parsed = try parseLibvirt(xml, file: definition)
            path = parsed.path
            if parsed.type == "disk" {
                // A disk pool's target path is where the partitions' nodes are (/dev); its disk
                // is the source device.
                guard let device = parsed.device else { throw PoolError.libvirt("\(definition): a disk pool with no <source><device path=...>") }
                path = device
            }
            if let type, type != parsed.type {
                throw PoolError.libvirt("libvirt pool \(source) has type '\(parsed.type)', not '\(type)'")
            }
            resolvedType = parsed.type
            if parsed.type == "iscsi" || parsed.type == "iscsi-direct" {
                let target = try parseLibvirtISCSI(xml, file: definition)
                path = target.url
                iscsi.initiator = iscsi.initiator ?? target.initiator
                iscsi.chapUser = iscsi.chapUser ?? target.chapUser
                // -o chap_secret_file wins; else the secret the definition names, from libvirt's store.
                if iscsi.chapUser != nil, iscsi.chapSecret == nil {
                    guard let reference = LibvirtSecretStore.reference(inPool: xml) else {
                        throw PoolError.libvirt("libvirt pool \(source) uses CHAP but names no <secret> in its <auth>: give the secret with -o chap_secret_file=PATH")
                    }
                    let value = try LibvirtSecretStore(directory: secretsDirectory).value(reference, usage: .iscsi, pool: source)
                    guard let text = String(data: value, encoding: .utf8) else {
                        throw PoolError.libvirt("libvirt pool \(source): its CHAP secret in \(secretsDirectory) is not text")
                    }
                    iscsi.chapSecret = text
                }
            }
            if parsed.type == "rbd" {
                let rbdSource = try parseLibvirtRBD(xml, file: definition)
                path = rbdSource.pool
                rbd.monHost = rbd.monHost ?? rbdSource.monHost
                rbd.id = rbd.id ?? rbdSource.user
                // With no -o keyring, the cephx key of the secret the definition names. A cluster
                // may need none (or the Ceph conf names a keyring), so a secret that cannot be had
                // is said only if connecting fails.
                if rbd.keyring == nil, let reference = LibvirtSecretStore.reference(inPool: xml) {
                    do {
                        // librados takes the key as libvirt gives it: the value, base64.
                        rbd.key = try LibvirtSecretStore(directory: secretsDirectory).value(reference, usage: .ceph, pool: source).base64EncodedString()
                    } catch {
                        rbd.keyProblem = "\(error)"
                    }
                }
            }
        }
        switch resolvedType ?? "dir" {
        case "dir", "fs", "netfs":
            return try DirectoryPool(path: path, trust: trust)
        case "logical":
            // libvirt's target path of a logical pool is /dev/VGNAME.
            let vg = path.split(separator: "/").last.map(String.init) ?? path
            return try LogicalPool(volumeGroup: vg, runner: runner, mode: lvmMode, writable: writable, cowSize: lvmCowSize)
        case "disk":
            return try DiskPool(source: path)
        case "zfs":
            // libvirt's target path of a zfs pool is /dev/zvol/POOL[/DATASET].
            let dataset = path.hasPrefix("/dev/zvol/") ? String(path.dropFirst("/dev/zvol/".count)) : path
            return try ZfsPool(dataset: dataset, runner: runner)
        case "iscsi", "iscsi-direct":
            return try ISCSIPool(url: path, options: iscsi)
        case "rbd":
            return try RBDPool(spec: path, options: rbd)
        case let other:
            throw PoolError.unsupportedType(other)
        }
    }

    /// The first group of the first match of `pattern` in a pool definition, `.` matching newlines.
    static func firstMatch(_ pattern: String, in xml: String) -> String? {
        guard let regex = try? NSRegularExpression(pattern: pattern, options: [.dotMatchesLineSeparators]),
              let match = regex.firstMatch(in: xml, range: NSRange(xml.startIndex..., in: xml)),
              let range = Range(match.range(at: 1), in: xml) else { return nil }
        return String(xml[range])
    }

    /// The pool's type attribute, its `<target><path>` and its `<source><device path=...>`.
    static func parseLibvirt(_ xml: String, file: String) throws -> (type: String, path: String, device: String?) {
        func firstMatch(_ pattern: String) -> String? { Self.firstMatch(pattern, in: xml) }
        guard let type = firstMatch(#"<pool\s[^>]*type\s*=\s*['"]([^'"]+)['"]"#) else {
            throw PoolError.libvirt("\(file): no <pool type=...>")
        }
        let device = firstMatch(#"<source>.*?<device\s[^>]*path\s*=\s*['"]([^'"]+)['"]"#)
        // A disk pool's disk is its source device; an iscsi-direct pool has no target path (its
        // source says it all: parseLibvirtISCSI).
        guard let path = firstMatch(#"<target>.*?<path>\s*([^<]*?)\s*</path>"#) ?? (type == "disk" ? device : type.hasPrefix("iscsi") || type == "rbd" ? "" : nil) else {
            throw PoolError.libvirt("\(file): no <target><path>")
        }
        return (type, path, device)
    }

    /// An `iscsi` or `iscsi-direct` pool's `<source>`: `<host name= port=/>`, `<device path='IQN'/>`,
    /// `<initiator><iqn name=/></initiator>` and `<auth type='chap' username=...>`, as an
    /// `iscsi://HOST:PORT/IQN` URL and the options it implies.
    static func parseLibvirtISCSI(_ xml: String, file: String) throws -> (url: String, initiator: String?, chapUser: String?) {
        func firstMatch(_ pattern: String) -> String? { Self.firstMatch(pattern, in: xml) }
        guard let host = firstMatch(#"<source>.*?<host\s[^>]*name\s*=\s*['"]([^'"]+)['"]"#) else {
            throw PoolError.libvirt("\(file): no <source><host name=...>")
        }
        guard let device = firstMatch(#"<source>.*?<device\s[^>]*path\s*=\s*['"]([^'"]+)['"]"#) else {
            throw PoolError.libvirt("\(file): no <source><device path=...> (the target IQN)")
        }
        let port = firstMatch(#"<source>.*?<host\s[^>]*port\s*=\s*['"]([0-9]+)['"]"#) ?? "3260"
        let initiator = firstMatch(#"<initiator>.*?<iqn\s[^>]*name\s*=\s*['"]([^'"]+)['"]"#)
        let chapUser = firstMatch(#"<auth\s[^>]*type\s*=\s*['"]chap['"][^>]*username\s*=\s*['"]([^'"]+)['"]"#)
            ?? firstMatch(#"<auth\s[^>]*username\s*=\s*['"]([^'"]+)['"][^>]*type\s*=\s*['"]chap['"]"#)
        let bracketed = host.contains(":") ? "[\(host)]" : host
        return ("iscsi://\(bracketed):\(port)/\(device)", initiator, chapUser)
    }

    /// An `rbd` pool's `<source>`: `<name>POOL[/NAMESPACE]</name>`, `<host name= port=/>` (each a monitor) and
    /// `<auth username= type='ceph'>`. Its secret is looked up in libvirt's store (LibvirtSecretStore) unless a keyring is given.
    static func parseLibvirtRBD(_ xml: String, file: String) throws -> (pool: String, monHost: String?, user: String?) {
        func firstMatch(_ pattern: String) -> String? { Self.firstMatch(pattern, in: xml) }
        guard let name = firstMatch(#"<source>.*?<name>\s*([^<]*?)\s*</name>"#), !name.isEmpty else {
            throw PoolError.libvirt("\(file): no <source><name> (the Ceph pool)")
        }
        var hosts: [String] = []
        if let regex = try? NSRegularExpression(pattern: #"<host\s([^>]*)/?>"#) {
            for match in regex.matches(in: xml, range: NSRange(xml.startIndex..., in: xml)) {
                guard let range = Range(match.range(at: 1), in: xml) else { continue }
                let attributes = String(xml[range])
                guard let host = Self.firstMatch(#"name\s*=\s*['"]([^'"]+)['"]"#, in: attributes) else { continue }
                let port = Self.firstMatch(#"port\s*=\s*['"]([0-9]+)['"]"#, in: attributes)
                let bracketed = host.contains(":") ? "[\(host)]" : host
                hosts.append(port.map { "\(bracketed):\($0)" } ?? bracketed)
            }
        }
        let user = firstMatch(#"<auth\s[^>]*username\s*=\s*['"]([^'"]+)['"]"#)
        return (name, hosts.isEmpty ? nil : hosts.joined(separator: ","), user)
    }
}
