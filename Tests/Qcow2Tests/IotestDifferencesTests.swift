import Foundation
import TestSupport
import Block
import Testing

/// The cases where poolfs differed from QEMU on QEMU's own iotests (060, 080; issue 24). Each
/// image is made by qemu-img at test time and edited with the byte pokes the iotest makes
/// (`poke_file`, here `dd`); qemu-io and qemu-img, run on the same file, are the oracle.
@Suite("QEMU iotest differences (060, 080)")
struct IotestDifferencesTests {
    /// iotest 080's `poke_file`: writes `bytes` at `offset` without truncating.
    static func poke(_ file: String, _ offset: UInt64, _ bytes: [UInt8], in scratch: Scratch) throws {
        let octal = bytes.map { "\\" + String($0, radix: 8) }.joined()
        try scratch.sh("printf '\(octal)' | dd of=\(file) bs=1 seek=\(offset) conv=notrunc status=none")
    }

    static func be64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (56 - 8 * $0)) } }
    static func be32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (24 - 8 * $0)) } }

    /// What opening `file` throws, or nil.
    static func openError(_ file: String, format: Image.Format? = nil) -> Qcow2Error? {
        do {
            _ = try Image.open(path: file, format: format, cache: BlockCache(capacityBytes: 1 << 20))
            return nil
        } catch let error as Qcow2Error {
            return error
        } catch {
            Issue.record("not a Qcow2Error: \(error)")
            return nil
        }
    }

    /// A 4 MiB image (the iotests' 64 MiB gives the same layout, only slower to compare) with two snapshots ("one" holds 0x11, "two" 0x22) and live data 0x33
    /// (`liveWrite`; without it the snapshot table ends the file), and the offset of its
    /// snapshot table.
    static func imageWithTwoSnapshots(in scratch: Scratch, liveWrite: Bool = true) throws -> UInt64 {
        try scratch.sh("""
            qemu-img create -q -f qcow2 s.qcow2 4M && qemu-io -c 'write -P 0x11 0 64k' s.qcow2 >/dev/null \
            && qemu-img snapshot -c one s.qcow2 && qemu-io -c 'write -P 0x22 64k 64k' s.qcow2 >/dev/null \
            && qemu-img snapshot -c two s.qcow2
            """)
        if liveWrite { try scratch.sh("qemu-io -c 'write -P 0x33 1M 4k' s.qcow2 >/dev/null") }
        let header = try scratch.bytes("s.qcow2")
        return header[64..<72].reduce(0) { $0 << 8 | UInt64($1) }
    }

    // MARK: 1. One corrupt snapshot entry, or a snapshot table past the end of the file

    /// 080 "Invalid snapshot L1 table offset" and "... size": QEMU opens the image, reads the
    /// live disk and the other snapshot, and fails only when the bad snapshot is loaded.
    @Test(arguments: [("l1_table_offset", UInt64(0), be64(0x400200), "Snapshot L1 table offset invalid", "is not cluster-aligned"),
                      ("l1_size", UInt64(8), be32(0x1000_0000), "Snapshot L1 table too large", "is too large")])
    func oneCorruptSnapshotEntry(field: String, at: UInt64, bytes: [UInt8], qemuSays: String, weSay: String) throws {
        let scratch = try Scratch()
        let table = try Self.imageWithTwoSnapshots(in: scratch)
        try Self.poke("s.qcow2", table + at, bytes, in: scratch)
        let qemu = scratch.attempt("qemu-img convert -l snapshot.name=one -O raw s.qcow2 one.raw")
        #expect(!qemu.ok && qemu.output.contains(qemuSays), "\(field): qemu-img: \(qemu.output)")
        try scratch.sh("qemu-img convert -O raw s.qcow2 live.raw && qemu-img convert -l snapshot.name=two -O raw s.qcow2 two.raw")

        let image = try Image.open(path: scratch.path("s.qcow2"), cache: BlockCache(capacityBytes: 4 << 20))
        try Oracle.expectSame(image.live, as: scratch.path("live.raw"), "live disk, \(field) of snapshot one corrupt")
        try Oracle.expectSameMap(image.live, as: "s.qcow2", in: scratch, "live disk")
        #expect(image.snapshots.map(\.name) == ["one", "two"])
        let one = try #require(image.snapshots.first)
        #expect(one.problem?.contains(weSay) == true, "\(one.problem ?? "no problem")")
        #expect(image.device(of: one) == nil)
        let two = try #require(image.snapshots.last)
        #expect(two.problem == nil)
        try Oracle.expectSame(try #require(image.device(of: two)), as: scratch.path("two.raw"), "snapshot two")
        #expect(image.snapshotTableProblem == nil)
    }

    /// 080 "Invalid snapshot table" moved past the end of the file (aligned, so QEMU accepts the
    /// offset): QEMU reads zeros there and opens the image; so do we, and report the entries.
    @Test func snapshotTablePastTheEndOfTheFile() throws {
        let scratch = try Scratch()
        _ = try Self.imageWithTwoSnapshots(in: scratch)
        try Self.poke("s.qcow2", 64, Self.be64(0x1000_0000), in: scratch)
        try scratch.sh("qemu-io -r -c 'read -P 0x33 1M 4k' s.qcow2 && qemu-img convert -O raw s.qcow2 live.raw")
        let image = try Image.open(path: scratch.path("s.qcow2"), cache: BlockCache(capacityBytes: 4 << 20))
        try Oracle.expectSame(image.live, as: scratch.path("live.raw"), "live disk, snapshot table past the end")
        #expect(image.snapshots.isEmpty)
        #expect(image.snapshotTableProblem?.contains("snapshot table entries 0...1 lie past the end of the file") == true,
                "\(image.snapshotTableProblem ?? "no problem")")
    }

    /// 080 "Hitting snapshot table size limit": 65536 snapshots at 16 MiB, past the end of a
    /// new image. QEMU opens it and reads; so do we, with the table reported.
    @Test func hittingTheSnapshotTableSizeLimit() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 t.qcow2 64M")
        try Self.poke("t.qcow2", 60, Self.be32(0x1_0000) + Self.be64(0x100_0000), in: scratch)
        try scratch.sh("qemu-io -c 'read 0 512' t.qcow2")
        let image = try Image.open(path: scratch.path("t.qcow2"), cache: BlockCache(capacityBytes: 1 << 20))
        #expect(try image.live.read(at: 0, count: 512) == [UInt8](repeating: 0, count: 512))
        #expect(image.snapshots.isEmpty)
        #expect(image.snapshotTableProblem?.hasPrefix("snapshot table entries 0...65535 lie past the end of the file") == true,
                "\(image.snapshotTableProblem ?? "no problem")")
    }

    /// nb_snapshots one larger than the table: the last entry runs past the end of the file.
    /// QEMU lists it (as zeros) and reads the rest; we keep the two good snapshots.
    @Test func snapshotTableRunningPastTheEndOfTheFile() throws {
        let scratch = try Scratch()
        let table = try Self.imageWithTwoSnapshots(in: scratch, liveWrite: false)
        #expect(try scratch.bytes("s.qcow2").count < table + 512, "the table must end the file")
        try Self.poke("s.qcow2", 60, Self.be32(3), in: scratch)
        let list = try scratch.sh("qemu-img snapshot -l s.qcow2")
        #expect(list.contains("one") && list.contains("two"))
        try scratch.sh("qemu-img convert -O raw s.qcow2 live.raw && qemu-img convert -l snapshot.name=one -O raw s.qcow2 one.raw")
        let image = try Image.open(path: scratch.path("s.qcow2"), cache: BlockCache(capacityBytes: 4 << 20))
        try Oracle.expectSame(image.live, as: scratch.path("live.raw"), "live disk")
        #expect(image.snapshots.map(\.name) == ["one", "two"])
        try Oracle.expectSame(try #require(image.device(of: image.snapshots[0])), as: scratch.path("one.raw"), "snapshot one")
        #expect(image.snapshotTableProblem?.hasPrefix("snapshot table entry 2 lies past the end of the file") == true,
                "\(image.snapshotTableProblem ?? "no problem")")
    }

    /// A writer may not work on a table it cannot read whole.
    @Test func snapshotWriterRefusesABrokenTable() throws {
        let scratch = try Scratch()
        let table = try Self.imageWithTwoSnapshots(in: scratch)
        try Self.poke("s.qcow2", table, Self.be64(0x400200), in: scratch)
        let image = try Image.open(path: scratch.path("s.qcow2"), cache: BlockCache(capacityBytes: 4 << 20), writable: true)
        let qcow2 = try #require(image.qcow2)
        #expect(throws: Qcow2Error.self) { try qcow2.createSnapshot(name: "three", replace: false) }
    }

    // MARK: 2. A header extension overrunning backing_file_offset

    /// 080 "Huge unknown header extension", at QEMU 7.2's header size (112): an extension of
    /// 0x7fffffff bytes, with backing_file_offset past the cluster, inside the extension's own
    /// 8 bytes, and 0. QEMU refuses all three.
    @Test func hugeUnknownHeaderExtension() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 t.qcow2 64M")
        try Self.poke("t.qcow2", 112, Self.be32(0x1234_5678) + Self.be32(0x7fff_ffff), in: scratch)
        let cases: [(UInt64, String, Qcow2Error)] = [
            (.max, "Invalid backing file offset",
             .corrupt("backing file name (0 bytes at 18446744073709551615) lies outside the first cluster", offset: 8)),
            (116, "Header extension too large",
             .corrupt("header extension too large: its type and length (8 bytes at 112) run past byte 116 (backing_file_offset)", offset: 112)),
            (0, "Header extension too large",
             .corrupt("header extension too large: 0x12345678 of 2147483647 bytes runs past byte 65536 (the end of the first cluster)", offset: 112)),
        ]
        for (backingOffset, qemuSays, expected) in cases {
            try Self.poke("t.qcow2", 8, Self.be64(backingOffset), in: scratch)
            let qemu = scratch.attempt("qemu-io -c 'read 0 512' t.qcow2")
            #expect(!qemu.ok && qemu.output.contains(qemuSays), "backing_file_offset \(backingOffset): \(qemu.output)")
            #expect(Self.openError(scratch.path("t.qcow2")) == expected, "backing_file_offset \(backingOffset)")
        }
    }

    /// An extension that ends exactly at backing_file_offset is fine (qemu-img's own images).
    @Test func extensionsEndingAtTheBackingFileNameAreRead() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f raw base.raw 1M && qemu-io -f raw -c 'write -P 7 0 4k' base.raw >/dev/null"
                       + " && qemu-img create -q -f qcow2 -b base.raw -F raw top.qcow2")
        try Oracle.expectMatchesQemu("top.qcow2", in: scratch)
    }

    // MARK: 3. A misaligned snapshots_offset with nb_snapshots = 0

    /// 080 "Invalid snapshot table": QEMU checks the offset even when there are no snapshots.
    @Test func invalidSnapshotTableOffset() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 t.qcow2 64M")
        let cases: [(offset: UInt64, count: UInt32, qemuSays: String, expected: Qcow2Error)] = [
            (0x1234_5678_90ab_cdef, 0, "Snapshot table offset invalid",
             .corrupt("snapshot table offset 1311768467294899695 is not cluster-aligned (snapshot table offset invalid)", offset: 64)),
            (0xffff_ffff_ffff_0000, 0xffff, "Snapshot table offset invalid",
             .corrupt("snapshot table offset 18446744073709486080 is invalid (past 2^63)", offset: 64)),
            (0, 0xffff_ffff, "Snapshot table too large", .corrupt("nb_snapshots 4294967295 is too large", offset: 60)),
        ]
        for c in cases {
            try Self.poke("t.qcow2", 60, Self.be32(c.count) + Self.be64(c.offset), in: scratch)
            let qemu = scratch.attempt("qemu-io -c 'read 0 512' t.qcow2")
            #expect(!qemu.ok && qemu.output.contains(c.qemuSays), "offset \(c.offset): \(qemu.output)")
            #expect(Self.openError(scratch.path("t.qcow2")) == c.expected, "offset \(c.offset), \(c.count) snapshots")
        }
    }

    // MARK: 4. An L2 table at the L1 table's cluster, running past the end of the file

    /// 060 "Testing L2 reference into L1": L1 entry 0 points at the L1 table's own cluster
    /// (0x30000), which a new image ends 8 bytes into. A read-only open succeeds and reads the
    /// L1 table as L2 entries, zeros past the end of the file.
    @Test func l2TableAtTheL1TablePastTheEndOfTheFile() throws {
        let scratch = try Scratch()
        // 4 MiB rather than the iotest's 64 MiB: the same layout (L1 table at 0x30000, one entry).
        try scratch.sh("qemu-img create -q -f qcow2 -o compat=1.1 t.qcow2 4M")
        try Self.poke("t.qcow2", 0x30000, Self.be64(0x8000_0000_0003_0000), in: scratch)
        #expect(try scratch.bytes("t.qcow2").count < 0x40000, "the L2 table must run past the end of the file")
        try scratch.sh("qemu-io -r -c 'read 0 512' t.qcow2 && qemu-img convert -O raw t.qcow2 live.raw")
        let image = try Image.open(path: scratch.path("t.qcow2"), cache: BlockCache(capacityBytes: 4 << 20))
        try Oracle.expectSame(image.live, as: scratch.path("live.raw"), "060 L2 into L1")
        try Oracle.expectSameMap(image.live, as: "t.qcow2", in: scratch, "060 L2 into L1")
        #expect(try image.live.read(at: 0, count: 8) == Self.be64(0x8000_0000_0003_0000))
    }

    /// 060 then writes through the same image: QEMU's overlap check refuses the write (and marks
    /// the image corrupt). poolfs's writer must refuse it too, and leave the L1 table as it was.
    @Test func writingThroughAnL2TableAtTheL1TableIsRefused() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 -o compat=1.1 t.qcow2 4M")
        try Self.poke("t.qcow2", 0x30000, Self.be64(0x8000_0000_0003_0000), in: scratch)
        let qemu = scratch.attempt("cp t.qcow2 q.qcow2 && qemu-io -c 'write -P 0x2a 0 512' q.qcow2")
        #expect(qemu.output.contains("Preventing invalid write") || qemu.output.contains("corrupt"), "\(qemu.output)")
        let before = try scratch.bytes("t.qcow2")
        let image = try Image.open(path: scratch.path("t.qcow2"), cache: BlockCache(capacityBytes: 1 << 20), writable: true)
        let writer = try image.makeWriter()
        let data = [UInt8](repeating: 0x2a, count: 512)
        #expect(throws: Qcow2Error.self) { try data.withUnsafeBytes { try writer.write($0, at: 0) } }
        try? writer.close()
        #expect(Array(try scratch.bytes("t.qcow2")[0x30000..<0x30008]) == Array(before[0x30000..<0x30008]))
    }

    // MARK: 5. qcow version 1 opened as qcow2

    @Test func qcowVersion1DeclaredAsQcow2() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow v1.qcow 64M")
        let qemu = scratch.attempt("qemu-io -f qcow2 -c 'read 0 512' v1.qcow")
        #expect(!qemu.ok && qemu.output.contains("Unsupported qcow2 version 1"), "\(qemu.output)")
        let declared = try #require(Self.openError(scratch.path("v1.qcow"), format: .qcow2))
        #expect(declared == .unsupportedVersion(1))
        #expect("\(declared)".contains("qcow version 1 is not supported"))
        // Probed, it is qcow and refused with qcow's reason.
        let probed = try #require(Self.openError(scratch.path("v1.qcow")))
        #expect(probed.recognisedFormat == "qcow")
        #expect("\(probed)".contains("qcow (version 1) images are not supported"))
    }

    // MARK: Encryption is refused by name

    @Test(arguments: [("luks", UInt32(2), "LUKS"), ("aes", UInt32(1), "AES")])
    func encryptedImagesAreRefusedByName(format: String, method: UInt32, named: String) throws {
        let scratch = try Scratch()
        try scratch.sh(format == "luks" ? LuksImages.qcow2("e.qcow2", bytes: 1 << 20)
                       : "qemu-img create -q --object secret,id=s0,data=k -f qcow2 -o encrypt.format=aes,encrypt.key-secret=s0 e.qcow2 1M")
        // (qemu-img info of the LUKS stand-in LuksImages may make crashes qemu-img: asked of AES only.)
        if format == "aes" { #expect(try scratch.sh("qemu-img info e.qcow2").contains("encrypted: yes")) }
        let error = try #require(Self.openError(scratch.path("e.qcow2")))
        #expect(error == .encrypted(method: method))
        #expect("\(error)".contains(named), "\(error)")
    }
}
