#if canImport(Glibc)
import Glibc
#endif
import Block
import Locking

/// A libvirt `logical` pool: an LVM volume group. Regular LVs are volumes; classic and thin
/// snapshots appear under the volume they were taken of (a snapshot of a thin snapshot too);
/// thin pools and internal LVs are hidden.
///
/// Two ways to read an LV, chosen per mount:
/// - **devices**: through device-mapper, `/dev/VG/LV`. An inactive LV is activated read-only on
///   its first open (never on lookup, getattr or readdir, whose sizes come from the report) and
///   deactivated again at unmount.
/// - **extents**: straight from the PVs, with no kernel state touched: linear and striped LVs
///   through the extent map, classic snapshots through their exception store
///   (`ClassicSnapshotDevice`), thin LVs and thin snapshots through the pool's metadata btrees
///   (`ThinPoolMetadata`). For hosts without device-mapper, `-o noactivate`, and disk images.
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
    /// `-o rw`: volumes (never snapshots) are activated writable and can be opened for writing.
    public let writable: Bool
    let runner: any CommandRunner
    /// Prepended to device paths: tests point it at a directory of regular files.
    let deviceRoot: String
    /// `-o cow_size=`: the copy-on-write space of a classic snapshot `poolfs snapshot create` takes.
    public let cowSize: CowSize
    /// The last lvs report, asked again after `reportLifetime`: new snapshots show within it.
    private let cached: RefreshedValue<Listing>
    /// LVs this mount activated (with whatever lvm2 activated alongside: origins, pools), in the
    /// order `release` deactivates them. Activations run one at a time.
    private let activated = Locked<[(lv: String, rank: Int)]>([])
    private let activating = Locked<Void>(())

    public var displayName: String { volumeGroup }
    public var statisticsPath: String { "/" }

    public init(volumeGroup: String, runner: any CommandRunner, mode: Mode, writable: Bool = false,
                reportLifetime: Double = 1, deviceRoot: String = "", cowSize: CowSize = .default) throws {
        self.volumeGroup = volumeGroup
        self.cowSize = cowSize
        self.writable = writable
        self.runner = runner
        self.mode = mode
        self.deviceRoot = deviceRoot
        cached = try RefreshedValue(lifetime: reportLifetime) { Listing(try VolumeGroupReport.query(volumeGroup, runner: runner)) }
    }

    /// A report with what every read asks of it worked out once: each volume's snapshots and
    /// layout token.
    struct Listing: Sendable {
        let report: VolumeGroupReport
        let snapshots: [String: [VolumeGroupReport.LogicalVolume]]
        let generations: [String: String]

        init(_ report: VolumeGroupReport) {
            self.report = report
            var snapshots: [String: [VolumeGroupReport.LogicalVolume]] = [:]
            for lv in report.volumes where lv.isSnapshot {
                if let volume = Self.volume(under: lv, in: report) { snapshots[volume, default: []].append(lv) }
            }
            self.snapshots = snapshots
            var generations: [String: String] = [:]
            // The thin id and the extents of the LV and of each snapshot: a revert replaces a thin
            // LV by another under the same name (another thin id) and takes a classic snapshot
            // again (maybe on other extents), with the same names and attributes.
            func layout(_ lv: VolumeGroupReport.LogicalVolume) -> String {
                "#\(lv.thinID.map(String.init) ?? "-") " + lv.segments.map { segment in
                    "\(segment.start)+\(segment.size):" + segment.ranges.map { "\($0.device):\($0.firstExtent)-\($0.lastExtent)" }.joined(separator: " ")
                }.joined(separator: ";")
            }
            for lv in report.volumes {
                let names = (snapshots[lv.name] ?? []).map { "\($0.name):\($0.attributes):\(layout($0))" }.joined(separator: ",")
                generations[lv.name] = "\(lv.size) \(lv.attributes) \(layout(lv)) [\(names)]"
            }
            self.generations = generations
        }

        /// The snapshots of `volume` and the name each shows as under `.snapshots/<volume>/`, which
        /// is also the NAME `poolfs snapshot` takes: the LV name, except for an LV named
        /// `<volume>+NAME` (as `poolfs snapshot create` names them, LV names being VG-wide), which
        /// shows as NAME unless another snapshot of the volume is an LV named NAME.
        func snapshotFiles(of volume: String) -> [(file: String, lv: VolumeGroupReport.LogicalVolume)] {
            let lvs = snapshots[volume] ?? []
            let names = Set(lvs.map(\.name))
            return lvs.map { lv in
                let prefix = volume + LogicalPool.snapshotSeparator
                guard lv.name.hasPrefix(prefix) else { return (lv.name, lv) }
                let short = String(lv.name.dropFirst(prefix.count))
                guard !short.isEmpty, !short.contains(LogicalPool.snapshotSeparator), !names.contains(short) else { return (lv.name, lv) }
                return (short, lv)
            }
        }

        /// The volume a snapshot's chain of origins ends at: a thin snapshot of a thin snapshot
        /// shows beside the first, since its origin is no volume of its own.
        static func volume(under snapshot: VolumeGroupReport.LogicalVolume, in report: VolumeGroupReport) -> String? {
            var origin = snapshot.origin
            for _ in 0..<64 {
                guard let current = origin, let next = report.volume(current) else { return nil }
                if !next.isSnapshot { return current }
                origin = next.origin
            }
            return nil
        }
    }

    /// The volume group as lvs last said.
    public func report() -> VolumeGroupReport { cached.value.report }

    public func volumeNames() throws -> [String] {
        cached.fresh.report.volumes.filter { !$0.isInternal && !$0.isSnapshot }.map(\.name).sorted()
    }

    /// A PV the LV lives on, so that mode, owner and times are a block device's. Not the LV's own
    /// device, which comes and goes with activation: the file a name stands for must not change
    /// when its first open activates it.
    public func volume(_ name: String) -> PoolVolume? {
        let report = report()
        guard let lv = report.volumes.first(where: { $0.name == name && !$0.isInternal && !$0.isSnapshot }) else { return nil }
        let path = statPath(of: lv, in: report)
        // A PV that went away leaves the LV listed: its reads fail, it does not vanish.
        return PoolVolume(path: path) ?? PoolVolume(path: path, status: stat())
    }

    func statPath(of lv: VolumeGroupReport.LogicalVolume, in report: VolumeGroupReport) -> String {
        var current = lv
        for _ in 0..<8 {
            if let device = current.segments.first?.ranges.first?.device { return deviceRoot + device }
            // A thin LV lives on its pool's data LV; a snapshot with no extents of its own, on its origin.
            let next = current.pool.flatMap { report.volume($0)?.dataVolume ?? $0 } ?? current.origin
            guard let next, let lv = report.volume(next) else { break }
            current = lv
        }
        return deviceRoot + (report.extentStart.keys.sorted().first ?? lv.path)
    }

    public func openImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        let report = report()
        guard let lv = report.volume(name) else { throw PoolError.notFound("\(volumeGroup)/\(name)") }
        return Image.wrapping(device(of: lv, in: report), path: lv.path)
    }

    public var writeRefusal: String? {
        mode == .devices ? nil : "\(volumeGroup): LVs are written through device-mapper only (not with -o noactivate, nor on a kernel without it); use -o cow for a writable view"
    }

    /// `-o rw`: the LV's device, opened for writing (activated writable first if it is not active).
    /// Snapshots are not volumes, so they never get here; reading LVs from their PVs never writes.
    public func openWritableImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        let report = report()
        guard let lv = report.volume(name), !lv.isInternal, !lv.isSnapshot else { throw PoolError.notFound("\(volumeGroup)/\(name)") }
        guard mode == .devices, writable else {
            throw Qcow2Error.writeRefused("\(volumeGroup)/\(name): LVs are written through device-mapper only (not with -o noactivate or without it)")
        }
        if !lv.isActive { try activate(lv, in: report) }
        return try Image.open(path: deviceRoot + lv.path, format: .raw, cache: cache, writable: true)
    }

    /// The LV's bytes, made on first read: nothing is activated or read before.
    func device(of lv: VolumeGroupReport.LogicalVolume, in report: VolumeGroupReport) -> DeferredDevice {
        let size = lv.isClassicSnapshot ? (lv.origin.flatMap { report.volume($0)?.size } ?? lv.size) : lv.size
        switch mode {
        case .devices:
            return DeferredDevice(size: size, statusMakesDevice: false) { [self] in
                if !lv.isActive { try activate(lv, in: report) }
                return RawImage(file: try HostFile(path: deviceRoot + lv.path))
            }
        case .extents:
            return DeferredDevice(size: size, statusMakesDevice: true) { [self] in
                var files: [String: HostFile] = [:]
                return try extentDevice(of: lv, in: report, depth: 0) { path in
                    if let file = files[path] { return file }
                    let file = try HostFile(path: deviceRoot + path)
                    files[path] = file
                    return file
                }
            }
        }
    }

    /// The LV read from its PVs. `open` gives each PV's file, opened once.
    func extentDevice(of lv: VolumeGroupReport.LogicalVolume, in report: VolumeGroupReport, depth: Int,
                      open: (String) throws -> HostFile) throws -> any BlockDevice {
        let full = "\(volumeGroup)/\(lv.name)"
        // Origins nest (a classic snapshot of a thin LV); the report cannot loop, but a bound is cheap.
        guard depth < 8 else { throw LogicalPoolError.inconsistent(full, "origins nest more than 8 deep") }
        if lv.type == "S" || lv.type == "O" { throw LogicalPoolError.merging(full) }
        if lv.isClassicSnapshot {
            if lv.state == "I" { throw LogicalPoolError.invalidated(full) }
            guard let originName = lv.origin, let origin = report.volume(originName) else {
                throw LogicalPoolError.inconsistent(full, "its origin is not in the report")
            }
            var cow = lv
            cow.size = 0
            for segment in lv.segments {
                let (size, overflow) = cow.size.addingReportingOverflow(segment.size)
                guard !overflow else { throw LogicalPoolError.inconsistent(full, "its segments add up past 2^64 bytes") }
                cow.size = size
            }
            return try ClassicSnapshotDevice(
                origin: extentDevice(of: origin, in: report, depth: depth + 1, open: open),
                cow: ExtentMappedDevice(volume: cow, in: report, open: open), name: full)
        }
        if lv.isThin {
            guard let thinID = lv.thinID, let poolName = lv.pool, let pool = report.volume(poolName),
                  let dataName = pool.dataVolume, let data = report.volume(dataName),
                  let metadataName = pool.metadataVolume, let metadata = report.volume(metadataName) else {
                throw LogicalPoolError.inconsistent(full, "its thin pool, the pool's data or metadata LV, or its thin id is not in the report")
            }
            let mapping = try ThinPoolMetadata(metadata: ExtentMappedDevice(volume: metadata, in: report, open: open),
                                               expectedTransactionID: pool.transactionID, name: "\(volumeGroup)/\(poolName)")
            return try mapping.device(id: thinID, size: lv.size, data: ExtentMappedDevice(volume: data, in: report, open: open))
        }
        return try ExtentMappedDevice(volume: lv, in: report, open: open)
    }

    /// Activates an LV for the time of the mount, read-only (in an `-o rw` mount, snapshots
    /// only), without changing its permission in the metadata: `-K` also activates thin snapshots, which LVM flags to skip activation;
    /// `--ignoremonitoring` starts no dmeventd; `-y` answers lvm2's question whether activating
    /// a classic snapshot may activate its origin and the origin's other snapshots (it must:
    /// they are one dm stack).
    /// - Classic snapshots and their origins go in `read_only_volume_list`, so their tables are
    ///   read-only.
    /// - A thin LV cannot: lvm2 reloads the pool with the thin LV's read-only flag and the kernel
    ///   refuses a thin-pool in a read-only table. It is activated as it is, then its block device
    ///   is made read-only (`blockdev --setro`, the kernel's flag, not the metadata's).
    /// What lvm2 activated (origins, snapshots, the pool) is taken from the reports before and
    /// after, so that `release` deactivates exactly that.
    func activate(_ lv: VolumeGroupReport.LogicalVolume, in report: VolumeGroupReport) throws {
        let full = "\(volumeGroup)/\(lv.name)"
        try activating.withLock { _ in
            guard !activated.withLock({ $0.contains { $0.lv == full } }) else { return }
            let before = try activeVolumes()
            do {
                var command = ["lvchange", "-ay", "-K", "-y", "--ignoremonitoring"]
                let readOnly = !writable || lv.isSnapshot
                if !lv.isThin {
                    // The origin and every classic snapshot of it are activated together.
                    let origin = lv.isClassicSnapshot ? lv.origin ?? lv.name : lv.name
                    let snapshots = report.volumes.filter { $0.isClassicSnapshot && $0.origin == origin }.map(\.name)
                    let stack = (writable ? [] : [origin]) + snapshots
                    let names = stack.map { "\"\(volumeGroup)/\($0)\"" }.joined(separator: ", ")
                    command += ["--config", "activation { read_only_volume_list = [ \(names) ] }"]
                }
                _ = try runner.run(command + [full])
                if lv.isThin && readOnly { _ = try runner.run(["blockdev", "--setro", deviceRoot + lv.path]) }
            } catch {
                record(newlyActive: (try? activeVolumes()).map { $0.subtracting(before) } ?? [], report: report)
                throw LogicalPoolError.activation(full, "\(error)")
            }
            record(newlyActive: try activeVolumes().subtracting(before), report: report)
        }
    }

    /// Names of the VG's active LVs now, internal ones included.
    private func activeVolumes() throws -> Set<String> {
        Set(try VolumeGroupReport.query(volumeGroup, runner: runner).volumes.filter(\.isActive).map(\.name))
    }

    /// Adds LVs to the deactivation list: snapshots and thin LVs before the origins and pools
    /// they hold open. Bracketed internal LVs go with their pool.
    private func record(newlyActive: Set<String>, report: VolumeGroupReport) {
        activated.withLock { list in
            for name in newlyActive.sorted() where !name.hasPrefix("[") && !list.contains(where: { $0.lv.hasSuffix("/" + name) }) {
                let lv = report.volume(name)
                list.append(("\(volumeGroup)/\(name)", lv?.isSnapshot == true ? 0 : lv?.type == "t" ? 2 : 1))
            }
        }
    }

    public func release() -> [String] {
        let lvs = activated.withLock { list in defer { list.removeAll() }; return list }
        var failures: [String] = []
        // A stable sort: in order of activation within each rank.
        for (lv, _) in lvs.enumerated().sorted(by: { ($0.element.rank, $0.offset) < ($1.element.rank, $1.offset) }).map(\.element) {
            do { _ = try runner.run(["lvchange", "-an", "-y", lv]) } catch { failures.append("deactivating \(lv): \(error)") }
        }
        return failures
    }

    /// Through device-mapper, an LV device held open is an LV in use (`poolfs snapshot` skips it,
    /// lvm2 defers a merge into it): a mount holds it only while a file of it is open.
    public var closesIdleVolumes: Bool { mode == .devices }

    /// The LV's layout and the names of its snapshots: either changing reopens the volume.
    public func generation(of name: String) -> String? {
        cached.value.generations[name]
    }

    /// Each snapshot under the name `snapshotFiles` gives it: `web+class` under `web` is `class`.
    public func snapshots(of name: String) -> [PoolSnapshot] {
        let listing = cached.value
        return listing.snapshotFiles(of: name).map { file, lv in
            let device = device(of: lv, in: listing.report)
            return PoolSnapshot(name: file) { device }
        }
    }
}

extension VolumeGroupReport {
    func volume(_ name: String) -> LogicalVolume? { volumes.first { $0.name == name } }
}

public enum LogicalPoolError: Error, Equatable, CustomStringConvertible {
    case activation(String, String)
    case merging(String)
    case invalidated(String)
    case inconsistent(String, String)

    public var description: String {
        switch self {
        case .activation(let lv, let why):
            return "cannot activate \(lv) read-only (\(why)); mount with -o noactivate to read it from its PVs"
        case .merging(let lv):
            return "\(lv) is merging a snapshot into its origin: its bytes are neither the snapshot's nor the origin's until lvm2 finishes"
        case .invalidated(let lv):
            return "\(lv) is an invalidated snapshot (its copy-on-write space overflowed, or lvm2 dropped it): it has no data to read"
        case .inconsistent(let lv, let why):
            return "\(lv): the LVM report is inconsistent: \(why)"
        }
    }
}
