/// Little-endian field access on a byte array, bounds-checked: vdi and qed store every integer
/// little-endian (qcow2's `BigEndianReader` is the big-endian twin). Bytes past the end read as
/// zero, as QEMU reads a header past the end of a short file; callers check lengths first.
struct LittleEndianFields {
    let bytes: [UInt8]

    func u8(_ at: Int) -> UInt8 { at >= 0 && at < bytes.count ? bytes[at] : 0 }

    func u32(_ at: Int) -> UInt32 { UInt32(truncatingIfNeeded: uint(at, 4)) }

    func u64(_ at: Int) -> UInt64 { uint(at, 8) }

    /// Whether the `count` bytes at `at` are all zero (a null UUID).
    func isZero(_ at: Int, count: Int) -> Bool { (at..<at + count).allSatisfy { u8($0) == 0 } }

    private func uint(_ at: Int, _ width: Int) -> UInt64 {
        var value: UInt64 = 0
        for i in (0..<width).reversed() {
            value = value << 8 | UInt64(u8(at + i))
        }
        return value
    }
}

extension UnsafeRawBufferPointer {
    @inline(__always)
    func littleEndianU32(at offset: Int) -> UInt32 {
        UInt32(littleEndian: loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }

    @inline(__always)
    func littleEndianU64(at offset: Int) -> UInt64 {
        UInt64(littleEndian: loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }
}
