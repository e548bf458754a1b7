import Foundation
import Pools

/// The `-o` options of a mount. poolfs's own are consumed here; the rest go to libfuse and the
/// kernel (allow_other, default_permissions, nodev, noatime, ...).
public struct MountOptions: Sendable, Equatable {
    public var cacheSize = 64 << 20
    public var threads: UInt32 = 16
    public var readahead: UInt32 = 2 << 20
    public var maxRead: UInt32 = 512 << 10
    public var splice = true
    /// Raw volumes through FUSE passthrough (the kernel reads their files itself) where it can.
    public var passthrough = true
    /// Writers' opens through the kernel's page cache instead of FOPEN_DIRECT_IO (see `OpenReply.directIO`).
    public var cachedWrites = false
    /// LVM: never use device-mapper; read LVs from their PVs.
    public var noactivate = false
    /// LVM, `poolfs snapshot create`: the copy-on-write space of a classic snapshot.
    public var cowSize: LogicalPool.CowSize = .default
    /// Writable files whose writes go to a copy-on-write block cache, never to the images.
    public var cow = false
    /// Writes go into the images themselves (dir pools).
    public var rw = false
    /// Directories outside the pool where files that images name (backing and data files) may be
    /// opened (docs/security.md).
    public var backingDirectories: [String] = []
    public var cacheDirectory = "/var/tmp"
    public var cowMemory = 256 << 20
    public var type: String?
    /// iSCSI: the initiator name, the CHAP user and the file holding the CHAP secret (read at mount).
    public var initiator: String?
    public var chapUser: String?
    public var chapSecretFile: String?
    /// RBD: the Ceph conf file, client id, keyring file and monitor addresses.
    public var cephConf: String?
    public var cephID: String?
    public var keyring: String?
    public var monHost: String?
    /// RBD: seconds any cluster operation may take (connect, open, read, write) before it fails.
    public var rbdTimeout = 10.0
    /// gluster and NFS pools: the bound on every call to the server, in seconds.
    public var netTimeout = 10.0
    public var fuseOptions: [String] = []

    public init() {}

    /// Options that only mean something to mount(8), fstab or systemd.
    static let mountOnly: Set<String> = ["defaults", "auto", "noauto", "user", "users", "nouser", "nofail", "_netdev", "owner", "group"]

    /// Parses `-o` lists as given (each comma-separated; later ones win).
    public static func parse(_ lists: [String]) throws -> MountOptions {
        var o = MountOptions()
        for list in lists {
            for option in list.split(separator: ",").map(String.init) where !option.isEmpty {
                let parts = option.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
                let key = parts[0]
                guard !key.isEmpty else { throw MountError.badOption("\(option): no option name before '='") }
                let value = parts.count > 1 ? parts[1] : nil
                switch key {
                case "cache_size":
                    o.cacheSize = try byteCount(value, option: option)
                case "readahead":
                    o.readahead = UInt32(clamping: try size(value, option: option))
                case "max_read":
                    let bytes = try size(value, option: option)
                    guard (4096...(1 << 20)).contains(bytes) else {
                        throw MountError.badOption("\(option): max_read takes a size from 4K to 1M")
                    }
                    o.maxRead = UInt32(bytes)
                case "threads":
                    guard let value, let n = UInt32(value), (1...256).contains(n) else {
                        throw MountError.badOption("\(option): threads takes a number from 1 to 256")
                    }
                    o.threads = n
                case "nosplice":
                    o.splice = false
                case "nopassthrough":
                    o.passthrough = false
                case "cached_writes":
                    o.cachedWrites = true
                case "noactivate":
                    o.noactivate = true
                case "cow":
                    o.cow = true
                case "cow_size":
                    // SIZE, or N% of the origin.
                    if let value, value.hasSuffix("%") {
                        guard let percent = UInt64(value.dropLast()), (1...100).contains(percent) else {
                            throw MountError.badOption("\(option): cow_size takes a size (2G) or a percentage of the origin from 1% to 100%")
                        }
                        o.cowSize = .percent(percent)
                    } else {
                        let bytes = try size(value, option: option)
                        guard bytes > 0 else { throw MountError.badOption("\(option): cow_size must be more than 0") }
                        o.cowSize = .bytes(bytes)
                    }
                case "cache_dir":
                    guard let value, !value.isEmpty else { throw MountError.badOption("\(option): needs a directory") }
                    o.cacheDirectory = value
                case "backing_dirs":
                    guard let value, !value.isEmpty else { throw MountError.badOption("\(option): needs DIR[:DIR...]") }
                    let directories = value.split(separator: ":").map(String.init)
                    guard directories.allSatisfy({ $0.hasPrefix("/") }) else {
                        throw MountError.badOption("\(option): each directory must be an absolute path")
                    }
                    o.backingDirectories = directories
                case "cow_memory":
                    o.cowMemory = try byteCount(value, option: option)
                case "type":
                    o.type = value
                case "initiator", "chap_user", "chap_secret_file":
                    guard let value, !value.isEmpty else { throw MountError.badOption("\(key): needs a value") }
                    if key == "initiator" { o.initiator = value } else if key == "chap_user" { o.chapUser = value } else { o.chapSecretFile = value }
                case "conf", "id", "keyring", "mon_host":
                    guard let value, !value.isEmpty else { throw MountError.badOption("\(key): needs a value") }
                    switch key {
                    case "conf": o.cephConf = value
                    case "id": o.cephID = value
                    case "keyring": o.keyring = value
                    default: o.monHost = value
                    }
                case "rbd_timeout":
                    guard let value, let n = Int(value), (1...300).contains(n) else {
                        throw MountError.badOption("\(option): rbd_timeout takes seconds from 1 to 300")
                    }
                    o.rbdTimeout = Double(n)
                case "net_timeout":
                    guard let value, let n = Int(value), (1...300).contains(n) else {
                        throw MountError.badOption("\(option): net_timeout takes seconds from 1 to 300")
                    }
                    o.netTimeout = Double(n)
                case "ro":
                    o.rw = false
                case "rw":
                    o.rw = true
                case _ where mountOnly.contains(key) || key.hasPrefix("x-") || key == "comment":
                    break
                default:
                    o.fuseOptions.append(option)
                }
            }
        }
        if o.chapSecretFile != nil && o.chapUser == nil {
            throw MountError.badOption("chap_secret_file: needs chap_user=NAME")
        }
        if o.rw && o.cow {
            throw MountError.badOption("rw,cow: choose one: rw writes into the images, cow keeps writes apart and drops them at unmount")
        }
        return o
    }

    /// A size that is held in memory, so it must fit an Int.
    static func byteCount(_ text: String?, option: String) throws -> Int {
        guard let bytes = Int(exactly: try size(text, option: option)) else {
            throw MountError.badOption("\(option): '\(text ?? "")' is too large")
        }
        return bytes
    }

    /// "64M", "1G", "4096": bytes, with an optional K, M, G or T suffix (powers of 1024).
    static func size(_ text: String?, option: String) throws -> UInt64 {
        guard var text, !text.isEmpty else { throw MountError.badOption("\(option): needs a size") }
        var multiplier: UInt64 = 1
        let suffixes: [Character: UInt64] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
        if let last = text.last?.uppercased().first, let m = suffixes[last] {
            multiplier = m
            text.removeLast()
        }
        guard let n = UInt64(text), n <= UInt64.max / multiplier else {
            throw MountError.badOption("\(option): '\(text)' is not a size")
        }
        return n * multiplier
    }
}

public enum MountError: Error, CustomStringConvertible {
    case badOption(String)
    case noFuseDevice
    case mountpoint(String)

    public var description: String {
        switch self {
        case .badOption(let why): return "bad option \(why)"
        case .noFuseDevice: return "/dev/fuse is missing: install fuse3 and load the fuse module (modprobe fuse)"
        case .mountpoint(let why): return why
        }
    }
}

extension MountOptions {
    /// What the mount trusts beyond the pool's own directory.
    public var trust: PoolTrust {
        var trust = PoolTrust()
        trust.backingDirectories = backingDirectories
        if let domains = ProcessInfo.processInfo.environment["POOLFS_LIBVIRT_DOMAINS"] {
            trust.domainDirectories = domains.split(separator: ":").map(String.init)
        }
        trust.warn = { Log.warning($0) }
        return trust
    }
}
