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
        try exerciseDevice(image.live)
        for snapshot in image.snapshots {
            if let view = image.device(of: snapshot) { try exerciseDevice(view) }
        }
    } catch is Qcow2Error {
    } catch {
        untypedError(error, "qcow2 read")
    }
    fuzzCheck(cache.bytesUsed <= cache.capacity, "cache holds \(cache.bytesUsed) bytes, more than \(cache.capacity)")
    return 0
}

/// A sequential read of compressed clusters starts a decode-ahead on a global queue: it must
/// end within this input, so that whatever it finds is blamed on the right one.
func waitForDecodeAhead(_ image: Image) {
    for layer in image.chain {
        guard let q = layer.qcow2 else { continue }
        while q.decodingAhead.load(ordering: .acquiring) { usleep(100) }
    }
}
