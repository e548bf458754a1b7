#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Locking
import Block

/// A libvirt `iscsi` / `iscsi-direct` pool: the direct-access LUNs of one iSCSI target, read
/// through libiscsi (no kernel initiator, no /dev/sd*). Each LUN is a raw volume named as libvirt
/// names it, `unit:0:0:<lun>`; LUN 0 of tgtd (a "controller") and other non-disk LUNs are not shown.
///
/// The LUN list (REPORT LUNS, then INQUIRY, READ CAPACITY(16) and the unit serial of each) is
/// asked again once older than a second, on a thread of its own (`RefreshedValue`): a LUN added
/// to the target shows at the next listing, and no read ever waits for the refresh. LUNs have no
/// file here: their attributes are made up (mode 0444, 0644 with `-o rw`; owner root; times when
/// this mount first saw the LUN with its serial; st_dev a hash of portal and target, st_ino
/// LUN + 1), and `generation` (serial, size) changes when a LUN is re-created.
public final class ISCSIPool: Pool {
    public struct Options: Sendable {
        public var initiator: String?
        public var chapUser: String?
        public var chapSecret: String?
        public var writable = false
        public init(initiator: String? = nil, chapUser: String? = nil, chapSecret: String? = nil, writable: Bool = false) {
            self.initiator = initiator; self.chapUser = chapUser; self.chapSecret = chapSecret; self.writable = writable
        }
    }

    /// What one listing found of a LUN.
    struct Lun: Sendable, Equatable {
        var number: Int
        var lastLBA: UInt64
        var blockLength: UInt32
        var thinProvisioned: Bool
        var unmappedReadsZero: Bool
        var serial: String?
        var size: UInt64 { (lastLBA + 1) * UInt64(blockLength) }
    }

    public static let defaultInitiator = "iqn.2026-01.org.poolfs:initiator"
    public let host: String
    public let port: Int
    public let target: String
    public let writable: Bool
    public var displayName: String { "iscsi://\(portal)/\(target)" }
    public var statisticsPath: String { "/" }
    var portal: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
    let session: ISCSISession
    private let luns: RefreshedValue<[String: Lun]>
    /// When this mount first saw each LUN, by name and serial: the volume's times.
    private let firstSeen = Locked<[String: timespec]>([:])
    private let device: UInt64

    /// Parses `iscsi://HOST[:PORT]/TARGET-IQN` (a trailing `/LUN` is ignored: the pool is the
    /// whole target), connects and lists the LUNs: a wrong target, a refused connection or a
    /// rejected CHAP secret fails here with the login's message.
    public convenience init(url: String, options: Options, refresh: Double = 1.0) throws {
        let (host, port, target) = try Self.parse(url)
        try self.init(host: host, port: port, target: target, options: options, refresh: refresh)
    }

    public init(host: String, port: Int, target: String, options: Options, refresh: Double = 1.0) throws {
        self.host = host
        self.port = port
        self.target = target
        writable = options.writable
        let portal = host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        var chap: ISCSISession.Credentials?
        if let user = options.chapUser {
            guard let secret = options.chapSecret else { throw PoolError.libvirt("iscsi: chap_user=\(user) needs chap_secret_file") }
            chap = ISCSISession.Credentials(user: user, secret: secret)
        }
        let session = try ISCSISession(.init(portal: portal, target: target,
                                             initiator: options.initiator ?? Self.defaultInitiator, chap: chap))
        self.session = session
        device = Self.fnv1a("\(portal)/\(target)")
        luns = try RefreshedValue(lifetime: refresh) { try Self.list(session) }
    }

    /// `iscsi://HOST[:PORT]/IQN[/LUN]`; HOST may be `[IPv6]`.
    static func parse(_ url: String) throws -> (host: String, port: Int, target: String) {
        guard url.hasPrefix("iscsi://") else { throw PoolError.libvirt("\(url): not an iscsi://HOST[:PORT]/TARGET-IQN URL") }
        let rest = url.dropFirst("iscsi://".count)
        let parts = rest.split(separator: "/", omittingEmptySubsequences: true)
        guard parts.count >= 2 else { throw PoolError.libvirt("\(url): no target IQN (iscsi://HOST[:PORT]/TARGET-IQN)") }
        var authority = String(parts[0])
        var port = 3260
        var host: String
        if authority.hasPrefix("[") {
            guard let close = authority.firstIndex(of: "]") else { throw PoolError.libvirt("\(url): unclosed [ in the host") }
            host = String(authority[authority.index(after: authority.startIndex)..<close])
            authority = String(authority[authority.index(after: close)...])
        } else if let colon = authority.lastIndex(of: ":") {
            host = String(authority[..<colon])
            authority = String(authority[colon...])
        } else {
            host = authority
            authority = ""
        }
        if authority.hasPrefix(":") {
            guard let n = Int(authority.dropFirst()), (1...65535).contains(n) else { throw PoolError.libvirt("\(url): bad port") }
            port = n
        }
        guard !host.isEmpty else { throw PoolError.libvirt("\(url): no host") }
        return (host, port, String(parts[1]))
    }

    /// REPORT LUNS, then each LUN's INQUIRY, READ CAPACITY(16) and serial: the disks, by name.
    static func list(_ session: ISCSISession) throws -> [String: Lun] {
        try session.withConnection("list LUNs") { connection in
            var found: [String: Lun] = [:]
            for number in try connection.reportLuns() {
                // Qualifier 0 and type 0: a direct-access block device that is connected.
                guard let kind = try? connection.inquiry(lun: number), kind.qualifier == 0, kind.deviceType == 0 else { continue }
                let capacity = try connection.readCapacity16(lun: number)
                // A capacity no file can have ((last LBA + 1) × block length past 2^63: only a
                // broken or hostile target says so) is no volume, rather than an overflow.
                let (blocks, past) = capacity.lastLBA.addingReportingOverflow(1)
                let (bytes, over) = blocks.multipliedReportingOverflow(by: UInt64(capacity.blockLength))
                guard capacity.blockLength > 0, !past, !over, bytes <= UInt64(Int64.max) else { continue }
                let serial = try? connection.unitSerialNumber(lun: number)
                found["unit:0:0:\(number)"] = Lun(number: number, lastLBA: capacity.lastLBA, blockLength: capacity.blockLength,
                                                 thinProvisioned: capacity.provisioning, unmappedReadsZero: capacity.zeroesUnmapped,
                                                 serial: serial ?? nil)
            }
            return found
        }
    }

    public func volumeNames() throws -> [String] {
        luns.fresh.keys.sorted()
    }

    public func volume(_ name: String) -> PoolVolume? {
        guard let lun = luns.value[name] else { return nil }
        var st = stat()
        st.st_mode = S_IFREG | (writable ? 0o644 : 0o444)
        st.st_nlink = 1
        st.st_uid = 0
        st.st_gid = 0
        st.st_size = off_t(clamping: lun.size)
        st.st_blksize = 4096
        st.st_blocks = blkcnt_t(clamping: (lun.size + 511) / 512)
        st.st_dev = dev_t(truncatingIfNeeded: device)
        st.st_ino = ino_t(lun.number + 1)
        let seen = firstSeen.withLock { seen in
            let key = name + "\u{0}" + (lun.serial ?? "")
            if let known = seen[key] { return known }
            var now = timespec()
            clock_gettime(CLOCK_REALTIME, &now)
            seen[key] = now
            return now
        }
        st.st_atim = seen
        st.st_mtim = seen
        st.st_ctim = seen
        return PoolVolume(path: nil, status: st)
    }

    public func openImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        Image.wrapping(try device(name), path: "iscsi://\(portal)/\(target)/\(try lun(name).number)")
    }

    public var writeRefusal: String? { nil }

    public func openWritableImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        guard writable else { throw Qcow2Error.writeRefused("\(displayName) was opened read-only") }
        return try openImage(name, volume: volume, cache: cache)
    }

    public func makeWriter(_ name: String, image: Image) throws -> any VolumeWriter {
        guard writable, let device = image.live as? ISCSILunDevice else {
            throw Qcow2Error.writeRefused("\(image.path) was opened read-only")
        }
        return ISCSILunWriter(device: device)
    }

    /// The LUN's serial, size and block length: a LUN re-created under the same number differs.
    public func generation(of name: String) -> String? {
        guard let lun = luns.value[name] else { return nil }
        return "\(lun.serial ?? "-")/\(lun.size)/\(lun.blockLength)"
    }

    public func properties(of name: String) -> [(key: String, value: String)] {
        guard let lun = luns.value[name] else { return [] }
        var properties = [(key: "iscsi.target", value: target), (key: "iscsi.portal", value: portal),
                          (key: "iscsi.lun", value: "\(lun.number)"), (key: "iscsi.block_size", value: "\(lun.blockLength)")]
        if let serial = lun.serial { properties.append((key: "iscsi.serial", value: serial)) }
        return properties
    }

    public func release() -> [String] {
        session.close()
        return []
    }

    func lun(_ name: String) throws -> Lun {
        guard let lun = luns.value[name] else { throw PoolError.notFound("\(displayName) has no LUN \(name)") }
        return lun
    }

    /// The LUN as a device, with the size the last listing saw.
    public func device(_ name: String) throws -> ISCSILunDevice {
        let lun = try lun(name)
        return ISCSILunDevice(session: session, lun: lun.number, lastLBA: lun.lastLBA, blockLength: Int(lun.blockLength),
                              thinProvisioned: lun.thinProvisioned, unmappedReadsZero: lun.unmappedReadsZero)
    }

    /// FNV-1a, 64 bits: stable from run to run (Swift's Hasher is seeded per process).
    static func fnv1a(_ text: String) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in text.utf8 {
            hash ^= UInt64(byte)
            hash = hash &* 0x100_0000_01b3
        }
        return hash
    }
}
