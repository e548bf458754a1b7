#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Locking

/// The policy over `ISCSIConnection`: a few connections to one target, each lent to one thread at
/// a time (libiscsi contexts are not thread-safe), so that several reads are in flight at once.
///
/// Every operation has a deadline (`operationBound` seconds): waiting for a free connection,
/// connecting and the command itself all fit in it, so a target that went away or hangs turns a
/// read into an error within the bound, never a hang. A connection that lost its session or timed
/// out is dropped; the next operation connects anew, so reads work again once the target is back.
/// A connection that sat idle may have died with a target that restarted meanwhile: when one
/// fails that way, the others idle are dropped too and the operation is tried once more on a
/// fresh connection.
final class ISCSISession: Sendable {
    struct Config: Sendable {
        var portal: String
        var target: String
        var initiator: String
        var chap: Credentials?
        var maxConnections = 4
        /// Seconds one operation may take in all, from the request to its answer.
        var operationBound = 8.0
        /// Seconds a connect and login may take.
        var connectTimeout = 4.0
    }

    struct Credentials: Sendable {
        var user: String
        var secret: String
    }

    let config: Config
    private let slots: DispatchSemaphore
    private let idle = Locked<[ISCSIConnection]>([])

    /// Connects once now, so that a wrong target, a refused connection or a rejected CHAP
    /// secret fails the mount with the login's message.
    init(_ config: Config) throws {
        self.config = config
        slots = DispatchSemaphore(value: max(1, config.maxConnections))
        let first = try connect(deadline: monotonicNow() + config.operationBound)
        idle.withLock { $0.append(first) }
    }

    private func connect(deadline: Double) throws -> ISCSIConnection {
        let left = deadline - monotonicNow()
        guard left > 0 else { throw ISCSIError.timedOut(operation: "connect to \(config.target)", seconds: Int(config.operationBound)) }
        return try ISCSIConnection(portal: config.portal, target: config.target, initiator: config.initiator,
                                   chap: config.chap.map { ($0.user, $0.secret) },
                                   connectTimeout: min(config.connectTimeout, left), commandTimeout: Int(config.connectTimeout))
    }

    /// Runs `body` on a connection that no other thread uses meanwhile, within the bound.
    func withConnection<R>(_ operation: String, _ body: (ISCSIConnection) throws -> R) throws -> R {
        let deadline = monotonicNow() + config.operationBound
        guard slots.wait(timeout: .now() + config.operationBound) == .success else {
            throw ISCSIError.timedOut(operation: operation + " (waiting for a free connection)", seconds: Int(config.operationBound))
        }
        defer { slots.signal() }
        var connection = idle.withLock { $0.popLast() }
        let reused = connection != nil
        if connection == nil { connection = try connect(deadline: deadline) }
        do {
            return try run(body, on: connection!, deadline: deadline)
        } catch let error as ISCSIError where error.breaksConnection && reused && !isTimeout(error) {
            // The target may have restarted while the connection sat idle: the others are as
            // stale. One more try on a fresh connection.
            idle.withLock { $0.removeAll() }
            return try run(body, on: try connect(deadline: deadline), deadline: deadline)
        }
    }

    private func isTimeout(_ error: ISCSIError) -> Bool {
        if case .timedOut = error { return true }
        return false
    }

    private func run<R>(_ body: (ISCSIConnection) throws -> R, on connection: ISCSIConnection, deadline: Double) throws -> R {
        // libiscsi's timeouts are whole seconds, checked about once a second.
        connection.setCommandTimeout(max(1, Int(deadline - monotonicNow())))
        defer { if !connection.isBroken { idle.withLock { $0.append(connection) } } }
        return try body(connection)
    }

    /// Drops every idle connection (unmount).
    func close() {
        idle.withLock { $0.removeAll() }
    }
}
