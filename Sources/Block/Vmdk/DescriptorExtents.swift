/// The extents of a descriptor file, opened and checked: each covers exactly the sectors its line
/// declares, and they lie end to end from sector 0 to the disk's size.
extension VmdkReader {
    static func openExtents(_ descriptor: VmdkDescriptor, context: FormatContext,
                            files: inout [HostFile]) throws -> [VmdkDisk.Extent] {
        var extents: [VmdkDisk.Extent] = []
        var start: UInt64 = 0
        for line in descriptor.extents {
            guard line.access == "RW" else {
                // QEMU skips such lines (moving the extents after them); VMware reads them.
                throw Qcow2Error.unsupportedFormat("vmdk extent with access \(line.access) (at byte \(line.position) of the descriptor) is not supported: QEMU ignores such extents and VMware reads them, so the disk would not be the same")
            }
            guard line.sectors > 0 else { continue }  // QEMU skips empty extents too
            guard let length = vmdkBytes(line.sectors), length <= (UInt64(1) << 63) - start else {
                throw Qcow2Error.corrupt("extents add up to more than 2^63 bytes (extent line at byte \(line.position))", offset: line.position)
            }
            let kind = try openExtent(line, length: length, context: context, files: &files)
            extents.append(VmdkDisk.Extent(start: start, length: length, kind: kind))
            start += length
        }
        guard !extents.isEmpty else {
            throw Qcow2Error.corrupt("invalid VMDK image descriptor: it names no extents", offset: 0)
        }
        return extents
    }

    private static func openExtent(_ line: VmdkDescriptor.Extent, length: UInt64, context: FormatContext,
                                   files: inout [HostFile]) throws -> VmdkDisk.Kind {
        func named() throws -> HostFile {
            guard let name = line.fileName else {
                throw Qcow2Error.corrupt("Invalid extent line: \(line.type) extent without a file name", offset: line.position)
            }
            let file = try context.openNamedFile(name, "vmdk extent")
            files.append(file)
            return file
        }
        switch line.type {
        case "ZERO":
            guard line.fileName == nil else {
                throw Qcow2Error.corrupt("Invalid extent line: a ZERO extent names a file", offset: line.position)
            }
            return .zero
        case "FLAT":
            guard let offset = line.offset, let base = vmdkBytes(offset) else {
                throw Qcow2Error.corrupt("Invalid extent line: FLAT extent without a valid offset", offset: line.position)
            }
            let file = try named()
            guard base <= file.size, length <= file.size - base else {
                throw Qcow2Error.corrupt("flat extent \(file.path) has \(file.size) bytes, fewer than the \(length) bytes from byte \(base) that the descriptor declares", offset: line.position)
            }
            return .flat(file, offset: base)
        case "SPARSE":
            guard line.offset == nil else {
                throw Qcow2Error.corrupt("Invalid extent line: a SPARSE extent has an offset", offset: line.position)
            }
            let sparse = try SparseExtent(file: try named(), cache: context.cache)
            guard sparse.length == length else {
                throw Qcow2Error.corrupt("sparse extent \(sparse.file.path) holds \(sparse.header.capacity) sectors, but the descriptor declares \(line.sectors)", offset: line.position)
            }
            return .sparse(sparse)
        case "VMFS", "VMFSSPARSE", "SESPARSE", "VMFSRDM", "VMFSRAW":
            throw Qcow2Error.unsupportedFormat("vmdk extent type \(line.type) (an ESXi VMFS extent) is not supported")
        default:
            throw Qcow2Error.unsupportedFormat("vmdk extent type '\(line.type.prefix(40))' is not supported")
        }
    }
}
