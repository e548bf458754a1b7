/// The VHDX block allocation table: one little-endian u64 per payload block, with one sector
/// bitmap entry after every `chunkRatio` payload entries. Bits 0-2 are the block state, bits
/// 20-63 the file offset in MiB. Read in chunks through the shared cache.
struct VhdxBat: Sendable {
    enum State: UInt64 {
        case notPresent = 0, undefined = 1, zero = 2, unmapped = 3, unmappedV095 = 5, fullyPresent = 6, partiallyPresent = 7
    }
    static let stateMask: UInt64 = 7
    static let offsetMask: UInt64 = 0xFFFF_FFFF_FFF0_0000
    static let chunkEntries: UInt64 = 2048  // 16 KiB a cached chunk
    /// The most BAT bytes poolfs reads (32 Mi entries: 64 TiB of 2 MiB blocks).
    static let maxTableBytes: UInt64 = 256 << 20

    let file: HostFile
    let cache: BlockCache
    let offset: UInt64
    let entries: UInt64
    let chunkRatio: UInt64

    /// The BAT index of payload block `block`: a sector bitmap entry follows each chunk.
    func index(ofBlock block: UInt64) -> UInt64 { block + block / chunkRatio }

    func entry(_ index: UInt64) throws -> UInt64 {
        guard index < entries else {
            throw Qcow2Error.corrupt("BAT index \(index) is past the table's \(entries) entries", offset: offset)
        }
        let chunk = try self.chunk(index / Self.chunkEntries)
        let at = Int(index % Self.chunkEntries) * 8
        return chunk.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt64.self)) }
    }

    private func chunk(_ chunk: UInt64) throws -> CachedBlock {
        let start = offset + chunk * Self.chunkEntries * 8
        let count = Int(min(Self.chunkEntries, entries - chunk * Self.chunkEntries) * 8)
        return try cache.block(.init(file: file.id, offset: start, kind: .table)) {
            try CachedBlock.read(file, at: start, count: count)
        }
    }

    /// Calls `body` with every entry from `first` on while it returns true, one cached chunk at
    /// a time (one cache look-up per 2048 entries).
    func scan(from first: UInt64, _ body: (_ index: UInt64, _ entry: UInt64) throws -> Bool) throws {
        var index = first
        while index < entries {
            let chunk = try self.chunk(index / Self.chunkEntries)
            let base = index - index % Self.chunkEntries
            let end = base + UInt64(chunk.bytes.count / 8)
            while index < end {
                let at = Int(index - base) * 8
                let e = chunk.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt64.self)) }
                guard try body(index, e) else { return }
                index += 1
            }
        }
    }

    /// The number of BAT entries a disk of `size` bytes uses, as QEMU's vhdx_calc_bat_entries
    /// computes it (32-bit, as QEMU does).
    static func entryCount(size: UInt64, blockSize: UInt64, chunkRatio: UInt64) -> UInt64 {
        let dataBlocks = UInt32(truncatingIfNeeded: (size + blockSize - 1) / blockSize)
        let ratioBits = UInt32(chunkRatio.trailingZeroBitCount)
        return UInt64(UInt32(truncatingIfNeeded: UInt64(dataBlocks) + UInt64((dataBlocks &- 1) >> ratioBits)))
    }

    /// QEMU's vhdx_check_bat_entries at open: every fully present block lies inside the file and
    /// (for payload blocks) overlaps no region; poolfs also refuses payload blocks inside the
    /// 1 MiB header section, which QEMU would read as data. Reads the table in 1 MiB pieces.
    func check(size: UInt64, blockSize: UInt64, regions: [VhdxRegions.Region]) throws {
        let piece: UInt64 = 1 << 17
        var first: UInt64 = 0
        while first < entries {
            let n = min(piece, entries - first)
            let bytes = try file.readBytes(at: offset + first * 8, count: Int(n * 8))
            let f = VhdxFields(bytes)
            for k in 0..<n {
                let e = f.u64(Int(k) * 8)
                guard e & Self.stateMask == State.fullyPresent.rawValue else { continue }
                try checkPresent(index: first + k, entry: e, size: size, blockSize: blockSize, regions: regions)
            }
            first += n
        }
    }

    private func checkPresent(index i: UInt64, entry: UInt64, size: UInt64, blockSize: UInt64,
                              regions: [VhdxRegions.Region]) throws {
        let at = offset + i * 8
        let start = entry & Self.offsetMask
        // QEMU's block length: the rest of the disk past i blocks, in its unsigned arithmetic.
        let blockLength = min(blockSize, size &- i &* blockSize)
        guard start <= UInt64(Int64.max) - blockSize else {
            throw Qcow2Error.corrupt("VHDX BAT entry \(i) offset overflow", offset: at)
        }
        guard start < file.size else {
            throw Qcow2Error.corrupt("VHDX BAT entry \(i) start offset \(start) points after end of file (\(file.size)). Image has probably been truncated.", offset: at)
        }
        guard start + blockLength <= file.size else {
            throw Qcow2Error.corrupt("VHDX BAT entry \(i) end offset \(start + blockLength - 1) points after end of file (\(file.size)). Image has probably been truncated.", offset: at)
        }
        guard i % (chunkRatio + 1) != chunkRatio else { return }  // a sector bitmap block
        guard start >= 1 << 20 else {
            throw Qcow2Error.corrupt("VHDX BAT entry \(i) puts a payload block at \(start), inside the 1 MiB header section", offset: at)
        }
        try VhdxRegions.checkOverlap(.init(offset: start, length: blockSize), regions, at: at)
    }
}
