#if canImport(Glibc)
import Glibc
#endif
import Foundation
import TestSupport
import Testing

/// RBD pools of a one-node Ceph of the test's own, mounted through the built binary and
/// compared with `rbd export` and `rbd diff`.
@Suite("RBD mounts", .enabled(if: CephCluster.available))
struct RBDMountTests {
    /// Image files, snapshot files and a clone read as their exports; allocation as `rbd diff`;
    /// snapshots taken while mounted show up.
    @Test func imagesAndSnapshotsMountAsTheirExports() throws {
        let cluster = try CephCluster.shared()
        let ns = try cluster.newNamespace()
        let scratch = try Scratch()
        try scratch.sh("head -c 2M /dev/urandom > seed && truncate -s 9M seed && head -c 1M /dev/urandom >> seed")
        try cluster.makeSampleImages(in: ns, from: scratch.path("seed"))
        for spec in ["disk", "child", "disk@before", "disk@after"] {
            try cluster.rbd("export --no-progress \(ns)/\(spec) \(scratch.path(spec + ".raw"))")
        }
        let mount = try PoolMount(ns, in: scratch, options: ["type=rbd,conf=\(cluster.conf)"])
        defer { mount.unmount() }
        #expect(try FileManager.default.contentsOfDirectory(atPath: mount.mountpoint).sorted() == [".partitions", ".snapshots", "child", "disk"])
        try scratch.sh("cmp disk.raw mnt/disk && cmp child.raw mnt/child && cmp disk@before.raw mnt/.snapshots/disk/before && cmp disk@after.raw mnt/.snapshots/disk/after")
        #expect(try dataRanges(of: mount.path("disk")) == (try cluster.diffRanges("\(ns)/disk")))
        #expect(try dataRanges(of: mount.path(".snapshots/disk/before")) == (try cluster.diffRanges("\(ns)/disk@before")))
        let chain = try scratch.sh("getfattr --only-values -n user.poolfs.backing_chain mnt/child")
        #expect(chain.contains("rbd:\(ns)/disk@after"), "\(chain)")
        let attributes = try FileManager.default.attributesOfItem(atPath: mount.path("disk"))
        #expect((attributes[.posixPermissions] as? Int) == 0o444)
        #expect(!scratch.attempt("dd if=/dev/zero of=mnt/disk bs=512 count=1 conv=notrunc 2>&1").ok)

        try cluster.rbd("snap create \(ns)/disk@later")
        var shown = false
        for _ in 0..<30 where !shown {
            shown = (try? FileManager.default.contentsOfDirectory(atPath: mount.path(".snapshots/disk")))?.contains("later") == true
            if !shown { usleep(100_000) }
        }
        #expect(shown, "a snapshot taken while mounted did not show within 3 s")
        try scratch.sh("cmp disk.raw mnt/.snapshots/disk/later")

        let listing = runPoolfs("ls --type rbd -o conf=\(cluster.conf) --json \(ns)", in: scratch)
        // JSONEncoder writes "/" as "\/".
        let json = listing.output.replacingOccurrences(of: "\\/", with: "/")
        #expect(listing.status == 0 && json.contains("rbd:\(ns)/disk@after") && json.contains("\"before\""), "\(listing.output)")
    }

    /// `-o rw` writes that `rbd export` sees; an image another client holds is EBUSY.
    @Test func rwWritesReachTheClusterAndHeldImagesAreBusy() throws {
        let cluster = try CephCluster.shared()
        let ns = try cluster.newNamespace()
        let scratch = try Scratch()
        try cluster.rbd("create --size 8M \(ns)/w")
        try cluster.rbd("create --size 8M \(ns)/held")
        let mount = try PoolMount(ns, in: scratch, options: ["type=rbd,rw,conf=\(cluster.conf)"])
        defer { mount.unmount() }
        try scratch.sh("truncate -s 8M expected && head -c 300000 /dev/urandom > patch && dd if=patch of=expected bs=1000 seek=77 conv=notrunc 2>/dev/null")
        try scratch.sh("dd if=patch of=mnt/w bs=1000 seek=77 conv=notrunc,fsync 2>/dev/null && cmp expected mnt/w")
        try cluster.rbd("export --no-progress \(ns)/w \(scratch.path("w.raw"))")
        try scratch.sh("cmp expected w.raw")

        // -o cow: writes stay in the mount; the image keeps what rw wrote.
        do {
            let cow = try PoolMount(ns, in: scratch, options: ["type=rbd,cow,conf=\(cluster.conf)"], name: "cow")
            defer { cow.unmount() }
            try scratch.sh("dd if=/dev/zero of=cow/w bs=4096 count=8 conv=notrunc 2>/dev/null && cmp -n 32768 /dev/zero cow/w && cmp -i 32768 expected cow/w")
        }
        try cluster.rbd("export --no-progress \(ns)/w \(scratch.path("w2.raw"))")
        try scratch.sh("cmp expected w2.raw")

        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/usr/bin/python3")
        holder.arguments = ["-c", """
            import rados, rbd, time, sys
            c = rados.Rados(conffile=sys.argv[1]); c.connect()
            io = c.open_ioctx('\(CephCluster.pool)'); io.set_namespace('\(ns.split(separator: "/")[1])')
            img = rbd.Image(io, 'held')
            img.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
            open(sys.argv[2], 'w').close()
            time.sleep(60)
            """, cluster.conf, scratch.path("ready")]
        try holder.run()
        defer { kill(holder.processIdentifier, SIGKILL); holder.waitUntilExit() }
        for _ in 0..<100 where !FileManager.default.fileExists(atPath: scratch.path("ready")) { usleep(100_000) }
        let busy = scratch.attempt("dd if=patch of=mnt/held bs=4096 count=1 conv=notrunc 2>&1")
        #expect(!busy.ok && busy.output.contains("Device or resource busy"), "\(busy.output)")
        try scratch.sh("cmp -n 4096 /dev/zero mnt/held")
    }

    /// A frozen OSD fails reads with EIO within the bound; they work again once it is back. A
    /// monitor that is not there fails the mount with one line, within seconds.
    @Test func clusterFailuresAreBounded() throws {
        let cluster = try CephCluster.own()
        defer { cluster.stop() }
        let ns = try cluster.newNamespace()
        let scratch = try Scratch()
        try cluster.rbd("create --size 8M \(ns)/f")
        try cluster.rbd("bench --io-type write --io-size 1M --io-total 8M \(ns)/f >/dev/null")
        try cluster.rbd("export --no-progress \(ns)/f \(scratch.path("f.raw"))")

        let wrong = try TestTarget.freePort()
        let start = Date()
        let failed = runPoolfs("mount --foreground -o type=rbd,conf=/dev/null,mon_host=127.0.0.1:\(wrong),rbd_timeout=3 P mnt", in: scratch)
        #expect(failed.status != 0 && failed.output.contains("cannot reach Ceph cluster at 127.0.0.1:\(wrong)"), "\(failed.output)")
        #expect(failed.output.split(separator: "\n").count == 1, "\(failed.output)")
        #expect(Date().timeIntervalSince(start) < 8)

        let mount = try PoolMount(ns, in: scratch, options: ["type=rbd,conf=\(cluster.conf),rbd_timeout=3"])
        defer { mount.unmount() }
        try scratch.sh("cmp -n 1048576 f.raw mnt/f")
        cluster.pauseOSD()
        var resumed = false
        defer { if !resumed { cluster.resumeOSD() } }
        let frozen = Date()
        let read = scratch.attempt("dd if=mnt/f of=/dev/null bs=1M skip=4 count=2 iflag=direct 2>&1")
        #expect(!read.ok && read.output.contains("Input/output error"), "\(read.output)")
        #expect(Date().timeIntervalSince(frozen) < 10)
        cluster.resumeOSD()
        resumed = true
        var again = false
        for _ in 0..<40 where !again {
            again = scratch.attempt("cmp f.raw mnt/f").ok
            if !again { usleep(250_000) }
        }
        #expect(again, "reads did not work again after the OSD came back")
    }
}
