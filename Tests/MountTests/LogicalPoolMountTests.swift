import Foundation
import TestSupport
import Testing

/// An LVM volume group on loop devices, mounted with `--type logical -o noactivate`: LVs are read
/// from their PVs through the extent map (this kernel has no device-mapper; see PoolsTests for
/// the sector-by-sector mapping check, including striped LVs).
@Suite("mounted LVM pools", .serialized)
struct LogicalPoolMountTests {
    @Test func linearVolumesReadThroughTheMount() throws {
        let scratch = try Scratch()
        let group = try LoopVolumeGroup("poolfsmnt\(getpid())", in: scratch)
        defer { group.remove() }
        let vg = group.name
        let loops = group.loops
        let lvm = LoopVolumeGroup.lvm
        try group.createVolume("-L 12M -n data")
        try group.createVolume("-L 8M -i 2 -I 64k -n striped")
        // `data` is one linear segment on the first PV, from extent 0: write 12 MiB there.
        let pvs = try scratch.sh("\(lvm) pvs --noheadings -o pe_start --units b --nosuffix \(loops[0])").trimmingCharacters(in: .whitespacesAndNewlines)
        let ranges = try scratch.sh("\(lvm) lvs --noheadings -o seg_pe_ranges \(vg)/data").trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(ranges == "\(loops[0]):0-2")
        try scratch.sh("head -c 12582912 /dev/urandom > expected && dd if=expected of=pv0 bs=1M seek=\(UInt64(pvs)! >> 20) conv=notrunc status=none")

        let mount = try PoolMount(vg, in: scratch, options: ["type=logical", "noactivate"])
        defer { mount.unmount() }
        #expect(try FileManager.default.contentsOfDirectory(atPath: mount.mountpoint).sorted() == [".partitions", ".snapshots", "data", "striped"])
        #expect(try contents(mount.path("data")) == contents(scratch.path("expected")))
        #expect(try FileManager.default.attributesOfItem(atPath: mount.path("striped"))[.size] as? UInt64 == 8 << 20)
        #expect(try FileManager.default.contentsOfDirectory(atPath: mount.path(".snapshots/data")).isEmpty)

        let table = try scratch.sh("'\(Binary.path)' ls --type logical --noactivate \(vg)")
        #expect(table.contains("data") && table.contains("striped") && table.contains("12M"), "\(table)")
        mount.unmount()

        // Without -o noactivate on a kernel without device-mapper, the extent map is chosen alone.
        let hasDeviceMapper = open("/dev/mapper/control", O_RDWR) >= 0
        if hasDeviceMapper {
            print("SKIPPED: the automatic fallback to extent maps: this kernel has device-mapper")
        } else {
            let plain = try PoolMount(vg, in: scratch, options: ["type=logical"], name: "plain")
            defer { plain.unmount() }
            #expect(try contents(plain.path("data")) == contents(scratch.path("expected")))
        }
    }

    @Test func aMissingVolumeGroupSaysWhatLVMSaid() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir mnt")
        do {
            try scratch.sh("'\(Binary.path)' mount --foreground --type logical nosuchvg\(getpid()) mnt")
            Issue.record("mounting a missing volume group succeeded")
        } catch let error as ShellError {
            #expect(error.status != 0)
            #expect(error.output.contains("`lvs -a -o") && error.output.contains("exited with status 5") &&
                    error.output.contains("Volume group \"nosuchvg\(getpid())\" not found"), "\(error.output)")
        }
        #expect(!PoolMount.isMounted(scratch.path("mnt")))
    }
}
