#if canImport(Glibc)
import Glibc
#endif
import Qcow2
import Synchronization

/// A libvirt `logical` pool: an LVM volume group. Regular LVs are volumes; classic and thin
/// snapshots appear under their origin; thin pools and internal LVs are hidden.
///
/// With device-mapper, volumes are read from their devices (/dev/VG/LV) while active. Without it
/// (no kernel support, or `-o noactivate`), linear and striped LVs are read straight from their
/// PVs through the extent map, and snapshots say why they cannot be read.
public final class LogicalPool: Pool {
    public enum Mode: Sendable, Equatable {
        case devices
        case extents

        /// Extents when asked, or when this kernel has no device-mapper: the control node can
        /// exist (lvm2 makes it) while opening it fails with ENODEV.
        public static func forThisHost(noactivate: Bool) -> Mode {
            if noactivate { return .extents }
            let control = Glibc.open("/dev/mapper/control", O_RDWR | O_CLOEXEC)
            guard control >= 0 else { return .extents }
            close(control)
            return .devices
        }
    }

    public let volumeGroup: String
    public let mode: Mode
    let runner: any CommandRunner
    /// Prepended to device paths: tests point it at a directory of regular files.
    let deviceRoot: String
    /// The last lvs report, asked again after `reportLifetime`: new snapshots show within it.
    private let cached: RefreshedValue<VolumeGroupReport>
    /// LVs this mount activated, deactivated again by `release`.
    private let activated = Mutex<[String]>([])

    public var displayName: String { volumeGroup }
    public var statisticsPath: String { "/" }

    public init(volumeGroup: String, runner: any CommandRunner, mode: Mode, reportLifetime: Double = 1,
                deviceRoot: String = "") throws {
        self.volumeGroup = volumeGroup
        self.runner = runner
        self.mode = mode
        self.deviceRoot = deviceRoot
        cached = try RefreshedValue(lifetime: reportLifetime) { try VolumeGroupReport.query(volumeGroup, runner: runner) }
    }

    /// The volume group as lvs last said.
    public func report() -> VolumeGroupReport { cached.value }

    func volume(_ name: String) -> VolumeGroupReport.LogicalVolume? {
        report().volumes.first { $0.name == name && !$0.isInternal && !$0.isSnapshot }
    }

    public func volumeNames() throws -> [String] {
        report().volumes.filter { !$0.isInternal && !$0.isSnapshot }.map(\.name).sorted()
    }

    public func volumePath(_ name: String) -> String? {
        guard let lv = volume(name) else { return nil }
        switch mode {
        case .devices: return deviceRoot + lv.path
        case .extents: return deviceRoot + (lv.segments.first?.ranges.first?.device ?? lv.path)
        }
    }

    public func openImage(_ name: String, path: String, cache: BlockCache) throws -> Image {
        let report = report()
        guard let lv = report.volumes.first(where: { $0.name == name }) else {
            throw PoolError.notFound("\(volumeGroup)/\(name)")
        }
        return try open(lv, in: report)
    }

    func open(_ lv: VolumeGroupReport.LogicalVolume, in report: VolumeGroupReport) throws -> Image {
        switch mode {
        case .devices:
            if lv.attributes.count > 4, Array(lv.attributes)[4] != "a" { try activate(lv) }
            return try Image.open(path: deviceRoot + lv.path, format: .raw, cache: BlockCache(capacityBytes: 0))
        case .extents:
            var files: [String: HostFile] = [:]
            let root = deviceRoot
            let device = try ExtentMappedDevice(volume: lv, in: report) { path in
                if let file = files[path] { return file }
                let file = try HostFile(path: root + path)
                files[path] = file
                return file
            }
            return Image.wrapping(device, path: lv.path)
        }
    }

    /// Activates an LV read-only for the time of the mount: `read_only_volume_list` makes the
    /// device read-only without changing the LV's permission in the metadata; `-K` also activates
    /// thin snapshots, which LVM flags to skip activation.
    func activate(_ lv: VolumeGroupReport.LogicalVolume) throws {
        let full = "\(volumeGroup)/\(lv.name)"
        let already = activated.withLock { $0.contains(full) }
        guard !already else { return }
        do {
            _ = try runner.run(["lvchange", "-ay", "-K", "--config",
                                "activation { read_only_volume_list = [ \"\(full)\" ] }", full])
        } catch {
            throw LogicalPoolError.activation(full, "\(error)")
        }
        activated.withLock { $0.append(full) }
    }

    public func release() -> [String] {
        let lvs = activated.withLock { list in defer { list.removeAll() }; return list }
        var failures: [String] = []
        for lv in lvs.reversed() {
            do { _ = try runner.run(["lvchange", "-an", lv]) } catch { failures.append("deactivating \(lv): \(error)") }
        }
        return failures
    }

    /// The LV's layout and the names of its snapshots: either changing reopens the volume.
    public func generation(of name: String) -> String? {
        let volumes = report().volumes
        guard let lv = volumes.first(where: { $0.name == name }) else { return nil }
        let snapshots = volumes.filter { $0.isSnapshot && $0.origin == name }.map(\.name)
        return "\(lv.size) \(lv.attributes) \(lv.segments.map { "\($0.start)+\($0.size):\($0.ranges)" }) \(snapshots)"
    }

    public func snapshots(of name: String) -> [PoolSnapshot] {
        let report = report()
        return report.volumes.filter { $0.isSnapshot && $0.origin == name }.map { lv in
            let mode = self.mode
            let group = volumeGroup
            let pool = self
            return PoolSnapshot(name: lv.name) {
                guard mode == .devices else { throw LogicalPoolError.snapshotNeedsDeviceMapper("\(group)/\(lv.name)") }
                return try pool.open(lv, in: report).live
            }
        }
    }
}

public enum LogicalPoolError: Error, Equatable, CustomStringConvertible {
    case activation(String, String)
    case snapshotNeedsDeviceMapper(String)

    public var description: String {
        switch self {
        case .activation(let lv, let why):
            return "cannot activate \(lv) read-only (\(why)); mount with -o noactivate to read it from its PVs"
        case .snapshotNeedsDeviceMapper(let lv):
            return "\(lv) is an LVM snapshot: reading it needs device-mapper, which this host lacks or -o noactivate turned off"
        }
    }
}
