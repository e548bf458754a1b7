import Foundation
import TestSupport
@testable import Block
import Testing

@Suite("qed") struct QedTests {
    static let sizes: [UInt64] = [1 << 20, (5 << 20) + 512, 100 << 20]
    /// Every cluster_size/table_size layout worth telling apart (table_size=1 is refused by
    /// QEMU itself: see `tableSizeOneIsRefusedAsByQemu`).
    static let layouts = ["", "cluster_size=4096", "cluster_size=1048576", "table_size=2", "cluster_size=4096,table_size=16"]

    /// Patterns at the start, at 2 MiB, a zero write, and the last sector.
    static func writePatterns(_ name: String, size: UInt64, in scratch: Scratch) throws {
        var writes = ["write -P 0x11 0 4k", "write -P 0x22 \(size - 512) 512"]
        if size > (3 << 20) { writes += ["write -P 0x33 2M 64k", "write -z 3M 64k", "write -P 0x44 1048000 2000"] }
        for w in writes { try scratch.sh("qemu-io -f qed -c '\(w)' \(name) >/dev/null") }
    }

    @Test(arguments: layouts, sizes) func matchesQemu(options: String, size: UInt64) throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qed \(options.isEmpty ? "" : "-o \(options)") d.qed \(size)")
        try Self.writePatterns("d.qed", size: size, in: scratch)
        let image = try FormatOracle.expectMatchesQemu("d.qed", format: .qed, in: scratch)
        #expect(image.virtualSize == size)
        #expect(try image.live.allocatedBytes() == metadataDataBytes(image.live))
    }

    /// A raw backing file (backing_fmt=raw sets QED_F_BACKING_FORMAT_NO_PROBE) shorter than
    /// the overlay, and a probed qcow2 backing file: unallocated clusters read and map through
    /// them one level deeper, zeros past the end.
    @Test(arguments: ["raw", "qcow2", "qed"], sizes) func backingFiles(format: String, size: UInt64) throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f \(format) base.\(format) 3M")
        try scratch.sh("qemu-io -f \(format) -c 'write -P 0x55 0 1M' -c 'write -P 0x56 2M 4k' base.\(format) >/dev/null")
        try scratch.sh("qemu-img create -q -f qed -o backing_file=base.\(format),backing_fmt=\(format) d.qed \(size)")
        try Self.writePatterns("d.qed", size: size, in: scratch)
        let image = try FormatOracle.expectMatchesQemu("d.qed", format: .qed, in: scratch)
        #expect(image.backing?.format == Image.Format(rawValue: format))
        #expect(image.backing?.formatDeclared == (format == "raw"))
        #expect(try image.live.allocatedBytes() == metadataDataBytes(image.live))
    }

    /// A backing file outside the pool is refused; a probed backing file (no
    /// QED_F_BACKING_FORMAT_NO_PROBE) may not name files of its own.
    @Test func backingFilesFollowTheTrustRules() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir pool && qemu-img create -q -f raw outside.raw 1M")
        try scratch.sh("qemu-img create -q -f qed -o backing_file=../outside.raw,backing_fmt=raw pool/d.qed 1M")
        let outside = FormatOracle.openError("pool/d.qed", in: scratch)
        #expect(outside == "refused: backing file of \(scratch.path("pool/d.qed")): \(scratch.path("pool/../outside.raw")) leads outside the pool (through '..' or a symbolic link)")
        try scratch.sh("qemu-img create -q -f qed -o backing_file=\(scratch.path("outside.raw")),backing_fmt=raw pool/abs.qed 1M")
        #expect(FormatOracle.openError("pool/abs.qed", in: scratch)?.hasPrefix("refused: backing file \(scratch.path("outside.raw")) of \(scratch.path("pool/abs.qed")) is outside the pool") == true)
        try scratch.sh("qemu-img create -q -f qcow2 -o backing_file=outside.raw,backing_fmt=raw mid.qcow2 1M")
        try scratch.sh("qemu-img create -q -f qed -o backing_file=mid.qcow2,backing_fmt=qcow2 top.qed 1M")
        #expect(FormatOracle.openError("top.qed", in: scratch) ==
            "refused: \(scratch.path("mid.qcow2")) was probed, not declared, and names a backing file: an image whose format was probed may not name other files (set the backing format with qemu-img rebase -F)")
    }

    /// The backing file name ends at its first NUL (QEMU reads a C string); an empty name is no
    /// backing file at all: zeros beneath, as QEMU reads and maps it.
    @Test(arguments: [12, 0] as [UInt64]) func backingNameAsACString(nameSize: UInt64) throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f raw base.raw 2M && qemu-io -f raw -c 'write -P 0x57 0 2M' base.raw >/dev/null")
        try scratch.sh("qemu-img create -q -f qed -o backing_file=base.raw,backing_fmt=raw d.qed 3M")
        try scratch.sh("qemu-io -f qed -c 'write -P 0x58 1M 4k' d.qed >/dev/null")
        try patchLittleEndian(scratch, "d.qed", at: 60, nameSize, width: 4)
        let image = try FormatOracle.expectMatchesQemu("d.qed", format: .qed, in: scratch)
        #expect((image.backing != nil) == (nameSize > 0))
    }

    /// QED_F_NEED_CHECK (an image not closed cleanly) opens read-only without a check, as in
    /// QEMU; so do unknown compat and autoclear bits.
    @Test(arguments: [(16, 2), (24, 1 << 40), (32, 1 << 63)] as [(UInt64, UInt64)])
    func flagsQemuReadsAnyway(field: UInt64, value: UInt64) throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qed d.qed 5M")
        try Self.writePatterns("d.qed", size: 5 << 20, in: scratch)
        try patchLittleEndian(scratch, "d.qed", at: field, value, width: 8)
        try FormatOracle.expectMatchesQemu("d.qed", format: .qed, in: scratch)
    }

    /// A file shorter than the header is probed as qed (QEMU's probe sees the magic too) and
    /// read zero-padded, as QEMU reads it: refused for its cluster size, in QEMU's words.
    @Test func aShortFileIsRefusedAsByQemu() throws {
        let scratch = try Scratch()
        try scratch.sh("printf 'QED\\0' > short.qed && truncate -s 40 short.qed")
        #expect(scratch.attempt("qemu-img info short.qed 2>&1").output.contains("QED cluster size is invalid"))
        #expect(FormatOracle.openError("short.qed", in: scratch) ==
            "\(scratch.path("short.qed")): corrupt image: QED cluster size is invalid: cluster_size 0 is not a power of two in 4096...67108864 (at byte 4)")
    }

    @Test func tableSizeOneIsRefusedAsByQemu() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qed -o table_size=1 d.qed 1M")
        #expect(scratch.attempt("qemu-img info d.qed 2>&1").output.contains("QED table offset is invalid"))
        #expect(FormatOracle.openError("d.qed", in: scratch) ==
            "\(scratch.path("d.qed")): corrupt image: QED table offset is invalid: the L1 table (65536 bytes at 65536) is not cluster-aligned, inside the header, or past the end of the file (at byte 40)")
    }

    /// A 1 PiB disk (the largest 64 KiB clusters and 16-cluster tables map): opened, counted
    /// and mapped quickly; a size one sector larger is refused.
    @Test func hugeDisksAreBounded() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qed -o table_size=16 big.qed 1P && qemu-io -f qed -c 'write -P 0x77 900T 4k' big.qed >/dev/null")
        let start = Date()
        let image = try Image.open(path: scratch.path("big.qed"), cache: BlockCache(capacityBytes: 4 << 20))
        #expect(image.virtualSize == 1 << 50)
        #expect(try image.live.allocatedBytes() == 64 << 10)
        #expect(try image.live.status().filter(\.data).map(\.start) == [900 << 40])
        #expect(try image.live.read(at: 900 << 40, count: 2) == [0x77, 0x77])
        let seconds = Date().timeIntervalSince(start)
        print("qed 1 PiB: open, count and map in \(seconds) s")
        #expect(seconds < 10)
        try patchLittleEndian(scratch, "big.qed", at: 48, (1 << 50) + 512, width: 8)
        #expect(FormatOracle.openError("big.qed", in: scratch) ==
            "\(scratch.path("big.qed")): corrupt image: QED image size is invalid: image_size 1125899906843136 is not a multiple of 512 no larger than 1125899906842624 (at byte 48)")
    }

    /// One header field changed per row: the exact error, and QEMU's words for the same image.
    @Test func corruptionTable() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qed base.qed 5243392 && qemu-io -f qed -c 'write -P 0x33 2M 64k' base.qed >/dev/null")
        typealias Row = (field: UInt64, value: UInt64, width: Int, error: String, qemu: String)
        let table = "is not cluster-aligned, inside the header, or past the end of the file"
        let rows: [Row] = [
            (0, 0x0044_4552, 4, "corrupt image: Image not in QED format (at byte 0)", "Image not in QED format"),
            (16, 0x100, 8, "Unsupported QED features: 100: features at byte 16", "Unsupported QED features: 100"),
            (4, 0x11000, 4, "corrupt image: QED cluster size is invalid: cluster_size 69632 is not a power of two in 4096...67108864 (at byte 4)", "QED cluster size is invalid"),
            (4, 2048, 4, "corrupt image: QED cluster size is invalid: cluster_size 2048 is not a power of two in 4096...67108864 (at byte 4)", "QED cluster size is invalid"),
            (8, 3, 4, "corrupt image: QED table size is invalid: table_size 3 is not a power of two in 1...16 (at byte 8)", "QED table size is invalid"),
            (8, 32, 4, "corrupt image: QED table size is invalid: table_size 32 is not a power of two in 1...16 (at byte 8)", "QED table size is invalid"),
            (48, 5243393, 8, "corrupt image: QED image size is invalid: image_size 5243393 is not a multiple of 512 no larger than 70368744177664 (at byte 48)", "QED image size is invalid"),
            (40, 65537, 8, "corrupt image: QED table offset is invalid: the L1 table (262144 bytes at 65537) \(table) (at byte 40)", "QED table offset is invalid"),
            (40, 0, 8, "corrupt image: QED table offset is invalid: the L1 table (262144 bytes at 0) \(table) (at byte 40)", "QED table offset is invalid"),
            (40, 1 << 20, 8, "corrupt image: QED table offset is invalid: the L1 table (262144 bytes at 1048576) \(table) (at byte 40)", "QED table offset is invalid"),
            (12, 0x10_0000, 4, "corrupt image: QED table offset is invalid: the L1 table (262144 bytes at 65536) \(table) (at byte 40)", "QED table offset is invalid"),
            (12, 0x1_0000, 4, "corrupt image: QED table offset is invalid: the L1 table (262144 bytes at 65536) \(table) (at byte 40)", "QED table offset is invalid"),
            (16, 1, 8, "corrupt image: QED backing filename offset is invalid: 0 bytes at 0 lie outside the 65536-byte header (at byte 56)", "QED backing filename offset is invalid"),
        ]
        for row in rows {
            try scratch.sh("cp base.qed bad.qed")
            try patchLittleEndian(scratch, "bad.qed", at: row.field, row.value, width: row.width)
            if row.field == 16, row.value == 1 {
                // The backing feature with a name reaching past the header.
                try patchLittleEndian(scratch, "bad.qed", at: 56, 65000, width: 4)
                try patchLittleEndian(scratch, "bad.qed", at: 60, 1000, width: 4)
            }
            let error = FormatOracle.openError("bad.qed", in: scratch, format: .qed)
            let expected = row.field == 16 && row.value == 1
                ? "corrupt image: QED backing filename offset is invalid: 1000 bytes at 65000 lie outside the 65536-byte header (at byte 56)"
                : row.error
            #expect(error == "\(scratch.path("bad.qed")): \(expected)", "field at \(row.field)")
            let qemu = scratch.attempt("qemu-img info -f qed bad.qed 2>&1")
            #expect(!qemu.ok, "QEMU opened the image with field at \(row.field) = \(row.value)")
            #expect(qemu.output.contains(row.qemu), "QEMU on field at \(row.field) = \(row.value): \(qemu.output)")
        }
    }

    /// header_size × cluster_size must fit in 32 bits; reachable only when the L1 table lies
    /// past 4 GiB (it must lie past the header), so the file is grown sparse to 5 GiB.
    @Test func headerSizeTooLarge() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qed d.qed 1M && truncate -s 5G d.qed")
        try patchLittleEndian(scratch, "d.qed", at: 12, 0x1_0000, width: 4)
        try patchLittleEndian(scratch, "d.qed", at: 40, 1 << 32, width: 8)
        #expect(FormatOracle.openError("d.qed", in: scratch) ==
            "\(scratch.path("d.qed")): corrupt image: QED header size is too large: header_size 65536 (at byte 12)")
        #expect(scratch.attempt("qemu-img info d.qed 2>&1").output.contains("QED header size is too large"))
    }

    /// Table entries QEMU's `qed_find_cluster` rejects: the image opens, and reading or mapping
    /// the range they map fails (QEMU fails those reads with EINVAL); other ranges still read.
    @Test func badTableEntriesFailTheirRange() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qed -o cluster_size=4096,table_size=2 base.qed 64M")
        try scratch.sh("qemu-io -f qed -c 'write -P 0x33 0 8k' -c 'write -P 0x34 40M 4k' base.qed >/dev/null")
        // L1 at 4096 (2 clusters); L1 entry 0's table at 12288, entry 0 of it a data cluster.
        let l1 = UInt64(4096)
        let l2 = try readLE(scratch, "base.qed", at: l1)
        let l2Entry1 = l2 + 8
        let rows: [(at: UInt64, value: UInt64, error: String)] = [
            (l2Entry1, 4097, "corrupt image: L2 entry 1 names a data cluster at 4097 that is not cluster-aligned, inside the header, or past the end of the file (at byte \(l2Entry1))"),
            (l2Entry1, 1 << 40, "corrupt image: L2 entry 1 names a data cluster at 1099511627776 that is not cluster-aligned, inside the header, or past the end of the file (at byte \(l2Entry1))"),
            (l2Entry1, 2048, "corrupt image: L2 entry 1 names a data cluster at 2048 that is not cluster-aligned, inside the header, or past the end of the file (at byte \(l2Entry1))"),
            (l1, 1 << 30, "corrupt image: L1 entry 0 names an L2 table at 1073741824 that is not cluster-aligned, inside the header, or past the end of the file (at byte 4096)"),
            (l1, 0, ""),
        ]
        for row in rows {
            try scratch.sh("cp base.qed bad.qed")
            try patchLittleEndian(scratch, "bad.qed", at: row.at, row.value, width: 8)
            let image = try Image.open(path: scratch.path("bad.qed"), format: .qed, cache: BlockCache(capacityBytes: 1 << 20))
            #expect(try image.live.read(at: 40 << 20, count: 1) == [0x34])
            if row.error.isEmpty {
                #expect(try image.live.read(at: 4096, count: 1) == [0])
                continue
            }
            do {
                _ = try image.live.read(at: 4096, count: 1)
                Issue.record("read of a bad entry (\(row.at) = \(row.value)) succeeded")
            } catch {
                #expect("\(error)" == row.error)
            }
            #expect(throws: Qcow2Error.self) { try image.live.status() }
            let qemu = scratch.attempt("qemu-io -r -f qed -c 'read 4096 512' bad.qed 2>&1").output
            #expect(qemu.contains("read failed: Invalid argument"), "QEMU: \(qemu)")
        }
    }

    func readLE(_ scratch: Scratch, _ name: String, at offset: UInt64) throws -> UInt64 {
        let bytes = try scratch.bytes(name)
        return (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[Int(offset) + $1]) << (8 * UInt64($1)) }
    }
}
