#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// `poolfs snapshot create|revert|delete` on an LVM volume group, with lvm2's own commands run
/// through the pool's `CommandRunner` (each under its time limit).
///
/// Names: LV names are VG-wide, so the snapshot NAME of volume VOL is the LV `VOL+NAME`, shown as
/// `.snapshots/VOL/NAME` (`Listing.snapshotFiles`). NAME may not contain `+`, so the mapping goes
/// both ways: `a+b` + `c` and `a` + `b+c` cannot both be made. A snapshot made by hand under another
/// LV name shows, and is named here, by its LV name.
///
/// - create: a thin LV gets a thin snapshot in its pool (flagged to skip activation, as lvm2 does
///   by default); any other LV a classic snapshot of `-o cow_size` (`CowSize`).
/// - revert, classic: `lvconvert --merge` into the origin (activated for it if it was not, and
///   deactivated after), then the snapshot is taken again under its name with the same COW size.
/// - revert, thin: the LV becomes a new thin snapshot of the kept one (`revertThin`).
/// - delete: `lvremove`.
/// A volume or snapshot whose device is open (a running VM) is skipped with what holds it; lvm2
/// would defer a merge into an open origin to its next activation without saying so at exit.
/// Nothing works without device-mapper: lvm2 activates LVs to make, merge and remove snapshots.
extension LogicalPool {
    /// The copy-on-write space of a classic snapshot: bytes, or a percentage of the origin.
    public enum CowSize: Sendable, Equatable, CustomStringConvertible {
        case bytes(UInt64)
        /// 1 to 100.
        case percent(UInt64)

        /// 20 % of the origin: a classroom's VMs rewrite a small part of their disks between a
        /// snapshot and its revert, and a snapshot whose COW fills up is invalidated by the kernel
        /// and can no longer be reverted to, so this errs on the side of space. 100 % never fills.
        public static let `default` = CowSize.percent(20)

        public var description: String {
            switch self {
            case .bytes(let n): return "\(n) bytes"
            case .percent(let p): return "\(p)% of the origin"
            }
        }

        /// Extents for an origin of `origin` bytes: rounded up, at least one.
        func extents(origin: UInt64, extentSize: UInt64) -> UInt64 {
            let extent = max(extentSize, 1)
            let bytes: UInt64
            switch self {
            case .bytes(let n): bytes = n
            // origin × p / 100 without overflow.
            case .percent(let p): bytes = origin / 100 * p + (origin % 100 * p + 99) / 100
            }
            return max(1, bytes / extent + (bytes % extent == 0 ? 0 : 1))
        }
    }

    /// Between the volume's name and the snapshot's in a snapshot LV's name.
    static let snapshotSeparator = "+"

    /// The LV `poolfs snapshot create` makes for snapshot `name` of `volume`.
    public static func snapshotVolumeName(_ name: String, of volume: String) -> String {
        volume + snapshotSeparator + name
    }

    /// The reason the refusals below share.
    static let needsDeviceMapper = "LVM snapshots need device-mapper (lvm2 activates LVs to create, merge and remove them)"

    public var snapshotRefusal: String? {
        mode == .devices ? nil : "\(Self.needsDeviceMapper): not with -o noactivate, nor on a kernel without device-mapper"
    }

    /// Why `poolfs snapshot` cannot work on a logical pool here, found before the volume group is
    /// read; nil when it can.
    public static func snapshotRefusal(noactivate: Bool) -> String? {
        if noactivate { return "\(needsDeviceMapper), and -o noactivate does without it" }
        if Mode.forThisHost(noactivate: false) == .extents {
            return "\(needsDeviceMapper), and this kernel has none (/dev/mapper/control cannot be opened)"
        }
        return nil
    }

    /// LVM's LV name rules for NAME, less `+` (the separator): letters, digits, `.`, `_`, `-`; not
    /// starting with `-`; not `.` or `..`; none of lvm2's reserved suffixes.
    static func checkSnapshotName(_ name: String) throws {
        func bad(_ why: String) -> LogicalSnapshotError { .badName(name, why) }
        guard !name.isEmpty else { throw bad("it is empty") }
        guard name.unicodeScalars.allSatisfy({ $0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0) || "._-".unicodeScalars.contains($0)) }) else {
            throw bad("an LVM snapshot name has letters, digits, '.', '_' and '-' only ('+' separates it from the volume's name in the LV's name)")
        }
        guard !name.hasPrefix("-") else { throw bad("it starts with '-'") }
        guard name != ".", name != ".." else { throw bad("'.' and '..' are not LV names") }
        for reserved in reservedNameParts where name.contains(reserved) {
            throw bad("lvm2 reserves names with '\(reserved)'")
        }
    }

    /// What lvm2 refuses anywhere in an LV name (its own sub-LVs).
    static let reservedNameParts = ["_cdata", "_cmeta", "_corig", "_cpool", "_cvol", "_iorig", "_mimage", "_mlog",
                                    "_pmspare", "_rimage", "_rmeta", "_tdata", "_tmeta", "_vdata", "_vorigin", "_wcorig"]

    public func snapshot(_ operation: SnapshotOperation, _ name: String, of volume: String, dryRun: Bool) throws {
        if let refusal = snapshotRefusal { throw LogicalSnapshotError.noDeviceMapper(refusal) }
        try Self.checkSnapshotName(name)
        // Asked now, not the mount's cached report: other volumes' operations change it.
        let listing = Listing(try self.report().requeryingVolumes(runner: runner))
        let report = listing.report
        guard let lv = report.volume(volume), !lv.isInternal, !lv.isSnapshot else { throw SnapshotError.noSuchVolume(volume) }
        guard lv.type != "O" else { throw LogicalPoolError.merging(full(lv)) }
        let existing = listing.snapshotFiles(of: volume).first { $0.file == name }?.lv
        for held in [lv] + (existing.map { [$0] } ?? []) where held.isOpen {
            throw SnapshotSkip.inUse(openers(of: held))
        }
        switch operation {
        case .create(let replace):
            let target = Self.snapshotVolumeName(name, of: volume)
            guard target.utf8.count <= 127 else { throw LogicalSnapshotError.badName(name, "the LV name \(target) is longer than LVM's 127 characters") }
            if existing != nil, !replace { throw SnapshotError.exists(name) }
            if let taken = report.volume(target), taken.name != existing?.name {
                throw LogicalSnapshotError.nameTaken("\(volumeGroup)/\(target)", "is not a snapshot of \(volume)")
            }
            if dryRun { return }
            if let existing { _ = try runner.run(["lvremove", "-q", "-y", full(existing)]) }
            _ = try runner.run(createCommand(of: lv, named: target, extents: lv.isThin ? nil : cowSize.extents(origin: lv.size, extentSize: report.extentSize)))
        case .revert(let force):
            guard let existing else { throw SnapshotSkip.noSuchSnapshot }
            if existing.state == "I" { throw LogicalPoolError.invalidated(full(existing)) }
            if existing.type == "S" { throw LogicalPoolError.merging(full(existing)) }
            if existing.isClassicSnapshot {
                if dryRun { return }
                try revertClassic(lv, to: existing, in: report)
            } else {
                // lvm2 keeps no origin for a thin LV whose origin is removed: the other snapshots
                // of the old data, and those of the kept snapshot, would become volumes of their own.
                let detached = report.volumes.filter { $0.isThin && ($0.origin == lv.name || $0.origin == existing.name) && $0.name != existing.name }
                if !detached.isEmpty, !force {
                    throw LogicalSnapshotError.otherSnapshots(full(lv), detached.map(\.name))
                }
                for name in [existing.name + "+old", existing.name + "+new"] where report.volume(name) != nil {
                    throw LogicalSnapshotError.nameTaken("\(volumeGroup)/\(name)", "is left from an interrupted revert: see what it holds, then remove or rename it")
                }
                if dryRun { return }
                try revertThin(lv, to: existing)
            }
        case .delete:
            guard let existing else { throw SnapshotSkip.noSuchSnapshot }
            if dryRun { return }
            _ = try runner.run(["lvremove", "-q", "-y", full(existing)])
        }
    }

    private func full(_ lv: VolumeGroupReport.LogicalVolume) -> String { "\(volumeGroup)/\(lv.name)" }

    /// `lvcreate -s`: thin without a size, classic with `extents` of COW.
    private func createCommand(of lv: VolumeGroupReport.LogicalVolume, named name: String, extents: UInt64?) -> [String] {
        ["lvcreate", "-q", "-y", "-s"] + (extents.map { ["-l", "\($0)"] } ?? []) + ["-n", name, full(lv)]
    }

    /// Merges the classic snapshot into its origin and takes it again. An inactive origin is
    /// activated first (lvm2 would merge at its next activation) and deactivated after. lvconvert
    /// waits for the merge, bounded by a time that grows with the COW; a merge lvm2 deferred
    /// anyway (the origin was opened meanwhile) leaves the snapshot listed, and fails the volume.
    private func revertClassic(_ lv: VolumeGroupReport.LogicalVolume, to snapshot: VolumeGroupReport.LogicalVolume,
                               in report: VolumeGroupReport) throws {
        let cow = snapshot.segments.reduce(UInt64(0)) { $0 &+ $1.size }
        let extents = max(1, cow / max(report.extentSize, 1))
        if !lv.isActive { _ = try runner.run(["lvchange", "-q", "-ay", "-y", "--ignoremonitoring", full(lv)]) }
        // Back as it was, whatever happens.
        defer { if !lv.isActive { _ = try? runner.run(["lvchange", "-q", "-an", full(lv)]) } }
        // 60 s, and 1 s per 16 MiB of COW to copy back.
        let limit = 60 + Double(cow >> 24)
        _ = try runner.run(["lvconvert", "-q", "-y", "--merge", "--interval", "1", full(snapshot)], timeout: limit)
        let after = try report.requeryingVolumes(runner: runner)
        if after.volumes.contains(where: { $0.name == snapshot.name || $0.name == "[\(snapshot.name)]" }) {
            throw LogicalSnapshotError.mergeDeferred(full(snapshot), full(lv))
        }
        _ = try runner.run(createCommand(of: lv, named: snapshot.name, extents: extents))
    }

    /// The LV becomes a new thin snapshot of the kept one, under its own name, then the snapshot
    /// is taken again of it (so that it stays a snapshot of the volume: lvm2 drops a thin LV's
    /// origin when the origin is removed) and the old data is removed:
    ///  1. `lvrename LV SNAP+old`
    ///  2. `lvcreate -s -kn SNAP -n LV`, active as LV was; failing, step 1 is undone
    ///  3. `lvcreate -s LV -n SNAP+new`
    ///  4. `lvremove SNAP+old SNAP`
    ///  5. `lvrename SNAP+new SNAP`
    /// A failure at any step leaves the name LV holding the old data (until step 2) or the
    /// snapshot's (after), and the error says what is left to tidy.
    private func revertThin(_ lv: VolumeGroupReport.LogicalVolume, to snapshot: VolumeGroupReport.LogicalVolume) throws {
        let old = snapshot.name + "+old", new = snapshot.name + "+new"
        _ = try runner.run(["lvrename", "-q", volumeGroup, lv.name, old])
        do {
            _ = try runner.run(["lvcreate", "-q", "-y", "-s", "-kn", "-a", lv.isActive ? "y" : "n", "-n", lv.name, full(snapshot)])
        } catch {
            do {
                _ = try runner.run(["lvrename", "-q", volumeGroup, old, lv.name])
            } catch let undo {
                throw LogicalSnapshotError.partial(full(lv), "\(error); renaming \(volumeGroup)/\(old) back failed too (\(undo)): the old data is \(volumeGroup)/\(old)")
            }
            throw error
        }
        func left(_ what: String, _ error: any Error) -> LogicalSnapshotError {
            .partial(full(lv), "it holds the snapshot's data now, but \(what) failed (\(error))")
        }
        do { _ = try runner.run(["lvcreate", "-q", "-y", "-s", "-n", new, full(lv)]) } catch {
            throw left("taking the snapshot again (the old data is \(volumeGroup)/\(old), the snapshot \(full(snapshot)))", error)
        }
        do { _ = try runner.run(["lvremove", "-q", "-y", "\(volumeGroup)/\(old)", full(snapshot)]) } catch {
            throw left("removing \(volumeGroup)/\(old) and \(full(snapshot)) (the snapshot taken again is \(volumeGroup)/\(new))", error)
        }
        do { _ = try runner.run(["lvrename", "-q", volumeGroup, new, snapshot.name]) } catch {
            throw left("renaming \(volumeGroup)/\(new) to \(snapshot.name)", error)
        }
    }

    /// What holds an open LV, as far as this host shows: processes with its device open
    /// (LockHolders) and devices stacked on it (/sys/dev/block/MAJ:MIN/holders).
    func openers(of lv: VolumeGroupReport.LogicalVolume) -> String {
        var st = stat()
        var holders: [String] = []
        if stat(deviceRoot + lv.path, &st) == 0, st.st_mode & S_IFMT == S_IFBLK {
            let device = UInt64(st.st_rdev)
            holders = LockHolders.openers(ofBlockDevice: device).map(\.description)
            let (major, minor) = LockHolders.split(device)
            for holder in ((try? FileManager.default.contentsOfDirectory(atPath: "/sys/dev/block/\(major):\(minor)/holders")) ?? []).sorted() {
                let name = (try? String(contentsOfFile: "/sys/block/\(holder)/dm/name", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines)
                holders.append("device \(name ?? holder)")
            }
        }
        return "\(full(lv)) is open" + (holders.isEmpty ? " (no process of this host shows it open: a kernel user, or another host)" : " by " + holders.joined(separator: ", "))
    }
}

public enum LogicalSnapshotError: Error, Equatable, CustomStringConvertible {
    case noDeviceMapper(String)
    case badName(String, String)
    case nameTaken(String, String)
    case mergeDeferred(String, String)
    case otherSnapshots(String, [String])
    case partial(String, String)

    public var description: String {
        switch self {
        case .noDeviceMapper(let why): return why
        case .badName(let name, let why): return "'\(name)' cannot name an LVM snapshot: \(why)"
        case .nameTaken(let lv, let why): return "\(lv) exists and \(why); it is left alone"
        case .mergeDeferred(let snapshot, let origin):
            return "lvm2 deferred the merge of \(snapshot) to the next activation of \(origin) (it was opened meanwhile): the volume is not reverted yet"
        case .otherSnapshots(let lv, let names):
            return "\(lv) has other thin snapshots (\(names.joined(separator: ", "))): after a revert lvm2 keeps no origin for them and they show as volumes of their own; --force reverts anyway"
        case .partial(let lv, let why): return "\(lv): \(why)"
        }
    }
}
