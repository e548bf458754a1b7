/// The QED header (QEMU's docs/interop/qed_spec.txt, block/qed.h): 64 bytes at the start of the
/// file, every integer little-endian. Checked as QEMU's `bdrv_qed_do_open` checks it, in its
/// order and with its words, each error naming the field and its byte offset.
struct QedHeader: Sendable {
    static let length = 64
    static let magic: UInt32 = 0x0044_4551  // "QED\0"
    static let minClusterSize: UInt32 = 4096, maxClusterSize: UInt32 = 64 << 20
    static let minTableSize: UInt32 = 1, maxTableSize: UInt32 = 16
    /// QEMU reads the name into a PATH_MAX buffer and refuses one that does not fit.
    static let maxBackingNameLength: UInt32 = 4095

    enum Feature {
        static let backingFile: UInt64 = 0x01
        static let needCheck: UInt64 = 0x02
        static let backingFormatNoProbe: UInt64 = 0x04
        static let known = backingFile | needCheck | backingFormatNoProbe
    }

    enum Field {
        static let magic = 0, clusterSize = 4, tableSize = 8, headerSize = 12, features = 16
        static let compatFeatures = 24, autoclearFeatures = 32, l1TableOffset = 40, imageSize = 48
        static let backingNameOffset = 56, backingNameSize = 60
    }

    var clusterSize: UInt64
    var tableSize: UInt64
    var headerSize: UInt64
    var features: UInt64
    var l1TableOffset: UInt64
    var imageSize: UInt64
    var backingNameOffset: UInt64
    var backingNameSize: UInt64
    /// The file size rounded down to a cluster, as QEMU keeps it: every table and data cluster
    /// must start below it.
    var fileLimit: UInt64

    var hasBacking: Bool { features & Feature.backingFile != 0 }
    var backingIsRaw: Bool { features & Feature.backingFormatNoProbe != 0 }
    var needsCheck: Bool { features & Feature.needCheck != 0 }
    var tableBytes: UInt64 { clusterSize * tableSize }
    /// Entries per table (L1 and L2 alike).
    var tableEntries: UInt64 { tableBytes / 8 }
    /// Bytes of disk one L2 table maps.
    var l2Span: UInt64 { tableEntries * clusterSize }
    var headerBytes: UInt64 { headerSize * clusterSize }

    /// Parses the first 64 bytes (zero-padded when the file is shorter, as QEMU reads them).
    static func parse(_ bytes: [UInt8], fileSize: UInt64) throws(Qcow2Error) -> QedHeader {
        let r = LittleEndianFields(bytes: bytes)
        guard r.u32(Field.magic) == magic else { throw .corrupt("Image not in QED format", offset: 0) }
        let features = r.u64(Field.features)
        guard features & ~Feature.known == 0 else {
            throw .unsupportedFormat("Unsupported QED features: \(String(features & ~Feature.known, radix: 16)): features at byte \(Field.features)")
        }
        let cluster = r.u32(Field.clusterSize)
        guard (minClusterSize...maxClusterSize).contains(cluster), cluster.nonzeroBitCount == 1 else {
            throw .corrupt("QED cluster size is invalid: cluster_size \(cluster) is not a power of two in \(minClusterSize)...\(maxClusterSize)",
                           offset: UInt64(Field.clusterSize))
        }
        let table = r.u32(Field.tableSize)
        guard (minTableSize...maxTableSize).contains(table), table.nonzeroBitCount == 1 else {
            throw .corrupt("QED table size is invalid: table_size \(table) is not a power of two in \(minTableSize)...\(maxTableSize)",
                           offset: UInt64(Field.tableSize))
        }
        let clusterSize = UInt64(cluster)
        let header = QedHeader(
            clusterSize: clusterSize, tableSize: UInt64(table), headerSize: UInt64(r.u32(Field.headerSize)),
            features: features, l1TableOffset: r.u64(Field.l1TableOffset), imageSize: r.u64(Field.imageSize),
            backingNameOffset: UInt64(r.u32(Field.backingNameOffset)), backingNameSize: UInt64(r.u32(Field.backingNameSize)),
            fileLimit: fileSize / clusterSize * clusterSize)
        try header.checkImageSize()
        guard header.isValidTable(at: header.l1TableOffset) else {
            throw .corrupt("QED table offset is invalid: the L1 table (\(header.tableBytes) bytes at \(header.l1TableOffset)) is not cluster-aligned, inside the header, or past the end of the file",
                           offset: UInt64(Field.l1TableOffset))
        }
        try header.checkBackingName()
        return header
    }

    /// QEMU's `qed_max_image_size`, in its 64-bit arithmetic: entries² × cluster size, which
    /// wraps (to 0: no size passes) for the largest clusters and tables; and whole sectors.
    private func checkImageSize() throws(Qcow2Error) {
        let max = tableEntries &* tableEntries &* clusterSize
        guard imageSize % 512 == 0, imageSize <= max else {
            throw .corrupt("QED image size is invalid: image_size \(imageSize) is not a multiple of 512 no larger than \(max)",
                           offset: UInt64(Field.imageSize))
        }
    }

    /// The header may not be so large that header_size × cluster_size overflows 32 bits; the
    /// backing file name must lie inside it and fit in PATH_MAX.
    private func checkBackingName() throws(Qcow2Error) {
        guard headerSize <= UInt64(UInt32.max) / clusterSize else {
            throw .corrupt("QED header size is too large: header_size \(headerSize)", offset: UInt64(Field.headerSize))
        }
        guard hasBacking else { return }
        guard backingNameOffset + backingNameSize <= headerBytes else {
            throw .corrupt("QED backing filename offset is invalid: \(backingNameSize) bytes at \(backingNameOffset) lie outside the \(headerBytes)-byte header",
                           offset: UInt64(Field.backingNameOffset))
        }
        guard backingNameSize <= Self.maxBackingNameLength else {
            throw .corrupt("Failed to read backing filename: backing_filename_size \(backingNameSize) is longer than \(Self.maxBackingNameLength)",
                           offset: UInt64(Field.backingNameSize))
        }
    }

    /// QEMU's `qed_check_cluster_offset`: cluster-aligned, past the header, and starting below
    /// the file size rounded down to a cluster (so the whole cluster is in the file).
    func isValidCluster(at offset: UInt64) -> Bool {
        offset & (clusterSize - 1) == 0 && offset >= headerBytes && offset < fileLimit
    }

    /// QEMU's `qed_check_table_offset`: the first and last cluster of the table are valid. A
    /// table of one cluster never passes (QEMU's overflow test `end <= offset` is true), so
    /// QEMU opens no image made with table_size=1, and neither does poolfs.
    func isValidTable(at offset: UInt64) -> Bool {
        let (end, overflow) = offset.addingReportingOverflow((tableSize - 1) * clusterSize)
        guard !overflow, end > offset else { return false }
        return isValidCluster(at: offset) && isValidCluster(at: end)
    }
}
