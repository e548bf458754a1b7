/// Reads VHDX images (Hyper-V's format): fixed and dynamic, read-only. Differencing disks and a
/// log that needs replay are refused with a reason (docs/formats/vhdx.md).
public enum VhdxReader: ImageFormatReader {
    public static var format: Image.Format { .vhdx }

    public static func open(_ context: FormatContext) throws -> FormatOpening {
        let file = context.file
        let (header, _) = try VhdxHeader.current(in: file)
        let log = VhdxRegions.Region(offset: header.logOffset, length: UInt64(header.logLength))
        try VhdxLog.check(file, header: header, path: file.path)
        let regions = try VhdxRegions.parse(file, log: log)
        let metadata = try VhdxMetadata.parse(file, region: regions.metadata)
        let blockSize = UInt64(metadata.blockSize)
        let size = metadata.virtualDiskSize / 512 * 512
        let entries = VhdxBat.entryCount(size: metadata.virtualDiskSize, blockSize: blockSize, chunkRatio: metadata.chunkRatio)
        guard entries <= regions.bat.length / 8 else {
            throw Qcow2Error.corrupt("BAT region of \(regions.bat.length) bytes is too small for the \(entries) entries of a \(size)-byte disk", offset: VhdxRegions.offset)
        }
        guard entries * 8 <= VhdxBat.maxTableBytes else {
            throw Qcow2Error.unsupportedFormat("vhdx with a BAT of \(entries) entries: poolfs reads at most \(VhdxBat.maxTableBytes / 8)")
        }
        let bat = VhdxBat(file: file, cache: context.cache, offset: regions.bat.offset, entries: entries, chunkRatio: metadata.chunkRatio)
        try bat.check(size: size, blockSize: blockSize, regions: regions.all)
        return FormatOpening(live: VhdxImage(file: file, size: size, blockSize: blockSize, bat: bat))
    }
}

/// The virtual disk of a fixed or dynamic VHDX: guest block `b` is BAT entry `b + b/chunkRatio`.
/// Fully present blocks are read from the file; not present, undefined, zero and unmapped blocks
/// read as zeros; a partially present block (meaningful only in a differencing disk) fails the
/// read, as it does in QEMU.
final class VhdxImage: BlockDevice {
    let file: HostFile
    let size: UInt64
    let blockSize: UInt64
    let bat: VhdxBat

    init(file: HostFile, size: UInt64, blockSize: UInt64, bat: VhdxBat) {
        self.file = file
        self.size = size
        self.blockSize = blockSize
        self.bat = bat
    }

    enum Piece { case host(UInt64), zero, unreadable(UInt64) }

    /// What guest `offset` reads as, and how many bytes of its block follow it.
    func locate(_ offset: UInt64) throws -> (Piece, run: UInt64) {
        let block = offset / blockSize
        let inBlock = offset % blockSize
        let index = bat.index(ofBlock: block)
        let entry = try bat.entry(index)
        let run = blockSize - inBlock
        switch VhdxBat.State(rawValue: entry & VhdxBat.stateMask) {
        case .fullyPresent?: return (.host((entry & VhdxBat.offsetMask) + inBlock), run)
        case .notPresent?, .undefined?, .zero?, .unmapped?, .unmappedV095?: return (.zero, run)
        case .partiallyPresent?, nil: return (.unreadable(entry), run)
        }
    }

    func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        var at = offset
        var left = UInt64(length)
        while left > 0 {
            let (piece, run) = try locate(at)
            let n = min(run, left)
            switch piece {
            case .host(let host): plan.appendHost(file, offset: host, length: Int(n))
            case .zero: plan.appendZero(Int(n))
            case .unreadable(let entry):
                throw Qcow2Error.corrupt("payload block \(at / blockSize) has BAT state \(entry & VhdxBat.stateMask), which only a differencing disk may have", offset: bat.offset + bat.index(ofBlock: at / blockSize) * 8)
            }
            at += n
            left -= n
        }
    }

    /// From the BAT (QEMU reports every byte of a VHDX as data; poolfs reports what the BAT
    /// says): fully present blocks are data at their file offset; the states that read as zeros
    /// are zero; an unreadable state is reported as data, as QEMU would.
    func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        var at = offset
        let end = offset + length
        while at < end {
            let (piece, run) = try locate(at)
            let n = min(run, end - at)
            let extent: MapExtent
            switch piece {
            case .host(let host): extent = MapExtent(start: at, length: n, depth: 0, present: true, zero: false, data: true, offset: host)
            case .zero: extent = MapExtent(start: at, length: n, depth: 0, present: true, zero: true, data: false)
            case .unreadable: extent = MapExtent(start: at, length: n, depth: 0, present: true, zero: false, data: true)
            }
            extents.appendMerging(extent)
            at += n
        }
    }

    /// Fully present payload blocks times the block size (the last clipped), from one scan of
    /// the BAT (at most 32 Mi entries, its bound), never a walk of the disk's bytes.
    func allocatedBytes(shouldStop: () -> Bool) throws -> UInt64? {
        var total: UInt64 = 0
        var stopped = false
        let ratio = bat.chunkRatio
        try bat.scan(from: 0) { index, entry in
            if index % VhdxBat.chunkEntries == 0, shouldStop() { stopped = true; return false }
            guard index % (ratio + 1) != ratio else { return true }  // a sector bitmap entry
            let block = index - index / (ratio + 1)
            guard block * blockSize < size else { return false }
            if entry & VhdxBat.stateMask == VhdxBat.State.fullyPresent.rawValue {
                total += min(blockSize, size - block * blockSize)
            }
            return true
        }
        return stopped ? nil : total
    }
}
