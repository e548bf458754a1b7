#if canImport(Glibc)
import Glibc
#endif
import FuseKit
import Pools
import Block

/// `.partitions/`: the partitions of every volume and snapshot as files of their own, so that
/// `mount -o loop` needs no offset: `.partitions/<volume>/part<N>` and
/// `.partitions/.snapshots/<volume>/<snapshot>/part<N>`.
///
/// Every volume has a directory there, as in `.snapshots/`; a table is read (through libblkid,
/// `PartitionTable`) only when someone looks inside a volume's or snapshot's directory, and
/// kept with the opened volume, so it is read again when the volume changes. A partition file
/// reads its volume's bytes through a window (`PartitionDevice`); with `-o cow` it writes into
/// its volume's overlay, with `-o rw` through its volume's writer, within its range only.

/// Names of partition files: `part<N>`, N the partition number.
enum PartitionNames {
    static func file(_ number: Int) -> String { "part\(number)" }

    static func number(_ file: String) -> Int? {
        guard file.hasPrefix("part"), let n = Int(file.dropFirst(4)), n > 0, file == Self.file(n) else { return nil }
        return n
    }
}

/// A partition file resolved: the partition, the window onto its disk, and where that disk is.
struct PartitionFile {
    let volume: OpenVolume
    /// The volume or snapshot node whose bytes the partition is part of.
    let holder: Node
    let table: PartitionTable
    let partition: Partition
    let device: PartitionDevice
}

extension PoolFileSystem {
    /// The volume or snapshot node a partition lies in, and its disk: the live disk or a snapshot's.
    func holderDisk(_ volume: OpenVolume, snapshot file: String?) -> Result<any BlockDevice, Errno> {
        guard let file else {
            guard let image = volume.image else { return .failure(.io) }
            return .success(image.live)
        }
        if let snapshot = volume.snapshot(file: file) {
            return volume.image?.device(of: snapshot).map { .success($0) } ?? .failure(.io)
        }
        if let pooled = volume.poolSnapshots.first(where: { $0.file == file }) {
            return pooled.device.mapError { _ in .io }
        }
        return .failure(.noEntry)
    }

    /// The table of a volume's live disk or of one of its snapshots; nil when it has none.
    func partitionTable(_ volume: OpenVolume, snapshot file: String?) -> Result<PartitionTable?, Errno> {
        holderDisk(volume, snapshot: file).flatMap { disk in
            volume.partitionTable(snapshot: file, device: disk).mapError { why in
                Log.warning("volume \(volume.name)\(file.map { " snapshot " + $0 } ?? ""): its partition table cannot be read: \(why)")
                return .io
            }
        }
    }

    func resolvePartitionNode(_ node: Node) -> Result<Resolved, Errno> {
        func directory(_ volume: OpenVolume) -> Result<Resolved, Errno> {
            var a = directoryAttributes(from: volume.fileStat)
            a.mode = S_IFDIR | 0o555
            return .success(.directory(a))
        }
        switch node {
        case .partitionDirectory(let name), .partitionSnapshotVolume(let name):
            guard let volume = store.volume(name) else { return .failure(.noEntry) }
            return directory(volume)
        case .partitionSnapshotDirectory(let key, let file):
            return store.volume(key).flatMap { volume in
                volume.snapshot(file: file) != nil || volume.poolSnapshots.contains { $0.file == file } ? directory(volume) : .failure(.noEntry)
            }
        case .partition(let key, let file, let number):
            return store.volume(key).flatMap { volume in
                partitionFile(volume, snapshot: file, number: number).map { .partition($0) }
            }
        default:
            return .failure(.noEntry)
        }
    }

    func partitionFile(_ volume: OpenVolume, snapshot file: String?, number: Int) -> Result<PartitionFile, Errno> {
        holderDisk(volume, snapshot: file).flatMap { disk in
            partitionTable(volume, snapshot: file).flatMap { table in
                guard let table, let partition = table.partitions.first(where: { $0.number == number && !$0.isExtended }) else {
                    return .failure(.noEntry)
                }
                do {
                    let window = try PartitionDevice(disk, start: partition.start, size: partition.size)
                    let holder: Node = file.map { .snapshot(volume.key, file: $0) } ?? .volume(volume.key)
                    return .success(PartitionFile(volume: volume, holder: holder, table: table, partition: partition, device: window))
                } catch {
                    Log.error("volume \(volume.name): partition \(number): \(error)")
                    return .failure(.io)
                }
            }
        }
    }

    /// The child `name` of a directory under `.partitions/`, if it exists now.
    func partitionChild(of parent: Node, named name: String) -> Node? {
        switch parent {
        case .partitions where name == Self.snapshotsName:
            return .partitionSnapshots
        case .partitions:
            return store.volume(name) == nil ? nil : .partitionDirectory(volume: name)
        case .partitionSnapshots:
            return store.volume(name) == nil ? nil : .partitionSnapshotVolume(volume: name)
        case .partitionSnapshotVolume(let volumeName):
            guard let volume = store.volume(volumeName) else { return nil }
            return .partitionSnapshotDirectory(volume.key, file: name)
        case .partitionDirectory(let volumeName):
            guard let volume = store.volume(volumeName), let number = PartitionNames.number(name) else { return nil }
            return .partition(volume.key, snapshot: nil, number: number)
        case .partitionSnapshotDirectory(let key, let file):
            guard let number = PartitionNames.number(name) else { return nil }
            return .partition(key, snapshot: file, number: number)
        default:
            return nil
        }
    }

    /// The entries of a directory under `.partitions/`: every volume (as in `.snapshots/`), every
    /// snapshot of a volume, and the partitions of a disk, read now.
    func partitionChildren(of node: Node) -> Result<[(name: String, node: Node?, mode: UInt32)], Errno> {
        /// A disk that cannot be read (an overflowed snapshot, a failing device) lists no
        /// partitions, and says why in the log: a `find` over the mount goes on past it.
        func partitions(_ volume: OpenVolume, _ file: String?) -> Result<[(name: String, node: Node?, mode: UInt32)], Errno> {
            let table = (try? partitionTable(volume, snapshot: file).get()) ?? nil
            return .success((table?.partitions ?? []).filter { !$0.isExtended }.map { p in
                (PartitionNames.file(p.number), .partition(volume.key, snapshot: file, number: p.number), S_IFREG)
            })
        }
        switch node {
        case .partitions:
            return .success([(Self.snapshotsName, .partitionSnapshots, S_IFDIR)]
                + store.volumeNames().map { ($0, .partitionDirectory(volume: $0), S_IFDIR) })
        case .partitionSnapshots:
            return .success(store.volumeNames().map { ($0, .partitionSnapshotVolume(volume: $0), S_IFDIR) })
        case .partitionSnapshotVolume(let name):
            guard store.volumeNames().contains(name), let volume = store.volume(name) else { return .failure(.noEntry) }
            let files = volume.snapshotFiles.map(\.file) + volume.poolSnapshots.map(\.file)
            return .success(files.map { ($0, .partitionSnapshotDirectory(volume.key, file: $0), S_IFDIR) })
        case .partitionDirectory(let name):
            guard let volume = store.volume(name) else { return .failure(.noEntry) }
            return partitions(volume, nil)
        case .partitionSnapshotDirectory(let key, let file):
            return store.volume(key).flatMap { partitions($0, file) }
        default:
            return .failure(.notDirectory)
        }
    }

    /// A partition file: its volume's owner and times, read-only in a snapshot (unless `-o cow`).
    func partitionAttributes(_ p: PartitionFile) -> Attributes {
        let readOnly = cow == nil && (p.holder != .volume(p.volume.key) || !store.writesImages)
        var a = attributes(type: S_IFREG, from: p.volume.fileStat, permissions: readOnly ? 0o7555 : 0o7777)
        a.size = p.device.size
        let snapshot: String? = if case .snapshot(_, let file) = p.holder { file } else { nil }
        a.blocks = (p.volume.allocatedBytes(partition: p.partition.number, snapshot: snapshot, device: p.device) + 511) / 512
        return a
    }

    func partitionExtendedAttributes(_ p: PartitionFile) -> [(name: String, value: String)] {
        var attributes: [(name: String, value: String)] = [
            ("user.poolfs.format", "raw"),
            ("user.poolfs.virtual_size", "\(p.device.size)"),
            ("user.poolfs.partition_table", p.table.type),
            ("user.poolfs.partition_number", "\(p.partition.number)"),
            ("user.poolfs.partition_type", p.partition.type),
            ("user.poolfs.start_sector", "\(p.partition.start / UInt64(p.table.sectorSize))"),
            ("user.poolfs.sector_size", "\(p.table.sectorSize)"),
        ]
        if let name = p.partition.name { attributes.append(("user.poolfs.partition_label", name)) }
        if let uuid = p.partition.uuid { attributes.append(("user.poolfs.partition_uuid", uuid)) }
        return attributes
    }

    /// Where writes to `node` go with `-o cow`: the overlay of the volume or snapshot it is part
    /// of (a partition shares its volume's), at `start` in that disk, up to `size` bytes. Worked
    /// out from the node and the device it resolved to (a partition's window onto its disk), so
    /// nothing is resolved again.
    func overlayTarget(_ node: Node, device: any BlockDevice) -> (holder: Node, start: UInt64, size: UInt64, base: any BlockDevice) {
        guard case .partition(let key, let file, _) = node, let window = device as? PartitionDevice else {
            return (node, 0, device.size, device)
        }
        let holder: Node = file.map { .snapshot(key, file: $0) } ?? .volume(key)
        return (holder, window.start, window.size, window.parent)
    }
}
