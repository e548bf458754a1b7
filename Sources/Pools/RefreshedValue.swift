#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Synchronization

/// What a pool command last said (an `lvs` report, a `zfs list`), asked again once older than
/// `lifetime` seconds, so that changes show within it without running the command on every
/// operation. A failing command keeps the last answer.
///
/// The command runs on a thread of its own, one at a time, and a caller waits for it at most
/// `wait` seconds: past that it gets the last answer. So a slow command (lvs waiting on a volume
/// group lock that an activation holds) never holds up lookups, getattr or readdir.
final class RefreshedValue<Value: Sendable>: Sendable {
    private struct State {
        var value: Value
        var at: Double
        var refreshing: Bool
    }

    private let query: @Sendable () throws -> Value
    private let lifetime: Double
    private let wait: Double
    private let state: Mutex<State>

    /// Runs `query` once now: a pool that cannot be listed fails to open.
    init(lifetime: Double, wait: Double = 0.5, query: @escaping @Sendable () throws -> Value) throws {
        self.query = query
        self.lifetime = lifetime
        self.wait = wait
        state = Mutex(State(value: try query(), at: Self.now(), refreshing: false))
    }

    var value: Value {
        let (value, stale, start) = state.withLock { state in
            let stale = Self.now() - state.at >= lifetime
            let start = stale && !state.refreshing
            if start { state.refreshing = true }
            return (state.value, stale, start)
        }
        guard stale else { return value }
        let done = DispatchSemaphore(value: 0)
        if start {
            DispatchQueue.global().async { [self] in
                let fresh = try? query()
                state.withLock { state in
                    if let fresh { state.value = fresh }
                    // A failure is asked again after a lifetime too, not on every call.
                    state.at = Self.now()
                    state.refreshing = false
                }
                done.signal()
            }
        }
        // Only the caller that started the refresh waits for it; the others take the last answer.
        guard start, done.wait(timeout: .now() + wait) == .success else { return value }
        return state.withLock { $0.value }
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
