/// Reads VHD images (QEMU's "vpc"): fixed disks (data, then the footer) and dynamic disks (a
/// BAT of blocks, each a sector bitmap then the data). Read-only; differencing disks are
/// refused (docs/formats/vpc.md).
public enum VpcReader: ImageFormatReader {
    public static var format: Image.Format { .vpc }

    public static func open(_ context: FormatContext) throws -> FormatOpening {
        let file = context.file
        let (footer, atStart) = try readFooter(file)
        let size = footer.virtualSectors * 512
        switch (VpcFooter.DiskType(rawValue: footer.diskType), atStart) {
        case (.fixed?, false):
            return FormatOpening(live: VpcFixedImage(file: file, size: size))
        case (.dynamic?, true):
            let header = try VpcDynamicHeader.parse(file, at: footer.dataOffset, virtualSize: size)
            let bat = VpcBat(file: file, cache: context.cache, offset: header.tableOffset,
                             entries: UInt64(header.maxTableEntries))
            try bat.checkInsideFile(bitmapSize: header.bitmapSize, blockSize: UInt64(header.blockSize))
            return FormatOpening(live: VpcDynamicImage(file: file, size: size, bat: bat,
                                                       blockSize: UInt64(header.blockSize), bitmapSize: header.bitmapSize))
        case (.differencing?, _):
            throw Qcow2Error.unsupportedFormat("vhd differencing disks (disk type 4) are not supported: QEMU reads them without their parent, and poolfs does not serve that")
        case (.fixed?, true), (.dynamic?, false):
            throw Qcow2Error.corrupt("footer disk type \(footer.diskType) does not match where the footer is: \(atStart ? "a copy at byte 0 (dynamic)" : "only at the end of the file (fixed)")", offset: 60)
        case (nil, _):
            throw Qcow2Error.corrupt("footer disk type \(footer.diskType) is not fixed (2), dynamic (3) or differencing (4)", offset: 60)
        }
    }

    /// The footer: the copy at byte 0 for dynamic disks, else the last 512 bytes (fixed disks),
    /// as QEMU looks for it.
    static func readFooter(_ file: HostFile) throws -> (VpcFooter, atStart: Bool) {
        guard file.size >= UInt64(VpcFooter.size) else {
            throw Qcow2Error.corrupt("File too small for a VHD header (\(file.size) bytes)", offset: 0)
        }
        let head = try file.readBytes(at: 0, count: VpcFooter.size)
        if head.starts(with: VpcFooter.cookie) { return (try VpcFooter.parse(head, at: 0), true) }
        let at = file.size - UInt64(VpcFooter.size)
        let tail = try file.readBytes(at: at, count: VpcFooter.size)
        guard tail.starts(with: VpcFooter.cookie) else {
            throw Qcow2Error.corrupt("invalid VPC image: no \"conectix\" footer at byte 0 or in the last 512 bytes", offset: at)
        }
        return (try VpcFooter.parse(tail, at: at), false)
    }
}

/// A fixed VHD: the disk is the file's first `size` bytes (QEMU reads past the footer, and
/// zeros past the end of the file, when the footer claims more).
final class VpcFixedImage: BlockDevice {
    let file: HostFile
    let size: UInt64

    init(file: HostFile, size: UInt64) {
        self.file = file
        self.size = size
    }

    func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        plan.appendHost(file, offset: offset, length: length)
    }

    /// QEMU reports a fixed disk as data that recurses into the file: holes are data that reads
    /// as zero.
    func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        appendHostStatus(file, guest: offset, host: offset, length: length, depth: 0, holeIsData: true, into: &extents)
    }
}
