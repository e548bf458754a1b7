/// The qcow2 header (docs/interop/qcow2.txt, "Header"), parsed and checked. All later arithmetic
/// trusts these values only because `Header.parse` bounds every one of them first.
public struct Header: Sendable {
    public static let magic: UInt32 = 0x5146_49fb  // "QFI\xfb"
    /// QEMU's limits: QCOW_MAX_L1_SIZE, QCOW_MAX_SNAPSHOTS, QCOW_MAX_REFTABLE_SIZE.
    static let maxL1Bytes: UInt64 = 32 << 20
    static let maxSnapshots: UInt32 = 65536
    static let maxRefcountTableBytes: UInt64 = 8 << 20
    static let maxBackingNameLength: UInt32 = 1023
    /// Virtual sizes beyond 2^61 cannot be mapped by any L1 table QEMU accepts.
    static let maxVirtualSize: UInt64 = 1 << 61

    public enum Incompatible {
        static let dirty: UInt64 = 1 << 0
        static let corrupt: UInt64 = 1 << 1
        static let externalDataFile: UInt64 = 1 << 2
        static let compressionType: UInt64 = 1 << 3
        static let extendedL2: UInt64 = 1 << 4
        static let known = dirty | corrupt | externalDataFile | compressionType | extendedL2
    }

    public enum Compression: UInt8, Sendable {
        case zlib = 0
        case zstd = 1
    }

    public var version: UInt32
    public var backingFileOffset: UInt64       // byte 8
    public var backingFileSize: UInt32         // byte 16
    public var clusterBits: UInt32             // byte 20
    public var size: UInt64                    // byte 24
    public var cryptMethod: UInt32             // byte 32
    public var l1Size: UInt32                  // byte 36
    public var l1TableOffset: UInt64           // byte 40
    public var refcountTableOffset: UInt64     // byte 48
    public var refcountTableClusters: UInt32   // byte 56
    public var nbSnapshots: UInt32             // byte 60
    public var snapshotsOffset: UInt64         // byte 64
    public var incompatibleFeatures: UInt64 = 0  // byte 72 (v3)
    public var compatibleFeatures: UInt64 = 0    // byte 80 (v3)
    public var autoclearFeatures: UInt64 = 0     // byte 88 (v3)
    public var refcountOrder: UInt32 = 4         // byte 96 (v3)
    public var headerLength: UInt32 = 72         // byte 100 (v3)
    public var compression: Compression = .zlib  // byte 104 (v3, when header_length > 104)

    public var clusterSize: UInt64 { 1 << UInt64(clusterBits) }
    public var extendedL2: Bool { incompatibleFeatures & Incompatible.extendedL2 != 0 }
    public var hasExternalDataFile: Bool { incompatibleFeatures & Incompatible.externalDataFile != 0 }
    /// autoclear bit 1: the external data file is a valid raw image on its own.
    public var dataFileRaw: Bool { autoclearFeatures & 2 != 0 }
    public var isDirty: Bool { incompatibleFeatures & Incompatible.dirty != 0 }
    public var isMarkedCorrupt: Bool { incompatibleFeatures & Incompatible.corrupt != 0 }
    /// Bytes per L2 entry: 8, or 16 with extended L2 (entry plus subcluster bitmap).
    public var l2EntryBytes: UInt64 { extendedL2 ? 16 : 8 }
    public var l2Bits: UInt32 { clusterBits - (extendedL2 ? 4 : 3) }

    /// Parses the first cluster of the file. `fileSize` bounds every table the header points to.
    static func parse(_ bytes: [UInt8], fileSize: UInt64, path: String) throws(Qcow2Error) -> Header {
        let r = BigEndianReader(bytes: bytes)
        guard bytes.count >= 72, r.u32(0) == magic else { throw .notQcow2(path: path) }
        var h = Header(
            version: r.u32(4), backingFileOffset: r.u64(8), backingFileSize: r.u32(16),
            clusterBits: r.u32(20), size: r.u64(24), cryptMethod: r.u32(32), l1Size: r.u32(36),
            l1TableOffset: r.u64(40), refcountTableOffset: r.u64(48),
            refcountTableClusters: r.u32(56), nbSnapshots: r.u32(60), snapshotsOffset: r.u64(64))
        guard h.version == 2 || h.version == 3 else { throw .unsupportedVersion(h.version) }
        if h.version == 3 {
            guard bytes.count >= 104 else { throw .corrupt("version 3 header is truncated", offset: 0) }
            h.incompatibleFeatures = r.u64(72)
            h.compatibleFeatures = r.u64(80)
            h.autoclearFeatures = r.u64(88)
            h.refcountOrder = r.u32(96)
            h.headerLength = r.u32(100)
            guard h.headerLength >= 104 else {
                throw .corrupt("header_length \(h.headerLength) is smaller than 104", offset: 100)
            }
        }
        try h.check(fileSize: fileSize)
        if h.version == 3, h.headerLength > 104 {
            guard let kind = Compression(rawValue: r.u8(104)) else {
                throw .corrupt("unknown compression_type \(r.u8(104))", offset: 104)
            }
            h.compression = kind
        }
        if h.compression != .zlib, h.incompatibleFeatures & Incompatible.compressionType == 0 {
            throw .corrupt("compression_type is set but the compression type feature bit is clear", offset: 104)
        }
        return h
    }

    private func check(fileSize: UInt64) throws(Qcow2Error) {
        guard (9...21).contains(clusterBits) else {
            throw .corrupt("cluster_bits \(clusterBits) is outside 9...21", offset: 20)
        }
        guard UInt64(headerLength) <= clusterSize else {
            throw .corrupt("header_length \(headerLength) exceeds the cluster size", offset: 100)
        }
        if cryptMethod != 0 { throw .encrypted(method: cryptMethod) }
        guard size <= Self.maxVirtualSize else {
            throw .corrupt("virtual size \(size) is too large", offset: 24)
        }
        guard refcountOrder <= 6 else {
            throw .corrupt("refcount_order \(refcountOrder) is larger than 6", offset: 96)
        }
        guard !extendedL2 || clusterBits >= 14 else {
            throw .corrupt("extended L2 entries need clusters of at least 16 KiB", offset: 72)
        }
        // L1: big enough for the virtual size, small enough for QEMU, inside the file.
        guard UInt64(l1Size) * 8 <= Self.maxL1Bytes else {
            throw .corrupt("l1_size \(l1Size) is too large", offset: 36)
        }
        let bytesPerL1Entry = UInt64(1) << UInt64(clusterBits + l2Bits)
        let needed = (size + bytesPerL1Entry - 1) / bytesPerL1Entry
        guard UInt64(l1Size) >= needed else {
            throw .corrupt("l1_size \(l1Size) cannot map the virtual size \(size)", offset: 36)
        }
        try checkTable("L1 table", offset: l1TableOffset, bytes: UInt64(l1Size) * 8, fileSize: fileSize, field: 40)
        // Refcount table: only its bounds matter for reading.
        let refcountBytes = UInt64(refcountTableClusters) * clusterSize
        guard refcountBytes <= Self.maxRefcountTableBytes else {
            throw .corrupt("refcount_table_clusters \(refcountTableClusters) is too large", offset: 56)
        }
        try checkTable("refcount table", offset: refcountTableOffset, bytes: refcountBytes, fileSize: fileSize, field: 48)
        guard nbSnapshots <= Self.maxSnapshots else {
            throw .corrupt("nb_snapshots \(nbSnapshots) is too large", offset: 60)
        }
        // As QEMU (qcow2_validate_table): the offset must be aligned and small even when there
        // are no snapshots. A table past the end of the file does not fail the image: QEMU reads
        // zeros there (`SnapshotTable.read` reports those entries instead).
        guard snapshotsOffset & (clusterSize - 1) == 0 else {
            throw .corrupt("snapshot table offset \(snapshotsOffset) is not cluster-aligned (snapshot table offset invalid)", offset: 64)
        }
        guard snapshotsOffset <= UInt64(Int64.max) - UInt64(nbSnapshots) * 40 else {
            throw .corrupt("snapshot table offset \(snapshotsOffset) is invalid (past 2^63)", offset: 64)
        }
        if backingFileOffset != 0 {
            guard backingFileSize <= Self.maxBackingNameLength,
                  backingFileOffset <= clusterSize,
                  backingFileOffset + UInt64(backingFileSize) <= clusterSize else {
                throw .corrupt("backing file name (\(backingFileSize) bytes at \(backingFileOffset)) lies outside the first cluster", offset: 8)
            }
        }
    }

    /// A table must start on a cluster boundary and end inside the file.
    func checkTable(_ what: String, offset: UInt64, bytes: UInt64, fileSize: UInt64, field: UInt64) throws(Qcow2Error) {
        guard offset & (clusterSize - 1) == 0 else {
            throw .corrupt("\(what) offset \(offset) is not cluster-aligned", offset: field)
        }
        guard offset <= fileSize, bytes <= fileSize - offset else {
            throw .corrupt("\(what) (\(bytes) bytes at \(offset)) lies past the end of the file (\(fileSize) bytes)", offset: field)
        }
    }
}
