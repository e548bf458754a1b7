/// The block allocation table of a dynamic VHD: one big-endian u32 a block, the sector of the
/// block's bitmap in the file, 0xFFFFFFFF for a block not allocated. Read in chunks through the
/// shared cache, never whole, so a large table costs no memory of its own.
struct VpcBat: Sendable {
    static let unallocated: UInt32 = 0xffff_ffff
    /// Entries a cached chunk holds (16 KiB).
    static let chunkEntries: UInt64 = 4096

    let file: HostFile
    let cache: BlockCache
    let offset: UInt64
    let entries: UInt64

    /// The entry of block `index`; `unallocated` past the table, as QEMU reads it.
    func entry(_ index: UInt64) throws -> UInt32 {
        guard index < entries else { return Self.unallocated }
        let chunk = index / Self.chunkEntries
        let block = try self.chunk(chunk)
        let at = Int(index - chunk * Self.chunkEntries) * 4
        return block.withUnsafeBytes { UInt32(bigEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt32.self)) }
    }

    /// Calls `body` with each entry from `first` while it returns true, one cached chunk at a
    /// time (a scan of a large table costs one cache look-up per 4096 entries).
    func scan(from first: UInt64, _ body: (_ index: UInt64, _ entry: UInt32) throws -> Bool) throws {
        var index = first
        while index < entries {
            let chunk = index / Self.chunkEntries
            let block = try self.chunk(chunk)
            let base = chunk * Self.chunkEntries
            let count = UInt64(block.bytes.count / 4)
            while index < base + count {
                let at = Int(index - base) * 4
                let e = block.withUnsafeBytes { UInt32(bigEndian: $0.loadUnaligned(fromByteOffset: at, as: UInt32.self)) }
                guard try body(index, e) else { return }
                index += 1
            }
        }
    }

    private func chunk(_ chunk: UInt64) throws -> CachedBlock {
        let start = offset + chunk * Self.chunkEntries * 4
        let count = Int(min(Self.chunkEntries, entries - chunk * Self.chunkEntries) * 4)
        return try cache.block(.init(file: file.id, offset: start, kind: .table)) {
            try CachedBlock.read(file, at: start, count: count)
        }
    }

    /// QEMU's open-time check: every allocated block (bitmap and data) ends inside the file, and
    /// so does the table itself. Reads the table once, in 1 MiB pieces.
    func checkInsideFile(bitmapSize: UInt64, blockSize: UInt64) throws {
        let tableEnd = (offset + entries * 4 + 511) & ~511
        guard tableEnd <= file.size else {
            throw Qcow2Error.corrupt("block-vpc: free_data_block_offset points after the end of file. The image has been truncated: the BAT ends at \(tableEnd), past the end of the file (\(file.size) bytes)", offset: offset)
        }
        let piece: UInt64 = 1 << 18
        var first: UInt64 = 0
        while first < entries {
            let n = min(piece, entries - first)
            let bytes = try file.readBytes(at: offset + first * 4, count: Int(n * 4))
            let r = BigEndianReader(bytes: bytes)
            for i in 0..<Int(n) {
                let e = r.u32(i * 4)
                guard e != Self.unallocated else { continue }
                let end = 512 * UInt64(e) + bitmapSize + blockSize
                guard end <= file.size else {
                    throw Qcow2Error.corrupt("block-vpc: free_data_block_offset points after the end of file. The image has been truncated: BAT entry \(first + UInt64(i)) (sector \(e)) ends at \(end), past the end of the file (\(file.size) bytes)", offset: offset + (first + UInt64(i)) * 4)
                }
            }
            first += n
        }
    }
}
