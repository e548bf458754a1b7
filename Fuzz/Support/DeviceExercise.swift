import Block

/// What every format's read target does with the device it opened (qcow2 and its snapshots,
/// vmdk, vpc, vhdx, vdi, qed): reads and maps `device` within bounds that keep one input to a fraction of a second, and
/// checks what any device promises: reads return what was asked, `status` tiles what it maps,
/// and st_blocks is no more than the disk. The map is asked in 1 GiB windows as SEEK_DATA asks
/// it (the first four and the last): a table may name one fragmented L2 table from every L1
/// entry, and a whole-disk map of that is legitimately tens of millions of extents.
public func exerciseDevice(_ device: any BlockDevice) throws {
    let size = device.size
    var buffer = [UInt8](repeating: 0, count: 64 << 10)
    func read(_ offset: UInt64, _ length: UInt64) throws {
        var at = offset
        let end = min(size, offset + length)
        while at < end {
            let n = Int(min(UInt64(buffer.count), end - at))
            let got = try buffer.withUnsafeMutableBytes { try device.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: at) }
            fuzzCheck(got == n, "read of \(n) bytes at \(at) inside a \(size)-byte disk returned \(got)")
            at += UInt64(n)
        }
    }
    let window: UInt64 = 1 << 30
    let windows = (size + window - 1) / window
    var extents: [MapExtent] = []
    var picked = Array(0..<min(windows, 4))
    if windows > 4 { picked.append(windows - 1) }
    for w in picked {
        let start = w * window, length = min(window, size - start)
        let mapped = try device.status(at: start, length: length, detection: .likeQemu)
        var covered = start
        for extent in mapped {
            fuzzCheck(extent.start == covered && extent.length > 0, "status extents leave a gap or overlap at \(covered): \(extent)")
            covered += extent.length
        }
        fuzzCheck(covered == start + length, "status covers \(covered - start) of \(length) bytes at \(start)")
        if extents.count < 64 { extents += mapped.prefix(64) }
    }
    let allocated = try device.allocatedBytes()
    fuzzCheck(allocated <= size, "\(allocated) allocated bytes in a \(size)-byte disk")
    if size <= 1 << 20 {
        try read(0, size)
        return
    }
    try read(0, 512 << 10)
    try read(size - min(size, 64 << 10), 64 << 10)
    for extent in extents.prefix(64) where extent.data { try read(extent.start, min(extent.length, 64 << 10)) }
}
