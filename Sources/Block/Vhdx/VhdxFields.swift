/// Little-endian field access for VHDX structures (every VHDX integer is little-endian), and
/// its GUIDs. Private to the VHDX reader: the Block core's reader is big-endian.
struct VhdxFields {
    let bytes: [UInt8]
    let base: Int

    init(_ bytes: [UInt8], at base: Int = 0) {
        self.bytes = bytes
        self.base = base
    }

    /// Bytes past the end read as zero; callers size their reads from the spec first.
    func uint(_ at: Int, _ width: Int) -> UInt64 {
        var value: UInt64 = 0
        for i in (0..<width).reversed() {
            let index = base + at + i
            value = value << 8 | UInt64(index < bytes.count ? bytes[index] : 0)
        }
        return value
    }

    func u16(_ at: Int) -> UInt16 { UInt16(truncatingIfNeeded: uint(at, 2)) }
    func u32(_ at: Int) -> UInt32 { UInt32(truncatingIfNeeded: uint(at, 4)) }
    func u64(_ at: Int) -> UInt64 { uint(at, 8) }

    func guid(_ at: Int) -> VhdxGUID {
        VhdxGUID(bytes: (0..<16).map { base + at + $0 < bytes.count ? bytes[base + at + $0] : 0 })
    }
}

/// A GUID as VHDX stores it: data1 (u32), data2 and data3 (u16) little-endian, then 8 bytes.
struct VhdxGUID: Hashable, Sendable, CustomStringConvertible {
    var bytes: [UInt8]

    /// From its text form "2DC27766-F623-4200-9D64-115E9BFD4A08".
    init(_ text: String) {
        let hex = text.filter { $0 != "-" }
        let all = stride(from: 0, to: 32, by: 2).map { i -> UInt8 in
            let start = hex.index(hex.startIndex, offsetBy: i)
            return UInt8(hex[start..<hex.index(start, offsetBy: 2)], radix: 16)!
        }
        bytes = Array(all[0..<4].reversed()) + Array(all[4..<6].reversed()) + Array(all[6..<8].reversed()) + Array(all[8...])
    }

    init(bytes: [UInt8]) { self.bytes = bytes }

    static let zero = VhdxGUID(bytes: [UInt8](repeating: 0, count: 16))
    var isZero: Bool { bytes.allSatisfy { $0 == 0 } }

    var description: String {
        let b = bytes
        func hex<C: Collection>(_ r: C) -> String where C.Element == UInt8 { r.map(hexByte).joined() }
        return "\(hex(b[0..<4].reversed()))-\(hex(b[4..<6].reversed()))-\(hex(b[6..<8].reversed()))-\(hex(b[8..<10]))-\(hex(b[10...]))"
    }
}

/// Two lower-case hex digits.
private func hexByte(_ byte: UInt8) -> String {
    let digits = Array("0123456789abcdef")
    return String([digits[Int(byte >> 4)], digits[Int(byte & 15)]])
}
