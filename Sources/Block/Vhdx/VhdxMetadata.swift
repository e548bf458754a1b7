/// The metadata region: a 64 KiB table of items (GUID, offset within the region, length,
/// flags), then the items. poolfs needs the five QEMU requires: file parameters, virtual disk
/// size, page 83 data, logical and physical sector size. Every item must lie inside the region.
struct VhdxMetadata: Sendable {
    static let tableBytes = 64 << 10
    static let signature = Array("metadata".utf8)
    static let fileParameters = VhdxGUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
    static let virtualDiskSize = VhdxGUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
    static let page83 = VhdxGUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
    static let logicalSectorSize = VhdxGUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
    static let physicalSectorSize = VhdxGUID("CDA348C7-445D-4471-9CC9-E9885251C556")
    static let parentLocator = VhdxGUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
    static let required: [(VhdxGUID, String, Int)] = [
        (fileParameters, "file parameters", 8), (virtualDiskSize, "virtual disk size", 8), (page83, "page 83 data", 16),
        (logicalSectorSize, "logical sector size", 4), (physicalSectorSize, "physical sector size", 4),
    ]
    static let minBlockSize: UInt32 = 1 << 20
    static let maxBlockSize: UInt32 = 256 << 20
    static let maxVirtualSize: UInt64 = 64 << 40

    var blockSize: UInt32
    var leaveBlocksAllocated: Bool
    var virtualDiskSize: UInt64
    var logicalSectorSize: UInt32
    var physicalSectorSize: UInt32
    var page83: VhdxGUID

    static func parse(_ file: HostFile, region: VhdxRegions.Region) throws(Qcow2Error) -> VhdxMetadata {
        guard region.length >= UInt64(tableBytes) else {
            throw .corrupt("metadata region of \(region.length) bytes is smaller than its 64 KiB table", offset: region.offset)
        }
        let table = try file.readBytes(at: region.offset, count: tableBytes)
        guard table.starts(with: signature) else { throw .corrupt("metadata table has no \"metadata\" signature", offset: region.offset) }
        let count = Int(VhdxFields(table).u16(10))
        guard count * 32 <= tableBytes - 32 else { throw .corrupt("metadata entry_count \(count) overruns the table", offset: region.offset + 10) }
        var items: [VhdxGUID: (offset: UInt32, length: UInt32, at: UInt64)] = [:]
        for i in 0..<count {
            let e = VhdxFields(table, at: 32 + 32 * i)
            let id = e.guid(0)
            let at = region.offset + UInt64(32 + 32 * i)
            let known = required.contains { $0.0 == id } || id == parentLocator
            if known {
                guard items[id] == nil else { throw .corrupt("metadata item \(id) is listed twice", offset: at) }
                items[id] = (e.u32(16), e.u32(20), at)
            } else if e.u32(24) & 4 != 0 {
                throw .unsupportedFormat("vhdx with a required metadata item \(id) that poolfs (and QEMU) do not know")
            }
        }
        var values: [VhdxGUID: VhdxFields] = [:]
        for (id, name, size) in required {
            guard let item = items[id] else { throw .unsupportedFormat("vhdx without the \(name) metadata item QEMU requires") }
            guard UInt64(item.offset) + UInt64(size) <= region.length, item.length >= UInt32(size) else {
                throw .corrupt("\(name) metadata item (offset \(item.offset), length \(item.length)) lies outside the metadata region of \(region.length) bytes", offset: item.at + 16)
            }
            values[id] = VhdxFields(try file.readBytes(at: region.offset + UInt64(item.offset), count: size))
        }
        let params = values[fileParameters]!
        let metadata = VhdxMetadata(
            blockSize: params.u32(0), leaveBlocksAllocated: params.u32(4) & 1 != 0,
            virtualDiskSize: values[virtualDiskSize]!.u64(0), logicalSectorSize: values[logicalSectorSize]!.u32(0),
            physicalSectorSize: values[physicalSectorSize]!.u32(0), page83: values[page83]!.guid(0))
        if params.u32(4) & 2 != 0 {
            guard items[parentLocator] != nil else {
                throw .corrupt("file parameters say the disk has a parent, but there is no parent locator", offset: region.offset + UInt64(items[fileParameters]!.offset) + 4)
            }
            throw .unsupportedFormat("vhdx differencing disks (with a parent) are not supported: QEMU does not read them either")
        }
        try metadata.check(at: region.offset, items: items.mapValues { UInt64($0.offset) })
        return metadata
    }

    /// QEMU's checks, then the spec's bounds QEMU leaves to later arithmetic.
    func check(at base: UInt64, items: [VhdxGUID: UInt64]) throws(Qcow2Error) {
        let blockAt = base + items[Self.fileParameters]!
        guard blockSize >= Self.minBlockSize, blockSize <= Self.maxBlockSize, blockSize & (blockSize - 1) == 0 else {
            throw .corrupt("block size \(blockSize) is not a power of two from 1 MiB to 256 MiB", offset: blockAt)
        }
        guard logicalSectorSize == 512 else {
            throw .unsupportedFormat("vhdx with \(logicalSectorSize)-byte logical sectors: QEMU reads only 512-byte ones, and so does poolfs")
        }
        guard physicalSectorSize == 512 || physicalSectorSize == 4096 else {
            throw .corrupt("physical sector size \(physicalSectorSize) is neither 512 nor 4096", offset: base + items[Self.physicalSectorSize]!)
        }
        guard virtualDiskSize <= Self.maxVirtualSize else {
            throw .corrupt("virtual disk size \(virtualDiskSize) is over the 64 TiB a VHDX may have", offset: base + items[Self.virtualDiskSize]!)
        }
    }

    /// Payload blocks per sector bitmap block: 2^23 sectors of 512 bytes over the block size.
    var chunkRatio: UInt64 { (UInt64(1) << 23) * UInt64(logicalSectorSize) / UInt64(blockSize) }
}
