// libFuzzer target: the qcow2 reader. The input is an image file; it is opened with the engine's
// normal API over a 64 KiB cache, then the live disk and every snapshot are read (the whole disk
// up to 1 MiB; beyond, its first 512 KiB, its last 64 KiB and the start of every extent that
// `status` reports), their allocation status and st_blocks are computed. A crash, a hang, an
// allocation beyond libFuzzer's limit or an error that is not a `Qcow2Error` is a finding.
//
// Backing and external data files: the scratch directory holds `backing.raw` (a raw file),
// `copy.qcow2` (written as a copy of the input when the input names it, so a chain of qcow2
// images is explored) and `data.raw`; an image that names any path with a `/` (or `.`, `..`)
// is skipped, so nothing outside the scratch directory is ever opened.
import FuzzSupport
import Glibc
import Synchronization
@testable import Block

let scratch = FuzzDirectory()
nonisolated(unsafe) var prepared = false

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    if !prepared {
        scratch.patternFile("backing.raw", size: 3 << 20, patterned: 256 << 10)
        scratch.patternFile("data.raw", size: 8 << 20, patterned: 256 << 10)
        prepared = true
    }
    let input = FuzzInput(data, size)
    let names = referencedFiles(input.bytes)
    guard names.allSatisfy(isLocalName) else { return -1 }
    let path = scratch.write("image.qcow2", input.bytes)
    if names.contains("copy.qcow2") { scratch.write("copy.qcow2", input.bytes) }
    let cache = BlockCache(capacityBytes: 64 << 10, shardCount: 1)
    do {
        let image = try Image.open(path: path, cache: cache)
        defer { waitForDecodeAhead(image) }
        try exercise(image.live)
        for snapshot in image.snapshots {
            if let view = image.device(of: snapshot) { try exercise(view) }
        }
    } catch is Qcow2Error {
    } catch {
        untypedError(error, "qcow2 read")
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

/// A sequential read of compressed clusters starts a decode-ahead on a global queue: it must
/// end within this input, so that whatever it finds is blamed on the right one.
func waitForDecodeAhead(_ image: Image) {
    for layer in image.chain {
        guard let q = layer.qcow2 else { continue }
        while q.decodingAhead.load(ordering: .acquiring) { usleep(100) }
    }
}
