/// The image formats QEMU and libvirt recognise by their content, and their magic numbers. Used
/// to probe a volume's format, and to refuse a write that would make a raw volume's first
/// sector look like another format (docs/security.md).
public enum FormatMagic {
    /// A format poolfs recognises in a file's first sector, by QEMU's name for it.
    public static func formatName(ofFirstBytes bytes: [UInt8]) -> String? {
        func starts(_ text: String, at offset: Int = 0) -> Bool {
            let magic = Array(text.utf8)
            return bytes.count >= offset + magic.count && bytes[offset..<offset + magic.count].elementsEqual(magic)
        }
        func startsBytes(_ magic: [UInt8], at offset: Int = 0) -> Bool {
            bytes.count >= offset + magic.count && bytes[offset..<offset + magic.count].elementsEqual(magic)
        }
        if startsBytes([0x51, 0x46, 0x49, 0xfb]) {
            // QEMU's "qcow" is version 1; versions 2 and 3 are qcow2.
            return bytes.count >= 8 && BigEndianReader(bytes: bytes).u32(4) == 1 ? "qcow" : "qcow2"
        }
        if startsBytes([0x51, 0x45, 0x44, 0x00]) { return "qed" }
        if starts("KDMV") || starts("COWD") || isVmdkDescriptor(bytes) { return "vmdk" }
        if bytes.count >= 0x44, bytes[0x40] == 0x7f, bytes[0x41] == 0x10, bytes[0x42] == 0xda, bytes[0x43] == 0xbe { return "vdi" }
        if starts("vhdxfile") { return "vhdx" }
        if starts("conectix") { return "vpc" }
        if startsBytes([0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe]) { return "luks" }
        if starts("WithoutFreeSpace") || starts("WithouFreSpacExt") { return "parallels" }
        if starts("Bochs Virtual HD Image") { return "bochs" }
        if starts("#!/bin/sh\n#V2.0 Format\n") { return "cloop" }
        return nil
    }

    /// QEMU's rule for a vmdk descriptor file: lines that are comments (`#`) or blank, then
    /// `version=1`, `2` or `3` on a line of its own.
    static func isVmdkDescriptor(_ bytes: [UInt8]) -> Bool {
        let text = String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
        for line in text.split(separator: "\n", omittingEmptySubsequences: false) {
            let trimmed = line.drop { $0 == " " || $0 == "\t" }
            if trimmed.isEmpty || trimmed.hasPrefix("#") || trimmed == "\r" { continue }
            let value = trimmed.hasSuffix("\r") ? trimmed.dropLast() : trimmed
            return value == "version=1" || value == "version=2" || value == "version=3"
        }
        return false
    }

    /// A format recognised by a trailer in the file's last 512 bytes: a fixed VHD's footer, a
    /// dmg's "koly" block.
    public static func formatName(ofLastSector bytes: [UInt8]) -> String? {
        guard bytes.count == 512 else { return nil }
        if bytes.starts(with: Array("conectix".utf8)) { return "vpc" }
        if bytes.starts(with: Array("koly".utf8)) { return "dmg" }
        return nil
    }

    /// How many leading bytes `formatName(ofFirstBytes:)` looks at.
    public static let probeLength = 512
}
