/// The VDI 1.1 header (VirtualBox's "VDI pre-header" and header, as QEMU's block/vdi.c reads
/// them): 512 bytes at the start of the file, every integer little-endian. Checked in the order
/// and with the messages of QEMU's `vdi_open`, then against the file, which QEMU does not do.
struct VdiHeader: Sendable {
    static let length = 512
    static let signature: UInt32 = 0xbeda_107f
    static let version11: UInt32 = 0x0001_0001
    static let sectorSize: UInt64 = 512
    /// QEMU reads only 1 MiB blocks (DEFAULT_CLUSTER_SIZE; CONFIG_VDI_BLOCK_SIZE is off).
    static let blockSize: UInt32 = 1 << 20
    /// VDI_BLOCKS_IN_IMAGE_MAX and VDI_DISK_SIZE_MAX.
    static let maxBlocks: UInt32 = 0x3fff_ffff
    static let maxDiskSize = UInt64(maxBlocks) * UInt64(blockSize)
    static let typeStatic: UInt32 = 2

    /// Byte offsets of the fields, for errors.
    enum Field {
        static let signature = 0x40, version = 0x44, headerSize = 0x48, imageType = 0x4c
        static let offsetBmap = 0x154, offsetData = 0x158, sectorSize = 0x168, diskSize = 0x170
        static let blockSize = 0x178, blockExtra = 0x17c, blocksInImage = 0x180, blocksAllocated = 0x184
        static let uuidLink = 0x1a8, uuidParent = 0x1b8
    }

    var imageType: UInt32
    var offsetBmap: UInt64
    var offsetData: UInt64
    /// The disk size rounded up to a sector, as QEMU serves it.
    var diskSize: UInt64
    var blocksInImage: UInt32
    var blocksAllocated: UInt32

    var isStatic: Bool { imageType == Self.typeStatic }
    var blockBytes: UInt64 { UInt64(Self.blockSize) }
    /// Blocks that hold some of the disk: the map entries that matter.
    var blocksUsed: UInt64 { (diskSize + blockBytes - 1) / blockBytes }

    /// Parses the first 512 bytes (zero-padded when the file is shorter, as QEMU reads them)
    /// and checks the block map lies inside a file of `fileSize` bytes.
    static func parse(_ bytes: [UInt8], fileSize: UInt64) throws(Qcow2Error) -> VdiHeader {
        let r = LittleEndianFields(bytes: bytes)
        var diskSize = r.u64(Field.diskSize)
        guard diskSize <= maxDiskSize else {
            throw unsupported("Unsupported VDI image size (size is 0x\(hex(diskSize)), max supported is 0x\(hex(maxDiskSize)))",
                              "disk_size", Field.diskSize)
        }
        // VBoxManage convertfromraw makes odd sizes; QEMU rounds them up to a sector.
        diskSize = (diskSize + sectorSize - 1) / sectorSize * sectorSize
        try checkIdentity(r)
        try checkLayout(r, diskSize: diskSize)
        let header = VdiHeader(imageType: r.u32(Field.imageType), offsetBmap: UInt64(r.u32(Field.offsetBmap)),
                               offsetData: UInt64(r.u32(Field.offsetData)), diskSize: diskSize,
                               blocksInImage: r.u32(Field.blocksInImage), blocksAllocated: r.u32(Field.blocksAllocated))
        try header.checkInside(fileSize: fileSize)
        return header
    }

    /// Signature and version: what makes the file a VDI 1.1 image at all.
    private static func checkIdentity(_ r: LittleEndianFields) throws(Qcow2Error) {
        let signature = r.u32(Field.signature)
        guard signature == Self.signature else {
            throw .corrupt("Image not in VDI format (bad signature \(hex(signature, width: 8)))", offset: UInt64(Field.signature))
        }
        let version = r.u32(Field.version)
        guard version == version11 else {
            throw unsupported("unsupported VDI image (version \(version >> 16).\(version & 0xffff))", "version", Field.version)
        }
    }

    /// QEMU's checks of the geometry, in its order and with its words.
    private static func checkLayout(_ r: LittleEndianFields, diskSize: UInt64) throws(Qcow2Error) {
        let bmap = r.u32(Field.offsetBmap), data = r.u32(Field.offsetData)
        guard UInt64(bmap) % sectorSize == 0 else {
            throw unsupported("unsupported VDI image (unaligned block map offset 0x\(hex(UInt64(bmap))))", "offset_bmap", Field.offsetBmap)
        }
        guard UInt64(data) % sectorSize == 0 else {
            throw unsupported("unsupported VDI image (unaligned data offset 0x\(hex(UInt64(data))))", "offset_data", Field.offsetData)
        }
        let sector = r.u32(Field.sectorSize)
        guard UInt64(sector) == sectorSize else {
            throw unsupported("unsupported VDI image (sector size \(sector) is not 512)", "sector_size", Field.sectorSize)
        }
        let block = r.u32(Field.blockSize)
        guard block == blockSize else {
            throw unsupported("unsupported VDI image (block size \(block) is not \(blockSize))", "block_size", Field.blockSize)
        }
        let room = UInt64(r.u32(Field.blocksInImage)) * UInt64(blockSize)
        guard diskSize <= room else {
            throw unsupported("unsupported VDI image (disk size \(diskSize), image bitmap has room for \(room))",
                              "blocks_in_image", Field.blocksInImage)
        }
        guard r.isZero(Field.uuidLink, count: 16) else {
            throw unsupported("unsupported VDI image (non-NULL link UUID)", "uuid_link", Field.uuidLink)
        }
        guard r.isZero(Field.uuidParent, count: 16) else {
            throw unsupported("unsupported VDI image (non-NULL parent UUID)", "uuid_parent", Field.uuidParent)
        }
        let blocks = r.u32(Field.blocksInImage)
        guard blocks <= maxBlocks else {
            throw unsupported("unsupported VDI image (too many blocks \(blocks), max is \(maxBlocks))",
                              "blocks_in_image", Field.blocksInImage)
        }
    }

    /// The block map (4 bytes per block in the image) must lie inside the file. QEMU reads a
    /// map past the end as zeros, which would send every block to the first data block.
    private func checkInside(fileSize: UInt64) throws(Qcow2Error) {
        let bytes = UInt64(blocksInImage) * 4
        guard offsetBmap <= fileSize, bytes <= fileSize - offsetBmap else {
            throw .corrupt("block map (\(bytes) bytes at offset_bmap \(offsetBmap)) lies past the end of the file (\(fileSize) bytes)",
                           offset: UInt64(Field.offsetBmap))
        }
    }

    /// A variant QEMU refuses as unsupported, with QEMU's message and the field that says so.
    private static func unsupported(_ qemuText: String, _ field: String, _ at: Int) -> Qcow2Error {
        .unsupportedFormat("\(qemuText): \(field) at byte \(at)")
    }

    static func hex(_ value: UInt64) -> String { String(value, radix: 16) }

    static func hex(_ value: UInt32, width: Int) -> String {
        let digits = String(value, radix: 16)
        return String(repeating: "0", count: max(0, width - digits.count)) + digits
    }
}
