/// A hand-built qcow2 image, small enough to reason about byte by byte. Every field is explicit
/// so that a malformed-image test changes exactly one of them.
///
/// Layout (cluster n starts at n × clusterSize):
///   0 header and extensions   1 refcount table   2 refcount block (16-bit)
///   3 L1 table                4 L2 table         5 data cluster (0xab)
struct TinyImage {
    var clusterBits: UInt32 = 9
    var magic: UInt32 = 0x5146_49fb
    var version: UInt32 = 3
    var size: UInt64 = 0  // 0: eight data clusters' worth
    var cryptMethod: UInt32 = 0
    var l1Size: UInt32? = nil  // nil: exactly enough
    var l1Offset: UInt64? = nil
    var refcountTableOffset: UInt64? = nil
    var refcountTableClusters: UInt32 = 1
    var nbSnapshots: UInt32 = 0
    var snapshotsOffset: UInt64 = 0
    var incompatible: UInt64 = 0
    var headerLength: UInt32 = 112
    var backingName: String? = nil
    var backingOffset: UInt64? = nil
    /// Raw extension bytes (type, length, data) placed after the header; end marker added.
    var extensions: [UInt8] = []
    /// L2 entry 0 (and its bitmap with extended L2); nil: the data cluster with COPIED set.
    var l2Entry0: UInt64? = nil
    var l2Bitmap0: UInt64 = 0
    /// Bytes appended after the data cluster.
    var tail: [UInt8] = []

    var clusterSize: Int { 1 << Int(clusterBits) }
    func cluster(_ n: Int) -> UInt64 { UInt64(n * clusterSize) }
    var extendedL2: Bool { incompatible & (1 << 4) != 0 }
    var virtualSize: UInt64 { size != 0 ? size : UInt64(8 * clusterSize) }

    func bytes() -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 6 * clusterSize)
        let l2Entries = UInt64(clusterSize / (extendedL2 ? 16 : 8))
        let neededL1 = UInt32(truncatingIfNeeded: (virtualSize + l2Entries * UInt64(clusterSize) - 1) / (l2Entries * UInt64(clusterSize)))
        put32(&b, 0, magic)
        put32(&b, 4, version)
        put64(&b, 8, backingName == nil ? 0 : (backingOffset ?? UInt64(clusterSize - 256)))  // backing_file_offset
        put32(&b, 16, UInt32(backingName?.utf8.count ?? 0))                               // backing_file_size
        put32(&b, 20, clusterBits)
        put64(&b, 24, virtualSize)
        put32(&b, 32, cryptMethod)
        put32(&b, 36, l1Size ?? neededL1)
        put64(&b, 40, l1Offset ?? cluster(3))
        put64(&b, 48, refcountTableOffset ?? cluster(1))
        put32(&b, 56, refcountTableClusters)
        put32(&b, 60, nbSnapshots)
        put64(&b, 64, snapshotsOffset)
        put64(&b, 72, incompatible)   // incompatible_features
        put64(&b, 80, 0)              // compatible_features
        put64(&b, 88, 0)              // autoclear_features
        put32(&b, 96, 4)              // refcount_order: 16 bits
        put32(&b, 100, headerLength)
        // byte 104: compression_type 0 (zlib), then padding to 112
        let extStart = Int(headerLength + 7) & ~7
        b.replaceSubrange(extStart..<extStart + extensions.count, with: extensions)
        if let backingName, let at = Optional(Int(backingOffset ?? UInt64(clusterSize - 256))), at + backingName.utf8.count <= b.count {
            b.replaceSubrange(at..<at + backingName.utf8.count, with: Array(backingName.utf8))
        }
        put64(&b, Int(cluster(1)), cluster(2))         // refcount table[0] → block at cluster 2
        for n in 0..<6 { put16(&b, Int(cluster(2)) + n * 2, 1) }  // clusters 0-5 referenced once
        put64(&b, Int(cluster(3)), cluster(4) | 1 << 63)          // L1[0] → L2 at cluster 4, COPIED
        put64(&b, Int(cluster(4)), l2Entry0 ?? (cluster(5) | 1 << 63))
        if extendedL2 { put64(&b, Int(cluster(4)) + 8, l2Bitmap0) }
        for i in 0..<clusterSize { b[Int(cluster(5)) + i] = 0xab }
        return b + tail
    }

    static func extensionBytes(type: UInt32, data: [UInt8]) -> [UInt8] {
        var e = [UInt8](repeating: 0, count: 8)
        put32(&e, 0, type)
        put32(&e, 4, UInt32(data.count))
        e += data
        while e.count % 8 != 0 { e.append(0) }
        return e
    }

    /// A feature name table entry: type (0 = incompatible), bit number, 46-byte name.
    static func featureName(type: UInt8, bit: UInt8, _ name: String) -> [UInt8] {
        var entry = [type, bit] + Array(name.utf8)
        entry += [UInt8](repeating: 0, count: 48 - entry.count)
        return entry
    }
}

func put16(_ b: inout [UInt8], _ at: Int, _ v: UInt16) { for i in 0..<2 { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * (1 - i))) } }
func put32(_ b: inout [UInt8], _ at: Int, _ v: UInt32) { for i in 0..<4 { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * (3 - i))) } }
func put64(_ b: inout [UInt8], _ at: Int, _ v: UInt64) { for i in 0..<8 { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * (7 - i))) } }
