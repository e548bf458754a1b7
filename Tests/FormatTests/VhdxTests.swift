import Foundation
import TestSupport
@testable import Block
import Testing

/// The vhdx reader against qemu-img 7.2: bytes byte for byte with `qemu-img convert`. QEMU's
/// `qemu-img map` reports every byte of a VHDX as data, so allocation is checked against the
/// block states of the BAT instead: exactly the blocks the patterns wrote are data.
@Suite("vhdx reader") struct VhdxTests {
    static let sizes: [UInt64] = [1 << 20, (5 << 20) + 512, 127 << 20]

    /// Writes the patterns (inside a block, across 2047k..2049k, the last 4 KiB) and returns
    /// the byte ranges written.
    @discardableResult
    static func writePatterns(_ name: String, size: UInt64, in scratch: Scratch) throws -> [Range<UInt64>] {
        var ranges: [Range<UInt64>] = [size - 4096..<size]
        if size >= (1 << 20) + 65536 { ranges.append((1 << 20)..<(1 << 20) + 65536) }
        if size >= 2049 << 10 { ranges.append((2047 << 10)..<(2049 << 10)) }
        let commands = ranges.enumerated().map { "-c 'write -P \(0x22 + $0.offset) \($0.element.lowerBound) \($0.element.count)'" }
        try scratch.sh("qemu-io -f vhdx \(commands.joined(separator: " ")) '\(name)' >/dev/null")
        return ranges
    }

    static func blockSize(_ name: String, in scratch: Scratch) throws -> UInt64 {
        let json = try scratch.sh("qemu-img info -f vhdx --output=json '\(name)'")
        let info = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [String: Any]
        return (info["cluster-size"] as! NSNumber).uint64Value
    }

    /// The data extents are exactly the blocks the writes touched (dynamic disks), or every
    /// block (fixed disks made with block_state_zero=off).
    static func expectAllocation(_ image: Image, blocks expected: Set<UInt64>, blockSize: UInt64,
                                 sourceLocation: SourceLocation = #_sourceLocation) throws {
        var data = Set<UInt64>()
        for extent in try image.live.status() where extent.data {
            #expect(!extent.zero, sourceLocation: sourceLocation)
            var b = extent.start / blockSize
            while b * blockSize < extent.start + extent.length { data.insert(b); b += 1 }
        }
        #expect(data == expected, "data blocks \(data.sorted()), expected \(expected.sorted())", sourceLocation: sourceLocation)
        let bytes = expected.reduce(UInt64(0)) { $0 + min(blockSize, image.live.size - $1 * blockSize) }
        #expect(try image.live.allocatedBytes() == bytes, sourceLocation: sourceLocation)
    }

    static func touched(_ ranges: [Range<UInt64>], blockSize: UInt64) -> Set<UInt64> {
        Set(ranges.flatMap { Array($0.lowerBound / blockSize...($0.upperBound - 1) / blockSize) })
    }

    @Test(arguments: ["", "block_size=1M", "block_size=8M,log_size=2M", "block_state_zero=off"], sizes)
    func dynamicMatchesQemuImg(options: String, size: UInt64) throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vhdx \(options.isEmpty ? "" : "-o \(options)") d.vhdx \(size)")
        if size < 64 << 20 { try FormatOracle.expectMatchesQemu("d.vhdx", format: .vhdx, in: scratch, checkMap: false) }
        let ranges = try Self.writePatterns("d.vhdx", size: size, in: scratch)
        let image = try FormatOracle.expectMatchesQemu("d.vhdx", format: .vhdx, in: scratch, checkMap: false)
        let blockSize = try Self.blockSize("d.vhdx", in: scratch)
        try Self.expectAllocation(image, blocks: Self.touched(ranges, blockSize: blockSize), blockSize: blockSize)
    }

    /// qemu-img's fixed VHDX: every block allocated in the file; with block_state_zero=on (the
    /// default) the BAT still says ZERO until a block is written.
    @Test(arguments: ["subformat=fixed", "subformat=fixed,block_state_zero=off", "subformat=fixed,block_size=2M"], sizes)
    func fixedMatchesQemuImg(options: String, size: UInt64) throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vhdx -o \(options) d.vhdx \(size)")
        let ranges = try Self.writePatterns("d.vhdx", size: size, in: scratch)
        let image = try FormatOracle.expectMatchesQemu("d.vhdx", format: .vhdx, in: scratch, checkMap: false)
        let blockSize = try Self.blockSize("d.vhdx", in: scratch)
        let all = Set(0..<(size + blockSize - 1) / blockSize)
        try Self.expectAllocation(image, blocks: options.contains("zero=off") ? all : Self.touched(ranges, blockSize: blockSize),
                                  blockSize: blockSize)
    }

    @Test func convertedFromRaw() throws {
        let scratch = try Scratch()
        try scratch.sh("head -c 9437696 /dev/urandom > disk.raw")
        try scratch.sh("qemu-img convert -O vhdx -o block_size=1M disk.raw d.vhdx")
        try FormatOracle.expectMatchesQemu("d.vhdx", format: .vhdx, in: scratch, checkMap: false)
    }

    /// A 64 TiB disk opens, maps and counts quickly: the BAT is read in chunks, nothing walks
    /// the disk.
    @Test func hugeDiskIsBounded() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vhdx d.vhdx 64T")
        try scratch.sh("qemu-io -f vhdx -c 'write -P 7 40T 64k' d.vhdx >/dev/null")
        let start = Date()
        let image = try Image.open(path: scratch.path("d.vhdx"), cache: BlockCache(capacityBytes: 1 << 20))
        let blockSize = try Self.blockSize("d.vhdx", in: scratch)
        #expect(try image.live.allocatedBytes() == blockSize)
        #expect(try image.live.read(at: 40 << 40, count: 4) == [7, 7, 7, 7])
        #expect(try image.live.status(at: 40 << 40, length: 1 << 30).filter(\.data).count == 1)
        #expect(Date().timeIntervalSince(start) < 10)
    }

    // MARK: - The log

    /// After a write, QEMU leaves its (replayed) log entry in the log and zeros the header's log
    /// GUID. Putting the entry's GUID back makes a log that needs replay: QEMU refuses it read-only,
    /// and so does poolfs, with QEMU's words.
    @Test func dirtyLogIsRefused() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vhdx -o block_size=1M d.vhdx 5M")
        try scratch.sh("qemu-io -f vhdx -c 'write -P 0x22 1M 64k' d.vhdx >/dev/null")
        var bytes = try scratch.bytes("d.vhdx")
        let logOffset = Int(VhdxFields(bytes, at: 64 << 10).u64(72))
        #expect(VhdxFields(bytes, at: logOffset).u32(0) == VhdxLog.entrySignature)
        let guid = Array(bytes[logOffset + 32..<logOffset + 48])
        Self.editHeaders(&bytes) { $0.replaceSubrange(48..<64, with: guid) }
        try scratch.write("d.vhdx", bytes)
        let error = FormatOracle.openError("d.vhdx", in: scratch)
        #expect(error?.contains("opened read-only, but contains a log that needs to be replayed") == true, "\(error ?? "opened")")
        let qemu = scratch.attempt("qemu-img info d.vhdx")
        #expect(!qemu.ok && qemu.output.contains("contains a log that needs to be replayed"), "\(qemu.output)")
    }

    /// A log GUID that no entry carries: nothing to replay, and QEMU and poolfs both open it.
    @Test func logGuidWithoutEntriesOpens() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vhdx -o block_size=1M d.vhdx 5M")
        try Self.writePatterns("d.vhdx", size: 5 << 20, in: scratch)
        var bytes = try scratch.bytes("d.vhdx")
        Self.editHeaders(&bytes) { $0.replaceSubrange(48..<64, with: [UInt8](repeating: 0x5a, count: 16)) }
        try scratch.write("d.vhdx", bytes)
        #expect(scratch.attempt("qemu-img info d.vhdx").ok)
        try FormatOracle.expectMatchesQemu("d.vhdx", format: .vhdx, in: scratch, checkMap: false)
    }

    // MARK: - Corruptions

    struct Corruption: CustomStringConvertible, Sendable {
        var name: String
        var edit: @Sendable (inout [UInt8], Layout) -> Void
        var error: String
        /// Whether qemu-img 7.2 refuses to open it too.
        var qemuRefuses: Bool
        var description: String { name }
    }

    /// Where the test image keeps its structures, read from the image itself.
    struct Layout {
        var bat: Int
        var metadata: Int
        /// Metadata item offsets (absolute), by GUID.
        var items: [VhdxGUID: Int]

        init(_ bytes: [UInt8]) {
            let rt = VhdxFields(bytes, at: Int(VhdxRegions.offset))
            var bat = 0, metadata = 0
            for i in 0..<Int(rt.u32(8)) {
                let e = VhdxFields(bytes, at: Int(VhdxRegions.offset) + 16 + 32 * i)
                if e.guid(0) == VhdxRegions.batGUID { bat = Int(e.u64(16)) }
                if e.guid(0) == VhdxRegions.metadataGUID { metadata = Int(e.u64(16)) }
            }
            self.bat = bat
            self.metadata = metadata
            let table = VhdxFields(bytes, at: metadata)
            items = [:]
            for i in 0..<Int(table.u16(10)) {
                let e = VhdxFields(bytes, at: metadata + 32 + 32 * i)
                items[e.guid(0)] = metadata + Int(e.u32(16))
            }
        }
    }

    static func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }

    static func put(_ bytes: inout [UInt8], _ at: Int, _ value: UInt64, _ n: Int) {
        bytes.replaceSubrange(at..<at + n, with: le(value, n))
    }

    /// Edits both headers (the 4 KiB at 64 KiB and 128 KiB) and fixes their checksums.
    static func editHeaders(_ bytes: inout [UInt8], _ edit: (inout [UInt8]) -> Void) {
        for base in [64 << 10, 128 << 10] {
            var h = Array(bytes[base..<base + 4096])
            edit(&h)
            put(&h, 4, UInt64(Crc32c.checksum(h, zeroing: 4)), 4)
            bytes.replaceSubrange(base..<base + 4096, with: h)
        }
    }

    /// Edits the region table and fixes its checksum.
    static func editRegions(_ bytes: inout [UInt8], _ edit: (inout [UInt8]) -> Void) {
        let base = Int(VhdxRegions.offset)
        var t = Array(bytes[base..<base + 65536])
        edit(&t)
        put(&t, 4, UInt64(Crc32c.checksum(t, zeroing: 4)), 4)
        bytes.replaceSubrange(base..<base + 65536, with: t)
    }

    static func regionEntry(_ bytes: [UInt8], _ guid: VhdxGUID) -> Int {
        let base = Int(VhdxRegions.offset)
        return (0..<2047).map { 16 + 32 * $0 }.first { VhdxFields(bytes, at: base + $0).guid(0) == guid }!
    }

    static let corruptions: [Corruption] = [
        Corruption(name: "file identifier", edit: { b, _ in b[7] = 0x58 }, error: "no \"vhdxfile\" file identifier", qemuRefuses: true),
        Corruption(name: "both header checksums", edit: { b, _ in b[(64 << 10) + 4] ^= 1; b[(128 << 10) + 4] ^= 1 },
                   error: "No valid VHDX header found (header 1: checksum", qemuRefuses: true),
        Corruption(name: "header version 2", edit: { b, _ in editHeaders(&b) { put(&$0, 66, 2, 2) } },
                   error: "header 1: version 2 is not 1; header 2: version 2 is not 1", qemuRefuses: true),
        Corruption(name: "header signature", edit: { b, _ in editHeaders(&b) { $0[0] = 0x48 } },
                   error: "header 1: no \"head\" signature", qemuRefuses: true),
        Corruption(name: "log offset not MiB aligned", edit: { b, _ in editHeaders(&b) { put(&$0, 72, (1 << 20) + 4096, 8) } },
                   error: "log offset 1052672 is not a non-zero multiple of 1 MiB", qemuRefuses: true),
        Corruption(name: "log version 1", edit: { b, _ in editHeaders(&b) { put(&$0, 64, 1, 2) } },
                   error: "log version 1 is not 0", qemuRefuses: true),
        Corruption(name: "log over the metadata region", edit: { b, l in editHeaders(&b) { put(&$0, 72, UInt64(l.metadata), 8) } },
                   error: "overlaps with region", qemuRefuses: true),
        Corruption(name: "region table checksum", edit: { b, _ in b[Int(VhdxRegions.offset) + 4] ^= 1 },
                   error: "region table checksum", qemuRefuses: true),
        Corruption(name: "region entry_count 3000", edit: { b, _ in editRegions(&b) { put(&$0, 8, 3000, 4) } },
                   error: "region table entry_count 3000 is over 2047", qemuRefuses: true),
        Corruption(name: "BAT region on the metadata region", edit: { b, l in
                       let e = regionEntry(b, VhdxRegions.batGUID)
                       editRegions(&b) { put(&$0, e + 16, UInt64(l.metadata), 8) } },
                   error: "overlaps with region", qemuRefuses: true),
        Corruption(name: "BAT region past the end", edit: { b, _ in
                       let e = regionEntry(b, VhdxRegions.batGUID)
                       editRegions(&b) { put(&$0, e + 16, 1 << 40, 8) } },
                   error: "BAT region 1099511627776+", qemuRefuses: false),
        Corruption(name: "unknown required region", edit: { b, _ in
                       let e = regionEntry(b, VhdxRegions.batGUID)
                       editRegions(&b) { t in
                           let n = Int(VhdxFields(t).u32(8))
                           t.replaceSubrange(16 + 32 * n..<16 + 32 * n + 32, with: Array(t[e..<e + 32]))
                           t[16 + 32 * n] ^= 0xff
                           put(&t, 16 + 32 * n + 16, 1 << 30, 8)
                           put(&t, 16 + 32 * n + 28, 1, 4)
                           put(&t, 8, UInt64(n + 1), 4)
                       } },
                   error: "required region", qemuRefuses: true),
        Corruption(name: "metadata signature", edit: { b, l in b[l.metadata] = 0x4d }, error: "metadata table has no \"metadata\" signature", qemuRefuses: true),
        Corruption(name: "block size 3 MiB", edit: { b, l in put(&b, l.items[VhdxMetadata.fileParameters]!, 3 << 20, 4) },
                   error: "block size 3145728 is not a power of two from 1 MiB to 256 MiB", qemuRefuses: true),
        Corruption(name: "block size 512 MiB", edit: { b, l in put(&b, l.items[VhdxMetadata.fileParameters]!, 512 << 20, 4) },
                   error: "block size 536870912 is not a power of two", qemuRefuses: true),
        Corruption(name: "has_parent without a locator", edit: { b, l in put(&b, l.items[VhdxMetadata.fileParameters]! + 4, 2, 4) },
                   error: "file parameters say the disk has a parent, but there is no parent locator", qemuRefuses: true),
        Corruption(name: "differencing (has_parent and a locator)", edit: { b, l in
                       put(&b, l.items[VhdxMetadata.fileParameters]! + 4, 2, 4)
                       let n = Int(VhdxFields(b, at: l.metadata).u16(10))
                       let entry = l.metadata + 32 + 32 * n
                       b.replaceSubrange(entry..<entry + 16, with: VhdxMetadata.parentLocator.bytes)
                       put(&b, entry + 16, UInt64(l.items[VhdxMetadata.page83]! - l.metadata), 4)
                       put(&b, entry + 20, 16, 4)
                       put(&b, entry + 24, 4, 4)
                       put(&b, l.metadata + 10, UInt64(n + 1), 2) },
                   error: "vhdx differencing disks (with a parent) are not supported", qemuRefuses: true),
        Corruption(name: "4096-byte logical sectors", edit: { b, l in put(&b, l.items[VhdxMetadata.logicalSectorSize]!, 4096, 4) },
                   error: "vhdx with 4096-byte logical sectors", qemuRefuses: true),
        Corruption(name: "virtual size 128 TiB", edit: { b, l in put(&b, l.items[VhdxMetadata.virtualDiskSize]!, 128 << 40, 8) },
                   error: "virtual disk size 140737488355328 is over the 64 TiB", qemuRefuses: true),
        Corruption(name: "virtual size past the BAT", edit: { b, l in put(&b, l.items[VhdxMetadata.virtualDiskSize]!, 64 << 40, 8) },
                   error: "is too small for the", qemuRefuses: true),
        Corruption(name: "metadata item outside its region", edit: { b, l in
                       let e = (0..<5).map { l.metadata + 32 + 32 * $0 }.first { VhdxFields(b, at: $0).guid(0) == VhdxMetadata.virtualDiskSize }!
                       put(&b, e + 16, 1 << 30, 4) },
                   error: "virtual disk size metadata item (offset 1073741824", qemuRefuses: true),
        Corruption(name: "BAT entry past the end", edit: { b, l in put(&b, l.bat + 8, (1 << 40) | 6, 8) },
                   error: "VHDX BAT entry 1 start offset 1099511627776 points after end of file", qemuRefuses: true),
        Corruption(name: "file truncated inside a block", edit: { b, _ in b.removeLast(4096) },
                   error: "end offset", qemuRefuses: true),
        Corruption(name: "BAT payload on the BAT", edit: { b, l in put(&b, l.bat + 8, UInt64(l.bat) | 6, 8) },
                   error: "overlaps with region", qemuRefuses: true),
        Corruption(name: "BAT payload in the header section", edit: { b, l in put(&b, l.bat + 8, 6, 8) },
                   error: "VHDX BAT entry 1 puts a payload block at 0, inside the 1 MiB header section", qemuRefuses: false),
    ]

    /// The test image: 5M dynamic, 1 MiB blocks, blocks 1, 2 and 4 written.
    @Test(arguments: corruptions)
    func corruptionIsRefused(_ c: Corruption) throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vhdx -o block_size=1M d.vhdx 5M")
        try Self.writePatterns("d.vhdx", size: 5 << 20, in: scratch)
        var bytes = try scratch.bytes("d.vhdx")
        c.edit(&bytes, Layout(bytes))
        try scratch.write("d.vhdx", bytes)
        let error = FormatOracle.openError("d.vhdx", in: scratch, format: .vhdx)
        #expect(error?.contains(c.error) == true, "\(c.name): \(error ?? "opened")")
        #expect(scratch.attempt("qemu-img info -f vhdx d.vhdx").ok == !c.qemuRefuses, "\(c.name): qemu-img disagrees")
    }

    /// A partially present block (a differencing disk's state) in a disk without a parent: the
    /// image opens, and reading that block fails, as in QEMU.
    @Test func partiallyPresentBlockFailsItsRead() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vhdx -o block_size=1M d.vhdx 5M")
        try Self.writePatterns("d.vhdx", size: 5 << 20, in: scratch)
        var bytes = try scratch.bytes("d.vhdx")
        let l = Layout(bytes)
        bytes[l.bat + 8] = bytes[l.bat + 8] & ~7 | 7
        try scratch.write("d.vhdx", bytes)
        let image = try Image.open(path: scratch.path("d.vhdx"), cache: BlockCache(capacityBytes: 1 << 20))
        #expect(try image.live.read(at: 0, count: 512) == [UInt8](repeating: 0, count: 512))
        #expect(throws: Qcow2Error.self) { try image.live.read(at: 1 << 20, count: 512) }
        #expect(!scratch.attempt("qemu-io -f vhdx -c 'read 1M 512' d.vhdx").ok)
    }

    /// A second header with a higher sequence number wins; a broken current header falls back
    /// to the other, as in QEMU.
    @Test func brokenCurrentHeaderFallsBack() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vhdx -o block_size=1M d.vhdx 5M")
        try Self.writePatterns("d.vhdx", size: 5 << 20, in: scratch)
        var bytes = try scratch.bytes("d.vhdx")
        let s1 = VhdxFields(bytes, at: 64 << 10).u64(8), s2 = VhdxFields(bytes, at: 128 << 10).u64(8)
        bytes[(s1 > s2 ? 64 << 10 : 128 << 10) + 4] ^= 1
        try scratch.write("d.vhdx", bytes)
        try FormatOracle.expectMatchesQemu("d.vhdx", format: .vhdx, in: scratch, checkMap: false)
    }
}
