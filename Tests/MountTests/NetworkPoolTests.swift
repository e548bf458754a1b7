#if canImport(Glibc)
import Glibc
#endif
import Foundation
import TestSupport
import Testing

/// The network servers the network-pool tests start: each comes up on loopback, QEMU's own
/// client sees a file made on it, and it goes when stopped.
@Suite("Network servers", .serialized)
struct NetworkServerTests {
    @Test(.enabled(if: GlusterServer.available)) func glusterServesAFileToQemu() throws {
        let server = try GlusterServer()
        defer { server.stop() }
        // Data in the first cluster: the file then ends on a cluster, and QEMU's gluster driver
        // fails a read cut short by the end of the file (an empty image's L1 table is).
        try server.scratch.sh("qemu-img create -q -f qcow2 mnt/x.qcow2 10M && qemu-io -c 'write 0 64k' mnt/x.qcow2 >/dev/null")
        let info = try server.scratch.sh("timeout 60 qemu-img info --output=json \(server.url("x.qcow2")) 2>&1")
        #expect(info.contains("\"format\": \"qcow2\"") && info.contains("10485760"), "\(info)")
        let brick = server.brickPID
        #expect(brick != nil)
        server.stop()
        #expect(brick.map { !GlusterServer.running($0) } ?? false, "the brick outlived stop")
    }

    @Test(.enabled(if: NFSServer.available)) func nfsServesAFileToLibnfs() throws {
        let server = try NFSServer()
        defer { server.stop() }
        try server.scratch.sh("qemu-img create -q -f qcow2 export/x.qcow2 10M")
        let listing = try server.scratch.sh("timeout 10 nfs-ls '\(server.toolURL())'")
        #expect(listing.contains("x.qcow2"), "\(listing)")
        try server.scratch.sh("timeout 10 nfs-cp '\(server.toolURL("x.qcow2"))' copy.qcow2 && cmp copy.qcow2 export/x.qcow2")
        let pid = server.pid
        server.stop()
        #expect(pid.map { !GlusterServer.running($0) } ?? false, "ganesha outlived stop")
    }
}

/// Sample images on a share, made in `dir` (the share's directory as seen locally): a qcow2
/// base, an overlay on it (relative backing name, declared format) with an internal snapshot
/// and writes after it, a raw file of an odd size, a compressed qcow2.
func makeNetworkImages(in scratch: Scratch, dir: String) throws {
    try scratch.sh("""
        cd \(dir) && qemu-img create -q -f qcow2 base.qcow2 9M \
        && qemu-io -c 'write -P 0x11 0 1M' -c 'write -P 0x22 5M 300k' base.qcow2 >/dev/null \
        && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 9M \
        && qemu-io -c 'write -P 0x33 512k 1M' -c 'write -z 5M 64k' top.qcow2 >/dev/null \
        && qemu-img snapshot -c s1 top.qcow2 \
        && qemu-io -c 'write -P 0x44 2M 777k' top.qcow2 >/dev/null \
        && head -c 3000001 /dev/urandom > odd.raw \
        && qemu-img convert -c -O qcow2 base.qcow2 packed.qcow2
        """)
}

/// The volumes `makeNetworkImages` makes.
let networkVolumes = ["base.qcow2", "odd.raw", "packed.qcow2", "top.qcow2"]

/// Reads `length` bytes at `offset` of `path` with O_DIRECT (past the kernel's page cache):
/// the errno of the failure, or 0; and how long it took.
func directRead(_ path: String, offset: off_t, length: Int = 65536) -> (errno: Int32, seconds: Double) {
    let start = Date()
    let fd = open(path, O_RDONLY | 0o40000)  // O_DIRECT, which Glibc hides behind _GNU_SOURCE
    guard fd >= 0 else { return (errno, Date().timeIntervalSince(start)) }
    defer { close(fd) }
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: length, alignment: 4096)
    defer { buffer.deallocate() }
    let n = pread(fd, buffer, length, offset)
    return (n < 0 ? errno : 0, Date().timeIntervalSince(start))
}

/// A gluster volume read natively through libgfapi. One glusterd per machine: these run one at
/// a time, each with the server of its own.
@Suite("Gluster pools", .serialized, .enabled(if: GlusterServer.available))
struct GlusterPoolTests {
    /// Every volume and snapshot byte for byte against QEMU's gluster:// driver (the overlay and
    /// its snapshot) and qemu-img on the FUSE-mounted files (the others); a libvirt gluster pool
    /// and a libvirt netfs pool of format glusterfs (not mounted at its target: read natively;
    /// mounted: a dir pool) by name; cifs refused; faults; unmount not held up by glfs_fini.
    @Test func volumesSnapshotsLibvirtAndFaults() throws {
        let server = try GlusterServer()
        defer { server.stop() }
        let scratch = try Scratch()
        try makeNetworkImages(in: scratch, dir: server.mountPoint)
        // QEMU's own gluster driver for the overlay (its backing file through gluster too) and
        // its snapshot; each costs a glfs_fini (about 10 s).
        try scratch.sh("timeout 120 qemu-img convert -O raw \(server.url("top.qcow2")) top.raw 2>/dev/null")
        try scratch.sh("timeout 120 qemu-img convert -O raw -l snapshot.name=s1 \(server.url("top.qcow2")) top@s1.raw 2>/dev/null")
        // A raw file is its own bytes (qemu-img convert would round it up to 512 bytes).
        for name in ["base.qcow2", "packed.qcow2"] {
            try scratch.sh("qemu-img convert -O raw \(server.mountPoint)/\(name) \(name).raw")
        }
        try scratch.sh("cp \(server.mountPoint)/odd.raw odd.raw.raw")
        try scratch.sh("cp top.raw top.qcow2.raw")

        do {
            let mount = try PoolMount(server.url(), in: scratch, options: ["net_timeout=3"])
            defer { mount.unmount() }
            #expect(try FileManager.default.contentsOfDirectory(atPath: mount.mountpoint).sorted() == [".partitions", ".snapshots"] + networkVolumes)
            for name in networkVolumes { try scratch.sh("cmp \(name).raw mnt/\(name)") }
            try scratch.sh("cmp top@s1.raw mnt/.snapshots/top.qcow2/s1")
            #expect(!scratch.attempt("dd if=/dev/zero of=mnt/odd.raw bs=512 count=1 conv=notrunc 2>&1").ok, "a gluster pool is read-only")

            // The brick frozen: a read not cached fails with EIO within the bound (3 s).
            server.pauseBrick()
            let frozen = directRead(mount.path("odd.raw"), offset: 1 << 20)
            server.resumeBrick()
            #expect(frozen.errno == EIO && frozen.seconds < 8, "\(frozen)")
            // The brick killed: EIO, then reads again once it is back.
            server.killBrick()
            let dead = directRead(mount.path("odd.raw"), offset: 2 << 20)
            #expect(dead.errno == EIO && dead.seconds < 8, "\(dead)")
            try server.restartBrick()
            var again = directRead(mount.path("odd.raw"), offset: 2 << 20)
            let deadline = Date().addingTimeInterval(30)
            while again.errno != 0, Date() < deadline {
                usleep(500_000)
                again = directRead(mount.path("odd.raw"), offset: 2 << 20)
            }
            #expect(again.errno == 0, "no read after the brick restarted: \(again); \((try? String(contentsOfFile: mount.log, encoding: .utf8)) ?? "")")
            try scratch.sh("cmp odd.raw.raw mnt/odd.raw && cmp top.raw mnt/top.qcow2")

            // poolfs unmount returns without waiting for glfs_fini.
            let start = Date()
            let unmounted = runPoolfs("unmount \(mount.mountpoint)", in: scratch)
            #expect(unmounted.status == 0, "\(unmounted.output)")
            while mount.process.isRunning, Date().timeIntervalSince(start) < 30 { usleep(20_000) }
            let took = Date().timeIntervalSince(start)
            #expect(!mount.process.isRunning && took < 5, "poolfs took \(took) s to unmount and exit")
        }

        // The fstab form daemonizes after opening the pool (libgfapi's threads do not cross the
        // fork: the daemon connects anew); its unmount does not wait for glfs_fini either.
        try scratch.sh("mkdir -p daemon")
        let daemon = runPoolfs("mount \(server.url()) \(scratch.path("daemon"))", in: scratch)
        #expect(daemon.status == 0, "\(daemon.output)")
        if daemon.status == 0 {
            let read = scratch.attempt("cmp top.raw daemon/top.qcow2")
            let start = Date()
            _ = runPoolfs("unmount \(scratch.path("daemon"))", in: scratch)
            let took = Date().timeIntervalSince(start)
            #expect(read.ok, "\(read.output)")
            #expect(took < 5, "poolfs unmount of a daemonized gluster mount took \(took) s")
        }

        // A wrong volume: one line, nothing mounted.
        let wrong = runPoolfs("mount --foreground gluster://127.0.0.1/nosuch \(scratch.path("mnt"))", in: scratch)
        #expect(wrong.status != 0 && wrong.output.contains("nosuch"), "\(wrong.output)")
        #expect(wrong.output.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: "\n").count == 1, "\(wrong.output)")
        #expect(!PoolMount.isMounted(scratch.path("mnt")))

        // libvirt pools by name.
        try scratch.sh("mkdir -p storage empty")
        try """
            <pool type='gluster'><name>gv</name>
              <source><host name='127.0.0.1' port='24007'/><dir path='/'/><name>v0</name></source>
            </pool>
            """.write(toFile: scratch.path("storage/gv.xml"), atomically: true, encoding: .utf8)
        func netfs(_ name: String, format: String, target: String, dir: String = "/v0") throws {
            try """
                <pool type='netfs'><name>\(name)</name>
                  <source><host name='127.0.0.1'/><dir path='\(dir)'/><format type='\(format)'/></source>
                  <target><path>\(target)</path></target>
                </pool>
                """.write(toFile: scratch.path("storage/\(name).xml"), atomically: true, encoding: .utf8)
        }
        try netfs("native", format: "glusterfs", target: scratch.path("empty"))
        try netfs("mounted", format: "glusterfs", target: server.mountPoint)
        try netfs("smb", format: "cifs", target: scratch.path("empty"), dir: "/share")
        let environment = ["POOLFS_LIBVIRT_STORAGE": scratch.path("storage")]
        for name in ["gv", "native", "mounted"] {
            let mount = try PoolMount(name, in: scratch, options: ["net_timeout=5"], name: "lv-\(name)", environment: environment)
            defer { mount.unmount() }
            for volume in networkVolumes { try scratch.sh("cmp \(volume).raw lv-\(name)/\(volume)") }
            try scratch.sh("cmp top@s1.raw lv-\(name)/.snapshots/top.qcow2/s1")
        }
        let smb = scratch.attempt("POOLFS_LIBVIRT_STORAGE=\(scratch.path("storage")) \(Binary.path) mount --foreground smb \(scratch.path("mnt")) 2>&1")
        #expect(!smb.ok && smb.output.contains("cifs") && smb.output.contains("not mounted"), "\(smb.output)")
        #expect(!PoolMount.isMounted(scratch.path("mnt")))
    }

    /// A `trusted.poolfs.format` attribute on the volume's file is not a decision: gluster lets
    /// any client set one (a libgfapi client running as nobody set it on a root-owned 0644 file),
    /// so a network pool keeps its decisions in memory only and probes what it has not seen. Set
    /// here through the FUSE client: a raw file said to be a "qcow2 declared", and a qcow2 said
    /// to be raw, read as what they are; a qcow2 header written into the raw one while
    /// mounted leaves it raw.
    @Test func formatAttributesOnTheVolumeAreNotTrusted() throws {
        let server = try GlusterServer()
        defer { server.stop() }
        let scratch = try Scratch()
        let m = server.mountPoint
        try scratch.sh("""
            head -c 4194304 /dev/urandom > \(m)/disk.raw \
            && qemu-img create -q -f qcow2 \(m)/real.qcow2 2M && qemu-io -c 'write -P 0x5a 0 1M' \(m)/real.qcow2 >/dev/null \
            && qemu-img convert -O raw \(m)/real.qcow2 real.raw \
            && qemu-img create -q -f qcow2 -b /etc/hostname -F raw header.qcow2 1G \
            && setfattr -n trusted.poolfs.format -v 'qcow2 declared' \(m)/disk.raw \
            && setfattr -n trusted.poolfs.format -v 'raw declared' \(m)/real.qcow2
            """)
        // A dir pool over the gluster FUSE mount (a mounted libvirt netfs pool) sees the same
        // attributes through FUSE, and trusts them no more.
        do {
            let overFuse = try PoolMount(m, in: scratch, name: "overfuse")
            defer { overFuse.unmount() }
            try scratch.sh("cmp \(m)/disk.raw overfuse/disk.raw && cmp real.raw overfuse/real.qcow2")
        }
        let mount = try PoolMount(server.url(), in: scratch, options: ["net_timeout=3"])
        defer { mount.unmount() }
        try scratch.sh("cmp \(m)/disk.raw mnt/disk.raw && cmp real.raw mnt/real.qcow2")
        try scratch.sh("dd if=header.qcow2 of=\(m)/disk.raw bs=65536 count=1 conv=notrunc 2>/dev/null")
        var reread = scratch.attempt("cmp \(m)/disk.raw mnt/disk.raw")
        let deadline = Date().addingTimeInterval(10)
        while !reread.ok, Date() < deadline {
            usleep(300_000)
            reread = scratch.attempt("cmp \(m)/disk.raw mnt/disk.raw")
        }
        #expect(reread.ok, "\(reread.output)")
    }
}

/// An NFS export read natively through libnfs (NFSv4, ganesha of the test's own).
@Suite("NFS pools", .enabled(if: NFSServer.available))
struct NFSPoolTests {
    /// Every volume and snapshot byte for byte against qemu-img on a copy taken with nfs-cp
    /// (QEMU's nfs driver speaks NFSv3 only); a libvirt netfs pool by name; `-o cow`; a wrong
    /// export; the server killed and started again.
    @Test func volumesSnapshotsLibvirtAndFaults() throws {
        let server = try NFSServer()
        defer { server.stop() }
        let scratch = try Scratch()
        try makeNetworkImages(in: scratch, dir: server.exportDir)
        for name in networkVolumes {
            try scratch.sh("timeout 30 nfs-cp '\(server.toolURL(name))' copy-\(name)")
        }
        // The overlay's copy names its backing file relatively: beside it, as the copy of base.
        try scratch.sh("cp copy-base.qcow2 base.qcow2")
        try scratch.sh("qemu-img convert -O raw copy-top.qcow2 top.qcow2.raw && qemu-img convert -O raw -l snapshot.name=s1 copy-top.qcow2 top@s1.raw")
        for name in ["base.qcow2", "packed.qcow2"] {
            try scratch.sh("qemu-img convert -O raw copy-\(name) \(name).raw")
        }
        try scratch.sh("cp copy-odd.raw odd.raw.raw")

        do {
            let mount = try PoolMount(server.url(), in: scratch, options: ["net_timeout=2"])
            defer { mount.unmount() }
            #expect(try FileManager.default.contentsOfDirectory(atPath: mount.mountpoint).sorted() == [".partitions", ".snapshots"] + networkVolumes)
            for name in networkVolumes { try scratch.sh("cmp \(name).raw mnt/\(name)") }
            try scratch.sh("cmp top@s1.raw mnt/.snapshots/top.qcow2/s1")

            server.kill()
            let dead = directRead(mount.path("odd.raw"), offset: 1 << 20)
            #expect(dead.errno == EIO && dead.seconds < 8, "\(dead)")
            try server.start()
            var again = directRead(mount.path("odd.raw"), offset: 1 << 20)
            let deadline = Date().addingTimeInterval(20)
            while again.errno != 0, Date() < deadline {
                usleep(300_000)
                again = directRead(mount.path("odd.raw"), offset: 1 << 20)
            }
            #expect(again.errno == 0, "no read after the server restarted: \(again)")
            try scratch.sh("cmp odd.raw.raw mnt/odd.raw")

            server.pause()
            let frozen = directRead(mount.path("odd.raw"), offset: 2 << 20)
            server.resume()
            #expect(frozen.errno == EIO && frozen.seconds < 8, "\(frozen)")
        }

        // -o cow: writes stay in the mount, the share is not written.
        do {
            let cow = try PoolMount(server.url(), in: scratch, options: ["cow"], name: "cow")
            defer { cow.unmount() }
            try scratch.sh("dd if=/dev/zero of=cow/odd.raw bs=4096 count=4 conv=notrunc 2>/dev/null && cmp -n 16384 /dev/zero cow/odd.raw && cmp -i 16384 odd.raw.raw cow/odd.raw")
        }
        try scratch.sh("cmp odd.raw.raw \(server.exportDir)/odd.raw")
        let rw = runPoolfs("mount --foreground -o rw \(server.url()) \(scratch.path("mnt"))", in: scratch)
        #expect(rw.status != 0 && rw.output.contains("read-only"), "\(rw.output)")
        let snapshot = runPoolfs("snapshot create '\(server.url())' later top.qcow2", in: scratch)
        #expect(snapshot.status != 0 && snapshot.output.contains("read-only"), "\(snapshot.output)")
        try scratch.sh("qemu-img snapshot -l \(server.exportDir)/top.qcow2 | grep -vq later")

        // The fstab form daemonizes after opening the pool: the daemon connects anew.
        try scratch.sh("mkdir -p daemon")
        let daemon = runPoolfs("mount '\(server.url())' \(scratch.path("daemon"))", in: scratch)
        #expect(daemon.status == 0, "\(daemon.output)")
        if daemon.status == 0 {
            let read = scratch.attempt("cmp top.qcow2.raw daemon/top.qcow2")
            _ = runPoolfs("unmount \(scratch.path("daemon"))", in: scratch)
            #expect(read.ok, "\(read.output)")
        }

        // A wrong export: one line, nothing mounted.
        let wrong = runPoolfs("mount --foreground nfs://127.0.0.1:\(server.port)/nosuch?version=4 \(scratch.path("mnt"))", in: scratch)
        #expect(wrong.status != 0 && wrong.output.contains("nosuch"), "\(wrong.output)")
        #expect(wrong.output.trimmingCharacters(in: .whitespacesAndNewlines).split(separator: "\n").count == 1, "\(wrong.output)")
        #expect(!PoolMount.isMounted(scratch.path("mnt")))

        // A libvirt netfs pool by name, its share not mounted at its target: read natively,
        // never the (non-empty) local target directory.
        try scratch.sh("mkdir -p storage target && touch target/local-file")
        try """
            <pool type='netfs'><name>share</name>
              <source><host name='127.0.0.1' port='\(server.port)'/><dir path='\(NFSServer.export)'/><format type='nfs'/><protocol ver='4'/></source>
              <target><path>\(scratch.path("target"))</path></target>
            </pool>
            """.write(toFile: scratch.path("storage/share.xml"), atomically: true, encoding: .utf8)
        let mount = try PoolMount("share", in: scratch, name: "lv", environment: ["POOLFS_LIBVIRT_STORAGE": scratch.path("storage")])
        defer { mount.unmount() }
        #expect(try FileManager.default.contentsOfDirectory(atPath: mount.mountpoint).sorted() == [".partitions", ".snapshots"] + networkVolumes)
        for name in networkVolumes { try scratch.sh("cmp \(name).raw lv/\(name)") }
    }

    /// A raw volume's format is decided once for the mount: a qcow2 header written into it on
    /// the server (same file, same inode) while mounted does not make it a qcow2, whose backing
    /// file (a file of this host) and virtual size would otherwise be what the mount shows.
    @Test func formatDecisionKeptWhileMounted() throws {
        let server = try NFSServer()
        defer { server.stop() }
        let scratch = try Scratch()
        try scratch.sh("""
            head -c 4194304 /dev/urandom > \(server.exportDir)/disk.raw \
            && qemu-img create -q -f qcow2 -b /etc/hostname -F raw header.qcow2 1G
            """)
        let mount = try PoolMount(server.url(), in: scratch, options: ["net_timeout=2"])
        defer { mount.unmount() }
        try scratch.sh("cmp \(server.exportDir)/disk.raw mnt/disk.raw")
        // The guest's write, as the exported file gets it: the qcow2 header over its first 64 KiB
        // (the same file, the same inode).
        try scratch.sh("""
            cp \(server.exportDir)/disk.raw guest.raw \
            && dd if=header.qcow2 of=guest.raw bs=65536 count=1 conv=notrunc 2>/dev/null \
            && dd if=header.qcow2 of=\(server.exportDir)/disk.raw bs=65536 count=1 conv=notrunc 2>/dev/null \
            && cmp guest.raw \(server.exportDir)/disk.raw
            """)
        #expect(try scratch.sh("qemu-img info --output=json guest.raw").contains("\"format\": \"qcow2\""))
        // Freshness notices the change and opens the volume again: still raw, the same bytes.
        var reread = scratch.attempt("cmp guest.raw mnt/disk.raw")
        let deadline = Date().addingTimeInterval(10)
        while !reread.ok, Date() < deadline {
            usleep(300_000)
            reread = scratch.attempt("cmp guest.raw mnt/disk.raw")
        }
        #expect(reread.ok, "\(reread.output)")
        let size = try FileManager.default.attributesOfItem(atPath: mount.path("disk.raw"))[.size] as? Int
        #expect(size == 4194304, "the volume's size is now \(size.map(String.init) ?? "unknown")")
        let direct = directRead(mount.path("disk.raw"), offset: 0, length: 4194304)
        #expect(direct.errno == 0, "\(direct)")
    }

    /// A backing file named outside the pool's directory of the share, or by an absolute path
    /// (a file of this host), is refused; one beside it in a subdirectory is read.
    @Test func backingFilesStayInTheSharesDirectory() throws {
        let server = try NFSServer()
        defer { server.stop() }
        let scratch = try Scratch()
        try scratch.sh("""
            cd \(server.exportDir) && mkdir -p pool sub && qemu-img create -q -f qcow2 sub/inside.qcow2 1M \
            && qemu-img create -q -f qcow2 outside.qcow2 1M \
            && cd pool && mkdir -p d && qemu-img create -q -f qcow2 d/base.qcow2 1M && qemu-io -c 'write -P 0x5a 0 64k' d/base.qcow2 >/dev/null \
            && qemu-img create -q -f qcow2 -b d/base.qcow2 -F qcow2 good.qcow2 1M \
            && qemu-img create -q -f qcow2 -b ../outside.qcow2 -F qcow2 up.qcow2 1M \
            && qemu-img create -q -f qcow2 -b /etc/hostname -F raw abs.qcow2 1M
            """)
        let mount = try PoolMount(server.url("pool"), in: scratch)
        defer { mount.unmount() }
        try scratch.sh("qemu-img convert -O raw \(server.exportDir)/pool/good.qcow2 good.raw && cmp good.raw mnt/good.qcow2")
        #expect(!scratch.attempt("cat mnt/up.qcow2 >/dev/null 2>&1").ok, "a backing file outside the pool's directory was read")
        #expect(!scratch.attempt("cat mnt/abs.qcow2 >/dev/null 2>&1").ok, "an absolute backing file was read")
        let listing = runPoolfs("ls \(server.url("pool"))", in: scratch)
        #expect(listing.output.contains("leads outside the pool") && listing.output.contains("absolute path"), "\(listing.output)")
    }

    /// NFSv3 through the portmapper (rpcbind of the test's own): the images without a backing
    /// file byte for byte against QEMU's own nfs:// driver (v3 only); the overlay and its
    /// snapshot against qemu-img on the exported files (QEMU's driver fails to mount a second
    /// time for the backing file here: MNT3ERR_ACCES from ganesha).
    @Test func nfsv3AgainstQemusDriver() throws {
        let server = try NFSServer(v3: true)
        defer { server.stop() }
        let scratch = try Scratch()
        try makeNetworkImages(in: scratch, dir: server.exportDir)
        for name in ["base.qcow2", "packed.qcow2"] {
            try scratch.sh("timeout 60 qemu-img convert -O raw '\(server.v3URL(name))' \(name).raw")
        }
        let top = server.exportDir + "/top.qcow2"
        try scratch.sh("qemu-img convert -O raw \(top) top.qcow2.raw && qemu-img convert -O raw -l snapshot.name=s1 \(top) top@s1.raw")
        let mount = try PoolMount(server.v3URL(), in: scratch)
        defer { mount.unmount() }
        for name in ["base.qcow2", "packed.qcow2", "top.qcow2"] { try scratch.sh("cmp \(name).raw mnt/\(name)") }
        try scratch.sh("cmp top@s1.raw mnt/.snapshots/top.qcow2/s1 && cmp \(server.exportDir)/odd.raw mnt/odd.raw")
    }
}
