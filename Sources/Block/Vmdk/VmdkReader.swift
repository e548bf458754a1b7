/// Opens vmdk images: a sparse file on its own (monolithicSparse, streamOptimized), or a text
/// descriptor whose extents (FLAT, SPARSE, ZERO) are files beside it, opened only through the
/// context under the trust rules; then the parent a `parentFileNameHint` names, checked by CID.
public enum VmdkReader: ImageFormatReader {
    public static var format: Image.Format { .vmdk }

    /// Descriptor types this reader reads from a descriptor file (QEMU also takes the VMFS ones).
    static let descriptorTypes: Set<String> = ["monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"]
    /// QEMU reads a sparse extent's embedded descriptor from at most this many bytes (DESC_SIZE).
    static let embeddedDescriptorLength = 20 * 512

    public static func open(_ context: FormatContext) throws -> FormatOpening {
        let file = context.file
        guard file.size >= 4 else {
            throw Qcow2Error.corrupt("File is too small, not a valid image (\(file.size) bytes)", offset: 0)
        }
        let head = VmdkLittleEndian(bytes: try file.readBytes(at: 0, count: Int(min(file.size, 512))))
        var descriptor: VmdkDescriptor
        var extents: [VmdkDisk.Extent] = []
        var otherFiles: [HostFile] = []
        if head.starts(with: "KDMV") {
            let sparse = try SparseExtent(file: file, cache: context.cache)
            descriptor = try embeddedDescriptor(of: sparse)
            extents = [VmdkDisk.Extent(start: 0, length: sparse.length, kind: .sparse(sparse))]
        } else if head.starts(with: "COWD") {
            throw Qcow2Error.unsupportedFormat("a hosted sparse (COWD) file is read only through the descriptor that names it as a SPARSE extent (QEMU cannot open one alone either: it has no descriptor with a CID)")
        } else {
            let text = try file.readBytes(at: 0, count: Int(min(file.size, UInt64(VmdkDescriptor.maximumLength))))
            descriptor = try VmdkDescriptor.parse(text)
            try checkCreateType(descriptor)
            extents = try openExtents(descriptor, context: context, files: &otherFiles)
        }
        guard let cid = descriptor.cid else {
            throw Qcow2Error.corrupt("descriptor has no CID (QEMU refuses such an image)", offset: 0)
        }
        guard descriptor.parentCID != nil else {
            throw Qcow2Error.corrupt("descriptor has no parentCID (QEMU refuses such an image)", offset: 0)
        }
        let backing = try openParent(descriptor, context: context)
        let disk = VmdkDisk(extents: extents, parent: backing?.live, cid: cid)
        return FormatOpening(live: disk, otherFiles: otherFiles, backing: backing)
    }

    /// The descriptor a sparse file carries, for its CID and parent.
    static func embeddedDescriptor(of sparse: SparseExtent) throws -> VmdkDescriptor {
        let header = sparse.header
        guard header.descriptorOffset != 0,
              let at = vmdkBytes(header.descriptorOffset), at < sparse.file.size,
              let size = vmdkBytes(header.descriptorSize) else {
            throw Qcow2Error.corrupt("sparse header names no embedded descriptor inside the file (descriptorOffset \(header.descriptorOffset) sectors), so the image has no CID", offset: 28)
        }
        let length = min(size, UInt64(embeddedDescriptorLength), sparse.file.size - at)
        return try VmdkDescriptor.parse(try sparse.file.readBytes(at: at, count: Int(length)), base: at)
    }

    /// QEMU's rule for descriptor files: one of the types it knows, and poolfs reads those that
    /// are not VMFS ones.
    static func checkCreateType(_ descriptor: VmdkDescriptor) throws {
        guard let type = descriptor.createType else {
            throw Qcow2Error.corrupt("invalid VMDK image descriptor: no createType", offset: 0)
        }
        if ["vmfs", "vmfsSparse", "seSparse"].contains(type) {
            throw Qcow2Error.unsupportedFormat("vmdk createType '\(type)' (an ESXi VMFS disk) is not supported")
        }
        guard descriptorTypes.contains(type) else {
            throw Qcow2Error.unsupportedFormat("Unsupported image type '\(type)' for a vmdk descriptor file")
        }
    }

    /// The parent a `parentFileNameHint` names, opened as vmdk, whose CID must be the parentCID.
    static func openParent(_ descriptor: VmdkDescriptor, context: FormatContext) throws -> Image? {
        guard let name = descriptor.parentFileNameHint else { return nil }
        guard let parent = try context.openBacking(name, "vmdk parent", .vmdk) else { return nil }
        guard let disk = parent.live as? VmdkDisk else {
            throw Qcow2Error.backing("\(context.file.path): parent \(parent.path) is not a vmdk disk, so it has no CID to check")
        }
        let expected = descriptor.parentCID ?? 0xffff_ffff
        guard disk.cid == expected else {
            throw Qcow2Error.backing("\(context.file.path): parentCID \(hex(expected)) does not match CID \(hex(disk.cid)) of its parent \(parent.path) (the parent changed since the child was made; QEMU reads nothing through it)")
        }
        return parent
    }

    static func hex(_ value: UInt32) -> String {
        let digits = String(value, radix: 16)
        return String(repeating: "0", count: 8 - digits.count) + digits
    }
}
