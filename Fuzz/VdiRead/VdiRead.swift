// libFuzzer target: the vdi reader. The input is an image file, opened as a declared vdi over a
// 64 KiB cache; the disk is read (whole up to 1 MiB; beyond, its first 512 KiB, its last 64 KiB
// and the start of every data extent `status` reports), mapped, and its st_blocks computed. A
// crash, a hang, an allocation beyond libFuzzer's limit or an error that is not a `Qcow2Error`
// is a finding. vdi names no other files.
import FuzzSupport
@testable import Block

let scratch = FuzzDirectory()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let input = FuzzInput(data, size)
    let path = scratch.write("image.vdi", input.bytes)
    let cache = BlockCache(capacityBytes: 64 << 10, shardCount: 1)
    do {
        let image = try Image.open(path: path, format: .vdi, cache: cache)
        try exerciseDevice(image.live)
    } catch is Qcow2Error {
    } catch {
        untypedError(error, "vdi read")
    }
    fuzzCheck(cache.bytesUsed <= cache.capacity, "cache holds \(cache.bytesUsed) bytes, more than \(cache.capacity)")
    return 0
}
