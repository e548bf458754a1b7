// libFuzzer target: the vhdx reader. The input is an image file, opened as vhdx (declared, so the
// reader runs whatever the probe would say) over a 64 KiB cache; the disk is read (all of it up
// to 1 MiB; beyond, its first 512 KiB, its last 64 KiB and the start of the first 64 data
// extents), mapped and counted. A crash, a hang, an allocation beyond libFuzzer's limit, an
// error that is not a `Qcow2Error`, a map with a gap or a read that comes back short is a
// finding. vhdx images name no other file (differencing disks are refused), so nothing but the
// input is opened.
import FuzzSupport
import Glibc
@testable import Block

let scratch = FuzzDirectory()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let input = FuzzInput(data, size)
    let path = scratch.write("image.vhdx", input.bytes)
    let cache = BlockCache(capacityBytes: 64 << 10, shardCount: 1)
    do {
        let image = try Image.open(path: path, format: .vhdx, cache: cache)
        try exerciseDevice(image.live)
    } catch is Qcow2Error {
    } catch {
        untypedError(error, "vhdx read")
    }
    fuzzCheck(cache.bytesUsed <= cache.capacity, "cache holds \(cache.bytesUsed) bytes, more than \(cache.capacity)")
    return 0
}

