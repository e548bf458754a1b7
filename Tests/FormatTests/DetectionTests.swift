import Foundation
import TestSupport
@testable import Block
import Testing

/// Format detection (FormatMagic, Image.probe) against QEMU 7.2's probe: every format qemu-img
/// creates is named; the formats qemu-img cannot create (dmg, cloop, bochs) from hand-written
/// headers; magics at the wrong place stay raw; ambiguous files go where QEMU sends them; and a
/// format without a reader is refused at open with its reason, never served raw.
@Suite("format detection")
struct DetectionTests {
    /// The format qemu-img probes for `name` (`qemu-img info` without -f), or nil when it cannot
    /// open the file (hand-written headers); then `qemuError` says why.
    static func qemuProbe(_ name: String, in scratch: Scratch) -> String? {
        let info = scratch.attempt("qemu-img info --output=json '\(name)' 2>/dev/null")
        guard info.ok, let json = try? JSONSerialization.jsonObject(with: Data(info.output.utf8)) as? [String: Any] else { return nil }
        return json["format"] as? String
    }

    static func qemuError(_ name: String, in scratch: Scratch) -> String {
        scratch.attempt("qemu-img info '\(name)' 2>&1 | grep -v 'module'").output
    }

    static func probe(_ name: String, in scratch: Scratch) throws -> Image.Format {
        try Image.probe(HostFile(path: scratch.path(name)))
    }

    /// Opening a probed `name`: the image in `format`, or a refusal that names `format`.
    static func expectOpensAsOrRefuses(_ name: String, _ format: Image.Format, in scratch: Scratch,
                                       sourceLocation: SourceLocation = #_sourceLocation) {
        do {
            let image = try Image.open(path: scratch.path(name), cache: BlockCache(capacityBytes: 1 << 20))
            #expect(image.format == format, "\(name) opened as \(image.format)", sourceLocation: sourceLocation)
            #expect(format == .raw || format == .qcow2 || Image.readers[format] != nil,
                    "\(name): \(format) has no reader but opened", sourceLocation: sourceLocation)
        } catch let error as Qcow2Error {
            #expect(error.recognisedFormat == format.rawValue || (format == .qcow2 && error.recognisedFormat == nil),
                    "\(name): \(error)", sourceLocation: sourceLocation)
            if Image.readers[format] == nil && format != .qcow2 {
                #expect("\(error)".contains(format.unsupportedReason), "\(name): \(error)", sourceLocation: sourceLocation)
            }
        } catch {
            Issue.record("\(name): \(error)", sourceLocation: sourceLocation)
        }
    }

    // MARK: Every format qemu-img creates

    static let created: [(file: String, command: String, format: Image.Format)] = [
        ("a.qcow", "qemu-img create -q -f qcow a.qcow 3M", .qcow),
        ("a010.qcow2", "qemu-img create -q -f qcow2 -o compat=0.10 a010.qcow2 3M", .qcow2),
        ("a11.qcow2", "qemu-img create -q -f qcow2 a11.qcow2 3M", .qcow2),
        ("a.qed", "qemu-img create -q -f qed a.qed 3M", .qed),
        ("sparse.vmdk", "qemu-img create -q -f vmdk -o subformat=monolithicSparse sparse.vmdk 3M", .vmdk),
        ("flat.vmdk", "qemu-img create -q -f vmdk -o subformat=monolithicFlat flat.vmdk 3M", .vmdk),
        ("two.vmdk", "qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentSparse two.vmdk 3M", .vmdk),
        ("twoflat.vmdk", "qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentFlat twoflat.vmdk 3M", .vmdk),
        ("stream.vmdk", "qemu-img create -q -f vmdk -o subformat=streamOptimized stream.vmdk 3M", .vmdk),
        ("v4.vmdk", "qemu-img create -q -f vmdk -o compat6=on v4.vmdk 3M", .vmdk),
        ("a.vdi", "qemu-img create -q -f vdi a.vdi 3M", .vdi),
        ("static.vdi", "qemu-img create -q -f vdi -o static=on static.vdi 3M", .vdi),
        ("dyn.vhd", "qemu-img create -q -f vpc dyn.vhd 3M", .vpc),
        ("a.vhdx", "qemu-img create -q -f vhdx a.vhdx 3M", .vhdx),
        ("fixed.vhdx", "qemu-img create -q -f vhdx -o subformat=fixed fixed.vhdx 3M", .vhdx),
        ("a.hdd", "qemu-img create -q -f parallels a.hdd 3M", .parallels),
        ("a.luks", LuksImages.raw("a.luks", bytes: 3 << 20), .luks),
        ("a.raw", "qemu-img create -q -f raw a.raw 3M", .raw),
    ]

    @Test(arguments: created.indices)
    func everyFormatQemuImgCreatesIsNamedAsQemuProbesIt(_ i: Int) throws {
        let c = Self.created[i]
        let scratch = try Scratch()
        try scratch.sh(c.command)
        #expect(try Self.probe(c.file, in: scratch) == c.format, "\(c.file)")
        if !FileManager.default.fileExists(atPath: scratch.path(c.file + ".stand-in")) {
            #expect(Self.qemuProbe(c.file, in: scratch) == c.format.rawValue, "\(c.file): qemu-img probes otherwise")
        }
        Self.expectOpensAsOrRefuses(c.file, c.format, in: scratch)
    }

    /// A fixed VHD has its footer only in its last 512 bytes. QEMU 7.2 probes it as raw (and
    /// would serve the footer as the disk's last sector); poolfs recognises the footer (with a
    /// correct checksum and disk type 2) and names it vpc, so it is never served raw.
    @Test func fixedVhdIsNamedByItsFooter() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f vpc -o subformat=fixed fixed.vhd 3M")
        #expect(Self.qemuProbe("fixed.vhd", in: scratch) == "raw")
        #expect(try Self.probe("fixed.vhd", in: scratch) == .vpc)
        Self.expectOpensAsOrRefuses("fixed.vhd", .vpc, in: scratch)
        // A footer with a wrong checksum, or of a dynamic disk, is not a fixed VHD's.
        let size = try scratch.bytes("fixed.vhd").count
        try scratch.sh("cp fixed.vhd bad.vhd && printf 'x' | dd of=bad.vhd bs=1 seek=\(size - 512 + 40) conv=notrunc status=none")
        #expect(try Self.probe("bad.vhd", in: scratch) == .raw)
        try scratch.sh("cp fixed.vhd unaligned.vhd && truncate -s +1 unaligned.vhd")
        #expect(try Self.probe("unaligned.vhd", in: scratch) == .raw)
    }

    // MARK: Hand-written headers

    /// Writes `bytes` at `offset` of `file` (made `size` bytes long first).
    static func make(_ file: String, size: Int = 4096, _ edits: [(Int, [UInt8])], in scratch: Scratch) throws {
        var bytes = [UInt8](repeating: 0, count: size)
        for (offset, data) in edits { bytes.replaceSubrange(offset..<offset + data.count, with: data) }
        try scratch.write(file, bytes)
    }

    static func ascii(_ s: String) -> [UInt8] { Array(s.utf8) }
    static func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
    static func be32(_ v: UInt32) -> [UInt8] { le32(v).reversed() }
    static let cloopHeader = ascii("#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
    static let bochsHeader: [(Int, [UInt8])] = [(0, ascii("Bochs Virtual HD Image")), (32, ascii("Redolog")),
                                                (48, ascii("Growing")), (64, le32(0x2_0000))]

    /// The hand-made files, what poolfs names them, and a fragment of qemu-img's error when it
    /// probes the same driver (nil: QEMU probes raw, or does not know the format).
    static let handMade: [(file: String, edits: [(Int, [UInt8])], format: Image.Format, qemuSays: String?)] = [
        ("image.dmg", [(0, ascii("not a real dmg"))], .dmg, "UDIF trailer"),
        ("koly.img", [(4096 - 512, ascii("koly") + be32(4) + be32(512))], .dmg, nil),
        ("a.cloop", [(0, cloopHeader)], .cloop, "block_size cannot be zero"),
        ("a.bochs", bochsHeader, .bochs, "Extent size must be at least 512"),
        ("v1.bochs", bochsHeader.dropLast() + [(64, le32(0x1_0000))], .bochs, "Extent size must be at least 512"),
        ("p1.hdd", [(0, ascii("WithoutFreeSpace") + le32(2))], .parallels, "sectors per track"),
        ("p2.hdd", [(0, ascii("WithouFreSpacExt") + le32(2))], .parallels, "sectors per track"),
        ("luks1", [(0, [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe, 0, 1])], .luks, "LUKS"),
        ("luks2", [(0, [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe, 0, 2])], .luks, nil),
        ("uml.cow", [(0, ascii("OOOM") + be32(2))], .cow, nil),
        // QEMU probes the first 2048 bytes zero-padded: a file of the magic alone is enough.
        ("short.qcow2", [(0, [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3])], .qcow2, "cluster size"),
        ("v4.qcow2", [(0, [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 4])], .qcow2, "Unsupported qcow2 version 4"),
        ("vdi", [(0x40, le32(0xbeda_107f))], .vdi, "unsupported VDI image"),
        ("desc.vmdk", [(0, ascii("# Disk DescriptorFile\n   \nversion=1\n"))], .vmdk, "VMDK"),
        ("crlf.vmdk", [(0, ascii("version=3\r\n"))], .vmdk, "VMDK"),
        ("KDMV", [(0, ascii("KDMV"))], .vmdk, nil),
        ("COWD", [(0, ascii("COWD"))], .vmdk, nil),
    ]

    @Test(arguments: handMade.indices)
    func handWrittenHeadersAreNamed(_ i: Int) throws {
        let c = Self.handMade[i]
        let scratch = try Scratch()
        try Self.make(c.file, c.edits, in: scratch)
        #expect(try Self.probe(c.file, in: scratch) == c.format, "\(c.file)")
        if let says = c.qemuSays {
            let error = Self.qemuError(c.file, in: scratch)
            #expect(error.contains(says), "\(c.file): qemu-img says \(error)")
        }
        Self.expectOpensAsOrRefuses(c.file, c.format, in: scratch)
    }

    /// The short files QEMU probes zero-padded: the same bytes in a 100-byte file.
    @Test func shortFilesAreProbedZeroPadded() throws {
        let scratch = try Scratch()
        try Self.make("short.vdi", size: 100, [(0x40, Self.le32(0xbeda_107f))], in: scratch)
        #expect(try Self.probe("short.vdi", in: scratch) == .vdi)
        #expect(Self.qemuError("short.vdi", in: scratch).contains("VDI"))
        try scratch.write("magic.qcow2", [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3])
        #expect(try Self.probe("magic.qcow2", in: scratch) == .qcow2)
    }

    // MARK: Raw files with a magic in the wrong place

    static let raws: [(file: String, size: Int, edits: [(Int, [UInt8])])] = [
        ("qcow2-at-1", 4096, [(1, [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3])]),
        ("qcow-version-0", 4096, [(0, [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 0])]),
        ("conectix-at-512", 4096, [(512, ascii("conectix"))]),
        ("vhdx-at-8", 4096, [(8, ascii("vhdxfile"))]),
        ("kdmv-at-4", 4096, [(4, ascii("KDMV"))]),
        ("vdi-at-0x41", 4096, [(0x41, le32(0xbeda_107f))]),
        ("luks-version-3", 4096, [(0, [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe, 0, 3])]),
        ("luks-at-16", 4096, [(16, [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe, 0, 1])]),
        ("parallels-version-3", 4096, [(0, ascii("WithouFreSpacExt") + le32(3))]),
        ("bochs-wrong-type", 4096, [(0, ascii("Bochs Virtual HD Image")), (32, ascii("Redolog")),
                                    (48, ascii("Undoable")), (64, le32(0x2_0000))]),
        ("bochs-wrong-version", 4096, [(0, ascii("Bochs Virtual HD Image")), (32, ascii("Redolog")),
                                       (48, ascii("Growing")), (64, le32(0x3_0000))]),
        ("cloop-cut-short", 4096, [(0, ascii("#!/bin/sh\n#V2.0 Format\n"))]),
        ("vmdk-empty-line-first", 4096, [(0, ascii("\nversion=1\n"))]),
        ("vmdk-tab", 4096, [(0, ascii("# x\n\tversion=1\n"))]),
        ("vmdk-no-newline", 9, [(0, ascii("version=1"))]),
        ("vmdk-version-4", 4096, [(0, ascii("version=4\n"))]),
        ("qed-at-2048", 4096, [(2048, ascii("QED") + [0])]),
        ("koly-version-3", 4096, [(4096 - 512, ascii("koly") + be32(3) + be32(512))]),
        ("cow-version-1", 4096, [(0, ascii("OOOM") + be32(1))]),
    ]

    @Test(arguments: raws.indices)
    func magicAtTheWrongPlaceStaysRaw(_ i: Int) throws {
        let c = Self.raws[i]
        let scratch = try Scratch()
        try Self.make(c.file, size: c.size, c.edits, in: scratch)
        #expect(try Self.probe(c.file, in: scratch) == .raw, "\(c.file)")
        #expect(Self.qemuProbe(c.file, in: scratch) == "raw", "\(c.file): qemu-img does not probe raw")
    }

    @Test func emptyFilesAreRaw() throws {
        let scratch = try Scratch()
        try scratch.write("empty.dmg", [])
        #expect(try Self.probe("empty.dmg", in: scratch) == .raw)
        #expect(Self.qemuProbe("empty.dmg", in: scratch) == "raw")
    }

    // MARK: QEMU's priority among ambiguous files

    /// A VDI signature at 0x40 beside a magic at byte 0: qed and parallels win, vdi wins over
    /// the rest; a dmg name wins over cloop content; any magic wins over a dmg name.
    static let ambiguous: [(file: String, edits: [(Int, [UInt8])], format: Image.Format, qemuSays: String)] = [
        ("qed+vdi", [(0, ascii("QED") + [0]), (0x40, le32(0xbeda_107f))], .qed, "QED"),
        ("parallels+vdi", [(0, ascii("WithoutFreeSpace") + le32(2)), (0x40, le32(0xbeda_107f))], .parallels, "sectors per track"),
        ("qcow2+vdi", [(0, [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]), (0x40, le32(0xbeda_107f))], .vdi, "VDI"),
        ("qcow+vdi", [(0, [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 1]), (0x40, le32(0xbeda_107f))], .vdi, "VDI"),
        ("kdmv+vdi", [(0, ascii("KDMV")), (0x40, le32(0xbeda_107f))], .vdi, "VDI"),
        ("conectix+vdi", [(0, ascii("conectix")), (0x40, le32(0xbeda_107f))], .vdi, "VDI"),
        ("vhdx+vdi", [(0, ascii("vhdxfile")), (0x40, le32(0xbeda_107f))], .vdi, "VDI"),
        ("luks+vdi", [(0, [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe, 0, 1]), (0x40, le32(0xbeda_107f))], .vdi, "VDI"),
        ("desc+vdi", [(0, ascii("version=1\n")), (0x40, le32(0xbeda_107f))], .vdi, "VDI"),
        ("cloop.dmg", [(0, cloopHeader)], .dmg, "UDIF trailer"),
        ("cloop+vdi", [(0, cloopHeader), (0x40, le32(0xbeda_107f))], .vdi, "VDI"),
        ("qcow2.dmg", [(0, [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 4])], .qcow2, "qcow2 version 4"),
        ("conectix-and-koly", [(0, ascii("conectix")), (4096 - 512, ascii("koly") + be32(4) + be32(512))], .vpc, "header checksum"),
    ]

    @Test(arguments: ambiguous.indices)
    func ambiguousFilesFollowQemusOrder(_ i: Int) throws {
        let c = Self.ambiguous[i]
        let scratch = try Scratch()
        try Self.make(c.file, c.edits, in: scratch)
        #expect(try Self.probe(c.file, in: scratch) == c.format, "\(c.file)")
        let error = Self.qemuError(c.file, in: scratch)
        #expect(error.contains(c.qemuSays), "\(c.file): qemu-img says \(error)")
    }

    // MARK: The first-sector guard sees what the probe sees

    @Test func guardUsesTheWholeProbeBuffer() {
        var sector = [UInt8](repeating: 0, count: 100)
        sector.replaceSubrange(0x40..<0x44, with: Self.le32(0xbeda_107f))
        #expect(FormatMagic.formatName(ofFirstBytes: sector) == "vdi")
        #expect(FormatMagic.formatName(ofFirstBytes: Self.cloopHeader) == "cloop")
        #expect(FormatMagic.formatName(ofFirstBytes: Self.ascii("hello")) == nil)
        #expect(FormatMagic.probeLength == 2048)
    }
}
