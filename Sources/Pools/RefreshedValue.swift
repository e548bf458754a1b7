#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Locking

/// What a pool command last said (an `lvs` report, a `zfs list`), asked again once older than
/// `lifetime` seconds, so that changes show within it without running the command on every
/// operation. A failing command keeps the last answer.
///
/// The command runs on a thread of its own, one at a time. Only a listing waits for it, at most
/// `wait` seconds; everything else gets the last answer. So a slow command (lvs waiting on a
/// volume group lock that an activation holds) never holds up reads, lookups or getattr, and
/// holds up readdir 0.5 s at most.
final class RefreshedValue<Value: Sendable>: Sendable {
    private struct State {
        var value: Value
        var at: Double
        /// The refresh under way, if any: waiters wait on it.
        var refreshing: DispatchGroup?
    }

    private let query: @Sendable () throws -> Value
    private let lifetime: Double
    private let wait: Double
    private let state: Locked<State>

    /// Runs `query` once now: a pool that cannot be listed fails to open.
    init(lifetime: Double, wait: Double = 0.5, query: @escaping @Sendable () throws -> Value) throws {
        self.query = query
        self.lifetime = lifetime
        self.wait = wait
        state = Locked(State(value: try query(), at: Self.now(), refreshing: nil))
    }

    /// The last answer, at once. Once it is old, a refresh starts on its own thread and a later
    /// call sees its result: reads and lookups never wait for the command.
    var value: Value { current(waiting: false) }

    /// The last answer once it is fresh: when it is old, waits for a refresh up to `wait`
    /// seconds (listing a directory, where a new volume should show at once).
    var fresh: Value { current(waiting: true) }

    private func current(waiting: Bool) -> Value {
        let (value, refresh, start) = state.withLock { state -> (Value, DispatchGroup?, Bool) in
            if let running = state.refreshing { return (state.value, running, false) }
            guard Self.now() - state.at >= lifetime else { return (state.value, nil, false) }
            let group = DispatchGroup()
            group.enter()
            state.refreshing = group
            return (state.value, group, true)
        }
        guard let refresh else { return value }
        if start {
            DispatchQueue.global().async { [self] in
                let fresh = try? query()
                state.withLock { state in
                    if let fresh { state.value = fresh }
                    // A failure is asked again after a lifetime too, not on every call.
                    state.at = Self.now()
                    state.refreshing = nil
                }
                refresh.leave()
            }
        }
        guard waiting, refresh.wait(timeout: .now() + wait) == .success else { return value }
        return state.withLock { $0.value }
    }

    /// Waits up to `seconds` for a refresh running in the background to end, so that whoever
    /// lets the value go (a pool released before the process exits) leaves no query behind.
    func settle(seconds: Double) {
        guard let running = state.withLock({ $0.refreshing }) else { return }
        _ = running.wait(timeout: .now() + seconds)
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
    }
}
