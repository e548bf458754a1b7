/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), which VHDX uses for its headers,
/// region tables and log entries. Table-driven, one byte a step: VHDX checksums only metadata
/// (a few KiB at open), never guest data.
enum Crc32c {
    static let table: [UInt32] = (0..<256).map { (n: UInt32) -> UInt32 in
        var c = n
        for _ in 0..<8 { c = c & 1 != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
        return c
    }

    /// Continues a running (not yet inverted) CRC over `bytes`, with the 4 bytes at
    /// `zeroing` (if any) counted as zeros: VHDX checksums a structure with its own checksum
    /// field zeroed.
    static func update(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer, zeroing: Int? = nil) -> UInt32 {
        var c = crc
        for i in 0..<bytes.count {
            let byte = zeroing.map { i >= $0 && i < $0 + 4 } == true ? 0 : bytes[i]
            c = table[Int((c ^ UInt32(byte)) & 0xff)] ^ (c >> 8)
        }
        return c
    }

    /// The CRC-32C of `bytes` (initial value and final inversion 0xFFFFFFFF).
    static func checksum(_ bytes: [UInt8], zeroing: Int? = nil) -> UInt32 {
        bytes.withUnsafeBytes { ~update(0xffff_ffff, $0, zeroing: zeroing) }
    }
}
