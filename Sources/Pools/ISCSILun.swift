#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Locking
import Block
import Synchronization

/// One direct-access LUN of an iSCSI target as a raw disk: reads are READ(16) of the blocks that
/// cover the range (unaligned ranges read whole blocks and keep their part), large ones split
/// into chunks read at once on several of the session's connections. Allocation comes from GET
/// LBA STATUS when READ CAPACITY(16) says the LUN is thin-provisioned (LBPME), else every byte is
/// data.
public final class ISCSILunDevice: BlockDevice {
    /// (last LBA + 1) × block length, from READ CAPACITY(16).
    public let size: UInt64
    public let lun: Int
    public let blockLength: Int
    /// LBPME: the LUN answers GET LBA STATUS.
    public let thinProvisioned: Bool
    /// LBPRZ: unmapped blocks read as zeros.
    let unmappedReadsZero: Bool
    let session: ISCSISession
    /// Reads above this size are split into chunks of it, read concurrently.
    static let chunk = 256 << 10
    /// Runs the chunks of a split read beside the calling thread. A queue of its own, so its
    /// threads are not limited to the CPU count as `concurrentPerform` is: they wait on the network.
    private static let chunkQueue = DispatchQueue(label: "poolfs.iscsi.chunks", attributes: .concurrent)

    init(session: ISCSISession, lun: Int, lastLBA: UInt64, blockLength: Int, thinProvisioned: Bool, unmappedReadsZero: Bool) {
        self.session = session
        self.lun = lun
        self.blockLength = blockLength
        self.size = (lastLBA + 1) * UInt64(blockLength)
        self.thinProvisioned = thinProvisioned
        self.unmappedReadsZero = unmappedReadsZero
    }

    public func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        guard length > 0 else { return }
        let block = UInt64(blockLength)
        let first = offset / block * block
        let end = min(size, (offset + UInt64(length) + block - 1) / block * block)
        try plan.appendRead(count: Int(end - first), start: Int(offset - first), length: length) { buffer in
            try read(into: buffer, lba: first / block)
        }
    }

    /// Reads whole blocks from `lba` into `buffer`, in concurrent chunks when it is large.
    func read(into buffer: UnsafeMutableRawBufferPointer, lba: UInt64) throws {
        let chunk = Self.chunk / blockLength * blockLength
        let count = (buffer.count + chunk - 1) / chunk
        // SAFETY: each chunk writes its own disjoint part of `buffer`, which outlives them all
        // (the group is waited for below).
        let shared = SharedBuffer(bytes: buffer)
        let lun = lun, blockLength = blockLength, session = session
        @Sendable func readChunk(_ i: Int) throws {
            let start = i * chunk
            let part = UnsafeMutableRawBufferPointer(rebasing: shared.bytes[start..<min(shared.bytes.count, start + chunk)])
            try session.withConnection("READ(16) LUN \(lun)") { connection in
                try connection.read16(lun: lun, lba: lba + UInt64(start / blockLength), blockLength: blockLength, into: part)
            }
        }
        guard count > 1 else { return try readChunk(0) }
        let failure = Locked<(any Error)?>(nil)
        let group = DispatchGroup()
        for i in 1..<count {
            Self.chunkQueue.async(group: group) {
                do { try readChunk(i) } catch { failure.withLock { $0 = $0 ?? error } }
            }
        }
        do { try readChunk(0) } catch { failure.withLock { $0 = $0 ?? error } }
        // Unbounded here, but each chunk is bounded by the session's deadline; returning earlier
        // would let a late chunk write into a buffer that is gone.
        group.wait()
        if let error = failure.withLock({ $0 }) { throw error }
    }

    public func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        let end = offset + length
        guard thinProvisioned else {
            return extents.appendMerging(MapExtent(start: offset, length: length, depth: 0, present: true, zero: false, data: true, offset: offset))
        }
        let block = UInt64(blockLength)
        var at = offset
        while at < end {
            let descriptors = try session.withConnection("GET LBA STATUS LUN \(lun)") { try $0.getLBAStatus(lun: lun, lba: at / block) }
            var advanced = false
            for d in descriptors {
                let start = max(at, d.lba * block)
                let stop = min(end, (d.lba + d.blocks) * block)
                guard start == at, stop > start else { continue }
                extents.appendMerging(MapExtent(start: start, length: stop - start, depth: 0, present: true,
                                                zero: !d.mapped && unmappedReadsZero, data: d.mapped, offset: start))
                at = stop
                advanced = true
            }
            // A target that answers nothing useful: the rest is data.
            if !advanced {
                extents.appendMerging(MapExtent(start: at, length: end - at, depth: 0, present: true, zero: false, data: true, offset: at))
                at = end
            }
        }
    }
}

private struct SharedBuffer: @unchecked Sendable {
    let bytes: UnsafeMutableRawBufferPointer
}

/// Writes to a LUN (`-o rw`): WRITE(16) of whole blocks (a partial block is read, patched and
/// written back), WRITE SAME(16) with UNMAP for zeroing, SYNCHRONIZE CACHE(16) on flush. Writes
/// are serialized so that two partial writes of one block do not undo each other.
public final class ISCSILunWriter: VolumeWriter {
    let device: ISCSILunDevice
    private let lock = Locked<Void>(())
    private let closed = Atomic<Bool>(false)
    /// Bytes per WRITE(16) and blocks per WRITE SAME(16).
    static let writeChunk = 1 << 20
    static let zeroChunkBlocks: UInt64 = 1 << 16

    public init(device: ISCSILunDevice) {
        self.device = device
    }

    private func check(_ offset: UInt64, _ length: UInt64) throws {
        guard !closed.load(ordering: .relaxed) else { throw Qcow2Error.writeRefused("LUN \(device.lun) is closed for writing") }
        guard offset <= device.size, length <= device.size - offset else {
            throw Qcow2Error.writeRefused("\(length) bytes at \(offset) run past the end of the disk (\(device.size) bytes)")
        }
    }

    public func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try check(offset, UInt64(data.count))
        guard data.count > 0 else { return }
        let block = UInt64(device.blockLength)
        let first = offset / block * block
        let end = (offset + UInt64(data.count) + block - 1) / block * block
        try lock.withLock { _ in
            if first == offset && end == offset + UInt64(data.count) {
                return try writeBlocks(data, at: first)
            }
            // Read-modify-write of the covering blocks.
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(end - first), alignment: 64)
            defer { buffer.deallocate() }
            try device.read(into: buffer, lba: first / block)
            UnsafeMutableRawBufferPointer(rebasing: buffer[Int(offset - first)...]).copyMemory(from: data)
            try writeBlocks(UnsafeRawBufferPointer(buffer), at: first)
        }
    }

    private func writeBlocks(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        let block = device.blockLength
        var done = 0
        while done < data.count {
            let part = UnsafeRawBufferPointer(rebasing: data[done..<min(data.count, done + Self.writeChunk)])
            let lba = (offset + UInt64(done)) / UInt64(block)
            try device.session.withConnection("WRITE(16) LUN \(device.lun)") {
                try $0.write16(lun: device.lun, lba: lba, blockLength: block, data: part)
            }
            done += part.count
        }
    }

    public func zero(at offset: UInt64, length: UInt64) throws {
        try check(offset, length)
        guard length > 0 else { return }
        let block = UInt64(device.blockLength)
        // Whole blocks by WRITE SAME; the partial blocks at either end by writes of zeros.
        let first = (offset + block - 1) / block * block
        let end = (offset + length) / block * block
        guard first < end else { return try writeZeros(at: offset, length: length) }
        try writeZeros(at: offset, length: first - offset)
        try lock.withLock { _ in
            var lba = first / block
            while lba < end / block {
                let n = min(Self.zeroChunkBlocks, end / block - lba)
                let unmap = device.thinProvisioned && device.unmappedReadsZero
                try device.session.withConnection("WRITE SAME(16) LUN \(device.lun)") {
                    try $0.writeSameZero16(lun: device.lun, lba: lba, blocks: UInt32(n), blockLength: Int(block), unmap: unmap)
                }
                lba += n
            }
        }
        try writeZeros(at: end, length: offset + length - end)
    }

    private func writeZeros(at offset: UInt64, length: UInt64) throws {
        guard length > 0 else { return }
        let zeros = [UInt8](repeating: 0, count: Int(length))
        try zeros.withUnsafeBytes { try write($0, at: offset) }
    }

    public func flush() throws {
        try device.session.withConnection("SYNCHRONIZE CACHE(16) LUN \(device.lun)") { try $0.synchronizeCache16(lun: device.lun) }
    }

    public func close() throws {
        guard !closed.exchange(true, ordering: .relaxed) else { return }
        try flush()
    }
}
