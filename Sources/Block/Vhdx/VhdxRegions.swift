/// The region table at 192 KiB (64 KiB, CRC-32C): where the BAT and the metadata region lie.
/// QEMU reads only this first copy (the one at 256 KiB is for writers that crash mid-update),
/// and so does poolfs. Every region, and the log, must not overlap another.
struct VhdxRegions: Sendable {
    static let offset: UInt64 = 192 << 10
    static let tableBytes = 64 << 10
    static let signature: UInt32 = 0x6967_6572  // "regi"
    static let maxEntries: UInt32 = 2047
    static let batGUID = VhdxGUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
    static let metadataGUID = VhdxGUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")

    struct Region: Sendable {
        var offset: UInt64
        var length: UInt64
        var end: UInt64 { offset &+ length }
    }

    var bat: Region
    var metadata: Region
    /// Every region registered so far (the log, then the table's entries), for overlap checks.
    var all: [Region]

    static func parse(_ file: HostFile, log: Region) throws(Qcow2Error) -> VhdxRegions {
        let bytes = try file.readBytes(at: offset, count: tableBytes)
        let f = VhdxFields(bytes)
        let computed = Crc32c.checksum(bytes, zeroing: 4)
        guard f.u32(4) == computed else {
            throw .corrupt("region table checksum 0x\(String(f.u32(4), radix: 16)) is not the CRC-32C 0x\(String(computed, radix: 16))", offset: offset + 4)
        }
        guard f.u32(0) == signature else { throw .corrupt("region table has no \"regi\" signature", offset: offset) }
        let count = f.u32(8)
        guard count <= maxEntries else { throw .corrupt("region table entry_count \(count) is over 2047", offset: offset + 8) }
        var all = [log]
        var bat: Region?
        var metadata: Region?
        for i in 0..<Int(count) {
            let at = 16 + 32 * i
            let e = VhdxFields(bytes, at: at)
            let region = Region(offset: e.u64(16), length: UInt64(e.u32(24)))
            let where_ = offset + UInt64(at)
            try checkOverlap(region, all, at: where_)
            all.append(region)
            switch e.guid(0) {
            case batGUID:
                guard bat == nil else { throw .corrupt("region table lists the BAT twice", offset: where_) }
                bat = region
            case metadataGUID:
                guard metadata == nil else { throw .corrupt("region table lists the metadata region twice", offset: where_) }
                metadata = region
            case let other where e.u32(28) & 1 != 0:
                throw .unsupportedFormat("vhdx with a required region \(other) that poolfs (and QEMU) do not know")
            default:
                continue
            }
        }
        guard let bat, let metadata else {
            throw .corrupt("region table has no \(bat == nil ? "BAT" : "metadata") region", offset: offset)
        }
        for (name, region) in [("BAT", bat), ("metadata", metadata)] {
            guard region.offset <= file.size, region.length <= file.size - region.offset else {
                throw .corrupt("\(name) region \(region.offset)+\(region.length) lies past the end of the file (\(file.size) bytes)", offset: offset)
            }
        }
        return VhdxRegions(bat: bat, metadata: metadata, all: all)
    }

    /// QEMU's vhdx_region_check: [start, end) must not meet any registered region.
    static func checkOverlap(_ r: Region, _ all: [Region], at: UInt64) throws(Qcow2Error) {
        for other in all where !(r.offset >= other.end || r.end <= other.offset) {
            throw .corrupt("VHDX region \(r.offset)-\(r.end) overlaps with region \(other.offset)-\(other.end)", offset: at)
        }
    }
}
