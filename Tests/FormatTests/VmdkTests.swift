import Foundation
import TestSupport
@testable import Block
import Testing

/// The vmdk reader against qemu-img 7.2: every subformat it makes, at sizes on and off a grain,
/// byte for byte and map for map; descriptors, parents and hostile headers.
@Suite("vmdk") struct VmdkTests {
    static let sizes: [UInt64] = [1 << 20, (5 << 20) + 512]
    /// 100 MiB too, for the subformats whose grain tables span more than one table (the machine
    /// that runs the suite is small: reading 100 MiB in three chunk sizes takes a while).
    static let largeSizes = sizes + [100 << 20]

    /// qemu-io writes for a disk of `size`: the first grain, a run across a grain boundary, a
    /// sector in a far grain, and the disk's last sector (in a partial grain when the size is
    /// not a multiple of 64 KiB).
    static func writes(_ size: UInt64) -> String {
        var commands = ["write -P 0x11 0 64k", "write -P 0x22 \(size / 2 - 4096) 8k", "write -P 0x33 \(size - 512) 512"]
        if size > 4 << 20 { commands.append("write -P 0x44 \(3 << 20 + 512) 512") }
        return commands.map { "-c '\($0)'" }.joined(separator: " ")
    }

    static func made(_ subformat: String, size: UInt64, in scratch: Scratch, options: String = "") throws -> String {
        let name = "\(subformat)-\(size).vmdk"
        try scratch.sh("qemu-img create -q -f vmdk -o subformat=\(subformat)\(options) '\(name)' \(size)")
        try scratch.sh("qemu-io -f vmdk \(writes(size)) '\(name)' >/dev/null")
        return name
    }

    @Test(arguments: ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
    func subformatMatchesQemu(_ subformat: String) throws {
        let scratch = try Scratch()
        for size in subformat == "monolithicSparse" ? Self.largeSizes : Self.sizes {
            let name = try Self.made(subformat, size: size, in: scratch)
            try FormatOracle.expectMatchesQemu(name, format: .vmdk, in: scratch)
        }
    }

    @Test func zeroedGrainsMatchQemu() throws {
        let scratch = try Scratch()
        for size in Self.sizes {
            let name = try Self.made("monolithicSparse", size: size, in: scratch, options: ",zeroed_grain=on")
            try scratch.sh("qemu-io -f vmdk -c 'write -z 131072 131072' -c 'write -z 0 65536' '\(name)' >/dev/null")
            let image = try FormatOracle.expectMatchesQemu(name, format: .vmdk, in: scratch)
            #expect(try image.live.status(at: 0, length: 65536) == [MapExtent(start: 0, length: 65536, depth: 0, present: true, zero: true, data: false)])
        }
    }

    @Test func streamOptimizedMatchesQemu() throws {
        let scratch = try Scratch()
        for size in Self.largeSizes {
            let raw = "so-\(size).raw", name = "so-\(size).vmdk"
            try scratch.sh("truncate -s \(size) '\(raw)' && qemu-io -f raw \(Self.writes(size)) '\(raw)' >/dev/null")
            try scratch.sh("head -c 300000 /dev/urandom | dd of='\(raw)' bs=1 seek=200000 conv=notrunc status=none")
            try scratch.sh("qemu-img convert -O vmdk -o subformat=streamOptimized '\(raw)' '\(name)'")
            try FormatOracle.expectMatchesQemu(name, format: .vmdk, in: scratch)
        }
    }

    /// Reading a compressed grain twice decodes it once: the second read is a cache hit.
    @Test func compressedGrainsDecodeOnce() throws {
        let scratch = try Scratch()
        try scratch.sh("head -c 1048576 /dev/urandom > r.raw && qemu-img convert -O vmdk -o subformat=streamOptimized r.raw s.vmdk")
        let cache = BlockCache(capacityBytes: 8 << 20)
        let image = try Image.open(path: scratch.path("s.vmdk"), cache: cache)
        let disk = try #require(image.live as? VmdkDisk)
        let first = try disk.plan(at: 70000, length: 100)
        let second = try disk.plan(at: 70100, length: 100)
        guard case .bytes(let a, _, _)? = first.segments.first, case .bytes(let b, _, _)? = second.segments.first else {
            Issue.record("compressed grains are not planned as decoded bytes"); return
        }
        #expect(a === b)
        #expect(try image.live.read(at: 0, count: 1 << 20) == scratch.bytes("r.raw"))
    }

    static func le(_ value: UInt64, _ width: Int) -> [UInt8] { (0..<width).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) } }

    /// A stream whose header says "the grain directory is at the end" and whose footer holds it,
    /// as VMware writes streams: made from qemu-img's stream by appending the footer and changing
    /// the header's gdOffset.
    @Test func streamWithFooterMatchesQemu() throws {
        let scratch = try Scratch()
        try scratch.sh("head -c 700000 /dev/urandom > r.raw && truncate -s 1M r.raw && qemu-img convert -O vmdk -o subformat=streamOptimized r.raw s.vmdk")
        var bytes = try scratch.bytes("s.vmdk")
        let header = Array(bytes[0..<512])
        var marker = [UInt8](repeating: 0, count: 512)
        marker.replaceSubrange(12..<16, with: Self.le(3, 4))
        bytes += marker + header + [UInt8](repeating: 0, count: 512)
        bytes.replaceSubrange(56..<64, with: Self.le(UInt64.max, 8))
        try scratch.write("s.vmdk", bytes)
        try FormatOracle.expectMatchesQemu("s.vmdk", format: .vmdk, in: scratch)
        bytes.replaceSubrange((bytes.count - 1024 + 56)..<(bytes.count - 1024 + 64), with: Self.le(UInt64.max, 8))
        try scratch.write("s.vmdk", bytes)
        #expect(FormatOracle.openError("s.vmdk", in: scratch)?.contains("Invalid footer: its grain directory offset") == true)
    }

    /// A hosted sparse (COWD, VMDK 3) extent, built by hand (qemu-img cannot make one), read
    /// through a descriptor as QEMU reads it: 4 KiB grains, one grain table of 4096 entries.
    @Test func cowdExtentMatchesQemu() throws {
        let scratch = try Scratch()
        var file = [UInt8](repeating: 0, count: 56 * 512)
        func put(_ at: Int, _ value: UInt64) { file.replaceSubrange(at..<at + 4, with: Self.le(value, 4)) }
        file.replaceSubrange(0..<4, with: Array("COWD".utf8))
        put(4, 1); put(8, 3); put(12, 2048); put(16, 8); put(20, 4); put(24, 1); put(28, 56)
        put(4 * 512, 5)                 // directory entry 0: the grain table at sector 5
        put(5 * 512, 40)                // grain 0 at sector 40
        put(5 * 512 + 3 * 4, 48)        // grain 3 at sector 48
        file.replaceSubrange(40 * 512..<48 * 512, with: [UInt8](repeating: 0xab, count: 4096))
        file.replaceSubrange(48 * 512..<56 * 512, with: [UInt8](repeating: 0xcd, count: 4096))
        try scratch.write("c.cowd", file)
        try scratch.write("d.vmdk", Array("version=1\nCID=1\nparentCID=ffffffff\ncreateType=\"twoGbMaxExtentSparse\"\nRW 2048 SPARSE \"c.cowd\"\n".utf8))
        let image = try FormatOracle.expectMatchesQemu("d.vmdk", format: .vmdk, in: scratch)
        #expect(try image.live.read(at: 12288, count: 2) == [0xcd, 0xcd])
        #expect(FormatOracle.openError("c.cowd", in: scratch)?.contains("COWD") == true)
    }
}
