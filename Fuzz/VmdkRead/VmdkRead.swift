// libFuzzer target: the vmdk reader. The input is an image file (a sparse KDMV/COWD file or a
// text descriptor); it is opened with the engine's normal API over a 64 KiB cache, then the disk
// is read (whole up to 1 MiB; beyond, its first 512 KiB, its last 64 KiB and the start of every
// extent that `status` reports), its allocation status and st_blocks are computed. A crash, a
// hang, an allocation beyond libFuzzer's limit or an error that is not a `Qcow2Error` is a finding.
//
// Files a descriptor names: the scratch directory holds `flat.raw` (a patterned raw file, for
// FLAT extents) and `copy.vmdk` (written as a copy of the input when the input names it, so
// SPARSE extents, parents and loops are explored); an input that names any other file is
// skipped, so nothing outside the scratch directory is ever opened.
import FuzzSupport
import Glibc
@testable import Block

let scratch = FuzzDirectory()
nonisolated(unsafe) var prepared = false
let allowedNames: Set<String> = ["flat.raw", "copy.vmdk", "image.vmdk"]

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    if !prepared {
        scratch.patternFile("flat.raw", size: 2 << 20, patterned: 256 << 10)
        prepared = true
    }
    let input = FuzzInput(data, size)
    let names = namedFiles(Array(input.bytes.prefix(VmdkDescriptor.maximumLength)))
    guard names.allSatisfy(allowedNames.contains) else { return -1 }
    let path = scratch.write("image.vmdk", input.bytes)
    if names.contains("copy.vmdk") { scratch.write("copy.vmdk", input.bytes) }
    let cache = BlockCache(capacityBytes: 64 << 10, shardCount: 1)
    do {
        let image = try Image.open(path: path, format: .vmdk, cache: cache)
        try exerciseDevice(image.live)
    } catch is Qcow2Error {
    } catch {
        untypedError(error, "vmdk read")
    }
    fuzzCheck(cache.bytesUsed <= cache.capacity, "cache holds \(cache.bytesUsed) bytes, more than \(cache.capacity)")
    return 0
}

/// Every file name the input's descriptor (its own text, or the one a sparse header embeds)
/// could make the reader open.
func namedFiles(_ bytes: [UInt8]) -> [String] {
    var names: [String] = []
    for start in [0, 512] where bytes.count > start {
        guard let descriptor = try? VmdkDescriptor.parse(Array(bytes[start...])) else { continue }
        names += descriptor.extents.compactMap(\.fileName)
        if let parent = descriptor.parentFileNameHint { names.append(parent) }
    }
    // A sparse header may put its descriptor anywhere: any quoted name there is checked too.
    if bytes.starts(with: Array("KDMV".utf8)) {
        let text = String(decoding: bytes.map { $0 == 0 ? 10 : $0 }, as: UTF8.self)
        if let descriptor = try? VmdkDescriptor.parse(Array(text.utf8)) {
            names += descriptor.extents.compactMap(\.fileName)
            if let parent = descriptor.parentFileNameHint { names.append(parent) }
        }
    }
    return names
}

