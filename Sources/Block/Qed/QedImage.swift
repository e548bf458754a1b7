/// QEMU Enhanced Disk images (qed), read-only, with backing files: docs/formats/qed.md.
public enum QedReader: ImageFormatReader {
    public static var format: Image.Format { .qed }

    public static func open(_ context: FormatContext) throws -> FormatOpening {
        let file = context.file
        let head = try file.readBytes(at: 0, count: Int(min(file.size, UInt64(QedHeader.length))))
        let header = try QedHeader.parse(head, fileSize: file.size)
        // QED_F_NEED_CHECK (not closed cleanly): QEMU opens such an image read-only without
        // its check ("there is no risk of corruption since write operations are not
        // possible"); poolfs reads it the same way.
        var backing: Image?
        if header.hasBacking, case let name = try backingName(file, header), !name.isEmpty {
            // QED_F_BACKING_FORMAT_NO_PROBE: raw; otherwise probed (and then it may name no files).
            backing = try context.openBacking(name, "backing file", header.backingIsRaw ? .raw : nil)
        }
        let disk = QedDisk(file: file, header: header, cache: context.cache, backing: backing?.live)
        return FormatOpening(live: disk, backing: backing)
    }

    /// The backing file name: `backing_filename_size` bytes at `backing_filename_offset`
    /// (checked inside the header), up to the first NUL as QEMU's C string ends there. Bytes
    /// past the end of the file read as zeros, as in QEMU.
    static func backingName(_ file: HostFile, _ header: QedHeader) throws -> String {
        let offset = header.backingNameOffset
        let inside = offset >= file.size ? 0 : min(header.backingNameSize, file.size - offset)
        let bytes = try file.readBytes(at: offset, count: Int(inside))
        return String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
    }
}

/// The virtual disk of a qed image: clusters found through the L1/L2 tables; unallocated ones
/// read from the backing file (zeros past its end, or with none), zero clusters as zeros.
final class QedDisk: BlockDevice {
    let file: HostFile
    let header: QedHeader
    let tables: QedTables
    let backing: (any BlockDevice)?

    var size: UInt64 { header.imageSize }

    init(file: HostFile, header: QedHeader, cache: BlockCache, backing: (any BlockDevice)?) {
        self.file = file
        self.header = header
        self.tables = QedTables(file: file, header: header, cache: cache)
        self.backing = backing
    }

    public func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        try walk(offset, UInt64(length)) { entry, start, n in
            switch entry {
            case .unallocated: try planBeneath(backing, at: start, length: Int(n), into: &plan)
            case .zero: plan.appendZero(Int(n))
            case .data(let host): plan.appendHost(file, offset: host, length: Int(n))
            }
        }
    }

    /// As `qemu-img map`: data clusters are data (QEMU does not look for holes under them),
    /// zero clusters are present zeros, unallocated ones are what the backing file says one
    /// level deeper, or absent zeros where there is none.
    public func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        try walk(offset, length) { entry, start, n in
            switch entry {
            case .unallocated:
                try statusBeneath(backing, at: start, length: n, detection: detection, into: &extents)
            case .zero:
                extents.appendMerging(MapExtent(start: start, length: n, depth: 0, present: true, zero: true, data: false))
            case .data(let host):
                extents.appendMerging(MapExtent(start: start, length: n, depth: 0, present: true, zero: false, data: true, offset: host))
            }
        }
    }

    /// Calls `body` for each run of the range that the tables map alike: unallocated, zero, or
    /// data at contiguous host offsets. An L1 entry of 0 is one run for its whole L2 span, so an
    /// empty disk of any size costs one step per L1 entry.
    func walk(_ offset: UInt64, _ length: UInt64,
              _ body: (_ entry: QedTables.Entry, _ start: UInt64, _ length: UInt64) throws -> Void) throws {
        var l1Chunk: QedTables.Chunk?, l2Chunk: QedTables.Chunk?
        var pending: (entry: QedTables.Entry, start: UInt64, length: UInt64)?
        var at = offset
        let end = offset + length
        while at < end {
            var entry = QedTables.Entry.unallocated
            var n = min(end - at, header.l2Span - at % header.l2Span)
            if let l2 = try tables.l2Table(at: at, chunk: &l1Chunk) {
                let within = at % header.clusterSize
                n = min(end - at, header.clusterSize - within)
                entry = try tables.cluster(at: at, l2: l2, chunk: &l2Chunk)
                if case .data(let host) = entry { entry = .data(host + within) }
            }
            if let p = pending, p.start + p.length == at, continues(p.entry, p.length, entry) {
                pending!.length += n
            } else {
                if let p = pending { try body(p.entry, p.start, p.length) }
                pending = (entry, at, n)
            }
            at += n
        }
        if let p = pending { try body(p.entry, p.start, p.length) }
    }

    private func continues(_ entry: QedTables.Entry, _ length: UInt64, _ next: QedTables.Entry) -> Bool {
        switch (entry, next) {
        case (.unallocated, .unallocated), (.zero, .zero): return true
        case let (.data(a), .data(b)): return a + length == b
        default: return false
        }
    }
}
