import Foundation
import TestSupport
import Testing

/// Tests that need a kernel with device-mapper or a loaded zfs module. Where those are missing
/// (this project's machine has neither) each prints `SKIPPED:` and what it would have checked.
/// On such a host, as root: `POOLFS_BIN=.build/debug/poolfs swift test --filter RealHostTests`.
@Suite("real device-mapper and zfs hosts", .serialized)
struct RealHostTests {
    static var hasDeviceMapper: Bool {
        FileManager.default.fileExists(atPath: "/dev/mapper/control")
            && (try? Shell.run("dmsetup targets | grep -q '^linear'", in: "/")) != nil
    }

    static var hasZfs: Bool {
        FileManager.default.fileExists(atPath: "/dev/zfs") && (try? Shell.run("command -v zpool && command -v zfs", in: "/")) != nil
    }

    /// An inactive LV is activated for the mount and deactivated after; a classic snapshot reads
    /// as the origin did when it was taken.
    @Test func lvmActivationAndSnapshots() throws {
        guard Self.hasDeviceMapper else {
            print("SKIPPED: LVM activation and snapshot reads: no device-mapper here (/dev/mapper/control or the linear target missing)")
            return
        }
        let scratch = try Scratch()
        let vg = "poolfsdm\(getpid())"
        try scratch.sh("truncate -s 128M pv && losetup --show -f pv > loop")
        let loop = try String(contentsOfFile: scratch.path("loop"), encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        defer { _ = try? scratch.sh("vgremove -f \(vg); pvremove -f \(loop); losetup -d \(loop)") }
        try scratch.sh("""
            pvcreate -q \(loop) && vgcreate -q \(vg) \(loop) && lvcreate -q -y -L 16M -n disk \(vg) &&
            head -c 16777216 /dev/urandom > before && dd if=before of=/dev/\(vg)/disk bs=1M conv=fsync status=none &&
            lvcreate -q -s -L 8M -n disk-snap \(vg)/disk &&
            dd if=/dev/zero of=/dev/\(vg)/disk bs=1M count=4 conv=fsync status=none &&
            dd if=/dev/\(vg)/disk of=after bs=1M status=none && lvchange -an \(vg)/disk
            """)
        do {
            let mount = try PoolMount(vg, in: scratch, options: ["type=logical"])
            defer { mount.unmount() }
            #expect(try contents(mount.path("disk")) == contents(scratch.path("after")))
            #expect(try contents(mount.path(".snapshots/disk/disk-snap")) == contents(scratch.path("before")))
        }
        let active = try scratch.sh("lvs --noheadings -o lv_active \(vg)/disk").trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(active.isEmpty || active == "inactive", "deactivated again at unmount, as it was before")
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
