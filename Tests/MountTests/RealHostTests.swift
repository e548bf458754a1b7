import Foundation
import TestSupport
import Testing

/// Tests that need a loaded zfs module. Where it is missing (this project's machine has none)
/// each prints `SKIPPED:` and what it would have checked. On such a host, as root:
/// `POOLFS_BIN=.build/debug/poolfs swift test --filter RealHostTests`. LVM against a real
/// device-mapper kernel is DeviceMapperVMTests, which boots one in QEMU and is never skipped.
@Suite("real zfs hosts", .serialized)
struct RealHostTests {
    static var hasZfs: Bool {
        FileManager.default.fileExists(atPath: "/dev/zfs") && (try? Shell.run("command -v zpool && command -v zfs", in: "/")) != nil
    }

    /// zvols and their snapshots, with snapdev hidden before the mount and after it.
    @Test func zfsVolumesAndSnapshots() throws {
        guard Self.hasZfs else {
            print("SKIPPED: zfs volumes, snapshots and snapdev restore: no zfs module or tools here (/dev/zfs, zpool, zfs)")
            return
        }
        let scratch = try Scratch()
        let pool = "poolfs\(getpid())"
        try scratch.sh("truncate -s 256M vdev && zpool create -f \(pool) \(scratch.path("vdev"))")
        defer { _ = try? scratch.sh("zpool destroy -f \(pool)") }
        try scratch.sh("""
            zfs create \(pool)/vms && zfs create -V 16M \(pool)/vms/web && udevadm settle &&
            head -c 16777216 /dev/urandom > before && dd if=before of=/dev/zvol/\(pool)/vms/web bs=1M conv=fsync status=none &&
            zfs snapshot \(pool)/vms/web@monday && zfs set snapdev=hidden \(pool)/vms/web &&
            dd if=/dev/zero of=/dev/zvol/\(pool)/vms/web bs=1M count=4 conv=fsync status=none &&
            dd if=/dev/zvol/\(pool)/vms/web of=after bs=1M status=none
            """)
        do {
            let mount = try PoolMount("\(pool)/vms", in: scratch, options: ["type=zfs"])
            defer { mount.unmount() }
            #expect(try contents(mount.path("web")) == contents(scratch.path("after")))
            try scratch.sh("udevadm settle")
            #expect(try contents(mount.path(".snapshots/web/monday")) == contents(scratch.path("before")))
        }
        let snapdev = try scratch.sh("zfs get -H -o value,source snapdev \(pool)/vms/web")
        #expect(snapdev.hasPrefix("hidden\tlocal"), "restored at unmount: \(snapdev)")
    }
}
