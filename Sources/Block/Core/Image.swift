#if canImport(Glibc)
import Glibc
#endif

/// An opened image file of either format, with its backing chain resolved. This is what the
/// filesystem holds per volume.
public final class Image: Sendable {
    /// Every format QEMU or libvirt recognises by content, by QEMU's name. Raw and qcow2 are
    /// read by the engine itself, the others by a reader in `Image.readers`; a format with no
    /// reader is still detected, kept and named, and refused with `unsupportedReason`.
    public enum Format: String, Sendable, Codable, CaseIterable {
        case raw, qcow2, qcow, qed, vmdk, vdi, vpc, vhdx, parallels, luks, dmg, cloop, bochs
        /// User-Mode Linux copy-on-write: libvirt recognises it; QEMU no longer reads it.
        case cow

        /// Why images of this format cannot be opened, when no reader reads them.
        public var unsupportedReason: String {
            switch self {
            case .qcow: return "qcow (version 1) images are not supported; convert with qemu-img convert -O qcow2"
            case .luks: return "LUKS encrypted images are not supported"
            case .cow: return "UML cow images are not supported (QEMU does not read them either); poolfs does not serve their container bytes as a disk"
            default: return "\(rawValue) images are not supported; poolfs does not serve their container bytes as a disk"
            }
        }
    }

    public struct Options: Sendable {
        /// The deepest backing chain accepted; deeper (or looping) chains are an error.
        public var maxChainDepth = 64
        /// Where files the images name may be opened from; nil: beneath the top image's own
        /// directory only.
        public var policy: TrustPolicy?
        /// Opens no backing file (reads fall through to zeros): for work on the top image alone
        /// (`poolfs snapshot`), which must not depend on files it does not change.
        public var skipsBacking = false
        /// Decides the top file's format when `open` is given none (a dir pool's kept decision,
        /// docs/security.md); nil: probed.
        public var decideFormat: (@Sendable (HostFile) throws -> FormatDecision)?
        public init() {}
    }

    /// A top file's format and whether someone declared it (a libvirt domain, the
    /// administrator) rather than a probe, now or earlier, finding it.
    public struct FormatDecision: Sendable, Equatable {
        public var format: Format
        public var declared: Bool
        public init(format: Format, declared: Bool) {
            self.format = format
            self.declared = declared
        }
    }

    public let path: String
    public let format: Format
    /// Whether the format was declared rather than probed (see `FormatDecision`): writes that
    /// would make a probed raw volume look like another format are refused.
    public let formatDeclared: Bool
    public let qcow2: Qcow2Image?
    /// The live virtual disk.
    public let live: any BlockDevice
    /// The backing image, opened; nil for raw images and qcow2 images without one.
    public let backing: Image?
    /// Permission bits the volume must not show: group or other bits that some lower file of
    /// the chain does not grant (docs/security.md).
    public var hiddenPermissions: mode_t {
        guard let top = hostFiles.first else { return 0 }
        var hidden: mode_t = 0
        for file in hostFiles.dropFirst() {
            if file.mode & S_IROTH == 0 { hidden |= S_IRWXO }
            if file.mode & S_IROTH == 0 && !(file.group == top.group && file.mode & S_IRGRP != 0) { hidden |= S_IRWXG }
        }
        return hidden
    }

    /// Opens `path`, probing the format from the content unless `format` is given (or
    /// `options.decideFormat` decides it). `writable` opens the top file (not its backing files)
    /// for writing too; `makeWriter` then writes into it.
    ///
    /// Every file the images name is opened through `ChainResolver` under `options.policy`, and
    /// must be readable by the top file's owner (writable too, for a data file written).
    public static func open(path: String, format: Format? = nil, cache: BlockCache,
                            options: Options = Options(), writable: Bool = false) throws -> Image {
        var seen: [FileIdentity] = []
        let policy = options.policy ?? TrustPolicy(directories: [absoluteDirectory(of: path)])
        let top = try HostFile(path: path, writable: writable)
        let decision = try format.map { FormatDecision(format: $0, declared: true) }
            ?? options.decideFormat?(top)
            ?? FormatDecision(format: probe(top), declared: false)
        let image = try open(file: top, decision: decision, mayNameFiles: true, cache: cache, options: options,
                             policy: policy, writable: writable, seen: &seen)
        try image.checkChainPermissions(writable: writable)
        return image
    }

    private static func open(file: HostFile, decision: FormatDecision, mayNameFiles: Bool, cache: BlockCache,
                             options: Options, policy: TrustPolicy, writable: Bool = false,
                             seen: inout [FileIdentity]) throws -> Image {
        let path = file.path
        let identity = file.identity
        if seen.contains(where: { $0.device == identity.device && $0.inode == identity.inode }) {
            throw Qcow2Error.backing("\(path) appears twice in its own backing chain (a loop)")
        }
        guard seen.count < options.maxChainDepth else {
            throw Qcow2Error.backing("chain deeper than \(options.maxChainDepth) images at \(path)")
        }
        seen.append(identity)
        switch decision.format {
        case .raw:
            return Image(path: path, format: .raw, formatDeclared: decision.declared, qcow2: nil,
                         live: RawImage(file: file), backing: nil)
        case .qcow2:
            var backingImage: Image?
            var visited = seen
            let image = try Qcow2Image(
                file: file, cache: cache,
                openBacking: { name, formatName in
                    guard mayNameFiles else { throw refuseNamed(path, "backing file") }
                    let format = try formatName.map { try parseFormat($0, for: path) }
                    backingImage = try openBacking(name, what: "backing file", format: format, namedBy: path, cache: cache,
                                                   options: options, policy: policy, seen: &visited)
                    return backingImage?.live
                },
                openDataFile: { name in
                    guard mayNameFiles else { throw refuseNamed(path, "data file") }
                    return try ChainResolver.open(name, what: "data file", namedBy: path, policy: policy, writable: writable)
                })
            seen = visited
            return Image(path: path, format: .qcow2, formatDeclared: decision.declared, qcow2: image,
                         live: image.live, backing: backingImage)
        default:
            let format = decision.format.rawValue
            guard let reader = readers[decision.format] else {
                throw Qcow2Error.unreadable(format: format, why: "\(path): \(decision.format.unsupportedReason)")
            }
            var visited = seen
            let context = FormatContext(
                file: file, cache: cache,
                openNamedFile: { name, what in
                    guard mayNameFiles else { throw refuseNamed(path, what) }
                    return try ChainResolver.open(name, what: what, namedBy: path, policy: policy)
                },
                openBacking: { name, what, format in
                    guard mayNameFiles else { throw refuseNamed(path, what) }
                    return try openBacking(name, what: what, format: format, namedBy: path, cache: cache,
                                           options: options, policy: policy, seen: &visited)
                },
                mayNameFiles: mayNameFiles)
            let opening: FormatOpening
            do {
                opening = try reader.open(context)
            } catch let error as Qcow2Error {
                switch error {
                case .refused, .io, .inUse, .unreadable: throw error
                default: throw Qcow2Error.unreadable(format: format, why: "\(path): \(error)")
                }
            }
            seen = visited
            return Image(path: path, format: decision.format, formatDeclared: decision.declared, qcow2: nil,
                         live: opening.live, backing: opening.backing,
                         hostFiles: [file] + opening.otherFiles + (opening.backing?.hostFiles ?? []))
        }
    }

    private static func refuseNamed(_ path: String, _ what: String) -> Qcow2Error {
        Qcow2Error.refused("\(path) was probed, not declared, and names a \(what): an image whose format was probed may not name other files (set the backing format with qemu-img rebase -F)")
    }

    /// Opens a backing image that the image at `namedBy` names, in `format` (nil: probed, and
    /// then it may name no files of its own). nil when `options.skipsBacking`.
    private static func openBacking(_ name: String, what: String, format: Format?, namedBy path: String, cache: BlockCache,
                                    options: Options, policy: TrustPolicy, seen: inout [FileIdentity]) throws -> Image? {
        if options.skipsBacking { return nil }
        let backingFile = try ChainResolver.open(name, what: what, namedBy: path, policy: policy)
        let decision = try format.map { FormatDecision(format: $0, declared: true) }
            ?? FormatDecision(format: probe(backingFile), declared: false)
        return try open(file: backingFile, decision: decision, mayNameFiles: decision.declared,
                        cache: cache, options: options, policy: policy, seen: &seen)
    }

    private init(path: String, format: Format, formatDeclared: Bool = true, qcow2: Qcow2Image?, live: any BlockDevice,
                 backing: Image?, hostFiles: [HostFile]? = nil) {
        self.path = path
        self.format = format
        self.formatDeclared = formatDeclared
        self.qcow2 = qcow2
        self.live = live
        self.backing = backing
        if let hostFiles {
            self.hostFiles = hostFiles
        } else if let q = qcow2 {
            self.hostFiles = (q.dataFile === q.file ? [q.file] : [q.file, q.dataFile]) + (backing?.hostFiles ?? [])
        } else {
            self.hostFiles = [(live as! RawImage).file]
        }
    }

    /// A raw volume that is not a plain file (an LV read through its extent map): `hostFiles` is
    /// empty, so whoever made the device tells when it changed.
    /// `backing` names what the device reads through beneath (an RBD clone's parent), for
    /// `backing_chain`; the device itself reads it.
    public static func wrapping(_ device: any BlockDevice, path: String, backing: Image? = nil) -> Image {
        Image(path: path, format: .raw, qcow2: nil, live: device, backing: backing, hostFiles: [])
    }

    public var virtualSize: UInt64 { live.size }

    /// The external data file this image's clusters live in, if it has one (as resolved).
    public var dataFilePath: String? {
        guard let q = qcow2, q.dataFile !== q.file else { return nil }
        return q.dataFile.path
    }

    /// Every internal snapshot the table lists, those that cannot be read (with a `problem`)
    /// included, so that they show and say why.
    public var snapshots: [Snapshot] { qcow2?.snapshots ?? [] }

    /// Why entries at the end of the snapshot table could not be read, or nil (see
    /// `Qcow2Image.snapshotTableProblem`).
    public var snapshotTableProblem: String? { qcow2?.snapshotTableProblem }

    /// The view of one internal snapshot; nil for raw images and for a snapshot with a
    /// `problem` (reading it fails with that reason, as loading it fails in QEMU).
    public func device(of snapshot: Snapshot) -> (any BlockDevice)? {
        guard snapshot.problem == nil else { return nil }
        return qcow2?.view(of: snapshot)
    }

    /// This image and every backing file below it, top first.
    public var chain: [Image] {
        var images: [Image] = [self]
        while let next = images.last?.backing { images.append(next) }
        return images
    }

    /// Every host file the volume reads from, top first (images and external data files), so a
    /// caller can tell when any of them changed.
    public let hostFiles: [HostFile]

    /// The format of `file` by its content, as QEMU probes it (`FormatMagic`): raw when the file
    /// is empty or no format QEMU or libvirt knows is recognised. A recognised format is returned
    /// even when poolfs has no reader for it, so that the decision is kept; opening it then fails
    /// with its reason.
    public static func probe(_ file: HostFile) throws -> Format {
        guard file.size > 0 else { return .raw }
        let head = try file.readBytes(at: 0, count: Int(min(file.size, UInt64(FormatMagic.probeLength))))
        var name = FormatMagic.formatName(ofFirstBytes: head, fileName: file.path)
        if name == nil, file.size >= 512 {
            name = FormatMagic.formatName(ofLastSector: try file.readBytes(at: file.size - 512, count: 512), fileSize: file.size)
        }
        guard let name else { return .raw }
        guard let format = Format(rawValue: name) else {
            throw Qcow2Error.unsupportedFormat("\(file.path): \(name) images are not supported; poolfs does not serve their container bytes as a disk")
        }
        return format
    }

    static func parseFormat(_ name: String, for path: String) throws -> Format {
        guard let format = Format(rawValue: name) else {
            throw Qcow2Error.backing("\(path): backing format '\(name)' is not a format poolfs knows")
        }
        return format
    }

    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }
}

extension Image {
    /// The directory of `path`, made absolute against the working directory.
    static func absoluteDirectory(of path: String) -> String {
        let directory = directory(of: path)
        if directory.hasPrefix("/") { return directory }
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard getcwd(&buffer, buffer.count) != nil else { return directory }
        let cwd = String(cString: buffer)
        return directory == "." ? cwd : cwd + "/" + directory
    }

    /// The permission rule (docs/security.md): every other file of the chain must be readable by
    /// the top file's owner, and a data file written also writable; and the volume shows no
    /// group or other permission that some lower file does not grant that class.
    func checkChainPermissions(writable: Bool) throws {
        guard let top = hostFiles.first else { return }
        let lower = hostFiles.dropFirst()
        let owner = FileOwner(uid: top.owner)
        for file in lower where !owner.may(.read, file) || (writable && file.writable && !owner.may(.write, file)) {
            let how = writable && file.writable ? "readable and writable" : "readable"
            throw Qcow2Error.refused("\(file.path) (in the chain of \(path)) is not \(how) by the image's owner (uid \(top.owner)), so the image may not show it")
        }
    }
}

/// A user as the kernel checks file permissions for them: uid, primary and supplementary groups.
struct FileOwner {
    enum Access { case read, write }
    let uid: uid_t
    let groups: [gid_t]

    init(uid: uid_t) {
        self.uid = uid
        var groups: [gid_t] = []
        var entry = passwd()
        var result: UnsafeMutablePointer<passwd>?
        var buffer = [CChar](repeating: 0, count: 16384)
        if getpwuid_r(uid, &entry, &buffer, buffer.count, &result) == 0, let found = result {
            var count: Int32 = 64
            var list = [gid_t](repeating: 0, count: Int(count))
            if getgrouplist(found.pointee.pw_name, found.pointee.pw_gid, &list, &count) >= 0 {
                groups = Array(list.prefix(Int(count)))
            } else {
                groups = [found.pointee.pw_gid]
            }
        }
        self.groups = groups
    }

    func may(_ access: Access, _ file: HostFile) -> Bool {
        if uid == 0 { return true }
        let bits: (user: mode_t, group: mode_t, other: mode_t) = access == .read ? (S_IRUSR, S_IRGRP, S_IROTH) : (S_IWUSR, S_IWGRP, S_IWOTH)
        if file.owner == uid { return file.mode & bits.user != 0 }
        if groups.contains(file.group) { return file.mode & bits.group != 0 }
        return file.mode & bits.other != 0
    }
}
