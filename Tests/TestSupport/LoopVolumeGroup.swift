import Foundation

/// An LVM volume group on two 64 MiB loop devices backed by `pv0` and `pv1` in a scratch
/// directory, made with lvm2's `--driverloaded n`, so no device-mapper is needed. Call `remove()`
/// in a `defer`; a group that fails halfway through creation removes itself before throwing.
public final class LoopVolumeGroup {
    /// Environment for lvm2 commands: quiet about descriptors the test process inherits.
    public static let lvm = "LVM_SUPPRESS_FD_WARNINGS=1"
    public static let backingFiles = ["pv0", "pv1"]

    public let name: String
    /// The loop devices, in `backingFiles` order.
    public private(set) var loops: [String] = []
    private let scratch: Scratch

    public init(_ name: String, in scratch: Scratch) throws {
        self.name = name
        self.scratch = scratch
        do {
            for file in Self.backingFiles {
                try scratch.sh("truncate -s 64M \(file)")
                loops.append(try scratch.sh("losetup --show -f \(file)").trimmingCharacters(in: .whitespacesAndNewlines))
            }
            let devices = loops.joined(separator: " ")
            try scratch.sh("\(Self.lvm) pvcreate -q --driverloaded n \(devices) && \(Self.lvm) vgcreate -q --driverloaded n \(name) \(devices)")
        } catch {
            remove()
            throw error
        }
    }

    /// `lvcreate` with these arguments (size, name, stripes...), inactive and not zeroed.
    public func createVolume(_ arguments: String) throws {
        try scratch.sh("\(Self.lvm) lvcreate -q --driverloaded n -an -Zn \(arguments) \(name)")
    }

    public func remove() {
        guard !loops.isEmpty else { return }
        let devices = loops.joined(separator: " ")
        _ = try? scratch.sh("\(Self.lvm) vgremove -f --driverloaded n \(name); \(Self.lvm) pvremove -f --driverloaded n \(devices); losetup -d \(devices)")
        loops = []
    }
}
