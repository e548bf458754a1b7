/// The header of a sparse extent: "KDMV" (VMDK 4, hosted and streamOptimized), or "COWD"
/// (VMDK 3, hosted sparse of VMware Workstation 4 and older). Every field is checked here, once,
/// against QEMU's limits and the file's size; the grain directory is read by `SparseExtent`.
struct SparseHeader: Equatable {
    var version: UInt32
    var flags: UInt32
    /// Sectors of the disk this extent holds.
    var capacity: UInt64
    /// Sectors per grain (a power of two).
    var grainSectors: UInt64
    var descriptorOffset: UInt64 = 0
    var descriptorSize: UInt64 = 0
    var entriesPerTable: UInt64
    /// Byte position of the grain directory (GD, QEMU's L1 table).
    var directoryOffset: UInt64
    /// Entries of the grain directory.
    var directoryEntries: UInt64
    var compressed = false
    var hasMarkers = false
    var zeroedGrains = false
    var isCOWD = false

    static let flagRedundantDirectory: UInt32 = 1 << 1
    static let flagZeroedGrains: UInt32 = 1 << 2
    static let flagCompressed: UInt32 = 1 << 16
    static let flagMarkers: UInt32 = 1 << 17
    static let directoryAtEnd = UInt64.max
    /// QEMU's limits (vmdk_add_extent, vmdk_open_vmdk4).
    static let maximumDirectoryEntries: UInt64 = 32 * 1024 * 1024
    static let maximumGrainSectors: UInt64 = 0x200000
    static let maximumEntriesPerTable: UInt64 = 512
    /// The largest grain poolfs decodes (qcow2's largest cluster): a decoded grain is one buffer.
    static let maximumCompressedGrain: UInt64 = 2 << 20
    /// 2^54 sectors (8 EiB): byte positions stay within 63 bits.
    static let maximumCapacity: UInt64 = 1 << 54

    var grainSize: UInt64 { grainSectors * 512 }
    var tableSpan: UInt64 { entriesPerTable * grainSize }
    var tableBytes: Int { Int(entriesPerTable) * 4 }

    /// Reads the header of the sparse extent `file`.
    static func read(_ file: HostFile) throws -> SparseHeader {
        guard file.size >= 512 else {
            throw Qcow2Error.corrupt("File is too small, not a valid image (\(file.size) bytes, a sparse header needs 512)", offset: 0)
        }
        let bytes = VmdkLittleEndian(bytes: try file.readBytes(at: 0, count: 512))
        if bytes.starts(with: "COWD") { return try cowd(bytes, file: file) }
        guard bytes.starts(with: "KDMV") else {
            throw Qcow2Error.corrupt("Image not in VMDK format: no KDMV or COWD magic", offset: 0)
        }
        var header = try kdmv(bytes, file: file, at: 0)
        if header.directoryOffset == directoryAtEnd {
            header = try footer(of: file)
        }
        try header.check(file: file)
        return header
    }

    /// The fields of a KDMV header read at byte `at` (0, or the footer's copy).
    static func kdmv(_ b: VmdkLittleEndian, file: HostFile, at base: UInt64) throws -> SparseHeader {
        let version = b.u32(4)
        guard version <= 3 else { throw Qcow2Error.unsupportedFormat("Unsupported VMDK version \(version)") }
        let flags = b.u32(8)
        let algorithm = b.u16(77)
        guard algorithm <= 1 else {
            throw Qcow2Error.unsupportedFormat("vmdk compression algorithm \(algorithm) is not supported (only 1, deflate)")
        }
        var header = SparseHeader(
            version: version, flags: flags, capacity: b.u64(12), grainSectors: b.u64(20),
            descriptorOffset: b.u64(28), descriptorSize: b.u64(36), entriesPerTable: UInt64(b.u32(44)),
            directoryOffset: b.u64(56), directoryEntries: 0)
        header.compressed = algorithm == 1
        header.hasMarkers = flags & flagMarkers != 0
        header.zeroedGrains = flags & flagZeroedGrains != 0
        if header.capacity == 0 && header.descriptorOffset != 0 {
            throw Qcow2Error.unsupportedFormat("a sparse header with capacity 0 that points at a descriptor (ESX style) is not supported")
        }
        try header.checkGeometry(at: base)
        if header.compressed && header.grainSize > maximumCompressedGrain {
            // A decoded grain is one buffer: QEMU allocates three grains per read; poolfs keeps it bounded.
            throw Qcow2Error.unsupportedFormat("compressed grains of \(header.grainSize) bytes are over poolfs's limit of \(maximumCompressedGrain) (streams use 64 KiB)")
        }
        if header.directoryOffset != directoryAtEnd {
            guard let offset = vmdkBytes(header.directoryOffset) else {
                throw Qcow2Error.corrupt("grain directory offset \(header.directoryOffset) sectors is not a byte position", offset: base + 56)
            }
            header.directoryOffset = offset
        }
        let overhead = b.u64(64)
        guard file.size / 512 >= overhead else {
            throw Qcow2Error.corrupt("File truncated, expecting at least \(vmdkBytes(overhead).map(String.init) ?? "2^64 or more") bytes (overHead \(overhead) sectors, the file has \(file.size))", offset: base + 64)
        }
        return header
    }

    /// QEMU's bounds on grain size, entries per table and grain directory size.
    mutating func checkGeometry(at base: UInt64) throws {
        guard entriesPerTable <= Self.maximumEntriesPerTable else {
            throw Qcow2Error.corrupt("L2 table size too big: numGTEsPerGT \(entriesPerTable) is over \(Self.maximumEntriesPerTable)", offset: base + 44)
        }
        guard entriesPerTable > 0, grainSectors > 0 else {
            throw Qcow2Error.corrupt("L1 entry size is invalid: numGTEsPerGT \(entriesPerTable), grainSize \(grainSectors) sectors", offset: base + 20)
        }
        guard grainSectors <= Self.maximumGrainSectors else {
            throw Qcow2Error.corrupt("Invalid granularity, image may be corrupt: grainSize \(grainSectors) sectors is over \(Self.maximumGrainSectors)", offset: base + 20)
        }
        guard grainSectors & (grainSectors - 1) == 0 else {
            throw Qcow2Error.corrupt("grainSize \(grainSectors) sectors is not a power of two", offset: base + 20)
        }
        guard capacity <= Self.maximumCapacity else {
            throw Qcow2Error.corrupt("capacity \(capacity) sectors is over 2^54 sectors", offset: base + 12)
        }
        let tableSectors = entriesPerTable * grainSectors
        directoryEntries = (capacity + tableSectors - 1) / tableSectors
        guard directoryEntries <= Self.maximumDirectoryEntries else {
            throw Qcow2Error.corrupt("L1 size too big: a capacity of \(capacity) sectors needs a grain directory of \(directoryEntries) entries, over QEMU's limit of \(Self.maximumDirectoryEntries)", offset: base + 12)
        }
    }

    /// The footer of a streamOptimized extent whose header says the grain directory is at the
    /// end: a footer marker, a copy of the header with the directory's offset, an end-of-stream
    /// marker, in the last 1536 bytes.
    static func footer(of file: HostFile) throws -> SparseHeader {
        guard file.size >= 1536 + 512 else {
            throw Qcow2Error.corrupt("Invalid footer: the grain directory is at the end, but the file has no room for a footer", offset: 56)
        }
        let at = file.size / 512 * 512 - 1536
        let b = VmdkLittleEndian(bytes: try file.readBytes(at: at, count: 1536))
        guard b.u32(8) == 0, b.u32(12) == 3, Array(b.bytes[512..<516]) == Array("KDMV".utf8),
              b.u64(1024) == 0, b.u32(1032) == 0, b.u32(1036) == 0 else {
            throw Qcow2Error.corrupt("Invalid footer: no footer marker, KDMV header and end-of-stream marker in the last 1536 bytes", offset: at)
        }
        let header = try kdmv(VmdkLittleEndian(bytes: Array(b.bytes[512..<1024])), file: file, at: at + 512)
        guard header.directoryOffset != directoryAtEnd else {
            throw Qcow2Error.corrupt("Invalid footer: its grain directory offset is 'at the end' too", offset: at + 512 + 56)
        }
        return header
    }

    /// The grain directory lies inside the file.
    func check(file: HostFile) throws {
        let length = directoryEntries * 4
        guard directoryOffset <= file.size, length <= file.size - directoryOffset else {
            throw Qcow2Error.corrupt("grain directory at byte \(directoryOffset) (\(directoryEntries) entries) runs past the end of the file (\(file.size) bytes)", offset: isCOWD ? 20 : 56)
        }
    }

    /// A VMDK 3 ("COWD") header: 4096 entries per grain table, directory size as recorded.
    static func cowd(_ b: VmdkLittleEndian, file: HostFile) throws -> SparseHeader {
        var header = SparseHeader(
            version: b.u32(4), flags: b.u32(8), capacity: UInt64(b.u32(12)), grainSectors: UInt64(b.u32(16)),
            entriesPerTable: 4096, directoryOffset: UInt64(b.u32(20)) * 512, directoryEntries: 0)
        header.isCOWD = true
        // The generic bound on entries per table is KDMV's; COWD's are fixed at 4096.
        let recorded = UInt64(b.u32(24))
        guard header.grainSectors > 0 else {
            throw Qcow2Error.corrupt("L1 entry size is invalid: granularity 0", offset: 16)
        }
        guard header.grainSectors <= maximumGrainSectors, header.grainSectors & (header.grainSectors - 1) == 0 else {
            throw Qcow2Error.corrupt("Invalid granularity, image may be corrupt: \(header.grainSectors) sectors", offset: 16)
        }
        let tableSectors = header.entriesPerTable * header.grainSectors
        let needed = (header.capacity + tableSectors - 1) / tableSectors
        guard recorded >= needed else {
            throw Qcow2Error.corrupt("grain directory of \(recorded) entries is too small for \(header.capacity) sectors (\(needed) needed)", offset: 24)
        }
        header.directoryEntries = needed
        try header.check(file: file)
        return header
    }
}
