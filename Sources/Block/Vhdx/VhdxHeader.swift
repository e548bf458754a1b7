/// The VHDX header section (the first 1 MiB): the file identifier at 0, two headers at 64 KiB
/// and 128 KiB (each checksummed over its first 4 KiB), and the region tables. The current
/// header is chosen as QEMU's vhdx_parse_header chooses it. Byte offsets: docs/formats/vhdx.md.
struct VhdxHeader: Sendable, Equatable {
    static let signature = Array("vhdxfile".utf8)
    static let headerSignature: UInt32 = 0x6461_6568  // "head"
    static let offsets: [UInt64] = [64 << 10, 128 << 10]
    static let checksummedBytes = 4096
    /// The fields QEMU compares when two headers share a sequence number (sizeof(VHDXHeader)).
    static let structBytes = 80

    var sequenceNumber: UInt64  // byte 8
    var logGUID: VhdxGUID       // byte 48
    var logVersion: UInt16      // byte 64
    var version: UInt16         // byte 66
    var logLength: UInt32       // byte 68
    var logOffset: UInt64       // byte 72
    var raw: [UInt8]            // the first 80 bytes, for the tie rule

    /// Checks the file identifier, then picks the current header.
    static func current(in file: HostFile) throws(Qcow2Error) -> (VhdxHeader, offset: UInt64) {
        guard file.size >= 1 << 20 else {
            throw .corrupt("file of \(file.size) bytes is shorter than the 1 MiB VHDX header section", offset: 0)
        }
        guard try file.readBytes(at: 0, count: 8) == signature else {
            throw .corrupt("no \"vhdxfile\" file identifier", offset: 0)
        }
        var found: [(VhdxHeader, UInt64)] = []
        var why: [String] = []
        for (i, offset) in offsets.enumerated() {
            switch parse(try file.readBytes(at: offset, count: checksummedBytes)) {
            case .success(let header): found.append((header, offset))
            case .failure(let reason): why.append("header \(i + 1): \(reason)")
            }
        }
        if found.count == 1 { return found[0] }
        guard found.count == 2 else { throw .corrupt("No valid VHDX header found (\(why.joined(separator: "; ")))", offset: offsets[0]) }
        let (h1, h2) = (found[0].0, found[1].0)
        if h1.sequenceNumber > h2.sequenceNumber { return found[0] }
        if h2.sequenceNumber > h1.sequenceNumber { return found[1] }
        // Disk2vhd writes two identical headers with one sequence number: not corrupt.
        guard h1.raw == h2.raw else {
            throw .corrupt("No valid VHDX header found (both headers have sequence number \(h1.sequenceNumber) and differ)", offset: offsets[0])
        }
        return found[0]
    }

    enum Parsed { case success(VhdxHeader), failure(String) }

    /// One header block, valid when its CRC-32C, signature and version (1) are right.
    static func parse(_ bytes: [UInt8]) -> Parsed {
        let f = VhdxFields(bytes)
        let stored = f.u32(4)
        let computed = Crc32c.checksum(bytes, zeroing: 4)
        guard stored == computed else { return .failure("checksum 0x\(String(stored, radix: 16)) is not the CRC-32C 0x\(String(computed, radix: 16))") }
        guard f.u32(0) == headerSignature else { return .failure("no \"head\" signature") }
        guard f.u16(66) == 1 else { return .failure("version \(f.u16(66)) is not 1") }
        return .success(VhdxHeader(sequenceNumber: f.u64(8), logGUID: f.guid(48), logVersion: f.u16(64), version: f.u16(66),
                                   logLength: f.u32(68), logOffset: f.u64(72), raw: Array(bytes[0..<structBytes])))
    }
}
