import Foundation
import TestSupport
import Block
import Testing

/// Comparisons against qemu-img, the reference implementation.
enum Oracle {
    static let chunkSizes = [65536 * 3 + 123, 4096, 1 << 20]

    /// Reads the whole device in odd-sized chunks and compares with `raw`, byte for byte.
    static func expectSame(_ device: any BlockDevice, as rawPath: String, _ what: String) throws {
        let expected = [UInt8](try Data(contentsOf: URL(fileURLWithPath: rawPath)))
        #expect(device.size == UInt64(expected.count), "\(what): size")
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
                offset += UInt64(got.count)
            }
            #expect(mismatch == nil, "\(what): first differing byte at \(mismatch ?? 0) (chunk \(chunk))")
        }
    }

    /// `qemu-img map --output=json`, normalized.
    static func qemuMap(_ image: String, in scratch: Scratch) throws -> [MapExtent] {
        let json = try scratch.sh("qemu-img map --output=json \(image)")
        let rows = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [[String: Any]]
        let extents = rows.map { row in
            MapExtent(start: (row["start"] as! NSNumber).uint64Value, length: (row["length"] as! NSNumber).uint64Value,
                      depth: (row["depth"] as! NSNumber).intValue, present: row["present"] as! Bool,
                      zero: row["zero"] as! Bool, data: row["data"] as! Bool,
                      offset: (row["offset"] as? NSNumber)?.uint64Value)
        }
        return normalize(extents)
    }

    /// Offsets of ranges without data are QEMU internals; keep them only where data lives.
    static func normalize(_ extents: [MapExtent]) -> [MapExtent] {
        var out: [MapExtent] = []
        for var e in extents {
            if !e.data { e.offset = nil }
            if var last = out.last, last.start + last.length == e.start, last.depth == e.depth,
               last.present == e.present, last.zero == e.zero, last.data == e.data,
               (last.offset == nil && e.offset == nil) || (last.offset.map { $0 + last.length } == e.offset) {
                last.length += e.length
                out[out.count - 1] = last
            } else {
                out.append(e)
            }
        }
        return out
    }

    static func expectSameMap(_ device: any BlockDevice, as image: String, in scratch: Scratch, _ what: String) throws {
        let ours = normalize(try device.status())
        let theirs = try qemuMap(image, in: scratch)
        #expect(ours == theirs, "\(what): allocation map differs\nours:   \(ours)\nqemu's: \(theirs)")
    }

    /// Checks the live state and every snapshot of `image` against qemu-img.
    static func expectMatchesQemu(_ imageName: String, in scratch: Scratch, cacheBytes: Int = 4 << 20) throws {
        let cache = BlockCache(capacityBytes: cacheBytes)
        let image = try Image.open(path: scratch.path(imageName), cache: cache)
        try scratch.sh("qemu-img convert -O raw \(imageName) live.expected")
        try expectSame(image.live, as: scratch.path("live.expected"), "\(imageName) live")
        try expectSameMap(image.live, as: imageName, in: scratch, "\(imageName) live")
        for snapshot in image.snapshots {
            let copy = "revert-\(snapshot.id).qcow2"
            try scratch.sh("cp \(imageName) \(copy) && qemu-img snapshot -a \(snapshot.id) \(copy) && qemu-img convert -O raw \(copy) snap.expected")
            let device = try #require(image.device(of: snapshot))
            try expectSame(device, as: scratch.path("snap.expected"), "\(imageName) snapshot \(snapshot.id) '\(snapshot.name)'")
            try expectSameMap(device, as: copy, in: scratch, "\(imageName) snapshot \(snapshot.id)")
        }
    }
}
