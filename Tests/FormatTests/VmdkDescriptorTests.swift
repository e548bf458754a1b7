import Foundation
import TestSupport
@testable import Block
import Testing

/// Descriptor files with several extents, parents checked by CID, and extents outside the pool.
@Suite("vmdk descriptors and parents") struct VmdkDescriptorTests {
    static func descriptor(_ type: String = "monolithicFlat", _ lines: [String], parent: String? = nil) -> String {
        var text = "# Disk DescriptorFile\nversion=1\nCID=abcdef01\nparentCID=\(parent == nil ? "ffffffff" : "12345678")\ncreateType=\"\(type)\"\n"
        if let parent { text += "parentFileNameHint=\"\(parent)\"\n" }
        return text + lines.joined(separator: "\n") + "\n"
    }

    /// FLAT (from an offset) and SPARSE extents, as qemu-img reads them; then with a ZERO extent
    /// between them, which QEMU 7.2 drops (it skips lines without a file name, moving the
    /// extents after it), read as VMware defines it: zeros.
    @Test func flatZeroAndSparseExtents() throws {
        let scratch = try Scratch()
        try scratch.sh("""
            head -c 1048576 /dev/urandom > a.bin
            qemu-img create -q -f vmdk s.vmdk 1M && qemu-io -f vmdk -c 'write -P 0x5a 65536 70000' s.vmdk >/dev/null
            """)
        try scratch.write("two.vmdk", Array(Self.descriptor("twoGbMaxExtentSparse", [
            "RW 1024 FLAT \"a.bin\" 512", "RW 2048 SPARSE \"s.vmdk\""]).utf8))
        try FormatOracle.expectMatchesQemu("two.vmdk", format: .vmdk, in: scratch)
        try scratch.write("three.vmdk", Array(Self.descriptor("monolithicFlat", [
            "RW 1024 FLAT \"a.bin\" 512", "RW 100 ZERO", "RW 2048 SPARSE \"s.vmdk\""]).utf8))
        let image = try Image.open(path: scratch.path("three.vmdk"), cache: BlockCache(capacityBytes: 1 << 20))
        try scratch.sh("qemu-img convert -O raw s.vmdk s.raw")
        let expected = Array(try scratch.bytes("a.bin")[262144..<786432]) + [UInt8](repeating: 0, count: 51200) + (try scratch.bytes("s.raw"))
        #expect(image.live.size == UInt64(expected.count))
        #expect(try image.live.read(at: 0, count: expected.count) == expected)
        #expect(try image.live.read(at: 524288 - 100, count: 51400) == Array(expected[(524288 - 100)..<(524288 + 51300)]))
        let map = try image.live.status(at: 524288, length: 51200)
        #expect(map == [MapExtent(start: 524288, length: 51200, depth: 0, present: true, zero: true, data: false)])
        #expect(image.hostFiles.count == 3)
    }

    /// Disks of 5 GiB (three extents each): windows across the extent boundaries read what
    /// qemu-io wrote (and qemu-io reads it back too), and the map is qemu-img's.
    @Test func twoGbExtentsAcrossBoundaries() throws {
        let scratch = try Scratch()
        let writes: [(offset: Int, count: Int, byte: UInt8)] = [(2147450880, 65536, 0x61), (4294967296, 512, 0x62), (5368708608, 512, 0x63)]
        let commands = writes.map { "-c 'write -P \($0.byte) \($0.offset) \($0.count)'" }.joined(separator: " ")
        let checks = writes.map { "-c 'read -P \($0.byte) \($0.offset) \($0.count)'" }.joined(separator: " ")
        for subformat in ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"] {
            let name = "\(subformat).vmdk"
            try scratch.sh("qemu-img create -q -f vmdk -o subformat=\(subformat) \(name) 5G")
            try scratch.sh("qemu-io -f vmdk \(commands) \(name) >/dev/null")
            #expect(!(try scratch.sh("qemu-io -f vmdk \(checks) \(name)")).contains("fail"))
            let image = try Image.open(path: scratch.path(name), cache: BlockCache(capacityBytes: 1 << 20))
            #expect(image.live.size == 5 << 30)
            for write in writes {
                let start = write.offset - 4096, count = min(write.count + 8192, (5 << 30) - start)
                var expected = [UInt8](repeating: 0, count: count)
                for other in writes {
                    let from = max(other.offset, start), to = min(other.offset + other.count, start + count)
                    if from < to { for i in from..<to { expected[i - start] = other.byte } }
                }
                #expect(try image.live.read(at: UInt64(start), count: count) == expected, "\(name) at \(start)")
            }
            try FormatOracle.expectSameMap(image.live, as: name, in: scratch, name)
            let allocated = try image.live.allocatedBytes()
            #expect(allocated > 0 && allocated < 1 << 21, "\(name): \(allocated)")
        }
    }

    @Test func parentChainWithCID() throws {
        let scratch = try Scratch()
        try scratch.sh("""
            qemu-img create -q -f vmdk base.vmdk 5M && qemu-io -f vmdk -c 'write -P 0x11 0 1M' -c 'write -P 0x12 4M 4k' base.vmdk >/dev/null
            qemu-img create -q -f vmdk -b base.vmdk -F vmdk child.vmdk 6M
            qemu-io -f vmdk -c 'write -P 0x22 512k 64k' -c 'write -P 0x23 5M 4k' child.vmdk >/dev/null
            qemu-img create -q -f vmdk -o zeroed_grain=on -b child.vmdk -F vmdk top.vmdk 6M
            qemu-io -f vmdk -c 'write -z 0 64k' -c 'write -P 0x33 4M 512' top.vmdk >/dev/null
            """)
        let child = try FormatOracle.expectMatchesQemu("child.vmdk", format: .vmdk, in: scratch)
        #expect(child.chain.count == 2)
        let top = try FormatOracle.expectMatchesQemu("top.vmdk", format: .vmdk, in: scratch)
        #expect(top.chain.count == 3)
        #expect(try top.live.read(at: 0, count: 16) == [UInt8](repeating: 0, count: 16))
        // st_blocks: what qemu-img map says is data, counted from the grain tables of the chain.
        let mapped = try FormatOracle.qemuMap("top.vmdk", in: scratch).filter { $0.data && !$0.zero }.reduce(0) { $0 + $1.length }
        #expect(try top.live.allocatedBytes() == mapped)
        #expect(mapped == 64 << 10 + 128 << 10 + 896 << 10)
        // A write to the parent changes its CID: the child's parentCID no longer names it.
        try scratch.sh("qemu-io -f vmdk -c 'write -P 0x44 0 512' base.vmdk >/dev/null")
        let error = FormatOracle.openError("child.vmdk", in: scratch)
        #expect(error?.contains("does not match CID") == true, "\(error ?? "opened")")
    }

    /// A descriptor that names itself as its parent, or as a sparse extent, is refused.
    @Test func selfReferencesAreRefused() throws {
        let scratch = try Scratch()
        try scratch.sh("head -c 1048576 /dev/zero > a.bin")
        try scratch.write("d.vmdk", Array("version=1\nCID=abcdef01\nparentCID=abcdef01\nparentFileNameHint=\"d.vmdk\"\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"a.bin\" 0\n".utf8))
        let loop = FormatOracle.openError("d.vmdk", in: scratch)
        #expect(loop?.contains("appears twice in its own backing chain") == true, "\(loop ?? "opened")")
        try scratch.write("d.vmdk", Array(Self.descriptor("monolithicFlat", ["RW 2048 SPARSE \"d.vmdk\""]).utf8))
        let sparse = FormatOracle.openError("d.vmdk", in: scratch)
        #expect(sparse?.contains("a sparse header needs 512") == true, "\(sparse ?? "opened")")
    }

    @Test func extentsOutsideThePoolAreRefused() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir pool && head -c 1048576 /dev/urandom > outside.bin && ln -s ../outside.bin pool/link.bin")
        for name in ["../outside.bin", scratch.path("outside.bin"), "link.bin"] {
            try scratch.write("pool/d.vmdk", Array(Self.descriptor("monolithicFlat", ["RW 2048 FLAT \"\(name)\" 0"]).utf8))
            let error = FormatOracle.openError("pool/d.vmdk", in: scratch)
            #expect(error?.contains("refused") == true, "\(name): \(error ?? "opened")")
        }
        try scratch.sh("cp outside.bin pool/inside.bin")
        try scratch.write("pool/d.vmdk", Array(Self.descriptor("monolithicFlat", ["RW 2048 FLAT \"inside.bin\" 0"]).utf8))
        #expect(FormatOracle.openError("pool/d.vmdk", in: scratch) == nil)
    }

    /// Each descriptor mistake, with the error it gets.
    @Test(arguments: [
        (["RW 2048 FLAT \"a.bin\""], "monolithicFlat", "Invalid extent line"),
        (["RW 4096 FLAT \"a.bin\" 0"], "monolithicFlat", "fewer than the 2097152 bytes"),
        (["RW 2048 FLAT \"a.bin\" 1"], "monolithicFlat", "fewer than the 1048576 bytes from byte 512"),
        (["RW 1024 SPARSE \"s.vmdk\""], "monolithicFlat", "holds 2048 sectors, but the descriptor declares 1024"),
        (["RW 2048 VMFS \"a.bin\""], "monolithicFlat", "VMFS extent"),
        (["RW 2048 SESPARSE \"s.vmdk\""], "monolithicFlat", "VMFS extent"),
        (["RDONLY 2048 FLAT \"a.bin\" 0"], "monolithicFlat", "access RDONLY"),
        (["RW 2048 FLAT \"a.bin\" 0"], "vmfs", "ESXi VMFS disk"),
        (["RW 2048 FLAT \"a.bin\" 0"], "monolithicSparse", "Unsupported image type 'monolithicSparse'"),
        (["RW 2048 FLAT \"a.bin\" 0"], "", "Unsupported image type ''"),
        (["# nothing"], "monolithicFlat", "names no extents"),
        (["RW 2048 FLAT \"a.bin"], "monolithicFlat", "closing quote"),
        (["RW 2048 FLAT \"a.bin\" 0 x"], "monolithicFlat", "unexpected text"),
        (["RW 2048 COPY \"a.bin\""], "monolithicFlat", "extent type 'COPY' is not supported"),
        (["RW 2048 ZERO \"a.bin\""], "monolithicFlat", "a ZERO extent names a file"),
    ] as [([String], String, String)])
    func descriptorMistakes(_ lines: [String], _ type: String, _ expected: String) throws {
        let scratch = try Scratch()
        try scratch.sh("head -c 1048576 /dev/zero > a.bin && qemu-img create -q -f vmdk s.vmdk 1M")
        try scratch.write("d.vmdk", Array(Self.descriptor(type, lines).utf8))
        let error = FormatOracle.openError("d.vmdk", in: scratch)
        #expect(error?.contains(expected) == true, "\(lines): \(error ?? "opened")")
    }

    @Test func cidFields() throws {
        let scratch = try Scratch()
        try scratch.sh("head -c 1048576 /dev/zero > a.bin")
        for (text, expected) in [("CID=zz\n", "CID 'zz' is not a 32-bit hexadecimal number"),
                                 ("", "descriptor has no CID"),
                                 ("CID=1\nparentCID=\n", "parentCID '' is not")] {
            try scratch.write("d.vmdk", Array("version=1\n\(text)createType=\"monolithicFlat\"\nRW 2048 FLAT \"a.bin\" 0\n".utf8))
            let error = FormatOracle.openError("d.vmdk", in: scratch)
            #expect(error?.contains(expected) == true, "\(text): \(error ?? "opened")")
        }
    }
}
