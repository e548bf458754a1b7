import Foundation
import TestSupport
import Block
import Testing

/// The oracle every format reader is checked against: qemu-img, byte for byte, and its
/// allocation map where QEMU reports one.
enum FormatOracle {
    static let chunkSizes = [65536 * 3 + 123, 4096, 1 << 20]

    /// Opens `name` (probed, as a dir pool does on first sight) and checks that it is `format`,
    /// that its size and bytes are what `qemu-img convert -O raw` makes of it, and, unless
    /// `checkMap` is false, that its allocation matches `qemu-img map --output=json`.
    @discardableResult
    static func expectMatchesQemu(_ name: String, format: Image.Format, in scratch: Scratch, checkMap: Bool = true,
                                  sourceLocation: SourceLocation = #_sourceLocation) throws -> Image {
        let image = try Image.open(path: scratch.path(name), cache: BlockCache(capacityBytes: 4 << 20))
        #expect(image.format == format, "\(name): probed as \(image.format)", sourceLocation: sourceLocation)
        try scratch.sh("qemu-img convert -O raw '\(name)' '\(name).expected'")
        try expectSame(image.live, as: scratch.path("\(name).expected"), name, sourceLocation: sourceLocation)
        if checkMap { try expectSameMap(image.live, as: name, in: scratch, name, sourceLocation: sourceLocation) }
        return image
    }

    /// Reads the whole device in odd-sized chunks and compares with the file `rawPath`.
    static func expectSame(_ device: any BlockDevice, as rawPath: String, _ what: String,
                           sourceLocation: SourceLocation = #_sourceLocation) throws {
        let expected = [UInt8](try Data(contentsOf: URL(fileURLWithPath: rawPath)))
        #expect(device.size == UInt64(expected.count), "\(what): size \(device.size), qemu-img \(expected.count)",
                sourceLocation: sourceLocation)
        guard device.size == UInt64(expected.count) else { return }
        for chunk in chunkSizes {
            var offset: UInt64 = 0
            var mismatch: UInt64?
            while offset < device.size, mismatch == nil {
                let got = try device.read(at: offset, count: chunk)
                let end = Int(offset) + got.count
                if got[...] != expected[Int(offset)..<end] {
                    let i = zip(got, expected[Int(offset)..<end]).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? 0
                    mismatch = offset + UInt64(i)
                }
                offset += UInt64(max(got.count, 1))
            }
            #expect(mismatch == nil, "\(what): first differing byte at \(mismatch ?? 0) (chunk \(chunk))",
                    sourceLocation: sourceLocation)
        }
    }

    /// `qemu-img map --output=json`, as data and zero ranges (host offsets are not compared:
    /// they are each format's own business).
    static func qemuMap(_ image: String, in scratch: Scratch) throws -> [MapExtent] {
        let json = try scratch.sh("qemu-img map --output=json '\(image)'")
        let rows = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [[String: Any]]
        return normalize(rows.map { row in
            MapExtent(start: (row["start"] as! NSNumber).uint64Value, length: (row["length"] as! NSNumber).uint64Value,
                      depth: (row["depth"] as! NSNumber).intValue, present: row["present"] as! Bool,
                      zero: row["zero"] as! Bool, data: row["data"] as! Bool)
        })
    }

    static func normalize(_ extents: [MapExtent]) -> [MapExtent] {
        var out: [MapExtent] = []
        for var e in extents {
            e.offset = nil
            out.appendMerging(e)
        }
        return out
    }

    static func expectSameMap(_ device: any BlockDevice, as image: String, in scratch: Scratch, _ what: String,
                              sourceLocation: SourceLocation = #_sourceLocation) throws {
        let ours = normalize(try device.status())
        let theirs = try qemuMap(image, in: scratch)
        #expect(ours == theirs, "\(what): allocation map differs\nours:   \(ours)\nqemu's: \(theirs)",
                sourceLocation: sourceLocation)
    }

    /// Whether opening `name` fails, and with what message.
    static func openError(_ name: String, in scratch: Scratch, format: Image.Format? = nil) -> String? {
        do {
            _ = try Image.open(path: scratch.path(name), format: format, cache: BlockCache(capacityBytes: 1 << 20))
            return nil
        } catch {
            return "\(error)"
        }
    }
}

@Suite("format oracle") struct FormatOracleTests {
    /// The oracle itself: a raw file is its own conversion, and a wrong byte is seen.
    @Test func theOracleSeesAWrongByte() throws {
        let scratch = try Scratch()
        try scratch.sh("head -c 204800 /dev/urandom > disk.raw")
        try FormatOracle.expectMatchesQemu("disk.raw", format: .raw, in: scratch)
        let image = try Image.open(path: scratch.path("disk.raw"), cache: BlockCache(capacityBytes: 0))
        try scratch.sh("cp disk.raw other.raw && printf x | dd of=other.raw bs=1 seek=123457 conv=notrunc status=none")
        let other = try Image.open(path: scratch.path("other.raw"), cache: BlockCache(capacityBytes: 0))
        #expect(try image.live.read(at: 123457, count: 1) != other.live.read(at: 123457, count: 1))
    }
}
