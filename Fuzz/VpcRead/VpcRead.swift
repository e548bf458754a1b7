// libFuzzer target: the vhd (vpc) reader. The input is an image file, opened as vpc (declared,
// so the reader runs whatever the probe would say) over a 64 KiB cache; the disk is read (all of it up
// to 1 MiB; beyond, its first 512 KiB, its last 64 KiB and the start of the first 64 data
// extents), mapped and counted. A crash, a hang, an allocation beyond libFuzzer's limit, an
// error that is not a `Qcow2Error`, a map with a gap or a read that comes back short is a
// finding. vhd images name no other file (differencing disks are refused), so nothing but
// the input is opened.
import FuzzSupport
import Glibc
@testable import Block

let scratch = FuzzDirectory()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let input = FuzzInput(data, size)
    let path = scratch.write("image.vhd", input.bytes)
    let cache = BlockCache(capacityBytes: 64 << 10, shardCount: 1)
    do {
        let image = try Image.open(path: path, format: .vpc, cache: cache)
        try exercise(image.live)
    } catch is Qcow2Error {
    } catch {
        untypedError(error, "vpc read")
    }
    fuzzCheck(cache.bytesUsed <= cache.capacity, "cache holds \(cache.bytesUsed) bytes, more than \(cache.capacity)")
    return 0
}

/// Reads and maps `device` within bounds that keep one input to a fraction of a second.
func exercise(_ device: any BlockDevice) throws {
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
    let window = min(size, 64 << 30)
    let extents = try device.status(at: 0, length: window, detection: .likeQemu)
    var covered: UInt64 = 0
    for extent in extents {
        fuzzCheck(extent.start == covered && extent.length > 0, "status extents leave a gap or overlap at \(covered): \(extent)")
        covered += extent.length
    }
    fuzzCheck(covered == window, "status covers \(covered) of \(window) bytes")
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
