#if canImport(Glibc)
import Glibc
#endif

/// A value behind a pthread mutex: `Synchronization.Mutex`'s `withLock`, with a lock that
/// ThreadSanitizer sees.
///
/// Why not `Mutex`: on Linux it is a priority-inheriting futex whose contended hand-off happens
/// inside the kernel (FUTEX_UNLOCK_PI gives the lock to the waiter) and in uninstrumented
/// libswiftSynchronization, so TSan never sees that lock's release-acquire and reports every
/// contended critical section as a race: `make test-sanitizers` would be noise, and a real race
/// would drown in it. `pthread_mutex_lock`/`unlock` are intercepted by TSan; uncontended they
/// cost what `Mutex` does (one atomic each way), contended they park on a plain futex.
public final class Locked<Value: ~Copyable>: @unchecked Sendable {
    // SAFETY: `value` is only touched between pthread_mutex_lock and pthread_mutex_unlock of
    // `mutex`, whose memory is fixed for the life of the object.
    @usableFromInline let mutex: UnsafeMutablePointer<pthread_mutex_t>
    @usableFromInline var value: Value

    public init(_ initial: consuming Value) {
        mutex = .allocate(capacity: 1)
        mutex.initialize(to: pthread_mutex_t())
        let rc = pthread_mutex_init(mutex, nil)
        precondition(rc == 0, "pthread_mutex_init: \(rc)")
        value = initial
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Runs `body` with the value, holding the lock (pthread_mutex_lock / pthread_mutex_unlock).
    /// Inlinable, as `Mutex.withLock` is: the block cache takes it on every lookup, and a
    /// cross-module generic call would box the closure and the value's metadata each time.
    @inlinable
    public func withLock<R: ~Copyable, E: Error>(_ body: (inout Value) throws(E) -> R) throws(E) -> R {
        // Only EINVAL or EDEADLK can come back, and either would be our own bug. The call stays
        // outside `precondition`, which -Ounchecked may drop whole.
        let rc = pthread_mutex_lock(mutex)
        precondition(rc == 0, "pthread_mutex_lock: \(rc)")
        defer { pthread_mutex_unlock(mutex) }
        return try body(&value)
    }
}
