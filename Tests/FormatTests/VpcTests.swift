import Foundation
import TestSupport
@testable import Block
import Testing

/// The vhd (vpc) reader against qemu-img 7.2: every subformat qemu-img creates, at sizes that
/// are and are not multiples of the 2 MiB block, byte for byte and map for map; then one-field
/// corruptions, each refused with its own error.
@Suite("vpc reader") struct VpcTests {
    /// Sizes qemu-img rounds up to a CHS geometry (1M, 5M+512, 127M) and one it keeps exactly
    /// with force_size=on.
    static let sizes = ["1M", "5243392", "127M"]

    /// The patterns every image gets: inside one block, across a block boundary, and the last
    /// 4 KiB of the disk (a partial last block).
    static func writePatterns(_ name: String, format: String, in scratch: Scratch) throws {
        let size = try virtualSize(name, format: format, in: scratch)
        var commands = ["write -P 0x33 \(size - 4096) 4096"]
        if size >= (1 << 20) + 65536 { commands.append("write -P 0x22 1M 64k") }
        if size >= 2049 << 10 { commands.append("write -P 0x44 2047k 2k") }
        try scratch.sh("qemu-io -f \(format) " + commands.map { "-c '\($0)'" }.joined(separator: " ") + " '\(name)' >/dev/null")
    }

    static func virtualSize(_ name: String, format: String = "vpc", in scratch: Scratch) throws -> UInt64 {
        let json = try scratch.sh("qemu-img info -f \(format) --output=json '\(name)'")
        let info = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [String: Any]
        return (info["virtual-size"] as! NSNumber).uint64Value
    }

    /// `FormatOracle.expectMatchesQemu` with the format given to qemu-img: QEMU probes by the
    /// first bytes only, so it takes a fixed VHD (footer at the end) for raw; poolfs probes the
    /// last sector too and must find vpc.
    @discardableResult
    static func expectMatchesQemu(_ name: String, in scratch: Scratch, sourceLocation: SourceLocation = #_sourceLocation) throws -> Image {
        let image = try Image.open(path: scratch.path(name), cache: BlockCache(capacityBytes: 4 << 20))
        #expect(image.format == .vpc, "\(name): probed as \(image.format)", sourceLocation: sourceLocation)
        try scratch.sh("qemu-img convert -f vpc -O raw '\(name)' '\(name).expected'")
        try FormatOracle.expectSame(image.live, as: scratch.path("\(name).expected"), name, sourceLocation: sourceLocation)
        let theirs = try qemuMap(name, in: scratch)
        let ours = FormatOracle.normalize(try image.live.status())
        #expect(ours == theirs, "\(name): allocation map differs\nours:   \(ours)\nqemu's: \(theirs)", sourceLocation: sourceLocation)
        return image
    }

    @Test(arguments: ["dynamic", "fixed"], sizes)
    func matchesQemuImg(subformat: String, size: String) throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vpc -o subformat=\(subformat) d.vhd \(size)")
        try Self.expectMatchesQemu("d.vhd", in: scratch)
        try Self.writePatterns("d.vhd", format: "vpc", in: scratch)
        let image = try Self.expectMatchesQemu("d.vhd", in: scratch)
        #expect(try image.live.allocatedBytes() > 0)
    }

    /// force_size=on writes creator "qem2" and the maximum geometry: the size is current_size,
    /// not a CHS rounding of it.
    @Test(arguments: ["dynamic", "fixed"], ["1048576", "5243392", "133169664"])
    func forceSizeUsesCurrentSize(subformat: String, size: String) throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vpc -o subformat=\(subformat),force_size=on d.vhd \(size)")
        try Self.writePatterns("d.vhd", format: "vpc", in: scratch)
        let image = try Self.expectMatchesQemu("d.vhd", in: scratch)
        #expect(image.live.size == UInt64(size) ?? 0)
    }

    /// A raw disk converted to both subformats, with data in every block.
    @Test(arguments: ["dynamic", "fixed"])
    func convertedFromRaw(subformat: String) throws {
        let scratch = try Scratch()
        try scratch.sh("head -c 7340544 /dev/urandom > disk.raw")
        try scratch.sh("qemu-img convert -O vpc -o subformat=\(subformat) disk.raw d.vhd")
        try Self.expectMatchesQemu("d.vhd", in: scratch)
    }

    /// Allocation of a dynamic disk counts allocated blocks from the BAT.
    @Test func allocatedBytesCountsBlocks() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vpc d.vhd 127M")
        try scratch.sh("qemu-io -f vpc -c 'write -P 1 0 512' -c 'write -P 2 9M 4M' d.vhd >/dev/null")
        let image = try Image.open(path: scratch.path("d.vhd"), cache: BlockCache(capacityBytes: 1 << 20))
        #expect(try image.live.allocatedBytes() == 4 * (2 << 20))  // blocks 0, 4, 5 and 6
    }

    /// A 2000 GiB disk opens, maps and counts in well under a second: nothing walks the disk.
    @Test func hugeDiskIsBounded() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vpc d.vhd 2000G")
        try scratch.sh("qemu-io -f vpc -c 'write -P 7 1500G 64k' d.vhd >/dev/null")
        let start = Date()
        let image = try Image.open(path: scratch.path("d.vhd"), cache: BlockCache(capacityBytes: 1 << 20))
        #expect(try image.live.allocatedBytes() == 2 << 20)
        #expect(try image.live.read(at: 1500 << 30, count: 4) == [7, 7, 7, 7])
        let map = try image.live.status()
        #expect(map.filter(\.data).count == 1)
        #expect(Date().timeIntervalSince(start) < 5)
        try Self.expectMatchesQemuMapOnly("d.vhd", image, in: scratch)
    }

    /// A size past QEMU's 2040 GiB limit is refused, as QEMU refuses it.
    @Test func sizePastTheLimitIsRefused() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vpc -o subformat=fixed,force_size=on d.vhd 1M")
        try Self.patchFooter("d.vhd", at: 1 << 20, in: scratch) { $0.storeBigEndian(4 << 40, at: 48) }
        let error = FormatOracle.openError("d.vhd", in: scratch)
        #expect(error?.contains("larger than the 2040 GiB a VHD may have") == true, "\(error ?? "opened")")
        #expect(!scratch.attempt("qemu-img info -f vpc d.vhd").ok)
    }

    // MARK: - Corruptions

    struct Corruption: CustomStringConvertible, Sendable {
        var name: String
        /// Byte offset and big-endian bytes to write over the dynamic test image.
        var offset: UInt64
        var bytes: [UInt8]
        /// Whether the footer copy at byte 0 is re-checksummed after the edit.
        var fixChecksum: Bool
        var error: String
        /// Whether qemu-img 7.2 refuses the image too (all but the refusals poolfs adds).
        var qemuRefuses: Bool
        var description: String { name }
    }

    /// The dynamic test image (5M): footer at 0, dynamic header at 512, BAT at 1536.
    static let corruptions: [Corruption] = [
        Corruption(name: "footer checksum", offset: 64, bytes: [0, 0, 0, 1], fixChecksum: false,
                   error: "Incorrect header checksum", qemuRefuses: true),
        Corruption(name: "disk type differencing", offset: 60, bytes: be32(4), fixChecksum: true,
                   error: "vhd differencing disks (disk type 4) are not supported", qemuRefuses: false),
        Corruption(name: "disk type unknown", offset: 60, bytes: be32(9), fixChecksum: true,
                   error: "footer disk type 9 is not fixed (2), dynamic (3) or differencing (4)", qemuRefuses: false),
        Corruption(name: "disk type fixed at byte 0", offset: 60, bytes: be32(2), fixChecksum: true,
                   error: "footer disk type 2 does not match where the footer is", qemuRefuses: false),
        Corruption(name: "data_offset past the end", offset: 16, bytes: be64(1 << 40), fixChecksum: true,
                   error: "dynamic disk header (footer data_offset 1099511627776) lies past the end of the file", qemuRefuses: true),
        Corruption(name: "size past 2040 GiB", offset: 48, bytes: be64(3 << 40) + [0xff, 0xff, 16, 0xff], fixChecksum: true,
                   error: "larger than the 2040 GiB a VHD may have", qemuRefuses: true),
        Corruption(name: "dynamic header magic", offset: 512, bytes: Array("cxsparsX".utf8), fixChecksum: false,
                   error: "Invalid header magic", qemuRefuses: true),
        Corruption(name: "block size not a power of two", offset: 512 + 32, bytes: be32(3000), fixChecksum: false,
                   error: "Invalid block size 3000", qemuRefuses: true),
        Corruption(name: "block size below a sector", offset: 512 + 32, bytes: be32(256), fixChecksum: false,
                   error: "Invalid block size 256", qemuRefuses: true),
        Corruption(name: "max_table_entries too small", offset: 512 + 28, bytes: be32(1), fixChecksum: false,
                   error: "Page table too small: max_table_entries 1", qemuRefuses: true),
        Corruption(name: "max_table_entries too large", offset: 512 + 28, bytes: be32(0x7fff_ffff), fixChecksum: false,
                   error: "Max Table Entries too large (2147483647)", qemuRefuses: true),
        Corruption(name: "max_table_entries past poolfs's bound", offset: 512 + 28, bytes: be32(0x1000_0000), fixChecksum: false,
                   error: "poolfs reads at most 67108864", qemuRefuses: true),
        Corruption(name: "BAT offset past the end", offset: 512 + 16, bytes: be64(1 << 40), fixChecksum: false,
                   error: "BAT of 3 entries at 1099511627776 lies past the end of the file", qemuRefuses: true),
        Corruption(name: "BAT entry past the end", offset: 1536, bytes: be32(0x0100_0000), fixChecksum: false,
                   error: "free_data_block_offset points after the end of file. The image has been truncated: BAT entry 0", qemuRefuses: true),
    ]

    @Test(arguments: corruptions)
    func corruptionIsRefused(_ c: Corruption) throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vpc d.vhd 5M")
        try scratch.sh("qemu-io -f vpc -c 'write -P 0x22 1M 64k' d.vhd >/dev/null")
        var bytes = try scratch.bytes("d.vhd")
        bytes.replaceSubrange(Int(c.offset)..<Int(c.offset) + c.bytes.count, with: c.bytes)
        if c.fixChecksum { Self.fixChecksum(&bytes, at: 0) }
        try scratch.write("d.vhd", bytes)
        let error = FormatOracle.openError("d.vhd", in: scratch, format: .vpc)
        #expect(error?.contains(c.error) == true, "\(c.name): \(error ?? "opened")")
        if c.qemuRefuses { #expect(!scratch.attempt("qemu-img info -f vpc d.vhd").ok, "\(c.name): qemu-img opened it") }
    }

    /// A fixed disk's footer (the last 512 bytes) is checked the same way.
    @Test func fixedFooterChecksumIsChecked() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vpc -o subformat=fixed d.vhd 5M")
        let size = try Self.virtualSize("d.vhd", in: scratch)
        var bytes = try scratch.bytes("d.vhd")
        bytes[Int(size) + 64] ^= 1
        try scratch.write("d.vhd", bytes)
        #expect(FormatOracle.openError("d.vhd", in: scratch, format: .vpc)?.contains("Incorrect header checksum") == true)
        #expect(!scratch.attempt("qemu-img info -f vpc d.vhd").ok)
    }

    // MARK: - Helpers

    static func expectMatchesQemuMapOnly(_ name: String, _ image: Image, in scratch: Scratch) throws {
        #expect(FormatOracle.normalize(try image.live.status()) == (try qemuMap(name, in: scratch)))
    }

    /// `qemu-img map -f vpc --output=json`, normalized as `FormatOracle.qemuMap` does.
    static func qemuMap(_ name: String, in scratch: Scratch) throws -> [MapExtent] {
        let json = try scratch.sh("qemu-img map -f vpc --output=json '\(name)'")
        let rows = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [[String: Any]]
        return FormatOracle.normalize(rows.map { row in
            MapExtent(start: (row["start"] as! NSNumber).uint64Value, length: (row["length"] as! NSNumber).uint64Value,
                      depth: (row["depth"] as! NSNumber).intValue, present: row["present"] as! Bool,
                      zero: row["zero"] as! Bool, data: row["data"] as! Bool)
        })
    }

    static func be32(_ v: UInt32) -> [UInt8] { bigEndianBytes(v) }
    static func be64(_ v: UInt64) -> [UInt8] { bigEndianBytes(v) }

    static func fixChecksum(_ bytes: inout [UInt8], at footer: Int) {
        let sum = VpcFooter.checksum(of: Array(bytes[footer..<footer + 512]))
        bytes.replaceSubrange(footer + 64..<footer + 68, with: be32(sum))
    }

    static func patchFooter(_ name: String, at footer: Int, in scratch: Scratch, _ edit: (inout [UInt8]) -> Void) throws {
        var bytes = try scratch.bytes(name)
        var f = Array(bytes[footer..<footer + 512])
        edit(&f)
        bytes.replaceSubrange(footer..<footer + 512, with: f)
        fixChecksum(&bytes, at: footer)
        try scratch.write(name, bytes)
    }
}
