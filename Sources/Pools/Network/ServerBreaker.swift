import Block
import Locking
#if canImport(Glibc)
import Glibc
#endif

/// Keeps one request from paying a server's timeout many times over: after a call times out,
/// every call of the next three `timeout`s fails at once with EIO (a lookup, an fstat, a reopen and
/// a read would otherwise each wait the whole bound), then one call tries the server again.
final class ServerBreaker: Sendable {
    let timeout: Duration
    let location: String
    private let downUntil = Locked<ContinuousClock.Instant?>(nil)

    init(timeout: Double, location: String) {
        self.timeout = .milliseconds(Int(timeout * 1000))
        self.location = location
    }

    /// Runs `body` unless the server timed out lately; a failure that took most of the bound
    /// counts as the server not answering.
    func guarded<T>(_ body: () throws(Qcow2Error) -> T) throws(Qcow2Error) -> T {
        let now = ContinuousClock.now
        if let until = downUntil.withLock({ $0 }), now < until {
            throw .io(errno: EIO, operation: "no call (the server did not answer lately; trying again in under \(timeout * 3))", path: location)
        }
        do {
            let result = try body()
            downUntil.withLock { $0 = nil }
            return result
        } catch {
            if ContinuousClock.now - now >= timeout * 0.9 {
                let until = ContinuousClock.now + timeout * 3
                downUntil.withLock { $0 = until }
            }
            throw error
        }
    }
}
