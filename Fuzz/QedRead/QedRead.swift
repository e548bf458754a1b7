// libFuzzer target: the qed reader. The input is an image file, opened as a declared qed over a
// 64 KiB cache, then read, mapped and counted as in VdiRead (Exercise.swift).
//
// Backing files: the scratch directory holds `backing.raw` (a raw file) and `copy.qed` (written
// as a copy of the input when the input names it, so a qed backing a qed is explored, probed);
// an input naming any other path with a `/` (or `.`, `..`) is skipped, so nothing outside the
// scratch directory is ever opened.
import FuzzSupport
@testable import Block

let scratch = FuzzDirectory()
nonisolated(unsafe) var prepared = false

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    if !prepared {
        scratch.patternFile("backing.raw", size: 3 << 20, patterned: 256 << 10)
        prepared = true
    }
    let input = FuzzInput(data, size)
    let name = backingName(input.bytes)
    if let name, !isLocalName(name) { return -1 }
    let path = scratch.write("image.qed", input.bytes)
    if name == "copy.qed" { scratch.write("copy.qed", input.bytes) }
    let cache = BlockCache(capacityBytes: 64 << 10, shardCount: 1)
    do {
        let image = try Image.open(path: path, format: .qed, cache: cache)
        try exerciseDevice(image.live)
    } catch is Qcow2Error {
    } catch {
        untypedError(error, "qed read")
    }
    fuzzCheck(cache.bytesUsed <= cache.capacity, "cache holds \(cache.bytesUsed) bytes, more than \(cache.capacity)")
    return 0
}

/// The backing file name the header names, as the reader reads it; nil when the header does
/// not parse or names none.
func backingName(_ bytes: UnsafeRawBufferPointer) -> String? {
    let head = Array(bytes.prefix(QedHeader.length))
    guard let header = try? QedHeader.parse(head, fileSize: UInt64(bytes.count)), header.hasBacking else { return nil }
    let start = Int(header.backingNameOffset)
    let end = min(bytes.count, start + Int(header.backingNameSize))
    guard start < end else { return "" }
    return String(decoding: bytes[start..<end].prefix { $0 != 0 }, as: UTF8.self)
}
