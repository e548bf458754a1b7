/// The VHD footer ("Hard Disk Footer" of Microsoft's VHD specification): 512 bytes, big-endian,
/// at the end of every VHD and, for dynamic and differencing disks, copied at byte 0.
/// See docs/formats/vpc.md for the byte offsets.
struct VpcFooter: Sendable {
    static let size = 512
    static let cookie = Array("conectix".utf8)
    /// QEMU's VHD_MAX_SECTORS: 2040 GiB.
    static let maxSectors: UInt64 = 0xff00_0000
    /// QEMU's VHD_MAX_GEOMETRY (65535 x 16 x 255): a geometry that means "use current_size".
    static let maxGeometrySectors: UInt64 = 65535 * 16 * 255
    /// Creator applications whose images are sized by `current_size` rather than by the CHS
    /// geometry (QEMU's table in vpc_open): Hyper-V, QEMU with force_size, Disk2vhd,
    /// XenConverter, XenServer.
    static let currentSizeCreators: [[UInt8]] = ["win ", "qem2", "d2v ", "CTXS"].map { Array($0.utf8) } + [[0x74, 0x61, 0x70, 0]]

    enum DiskType: UInt32 {
        case fixed = 2, dynamic = 3, differencing = 4
    }

    var dataOffset: UInt64     // byte 16
    var creatorApp: [UInt8]    // byte 28, 4 bytes
    var currentSize: UInt64    // byte 48
    var cylinders: UInt16      // byte 56
    var heads: UInt8           // byte 58
    var sectorsPerTrack: UInt8 // byte 59
    var diskType: UInt32       // byte 60
    var checksum: UInt32       // byte 64
    var uuid: [UInt8]          // byte 68, 16 bytes

    /// The virtual disk size in bytes, by QEMU's rule: the CHS geometry for creators that size
    /// disks that way ("vpc ", "qemu" and any unknown one), `current_size` for the others and
    /// for images whose geometry is the maximum one (qemu-img's force_size=on writes it).
    var virtualSectors: UInt64 {
        let chs = UInt64(cylinders) * UInt64(heads) * UInt64(sectorsPerTrack)
        let usesCHS = !Self.currentSizeCreators.contains(creatorApp)
        if !usesCHS || chs == Self.maxGeometrySectors { return currentSize / 512 }
        return chs
    }

    /// Parses and checks the footer read at `at` (0, or the last 512 bytes of the file).
    static func parse(_ bytes: [UInt8], at: UInt64) throws(Qcow2Error) -> VpcFooter {
        guard bytes.count == size, bytes.starts(with: cookie) else {
            throw .corrupt("no VHD footer cookie \"conectix\"", offset: at)
        }
        let r = BigEndianReader(bytes: bytes)
        let footer = VpcFooter(
            dataOffset: r.u64(16), creatorApp: Array(bytes[28..<32]), currentSize: r.u64(48),
            cylinders: r.u16(56), heads: r.u8(58), sectorsPerTrack: r.u8(59), diskType: r.u32(60),
            checksum: r.u32(64), uuid: Array(bytes[68..<84]))
        let computed = checksum(of: bytes)
        guard computed == footer.checksum else {
            throw .corrupt("Incorrect header checksum: footer checksum is 0x\(hex(footer.checksum)), its bytes sum to 0x\(hex(computed))", offset: at + 64)
        }
        guard footer.virtualSectors <= maxSectors else {
            throw .corrupt("virtual size of \(footer.virtualSectors) sectors is larger than the 2040 GiB a VHD may have (File too large)", offset: at + 48)
        }
        return footer
    }

    /// The one's complement of the byte sum of the footer, its checksum field (bytes 64..67)
    /// counted as zero.
    static func checksum(of bytes: [UInt8]) -> UInt32 {
        var sum: UInt32 = 0
        for (i, byte) in bytes.enumerated() where !(64..<68).contains(i) { sum &+= UInt32(byte) }
        return ~sum
    }

    static func hex(_ value: UInt32) -> String { String(value, radix: 16) }
}
