/// One internal snapshot (docs/interop/qcow2.txt, "Snapshots").
public struct Snapshot: Sendable, Equatable {
    public var id: String
    public var name: String
    public var l1TableOffset: UInt64      // byte 0
    public var l1Size: UInt32             // byte 8
    public var dateSeconds: UInt32        // byte 16
    public var dateNanoseconds: UInt32    // byte 20
    public var vmClockNanoseconds: UInt64 // byte 24
    /// Extra data byte 0 (64-bit) when present, otherwise byte 32.
    public var vmStateSize: UInt64
    /// Extra data byte 8: the virtual disk size when the snapshot was taken, or nil in images
    /// that predate it (the snapshot then has the image's size).
    public var diskSize: UInt64?
    public var icount: UInt64?
    public var extraDataSize: UInt32
    /// Why this snapshot cannot be read (its L1 table is unaligned, too large or past the end of
    /// the file), or nil. QEMU opens such an image and fails only when the snapshot is loaded
    /// ("Snapshot L1 table offset invalid"): the volume stays readable, the snapshot is listed,
    /// and reading it fails with this reason.
    public var problem: String? = nil
}

/// What the snapshot table holds: its entries, and why the entries after them could not be read.
struct SnapshotTableContents {
    var snapshots: [Snapshot] = []
    /// Entries that lie (partly) past the end of the file, if any: QEMU reads zeros there and
    /// still opens the image, so these do not fail the volume; they are reported instead.
    var unreadable: String?
}

enum SnapshotTable {
    /// QEMU's limits: QCOW_MAX_SNAPSHOTS_SIZE and QCOW_MAX_SNAPSHOT_EXTRA_DATA.
    static let maxTableBytes: UInt64 = 64 << 20
    static let maxExtraData: UInt32 = 1024

    /// Every entry, for a writer: any entry that cannot be read or used is an error.
    static func readAll(_ file: HostFile, header: Header) throws(Qcow2Error) -> [Snapshot] {
        let contents = try read(file, header: header)
        if let why = contents.unreadable { throw .corrupt(why, offset: header.snapshotsOffset) }
        if let bad = contents.snapshots.first(where: { $0.problem != nil }) {
            throw .corrupt(bad.problem!, offset: header.snapshotsOffset)
        }
        return contents.snapshots
    }

    /// The table as QEMU opens it: an entry with too much extra data, or a table longer than
    /// QEMU's limit, fails the image (as in QEMU); an entry whose tables are bad is kept with its
    /// `problem`; entries past the end of the file end the table with `unreadable`.
    static func read(_ file: HostFile, header: Header) throws(Qcow2Error) -> SnapshotTableContents {
        var contents = SnapshotTableContents()
        guard header.nbSnapshots > 0 else { return contents }
        // Entries have variable length: read one at a time, never past the table limit.
        let start = header.snapshotsOffset
        let inFile = file.size > start ? file.size - start : 0
        contents.snapshots.reserveCapacity(Int(min(header.nbSnapshots, 1024)))
        var at: UInt64 = 0
        for index in 0..<header.nbSnapshots {
            let entryStart = start + at
            guard at + 40 <= maxTableBytes else {
                throw .corrupt("snapshot table exceeds the maximum size at entry \(index)", offset: entryStart)
            }
            guard at + 40 <= inFile else {
                contents.unreadable = pastEnd(index, of: header.nbSnapshots, at: entryStart, fileSize: file.size)
                return contents
            }
            let fixed = BigEndianReader(bytes: try file.readBytes(at: entryStart, count: 40))
            let extraSize = fixed.u32(36)
            guard extraSize <= maxExtraData else {
                throw .corrupt("too much extra metadata in snapshot table entry \(index) (\(extraSize) bytes)", offset: entryStart + 36)
            }
            let variable = UInt64(extraSize) + UInt64(fixed.u16(12)) + UInt64(fixed.u16(14))
            guard at + 40 + variable <= maxTableBytes else {
                throw .corrupt("snapshot table exceeds the maximum size at entry \(index)", offset: entryStart)
            }
            guard at + 40 + variable <= inFile else {
                contents.unreadable = pastEnd(index, of: header.nbSnapshots, at: entryStart, fileSize: file.size)
                return contents
            }
            let rest = try file.readBytes(at: entryStart + 40, count: Int(variable))
            var snapshot = entry(fixed: fixed, rest: rest)
            snapshot.problem = problem(of: snapshot, header: header, fileSize: file.size, entryOffset: entryStart)
            contents.snapshots.append(snapshot)
            at = (at + 40 + variable + 7) & ~7
        }
        return contents
    }

    private static func pastEnd(_ index: UInt32, of count: UInt32, at offset: UInt64, fileSize: UInt64) -> String {
        let which = index + 1 == count ? "entry \(index) lies" : "entries \(index)...\(count - 1) lie"
        return "snapshot table \(which) past the end of the file (\(fileSize) bytes, from byte \(offset))"
    }

    /// One entry from its 40 fixed bytes and the extra data, id and name that follow them.
    private static func entry(fixed: BigEndianReader, rest: [UInt8]) -> Snapshot {
        let extraSize = fixed.u32(36)
        let extra = BigEndianReader(bytes: Array(rest[0..<Int(extraSize)]))
        let idStart = Int(extraSize), nameStart = idStart + Int(fixed.u16(12))
        var snapshot = Snapshot(
            id: String(decoding: rest[idStart..<nameStart], as: UTF8.self),
            name: String(decoding: rest[nameStart..<nameStart + Int(fixed.u16(14))], as: UTF8.self),
            l1TableOffset: fixed.u64(0), l1Size: fixed.u32(8),
            dateSeconds: fixed.u32(16), dateNanoseconds: fixed.u32(20),
            vmClockNanoseconds: fixed.u64(24), vmStateSize: UInt64(fixed.u32(32)),
            diskSize: nil, icount: nil, extraDataSize: extraSize)
        if extraSize >= 8 { snapshot.vmStateSize = extra.u64(0) }
        if extraSize >= 16 { snapshot.diskSize = extra.u64(8) }
        if extraSize >= 24 { snapshot.icount = extra.u64(16) }
        return snapshot
    }

    /// Why the snapshot cannot be read, or nil.
    private static func problem(of s: Snapshot, header: Header, fileSize: UInt64, entryOffset: UInt64) -> String? {
        do throws(Qcow2Error) {
            guard UInt64(s.l1Size) * 8 <= Header.maxL1Bytes else {
                throw .corrupt("snapshot \(s.id) l1_size \(s.l1Size) is too large (snapshot L1 table too large)", offset: entryOffset + 8)
            }
            try header.checkTable("snapshot \(s.id) L1 table", offset: s.l1TableOffset,
                                  bytes: UInt64(s.l1Size) * 8, fileSize: fileSize, field: entryOffset)
            if let size = s.diskSize, size > Header.maxVirtualSize {
                throw .corrupt("snapshot \(s.id) disk size \(size) is too large", offset: entryOffset + 48)
            }
            return nil
        } catch {
            return "\(error)"
        }
    }
}
