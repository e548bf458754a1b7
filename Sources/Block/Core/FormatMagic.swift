/// The image formats QEMU and libvirt recognise by their content, and their magic numbers. Used
/// to probe a volume's format, and to refuse a write that would make a raw volume's first
/// sectors look like another format (docs/security.md).
///
/// QEMU 7.2's rule (block.c, find_image_format): an empty file is raw; otherwise every driver
/// scores the first 2048 bytes, zero-padded past the end of the file, and the highest score
/// wins, the first driver in QEMU's list among equals. A magic scores 100; dmg (by file name)
/// and cloop score 2; raw 1. The only magics that can meet in one file are the VDI signature at
/// byte 0x40 and a magic at byte 0: QEMU lists qed and parallels before vdi, and vdi before the
/// others (checked against qemu-img in DetectionTests). Beyond QEMU, poolfs also recognises
/// what libvirt does (UML cow), LUKS2 (QEMU 7.2 probes only LUKS1), and two trailers in the last
/// 512 bytes: a fixed VHD's footer and a dmg's "koly" block, so that neither is served as raw
/// container bytes (docs/formats/detection.md).
public enum FormatMagic {
    /// How many leading bytes QEMU probes (BLOCK_PROBE_BUF_SIZE).
    public static let probeLength = 2048

    /// The format recognised in a file's first bytes (and its name, for dmg), by QEMU's name;
    /// nil: raw. `bytes` may be shorter than `probeLength`: the rest reads as zeros, as in QEMU.
    public static func formatName(ofFirstBytes bytes: [UInt8], fileName: String? = nil) -> String? {
        let buf = bytes.count >= probeLength ? Array(bytes.prefix(probeLength))
            : bytes + [UInt8](repeating: 0, count: probeLength - bytes.count)
        for probe in strongProbes where probe.matches(buf) { return probe.name }
        if let fileName, isDmgName(fileName) { return "dmg" }
        if isCloop(buf) { return "cloop" }
        return nil
    }

    /// A probe that scores 100, in QEMU's order where order matters.
    struct Probe: Sendable {
        var name: String
        var matches: @Sendable ([UInt8]) -> Bool
    }

    static let strongProbes: [Probe] = [
        Probe(name: "qed") { le32($0, 0) == 0x0044_4551 },  // "QED\0"
        Probe(name: "parallels") { buf in
            (starts(buf, "WithoutFreeSpace") || starts(buf, "WithouFreSpacExt")) && le32(buf, 16) == 2
        },
        Probe(name: "vdi") { le32($0, 0x40) == 0xbeda_107f },
        Probe(name: "qcow") { be32($0, 0) == 0x5146_49fb && be32($0, 4) == 1 },
        Probe(name: "qcow2") { be32($0, 0) == 0x5146_49fb && be32($0, 4) >= 2 },
        Probe(name: "vmdk") { starts($0, "KDMV") || starts($0, "COWD") || isVmdkDescriptor($0) },
        Probe(name: "vpc") { starts($0, "conectix") },
        Probe(name: "vhdx") { starts($0, "vhdxfile") },
        // LUKS1 is QEMU's; LUKS2 (version 2) QEMU 7.2 probes as raw, which would serve the
        // encrypted container as a disk.
        Probe(name: "luks") { starts($0, "LUKS\u{ba}\u{be}", latin1: true) && (be16($0, 6) == 1 || be16($0, 6) == 2) },
        Probe(name: "bochs") { buf in
            cString(buf, 0, 32) == "Bochs Virtual HD Image" && cString(buf, 32, 16) == "Redolog"
                && cString(buf, 48, 16) == "Growing" && (le32(buf, 64) == 0x2_0000 || le32(buf, 64) == 0x1_0000)
        },
        // libvirt's: User-Mode Linux copy-on-write ("OOOM", version 2), which QEMU no longer reads.
        Probe(name: "cow") { starts($0, "OOOM") && be32($0, 4) == 2 },
    ]

    /// QEMU's vmdk probe for a descriptor file: lines of `#` comments or of spaces only (then
    /// `\r`), then `version=1`, `2` or `3` ended by `\n` or `\r\n`. An empty line, a tab or
    /// anything else first is not a descriptor (as in QEMU).
    static func isVmdkDescriptor(_ buf: [UInt8]) -> Bool {
        let end = buf.count
        var p = 0
        while p < end {
            if buf[p] == UInt8(ascii: "#") {
                while p < end && buf[p] != UInt8(ascii: "\n") { p += 1 }
                p += 1
                continue
            }
            if buf[p] == UInt8(ascii: " ") {
                while p < end && buf[p] == UInt8(ascii: " ") { p += 1 }
                if p < end && buf[p] == UInt8(ascii: "\r") { p += 1 }
                guard p < end, buf[p] == UInt8(ascii: "\n") else { return false }
                p += 1
                continue
            }
            for version in ["1", "2", "3"] {
                if starts(buf, "version=\(version)\n", at: p) || starts(buf, "version=\(version)\r\n", at: p) { return true }
            }
            return false
        }
        return false
    }

    /// QEMU's dmg probe: by name alone (score 2, ahead of cloop).
    static func isDmgName(_ path: String) -> Bool {
        let name = Array(path.utf8)
        return name.count > 4 && name.suffix(4).elementsEqual(".dmg".utf8)
    }

    /// QEMU's cloop probe: the whole version 2.0 script header (score 2).
    static func isCloop(_ buf: [UInt8]) -> Bool {
        starts(buf, "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
    }

    /// A format recognised by a trailer in the file's last 512 bytes, when nothing at the start
    /// is: a fixed VHD's footer ("conectix", a correct checksum, disk type 2: QEMU opens such a
    /// file as vpc when told, but probes it as raw) or a dmg's UDIF "koly" block (signature,
    /// version 4, header size 512).
    public static func formatName(ofLastSector bytes: [UInt8], fileSize: UInt64) -> String? {
        guard bytes.count == 512 else { return nil }
        if fileSize % 512 == 0, starts(bytes, "conectix"), be32(bytes, 60) == 2, vhdChecksumMatches(bytes) { return "vpc" }
        if starts(bytes, "koly"), be32(bytes, 4) == 4, be32(bytes, 8) == 512 { return "dmg" }
        return nil
    }

    /// The VHD footer checksum (byte 64): the one's complement of the sum of the other bytes.
    static func vhdChecksumMatches(_ footer: [UInt8]) -> Bool {
        var sum: UInt32 = 0
        for (i, byte) in footer.enumerated() where !(64..<68).contains(i) { sum &+= UInt32(byte) }
        return ~sum == be32(footer, 64)
    }

    // MARK: Byte helpers (the probe buffer is always `probeLength` long)

    static func starts(_ buf: [UInt8], _ text: String, at offset: Int = 0, latin1: Bool = false) -> Bool {
        let magic = latin1 ? text.unicodeScalars.map { UInt8(truncatingIfNeeded: $0.value) } : Array(text.utf8)
        return buf.count >= offset + magic.count && buf[offset..<offset + magic.count].elementsEqual(magic)
    }

    static func le32(_ b: [UInt8], _ at: Int) -> UInt32 {
        UInt32(b[at]) | UInt32(b[at + 1]) << 8 | UInt32(b[at + 2]) << 16 | UInt32(b[at + 3]) << 24
    }

    static func be32(_ b: [UInt8], _ at: Int) -> UInt32 {
        UInt32(b[at]) << 24 | UInt32(b[at + 1]) << 16 | UInt32(b[at + 2]) << 8 | UInt32(b[at + 3])
    }

    static func be16(_ b: [UInt8], _ at: Int) -> UInt16 { UInt16(b[at]) << 8 | UInt16(b[at + 1]) }

    /// The NUL-terminated string in a fixed field, as C's strcmp sees it (nil: no NUL in it).
    static func cString(_ b: [UInt8], _ at: Int, _ length: Int) -> String? {
        guard let end = b[at..<at + length].firstIndex(of: 0) else { return nil }
        return String(decoding: b[at..<end], as: UTF8.self)
    }
}
