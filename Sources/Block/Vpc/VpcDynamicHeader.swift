/// The dynamic disk header ("cxsparse"), big-endian, at the footer's `data_offset`. QEMU reads
/// its first 512 bytes only (the parent locators that follow matter only to differencing disks,
/// which poolfs refuses), and so does poolfs.
struct VpcDynamicHeader: Sendable {
    static let cookie = Array("cxsparse".utf8)
    static let readLength = 512
    /// The most BAT bytes poolfs reads: 64 Mi entries, a 2040 GiB disk of 32 KiB blocks. Larger
    /// tables are refused rather than scanned at open.
    static let maxTableBytes: UInt64 = 256 << 20

    var tableOffset: UInt64     // byte 16
    var maxTableEntries: UInt32 // byte 28
    var blockSize: UInt32       // byte 32

    /// The sector bitmap before each block's data: one bit a sector, padded to 512 bytes.
    var bitmapSize: UInt64 { ((UInt64(blockSize) / (8 * 512)) + 511) & ~511 }
    var tableBytes: UInt64 { UInt64(maxTableEntries) * 4 }

    /// Parses the header at `at` and checks it against the disk's `virtualSize` and the file's
    /// size, with QEMU's checks and in its order.
    static func parse(_ file: HostFile, at: UInt64, virtualSize: UInt64) throws(Qcow2Error) -> VpcDynamicHeader {
        guard at <= file.size, file.size - at >= UInt64(readLength) else {
            throw .corrupt("dynamic disk header (footer data_offset \(at)) lies past the end of the file (\(file.size) bytes)", offset: 16)
        }
        let bytes = try file.readBytes(at: at, count: readLength)
        guard bytes.starts(with: cookie) else { throw .corrupt("Invalid header magic: no \"cxsparse\" dynamic disk header", offset: at) }
        let r = BigEndianReader(bytes: bytes)
        let header = VpcDynamicHeader(tableOffset: r.u64(16), maxTableEntries: r.u32(28), blockSize: r.u32(32))
        let blockSize = UInt64(header.blockSize)
        guard blockSize >= 512, blockSize & (blockSize - 1) == 0 else {
            throw .corrupt("Invalid block size \(header.blockSize)", offset: at + 32)
        }
        guard virtualSize / blockSize <= 0xffff_ffff else {
            throw .corrupt("Too many blocks: \(virtualSize / blockSize) blocks of \(blockSize) bytes", offset: at + 32)
        }
        guard UInt64(header.maxTableEntries) * blockSize >= virtualSize else {
            throw .corrupt("Page table too small: max_table_entries \(header.maxTableEntries) cover less than the virtual size \(virtualSize)", offset: at + 28)
        }
        guard header.maxTableEntries <= UInt32(Int32.max) / 4 else {
            throw .corrupt("Max Table Entries too large (\(header.maxTableEntries))", offset: at + 28)
        }
        guard header.tableBytes <= maxTableBytes else {
            throw .unsupportedFormat("vhd with a block allocation table of \(header.maxTableEntries) entries: poolfs reads at most \(maxTableBytes / 4)")
        }
        guard header.tableOffset <= file.size, header.tableBytes <= file.size - header.tableOffset else {
            throw .corrupt("BAT of \(header.maxTableEntries) entries at \(header.tableOffset) lies past the end of the file (\(file.size) bytes)", offset: at + 16)
        }
        return header
    }
}
