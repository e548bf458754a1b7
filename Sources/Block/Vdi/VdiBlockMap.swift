/// The block map of a vdi image (one little-endian u32 per block at `offset_bmap`), read through
/// the shared cache in chunks so that a huge map costs memory only for the parts in use.
struct VdiBlockMap: Sendable {
    /// 8192 entries (32 KiB of map, 8 GiB of disk) per cache block.
    static let entriesPerChunk: UInt64 = 8192

    let file: HostFile
    let header: VdiHeader
    let cache: BlockCache

    /// A run of map entries as read from the file: entries `start..<start + count`.
    struct Chunk {
        let start: UInt64
        let block: CachedBlock
        var count: UInt64 { UInt64(block.bytes.count / 4) }

        func contains(_ index: UInt64) -> Bool { index >= start && index - start < count }
    }

    /// The chunk of the map that holds entry `index` (< blocks_in_image, which `VdiHeader`
    /// checked lies inside the file).
    func chunk(containing index: UInt64) throws -> Chunk {
        let chunkStart = index / Self.entriesPerChunk * Self.entriesPerChunk
        let count = min(Self.entriesPerChunk, UInt64(header.blocksInImage) - chunkStart)
        let offset = header.offsetBmap + chunkStart * 4
        let block = try cache.block(.init(file: file.id, offset: offset, kind: .table)) {
            // Checked again here: the file may have shrunk since it was opened.
            guard offset + count * 4 <= file.size else {
                throw Qcow2Error.corrupt("block map chunk at \(offset) lies past the end of the file",
                                         offset: UInt64(VdiHeader.Field.offsetBmap))
            }
            return try CachedBlock.read(file, at: offset, count: Int(count * 4))
        }
        guard block.bytes.count == Int(count * 4) else {
            throw Qcow2Error.corrupt("block map chunk at \(offset) is shorter than expected", offset: offset)
        }
        return Chunk(start: chunkStart, block: block)
    }

    /// Map entry `index`, from `chunk` when it holds it. An allocated entry must name a block
    /// below blocks_in_image: QEMU reads whatever it names, and `qemu-img check` calls it corrupt.
    func entry(_ index: UInt64, in chunk: inout Chunk?) throws -> UInt32 {
        if chunk?.contains(index) != true { chunk = try self.chunk(containing: index) }
        let at = Int(index - chunk!.start) * 4
        let value = chunk!.block.withUnsafeBytes { $0.littleEndianU32(at: at) }
        if value < VdiDisk.discarded, value >= header.blocksInImage {
            throw Qcow2Error.corrupt("block map entry \(index) names block \(value), not below blocks_in_image \(header.blocksInImage)",
                                     offset: header.offsetBmap + index * 4)
        }
        return value
    }
}
