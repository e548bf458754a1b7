/// Big-endian field access on a byte array, bounds-checked: qcow2 stores every integer big-endian.
struct BigEndianReader {
    let bytes: [UInt8]

    func u8(_ at: Int) -> UInt8 { at < bytes.count ? bytes[at] : 0 }

    func u16(_ at: Int) -> UInt16 { UInt16(truncatingIfNeeded: uint(at, 2)) }

    func u32(_ at: Int) -> UInt32 { UInt32(truncatingIfNeeded: uint(at, 4)) }

    func u64(_ at: Int) -> UInt64 { uint(at, 8) }

    /// Bytes past the end read as zero; callers check lengths against the spec first.
    private func uint(_ at: Int, _ width: Int) -> UInt64 {
        var value: UInt64 = 0
        for i in 0..<width {
            value = value << 8 | UInt64(u8(at + i))
        }
        return value
    }
}

extension UnsafeRawBufferPointer {
    @inline(__always)
    func bigEndianU64(at offset: Int) -> UInt64 {
        UInt64(bigEndian: loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }
}

/// The bytes of `value`, most significant first.
func bigEndianBytes<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    (0..<T.bitWidth / 8).map { UInt8(truncatingIfNeeded: value >> (T.bitWidth - 8 - 8 * $0)) }
}

extension Array where Element == UInt8 {
    /// Stores `value` big-endian at byte `at`.
    mutating func storeBigEndian(_ value: UInt64, at: Int) {
        for i in 0..<8 { self[at + i] = UInt8(truncatingIfNeeded: value >> UInt64(56 - 8 * i)) }
    }
}
