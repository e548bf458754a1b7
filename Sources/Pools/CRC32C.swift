/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), slicing by 8: eight 256-entry tables
/// let the loop fold eight input bytes per step. It checks dm-persistent-data's 4 KiB metadata
/// blocks (thin pools), which the kernel sums with `dm_bm_checksum` in
/// `drivers/md/persistent-data/dm-block-manager.c`:
///
///     crc32c(~0, data, len) ^ init_xor
///
/// The kernel's `crc32c(seed, ...)` returns the running register with no final inversion, so a
/// dm checksum is *not* the standard CRC-32C of the bytes: `dmChecksum` = `~checksum(bytes) ^ xor`.
enum CRC32C {
    /// `tables[k * 256 + b]`: the CRC register after byte `b` followed by `k` zero bytes.
    private static let tables: [UInt32] = {
        var tables = [UInt32](repeating: 0, count: 8 * 256)
        for byte in 0..<256 {
            var crc = UInt32(byte)
            for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
            tables[byte] = crc
        }
        for k in 1..<8 {
            for byte in 0..<256 {
                let previous = tables[(k - 1) * 256 + byte]
                tables[k * 256 + byte] = (previous >> 8) ^ tables[Int(previous & 0xFF)]
            }
        }
        return tables
    }()

    /// Feeds `bytes` into the register `crc` (no inversion in or out), as the kernel's `crc32c()`.
    static func update(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        tables.withUnsafeBufferPointer { t in
            var crc = crc
            var at = 0
            let count = bytes.count
            while count - at >= 8 {
                let low = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: at, as: UInt32.self)) ^ crc
                let high = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: at + 4, as: UInt32.self))
                crc = t[7 * 256 + Int(low & 0xFF)] ^ t[6 * 256 + Int((low >> 8) & 0xFF)]
                    ^ t[5 * 256 + Int((low >> 16) & 0xFF)] ^ t[4 * 256 + Int(low >> 24)]
                    ^ t[3 * 256 + Int(high & 0xFF)] ^ t[2 * 256 + Int((high >> 8) & 0xFF)]
                    ^ t[1 * 256 + Int((high >> 16) & 0xFF)] ^ t[Int(high >> 24)]
                at += 8
            }
            while at < count {
                crc = (crc >> 8) ^ t[Int((crc ^ UInt32(bytes[at])) & 0xFF)]
                at += 1
            }
            return crc
        }
    }

    /// The standard CRC-32C of `bytes` (initial ~0, final inversion): 0xE3069283 for "123456789".
    static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
        ~update(~0, bytes)
    }

    /// `dm_bm_checksum(data, len, xor)`: the dm-persistent-data block checksum.
    static func dmChecksum(_ bytes: UnsafeRawBufferPointer, xor: UInt32) -> UInt32 {
        update(~0, bytes) ^ xor
    }
}
