/// The VHDX log: a circular buffer of 4 KiB sectors holding metadata updates not yet written in
/// place. A log with a valid entry must be replayed before the file reads right; QEMU refuses to
/// open such a file read-only, and poolfs, which never writes an image it serves, refuses it with
/// QEMU's words. The search follows QEMU's vhdx_log_search: a valid entry anywhere in the log
/// (signature, the header's log GUID, lengths, descriptors, CRC-32C over the whole entry).
struct VhdxLog {
    static let sectorBytes: UInt64 = 4096
    static let entrySignature: UInt32 = 0x6567_6f6c      // "loge"
    static let zeroSignature: UInt32 = 0x6f72_657a       // "zero"
    static let descriptorSignature: UInt32 = 0x6373_6564 // "desc"
    /// The largest log poolfs searches, and the most entry bytes it checksums while searching:
    /// a hostile log cannot make an open read without end. Hyper-V and QEMU write 1 MiB logs.
    static let maxSearchedLength: UInt64 = 64 << 20
    static let maxChecksummedBytes: UInt64 = 256 << 20

    let file: HostFile
    let header: VhdxHeader
    var offset: UInt64 { header.logOffset }
    var length: UInt64 { UInt64(header.logLength) }

    /// QEMU's vhdx_parse_log checks, then the search. Throws when the log needs replay.
    static func check(_ file: HostFile, header: VhdxHeader, path: String) throws(Qcow2Error) {
        guard header.logOffset >= 1 << 20, header.logOffset % (1 << 20) == 0 else {
            throw .corrupt("log offset \(header.logOffset) is not a non-zero multiple of 1 MiB", offset: 72)
        }
        guard header.logVersion == 0 else { throw .corrupt("log version \(header.logVersion) is not 0", offset: 64) }
        if header.logGUID.isZero || header.logLength == 0 { return }
        guard header.logLength % (1 << 20) == 0 else {
            throw .corrupt("log length \(header.logLength) is not a multiple of 1 MiB", offset: 68)
        }
        guard UInt64(header.logLength) <= maxSearchedLength else {
            throw .unsupportedFormat("vhdx with a log GUID set and a log of \(header.logLength) bytes: poolfs searches logs of at most \(maxSearchedLength >> 20) MiB for entries to replay")
        }
        var budget = maxChecksummedBytes
        let log = VhdxLog(file: file, header: header)
        var position: UInt64 = 0
        while position < log.length {
            if try log.isValidEntry(at: position, budget: &budget) {
                throw .unsupportedFormat("VHDX image file '\(path)' opened read-only, but contains a log that needs to be replayed (to replay the log, run: qemu-img check -r all '\(path)')")
            }
            position += sectorBytes
        }
    }

    /// `count` log sectors from `position`, wrapping at the end of the log; sectors past the end
    /// of the file read as zeros (QEMU's reads do).
    func sectors(from position: UInt64, count: UInt64) throws(Qcow2Error) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(Int(count * Self.sectorBytes))
        for i in 0..<count {
            let at = offset + (position + i * Self.sectorBytes) % length
            if at < file.size, file.size - at >= Self.sectorBytes {
                bytes += try file.readBytes(at: at, count: Int(Self.sectorBytes))
            } else {
                bytes += [UInt8](repeating: 0, count: Int(Self.sectorBytes))
            }
        }
        return bytes
    }

    /// Whether a valid log entry starts at `position` (QEMU's vhdx_validate_log_entry).
    func isValidEntry(at position: UInt64, budget: inout UInt64) throws(Qcow2Error) -> Bool {
        let first = try sectors(from: position, count: 1)
        let h = VhdxFields(first)
        let entryLength = UInt64(h.u32(8))
        let sequence = h.u64(16)
        let descriptors = UInt64(h.u32(24))
        guard h.u32(0) == Self.entrySignature, entryLength <= length, entryLength % Self.sectorBytes == 0,
              sequence != 0, h.guid(32) == header.logGUID, descriptors * 32 <= entryLength else { return false }
        let descriptorSectors = (descriptors + 2 + 127) / 128
        let totalSectors = max(entryLength / Self.sectorBytes, descriptorSectors)
        guard totalSectors * Self.sectorBytes <= budget else {
            throw .unsupportedFormat("vhdx log with more candidate entries than poolfs checksums (\(Self.maxChecksummedBytes >> 20) MiB) while searching it")
        }
        budget -= totalSectors * Self.sectorBytes
        let entry = try sectors(from: position, count: totalSectors)
        for i in 0..<Int(descriptors) {
            let d = VhdxFields(entry, at: 64 + 32 * i)
            guard d.u64(24) == sequence, d.u64(16) % Self.sectorBytes == 0 else { return false }
            switch d.u32(0) {
            case Self.zeroSignature: guard d.u64(8) % Self.sectorBytes == 0 else { return false }
            case Self.descriptorSignature: break
            default: return false
            }
        }
        return Crc32c.checksum(entry, zeroing: 4) == h.u32(4)
    }
}
