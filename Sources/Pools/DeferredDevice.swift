#if canImport(Glibc)
import Glibc
#endif
import Block
import Locking

/// A volume whose device is made on its first read: an LV that must first be activated, or whose
/// exception table or thin mapping must first be read. Its size is known before (the pool's
/// report says it), so lookup, getattr and readdir never wait for the device to be made.
///
/// One thread makes the device while others that need it wait (the maker is bounded: commands
/// have a time limit, reads are local). A failure is kept for `retryAfter` seconds, then the
/// next read tries again (an activation that timed out, a PV that came back).
public final class DeferredDevice: BlockDevice {
    public let size: UInt64
    /// Whether `status` may make the device: reading local metadata is fine on a getattr, an
    /// activation is not. Until it is made, such a device reports every byte as data.
    let statusMakesDevice: Bool
    private let make: @Sendable () throws -> any BlockDevice
    private let made = Locked<(result: Result<any BlockDevice, any Error>, at: Double)?>(nil)
    private let making = Locked<Void>(())
    static let retryAfter = 2.0

    public init(size: UInt64, statusMakesDevice: Bool, make: @escaping @Sendable () throws -> any BlockDevice) {
        self.size = size
        self.statusMakesDevice = statusMakesDevice
        self.make = make
    }

    /// The device, made now if it was not yet (or failed long enough ago).
    @discardableResult
    public func device() throws -> any BlockDevice {
        if let known = current() { return try known.get() }
        return try making.withLock { _ in
            if let known = current() { return try known.get() }
            let result = Result { try make() }
            made.withLock { $0 = (result, RefreshedValue<Int>.now()) }
            return try result.get()
        }
    }

    /// What was made, unless it is a failure old enough to try again.
    private func current() -> Result<any BlockDevice, any Error>? {
        guard let (result, at) = made.withLock({ $0 }) else { return nil }
        if case .failure = result, RefreshedValue<Int>.now() - at >= Self.retryAfter { return nil }
        return result
    }

    public func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        let device = try device()
        // The report and the device disagree only while the LV changes; past the device's end, zeros.
        let inside = offset >= device.size ? 0 : Int(min(UInt64(length), device.size - offset))
        if inside > 0 { try device.plan(at: offset, length: inside, into: &plan) }
        plan.appendZero(length - inside)
    }

    public func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        let device: (any BlockDevice)? = statusMakesDevice ? try self.device() : (try? current()?.get())
        guard let device else {
            return extents.appendMerging(MapExtent(start: offset, length: length, depth: 0, present: true, zero: false, data: true))
        }
        let inside = offset >= device.size ? 0 : min(length, device.size - offset)
        if inside > 0 { try device.status(at: offset, length: inside, detection: detection, into: &extents) }
        extents.appendMerging(MapExtent(start: offset + inside, length: length - inside, depth: 0, present: false, zero: true, data: false))
    }
}
