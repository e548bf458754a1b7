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
}
