@testable import Block
import FuzzSupport

/// Reads and maps `device` within bounds that keep one input to a fraction of a second, and
/// checks what any device promises: reads return what was asked, `status` tiles the disk, and
/// st_blocks is no more than the disk.
func exerciseDevice(_ device: any BlockDevice) throws {
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
    let extents = try device.status(at: 0, length: size, detection: .likeQemu)
    var covered: UInt64 = 0
    for extent in extents {
        fuzzCheck(extent.start == covered && extent.length > 0, "status extents leave a gap or overlap at \(covered): \(extent)")
        covered += extent.length
    }
    fuzzCheck(covered == size, "status covers \(covered) of \(size) bytes")
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
