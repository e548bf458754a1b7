/// Little-endian field access on a byte array, bounds-checked: vmdk stores every integer
/// little-endian (its magic is read as bytes). Bytes past the end read as zero; callers check
/// lengths first.
struct VmdkLittleEndian {
    let bytes: [UInt8]

    func u8(_ at: Int) -> UInt8 { at >= 0 && at < bytes.count ? bytes[at] : 0 }

    func u16(_ at: Int) -> UInt16 { UInt16(truncatingIfNeeded: uint(at, 2)) }

    func u32(_ at: Int) -> UInt32 { UInt32(truncatingIfNeeded: uint(at, 4)) }

    func u64(_ at: Int) -> UInt64 { uint(at, 8) }

    private func uint(_ at: Int, _ width: Int) -> UInt64 {
        var value: UInt64 = 0
        for i in (0..<width).reversed() {
            value = value << 8 | UInt64(u8(at + i))
        }
        return value
    }

    func starts(with magic: String) -> Bool {
        bytes.starts(with: Array(magic.utf8))
    }
}

extension UnsafeRawBufferPointer {
    /// The little-endian 32-bit value at byte `offset` (a grain table entry).
    @inline(__always)
    func vmdkU32(at offset: Int) -> UInt32 {
        UInt32(littleEndian: loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }
}

/// Sector arithmetic that cannot overflow: a value read from an image times 512 (or any
/// factor), nil when the product does not fit in 64 bits.
@inline(__always)
func vmdkBytes(_ sectors: UInt64, times factor: UInt64 = 512) -> UInt64? {
    let (product, overflow) = sectors.multipliedReportingOverflow(by: factor)
    return overflow ? nil : product
}
