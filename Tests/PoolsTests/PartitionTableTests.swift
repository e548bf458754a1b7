import Foundation
@testable import Pools
import Block
import TestSupport
import Testing

/// What `sfdisk --json` says of a disk: the oracle for libblkid through the sketch.
struct SfdiskTable: Decodable {
    struct Entry: Decodable {
        var node: String
        var start: UInt64
        var size: UInt64
        var type: String
        var uuid: String?
        var name: String?
        /// The partition number: the digits at the end of the node name ("disk.img5", "loop0p5").
        var number: Int { Int(String(node.reversed().prefix { $0.isNumber }.reversed()))! }
    }
    var label: String
    var id: String
    var sectorsize: Int
    var partitions: [Entry]

    static func of(_ target: String, in scratch: Scratch) throws -> SfdiskTable {
        struct Wrapper: Decodable { var partitiontable: SfdiskTable }
        let json = try scratch.sh("sfdisk --json \(target)")
        return try JSONDecoder().decode(Wrapper.self, from: Data(json.utf8)).partitiontable
    }
}

/// Disks made by sfdisk at test time, each partition marked at both ends.
enum PartitionFixture {
    /// 2 primaries, an extended partition to the end of the 64 MiB disk, logicals 5, 6, 7.
    static let mbrScript = """
        label: dos
        label-id: 0x1234abcd
        size=8M, type=83
        size=8M, type=82
        type=E
        size=8M, type=83
        size=8M, type=8e
        size=8M, type=83
        """
    static let gptScript = """
        label: gpt
        label-id: 0E3A6F2C-95B4-4C39-9D54-3F6C0A1B2C3D
        size=8M, type=L, name="root", uuid=7B1D2E3F-4A5B-4C6D-8E9F-0A1B2C3D4E5F
        size=4M, type=S, name="swap space"
        size=16M, type=H
        size=8M, name=data
        """
    static let markLength = 4096

    /// The byte a partition is marked with at its start (`end` false) or its end.
    static func mark(_ number: Int, end: Bool) -> UInt8 { UInt8(end ? 0x80 + number : 0x10 + number) }

    /// A sparse 64 MiB image `name` partitioned by `script`, each data partition marked.
    @discardableResult
    static func make(_ name: String, _ script: String, in scratch: Scratch) throws -> SfdiskTable {
        try scratch.sh("truncate -s 64M \(name) && printf '%s\\n' '\(script)' | sfdisk -q --no-reread --no-tell-kernel \(name)")
        let table = try SfdiskTable.of(name, in: scratch)
        try markPartitions(table, of: scratch.path(name))
        return table
    }

    /// Marks both ends of every data partition of the table in the image at `path`.
    static func markPartitions(_ table: SfdiskTable, of path: String) throws {
        let file = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        defer { try? file.close() }
        for entry in table.partitions where !["5", "f", "85"].contains(entry.type) {
            let start = entry.start * UInt64(table.sectorsize), end = start + entry.size * UInt64(table.sectorsize)
            try file.seek(toOffset: start)
            file.write(Data(repeating: mark(entry.number, end: false), count: markLength))
            try file.seek(toOffset: end - UInt64(markLength))
            file.write(Data(repeating: mark(entry.number, end: true), count: markLength))
        }
    }
}

@Suite("Partition tables through libblkid")
struct PartitionTableTests {
    static func raw(_ path: String) throws -> RawImage { RawImage(file: try HostFile(path: path)) }

    /// Every field of every partition against sfdisk; then the bytes of every data partition.
    static func check(_ table: PartitionTable, against oracle: SfdiskTable, device: any BlockDevice,
                      rawFile: String) throws {
        let ss = UInt64(oracle.sectorsize)
        #expect(table.type == oracle.label)
        #expect(table.sectorSize == oracle.sectorsize)
        #expect(table.warnings == [])
        if oracle.label == "dos" {
            #expect("0x" + (table.id ?? "") == oracle.id)
        } else {
            #expect(table.id?.uppercased() == oracle.id.uppercased())
        }
        #expect(table.partitions.map(\.number) == oracle.partitions.map(\.number))
        let bytes = [UInt8](try Data(contentsOf: URL(fileURLWithPath: rawFile)))
        for entry in oracle.partitions {
            let p = try #require(table.partitions.first { $0.number == entry.number })
            #expect(p.start == entry.start * ss, "partition \(entry.number)")
            #expect(p.size == entry.size * ss, "partition \(entry.number)")
            #expect(p.tableType == oracle.label)
            let extended = ["5", "f", "85"].contains(entry.type)
            #expect(p.isExtended == extended)
            if oracle.label == "dos" {
                #expect(p.type == "0x" + entry.type)
                #expect(p.isLogical == (entry.number >= 5))
                // libblkid names DOS partitions "<disk id>-<nn>", as the kernel's PARTUUID.
                #expect(p.uuid == String(format: "%@-%02d", String(oracle.id.dropFirst(2)), entry.number))
                #expect(p.name == nil)
            } else {
                #expect(p.type.uppercased() == entry.type)
                #expect(p.uuid?.uppercased() == entry.uuid)
                #expect(p.name == entry.name)
                #expect(!p.isLogical)
            }
            guard !extended else { continue }
            let partition = try PartitionDevice(device, partition: p)
            let read = try partition.read(at: 0, count: Int(p.size))
            #expect(read == Array(bytes[Int(p.start)..<Int(p.start + p.size)]), "partition \(entry.number)")
            #expect(read.first == PartitionFixture.mark(entry.number, end: false))
            #expect(read.last == PartitionFixture.mark(entry.number, end: true))
        }
    }

    @Test func mbrWithLogicalPartitions() throws {
        let scratch = try Scratch()
        let oracle = try PartitionFixture.make("mbr.img", PartitionFixture.mbrScript, in: scratch)
        #expect(oracle.partitions.map(\.number) == [1, 2, 3, 5, 6, 7])
        let device = try Self.raw(scratch.path("mbr.img"))
        let table = try #require(try PartitionTable.read(device))
        try Self.check(table, against: oracle, device: device, rawFile: scratch.path("mbr.img"))
        print("mbr: \(table.copiedBytes) bytes copied, \(table.probes) probes")
    }

    @Test func gptWithNames() throws {
        let scratch = try Scratch()
        let oracle = try PartitionFixture.make("gpt.img", PartitionFixture.gptScript, in: scratch)
        let device = try Self.raw(scratch.path("gpt.img"))
        let table = try #require(try PartitionTable.read(device))
        try Self.check(table, against: oracle, device: device, rawFile: scratch.path("gpt.img"))
        #expect(table.partitions.map(\.name) == ["root", "swap space", nil, "data"])
        print("gpt: \(table.copiedBytes) bytes copied, \(table.probes) probes")
    }

    /// The same disks converted to qcow2, read through the qcow2 engine.
    @Test(arguments: [("mbr", PartitionFixture.mbrScript), ("gpt", PartitionFixture.gptScript)])
    func qcow2Images(_ name: String, _ script: String) throws {
        let scratch = try Scratch()
        let oracle = try PartitionFixture.make("\(name).img", script, in: scratch)
        try scratch.sh("qemu-img convert -f raw -O qcow2 \(name).img \(name).qcow2")
        let image = try Image.open(path: scratch.path("\(name).qcow2"), cache: BlockCache(capacityBytes: 1 << 20))
        #expect(image.format == .qcow2)
        let table = try #require(try PartitionTable.read(image.live))
        try Self.check(table, against: oracle, device: image.live, rawFile: scratch.path("\(name).img"))
        print("\(name).qcow2: \(table.copiedBytes) bytes copied, \(table.probes) probes")
    }

    /// A GPT on a disk of 4096-byte sectors: made on a loop device with that sector size.
    @Test func gptWith4096ByteSectors() throws {
        let scratch = try Scratch()
        try scratch.sh("truncate -s 64M g4k.img")
        let loop = try scratch.sh("losetup --show -f --sector-size 4096 g4k.img").trimmingCharacters(in: .whitespacesAndNewlines)
        let oracle: SfdiskTable
        do {
            defer { _ = try? scratch.sh("losetup -d \(loop)") }
            try scratch.sh("printf '%s\\n' 'label: gpt' 'size=8M, name=a' 'size=8M, name=b' | sfdisk -q --no-reread --no-tell-kernel \(loop)")
            oracle = try SfdiskTable.of(loop, in: scratch)
        }
        #expect(oracle.sectorsize == 4096)
        try PartitionFixture.markPartitions(oracle, of: scratch.path("g4k.img"))
        let device = try Self.raw(scratch.path("g4k.img"))
        let table = try #require(try PartitionTable.read(device, sectorSize: 4096))
        try Self.check(table, against: oracle, device: device, rawFile: scratch.path("g4k.img"))
        // Read as 512-byte sectors, the disk holds only a protective MBR.
        #expect(try PartitionTable.read(device)?.type == "PMBR")
    }

    /// Disks without a table: none is not an error.
    @Test(arguments: ["empty", "zeros", "ext4"])
    func noTable(_ kind: String) throws {
        let scratch = try Scratch()
        switch kind {
        case "empty": try scratch.sh("touch disk")
        case "zeros": try scratch.sh("dd if=/dev/zero of=disk bs=1M count=4 status=none")
        default: try scratch.sh("truncate -s 16M disk && mkfs.ext4 -q disk")
        }
        #expect(try PartitionTable.read(Self.raw(scratch.path("disk"))) == nil)
    }

    @Test func invalidSectorSize() throws {
        let scratch = try Scratch()
        try scratch.sh("truncate -s 1M disk")
        #expect(throws: PartitionTableError.invalidSectorSize(1000)) {
            try PartitionTable.read(Self.raw(scratch.path("disk")), sectorSize: 1000)
        }
    }
}

/// Tables no tool would write, built here byte by byte.
@Suite("Partition tables: hostile")
struct HostilePartitionTableTests {
    /// A 16-byte MBR partition entry (boot flag, CHS ignored, type at 4, LBA start at 8, sectors at 12).
    static func entry(type: UInt8, start: UInt32, sectors: UInt32) -> [UInt8] {
        var e = [UInt8](repeating: 0, count: 16)
        e[4] = type                                             // system indicator
        withUnsafeBytes(of: start.littleEndian) { e.replaceSubrange(8..<12, with: $0) }   // first LBA
        withUnsafeBytes(of: sectors.littleEndian) { e.replaceSubrange(12..<16, with: $0) } // sector count
        return e
    }

    /// A boot record: disk id at 440 (MBR only), four entries from 446, 0x55 0xAA at 510.
    static func bootRecord(id: UInt32 = 0, _ entries: [[UInt8]]) -> [UInt8] {
        var sector = [UInt8](repeating: 0, count: 512)
        withUnsafeBytes(of: id.littleEndian) { sector.replaceSubrange(440..<444, with: $0) }
        for (i, e) in entries.enumerated() { sector.replaceSubrange(446 + 16 * i..<462 + 16 * i, with: e) }
        sector[510] = 0x55
        sector[511] = 0xAA
        return sector
    }

    static func write(_ sector: [UInt8], at lba: UInt64, to path: String) throws {
        let file = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        defer { try? file.close() }
        try file.seek(toOffset: lba * 512)
        file.write(Data(sector))
    }

    static func device(_ scratch: Scratch, megabytes: Int = 8) throws -> RawImage {
        try scratch.sh("truncate -s \(megabytes)M disk")
        return RawImage(file: try HostFile(path: scratch.path("disk")))
    }

    /// A partition past the end of an 8 MiB disk (16384 sectors) is left out, with a warning;
    /// a window onto it is refused.
    @Test func mbrPartitionPastTheEnd() throws {
        let scratch = try Scratch()
        _ = try Self.device(scratch)
        try Self.write(Self.bootRecord(id: 0xdead_beef, [
            Self.entry(type: 0x83, start: 2048, sectors: 4096),
            Self.entry(type: 0x83, start: 8192, sectors: 100_000),
            Self.entry(type: 0x83, start: 0xFFFF_FFFF, sectors: 0xFFFF_FFFF),
        ]), at: 0, to: scratch.path("disk"))
        let device = RawImage(file: try HostFile(path: scratch.path("disk")))
        let table = try #require(try PartitionTable.read(device))
        #expect(table.type == "dos")
        #expect(table.id == "deadbeef")
        let first = Partition(number: 1, start: 2048 * 512, size: 4096 * 512, tableType: "dos", type: "0x83", uuid: "deadbeef-01")
        #expect(table.partitions == [first])
        #expect(table.warnings == [
            "partition 2 (dos) at 512-byte sector 8192, 100000 sectors long, lies outside the device (8388608 bytes): left out",
            "partition 3 (dos) at 512-byte sector 4294967295, 4294967295 sectors long, lies outside the device (8388608 bytes): left out",
        ])
        #expect(throws: PartitionDevice.WindowError.outside(start: 8192 * 512, size: 100_000 * 512, deviceSize: 8 << 20)) {
            try PartitionDevice(device, start: 8192 * 512, size: 100_000 * 512)
        }
    }

    /// Extended partition at sector 2048: EBR A holds logical 5 and links to EBR B at 4096;
    /// B holds logical 6 and links to itself. libblkid stops on the repeated data partition.
    @Test func ebrChainLoopingToItself() throws {
        let scratch = try Scratch()
        _ = try Self.device(scratch)
        let path = scratch.path("disk")
        try Self.write(Self.bootRecord(id: 1, [Self.entry(type: 0x05, start: 2048, sectors: 8192)]), at: 0, to: path)
        // Starts in an EBR: data relative to the EBR, links relative to the extended partition.
        try Self.write(Self.bootRecord([Self.entry(type: 0x83, start: 64, sectors: 1024),
                                        Self.entry(type: 0x05, start: 2048, sectors: 2048)]), at: 2048, to: path)
        try Self.write(Self.bootRecord([Self.entry(type: 0x83, start: 64, sectors: 1024),
                                        Self.entry(type: 0x05, start: 2048, sectors: 2048)]), at: 4096, to: path)
        let table = try #require(try PartitionTable.read(RawImage(file: try HostFile(path: path))))
        #expect(table.partitions.map(\.number) == [1, 5, 6])
        let starts: [UInt64] = [2048 * 512, 2112 * 512, 4160 * 512]
        #expect(table.partitions.map(\.start) == starts)
        #expect(table.partitions.map(\.isLogical) == [false, true, true])
        #expect(table.warnings == [])
    }

    /// CRC-32 (IEEE, reflected), as GPT uses it.
    static func crc32(_ bytes: ArraySlice<UInt8>) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        for byte in bytes {
            crc ^= UInt32(byte)
            for _ in 0..<8 { crc = crc & 1 == 1 ? (crc >> 1) ^ 0xEDB8_8320 : crc >> 1 }
        }
        return ~crc
    }

    /// Patches a GPT header (LBA 1, or the last LBA): `body` edits the 92 header bytes, then the
    /// header CRC at 16 is recomputed unless `fixCRC` is false.
    static func patchHeader(_ path: String, lba: UInt64, fixCRC: Bool = true, _ body: (inout [UInt8]) -> Void) throws {
        let file = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        defer { try? file.close() }
        try file.seek(toOffset: lba * 512)
        var header = [UInt8](file.readData(ofLength: 92))
        body(&header)
        if fixCRC {
            header.replaceSubrange(16..<20, with: [0, 0, 0, 0])
            withUnsafeBytes(of: crc32(header[0..<92]).littleEndian) { header.replaceSubrange(16..<20, with: $0) }
        }
        try file.seek(toOffset: lba * 512)
        file.write(Data(header))
    }

    static let lastLBA: UInt64 = (64 << 20) / 512 - 1

    /// Primary header broken (CRC, or 2^31 - 1 entries with a good CRC): libblkid reads the
    /// backup at the last LBA, and the table is whole. Both broken: only the protective MBR.
    @Test(arguments: ["crc", "count"])
    func gptHeaderDamaged(_ damage: String) throws {
        let scratch = try Scratch()
        let oracle = try PartitionFixture.make("gpt.img", PartitionFixture.gptScript, in: scratch)
        let path = scratch.path("gpt.img")
        let wreck: (UInt64) throws -> Void = { lba in
            if damage == "crc" {
                try Self.patchHeader(path, lba: lba, fixCRC: false) { $0[16] ^= 0xFF }
            } else {  // num_partition_entries at 80
                try Self.patchHeader(path, lba: lba) { $0.replaceSubrange(80..<84, with: [0xFF, 0xFF, 0xFF, 0x7F]) }
            }
        }
        try wreck(1)
        let device = RawImage(file: try HostFile(path: path))
        let table = try #require(try PartitionTable.read(device))
        try PartitionTableTests.check(table, against: oracle, device: device, rawFile: path)
        try wreck(Self.lastLBA)
        let left = try #require(try PartitionTable.read(RawImage(file: try HostFile(path: path))))
        #expect(left.type == "PMBR")
        #expect(left.partitions == [])
    }

    /// 128 logical partitions, each EBR linking to the next: more probes than allowed is an
    /// error, never a hang; within the bound every logical partition is found.
    @Test func longEBRChain() throws {
        let scratch = try Scratch()
        _ = try Self.device(scratch, megabytes: 16)
        let path = scratch.path("disk")
        let count: UInt32 = 128
        try Self.write(Self.bootRecord(id: 2, [Self.entry(type: 0x05, start: 2048, sectors: count * 128)]), at: 0, to: path)
        for i in 0..<count {
            let next = i + 1 < count ? [Self.entry(type: 0x05, start: (i + 1) * 128, sectors: 128)] : []
            try Self.write(Self.bootRecord([Self.entry(type: 0x83, start: 8, sectors: 64)] + next), at: UInt64(2048 + i * 128), to: path)
        }
        let device = RawImage(file: try HostFile(path: path))
        let table = try #require(try PartitionTable.read(device))
        #expect(table.partitions.count == 1 + Int(count))
        #expect(table.partitions.last?.number == 4 + Int(count))
        #expect(throws: PartitionTableError.unsettled(probes: 2)) { try PartitionTable.read(device, maxProbes: 2) }
    }

    /// A copy budget too small for the extended partition: the primaries, and a warning.
    @Test func budgetReached() throws {
        let scratch = try Scratch()
        try PartitionFixture.make("mbr.img", PartitionFixture.mbrScript, in: scratch)
        let table = try #require(try PartitionTable.read(PartitionTableTests.raw(scratch.path("mbr.img")), budget: 8192))
        #expect(table.copiedBytes == 8192)
        #expect(table.warnings == ["copied the most bytes allowed (8192) from the device before the table settled: partitions may be missing"])
    }
}

@Suite("PartitionDevice")
struct PartitionTableWindowTests {
    @Test func windowShiftsPlansAndStatus() throws {
        let scratch = try Scratch()
        try scratch.sh("truncate -s 8M disk && printf 'abcd' | dd of=disk bs=1 seek=\(3 << 20) conv=notrunc status=none")
        let parent = RawImage(file: try HostFile(path: scratch.path("disk")))
        let window = try PartitionDevice(parent, start: 2 << 20, size: 4 << 20)
        #expect(window.size == 4 << 20)
        #expect(try window.read(at: 1 << 20, count: 4) == Array("abcd".utf8))
        // A read crossing the end stops at it.
        #expect(try window.read(at: (4 << 20) - 2, count: 8).count == 2)
        let plan = try window.plan(at: 1 << 20, length: 4)
        guard case .host(_, let offset, let length)? = plan.segments.first else { Issue.record("no host run"); return }
        #expect(offset == 3 << 20)
        #expect(length == 4)
        // Status starts at the window's 0; offsets stay host offsets.
        let extents = try window.status(detection: .metadataOnly)
        #expect(extents.first?.start == 0)
        #expect(extents.reduce(0) { $0 + $1.length } == 4 << 20)
        let data = try #require(extents.first { $0.data && !$0.zero })
        #expect(data.start <= 1 << 20 && data.start + data.length > 1 << 20)
        #expect(data.offset == data.start + (2 << 20))
    }

    @Test(arguments: [(UInt64(0), UInt64(9 << 20)), (UInt64(9 << 20), UInt64(0)), (UInt64.max, UInt64(2))])
    func windowOutsideIsRefused(_ start: UInt64, _ size: UInt64) throws {
        let scratch = try Scratch()
        try scratch.sh("truncate -s 8M disk")
        let parent = RawImage(file: try HostFile(path: scratch.path("disk")))
        #expect(throws: PartitionDevice.WindowError.outside(start: start, size: size, deviceSize: 8 << 20)) {
            try PartitionDevice(parent, start: start, size: size)
        }
    }
}

@Suite("Partition tables: concurrency")
struct PartitionTableConcurrencyTests {
    /// Probes are independent: eight threads read the MBR and GPT disks at once, four times each.
    @Test func concurrentReads() async throws {
        let scratch = try Scratch()
        try PartitionFixture.make("mbr.img", PartitionFixture.mbrScript, in: scratch)
        try PartitionFixture.make("gpt.img", PartitionFixture.gptScript, in: scratch)
        let mbr = try PartitionTableTests.raw(scratch.path("mbr.img"))
        let gpt = try PartitionTableTests.raw(scratch.path("gpt.img"))
        let expected = [try #require(try PartitionTable.read(mbr)), try #require(try PartitionTable.read(gpt))]
        try await withThrowingTaskGroup(of: (Int, PartitionTable?).self) { group in
            for i in 0..<32 {
                group.addTask { (i % 2, try PartitionTable.read(i % 2 == 0 ? mbr : gpt)) }
            }
            for try await (which, table) in group {
                #expect(table == expected[which])
            }
        }
    }
}
