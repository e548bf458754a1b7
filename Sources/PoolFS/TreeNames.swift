#if canImport(Glibc)
import Glibc
#endif
import Locking
import Pools
import Block

/// Names as the tree shows them (docs/security.md, "Names people see"):
/// - a volume named as one of the tree's own directories (`.snapshots`, `.partitions`) shows as
///   `%2Esnapshots`, `%2Epartitions`; a volume whose name starts with `%` shows with `%25` for it,
///   so no shown name stands for two volumes;
/// - a name over 255 bytes shows as its first 200 bytes, `~` and 16 hex digits of a hash of the
///   whole name: stable, and unique but for a 64-bit hash collision.
public enum TreeNames {
    /// The names the tree gives its own directories at its root.
    public static let reserved: Set<String> = [".snapshots", ".partitions"]
    public static let maxBytes = 255

    public static func shown(volume name: String) -> String {
        var shown = name
        if reserved.contains(name) {
            shown = "%2E" + name.dropFirst()
        } else if name.hasPrefix("%") {
            shown = "%25" + name.dropFirst()
        }
        return limited(shown, whole: name)
    }

    /// The volume `shown` stands for, where no hash was needed to show it.
    static func volume(shown: String) -> String? {
        if shown.hasPrefix("%2E"), reserved.contains("." + shown.dropFirst(3)) { return "." + shown.dropFirst(3) }
        if shown.hasPrefix("%25") { return "%" + shown.dropFirst(3) }
        if shown.hasPrefix("%") { return nil }
        return shown
    }

    /// `name` cut to `maxBytes` with a hash of `whole` when longer.
    public static func limited(_ name: String, whole: String) -> String {
        guard name.utf8.count > maxBytes else { return name }
        var prefix = ""
        var bytes = 0
        for character in name {
            let n = character.utf8.count
            if bytes + n > 200 { break }
            prefix.append(character)
            bytes += n
        }
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in whole.utf8 { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        let hex = String(hash, radix: 16)
        return prefix + "~" + String(repeating: "0", count: 16 - hex.count) + hex
    }
}

/// A pool whose volume names are the tree's (`TreeNames`): what the filesystem and `poolfs ls`
/// see. Every call is passed on with the pool's own name.
final class TreeNamedPool: Pool {
    let pool: any Pool
    /// Shown name → pool name, for names that needed a hash (from the last listing).
    private let hashed = Locked<[String: String]>([:])

    init(_ pool: any Pool) { self.pool = pool }

    private func own(_ shown: String) -> String {
        hashed.withLock { $0[shown] } ?? TreeNames.volume(shown: shown) ?? "\0"
    }

    var displayName: String { pool.displayName }
    var statisticsPath: String { pool.statisticsPath }
    func volumeNames() throws -> [String] {
        let names = try pool.volumeNames()
        var long: [String: String] = [:]
        let shown = names.map { name -> String in
            let shown = TreeNames.shown(volume: name)
            if TreeNames.volume(shown: shown) != name { long[shown] = name }
            return shown
        }
        hashed.withLock { $0.merge(long) { _, new in new } }
        return shown.sorted()
    }
    func volume(_ name: String) -> PoolVolume? {
        let own = own(name)
        guard TreeNames.shown(volume: own) == name else { return nil }
        return pool.volume(own)
    }
    func openImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        try pool.openImage(own(name), volume: volume, cache: cache)
    }
    func openWritableImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        try pool.openWritableImage(own(name), volume: volume, cache: cache)
    }
    func makeWriter(_ name: String, image: Image) throws -> any VolumeWriter { try pool.makeWriter(own(name), image: image) }
    var writeRefusal: String? { pool.writeRefusal }
    var problem: String? { pool.problem }
    func generation(of name: String) -> String? { pool.generation(of: own(name)) }
    func snapshots(of name: String) -> [PoolSnapshot] { pool.snapshots(of: own(name)) }
    func properties(of name: String) -> [(key: String, value: String)] { pool.properties(of: own(name)) }
    func prepare() throws { try pool.prepare() }
    func release() -> [String] { pool.release() }
    var closesIdleVolumes: Bool { pool.closesIdleVolumes }
    var snapshotRefusal: String? { pool.snapshotRefusal }
    func snapshot(_ operation: SnapshotOperation, _ name: String, of volume: String, dryRun: Bool) throws {
        try pool.snapshot(operation, name, of: own(volume), dryRun: dryRun)
    }
    func snapshotLeavingPunch(_ operation: SnapshotOperation, _ name: String, of volume: String, dryRun: Bool) throws -> PendingPunch? {
        try pool.snapshotLeavingPunch(operation, name, of: own(volume), dryRun: dryRun)
    }
}
