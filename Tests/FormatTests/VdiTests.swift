import Foundation
import TestSupport
@testable import Block
import Testing

/// Writes `value` little-endian in `width` bytes at `offset` of the file, in place (a sparse
/// file stays sparse).
func patchLittleEndian(_ scratch: Scratch, _ name: String, at offset: UInt64, _ value: UInt64, width: Int) throws {
    let handle = try FileHandle(forUpdating: URL(fileURLWithPath: scratch.path(name)))
    defer { try? handle.close() }
    try handle.seek(toOffset: offset)
    try handle.write(contentsOf: Data((0..<width).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }))
}

/// Bytes `status` reports as data (not zero) from metadata alone: what `allocatedBytes`,
/// counted from the format's tables, must agree with.
func metadataDataBytes(_ device: any BlockDevice) throws -> UInt64 {
    try device.status(detection: .metadataOnly).filter { $0.data && !$0.zero }.reduce(0) { $0 + $1.length }
}

@Suite("vdi") struct VdiTests {
    /// Sizes: one block, an unaligned one (5 MiB + 512), and a sparse 100 MiB disk.
    static let sizes: [UInt64] = [1 << 20, (5 << 20) + 512, 100 << 20]

    /// Every variant qemu-img makes (static=off, static=on) at every size, with patterns at the
    /// start, across a block boundary, at 2 MiB and in the last sector: bytes and map as QEMU's.
    @Test(arguments: ["off", "on"], sizes)
    func matchesQemu(isStatic: String, size: UInt64) throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vdi -o static=\(isStatic) d.vdi \(size)")
        var writes = ["write -P 0x11 0 4k", "write -P 0x22 \(size - 512) 512"]
        if size > (3 << 20) { writes += ["write -P 0x33 2M 64k", "write -P 0x44 1048000 2000"] }
        for w in writes { try scratch.sh("qemu-io -f vdi -c '\(w)' d.vdi >/dev/null") }
        let image = try FormatOracle.expectMatchesQemu("d.vdi", format: .vdi, in: scratch)
        #expect(image.virtualSize == size)
        #expect(try image.live.allocatedBytes() == metadataDataBytes(image.live))
        if isStatic == "on" { #expect(try image.live.allocatedBytes() == size) }
    }

    /// QEMU never writes 0xfffffffe (it has no discard for vdi): a block whose map entry says
    /// "discarded" reads as zeros and maps as zero, as QEMU reads it.
    @Test func discardedBlockReadsAsZeros() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vdi d.vdi 3M")
        try scratch.sh("qemu-io -f vdi -c 'write -P 0x55 0 3M' d.vdi >/dev/null")
        try patchLittleEndian(scratch, "d.vdi", at: 0x200 + 4, 0xffff_fffe, width: 4)
        let image = try FormatOracle.expectMatchesQemu("d.vdi", format: .vdi, in: scratch)
        #expect(try image.live.read(at: 1 << 20, count: 4096) == [UInt8](repeating: 0, count: 4096))
        #expect(try image.live.allocatedBytes() == 2 << 20)
    }

    /// A dynamic image cut short: the blocks past the end read as zeros and map as data, as in
    /// QEMU; a static one maps them as zero data (QEMU looks at the file there).
    @Test(arguments: ["off", "on"]) func truncatedImageReadsZerosPastTheEnd(isStatic: String) throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vdi -o static=\(isStatic) d.vdi 4M")
        try scratch.sh("qemu-io -f vdi -c 'write -P 0x66 0 4M' d.vdi >/dev/null")
        try scratch.sh("truncate -s \(1024 + (2 << 20) + 12345) d.vdi")
        try FormatOracle.expectMatchesQemu("d.vdi", format: .vdi, in: scratch)
    }

    /// A 1 TiB dynamic disk (a 4 MiB block map): opened, counted and mapped in well under a
    /// second; a header claiming the largest disk QEMU allows, with a map that cannot fit in
    /// the file, is refused at once.
    @Test func hugeDisksAreBounded() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vdi big.vdi 1T && qemu-io -f vdi -c 'write -P 0x77 900G 4k' big.vdi >/dev/null")
        let start = Date()
        let image = try Image.open(path: scratch.path("big.vdi"), cache: BlockCache(capacityBytes: 4 << 20))
        #expect(try image.live.allocatedBytes() == 1 << 20)
        let map = try image.live.status()
        #expect(map.filter(\.data).map(\.start) == [900 << 30])
        #expect(try image.live.read(at: 900 << 30, count: 2) == [0x77, 0x77])
        let seconds = Date().timeIntervalSince(start)
        print("vdi 1 TiB: open, count and map in \(seconds) s")
        #expect(seconds < 10)
        try scratch.sh("qemu-img create -q -f vdi max.vdi 1M")
        try patchLittleEndian(scratch, "max.vdi", at: 0x170, VdiHeader.maxDiskSize, width: 8)
        try patchLittleEndian(scratch, "max.vdi", at: 0x180, UInt64(VdiHeader.maxBlocks), width: 4)
        let error = FormatOracle.openError("max.vdi", in: scratch)
        #expect(error == "\(scratch.path("max.vdi")): corrupt image: block map (4294967292 bytes at offset_bmap 512) lies past the end of the file (1024 bytes) (at byte 340)")
    }

    /// One field changed per row: the exact error, and whether QEMU refuses the image too
    /// (with the words it uses).
    @Test func corruptionTable() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vdi base.vdi 5243392 && qemu-io -f vdi -c 'write -P 0x33 2M 64k' base.vdi >/dev/null")
        typealias Row = (field: UInt64, value: UInt64, width: Int, error: String, qemu: String?)
        let rows: [Row] = [
            (0x40, 0xbeda_107e, 4, "corrupt image: Image not in VDI format (bad signature beda107e) (at byte 64)", "bad signature beda107e"),
            (0x44, 0x0001_0000, 4, "unsupported VDI image (version 1.0): version at byte 68", "unsupported VDI image (version 1.0)"),
            (0x154, 0x201, 4, "unsupported VDI image (unaligned block map offset 0x201): offset_bmap at byte 340", "unaligned block map offset 0x201"),
            (0x158, 0x401, 4, "unsupported VDI image (unaligned data offset 0x401): offset_data at byte 344", "unaligned data offset 0x401"),
            (0x168, 4096, 4, "unsupported VDI image (sector size 4096 is not 512): sector_size at byte 360", "sector size 4096 is not 512"),
            (0x170, 1 << 52, 8, "Unsupported VDI image size (size is 0x10000000000000, max supported is 0x3fffffff00000): disk_size at byte 368", "Unsupported VDI image size"),
            (0x178, 2 << 20, 4, "unsupported VDI image (block size 2097152 is not 1048576): block_size at byte 376", "block size 2097152 is not 1048576"),
            (0x180, 1, 4, "unsupported VDI image (disk size 5243392, image bitmap has room for 1048576): blocks_in_image at byte 384", "image bitmap has room for 1048576"),
            (0x1a8, 1, 1, "unsupported VDI image (non-NULL link UUID): uuid_link at byte 424", "non-NULL link UUID"),
            (0x1b8, 1, 1, "unsupported VDI image (non-NULL parent UUID): uuid_parent at byte 440", "non-NULL parent UUID"),
            // Beyond QEMU: it reads a map past the end of the file as zeros (every block then
            // reads the first data block); poolfs refuses it.
            (0x154, 1_049_600, 4, "corrupt image: block map (24 bytes at offset_bmap 1049600) lies past the end of the file (1049600 bytes) (at byte 340)", nil),
        ]
        for row in rows {
            try scratch.sh("cp base.vdi bad.vdi")
            try patchLittleEndian(scratch, "bad.vdi", at: row.field, row.value, width: row.width)
            let error = FormatOracle.openError("bad.vdi", in: scratch, format: .vdi)
            #expect(error == "\(scratch.path("bad.vdi")): \(row.error)", "field at \(row.field)")
            let qemu = scratch.attempt("qemu-img info -f vdi bad.vdi 2>&1")
            if let words = row.qemu {
                #expect(!qemu.ok && qemu.output.contains(words), "QEMU on field at \(row.field): \(qemu.output)")
            } else {
                #expect(qemu.ok, "QEMU on field at \(row.field): \(qemu.output)")
            }
        }
    }

    /// A file cut inside its header is still probed as vdi (as by QEMU, whose probe pads the
    /// file with zeros) and refused for the first zero field QEMU checks, in QEMU's words.
    @Test func aShortFileIsRefusedAsByQemu() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vdi d.vdi 1M && head -c 200 d.vdi > short.vdi")
        #expect(scratch.attempt("qemu-img info short.vdi 2>&1").output.contains("unsupported VDI image (sector size 0 is not 512)"))
        #expect(FormatOracle.openError("short.vdi", in: scratch) ==
            "\(scratch.path("short.vdi")): unsupported VDI image (sector size 0 is not 512): sector_size at byte 360")
    }

    /// A map entry naming a block beyond blocks_in_image: the image opens (as in QEMU), and a
    /// read or map of that block fails with the entry's place; other blocks still read.
    @Test func mapEntryBeyondTheImageFailsThatBlock() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vdi d.vdi 3M && qemu-io -f vdi -c 'write -P 0x33 0 2M' d.vdi >/dev/null")
        try patchLittleEndian(scratch, "d.vdi", at: 0x200 + 4, 3, width: 4)
        let image = try Image.open(path: scratch.path("d.vdi"), cache: BlockCache(capacityBytes: 1 << 20))
        #expect(try image.live.read(at: 0, count: 1) == [0x33])
        #expect(throws: Qcow2Error.corrupt("block map entry 1 names block 3, not below blocks_in_image 3", offset: 516)) {
            try image.live.read(at: 1 << 20, count: 1)
        }
        #expect(throws: Qcow2Error.self) { try image.live.status() }
    }
}
