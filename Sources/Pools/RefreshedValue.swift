#if canImport(Glibc)
import Glibc
#endif
import Synchronization

/// What a pool command last said (an `lvs` report, a `zfs list`), asked again once older than
/// `lifetime` seconds, so that changes show within it without running the command on every
/// operation. A failing command keeps the last answer.
final class RefreshedValue<Value: Sendable>: Sendable {
    private let query: @Sendable () throws -> Value
    private let lifetime: Double
    private let state: Mutex<(value: Value, at: Double)>

    /// Runs `query` once now: a pool that cannot be listed fails to open.
    init(lifetime: Double, query: @escaping @Sendable () throws -> Value) throws {
        self.query = query
        self.lifetime = lifetime
        state = Mutex((try query(), Self.now()))
    }

    var value: Value {
        let (value, at) = state.withLock { $0 }
        guard Self.now() - at >= lifetime, let fresh = try? query() else { return value }
        state.withLock { $0 = (fresh, Self.now()) }
        return fresh
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
