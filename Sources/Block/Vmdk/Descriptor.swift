/// A vmdk text descriptor: a file of its own (monolithicFlat, twoGbMaxExtent*), or embedded in
/// a sparse extent at `descriptorOffset`. Lines are `key=value` pairs (`CID`, `parentCID`,
/// `createType`, `parentFileNameHint`), extent lines (`RW 2048 FLAT "disk-flat.vmdk" 0`),
/// comments (`#`) and the `ddb.*` disk database, which poolfs does not need.
public struct VmdkDescriptor: Equatable, Sendable {
    public struct Extent: Equatable, Sendable {
        /// RW, RDONLY or NOACCESS.
        public var access: String
        /// Length in 512-byte sectors.
        public var sectors: UInt64
        /// FLAT, SPARSE, ZERO, VMFS, VMFSSPARSE, SESPARSE, ...
        public var type: String
        public var fileName: String?
        /// Where a FLAT extent starts in its file, in sectors.
        public var offset: UInt64?
        /// Byte position of the line in the descriptor, for errors.
        public var position: UInt64
    }

    public var cid: UInt32?
    public var parentCID: UInt32?
    public var createType: String?
    public var parentFileNameHint: String?
    public var extents: [Extent] = []

    /// QEMU reads at most 1 MiB - 1 of a descriptor file (`vmdk_read_desc`).
    static let maximumLength = (1 << 20) - 1
    /// More extents than a 16 TiB twoGbMaxExtent disk needs; each one is an open file.
    static let maximumExtents = 8192
    /// QEMU's bound on a file name in an extent line (`%511[^\n\r\"]`).
    static let maximumNameLength = 511

    /// Parses descriptor text; `base` is the byte position of `bytes` in its file. The text ends
    /// at the first NUL (an embedded descriptor is padded with them).
    static func parse(_ bytes: [UInt8], base: UInt64 = 0) throws -> VmdkDescriptor {
        var descriptor = VmdkDescriptor()
        let text = bytes.prefix(maximumLength).prefix { $0 != 0 }
        var position = 0
        while position < text.count {
            let end = text[position...].firstIndex(of: UInt8(ascii: "\n")) ?? text.count
            var line = Array(text[position..<end])
            if line.last == UInt8(ascii: "\r") { line.removeLast() }
            try descriptor.take(String(decoding: line, as: UTF8.self), at: base + UInt64(position))
            position = end + 1
        }
        return descriptor
    }

    private mutating func take(_ rawLine: String, at position: UInt64) throws {
        let line = rawLine.drop { $0 == " " || $0 == "\t" }
        if line.isEmpty || line.hasPrefix("#") { return }
        let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
        if let first = words.first, ["RW", "RDONLY", "NOACCESS"].contains(first) {
            guard extents.count < Self.maximumExtents else {
                throw Qcow2Error.corrupt("descriptor has more than \(Self.maximumExtents) extents", offset: position)
            }
            extents.append(try Self.extent(String(line), at: position))
            return
        }
        guard let equals = line.firstIndex(of: "=") else { return }
        let key = line[..<equals].trimmingSpaces
        let value = line[line.index(after: equals)...].trimmingSpaces.unquoted
        switch key {
        case "CID": cid = try Self.hex(value, "CID", at: position)
        case "parentCID": parentCID = try Self.hex(value, "parentCID", at: position)
        case "createType": createType = String(value)
        case "parentFileNameHint":
            guard !value.isEmpty, value.utf8.count <= 4095 else {
                throw Qcow2Error.corrupt("parentFileNameHint is empty or longer than 4095 bytes", offset: position)
            }
            parentFileNameHint = String(value)
        default: break
        }
    }

    /// `ACCESS SECTORS TYPE ["FILE" [OFFSET]]`.
    static func extent(_ line: String, at position: UInt64) throws -> Extent {
        func invalid(_ why: String) -> Qcow2Error {
            .corrupt("Invalid extent line: \(line.prefix(200)) (\(why))", offset: position)
        }
        var rest = Substring(line)
        func word() -> Substring? {
            rest = rest.drop { $0 == " " || $0 == "\t" }
            guard !rest.isEmpty else { return nil }
            let end = rest.firstIndex { $0 == " " || $0 == "\t" } ?? rest.endIndex
            defer { rest = rest[end...] }
            return rest[..<end]
        }
        let access = String(word()!)
        guard let count = word(), let sectors = UInt64(count) else { throw invalid("no sector count") }
        guard let type = word() else { throw invalid("no extent type") }
        var extent = Extent(access: access, sectors: sectors, type: String(type), position: position)
        rest = rest.drop { $0 == " " || $0 == "\t" }
        if rest.hasPrefix("\"") {
            let body = rest.dropFirst()
            guard let close = body.firstIndex(of: "\"") else { throw invalid("file name without its closing quote") }
            let name = body[..<close]
            guard !name.isEmpty, name.utf8.count <= maximumNameLength else { throw invalid("empty or over-long file name") }
            extent.fileName = String(name)
            rest = body[body.index(after: close)...]
            if let offset = word() {
                guard let value = UInt64(offset) else { throw invalid("offset is not a number") }
                extent.offset = value
            }
        }
        if word() != nil { throw invalid("unexpected text at the end") }
        return extent
    }

    /// A CID: up to 8 hex digits, as QEMU writes it (`%x`).
    static func hex(_ value: Substring, _ field: String, at position: UInt64) throws -> UInt32 {
        let digits = value.hasPrefix("0x") || value.hasPrefix("0X") ? value.dropFirst(2) : value
        guard !digits.isEmpty, digits.count <= 8, let parsed = UInt32(digits, radix: 16) else {
            throw Qcow2Error.corrupt("\(field) '\(value.prefix(40))' is not a 32-bit hexadecimal number", offset: position)
        }
        return parsed
    }
}

fileprivate extension Substring {
    var trimmingSpaces: Substring {
        var s = self
        while let f = s.first, f == " " || f == "\t" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" { s = s.dropLast() }
        return s
    }

    /// The value without one pair of surrounding double quotes.
    var unquoted: Substring {
        count >= 2 && hasPrefix("\"") && hasSuffix("\"") ? dropFirst().dropLast() : self
    }
}

extension VmdkDescriptor {
    /// The extent files a vmdk text descriptor names that lie beside it (plain names, no
    /// directory): a dir pool does not list them as volumes of their own. nil when `bytes` is
    /// not a descriptor (FormatMagic's rule) or does not parse.
    public static func extentFileNames(ofDescriptor bytes: [UInt8]) -> [String]? {
        guard FormatMagic.isVmdkDescriptor(Array(bytes.prefix(FormatMagic.probeLength))),
              let descriptor = try? parse(bytes) else { return nil }
        return descriptor.extents.compactMap(\.fileName).filter { !$0.contains("/") }
    }
}
