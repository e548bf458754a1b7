// libFuzzer target: dm-thin pool metadata. The input is the metadata device's bytes (4 KiB
// blocks); every block's checksum is recomputed before parsing (the superblock's salt for block
// 0, the btree node salt for the others), so mutations reach the btree checks rather than dying
// at the checksum. `ThinPoolMetadata` lists the devices; each of the first eight is opened as a
// 1 TiB `ThinDevice` over a sparse 4 GiB data file, its mappings are walked, its first 256 KiB
// and its first mapped blocks are read, and its status is taken over the whole device. A crash,
// a hang, or an error other than `ThinMetadataError` / `Qcow2Error` is a finding.
import FuzzSupport
@testable import Pools
import Block

let scratch = FuzzDirectory()
nonisolated(unsafe) var dataDevice: RawImage?

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    if dataDevice == nil {
        dataDevice = RawImage(file: try! HostFile(path: scratch.patternFile("data.raw", size: 4 << 30, patterned: 128 << 10)))
    }
    var metadata = Array(FuzzInput(data, size).bytes)
    reseal(&metadata)
    do {
        let pool = try ThinPoolMetadata(metadata: RawImage(file: try HostFile(path: scratch.write("meta.raw", metadata))),
                                        expectedTransactionID: nil, name: "vg/pool", cachedNodes: 8)
        for details in try pool.devices().prefix(8) {
            do {
                try exercise(try pool.device(id: details.id, size: 1 << 40, data: dataDevice!))
            } catch let error as ThinMetadataError {
                if case .pool(_, .unknownDevice) = error { continue }
                throw error
            }
        }
    } catch is ThinMetadataError {
    } catch is Qcow2Error {
    } catch {
        untypedError(error, "dm-thin metadata")
    }
    return 0
}

func exercise(_ device: ThinDevice) throws {
    var mappings: [ThinMapping] = []
    var previous: UInt64?
    try device.forEachMapping { mapping in
        fuzzCheck(previous.map { mapping.virtualBlock > $0 } ?? true, "mappings out of order at block \(mapping.virtualBlock)")
        previous = mapping.virtualBlock
        if mappings.count < 16 { mappings.append(mapping) }
    }
    _ = try device.read(at: 0, count: 256 << 10)
    let blockSize = device.pool.dataBlockSize
    for mapping in mappings where mapping.virtualBlock < device.size / blockSize {
        _ = try device.read(at: mapping.virtualBlock * blockSize, count: 4096)
    }
    let extents = try device.status(at: 0, length: device.size)
    fuzzCheck(extents.reduce(0) { $0 + $1.length } == device.size, "status does not cover the device")
}

/// Recomputes each 4 KiB block's checksum as dm_bm_checksum does: block 0 as the superblock.
func reseal(_ bytes: inout [UInt8]) {
    for start in stride(from: 0, to: bytes.count - 4095, by: 4096) {
        let sum = bytes.withUnsafeBytes {
            CRC32C.dmChecksum(UnsafeRawBufferPointer(rebasing: $0[start + 4..<start + 4096]), xor: start == 0 ? 160_774 : 121_107)
        }
        for i in 0..<4 { bytes[start + i] = UInt8(truncatingIfNeeded: sum >> (8 * i)) }
    }
}
