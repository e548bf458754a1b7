/// An opened image file of either format, with its backing chain resolved. This is what the
/// filesystem holds per volume.
public final class Image: Sendable {
    public enum Format: String, Sendable, Codable {
        case qcow2, raw
    }

    public struct Options: Sendable {
        /// The deepest backing chain accepted; deeper (or looping) chains are an error.
        public var maxChainDepth = 64
        public init() {}
    }

    public let path: String
    public let format: Format
    public let qcow2: Qcow2Image?
    /// The live virtual disk.
    public let live: any BlockDevice
    /// The backing image, opened; nil for raw images and qcow2 images without one.
    public let backing: Image?

    /// Opens `path`, probing the format from the content (qcow2 by magic, otherwise raw) unless
    /// `format` is given. `writable` opens the top file (not its backing files) for writing too;
    /// `makeWriter` then writes into it.
    public static func open(path: String, format: Format? = nil, cache: BlockCache,
                            options: Options = Options(), writable: Bool = false) throws -> Image {
        var seen: [FileIdentity] = []
        return try open(path: path, format: format, cache: cache, options: options, writable: writable, seen: &seen)
    }

    private static func open(path: String, format: Format?, cache: BlockCache, options: Options,
                             writable: Bool = false, seen: inout [FileIdentity]) throws -> Image {
        let file = try HostFile(path: path, writable: writable)
        let identity = file.identity
        if seen.contains(where: { $0.device == identity.device && $0.inode == identity.inode }) {
            throw Qcow2Error.backing("\(path) appears twice in its own backing chain (a loop)")
        }
        guard seen.count < options.maxChainDepth else {
            throw Qcow2Error.backing("chain deeper than \(options.maxChainDepth) images at \(path)")
        }
        seen.append(identity)
        let resolved = try format ?? probe(file)
        switch resolved {
        case .raw:
            return Image(path: path, format: .raw, qcow2: nil, live: RawImage(file: file), backing: nil)
        case .qcow2:
            var backingImage: Image?
            let directory = Self.directory(of: path)
            var visited = seen
            let image = try Qcow2Image(
                file: file, cache: cache,
                openBacking: { name, formatName in
                    let backingPath = try resolveBacking(name, relativeTo: directory)
                    let backingFormat = try formatName.map { try parseFormat($0, for: backingPath) }
                    let opened = try open(path: backingPath, format: backingFormat, cache: cache,
                                          options: options, seen: &visited)
                    backingImage = opened
                    return opened.live
                },
                openDataFile: { name in
                    try HostFile(path: name.hasPrefix("/") ? name : directory + "/" + name, writable: writable)
                })
            seen = visited
            return Image(path: path, format: .qcow2, qcow2: image, live: image.live, backing: backingImage)
        }
    }

    private init(path: String, format: Format, qcow2: Qcow2Image?, live: any BlockDevice, backing: Image?,
                 hostFiles: [HostFile]? = nil) {
        self.path = path
        self.format = format
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

    public var snapshots: [Snapshot] { qcow2?.snapshots ?? [] }

    /// The view of one internal snapshot; nil for raw images.
    public func device(of snapshot: Snapshot) -> (any BlockDevice)? {
        qcow2?.view(of: snapshot)
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

    static func probe(_ file: HostFile) throws -> Format {
        guard file.size >= 4 else { return .raw }
        let magic = BigEndianReader(bytes: try file.readBytes(at: 0, count: 4)).u32(0)
        return magic == Header.magic ? .qcow2 : .raw
    }

    static func parseFormat(_ name: String, for path: String) throws -> Format {
        guard let format = Format(rawValue: name) else {
            throw Qcow2Error.backing("\(path): backing format '\(name)' is not supported (qcow2 or raw)")
        }
        return format
    }

    static func resolveBacking(_ name: String, relativeTo directory: String) throws -> String {
        if name.hasPrefix("json:") || (name.contains("://")) {
            throw Qcow2Error.backing("backing file '\(name)' is not a local file")
        }
        return name.hasPrefix("/") ? name : directory + "/" + name
    }

    static func directory(of path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        return slash == path.startIndex ? "/" : String(path[..<slash])
    }
}
