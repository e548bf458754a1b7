/// The plug-in point of the Block core: every image format other than raw and qcow2 is one
/// `ImageFormatReader` in a folder of its own (Sources/Block/<Format>/), listed in
/// `Image.readers`. A reader turns an opened, already-trusted file into a `BlockDevice`; it opens
/// nothing by path itself: files the image names (extents, parents, backing files) come through
/// the context, which resolves them under the trust rules (docs/security.md).
public protocol ImageFormatReader {
    /// The format this reader reads, by QEMU's name.
    static var format: Image.Format { get }
    /// Opens the image in `context.file`. Throws `Qcow2Error` with a reason a user can act on
    /// ("vhdx with a log that needs replay") when the image cannot be read.
    static func open(_ context: FormatContext) throws -> FormatOpening
}

/// What a reader gets from `Image.open`.
public struct FormatContext {
    /// The image file, opened and checked to be a regular file (or block device).
    public let file: HostFile
    /// The cache shared by every image of the mount: readers keep their tables here
    /// (`BlockCache.Key.Kind.table`) so that memory stays bounded across volumes.
    public let cache: BlockCache
    /// Opens a file the image names that is data of this same image (a vmdk extent), read-only,
    /// beneath the pool or an allowed directory. `what` says what it is, for errors.
    public let openNamedFile: (_ name: String, _ what: String) throws -> HostFile
    /// Opens a backing (parent) image the image names, with its own chain. `format` is the format
    /// the image records for it (nil: probed; a probed backing may name no files of its own).
    /// Returns nil when the caller asked for no backing files (`Options.skipsBacking`): reads
    /// then fall through to zeros.
    public let openBacking: (_ name: String, _ what: String, _ format: Image.Format?) throws -> Image?
    /// Whether this image may name other files at all: false for an image whose format was
    /// probed rather than declared and that sits beneath another image (docs/security.md).
    public let mayNameFiles: Bool
}

/// What a reader opened.
public struct FormatOpening {
    /// The live virtual disk, with `size` the virtual disk size.
    public var live: any BlockDevice
    /// Every host file of this layer other than `context.file` (vmdk extents), so that the
    /// volume is reopened when one changes; the backing image's files come with `backing`.
    public var otherFiles: [HostFile]
    /// The backing image, if the image has one and it was opened.
    public var backing: Image?

    public init(live: any BlockDevice, otherFiles: [HostFile] = [], backing: Image? = nil) {
        self.live = live
        self.otherFiles = otherFiles
        self.backing = backing
    }
}

extension Image {
    /// The formats read by a reader of their own, beside raw and qcow2. A format QEMU knows that
    /// is not listed here is recognised, named, and refused with `Format.unsupportedReason`.
    static let readers: [Format: any ImageFormatReader.Type] = {
        let all: [any ImageFormatReader.Type] = [
            QedReader.self,
            VdiReader.self,
            VhdxReader.self,
            VmdkReader.self,
            VpcReader.self,
        ]
        return Dictionary(uniqueKeysWithValues: all.map { ($0.format, $0) })
    }()
}
