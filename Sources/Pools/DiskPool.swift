#if canImport(Glibc)
import Glibc
#endif
import Block
import Locking

/// A libvirt `disk` pool: the partitions of one disk are its volumes. The disk is a block device
/// or a disk image file (raw, or qcow2 read through the engine); its table is read through
/// libblkid (`PartitionTable`).
///
/// Volumes are named as the kernel and libvirt name partitions: `sda1` for /dev/sda, `loop0p1`
/// and `nvme0n1p2` for devices whose names end in a digit, `part1` for an image file. An
/// extended partition is no volume (its bytes are its logical partitions, which are).
///
/// The table is read again once the last reading is older than a second, on a thread of its own
/// (reads never wait for it), so a table changed while mounted shows within the attribute
/// timeout. A partition's identity is the disk's and its start and size: a partition moved or
/// resized is another file to the kernel.
///
/// `-o rw` writes a partition's bytes, and nothing outside them, through one writer of the disk
/// shared by every partition open for writing (a qcow2 image has one writer at a time).
public final class DiskPool: Pool {
    /// The disk, absolute.
    public let source: String
    let isBlockDevice: Bool
    let cache: BlockCache
    private let cached: RefreshedValue<Listing>
    /// The disk as last opened for reading, reused while its file is unchanged.
    private let reading: Locked<(identity: FileIdentity, image: Image)?>
    /// The disk opened for writing, while partitions are open for writing, and how many.
    private let writing = Locked<(image: Image, writer: any VolumeWriter, users: Int)?>(nil)

    public var displayName: String { source }
    public var statisticsPath: String { "/" }

    /// What one reading of the disk found.
    struct Listing: Sendable {
        var status: stat
        var image: Image?
        var table: PartitionTable?
        var volumes: [String: Partition]
        /// Why the disk or its table cannot be read, if so.
        var problem: String?
    }

    public init(source: String, cache: BlockCache = BlockCache(capacityBytes: 16 << 20)) throws {
        guard let resolved = realpath(source, nil) else { throw PoolError.notFound(source) }
        self.source = String(cString: resolved)
        free(resolved)
        var st = stat()
        guard stat(self.source, &st) == 0 else { throw PoolError.notFound(source) }
        let type = st.st_mode & S_IFMT
        guard type == S_IFBLK || type == S_IFREG else {
            throw PoolError.libvirt("\(source) is neither a block device nor a disk image file")
        }
        isBlockDevice = type == S_IFBLK
        self.cache = cache
        reading = Locked(nil)
        let disk = self.source, blockDevice = isBlockDevice, reuse = reading
        cached = try RefreshedValue(lifetime: 1) {
            Self.list(disk, isBlockDevice: blockDevice, cache: cache, reuse: reuse)
        }
    }

    /// Opens the disk (again only if its file changed) and reads its table.
    static func list(_ disk: String, isBlockDevice: Bool, cache: BlockCache,
                     reuse: Locked<(identity: FileIdentity, image: Image)?>) -> Listing {
        var st = stat()
        guard stat(disk, &st) == 0 else {
            return Listing(status: st, image: nil, table: nil, volumes: [:], problem: "cannot be stat'ed: \(String(cString: strerror(errno)))")
        }
        let identity = FileIdentity(st)
        let image: Image
        if let known = reuse.withLock({ $0 }), known.identity == identity || isBlockDevice && known.identity.inode == identity.inode {
            image = known.image
        } else {
            do {
                image = try Image.open(path: disk, format: isBlockDevice ? .raw : nil, cache: cache)
            } catch {
                return Listing(status: st, image: nil, table: nil, volumes: [:], problem: "\(error)")
            }
            reuse.withLock { $0 = (identity, image) }
        }
        do {
            guard let table = try PartitionTable.read(image.live) ?? PartitionTable.read(image.live, sectorSize: 4096) else {
                return Listing(status: st, image: image, table: nil, volumes: [:], problem: "no partition table that libblkid knows")
            }
            var volumes: [String: Partition] = [:]
            for partition in table.partitions where !partition.isExtended {
                volumes[volumeName(disk, isBlockDevice: isBlockDevice, number: partition.number)] = partition
            }
            return Listing(status: st, image: image, table: table, volumes: volumes, problem: nil)
        } catch {
            return Listing(status: st, image: image, table: nil, volumes: [:], problem: "\(error)")
        }
    }

    /// `sda1`, `loop0p1`, `nvme0n1p2` (a device name that ends in a digit takes a `p`), or
    /// `part1` for an image file.
    static func volumeName(_ disk: String, isBlockDevice: Bool, number: Int) -> String {
        guard isBlockDevice else { return "part\(number)" }
        let base = disk.split(separator: "/").last.map(String.init) ?? disk
        return base + (base.last?.isNumber == true ? "p" : "") + "\(number)"
    }

    public func volumeNames() throws -> [String] {
        let listing = cached.fresh
        return listing.volumes.sorted { $0.value.number < $1.value.number }.map(\.key)
    }

    /// The disk's owner, mode and times; the partition's size; an inode number of the disk's and
    /// the partition's place.
    public func volume(_ name: String) -> PoolVolume? {
        let listing = cached.value
        guard let partition = listing.volumes[name] else { return nil }
        var st = listing.status
        st.st_size = Int(clamping: partition.size)
        st.st_blocks = 0
        st.st_ino = UInt(truncatingIfNeeded: Self.identity(inode: UInt64(st.st_ino), partition))
        return PoolVolume(path: nil, status: st)
    }

    /// FNV-1a over the disk's inode number and the partition's number, start and size.
    static func identity(inode: UInt64, _ partition: Partition) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for value in [inode, UInt64(partition.number), partition.start, partition.size] {
            for shift in stride(from: 0, to: 64, by: 8) {
                hash = (hash ^ ((value >> UInt64(shift)) & 0xff)) &* 0x100_0000_01b3
            }
        }
        return hash
    }

    /// The partition's number, type, label, UUID and start sector.
    public func properties(of name: String) -> [(key: String, value: String)] {
        let listing = cached.value
        guard let table = listing.table, let p = listing.volumes[name] else { return [] }
        var properties: [(key: String, value: String)] = [
            ("partition_table", table.type),
            ("partition_number", "\(p.number)"),
            ("partition_type", p.type),
            ("start_sector", "\(p.start / UInt64(table.sectorSize))"),
            ("sector_size", "\(table.sectorSize)"),
        ]
        if let label = p.name { properties.append(("partition_label", label)) }
        if let uuid = p.uuid { properties.append(("partition_uuid", uuid)) }
        return properties
    }

    /// A moved or resized partition, or a disk opened again, reopens the volume.
    public func generation(of name: String) -> String? {
        let listing = cached.value
        guard let p = listing.volumes[name] else { return nil }
        let image = listing.image.map { "\(ObjectIdentifier($0).hashValue)" } ?? "-"
        return "\(p.number) \(p.start) \(p.size) \(image)"
    }

    public func openImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        let listing = cached.value
        guard let partition = listing.volumes[name], let image = listing.image else { throw PoolError.notFound("\(source): \(name)") }
        return Image.wrapping(try PartitionDevice(image.live, start: partition.start, size: partition.size),
                              path: "\(source) partition \(partition.number)")
    }

    public var writeRefusal: String? { nil }

    public var problem: String? { cached.value.problem.map { "\(source): \($0): the pool is empty" } }

    /// The partition in the disk opened for writing (shared by every partition being written).
    public func openWritableImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        guard let partition = cached.value.volumes[name] else { throw PoolError.notFound("\(source): \(name)") }
        let disk = try writing.withLock { open in
            if let current = open {
                open!.users = current.users + 1
                return current.image
            }
            let image = try Image.open(path: source, format: isBlockDevice ? .raw : nil, cache: self.cache, writable: true)
            open = (image, try image.makeWriter(), 1)
            return image
        }
        do {
            return Image.wrapping(try PartitionDevice(disk.live, start: partition.start, size: partition.size),
                                  path: "\(source) partition \(partition.number)")
        } catch {
            try? releaseWriter()
            throw error
        }
    }

    /// Writes within the partition, through the disk's writer.
    public func makeWriter(_ name: String, image: Image) throws -> any VolumeWriter {
        guard let window = image.live as? PartitionDevice, let shared = writing.withLock({ $0?.writer }) else {
            throw Qcow2Error.writeRefused("\(source): \(name) was not opened for writing")
        }
        return PartitionWriter(base: shared, start: window.start, size: window.size) { [self] in try releaseWriter() }
    }

    /// One partition stopped writing; the last one closes the disk's writer.
    private func releaseWriter() throws {
        let last: (any VolumeWriter)? = writing.withLock { open in
            guard let current = open else { return nil }
            if current.users > 1 {
                open!.users = current.users - 1
                return nil
            }
            open = nil
            return current.writer
        }
        try last?.close()
    }
}

/// Writes into one partition of a disk's writer: offsets moved by the partition's start, and
/// nothing past its end.
final class PartitionWriter: VolumeWriter {
    let base: any VolumeWriter
    let start: UInt64
    let size: UInt64
    private let onClose: @Sendable () throws -> Void
    private let closed = Locked(false)

    init(base: any VolumeWriter, start: UInt64, size: UInt64, onClose: @escaping @Sendable () throws -> Void) {
        self.base = base
        self.start = start
        self.size = size
        self.onClose = onClose
    }

    private func check(_ offset: UInt64, _ length: UInt64) throws {
        guard !closed.withLock({ $0 }) else { throw Qcow2Error.writeRefused("the partition is closed for writing") }
        guard offset <= size, length <= size - offset else {
            throw Qcow2Error.writeRefused("\(length) bytes at \(offset) run past the end of the partition (\(size) bytes)")
        }
    }

    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try check(offset, UInt64(data.count))
        try base.write(data, at: start + offset)
    }

    func zero(at offset: UInt64, length: UInt64) throws {
        try check(offset, length)
        try base.zero(at: start + offset, length: length)
    }

    func flush() throws {
        try check(0, 0)
        try base.flush()
    }

    func close() throws {
        let first = closed.withLock { closed in
            defer { closed = true }
            return !closed
        }
        guard first else { return }
        try base.flush()
        try onClose()
    }
}
