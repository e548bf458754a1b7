import Foundation
import TestSupport
@testable import Block
import Testing

/// Hostile sparse headers and tables: one field changed at a time, each with the error it gets.
@Suite("vmdk corruption") struct VmdkCorruptionTests {
    enum Field: Sendable, CustomStringConvertible {
        /// A header field at a byte offset, `width` bytes, set to `value`.
        case header(Int, width: Int, UInt64)
        /// Grain directory entry 0.
        case directoryEntry(UInt64)
        /// Grain table entry 0 of the first table.
        case tableEntry(UInt64)
        /// The size field of the first grain marker (streamOptimized).
        case markerSize(UInt64)
        /// The first bytes of the first compressed grain.
        case compressedBytes
        var description: String {
            switch self {
            case .header(let at, _, let value): "header byte \(at) = \(value)"
            case .directoryEntry(let value): "GD[0] = \(value)"
            case .tableEntry(let value): "GT[0] = \(value)"
            case .markerSize(let value): "marker size = \(value)"
            case .compressedBytes: "compressed bytes"
            }
        }
    }

    static func le(_ value: UInt64, _ width: Int) -> [UInt8] { (0..<width).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) } }

    static func u32(_ bytes: [UInt8], _ at: Int) -> UInt64 { (0..<4).reduce(0) { $0 | UInt64(bytes[at + $1]) << (8 * $1) } }

    static func patch(_ name: String, _ field: Field, in scratch: Scratch) throws {
        var bytes = try scratch.bytes(name)
        let gd = Int(u32(bytes, 56)) * 512
        let gt = Int(u32(bytes, gd)) * 512
        let grain = Int(u32(bytes, gt)) * 512
        func put(_ at: Int, _ value: UInt64, _ width: Int) { bytes.replaceSubrange(at..<at + width, with: le(value, width)) }
        switch field {
        case .header(let at, let width, let value): put(at, value, width)
        case .directoryEntry(let value): put(gd, value, 4)
        case .tableEntry(let value): put(gt, value, 4)
        case .markerSize(let value): put(grain + 8, value, 4)
        case .compressedBytes: put(grain + 12, 0xdead_beef, 4)
        }
        try scratch.write(name, bytes)
    }

    static let sparseCases: [(Field, String)] = [
        (.header(4, width: 4, 4), "Unsupported VMDK version 4"),
        (.header(12, width: 8, 1 << 50), "L1 size too big"),
        (.header(12, width: 8, 1 << 60), "capacity 1152921504606846976 sectors is over 2^54 sectors"),
        (.header(20, width: 8, 0), "L1 entry size is invalid"),
        (.header(20, width: 8, 0x400000), "Invalid granularity, image may be corrupt"),
        (.header(20, width: 8, 96), "grainSize 96 sectors is not a power of two"),
        (.header(28, width: 8, 0), "names no embedded descriptor"),
        (.header(28, width: 8, 1 << 40), "names no embedded descriptor"),
        (.header(44, width: 4, 1024), "L2 table size too big"),
        (.header(44, width: 4, 0), "L1 entry size is invalid"),
        (.header(56, width: 8, 1 << 20), "grain directory at byte 536870912 (1 entries) runs past the end of the file"),
        (.header(56, width: 8, 1 << 60), "grain directory offset 1152921504606846976 sectors is not a byte position"),
        (.header(56, width: 8, UInt64.max), "Invalid footer"),
        (.header(64, width: 8, 1 << 30), "File truncated, expecting at least 549755813888 bytes"),
        (.header(77, width: 2, 2), "vmdk compression algorithm 2 is not supported"),
        (.directoryEntry(0x7fff_ffff), "grain directory entry 0 points at a grain table at byte 1099511627264, past the end of the file"),
        (.header(0, width: 4, 0x4457_4f43), "a hosted sparse (COWD) file is read only through the descriptor"),
    ]

    @Test(arguments: sparseCases)
    func sparseHeaderField(_ field: Field, _ expected: String) throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vmdk d.vmdk 1M && qemu-io -f vmdk -c 'write -P 0x11 0 64k' d.vmdk >/dev/null")
        try Self.patch("d.vmdk", field, in: scratch)
        let error = FormatOracle.openError("d.vmdk", in: scratch, format: .vmdk)
        #expect(error?.contains(expected) == true, "\(field): \(error ?? "opened")")
    }

    @Test func hugeCompressedGrainsAreRefused() throws {
        let scratch = try Scratch()
        try scratch.sh("head -c 65536 /dev/urandom > r.raw && qemu-img convert -O vmdk -o subformat=streamOptimized r.raw d.vmdk")
        try Self.patch("d.vmdk", .header(20, width: 8, 8192), in: scratch)
        let error = FormatOracle.openError("d.vmdk", in: scratch)
        #expect(error?.contains("compressed grains of 4194304 bytes are over poolfs's limit of 2097152") == true, "\(error ?? "opened")")
    }

    /// Errors a read finds (the image opens): a grain past the end of the file, a broken
    /// compressed grain.
    @Test(arguments: [
        ("monolithicSparse", Field.tableEntry(0x7fff_0000), "grain of extent offset 0 is at byte 1099478073344, past the end of the file"),
        ("streamOptimized", Field.markerSize(0), "says 0 compressed bytes"),
        ("streamOptimized", Field.markerSize(1 << 20), "says 1048576 compressed bytes (1 to 131072 allowed)"),
        ("streamOptimized", Field.compressedBytes, "is not a zlib stream"),
    ] as [(String, Field, String)])
    func readErrors(_ subformat: String, _ field: Field, _ expected: String) throws {
        let scratch = try Scratch()
        try scratch.sh("head -c 1048576 /dev/urandom > r.raw && qemu-img convert -O vmdk -o subformat=\(subformat) r.raw d.vmdk")
        try Self.patch("d.vmdk", field, in: scratch)
        let image = try Image.open(path: scratch.path("d.vmdk"), cache: BlockCache(capacityBytes: 1 << 20))
        #expect(try image.live.read(at: 65536, count: 4096) == Array(try scratch.bytes("r.raw")[65536..<69632]))
        do {
            _ = try image.live.read(at: 0, count: 4096)
            Issue.record("\(field): read")
        } catch {
            #expect("\(error)".contains(expected), "\(field): \(error)")
        }
    }

    /// A disk that claims 512 TiB with a grain directory the file does not hold, or more than
    /// QEMU's 32 Mi directory entries, is refused at once, allocating nothing of that size.
    @Test func hugeCapacityIsRefusedQuickly() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vmdk d.vmdk 1M")
        for (capacity, expected) in [(UInt64(1) << 40, "runs past the end of the file"), (UInt64(1) << 52, "L1 size too big")] {
            try Self.patch("d.vmdk", .header(12, width: 8, capacity), in: scratch)
            let clock = ContinuousClock()
            var error: String?
            let took = clock.measure { error = FormatOracle.openError("d.vmdk", in: scratch) }
            #expect(error?.contains(expected) == true, "\(capacity): \(error ?? "opened")")
            #expect(took < .seconds(1), "\(capacity): \(took)")
        }
    }

    /// A 1 TiB disk whose 32768 directory entries all point at one grain table: st_blocks reads
    /// that table once, and counts its grains for every entry, as the disk reads.
    @Test func sharedGrainTableIsCountedOnce() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vmdk d.vmdk 1T && qemu-io -f vmdk -c 'write -P 0x11 0 128k' d.vmdk >/dev/null")
        var bytes = try scratch.bytes("d.vmdk")
        let gd = Int(Self.u32(bytes, 56)) * 512
        let first = Array(bytes[gd..<gd + 4])
        for i in 0..<32768 { bytes.replaceSubrange(gd + 4 * i..<gd + 4 * i + 4, with: first) }
        try scratch.write("d.vmdk", bytes)
        let image = try Image.open(path: scratch.path("d.vmdk"), cache: BlockCache(capacityBytes: 1 << 20))
        let disk = try #require(image.live as? VmdkDisk)
        let count = try #require(try disk.allocationCount())
        #expect(count.tablesWalked == 1)
        #expect(count.bytes == 32768 * (128 << 10))
        #expect(try image.live.read(at: 1 << 35, count: 4) == [0x11, 0x11, 0x11, 0x11])
    }
}
