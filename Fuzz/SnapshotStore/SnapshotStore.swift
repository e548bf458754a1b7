// libFuzzer target: the dm-snapshot persistent exception store (a classic LVM snapshot's COW).
// The input is a 4-byte origin size (little-endian, in 512-byte sectors, mod 64 MiB) followed by
// the COW's bytes. `ClassicSnapshotDevice` is built over a sparse origin file of that size and
// the COW; the snapshot is then read (its first 256 KiB, its last 64 KiB, and each exception
// checked against the COW's copy) and its status taken over the whole origin. A crash, a hang, or
// an error other than `ExceptionStoreError` / `Qcow2Error` is a finding.
import FuzzSupport
@testable import Pools
import Block

let scratch = FuzzDirectory()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let originSize = UInt64(input.u32() % (128 << 10)) * 512
    let cowBytes = input.rest()
    do {
        let origin = RawImage(file: try HostFile(path: scratch.patternFile("origin.raw", size: originSize, patterned: 16 << 10)))
        let cow = RawImage(file: try HostFile(path: scratch.write("cow.raw", cowBytes)))
        let snapshot = try ClassicSnapshotDevice(origin: origin, cow: cow, name: "vg/snap")
        fuzzCheck(snapshot.size == originSize, "snapshot size \(snapshot.size) is not the origin's \(originSize)")
        _ = try snapshot.read(at: 0, count: 256 << 10)
        if originSize > 64 << 10 { _ = try snapshot.read(at: originSize - (64 << 10), count: 64 << 10) }
        for run in snapshot.runs.prefix(16) {
            let at = run.oldChunk * snapshot.chunkSize
            let n = Int(min(512, originSize - at))
            let copy = try cow.read(at: run.newChunk * snapshot.chunkSize, count: n)
            let got = try snapshot.read(at: at, count: n)
            fuzzCheck(got == copy, "chunk \(run.oldChunk) does not read as its copy in COW chunk \(run.newChunk)")
        }
        let extents = try snapshot.status(at: 0, length: originSize)
        fuzzCheck(extents.reduce(0) { $0 + $1.length } == originSize, "status does not cover the origin")
    } catch is ExceptionStoreError {
    } catch is Qcow2Error {
    } catch {
        untypedError(error, "dm-snapshot store")
    }
    return 0
}
