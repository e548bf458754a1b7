#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Block

/// What `poolfs ls` prints about each volume, as a table or as JSON.
public struct VolumeReport: Codable, Sendable {
    public struct Layer: Codable, Sendable {
        public var path: String
        public var format: String
    }
    public struct SnapshotInfo: Codable, Sendable {
        public var id: String
        public var name: String
        public var file: String
        public var date: String
        public var virtualSize: UInt64
        public var vmStateSize: UInt64
        /// Why the snapshot cannot be read (a qcow2 snapshot table entry QEMU opens but cannot
        /// load), or nil.
        public var error: String? = nil
    }
    public var name: String
    /// The volume's file or device; nil for volumes with none on this host (iSCSI LUNs).
    public var path: String?
    public var format: String?
    public var virtualSize: UInt64?
    /// Bytes of the virtual disk that hold data.
    public var allocatedSize: UInt64?
    /// Bytes the image file occupies on the host.
    public var diskUsage: UInt64
    public var backingChain: [Layer]
    /// The external data files of the volume's chain, top first (qcow2 data_file).
    public var dataFiles: [String] = []
    public var snapshots: [SnapshotInfo]
    /// Why entries at the end of the qcow2 snapshot table could not be read, or nil.
    public var snapshotError: String? = nil
    /// Another program (a running VM, qemu-img, poolfs -o rw) holds the image for writing
    /// (QEMU's write lock): what is read may change meanwhile.
    public var inUseByWriter: Bool
    /// The volumes of the pool whose backing chain has this one below their top (at any depth):
    /// writing it would change what they read. While one of them is open through a mount, this
    /// volume refuses writers.
    public var backs: [String] = []
    /// What the pool knows of the volume beyond its image (a partition's type and start, a LUN's
    /// serial), as in its `user.poolfs.*` attributes.
    public var properties: [String: String] = [:]
    public var error: String?

    /// Reports on the volumes of one pool, each with the volumes it backs.
    public static func make(_ volumes: [OpenVolume]) -> [VolumeReport] {
        struct FileKey: Hashable { var device: UInt64, inode: UInt64 }
        var overlays: [FileKey: [String]] = [:]
        for volume in volumes {
            for layer in volume.image?.chain.dropFirst() ?? [] {
                guard let id = layer.hostFiles.first?.identity else { continue }
                overlays[FileKey(device: id.device, inode: id.inode), default: []].append(volume.name)
            }
        }
        return volumes.map { volume in
            var report = make(volume)
            report.backs = (overlays[FileKey(device: volume.identity.device, inode: volume.identity.inode)] ?? []).sorted()
            return report
        }
    }

    public static func make(_ volume: OpenVolume) -> VolumeReport {
        let image = volume.image
        return VolumeReport(
            name: volume.name, path: volume.path, format: image?.format.rawValue ?? volume.recognisedFormat,
            virtualSize: image?.virtualSize,
            allocatedSize: image == nil ? nil : volume.allocatedBytes(snapshot: nil),
            diskUsage: UInt64(volume.fileStat.st_blocks) * 512,
            backingChain: (image?.chain.dropFirst() ?? []).map { Layer(path: $0.path, format: $0.format.rawValue) },
            dataFiles: (image?.chain ?? []).compactMap(\.dataFilePath),
            snapshots: volume.snapshotFiles.map { file, s in
                SnapshotInfo(id: s.id, name: s.name, file: file, date: isoDate(s.dateSeconds),
                             virtualSize: image?.device(of: s)?.size ?? 0, vmStateSize: s.vmStateSize, error: s.problem)
            } + volume.poolSnapshots.map { file, device in
                // The pool's own (LVM, ZFS, RBD): named by the pool, with no qcow2 id; dated if the pool says.
                SnapshotInfo(id: "", name: file, file: file, date: volume.poolSnapshotDates[file].map { isoDate(UInt32(clamping: $0.tv_sec)) } ?? "",
                             virtualSize: (try? device.get().size) ?? 0, vmStateSize: 0)
            },
            snapshotError: image?.snapshotTableProblem,
            inUseByWriter: image?.hostFiles.first?.writerPresent ?? false,
            properties: Dictionary(volume.properties, uniquingKeysWith: { first, _ in first }),
            error: volume.error)
    }

    static func chainDescription(_ image: Image) -> String {
        image.chain.dropFirst().map { "\($0.path) (\($0.format.rawValue))" }.joined(separator: "\n")
    }

    static func isoDate(_ seconds: UInt32) -> String {
        var t = time_t(seconds)
        var parts = tm()
        gmtime_r(&t, &parts)
        var buffer = [CChar](repeating: 0, count: 32)
        let n = strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%SZ", &parts)
        return String(decoding: buffer[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    public static func json(_ reports: [VolumeReport]) -> String {
        let encoder = JSONEncoder()
        encoder.keyEncodingStrategy = .convertToSnakeCase
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        return String(decoding: (try? encoder.encode(reports)) ?? Data(), as: UTF8.self)
    }

    public static func table(_ reports: [VolumeReport]) -> String {
        var rows = [["VOLUME", "FORMAT", "VIRTUAL", "ALLOCATED", "DISK", "IN USE", "SNAPSHOTS", "BACKS", "BACKING / ERROR"]]
        for r in reports {
            let data = r.dataFiles.isEmpty ? "" : " [data file: " + r.dataFiles.joined(separator: ", ") + "]"
            let tail = r.error.map { "error: \($0)" }
                ?? r.backingChain.map { "\(($0.path as NSString).lastPathComponent) (\($0.format))" }.joined(separator: " -> ") + data
            // Names come from the pool and from images: escaped, so none reaches the terminal raw.
            rows.append([Printable.escaped(r.name), r.format ?? "-", r.virtualSize.map(human) ?? "-", r.allocatedSize.map(human) ?? "-",
                         human(r.diskUsage), r.inUseByWriter ? "writer" : "-", r.snapshots.isEmpty ? "-" : Printable.escaped(r.snapshots.map(\.file).joined(separator: ",")),
                         r.backs.isEmpty ? "-" : Printable.escaped(r.backs.joined(separator: ",")), Printable.controlsEscaped(tail)])
        }
        let widths = (0..<rows[0].count).map { c in rows.map { $0[c].count }.max() ?? 0 }
        return rows.map { row in
            row.enumerated().map { c, cell in c == row.count - 1 ? cell : cell.padding(toLength: widths[c], withPad: " ", startingAt: 0) }
                .joined(separator: "  ")
        }.joined(separator: "\n")
    }

    static func human(_ bytes: UInt64) -> String {
        let units = ["B", "K", "M", "G", "T", "P"]
        var value = Double(bytes)
        var unit = 0
        while value >= 1024, unit < units.count - 1 { value /= 1024; unit += 1 }
        return unit == 0 ? "\(bytes)B" : String(format: value < 10 ? "%.1f%@" : "%.0f%@", value, units[unit])
    }
}
