import CBlkid
import Glibc
import Block

/// Partition tables, read by libblkid's partition probing (util-linux): DOS/MBR with extended and
/// logical partitions, GPT, and the nested tables libblkid knows (BSD, Solaris, UnixWare, Minix
/// inside DOS partitions), plus Mac, Atari, SGI, Sun, AIX. Every libblkid call lives in this file.
///
/// libblkid reads only a file descriptor, so it probes a `PartitionSketch`: a memfd as large as
/// the device, holding only the ranges copied in so far. The sketch grows to a fixpoint:
///   1. the first and last MiB of the device (MBR; GPT header and entries; backup GPT);
///   2. after each probe, the first MiB of every partition (nested labels: BSD at sector 1,
///      UnixWare at 29; the first EBR of an extended partition), and the first and last MiB of
///      every gap inside an extended partition that no logical partition found so far covers
///      (the next EBR follows the previous logical partition, or precedes the next one);
///   3. once those stop growing the sketch, the whole of those gaps, once;
/// and it stops when a round copies nothing new. Only allocated extents are copied.
///
/// What libblkid 2.38 does with a sketch (probe.c `blkid_probe_set_device`, dos.c, gpt.c): fstat
/// sees a regular file, so its size is st_size (the device size: ftruncate), the sector size is
/// 512 unless `blkid_probe_set_sectorsize` says otherwise, no ioctl is made (those are for block
/// devices), a device of 1440 KiB or less is "tiny" (no nested tables are looked for, as on a real
/// floppy-sized disk), and it reads with lseek + read only. The low-level probe reads no config
/// file (BLKID_CONF is for the blkid cache, not used here) and caches nothing between probes: each
/// probe is a new `blkid_probe` on the sketch. dos.c calls `blkid_probe_is_vfat`/`_is_ntfs` on
/// sector 0 before accepting an MBR: they read the boot sector (in the first MiB), and for NTFS
/// the MFT record, which may lie past the first MiB; a disk whose sector 0 is both a valid NTFS
/// boot sector and an MBR may then read as "dos" here where blkid on the disk says NTFS.
/// GPT entries are read where the header says (LBA 2 as written by every common tool; entries
/// placed past the first MiB are not found and the primary header is rejected for its CRC, then
/// the backup header at the last LBA is tried).
///
/// Probes are independent objects: several threads may read different devices concurrently.
public struct Partition: Sendable, Equatable {
    /// `blkid_partition_get_partno`: 1-4 primary, 5 and up logical (and nested) for DOS.
    public var number: Int
    /// Bytes from the start of the device.
    public var start: UInt64
    public var size: UInt64
    /// The table the partition is in (`blkid_parttable_get_type`): "dos" for logical partitions
    /// too, "bsd" for a BSD label nested in a DOS partition.
    public var tableType: String
    /// `blkid_partition_get_type_string` where the table has one (the GPT type GUID), otherwise
    /// `blkid_partition_get_type` as libblkid prints it ("0x83", extended "0x5").
    public var type: String
    /// `blkid_partition_get_name`: the GPT partition label.
    public var name: String?
    /// `blkid_partition_get_uuid`: GPT partition GUID; for DOS libblkid makes "<disk id>-<nn>".
    public var uuid: String?
    public var isExtended: Bool
    /// Logical partitions of an extended partition, and partitions of nested tables.
    public var isLogical: Bool

    public init(number: Int, start: UInt64, size: UInt64, tableType: String, type: String,
                name: String? = nil, uuid: String? = nil, isExtended: Bool = false, isLogical: Bool = false) {
        self.number = number; self.start = start; self.size = size; self.tableType = tableType
        self.type = type; self.name = name; self.uuid = uuid; self.isExtended = isExtended; self.isLogical = isLogical
    }

    var range: Range<UInt64> { start..<start + size }
}

public enum PartitionTableError: Error, Equatable, CustomStringConvertible {
    case invalidSectorSize(Int)
    /// A libblkid call failed; `code` is what it returned.
    case libblkid(call: String, code: Int)
    /// `blkid_do_safeprobe` found more than one kind of partition table.
    case ambivalent
    /// A system call made for the sketch failed.
    case system(errno: Int32, call: String)
    /// The table kept growing for this many probes (an EBR chain longer than that).
    case unsettled(probes: Int)

    public var description: String {
        switch self {
        case .invalidSectorSize(let size):
            return "sector size \(size) is not a power of two from 512 to 65536"
        case .libblkid(let call, let code):
            return "libblkid could not read the partition table: \(call) failed (\(code))"
        case .ambivalent:
            return "libblkid found more than one partition table type (blkid_do_safeprobe returned -2)"
        case .system(let errno, let call):
            return "could not prepare the partition table probe: \(call) failed: \(String(cString: strerror(errno)))"
        case .unsettled(let probes):
            return "the partition table still grew after \(probes) probes: an extended partition chain longer than that is not read"
        }
    }
}

public struct PartitionTable: Sendable, Equatable {
    /// "dos", "gpt", ... (`blkid_parttable_get_type` of the top-level table).
    public var type: String
    /// `blkid_parttable_get_id`: the GPT disk GUID, or the DOS disk identifier as 8 hex digits.
    public var id: String?
    public var sectorSize: Int
    /// In libblkid's order, only those inside the device.
    public var partitions: [Partition]
    /// What was dropped or left unread: partitions outside the device, a sketch budget reached.
    public var warnings: [String]
    /// Bytes copied from the device into the sketch, and the probes it took.
    public var copiedBytes: UInt64
    public var probes: Int

    /// The most bytes one `read` copies from the device (all rounds together). Past it the sketch
    /// stops growing: the result holds the partitions found so far and a warning says so.
    public static let copyBudget: UInt64 = 64 << 20
    /// The most probes one `read` makes before it gives up with `.unsettled`.
    public static let maxProbes = 128
    static let window: UInt64 = 1 << 20

    /// Reads the partition table of `device`, whose logical sector size is `sectorSize`; nil when
    /// libblkid finds none. A table libblkid rejects (no signature, both GPT headers bad) reads as
    /// blkid itself reports it: none, or "PMBR" with no partitions for a protective MBR whose GPT
    /// is unreadable. Partitions outside the device are left out, each with a warning.
    public static func read(_ device: any BlockDevice, sectorSize: Int = 512,
                            budget: UInt64 = copyBudget, maxProbes: Int = maxProbes) throws -> PartitionTable? {
        guard sectorSize >= 512, sectorSize <= 65536, sectorSize & (sectorSize - 1) == 0 else {
            throw PartitionTableError.invalidSectorSize(sectorSize)
        }
        _ = debugInitialized
        let sketch = try PartitionSketch(device, budget: budget)
        let size = device.size
        try sketch.copy(0..<window)
        try sketch.copy(size - min(size, window)..<size)
        var wholeGapsCopied = false
        for probes in 1...max(1, maxProbes) {
            guard var table = try probe(sketch, sectorSize: sectorSize) else { return nil }
            table.probes = probes
            var grew = false
            for partition in table.partitions {
                grew = try sketch.copy(partition.start..<partition.start + min(partition.size, window)) || grew
            }
            let gaps = extendedGaps(table.partitions)
            for gap in gaps {
                grew = try sketch.copy(gap.lowerBound..<gap.lowerBound + min(UInt64(gap.count), window)) || grew
                grew = try sketch.copy(gap.upperBound - min(UInt64(gap.count), window)..<gap.upperBound) || grew
            }
            if !grew, !wholeGapsCopied {
                wholeGapsCopied = true
                for gap in gaps { grew = try sketch.copy(gap) || grew }
            }
            if !grew {
                if sketch.exhausted {
                    table.warnings.append("copied the most bytes allowed (\(budget)) from the device before the table settled: partitions may be missing")
                }
                table.copiedBytes = sketch.copiedBytes
                return table
            }
        }
        throw PartitionTableError.unsettled(probes: maxProbes)
    }

    /// The ranges inside extended partitions that no logical partition covers.
    static func extendedGaps(_ partitions: [Partition]) -> [Range<UInt64>] {
        var gaps: [Range<UInt64>] = []
        for extended in partitions where extended.isExtended {
            var at = extended.start
            let inside = partitions.filter { $0.isLogical && $0.start >= extended.start && $0.start < extended.range.upperBound }
            for logical in inside.sorted(by: { $0.start < $1.start }) {
                if logical.start > at { gaps.append(at..<logical.start) }
                at = max(at, min(logical.range.upperBound, extended.range.upperBound))
            }
            if at < extended.range.upperBound { gaps.append(at..<extended.range.upperBound) }
        }
        return gaps
    }

    /// libblkid's debug mask is a process global set from LIBBLKID_DEBUG on the first
    /// `blkid_new_probe`: set it once here, so that concurrent first probes do not race on it.
    private static let debugInitialized: Void = blkid_init_debug(0)

    /// One probe of the sketch as it is now.
    static func probe(_ sketch: PartitionSketch, sectorSize: Int) throws(PartitionTableError) -> PartitionTable? {
        guard let pr = blkid_new_probe() else { throw .libblkid(call: "blkid_new_probe", code: 0) }
        defer { blkid_free_probe(pr) }
        let size = sketch.device.size
        // An area of size 0 means "to the end of the file" to libblkid, which is 0 here too.
        var rc = blkid_probe_set_device(pr, sketch.fd, 0, blkid_loff_t(size))
        guard rc == 0 else { throw .libblkid(call: "blkid_probe_set_device", code: Int(rc)) }
        // After set_device, which resets it.
        rc = blkid_probe_set_sectorsize(pr, UInt32(sectorSize))
        guard rc == 0 else { throw .libblkid(call: "blkid_probe_set_sectorsize", code: Int(rc)) }
        // A filesystem on the whole disk must not hide (or be taken for) a table.
        rc = blkid_probe_enable_superblocks(pr, 0)
        guard rc == 0 else { throw .libblkid(call: "blkid_probe_enable_superblocks", code: Int(rc)) }
        rc = blkid_probe_enable_partitions(pr, 1)
        guard rc == 0 else { throw .libblkid(call: "blkid_probe_enable_partitions", code: Int(rc)) }
        rc = blkid_probe_set_partitions_flags(pr, BLKID_PARTS_ENTRY_DETAILS)
        guard rc == 0 else { throw .libblkid(call: "blkid_probe_set_partitions_flags", code: Int(rc)) }
        rc = blkid_do_safeprobe(pr)
        switch rc {
        case 0: break
        case 1: return nil
        case -2: throw .ambivalent
        default: throw .libblkid(call: "blkid_do_safeprobe", code: Int(rc))
        }
        // The type as the probe found it; the binary probe below drops these values.
        var value: UnsafePointer<CChar>?
        let probedType = blkid_probe_lookup_value(pr, "PTTYPE", &value, nil) == 0 ? string(value) : nil
        // Probes again in binary mode: the list of partitions, owned by the probe.
        guard let list = blkid_probe_get_partitions(pr) else { return nil }
        var table = PartitionTable(type: "", id: nil, sectorSize: sectorSize, partitions: [], warnings: [],
                                   copiedBytes: 0, probes: 0)
        guard let top = blkid_partlist_get_table(list) else {
            // A protective MBR whose GPT is unreadable: libblkid names the type, with no table.
            guard let type = probedType else {
                throw .libblkid(call: "blkid_partlist_get_table", code: 0)
            }
            table.type = type
            return table
        }
        table.type = string(blkid_parttable_get_type(top)) ?? ""
        table.id = string(blkid_parttable_get_id(top))
        let count = blkid_partlist_numof_partitions(list)
        guard count >= 0 else { throw .libblkid(call: "blkid_partlist_numof_partitions", code: Int(count)) }
        for i in 0..<count {
            guard let par = blkid_partlist_get_partition(list, i) else {
                throw .libblkid(call: "blkid_partlist_get_partition", code: 0)
            }
            let number = Int(blkid_partition_get_partno(par))
            let tableType = string(blkid_parttable_get_type(blkid_partition_get_table(par))) ?? table.type
            // libblkid reports start and size in 512-byte sectors whatever the sector size.
            let start = blkid_partition_get_start(par)
            let length = blkid_partition_get_size(par)
            guard start >= 0, length >= 0,
                  case let (startBytes, o1) = UInt64(start).multipliedReportingOverflow(by: 512), !o1,
                  case let (sizeBytes, o2) = UInt64(length).multipliedReportingOverflow(by: 512), !o2,
                  case let (end, o3) = startBytes.addingReportingOverflow(sizeBytes), !o3, end <= size else {
                table.warnings.append("partition \(number) (\(tableType)) at 512-byte sector \(start), \(length) sectors long, "
                                      + "lies outside the device (\(size) bytes): left out")
                continue
            }
            let type = string(blkid_partition_get_type_string(par))
                ?? "0x" + String(UInt32(bitPattern: blkid_partition_get_type(par)), radix: 16)
            table.partitions.append(Partition(
                number: number, start: startBytes, size: sizeBytes, tableType: tableType, type: type,
                name: string(blkid_partition_get_name(par)), uuid: string(blkid_partition_get_uuid(par)),
                isExtended: blkid_partition_is_extended(par) != 0, isLogical: blkid_partition_is_logical(par) != 0))
        }
        return table
    }

    /// A C string libblkid owns, copied; nil for NULL or "".
    private static func string(_ pointer: UnsafePointer<CChar>?) -> String? {
        guard let pointer, pointer.pointee != 0 else { return nil }
        return String(cString: pointer)
    }
}
