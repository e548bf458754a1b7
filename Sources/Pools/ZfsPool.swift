#if canImport(Glibc)
import Glibc
#endif
import Block
import Locking

/// A libvirt `zfs` pool: the zvols under a dataset, and their snapshots.
///
/// Discovery is `zfs list -H -p` (tab-separated, exact numbers). A zvol `tank/vms/web` is the
/// volume `web` (nested ones keep their path, escaped: `sub%2Fweb`), read from /dev/zvol/tank/vms/web;
/// its snapshot `tank/vms/web@monday` is `.snapshots/web/monday`, read from
/// /dev/zvol/tank/vms/web@monday. Snapshot devices exist only with `snapdev=visible`: `prepare`
/// sets it on every zvol where it is hidden and `release` puts each back as it was.
public final class ZfsPool: Pool {
    public struct Entry: Sendable, Equatable {
        public var name: String
        public var type: String
        public var volumeSize: UInt64?
        public var creation: UInt64?
    }

    public let dataset: String
    let runner: any CommandRunner
    /// Prepended to /dev/zvol paths: tests point it at a directory of regular files.
    let deviceRoot: String
    /// The last `zfs list`, asked again after `reportLifetime`.
    private let cached: RefreshedValue<[Entry]>
    /// snapdev values changed by `prepare`: zvol, previous value, and whether it was set locally.
    private let changed = Locked<[(zvol: String, value: String, local: Bool)]>([])

    public var displayName: String { dataset }
    public var statisticsPath: String { "/" }

    public init(dataset: String, runner: any CommandRunner, reportLifetime: Double = 1, deviceRoot: String = "") throws {
        self.dataset = dataset
        self.runner = runner
        self.deviceRoot = deviceRoot
        cached = try RefreshedValue(lifetime: reportLifetime) { try Self.list(dataset, runner: runner) }
    }

    static func list(_ dataset: String, runner: any CommandRunner) throws -> [Entry] {
        let out = try runner.run(["zfs", "list", "-H", "-p", "-t", "volume,snapshot", "-r", "-o", "name,type,volsize,creation", dataset])
        return try parse(out)
    }

    /// `zfs list -H -p -o name,type,volsize,creation`: one line per dataset, fields split on tabs
    /// (names may hold spaces), `-` where a field does not apply.
    public static func parse(_ output: String) throws -> [Entry] {
        try output.split(separator: "\n", omittingEmptySubsequences: true).map { line in
            let fields = line.split(separator: "\t", omittingEmptySubsequences: false).map(String.init)
            guard fields.count == 4, !fields[0].isEmpty else {
                throw VolumeGroupReport.ParseError.json("zfs list line '\(line)' does not have 4 tab-separated fields")
            }
            return Entry(name: fields[0], type: fields[1], volumeSize: UInt64(fields[2]), creation: UInt64(fields[3]))
        }
    }

    func entries() -> [Entry] { cached.value }

    /// The zvol's full name for a volume name, and back.
    func zvol(_ volume: String) -> String? {
        entries().first { $0.type == "volume" && name(of: $0.name) == volume }?.name
    }

    func name(of zvol: String) -> String {
        let prefix = dataset + "/"
        return FileNames.escape(zvol.hasPrefix(prefix) ? String(zvol.dropFirst(prefix.count)) : zvol)
    }

    public func volumeNames() throws -> [String] {
        cached.fresh.filter { $0.type == "volume" }.map { name(of: $0.name) }.sorted()
    }

    public func volume(_ name: String) -> PoolVolume? {
        zvol(name).flatMap { PoolVolume(path: deviceRoot + "/dev/zvol/" + $0) }
    }

    public func openImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        guard let path = volume.path else { throw PoolError.notFound(name) }
        return try Image.open(path: path, format: .raw, cache: cache)
    }

    /// The zvol's size and its snapshots: either changing reopens the volume.
    public func generation(of name: String) -> String? {
        let all = entries()
        guard let zvol = all.first(where: { $0.type == "volume" && self.name(of: $0.name) == name }) else { return nil }
        let snapshots = all.filter { $0.type == "snapshot" && $0.name.hasPrefix(zvol.name + "@") }.map(\.name)
        return "\(zvol.volumeSize ?? 0) \(snapshots)"
    }

    public func snapshots(of volume: String) -> [PoolSnapshot] {
        guard let zvol = zvol(volume) else { return [] }
        let root = deviceRoot
        return entries().filter { $0.type == "snapshot" && $0.name.hasPrefix(zvol + "@") }.map { snapshot in
            PoolSnapshot(name: String(snapshot.name.dropFirst(zvol.count + 1))) {
                let path = root + "/dev/zvol/" + snapshot.name
                do {
                    return try Image.open(path: path, format: .raw, cache: BlockCache(capacityBytes: 0)).live
                } catch Qcow2Error.io(errno: ENOENT, _, _) {
                    throw ZfsPoolError.snapshotDeviceMissing(snapshot.name)
                }
            }
        }
    }

    /// Makes snapshot devices visible on every zvol of the dataset that hides them.
    public func prepare() throws {
        let out = try runner.run(["zfs", "get", "-H", "-p", "-r", "-t", "volume", "-o", "name,value,source", "snapdev", dataset])
        for line in out.split(separator: "\n") {
            let f = line.split(separator: "\t", omittingEmptySubsequences: false).map(String.init)
            guard f.count == 3, f[1] == "hidden" else { continue }
            do {
                _ = try runner.run(["zfs", "set", "snapdev=visible", f[0]])
            } catch {
                _ = release()
                throw error
            }
            changed.withLock { $0.append((f[0], f[1], f[2] == "local")) }
        }
    }

    /// Puts snapdev back: the local value where one was set, inheritance where it was inherited.
    public func release() -> [String] {
        let undo = changed.withLock { list in defer { list.removeAll() }; return list }
        var failures: [String] = []
        for (zvol, value, local) in undo.reversed() {
            let command = local ? ["zfs", "set", "snapdev=\(value)", zvol] : ["zfs", "inherit", "snapdev", zvol]
            do { _ = try runner.run(command) } catch { failures.append("restoring snapdev on \(zvol): \(error)") }
        }
        return failures
    }
}

public enum ZfsPoolError: Error, Equatable, CustomStringConvertible {
    case snapshotDeviceMissing(String)
    case badSnapshotName(String)
    public var description: String {
        switch self {
        case .badSnapshotName(let name):
            return "'\(name)' is not a zfs snapshot name (letters, digits, _ - : . and space)"
        case .snapshotDeviceMissing(let snapshot):
            return "no device for \(snapshot) under /dev/zvol (is snapdev hidden, or udev still creating it?)"
        }
    }
}

extension ZfsPool {
    public var snapshotRefusal: String? { nil }

    /// `zfs snapshot`, `zfs rollback` and `zfs destroy` of the zvol's snapshot `ZVOL@NAME`, each
    /// failure carrying the command line and zfs's stderr. A rollback to a snapshot older than the
    /// zvol's latest fails unless `force`, which runs `zfs rollback -r`: that destroys the later
    /// snapshots (and bookmarks). Names are checked first: `zfs destroy` would read `%` in one as
    /// a range of snapshots.
    public func snapshot(_ operation: SnapshotOperation, _ name: String, of volume: String, dryRun: Bool) throws {
        guard Self.isSnapshotName(name) else { throw ZfsPoolError.badSnapshotName(name) }
        guard let zvol = zvol(volume) else { throw SnapshotError.noSuchVolume(volume) }
        let full = zvol + "@" + name
        let exists = entries().contains { $0.type == "snapshot" && $0.name == full }
        switch operation {
        case .create(let replace):
            if exists, !replace { throw SnapshotError.exists(name) }
            if dryRun { return }
            if exists { _ = try runner.run(["zfs", "destroy", full]) }
            _ = try runner.run(["zfs", "snapshot", full])
        case .revert(let force):
            guard exists else { throw SnapshotSkip.noSuchSnapshot }
            if dryRun { return }
            _ = try runner.run(["zfs", "rollback"] + (force ? ["-r"] : []) + [full])
        case .delete:
            guard exists else { throw SnapshotSkip.noSuchSnapshot }
            if dryRun { return }
            _ = try runner.run(["zfs", "destroy", full])
        }
    }

    /// What zfs(8) allows in a snapshot's name: letters, digits, `_ - : .` and space.
    static func isSnapshotName(_ name: String) -> Bool {
        !name.isEmpty && name.utf8.count < 256 && name.unicodeScalars.allSatisfy {
            $0.isASCII && ($0.properties.isAlphabetic || ("0"..."9").contains($0) || "_-:. ".unicodeScalars.contains($0))
        }
    }
}
