#if canImport(Glibc)
import Glibc
#endif
import CISCSI
import Foundation

/// The thin layer over libiscsi 1.19: one connected, logged-in session to one target, and the
/// SCSI commands poolfs sends (REPORT LUNS, INQUIRY, READ CAPACITY(16), READ(16), WRITE(16),
/// WRITE SAME(16), SYNCHRONIZE CACHE(16), GET LBA STATUS). Every failure is one `ISCSIError` with
/// the operation's name and libiscsi's text. No policy: which LUNs are volumes, how many sessions,
/// when to reconnect, all live in `ISCSISession` and `ISCSIPool`.
///
/// A libiscsi context is not thread-safe: one thread at a time uses a connection.
/// Auto-reconnect is off (libiscsi's reconnect sleeps and retries forever inside a call): a
/// session that drops fails its commands, and the owner makes a new connection.

public enum ISCSIError: Error, CustomStringConvertible, Equatable {
    /// Connecting or logging in failed (refused, unknown target, CHAP rejected).
    case login(portal: String, target: String, message: String)
    /// The session is gone (the target closed it, the socket failed): make a new connection.
    case connectionLost(operation: String, message: String)
    /// No answer within the time limit; the session is given up.
    case timedOut(operation: String, seconds: Int)
    /// The target answered with a SCSI status other than GOOD.
    case scsi(operation: String, status: Int32, senseKey: Int32, asc: Int32, ascq: Int32, message: String)
    /// The answer could not be decoded.
    case badAnswer(operation: String, message: String)

    public var description: String {
        switch self {
        case .login(let portal, let target, let message):
            return "iSCSI login to \(target) at \(portal) failed: \(message)"
        case .connectionLost(let operation, let message):
            return "iSCSI \(operation): connection lost: \(message)"
        case .timedOut(let operation, let seconds):
            return "iSCSI \(operation): no answer within \(seconds) s"
        case .scsi(let operation, let status, let key, let asc, let ascq, let message):
            return "iSCSI \(operation): SCSI status \(status), sense key \(key) asc \(asc) ascq \(ascq): \(message)"
        case .badAnswer(let operation, let message):
            return "iSCSI \(operation): \(message)"
        }
    }

    /// Whether the connection that raised it must be dropped.
    public var breaksConnection: Bool {
        switch self {
        case .connectionLost, .timedOut, .login: return true
        case .scsi, .badAnswer: return false
        }
    }
}

/// One logged-in iSCSI session (`struct iscsi_context`), used by one thread at a time.
// SAFETY: @unchecked Sendable because the owner hands a connection to one borrower at a time
// (ISCSISession's idle list); libiscsi keeps no thread-local or global state for a context.
public final class ISCSIConnection: @unchecked Sendable {
    private let context: OpaquePointer
    public let portal: String
    public let target: String
    /// Set once a command lost the session or timed out: the connection must not be reused.
    public private(set) var isBroken = false

    /// Connects to `portal` ("host:port"), logs in to `target` as `initiator`, with CHAP when
    /// `chap` is given, all within `connectTimeout` seconds (`iscsi_full_connect_async` driven by
    /// poll here, so the TCP connect is bounded too). Commands then time out after
    /// `commandTimeout` seconds (`iscsi_set_timeout`).
    public init(portal: String, target: String, initiator: String, chap: (user: String, secret: String)?,
                connectTimeout: Double, commandTimeout: Int) throws {
        self.portal = portal
        self.target = target
        self.timeout = max(1, commandTimeout)
        guard let context = iscsi_create_context(initiator) else {
            throw ISCSIError.login(portal: portal, target: target, message: "iscsi_create_context failed (initiator name '\(initiator)')")
        }
        self.context = context
        iscsi_set_noautoreconnect(context, 1)
        iscsi_set_reconnect_max_retries(context, 0)
        iscsi_set_timeout(context, Int32(max(1, commandTimeout)))
        iscsi_set_session_type(context, ISCSI_SESSION_NORMAL)
        iscsi_set_header_digest(context, ISCSI_HEADER_DIGEST_NONE_CRC32C)
        // Once `context` is set, every throw below runs deinit, which destroys the context.
        func fail(_ message: String) -> ISCSIError {
            .login(portal: portal, target: target, message: message)
        }
        guard iscsi_set_targetname(context, target) == 0 else { throw fail(Self.errorText(context)) }
        if let chap, iscsi_set_initiator_username_pwd(context, chap.user, chap.secret) != 0 {
            throw fail(Self.errorText(context))
        }
        let done = connected
        // SAFETY: `connected` lives as long as the connection, so as long as the context that
        // may call back with this pointer (also when it is destroyed).
        let opaque = Unmanaged.passUnretained(done).toOpaque()
        // LUN 0 answers the TEST UNIT READY that a full connect sends after login (every target
        // has a LUN 0: SPC's REPORT LUNS well-known LUN).
        let started = iscsi_full_connect_async(context, portal, 0, { _, status, _, data in
            // SAFETY: `data` is the connection's Completion, alive while its context is.
            let done = Unmanaged<Completion>.fromOpaque(data!).takeUnretainedValue()
            done.status = status
            done.finished = true
        }, opaque)
        guard started == 0 else { throw fail(Self.errorText(context)) }
        let deadline = monotonicNow() + connectTimeout
        while !done.finished {
            let left = deadline - monotonicNow()
            guard left > 0 else { throw fail("no answer within \(connectTimeout) s") }
            var pfd = pollfd(fd: iscsi_get_fd(context), events: Int16(truncatingIfNeeded: iscsi_which_events(context)), revents: 0)
            let ready = poll(&pfd, 1, Int32(min(left, 0.25) * 1000) + 1)
            if ready < 0 && errno != EINTR { throw fail("poll: \(String(cString: strerror(errno)))") }
            if ready > 0, pfd.revents & Int16(POLLERR | POLLHUP) != 0, let reason = Self.socketError(pfd.fd) {
                // libiscsi's own text for a failed TCP connect is "can not reconnect right now".
                throw fail(reason)
            }
            if iscsi_service(context, ready > 0 ? Int32(pfd.revents) : 0) < 0 && !done.finished {
                throw fail(Self.errorText(context))
            }
        }
        guard done.status == Int32(bitPattern: SCSI_STATUS_GOOD.rawValue) else { throw fail(Self.errorText(context)) }
    }

    deinit {
        // No logout: a broken session cannot, and a target tears down a closed one anyway.
        iscsi_destroy_context(context)
    }

    private let connected = Completion()

    private final class Completion {
        var finished = false
        var status: Int32 = 0
    }

    /// The pending error of a socket (SO_ERROR), as strerror says it; nil if none.
    private static func socketError(_ fd: Int32) -> String? {
        var error: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length) == 0, error != 0 else { return nil }
        return String(cString: strerror(error))
    }

    private static func errorText(_ context: OpaquePointer) -> String {
        guard let text = iscsi_get_error(context) else { return "unknown error" }
        let message = String(cString: text)
        return message.isEmpty ? "unknown error" : message
    }

    /// Sets the time limit for the next commands (`iscsi_set_timeout`, whole seconds).
    public func setCommandTimeout(_ seconds: Int) {
        timeout = max(1, seconds)
        iscsi_set_timeout(context, Int32(timeout))
    }
    private var timeout: Int

    /// Runs one synchronous libiscsi call and checks its task; retries a UNIT ATTENTION (the
    /// reset a fresh session reports once per LUN). The caller frees the task it gets.
    private func command(_ operation: String, _ issue: (OpaquePointer) -> UnsafeMutablePointer<scsi_task>?) throws -> UnsafeMutablePointer<scsi_task> {
        precondition(!isBroken, "a broken iSCSI connection was used again")
        var attempts = 0
        while true {
            guard let task = issue(context) else {
                isBroken = true
                throw ISCSIError.connectionLost(operation: operation, message: Self.errorText(context))
            }
            let status = task.pointee.status
            if status == Int32(bitPattern: SCSI_STATUS_GOOD.rawValue) { return task }
            let sense = task.pointee.sense
            scsi_free_scsi_task(task)
            switch status {
            case Int32(bitPattern: SCSI_STATUS_TIMEOUT.rawValue):
                isBroken = true
                throw ISCSIError.timedOut(operation: operation, seconds: timeout)
            case Int32(bitPattern: SCSI_STATUS_CANCELLED.rawValue), Int32(bitPattern: SCSI_STATUS_ERROR.rawValue):
                isBroken = true
                throw ISCSIError.connectionLost(operation: operation, message: Self.errorText(context))
            case Int32(bitPattern: SCSI_STATUS_CHECK_CONDITION.rawValue) where sense.key == SCSI_SENSE_UNIT_ATTENTION && attempts < 3:
                attempts += 1
                continue
            default:
                throw ISCSIError.scsi(operation: operation, status: status, senseKey: Int32(sense.key.rawValue),
                                      asc: Int32(sense.ascq >> 8), ascq: Int32(sense.ascq & 0xff), message: Self.errorText(context))
            }
        }
    }

    /// REPORT LUNS (`iscsi_reportluns_sync`): the LUN numbers the target reports.
    public func reportLuns() throws -> [Int] {
        var allocation: Int32 = 16 + 8 * 64
        while true {
            let task = try command("REPORT LUNS") { iscsi_reportluns_sync($0, 0, allocation) }
            defer { scsi_free_scsi_task(task) }
            // The list's length (bytes 0-3) says whether the allocation held it all.
            if task.pointee.datain.size >= 4, let data = task.pointee.datain.data {
                let listLength = Int32(data[0]) << 24 | Int32(data[1]) << 16 | Int32(data[2]) << 8 | Int32(data[3])
                if listLength + 8 > allocation && allocation < 1 << 20 {
                    allocation = listLength + 8
                    continue
                }
            }
            guard let raw = scsi_datain_unmarshall(task) else {
                throw ISCSIError.badAnswer(operation: "REPORT LUNS", message: "cannot decode: \(Self.errorText(context))")
            }
            // SAFETY: scsi_datain_unmarshall of a REPORT LUNS task returns a scsi_reportluns_list
            // owned by the task, read before the task is freed.
            let list = raw.assumingMemoryBound(to: scsi_reportluns_list.self)
            return (0..<list.pointee.num).map { Int(ciscsi_reportluns_lun(list, $0)) }
        }
    }

    /// Standard INQUIRY (`iscsi_inquiry_sync`): the peripheral qualifier and device type (0 is a
    /// direct-access block device).
    public func inquiry(lun: Int) throws -> (qualifier: Int, deviceType: Int) {
        let task = try command("INQUIRY LUN \(lun)") { iscsi_inquiry_sync($0, Int32(lun), 0, 0, 64) }
        defer { scsi_free_scsi_task(task) }
        guard let raw = scsi_datain_unmarshall(task) else {
            throw ISCSIError.badAnswer(operation: "INQUIRY LUN \(lun)", message: "cannot decode: \(Self.errorText(context))")
        }
        // SAFETY: an INQUIRY without EVPD unmarshalls to scsi_inquiry_standard, owned by the task.
        let standard = raw.assumingMemoryBound(to: scsi_inquiry_standard.self).pointee
        return (Int(standard.qualifier.rawValue), Int(standard.device_type.rawValue))
    }

    /// INQUIRY VPD page 0x80 (unit serial number), or nil when the LUN has none.
    public func unitSerialNumber(lun: Int) throws -> String? {
        let operation = "INQUIRY VPD 0x80 LUN \(lun)"
        let task: UnsafeMutablePointer<scsi_task>
        do {
            task = try command(operation) {
                iscsi_inquiry_sync($0, Int32(lun), 1, Int32(SCSI_INQUIRY_PAGECODE_UNIT_SERIAL_NUMBER.rawValue), 255)
            }
        } catch ISCSIError.scsi { return nil }
        defer { scsi_free_scsi_task(task) }
        guard let raw = scsi_datain_unmarshall(task) else { return nil }
        // SAFETY: VPD page 0x80 unmarshalls to scsi_inquiry_unit_serial_number, owned by the task.
        let page = raw.assumingMemoryBound(to: scsi_inquiry_unit_serial_number.self).pointee
        // Often padded with spaces (tgtd: 30 of them before "beaf11").
        return page.usn.map { String(cString: $0).trimmingCharacters(in: .whitespaces) }
    }

    /// READ CAPACITY(16) (`iscsi_readcapacity16_sync`).
    public func readCapacity16(lun: Int) throws -> (lastLBA: UInt64, blockLength: UInt32, provisioning: Bool, zeroesUnmapped: Bool) {
        let task = try command("READ CAPACITY(16) LUN \(lun)") { iscsi_readcapacity16_sync($0, Int32(lun)) }
        defer { scsi_free_scsi_task(task) }
        guard let raw = scsi_datain_unmarshall(task) else {
            throw ISCSIError.badAnswer(operation: "READ CAPACITY(16) LUN \(lun)", message: "cannot decode: \(Self.errorText(context))")
        }
        // SAFETY: READ CAPACITY(16) unmarshalls to scsi_readcapacity16, owned by the task.
        let capacity = raw.assumingMemoryBound(to: scsi_readcapacity16.self).pointee
        return (capacity.returned_lba, capacity.block_length, capacity.lbpme != 0, capacity.lbprz != 0)
    }

    /// READ(16) of `buffer.count / blockLength` blocks at `lba` straight into `buffer`
    /// (`iscsi_read16_iov_sync`).
    public func read16(lun: Int, lba: UInt64, blockLength: Int, into buffer: UnsafeMutableRawBufferPointer) throws {
        precondition(buffer.count % blockLength == 0 && buffer.count > 0, "READ(16) of a partial block")
        let operation = "READ(16) LUN \(lun) LBA \(lba) \(buffer.count) bytes"
        var iov = scsi_iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)
        let task = try command(operation) {
            iscsi_read16_iov_sync($0, Int32(lun), lba, UInt32(buffer.count), Int32(blockLength), 0, 0, 0, 0, 0, &iov, 1)
        }
        defer { scsi_free_scsi_task(task) }
        if task.pointee.residual_status == SCSI_RESIDUAL_UNDERFLOW && task.pointee.residual > 0 {
            throw ISCSIError.badAnswer(operation: operation, message: "\(task.pointee.residual) bytes short")
        }
    }

    /// WRITE(16) of `data` (whole blocks) at `lba` (`iscsi_write16_sync`).
    public func write16(lun: Int, lba: UInt64, blockLength: Int, data: UnsafeRawBufferPointer) throws {
        precondition(data.count % blockLength == 0 && data.count > 0, "WRITE(16) of a partial block")
        // SAFETY: libiscsi only reads the buffer (its parameter is not const-qualified).
        let bytes = UnsafeMutablePointer(mutating: data.baseAddress!.assumingMemoryBound(to: UInt8.self))
        let task = try command("WRITE(16) LUN \(lun) LBA \(lba) \(data.count) bytes") {
            iscsi_write16_sync($0, Int32(lun), lba, bytes, UInt32(data.count), Int32(blockLength), 0, 0, 0, 0, 0)
        }
        scsi_free_scsi_task(task)
    }

    /// WRITE SAME(16) of one zero block over `blocks` blocks at `lba`, with UNMAP when `unmap`
    /// (`iscsi_writesame16_sync`).
    public func writeSameZero16(lun: Int, lba: UInt64, blocks: UInt32, blockLength: Int, unmap: Bool) throws {
        var zero = [UInt8](repeating: 0, count: blockLength)
        let task = try command("WRITE SAME(16) LUN \(lun) LBA \(lba) \(blocks) blocks") { context in
            zero.withUnsafeMutableBufferPointer {
                iscsi_writesame16_sync(context, Int32(lun), lba, $0.baseAddress, UInt32(blockLength), blocks, 0, unmap ? 1 : 0, 0, 0)
            }
        }
        scsi_free_scsi_task(task)
    }

    /// SYNCHRONIZE CACHE(16) of the whole LUN (`iscsi_synchronizecache16_sync`).
    public func synchronizeCache16(lun: Int) throws {
        let task = try command("SYNCHRONIZE CACHE(16) LUN \(lun)") { iscsi_synchronizecache16_sync($0, Int32(lun), 0, 0, 0, 0) }
        scsi_free_scsi_task(task)
    }

    /// One LBA status descriptor: `blocks` blocks from `lba`, mapped or not.
    public struct LBAStatus: Sendable, Equatable {
        public var lba: UInt64
        public var blocks: UInt64
        public var mapped: Bool
    }

    /// GET LBA STATUS from `lba` (`iscsi_get_lba_status_sync`): the descriptors the target
    /// returns (at least the one holding `lba`).
    public func getLBAStatus(lun: Int, lba: UInt64) throws -> [LBAStatus] {
        let operation = "GET LBA STATUS LUN \(lun) LBA \(lba)"
        let task = try command(operation) { iscsi_get_lba_status_sync($0, Int32(lun), lba, 8 + 16 * 64) }
        defer { scsi_free_scsi_task(task) }
        guard let raw = scsi_datain_unmarshall(task) else {
            throw ISCSIError.badAnswer(operation: operation, message: "cannot decode: \(Self.errorText(context))")
        }
        // SAFETY: GET LBA STATUS unmarshalls to scsi_get_lba_status whose descriptors array holds
        // num_descriptors entries, all owned by the task.
        let status = raw.assumingMemoryBound(to: scsi_get_lba_status.self).pointee
        guard status.num_descriptors > 0, let descriptors = status.descriptors else { return [] }
        return (0..<Int(status.num_descriptors)).map { i in
            let d = descriptors[i]
            return LBAStatus(lba: d.lba, blocks: UInt64(d.num_blocks), mapped: d.provisioning == SCSI_PROVISIONING_TYPE_MAPPED)
        }
    }
}

func monotonicNow() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
