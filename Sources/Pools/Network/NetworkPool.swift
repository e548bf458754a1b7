#if canImport(Glibc)
import Glibc
#endif
import Block
import Locking

/// A directory of a network share read natively, with no kernel mount: a gluster volume through
/// libgfapi, an NFS export through libnfs (docs/network-pools.md). As in a dir pool, every
/// regular file of the directory is a volume (symbolic links are not followed), with its
/// snapshots and partitions; files its images name are opened only beneath the directory
/// (`ShareDirectory`).
///
/// Read-only: `-o rw` and `poolfs snapshot` are refused (`writeRefusal`), `-o cow` keeps
/// writes in the mount.
public struct NetworkPool: Pool {
    let client: any ShareClient
    /// "gluster" or "NFS", for messages.
    let kind: String
    /// What each volume was when last seen: a server that does not answer makes a lookup fail
    /// with EIO, which must not read as the volume being gone.
    let known = KnownVolumes()
    /// Each file's format, decided once (NetworkFormatDecisions).
    let formats: NetworkFormatDecisions
    public var displayName: String { client.location }
    public var statisticsPath: String { "/" }

    init(client: any ShareClient, kind: String) {
        self.client = client
        self.kind = kind
        formats = NetworkFormatDecisions(location: client.location)
    }

    var policy: TrustPolicy { TrustPolicy(remote: ShareDirectory(client: client)) }

    public func volumeNames() throws -> [String] {
        try client.list("").compactMap { entry -> String? in
            if entry.type == UInt8(DT_REG) { return entry.name }
            guard entry.type == UInt8(DT_UNKNOWN), let st = try? client.lstat(entry.name),
                  st.st_mode & S_IFMT == S_IFREG else { return nil }
            return entry.name
        }.sorted()
    }

    public func volume(_ name: String) -> PoolVolume? {
        guard !name.isEmpty, name != ".", name != "..", !name.utf8.contains(UInt8(ascii: "/")) else { return nil }
        let st: stat
        do {
            st = try client.lstat(name)
        } catch .io(let code, _, _) where code == EIO {
            return known.status(of: name).map { PoolVolume(path: client.location + "/" + name, status: $0) }
        } catch {
            // Not found: gone, unless the pool's directory cannot be found either (a volume
            // whose bricks are all down answers ENOENT too).
            if (try? client.lstat("")) == nil {
                return known.status(of: name).map { PoolVolume(path: client.location + "/" + name, status: $0) }
            }
            known.forget(name)
            return nil
        }
        guard st.st_mode & S_IFMT == S_IFREG else {
            known.forget(name)
            return nil
        }
        known.remember(name, st)
        return PoolVolume(path: client.location + "/" + name, status: st)
    }

    public func openImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        let file = try ShareDirectory(client: client).open(relativePath: name)
        var options = Image.Options()
        options.policy = policy
        let formats = formats
        options.decideFormat = { file in try formats.decide(file) }
        return try Image.open(file: file, cache: cache, options: options)
    }

    public func openWritableImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        throw Qcow2Error.writeRefused("\(displayName): \(writeRefusal!)")
    }

    public var writeRefusal: String? {
        "\(kind) pools are read-only: poolfs cannot yet write them with the crash ordering of a local file (a flush that reaches the server's disk before the metadata that depends on it); use -o cow for a writable view"
    }

    public var snapshotRefusal: String? {
        "\(kind) pools are read-only: poolfs snapshot writes qcow2 metadata in place, which it does only on local files; use qemu-img snapshot through QEMU's \(kind == "gluster" ? "gluster://" : "nfs://") driver"
    }

    public func snapshot(_ operation: SnapshotOperation, _ name: String, of volume: String, dryRun: Bool) throws {
        throw SnapshotError.unsupported(pool: "\(displayName) (\(snapshotRefusal!))")
    }
}

/// The last status seen of each volume of a network pool.
final class KnownVolumes: Sendable {
    private let statuses = Locked<[String: StatBox]>([:])
    func status(of name: String) -> stat? { statuses.withLock { $0[name]?.value } }
    func remember(_ name: String, _ st: stat) { statuses.withLock { $0[name] = StatBox(value: st) } }
    func forget(_ name: String) { _ = statuses.withLock { $0.removeValue(forKey: name) } }
}

struct StatBox: @unchecked Sendable { var value: stat }
