/// How hard `status` looks for holes under stored data.
public enum HoleDetection: Sendable {
    /// Exactly as `qemu-img map`: host holes under qcow2 data clusters are probed only in images
    /// with preallocated metadata (which costs one scan of the refcounts per image).
    case likeQemu
    /// From metadata alone: qcow2 data clusters are data; raw files still report their holes.
    case metadataOnly
}

/// A readable virtual disk: a raw file, a qcow2 image's live state, or one of its snapshots.
/// Callers keep `offset + length` within `size`.
public protocol BlockDevice: Sendable {
    var size: UInt64 { get }
    /// Appends what reading `length` bytes at `offset` takes to `plan`.
    func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws
    /// Appends the allocation status of the range to `extents`, as `qemu-img map` reports it.
    func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws
    /// Bytes of the disk that hold data, from metadata: what `st_blocks` reports. nil when
    /// `shouldStop` said stop before the count was done.
    func allocatedBytes(shouldStop: () -> Bool) throws -> UInt64?
}

extension BlockDevice {
    public func plan(at offset: UInt64, length: Int) throws -> ReadPlan {
        var plan = ReadPlan()
        try self.plan(at: offset, length: length, into: &plan)
        return plan
    }

    /// Reads into `buffer`, clipped to the device's size; returns the byte count read.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws -> Int {
        guard offset < size else { return 0 }
        let n = Int(min(UInt64(buffer.count), size - offset))
        let plan = try plan(at: offset, length: n)
        try plan.execute(into: UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]))
        return n
    }

    public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        let n = try bytes.withUnsafeMutableBytes { try read(into: $0, at: offset) }
        bytes.removeLast(count - n)
        return bytes
    }

    public func status(at offset: UInt64 = 0, length: UInt64? = nil, detection: HoleDetection = .likeQemu) throws -> [MapExtent] {
        var extents: [MapExtent] = []
        let n = min(length ?? size, size - min(offset, size))
        try status(at: offset, length: n, detection: detection, into: &extents)
        return extents
    }

    /// Bytes of the disk that hold data (not holes, not zeros), from metadata: what `st_blocks`
    /// reports. Scans in windows so the extent list stays small: 4 GiB, or 1/4096 of the disk
    /// for disks over 16 TiB, so that a huge, mostly empty disk (an image may claim 2^61 bytes)
    /// costs 4096 calls, not billions.
    public func allocatedBytes() throws -> UInt64 {
        try allocatedBytes(shouldStop: { false }) ?? 0
    }

    public func allocatedBytes(shouldStop: () -> Bool) throws -> UInt64? {
        var total: UInt64 = 0
        var offset: UInt64 = 0
        let window = max(UInt64(1) << 32, size >> 12)
        while offset < size {
            if shouldStop() { return nil }
            let n = min(window, size - offset)
            for extent in try status(at: offset, length: n, detection: .metadataOnly) where extent.data && !extent.zero {
                total += extent.length
            }
            offset += n
        }
        return total
    }

    /// Reads what lies beneath an overlay: the backing device up to its end, zeros past it.
    func planBeneath(_ backing: (any BlockDevice)?, at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        guard let backing, offset < backing.size else { return plan.appendZero(length) }
        let inside = Int(min(UInt64(length), backing.size - offset))
        try backing.plan(at: offset, length: inside, into: &plan)
        plan.appendZero(length - inside)
    }

    /// The status of what lies beneath an overlay, one level deeper: everything the backing
    /// device covers, allocated or not (qemu-img map counts the layers it descended), and ranges
    /// past a short backing device at depth 0, not present.
    func statusBeneath(_ backing: (any BlockDevice)?, at offset: UInt64, length: UInt64, detection: HoleDetection,
                       into extents: inout [MapExtent]) throws {
        var inside: UInt64 = 0
        if let backing, offset < backing.size {
            inside = min(length, backing.size - offset)
            var below: [MapExtent] = []
            try backing.status(at: offset, length: inside, detection: detection, into: &below)
            for var extent in below {
                extent.depth += 1
                extents.appendMerging(extent)
            }
        }
        extents.appendMerging(MapExtent(start: offset + inside, length: length - inside, depth: 0,
                                        present: false, zero: true, data: false))
    }
}

/// Splits a stored-data range by the host file's holes: QEMU reports data over a hole as zero too
/// (for raw, a hole is zero and not data).
public func appendHostStatus(_ file: HostFile, guest: UInt64, host: UInt64, length: UInt64, depth: Int,
                      holeIsData: Bool, into extents: inout [MapExtent]) {
    var done: UInt64 = 0
    while done < length {
        let at = host + done
        let remaining = length - done
        let dataStart = at >= file.size ? nil : file.nextData(from: at)
        var n: UInt64
        var isHole: Bool
        if let dataStart, dataStart == at {
            n = min(remaining, file.nextHole(from: at) - at)
            isHole = false
        } else {
            n = min(remaining, (dataStart ?? UInt64.max) - at)
            isHole = true
        }
        if n == 0 { n = remaining }  // a file that changed underneath: report the rest as data
        extents.appendMerging(MapExtent(start: guest + done, length: n, depth: depth, present: true,
                                        zero: isHole, data: !isHole || holeIsData, offset: at))
        done += n
    }
}
