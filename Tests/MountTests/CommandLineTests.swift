import Foundation
import TestSupport
import Testing

/// The `poolfs` command as users run it: errors before mounting, the fstab form, mount(8).
@Suite("poolfs command line")
struct CommandLineTests {
    func poolfs(_ arguments: String, in scratch: Scratch) -> (status: Int32, output: String) {
        runPoolfs(arguments, in: scratch)
    }

    @Test func startupErrorsAreClearAndLeaveNothingMounted() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir pool mnt && qemu-img create -q -f qcow2 pool/a.qcow2 1M")
        let missingPool = poolfs("mount --foreground nowhere/pool mnt", in: scratch)
        #expect(missingPool.status != 0 && missingPool.output == "poolfs: pool nowhere/pool does not exist\n")
        let missingName = poolfs("mount --foreground nosuchpool mnt", in: scratch)
        #expect(missingName.status != 0 && missingName.output.contains("no libvirt pool definition /etc/libvirt/storage/nosuchpool.xml"))
        let missingMountpoint = poolfs("mount --foreground pool nowhere", in: scratch)
        #expect(missingMountpoint.status != 0 && missingMountpoint.output == "poolfs: mountpoint nowhere does not exist\n")
        let badOption = poolfs("mount --foreground -o cache_size=lots pool mnt", in: scratch)
        #expect(badOption.status != 0 && badOption.output == "poolfs: bad option cache_size=lots: 'lots' is not a size\n")
        let wrongType = poolfs("mount --foreground --type sheepdog pool mnt", in: scratch)
        #expect(wrongType.status != 0 && wrongType.output.contains("pool type 'sheepdog' is not supported yet"))
        let notGluster = poolfs("mount --foreground --type gluster pool mnt", in: scratch)
        #expect(notGluster.status != 0 && notGluster.output.contains("gluster://HOST[:PORT]/VOLUME[/DIR]"), "\(notGluster.output)")
        let badNFS = poolfs("mount --foreground nfs://127.0.0.1/export?mystery=1 mnt", in: scratch)
        #expect(badNFS.status != 0 && badNFS.output.contains("version=3|4"), "\(badNFS.output)")
        let noZfs = poolfs("mount --foreground --type zfs tank/vms mnt", in: scratch)
        #expect(noZfs.status != 0 && noZfs.output.contains("`zfs list -H -p") && noZfs.output.contains("exited with status"),
                "a missing or failing zfs command is named: \(noZfs.output)")
        #expect(!PoolMount.isMounted(scratch.path("mnt")))

        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        let busy = poolfs("mount --foreground pool mnt", in: scratch)
        #expect(busy.status != 0 && busy.output == "poolfs: mountpoint \(scratch.path("mnt")) is busy: something is already mounted there\n")
        #expect(FileManager.default.fileExists(atPath: mount.path("a.qcow2")), "the first mount still works")
    }

    /// `poolfs SOURCE MOUNTPOINT -o OPTIONS`, as mount.fuse3 runs it: daemonizes once mounted.
    @Test func fstabFormDaemonizesAndUnmounts() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir pool mnt && qemu-img create -q -f qcow2 pool/a.qcow2 1M && qemu-io -c 'write -P 0x44 0 4k' pool/a.qcow2 >/dev/null")
        let started = poolfs("pool mnt -o cache_size=8M,noatime,allow_other,default_permissions", in: scratch)
        #expect(started.status == 0, "\(started.output)")
        defer { _ = try? scratch.sh("fusermount3 -u mnt") }
        #expect(PoolMount.isMounted(scratch.path("mnt")), "mounted by the time the command returns")
        #expect(try contents(scratch.path("mnt/a.qcow2")).prefix(4096) == Data(repeating: 0x44, count: 4096))
        let options = try scratch.sh("grep ' \(scratch.path("mnt")) ' /proc/self/mountinfo")
        #expect(options.contains("fuse.poolfs") && options.contains("allow_other") && options.contains("ro,"))
        let stopped = poolfs("unmount mnt", in: scratch)
        #expect(stopped.status == 0 && !PoolMount.isMounted(scratch.path("mnt")))
    }

    /// mount(8) runs helpers with a fixed PATH, so poolfs must be installed to be found there;
    /// `make install` does that. This test installs a link for its own run when none is there.
    @Test func mountTypeFusePoolfs() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir pool mnt && qemu-img create -q -f qcow2 pool/a.qcow2 1M")
        let installed = "/usr/local/bin/poolfs"
        var linked = false
        if !FileManager.default.fileExists(atPath: installed) {
            try FileManager.default.createSymbolicLink(atPath: installed, withDestinationPath: Binary.path)
            linked = true
        }
        defer { if linked { try? FileManager.default.removeItem(atPath: installed) } }
        try scratch.sh("mount -t fuse.poolfs \"$PWD/pool\" mnt -o cache_size=4M,defaults,nofail,x-systemd.automount")
        defer { _ = try? scratch.sh("umount mnt") }
        #expect(FileManager.default.fileExists(atPath: scratch.path("mnt/a.qcow2")))
        try scratch.sh("umount mnt")
        #expect(!PoolMount.isMounted(scratch.path("mnt")))
    }

    @Test func lsPrintsATableAndJSON() throws {
        let scratch = try Scratch()
        try SamplePool.build(in: scratch)
        let table = try scratch.sh("'\(Binary.path)' ls pool")
        let lines = table.split(separator: "\n")
        #expect(lines.first?.hasPrefix("VOLUME") == true)
        #expect(lines.count == SamplePool.volumes.count + 1)
        #expect(lines.contains { $0.hasPrefix("top.qcow2") && $0.contains("mid.qcow2 (qcow2) -> base.raw (raw)") })
        #expect(lines.first?.contains("BACKS") == true)
        #expect(lines.contains { $0.hasPrefix("base.raw") && $0.contains(" mid.qcow2,top.qcow2 ") }, "\(table)")
        let json = try scratch.sh("'\(Binary.path)' ls --json pool")
        let reports = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [[String: Any]]
        let vm = try #require(reports.first { $0["name"] as? String == "vm.qcow2" })
        #expect(vm["format"] as? String == "qcow2")
        #expect(vm["virtual_size"] as? Int == 12 << 20)
        let snapshots = vm["snapshots"] as! [[String: Any]]
        #expect(snapshots.map { $0["file"] as! String } == ["daily@1", "daily@2", "lesson%2F1"])
        #expect(snapshots.map { $0["virtual_size"] as! Int } == [4 << 20, 12 << 20, 12 << 20])
        // Which volumes each one backs, at any depth.
        let backs = Dictionary(uniqueKeysWithValues: reports.map { ($0["name"] as! String, $0["backs"] as! [String]) })
        #expect(backs["base.raw"] == ["mid.qcow2", "top.qcow2"])
        #expect(backs["mid.qcow2"] == ["top.qcow2"])
        #expect(backs.filter { !$0.value.isEmpty }.count == 2, "\(backs)")
    }
}

@Suite("permissions")
struct PermissionTests {
    /// Runs `command` as nobody; returns whether it succeeded.
    func asNobody(_ command: String, in scratch: Scratch) -> Bool {
        (try? scratch.sh("setpriv --reuid=65534 --regid=65534 --clear-groups sh -c \"\(command)\" 2>/dev/null")) != nil
    }

    @Test func allowOtherAndDefaultPermissionsBehaveAsInFUSE() throws {
        let scratch = try Scratch()
        try scratch.sh("chmod 755 . && mkdir pool && qemu-img create -q -f qcow2 pool/private.qcow2 1M && qemu-img create -q -f qcow2 pool/shared.qcow2 1M && chmod 600 pool/private.qcow2 && chmod 644 pool/shared.qcow2 && chmod 755 pool")
        do {
            let mount = try PoolMount(scratch.path("pool"), in: scratch, name: "own")
            defer { mount.unmount() }
            #expect(!asNobody("ls \(mount.mountpoint)", in: scratch), "without allow_other only the mounting user gets in")
        }
        do {
            let mount = try PoolMount(scratch.path("pool"), in: scratch, options: ["allow_other"], name: "open")
            defer { mount.unmount() }
            #expect(asNobody("head -c1 \(mount.path("private.qcow2")) >/dev/null", in: scratch),
                    "allow_other without default_permissions: FUSE checks nothing")
        }
        do {
            let mount = try PoolMount(scratch.path("pool"), in: scratch, options: ["allow_other,default_permissions"], name: "checked")
            defer { mount.unmount() }
            #expect(!asNobody("head -c1 \(mount.path("private.qcow2")) >/dev/null", in: scratch), "a 0600 image stays private")
            #expect(asNobody("head -c1 \(mount.path("shared.qcow2")) >/dev/null", in: scratch), "a 0644 image is readable")
            #expect(asNobody("ls \(mount.path(".snapshots/shared.qcow2"))", in: scratch), "snapshot directories are open to all")
        }
    }
}
