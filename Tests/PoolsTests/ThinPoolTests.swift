import Foundation
@testable import Pools
import Block
import Synchronization
import TestSupport
import Testing

/// A thin pool written as `thin_dump` XML: the test's own statement of what every device holds.
struct ThinSpec {
    struct Run {
        var virtual: UInt64
        var data: UInt64
        var length: UInt64 = 1
        var time: UInt32 = 0
    }

    struct Device {
        var id: UInt64
        var size: UInt64
        var transaction: UInt64 = 0
        var creationTime: UInt32 = 0
        var snapTime: UInt32 = 0
        var runs: [Run]

        var mappings: [ThinMapping] {
            runs.flatMap { run in
                (0..<run.length).map { ThinMapping(virtualBlock: run.virtual + $0, dataBlock: run.data + $0, time: run.time) }
            }.sorted { $0.virtualBlock < $1.virtualBlock }
        }

        /// Virtual block → data block.
        var map: [UInt64: UInt64] {
            Dictionary(uniqueKeysWithValues: mappings.map { ($0.virtualBlock, $0.dataBlock) })
        }
    }

    static let blockSize: UInt64 = 64 << 10
    var time: UInt32 = 3
    var transaction: UInt64 = 7
    var dataBlocks: UInt64
    var devices: [Device]

    var xml: String {
        var lines = [#"<superblock uuid="" time="\#(time)" transaction="\#(transaction)" flags="0" version="2" "#
            + #"data_block_size="\#(Self.blockSize / 512)" nr_data_blocks="\#(dataBlocks)">"#]
        for device in devices {
            lines.append(#"  <device dev_id="\#(device.id)" mapped_blocks="\#(device.mappings.count)" "#
                + #"transaction="\#(device.transaction)" creation_time="\#(device.creationTime)" snap_time="\#(device.snapTime)">"#)
            for run in device.runs {
                lines.append(run.length == 1
                    ? #"    <single_mapping origin_block="\#(run.virtual)" data_block="\#(run.data)" time="\#(run.time)"/>"#
                    : #"    <range_mapping origin_begin="\#(run.virtual)" data_begin="\#(run.data)" length="\#(run.length)" time="\#(run.time)"/>"#)
            }
            lines.append("  </device>")
        }
        lines.append("</superblock>")
        return lines.joined(separator: "\n") + "\n"
    }

    func device(_ id: UInt64) -> Device { devices.first { $0.id == id }! }

    /// Scattered single blocks, ranges, a snapshot sharing data blocks with its origin, an empty
    /// device; data block 9 is a hole in the data file.
    static let small = ThinSpec(dataBlocks: 64, devices: [
        Device(id: 1, size: 40 * blockSize + 12288, runs: [
            Run(virtual: 0, data: 5), Run(virtual: 3, data: 9), Run(virtual: 7, data: 12),
            Run(virtual: 8, data: 13, time: 1), Run(virtual: 20, data: 2), Run(virtual: 39, data: 40),
            Run(virtual: 40, data: 41),
        ]),
        Device(id: 2, size: 48 * blockSize, transaction: 1, creationTime: 1, snapTime: 1, runs: [
            Run(virtual: 2, data: 20, length: 10), Run(virtual: 12, data: 31, length: 5, time: 1),
            Run(virtual: 30, data: 36, length: 12, time: 1), Run(virtual: 47, data: 60, time: 2),
        ]),
        Device(id: 3, size: 40 * blockSize + 12288, transaction: 2, creationTime: 2, snapTime: 2, runs: [
            Run(virtual: 0, data: 5), Run(virtual: 3, data: 9), Run(virtual: 7, data: 12),
            Run(virtual: 8, data: 50, time: 2), Run(virtual: 20, data: 51, time: 2), Run(virtual: 25, data: 52, time: 2),
        ]),
        Device(id: 4, size: 16 * blockSize, transaction: 3, creationTime: 3, snapTime: 3, runs: []),
    ])

    /// 40 000 scattered blocks over 128 shared data blocks: a mapping tree of three levels (the
    /// leaves thin_restore writes hold 126 entries, an internal node at most 252 children).
    static let large: ThinSpec = {
        let runs = (0..<UInt64(40_000)).map { i in
            let virtual = i * 3 + i % 2
            return Run(virtual: virtual, data: (virtual * 7) % 128, time: UInt32(virtual % 4))
        }
        return ThinSpec(time: 5, transaction: 9, dataBlocks: 128, devices: [
            Device(id: 1, size: 120_100 * blockSize, runs: runs),
            Device(id: 2, size: 64 * blockSize, transaction: 4, creationTime: 4, snapTime: 4,
                   runs: [Run(virtual: 1, data: 3), Run(virtual: 5, data: 100, length: 4, time: 3)]),
        ])
    }()
}

/// The spec restored by thin_restore into `meta.bin`, and `data.bin` whose every 8-byte word
/// names its data block and position, with `holes` punched out.
final class ThinFixture {
    let scratch: Scratch
    let spec: ThinSpec
    let holes: Set<UInt64>
    /// The bytes of each data block as written (before holes).
    let patterns: [[UInt8]]
    /// Each device's virtual block → data block.
    let maps: [UInt64: [UInt64: UInt64]]

    init(_ spec: ThinSpec, metadataMiB: Int = 4, holes: Set<UInt64> = []) throws {
        scratch = try Scratch()
        self.spec = spec
        self.holes = holes
        try scratch.write("pool.xml", Array(spec.xml.utf8))
        try scratch.sh("truncate -s \(metadataMiB)M meta.bin && thin_restore -q -i pool.xml -o meta.bin && thin_check -q meta.bin")
        patterns = (0..<spec.dataBlocks).map(Self.pattern)
        maps = Dictionary(uniqueKeysWithValues: spec.devices.map { ($0.id, $0.map) })
        try scratch.write("data.bin", patterns.flatMap { $0 })
        for block in holes.sorted() {
            try scratch.sh("fallocate -p -o \(block * ThinSpec.blockSize) -l \(ThinSpec.blockSize) data.bin")
        }
    }

    static func pattern(_ block: UInt64) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: Int(ThinSpec.blockSize))
        bytes.withUnsafeMutableBytes { buffer in
            for word in 0..<Int(ThinSpec.blockSize / 8) {
                let value = 0x8000_0000_0000_0000 | block << 32 | UInt64(word)
                buffer.storeBytes(of: value.littleEndian, toByteOffset: word * 8, as: UInt64.self)
            }
        }
        return bytes
    }

    func pool(lvmTransaction: UInt64? = nil, metadata: (any BlockDevice)? = nil,
              cachedNodes: Int = ThinPoolMetadata.defaultCachedNodes) throws -> ThinPoolMetadata {
        try ThinPoolMetadata(metadata: metadata ?? RawImage(file: HostFile(path: scratch.path("meta.bin"))),
                             expectedTransactionID: lvmTransaction, name: "vg/pool", cachedNodes: cachedNodes)
    }

    func data() throws -> RawImage { RawImage(file: try HostFile(path: scratch.path("data.bin"))) }

    func device(_ id: UInt64, in pool: ThinPoolMetadata) throws -> ThinDevice {
        try pool.device(id: id, size: spec.device(id).size, data: data())
    }

    /// What reading `count` bytes of device `id` at `offset` must give, from the spec alone.
    func expected(_ id: UInt64, at offset: UInt64, count: Int) -> [UInt8] {
        let map = maps[id]!
        var bytes: [UInt8] = []
        bytes.reserveCapacity(count)
        var pos = offset
        let end = offset + UInt64(count)
        while pos < end {
            let virtual = pos / ThinSpec.blockSize
            let within = Int(pos % ThinSpec.blockSize)
            let n = Int(min(ThinSpec.blockSize - UInt64(within), end - pos))
            if let data = map[virtual], !holes.contains(data) {
                bytes += patterns[Int(data)][within..<within + n]
            } else {
                bytes += [UInt8](repeating: 0, count: n)
            }
            pos += UInt64(n)
        }
        return bytes
    }

    /// The allocation map of device `id`, block by block from the spec, merged as QEMU merges.
    func expectedStatus(_ id: UInt64) -> [MapExtent] {
        let device = spec.device(id)
        let map = maps[id]!
        var extents: [MapExtent] = []
        var pos: UInt64 = 0
        while pos < device.size {
            let n = min(ThinSpec.blockSize, device.size - pos)
            if let data = map[pos / ThinSpec.blockSize] {
                let hole = holes.contains(data)
                extents.appendMerging(MapExtent(start: pos, length: n, depth: 0, present: true, zero: hole, data: !hole,
                                                offset: data * ThinSpec.blockSize))
            } else {
                extents.appendMerging(MapExtent(start: pos, length: n, depth: 0, present: false, zero: true, data: false))
            }
            pos += n
        }
        return extents
    }

    /// `thin_dump`'s view of the metadata: device attributes and every mapping, ranges expanded.
    func thinDump() throws -> [(attributes: [String: UInt64], mappings: [ThinMapping])] {
        var devices: [(attributes: [String: UInt64], mappings: [ThinMapping])] = []
        for line in try scratch.sh("thin_dump meta.bin").split(separator: "\n") {
            var attributes: [String: UInt64] = [:]
            for field in line.split(separator: " ") {
                let parts = field.split(separator: "=", maxSplits: 1)
                guard parts.count == 2, let value = UInt64(parts[1].filter(\.isNumber)) else { continue }
                attributes[String(parts[0])] = value
            }
            let text = line.trimmingCharacters(in: .whitespaces)
            if text.hasPrefix("<device ") {
                devices.append((attributes, []))
            } else if text.hasPrefix("<single_mapping ") {
                devices[devices.count - 1].mappings.append(ThinMapping(
                    virtualBlock: attributes["origin_block"]!, dataBlock: attributes["data_block"]!, time: UInt32(attributes["time"]!)))
            } else if text.hasPrefix("<range_mapping ") {
                for i in 0..<attributes["length"]! {
                    devices[devices.count - 1].mappings.append(ThinMapping(
                        virtualBlock: attributes["origin_begin"]! + i, dataBlock: attributes["data_begin"]! + i,
                        time: UInt32(attributes["time"]!)))
                }
            }
        }
        return devices
    }
}

/// A metadata device that counts its reads.
final class ThinCountingDevice: BlockDevice {
    let base: any BlockDevice
    let reads = Atomic<Int>(0)
    var size: UInt64 { base.size }
    init(_ base: any BlockDevice) { self.base = base }
    func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        reads.add(1, ordering: .relaxed)
        try base.plan(at: offset, length: length, into: &plan)
    }
    func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        try base.status(at: offset, length: length, detection: detection, into: &extents)
    }
}

@Suite("Thin pool metadata")
struct ThinPoolTests {
    @Test func crc32cMatchesKnownVectors() {
        func crc(_ bytes: [UInt8]) -> UInt32 { bytes.withUnsafeBytes { CRC32C.checksum($0) } }
        #expect(crc(Array("123456789".utf8)) == 0xE306_9283)
        // RFC 3720 B.4: 32 bytes of zeros, of ones, ascending, descending.
        #expect(crc([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(crc([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        #expect(crc((0..<32).map { UInt8($0) }) == 0x46DD_794E)
        #expect(crc((0..<32).map { UInt8(31 - $0) }) == 0x113F_DB5C)
        // Slicing by 8 agrees with the byte loop at every length and alignment.
        let bytes = (0..<200).map { UInt8(truncatingIfNeeded: $0 &* 37 &+ 11) }
        for start in 0..<9 {
            for end in stride(from: start, through: bytes.count, by: 13) {
                let sliced = bytes.withUnsafeBytes { CRC32C.update(~0, UnsafeRawBufferPointer(rebasing: $0[start..<end])) }
                var plain: UInt32 = ~0
                for byte in bytes[start..<end] {
                    plain ^= UInt32(byte)
                    for _ in 0..<8 { plain = plain & 1 != 0 ? (plain >> 1) ^ 0x82F6_3B78 : plain >> 1 }
                }
                #expect(sliced == plain, "bytes \(start)..<\(end)")
            }
        }
    }

    @Test func superblockFieldsComeFromThinRestore() throws {
        let fixture = try ThinFixture(.small)
        let pool = try fixture.pool(lvmTransaction: 7)
        #expect(pool.dataBlockSize == 64 << 10)
        #expect(pool.transactionID == 7)
        #expect(pool.dataBlockCount == 64)
        #expect(pool.needsCheck == false)
        #expect(pool.superblock.time == 3)
        // lvm2 behind the superblock (a commit it has not recorded yet) is not a pending message.
        #expect(try fixture.pool(lvmTransaction: 6).transactionID == 7)
    }

    @Test func everyDeviceReadsByteForByte() throws {
        let fixture = try ThinFixture(.small, holes: [9])
        let pool = try fixture.pool()
        var random = SplitMix(seed: 0x7417)
        for spec in fixture.spec.devices {
            let device = try fixture.device(spec.id, in: pool)
            #expect(device.size == spec.size)
            #expect(try device.read(at: 0, count: Int(spec.size)) == fixture.expected(spec.id, at: 0, count: Int(spec.size)),
                    "device \(spec.id)")
            for _ in 0..<200 {
                let offset = UInt64.random(in: 0..<spec.size, using: &random)
                let count = Int.random(in: 1...Int(min(spec.size - offset, 600_000)), using: &random)
                #expect(try device.read(at: offset, count: count) == fixture.expected(spec.id, at: offset, count: count),
                        "device \(spec.id) at \(offset) count \(count)")
            }
            var offset: UInt64 = 0
            while offset < spec.size {
                let count = Int(min(512 << 10, spec.size - offset))
                #expect(try device.read(at: offset, count: count) == fixture.expected(spec.id, at: offset, count: count))
                offset += UInt64(count)
            }
        }
    }

    @Test func statusFollowsTheMapping() throws {
        let fixture = try ThinFixture(.small, holes: [9])
        let pool = try fixture.pool()
        for spec in fixture.spec.devices {
            let device = try fixture.device(spec.id, in: pool)
            #expect(try device.status() == fixture.expectedStatus(spec.id), "device \(spec.id)")
            #expect(try device.status(detection: .metadataOnly) == fixture.expectedStatus(spec.id))
            // Windows that start and end inside blocks see the same map, clipped.
            let whole = fixture.expectedStatus(spec.id)
            for (start, length) in [(UInt64(100), UInt64(700_000)), (65_000, 1), (3 * 65_536 + 7, 9 * 65_536)]
            where start + length <= spec.size {
                var clipped: [MapExtent] = []
                for var extent in whole where extent.start < start + length && extent.start + extent.length > start {
                    let from = max(extent.start, start), to = min(extent.start + extent.length, start + length)
                    extent.offset = extent.offset.map { $0 + (from - extent.start) }
                    extent.start = from
                    extent.length = to - from
                    clipped.appendMerging(extent)
                }
                #expect(try device.status(at: start, length: length) == clipped, "device \(spec.id) at \(start)")
            }
            let mapped = spec.map.filter { !fixture.holes.contains($0.value) }.keys
            let allocated = mapped.reduce(UInt64(0)) { $0 + min(ThinSpec.blockSize, spec.size - $1 * ThinSpec.blockSize) }
            #expect(try device.allocatedBytes() == allocated, "device \(spec.id)")
        }
    }

    @Test func listingsMatchTheSpecAndThinDump() throws {
        let fixture = try ThinFixture(.small)
        let pool = try fixture.pool()
        let dump = try fixture.thinDump()
        #expect(dump.count == fixture.spec.devices.count)
        let devices = try pool.devices()
        #expect(devices.map(\.id) == fixture.spec.devices.map(\.id))
        for ((details, spec), dumped) in zip(zip(devices, fixture.spec.devices), dump) {
            #expect(details == ThinDeviceDetails(id: spec.id, mappedBlocks: UInt64(spec.mappings.count), transactionID: spec.transaction,
                                                 creationTime: spec.creationTime, snapshottedTime: spec.snapTime))
            #expect(dumped.attributes == ["dev_id": details.id, "mapped_blocks": details.mappedBlocks, "transaction": details.transactionID,
                                          "creation_time": UInt64(details.creationTime), "snap_time": UInt64(details.snapshottedTime)])
            var listed: [ThinMapping] = []
            try fixture.device(spec.id, in: pool).forEachMapping { listed.append($0) }
            #expect(listed == spec.mappings, "device \(spec.id)")
            #expect(listed == dumped.mappings, "device \(spec.id)")
        }
    }

    @Test func consecutiveDataBlocksMergeIntoOneHostRun() throws {
        let fixture = try ThinFixture(.small)
        let device = try fixture.device(2, in: try fixture.pool())
        let data = try fixture.data()
        // Virtual blocks 2..<10 are data blocks 20..<28: one pread of 512 KiB.
        let plan = try device.plan(at: 2 * ThinSpec.blockSize, length: 512 << 10)
        #expect(plan.segments.count == 1)
        if case .host(let file, let offset, let length)? = plan.segments.first {
            #expect(file === data.file || file.path == data.file.path)
            #expect(offset == 20 * ThinSpec.blockSize && length == 512 << 10)
        } else {
            Issue.record("expected one host segment, got \(plan.segments)")
        }
        // 10..<12 (data 28, 29) then 12..<17 (data 31...): two runs; 17..<30 is unmapped: zeros.
        let split = try device.plan(at: 10 * ThinSpec.blockSize, length: Int(20 * ThinSpec.blockSize))
        #expect(split.segments.map(\.length) == [2 << 16, 5 << 16, 13 << 16])
        if case .zero? = split.segments.last {} else { Issue.record("unmapped blocks must plan as zeros") }
    }

    @Test func largeTreeHasInternalLevelsAndReadsCorrectly() throws {
        let fixture = try ThinFixture(.large, metadataMiB: 8)
        let pool = try fixture.pool(lvmTransaction: 9)
        let device = try fixture.device(1, in: pool)
        // Root and its children are internal nodes: two levels of internal nodes above the leaves.
        let root = try pool.node(device.root, referencedBy: device.rootParent)
        #expect(!root.isLeaf)
        #expect(!(try pool.node(root.value64(0), referencedBy: root.block)).isLeaf)
        #expect(!(try pool.node(root.value64(root.count - 1), referencedBy: root.block)).isLeaf)

        var listed: [ThinMapping] = []
        try device.forEachMapping { listed.append($0) }
        #expect(listed == fixture.spec.device(1).mappings)
        #expect(try listed == fixture.thinDump()[0].mappings)
        #expect(try device.status() == fixture.expectedStatus(1))

        var random = SplitMix(seed: 40_000)
        for _ in 0..<200 {
            let offset = UInt64.random(in: 0..<device.size, using: &random)
            let count = Int.random(in: 1...Int(min(device.size - offset, 768 << 10)), using: &random)
            #expect(try device.read(at: offset, count: count) == fixture.expected(1, at: offset, count: count), "at \(offset) count \(count)")
        }
        // Reads that cross from one leaf to the next (each leaf covers 126 keys, about 378 blocks).
        for leafEdge in stride(from: UInt64(370), to: 4000, by: 378) {
            let offset = leafEdge * ThinSpec.blockSize + 1000
            #expect(try device.read(at: offset, count: 1 << 20) == fixture.expected(1, at: offset, count: 1 << 20))
        }
    }

    @Test func nodeCacheStaysBoundedAndServesRepeatedReads() throws {
        let fixture = try ThinFixture(.large, metadataMiB: 8)
        let metadata = ThinCountingDevice(RawImage(file: try HostFile(path: fixture.scratch.path("meta.bin"))))
        let small = try fixture.pool(metadata: metadata, cachedNodes: 4)
        let device = try fixture.device(1, in: small)
        var random = SplitMix(seed: 4)
        for _ in 0..<100 {
            let offset = UInt64.random(in: 0..<device.size - (1 << 19), using: &random)
            #expect(try device.read(at: offset, count: 1 << 19) == fixture.expected(1, at: offset, count: 1 << 19))
        }
        #expect(small.cache.count == 4)

        let counted = ThinCountingDevice(RawImage(file: try HostFile(path: fixture.scratch.path("meta.bin"))))
        let pool = try fixture.pool(metadata: counted)
        let cached = try fixture.device(1, in: pool)
        _ = try cached.read(at: 5000 * ThinSpec.blockSize, count: 1 << 19)
        let before = counted.reads.load(ordering: .relaxed)
        for _ in 0..<50 { _ = try cached.read(at: 5000 * ThinSpec.blockSize, count: 1 << 19) }
        #expect(counted.reads.load(ordering: .relaxed) == before)
        #expect(before <= 8, "superblock, top-level leaf, details leaf and one path of three nodes")
    }

    @Test func unknownDevicesAndTinyMetadataAreErrors() throws {
        let fixture = try ThinFixture(.small)
        let pool = try fixture.pool()
        #expect(throws: ThinMetadataError.pool("vg/pool", .unknownDevice(id: 99))) {
            try pool.device(id: 99, size: 1 << 20, data: fixture.data())
        }
        try fixture.scratch.sh("head -c 100 meta.bin > tiny.bin")
        #expect(throws: ThinMetadataError.pool("vg/pool", .metadataTooSmall(bytes: 100))) {
            try ThinPoolMetadata(metadata: RawImage(file: HostFile(path: fixture.scratch.path("tiny.bin"))),
                                 expectedTransactionID: nil, name: "vg/pool")
        }
    }
}

/// Hostile metadata: a valid thin_restore image with one field changed; where a checksum would
/// catch the change first, the block is resealed so that only the check under test can.
@Suite("Thin pool metadata, hostile")
struct ThinHostileTests {
    /// Block numbers of the valid image, read straight from its bytes.
    struct Layout {
        var bytes: [UInt8]
        /// The top-level mapping leaf, the big device's root (internal), its second child
        /// (internal), the first leaf, and the details leaf.
        var top: UInt64 = 0, root: UInt64 = 0, inner: UInt64 = 0, leaf: UInt64 = 0, details: UInt64 = 0

        init(_ bytes: [UInt8]) {
            self.bytes = bytes
            top = u64(0, 320)
            details = u64(0, 328)
            root = value(top, 0)
            inner = value(root, 1)
            leaf = value(value(root, 0), 0)
        }

        func u64(_ block: UInt64, _ at: Int) -> UInt64 {
            (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[Int(block) * 4096 + at + $1]) << (8 * $1) }
        }
        func u32(_ block: UInt64, _ at: Int) -> UInt32 { UInt32(truncatingIfNeeded: u64(block, at)) }
        func key(_ block: UInt64, _ i: Int) -> UInt64 { u64(block, 32 + 8 * i) }
        func value(_ block: UInt64, _ i: Int) -> UInt64 { u64(block, 32 + 8 * Int(u32(block, 20)) + 8 * i) }

        mutating func set64(_ block: UInt64, _ at: Int, _ value: UInt64) {
            for i in 0..<8 { bytes[Int(block) * 4096 + at + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
        }
        mutating func set32(_ block: UInt64, _ at: Int, _ value: UInt32) {
            for i in 0..<4 { bytes[Int(block) * 4096 + at + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
        }
        mutating func setValue(_ block: UInt64, _ i: Int, _ value: UInt64) { set64(block, 32 + 8 * Int(u32(block, 20)) + 8 * i, value) }

        /// Recomputes the block's checksum (superblock or node salt).
        mutating func reseal(_ block: UInt64) {
            let start = Int(block) * 4096
            let sum = bytes.withUnsafeBytes {
                CRC32C.dmChecksum(UnsafeRawBufferPointer(rebasing: $0[start + 4..<start + 4096]), xor: block == 0 ? 160_774 : 121_107)
            }
            set32(block, 0, sum)
        }

        /// A node written from scratch into a free block.
        mutating func writeNode(_ block: UInt64, leaf: Bool, keys: [UInt64], values: [UInt64]) {
            let start = Int(block) * 4096
            bytes.replaceSubrange(start..<start + 4096, with: [UInt8](repeating: 0, count: 4096))
            set32(block, 4, leaf ? 2 : 1)
            set64(block, 8, block)
            set32(block, 16, UInt32(keys.count))
            set32(block, 20, 252)
            set32(block, 24, 8)
            for (i, key) in keys.enumerated() { set64(block, 32 + 8 * i, key) }
            for (i, value) in values.enumerated() { setValue(block, i, value) }
            reseal(block)
        }
    }

    enum Corruption: String, CaseIterable, CustomTestStringConvertible {
        case superblockMagic, superblockChecksum, superblockLocation, dataBlockSize, incompatFeature, lvmAhead
        case nodeChecksum, nodeLocation, nodeFlags, tooManyEntries, maxEntriesTooLarge, entrySizeOverflows, detailsValueSize
        case keysNotIncreasing, keyBelowParent, childPastEnd, loopToAncestor, emptyInternalNode, chainTooDeep
        case dataDeviceTooShort

        var testDescription: String { rawValue }

        /// Changes the image (or the setting) and returns the error it must produce.
        func apply(_ m: inout Layout, lvm: inout UInt64?, dataBlocks: inout UInt64) -> ThinMetadataError {
            switch self {
            case .superblockMagic:
                m.bytes[32] ^= 1
                return .badMagic(27_022_010 ^ 1)
            case .superblockChecksum:
                m.bytes[16] ^= 0xFF   // uuid
                return .superblockChecksum
            case .superblockLocation:
                m.set64(0, 8, 5); m.reseal(0)
                return .superblockLocation(recorded: 5)
            case .dataBlockSize:
                m.set32(0, 336, 100); m.reseal(0)
                return .dataBlockSize(sectors: 100)
            case .incompatFeature:
                m.set32(0, 360, 1); m.reseal(0)
                return .unsupportedFeatures(incompat: 1)
            case .lvmAhead:
                lvm = 10
                return .pendingTransaction(metadata: 9, lvm: 10)
            case .nodeChecksum:
                m.bytes[Int(m.leaf) * 4096 + 100] ^= 1
                return .nodeChecksum(block: m.leaf)
            case .nodeLocation:
                m.set64(m.leaf, 8, m.leaf + 1000); m.reseal(m.leaf)
                return .nodeLocation(block: m.leaf, recorded: m.leaf + 1000)
            case .nodeFlags:
                m.set32(m.leaf, 4, 3); m.reseal(m.leaf)
                return .nodeFlags(block: m.leaf, flags: 3)
            case .tooManyEntries:
                m.set32(m.leaf, 16, 253); m.reseal(m.leaf)
                return .tooManyEntries(block: m.leaf, entries: 253, maxEntries: 252)
            case .maxEntriesTooLarge:
                m.set32(m.leaf, 20, 255); m.reseal(m.leaf)   // 32 + 16 × 255 = 4112 bytes
                return .maxEntriesTooLarge(block: m.leaf, maxEntries: 255, valueSize: 8)
            case .entrySizeOverflows:
                // (8 + value size) × max entries passes 2^64: a fuzzer's crash, now an error.
                m.set32(m.leaf, 20, 0xFFFF_FFFF); m.set32(m.leaf, 24, 0xFFFF_FFFF); m.reseal(m.leaf)
                return .maxEntriesTooLarge(block: m.leaf, maxEntries: 0xFFFF_FFFF, valueSize: 0xFFFF_FFFF)
            case .detailsValueSize:
                m.set32(m.details, 24, 8); m.reseal(m.details)
                return .valueSize(block: m.details, found: 8, expected: 24)
            case .keysNotIncreasing:
                m.set64(m.leaf, 32 + 8 * 5, m.key(m.leaf, 4)); m.reseal(m.leaf)
                return .keysNotIncreasing(block: m.leaf, index: 5)
            case .keyBelowParent:
                let child = m.value(m.inner, 3)
                m.set64(child, 32, m.key(m.inner, 3) - 1); m.reseal(child)
                return .keyOutsideParent(block: child, parent: m.inner)
            case .childPastEnd:
                m.setValue(m.root, 1, 5_000_000); m.reseal(m.root)
                return .blockPastEnd(block: 5_000_000, referencedBy: m.root)
            case .loopToAncestor:
                m.setValue(m.inner, 3, m.root); m.reseal(m.inner)
                return .loop(block: m.root, parent: m.inner)
            case .emptyInternalNode:
                m.set32(m.root, 16, 0); m.reseal(m.root)
                return .emptyInternalNode(block: m.root)
            case .chainTooDeep:
                // 70 internal nodes in a chain (each in its own free block) over an empty leaf.
                let chain = (0..<UInt64(71)).map { 1900 + $0 }
                for (i, block) in chain.enumerated() {
                    if i == 70 { m.writeNode(block, leaf: true, keys: [], values: []) }
                    else { m.writeNode(block, leaf: false, keys: [0], values: [chain[i + 1]]) }
                }
                m.setValue(m.top, 0, chain[0]); m.reseal(m.top)
                return .tooDeep(block: chain[63])
            case .dataDeviceTooShort:
                dataBlocks = 100
                let first = ThinSpec.large.device(1).mappings.first { $0.dataBlock >= 100 }!
                return .dataBlockPastEnd(device: 1, virtualBlock: first.virtualBlock, dataBlock: first.dataBlock, dataBlocks: 100)
            }
        }
    }

    /// Everything a mount does with a pool: open it, open each device, list, map and read.
    static func exercise(_ fixture: ThinFixture, metadata: String, data: String, lvm: UInt64?) throws {
        let pool = try ThinPoolMetadata(metadata: RawImage(file: HostFile(path: metadata)),
                                        expectedTransactionID: lvm, name: "vg/pool")
        let data = RawImage(file: try HostFile(path: data))
        for details in try pool.devices() {
            let device = try pool.device(id: details.id, size: fixture.spec.device(details.id).size, data: data)
            try device.forEachMapping { _ in }
            _ = try device.status()
            _ = try device.read(at: 0, count: 1 << 20)
        }
    }

    @Test func theValidImagePassesEveryCheck() throws {
        let fixture = try ThinFixture(.large, metadataMiB: 8)
        try Self.exercise(fixture, metadata: fixture.scratch.path("meta.bin"), data: fixture.scratch.path("data.bin"), lvm: 9)
        let layout = Layout(try fixture.scratch.bytes("meta.bin"))
        // The layout the corruptions rely on: a top-level leaf over a three-level device tree.
        #expect(layout.u32(layout.top, 4) == 2 && layout.u32(layout.root, 4) == 1 && layout.u32(layout.inner, 4) == 1)
        #expect(layout.u32(layout.leaf, 4) == 2 && layout.u32(layout.inner, 16) > 3)
        #expect((1900..<1971).allSatisfy { layout.u64(UInt64($0), 8) == 0 }, "blocks 1900... are free")
    }

    /// Random fields of the tree's nodes set to random values, each block resealed so that the
    /// structural checks, not the checksum, meet it: every outcome is a value or a typed error.
    @Test func randomNodeFieldsNeverCrashOrHang() throws {
        let fixture = try ThinFixture(.large, metadataMiB: 8)
        let pristine = Layout(try fixture.scratch.bytes("meta.bin"))
        try fixture.scratch.sh("cp meta.bin bad.bin")
        let file = try HostFile(path: fixture.scratch.path("bad.bin"), writable: true)
        let data = try fixture.data()
        let targets = [pristine.top, pristine.root, pristine.inner, pristine.leaf, pristine.details, pristine.value(pristine.inner, 2)]
        var random = SplitMix(seed: 0xBAD)
        var outcomes: [String: Int] = [:]
        for round in 0..<200 {
            var layout = pristine
            let block = targets[round % targets.count]
            for _ in 0..<Int.random(in: 1...3, using: &random) {
                let at = Bool.random(using: &random) ? Int.random(in: 4..<8, using: &random) * 4 : Int.random(in: 4..<1024, using: &random) * 4
                let value: UInt64 = switch Int.random(in: 0..<4, using: &random) {
                case 0: UInt64.random(in: 0..<4, using: &random)
                case 1: UInt64.random(in: 0..<2048, using: &random)
                case 2: pristine.u64(block, at) &+ (Bool.random(using: &random) ? 1 : ~0)
                default: random.next()
                }
                layout.set32(block, at, UInt32(truncatingIfNeeded: value))
            }
            layout.reseal(block)
            let start = Int(block) * 4096
            try file.write(Array(layout.bytes[start..<start + 4096]), at: UInt64(start))
            do {
                let pool = try ThinPoolMetadata(metadata: RawImage(file: file), expectedTransactionID: 9, name: "vg/pool")
                for details in try pool.devices() {
                    let device = try pool.device(id: details.id, size: 1 << 30, data: data)
                    var count = 0
                    try device.forEachMapping { _ in count += 1 }
                    #expect(count <= 40_000 + 5 || details.id != 1)
                    _ = try device.status(at: 0, length: 256 << 20)
                    _ = try device.read(at: UInt64(round) << 20, count: 1 << 20)
                }
                outcomes["read", default: 0] += 1
            } catch let error as ThinMetadataError {
                guard case .pool(_, let inner) = error else { Issue.record("unwrapped \(error)"); continue }
                outcomes[Mirror(reflecting: inner).children.first?.label ?? "\(inner)", default: 0] += 1
            }
            try file.write(Array(pristine.bytes[start..<start + 4096]), at: UInt64(start))
        }
        // The rounds reached several different checks, not one early failure.
        #expect(outcomes.count >= 6, "\(outcomes)")
    }

    @Test(arguments: Corruption.allCases)
    func corruptionIsCaughtByItsCheck(_ corruption: Corruption) throws {
        let fixture = try ThinFixture(.large, metadataMiB: 8)
        var layout = Layout(try fixture.scratch.bytes("meta.bin"))
        var lvm: UInt64? = 9
        var dataBlocks = fixture.spec.dataBlocks
        let expected = corruption.apply(&layout, lvm: &lvm, dataBlocks: &dataBlocks)
        try fixture.scratch.write("bad.bin", layout.bytes)
        try fixture.scratch.sh("truncate -s \(dataBlocks * ThinSpec.blockSize) data.bin")
        #expect(throws: ThinMetadataError.pool("vg/pool", expected)) {
            try Self.exercise(fixture, metadata: fixture.scratch.path("bad.bin"), data: fixture.scratch.path("data.bin"), lvm: lvm)
        }
    }
}
