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
}

enum SnapshotTable {
    /// QEMU's limits: QCOW_MAX_SNAPSHOTS_SIZE and QCOW_MAX_SNAPSHOT_EXTRA_DATA.
    static let maxTableBytes: UInt64 = 64 << 20
    static let maxExtraData: UInt32 = 1024

    static func read(_ file: HostFile, header: Header) throws(Qcow2Error) -> [Snapshot] {
        guard header.nbSnapshots > 0 else { return [] }
        // Entries have variable length: read in bounded chunks, never more than the table limit.
        let start = header.snapshotsOffset
        let available = min(file.size - start, maxTableBytes)
        var snapshots: [Snapshot] = []
        snapshots.reserveCapacity(Int(min(header.nbSnapshots, 1024)))
        var at: UInt64 = 0
        for index in 0..<header.nbSnapshots {
            let entryStart = start + at
            guard at + 40 <= available else {
                throw .corrupt("snapshot table entry \(index) runs past the end of the table", offset: entryStart)
            }
            let fixed = BigEndianReader(bytes: try file.readBytes(at: entryStart, count: 40))
            let idSize = UInt64(fixed.u16(12))
            let nameSize = UInt64(fixed.u16(14))
            let extraSize = fixed.u32(36)
            guard extraSize <= maxExtraData else {
                throw .corrupt("snapshot \(index) has \(extraSize) bytes of extra data", offset: entryStart + 36)
            }
            let variable = UInt64(extraSize) + idSize + nameSize
            guard at + 40 + variable <= available else {
                throw .corrupt("snapshot table entry \(index) runs past the end of the table", offset: entryStart)
            }
            let rest = try file.readBytes(at: entryStart + 40, count: Int(variable))
            let extra = BigEndianReader(bytes: Array(rest[0..<Int(extraSize)]))
            let idStart = Int(extraSize), nameStart = idStart + Int(idSize)
            var snapshot = Snapshot(
                id: String(decoding: rest[idStart..<nameStart], as: UTF8.self),
                name: String(decoding: rest[nameStart..<nameStart + Int(nameSize)], as: UTF8.self),
                l1TableOffset: fixed.u64(0), l1Size: fixed.u32(8),
                dateSeconds: fixed.u32(16), dateNanoseconds: fixed.u32(20),
                vmClockNanoseconds: fixed.u64(24), vmStateSize: UInt64(fixed.u32(32)),
                diskSize: nil, icount: nil, extraDataSize: extraSize)
            if extraSize >= 8 { snapshot.vmStateSize = extra.u64(0) }
            if extraSize >= 16 { snapshot.diskSize = extra.u64(8) }
            if extraSize >= 24 { snapshot.icount = extra.u64(16) }
            try check(snapshot, header: header, fileSize: file.size, entryOffset: entryStart)
            snapshots.append(snapshot)
            at = (at + 40 + variable + 7) & ~7
        }
        return snapshots
    }

    private static func check(_ s: Snapshot, header: Header, fileSize: UInt64, entryOffset: UInt64) throws(Qcow2Error) {
        guard UInt64(s.l1Size) * 8 <= Header.maxL1Bytes else {
            throw .corrupt("snapshot \(s.id) l1_size \(s.l1Size) is too large", offset: entryOffset + 8)
        }
        try header.checkTable("snapshot \(s.id) L1 table", offset: s.l1TableOffset,
                              bytes: UInt64(s.l1Size) * 8, fileSize: fileSize, field: entryOffset)
        if let size = s.diskSize {
            guard size <= Header.maxVirtualSize else {
                throw .corrupt("snapshot \(s.id) disk size \(size) is too large", offset: entryOffset + 48)
            }
        }
    }
}
