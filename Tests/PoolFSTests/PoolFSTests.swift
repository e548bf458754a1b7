import Foundation
import FuseKit
@testable import PoolFS
import TestSupport
import Synchronization
import Testing

import Pools
@testable import Block

@Suite struct SnapshotNameTests {
    static func snapshot(_ id: String, _ name: String) -> Snapshot {
        Snapshot(id: id, name: name, l1TableOffset: 0, l1Size: 0, dateSeconds: 0, dateNanoseconds: 0,
                 vmClockNanoseconds: 0, vmStateSize: 0, diskSize: nil, icount: nil, extraDataSize: 0)
    }

    @Test(arguments: [
        ("plain", "plain"), ("a/b", "a%2Fb"), ("100%", "100%25"), ("x@y", "x%40y"),
        (".", "%2E"), ("..", "%2E%2E"), ("...", "..."), ("%2F", "%252F"), ("with space", "with space"),
    ])
    func escaping(_ name: String, _ file: String) {
        #expect(SnapshotNames.escape(name) == file)
    }

    @Test func sharedAndEmptyNamesGetTheirIDs() {
        let files = SnapshotNames.files(for: [Self.snapshot("1", "daily"), Self.snapshot("2", "once"),
                                              Self.snapshot("3", "daily"), Self.snapshot("4", ""),
                                              Self.snapshot("5", "daily@1")])
        #expect(files.map(\.file) == ["daily@1", "once", "daily@3", "@4", "daily%401"])
        #expect(Set(files.map(\.file)).count == files.count, "every snapshot has its own file name")
    }
}

@Suite struct MountOptionTests {
    @Test func ownOptionsAreConsumedAndTheRestGoToFuse() throws {
        let o = try MountOptions.parse(["cache_size=256M,allow_other", "threads=4,readahead=512K,nosplice,default_permissions,defaults,nofail,x-systemd.automount,ro,noatime"])
        #expect(o.cacheSize == 256 << 20)
        #expect(o.threads == 4)
        #expect(o.readahead == 512 << 10)
        #expect(o.maxRead == 512 << 10, "the default")
        #expect(try MountOptions.parse(["max_read=256K"]).maxRead == 256 << 10)
        let ceph = try MountOptions.parse(["type=rbd,conf=/etc/ceph/c.conf,id=libvirt,keyring=/k,mon_host=10.0.0.1:6789,rbd_timeout=5"])
        #expect(ceph.cephConf == "/etc/ceph/c.conf" && ceph.cephID == "libvirt" && ceph.keyring == "/k" && ceph.monHost == "10.0.0.1:6789" && ceph.rbdTimeout == 5)
        #expect(ceph.fuseOptions.isEmpty)
        #expect(throws: MountError.self) { try MountOptions.parse(["rbd_timeout=0"]) }
        #expect(throws: MountError.self) { try MountOptions.parse(["keyring="]) }
        #expect(try MountOptions.parse([]).readahead == 2 << 20)
        #expect(!o.splice)
        #expect(!o.cachedWrites)
        #expect(try MountOptions.parse(["rw,cached_writes"]).cachedWrites)
        #expect(o.fuseOptions == ["allow_other", "default_permissions", "noatime"])
        #expect(try MountOptions.parse(["type=dir"]).type == "dir")
        #expect(try MountOptions.parse(["rw"]).rw)
        #expect(try !MountOptions.parse(["rw", "ro"]).rw, "the later option wins")
        let cow = try MountOptions.parse(["cow,cache_dir=/srv/spill,cow_memory=1G"])
        #expect(cow.cow && cow.cacheDirectory == "/srv/spill" && cow.cowMemory == 1 << 30 && cow.fuseOptions.isEmpty)
        #expect(try MountOptions.parse([]).cowSize == .percent(20))
        #expect(try MountOptions.parse(["cow_size=2G"]).cowSize == .bytes(2 << 30))
        #expect(try MountOptions.parse(["cow_size=100%"]).cowSize == .percent(100))
    }

    @Test(arguments: ["cache_size=", "cache_size=12Q", "cache_size=-1", "threads=0", "threads=1000", "threads=many", "cache_dir=", "cow_memory=lots", "rw,cow", "max_read=2M", "max_read=1K", "max_read=",
                      "cow_size=", "cow_size=0", "cow_size=0%", "cow_size=101%", "cow_size=%", "cow_size=1.5G", "cow_size=20%%", "net_timeout=0", "net_timeout=301", "net_timeout=", "net_timeout=x"])
    func badValuesAreRefused(_ option: String) {
        #expect(throws: MountError.self) { try MountOptions.parse([option]) }
    }
}

@Suite struct MountReadaheadTests {
    @Test func theNewestFuseMountAtAPathGivesTheDevice() {
        let table = """
            22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
            40 22 0:38 / /srv/a\\040b\\134c ro,nosuid shared:20 - fuse.poolfs poolfs:/x ro,max_read=524288
            41 40 0:45 / /srv/a\\040b\\134c ro,nosuid shared:21 - fuse.poolfs poolfs:/y ro,max_read=524288
            42 22 0:46 / /srv/plain rw shared:22 - tmpfs tmpfs rw
            43 22 0:47 / /srv/a\\040b - fuse.other other rw
            """
        #expect(MountReadahead.device(of: "/srv/a b\\c", in: MountTable(text: table)) == "0:45", "the later mount is on top")
        #expect(MountReadahead.device(of: "/srv/plain", in: MountTable(text: table)) == nil, "not FUSE")
        #expect(MountReadahead.device(of: "/srv/a b", in: MountTable(text: table)) == "0:47")
        #expect(MountReadahead.device(of: "/srv/none", in: MountTable(text: table)) == nil)
    }
}

@Suite struct PoolSourceTests {
    @Test func libvirtPoolNamesResolveThroughTheirDefinitions() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir images storage")
        try scratch.write("storage/default.xml", Array("""
            <!-- WARNING: auto-generated by libvirt -->
            <pool type='dir'>
              <name>default</name>
              <uuid>0c2b4cc8-0000-4000-8000-000000000000</uuid>
              <source>
              </source>
              <target>
                <path>\(scratch.path("images"))</path>
              </target>
            </pool>
            """.utf8))
        try scratch.write("storage/vg.xml", Array("<pool type=\"logical\"><name>vgpool</name><source><name>vg</name></source><target><path>/dev/vg</path></target></pool>".utf8))
        try scratch.write("storage/tank.xml", Array("<pool type='zfs'><name>tank</name><target><path>/dev/zvol/tank/vms</path></target></pool>".utf8))
        try scratch.write("storage/san.xml", Array("<pool type='sheepdog'><name>san</name><target><path>/sheep</path></target></pool>".utf8))
        try scratch.write("storage/gl.xml", Array("<pool type='gluster'><name>gl</name><source><dir path='/'/></source></pool>".utf8))
        try scratch.sh("truncate -s 8M images/disk.raw && printf 'label: gpt\\n,4M,L\\n' | sfdisk -q images/disk.raw")
        try scratch.write("storage/sdb.xml", Array("""
            <pool type='disk'><name>sdb</name>
              <source><device path='\(scratch.path("images/disk.raw"))'/><format type='gpt'/></source>
              <target><path>/dev</path></target></pool>
            """.utf8))
        let pool = try PoolSource.open("default", type: nil, libvirtDirectory: scratch.path("storage"))
        #expect(pool.displayName == scratch.path("images"))
        let runner = RefusingRunner()
        #expect(throws: CommandError.self) {
            try PoolSource.open("vg", type: nil, libvirtDirectory: scratch.path("storage"), runner: runner)
        }
        #expect(runner.asked.withLock { $0 }?.last == "vg", "the VG name comes from the target path /dev/vg")
        #expect(throws: CommandError.self) {
            try PoolSource.open("tank", type: nil, libvirtDirectory: scratch.path("storage"), runner: runner)
        }
        #expect(runner.asked.withLock { $0 }?.last == "tank/vms", "the dataset comes from the target path /dev/zvol/tank/vms")
        let disk = try PoolSource.open("sdb", type: nil, libvirtDirectory: scratch.path("storage"))
        let names = try disk.volumeNames()
        #expect(disk.displayName == scratch.path("images/disk.raw") && names == ["part1"],
                "a disk pool's disk is its source device, not its target path")
        #expect(throws: PoolError.unsupportedType("sheepdog")) {
            try PoolSource.open("san", type: nil, libvirtDirectory: scratch.path("storage"))
        }
        #expect(throws: PoolError.libvirt("\(scratch.path("storage/gl.xml")): no <source><host name=...>")) {
            try PoolSource.open("gl", type: nil, libvirtDirectory: scratch.path("storage"))
        }
        #expect(throws: PoolError.libvirt("libvirt pool vg has type 'logical', not 'dir'")) {
            try PoolSource.open("vg", type: "dir", libvirtDirectory: scratch.path("storage"))
        }
    }

    @Test func dirPoolsListRegularFilesOnly() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir -p pool/subdir pool/.snapshots && touch pool/b.img pool/a.qcow2 pool/.hidden && ln -s a.qcow2 pool/link && ln -s subdir pool/dirlink && mkfifo pool/fifo")
        let pool = try DirectoryPool(path: scratch.path("pool"))
        #expect(try pool.volumeNames() == [".hidden", "a.qcow2", "b.img", "link"])
        #expect(pool.volume("a.qcow2")?.path == scratch.path("pool/a.qcow2"))
        #expect(pool.volume("subdir")?.path == nil && pool.volume(".snapshots")?.path == nil && pool.volume("../pool/a.qcow2")?.path == nil)
        #expect(throws: PoolError.notADirectory(scratch.path("pool/a.qcow2"))) { try DirectoryPool(path: scratch.path("pool/a.qcow2")) }
    }
}

@Suite struct InodeTableTests {
    @Test func lookupCountsAndForget() {
        let table = InodeTable<String>(root: "/")
        let a = table.reference("a")
        #expect(table.reference("a") == a)
        #expect(table.key(of: a) == "a")
        table.forget(a, count: 1)
        #expect(table.key(of: a) == "a", "one reference is left")
        table.forget(a, count: 1)
        #expect(table.key(of: a) == nil && table.inode(of: "a") == nil)
        #expect(table.reference("a") != a, "a forgotten key gets a new number")
        table.forget(1, count: 100)
        #expect(table.key(of: 1) == "/", "the root is never forgotten")
    }
}

/// Records the command it was asked to run and fails it.
final class RefusingRunner: CommandRunner {
    let asked = Mutex<[String]?>(nil)
    func run(_ arguments: [String]) throws -> String {
        asked.withLock { $0 = arguments }
        throw CommandError(commandLine: arguments.joined(separator: " "), status: 5, stderr: "refused")
    }
}

/// Replays `zfs` output by subcommand; tests may change it to play a pool that changes.
final class ZfsRunner: CommandRunner {
    let outputs: Mutex<[String: String]>
    init(_ outputs: [String: String]) { self.outputs = Mutex(outputs) }
    func run(_ arguments: [String]) throws -> String {
        guard let out = outputs.withLock({ $0[arguments.prefix(2).joined(separator: " ")] }) else {
            throw CommandError(commandLine: arguments.joined(separator: " "), status: 127, stderr: "not recorded")
        }
        return out
    }
}

/// The tree over a pool whose snapshots are volumes of their own (ZFS, played by a fake runner
/// with regular files standing in for /dev/zvol devices), through the FUSE operations.
@Suite struct PoolSnapshotTreeTests {
    @Test func zvolSnapshotsAppearUnderTheirVolume() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir -p dev/zvol/tank/vms && head -c 4194304 /dev/urandom > dev/zvol/tank/vms/web && head -c 2097152 /dev/urandom > 'dev/zvol/tank/vms/web@monday'")
        let runner = ZfsRunner([
            "zfs list": "tank/vms/web\tvolume\t4194304\t1763800000\ntank/vms/web@monday\tsnapshot\t2097152\t1763810000\ntank/vms/web@gone\tsnapshot\t2097152\t1763820000\n",
        ])
        let pool = try ZfsPool(dataset: "tank/vms", runner: runner, reportLifetime: 0, deviceRoot: scratch.dir)
        let fs = PoolFileSystem(store: VolumeStore(pool: pool, cache: BlockCache(capacityBytes: 1 << 20)))
        let web = try fs.lookup(parent: 1, name: "web").get()
        #expect(web.attributes.size == 4 << 20)
        let data = try fs.read(inode: web.attributes.inode, offset: 0, size: 4096).get()
        #expect(data.segments.count == 1)
        let snapshots = try fs.lookup(parent: 1, name: ".snapshots").get()
        let webSnapshots = try fs.lookup(parent: snapshots.attributes.inode, name: "web").get()
        #expect(try fs.list(directory: webSnapshots.attributes.inode).get().map(\.name) == [".", "..", "monday", "gone"], "in the pool's order: creation")
        let monday = try fs.lookup(parent: webSnapshots.attributes.inode, name: "monday").get()
        #expect(monday.attributes.size == 2 << 20 && monday.attributes.mode & 0o222 == 0)
        #expect(fs.open(inode: monday.attributes.inode, writing: false).isSuccess)
        let gone = try fs.lookup(parent: webSnapshots.attributes.inode, name: "gone").get()
        #expect(fs.open(inode: gone.attributes.inode, writing: false).failure == .io, "a snapshot without a device fails alone")
        #expect(String(decoding: try fs.extendedAttribute(of: gone.attributes.inode, name: "user.poolfs.error").get(), as: UTF8.self)
                .contains("no device for tank/vms/web@gone"))

        // A snapshot taken while mounted shows without a remount; one destroyed goes away.
        try scratch.sh("head -c 4194304 /dev/urandom > 'dev/zvol/tank/vms/web@tuesday'")
        runner.outputs.withLock { $0["zfs list"] = "tank/vms/web\tvolume\t4194304\t1763800000\ntank/vms/web@monday\tsnapshot\t2097152\t1763810000\ntank/vms/web@tuesday\tsnapshot\t4194304\t1763890000\n" }
        // Within the attribute timeout: a listing waits 0.5 s for the refresh, a loaded machine longer.
        let deadline = Date().addingTimeInterval(5)
        while try fs.list(directory: webSnapshots.attributes.inode).get().map(\.name) != [".", "..", "monday", "tuesday"], Date() < deadline {
            usleep(50_000)
        }
        #expect(try fs.list(directory: webSnapshots.attributes.inode).get().map(\.name) == [".", "..", "monday", "tuesday"])
    }
}

/// QEMU's consistent read through the FUSE operations (`-o rw`): open and release of an overlay
/// lock and unlock its backing files; the store refuses to write one while an overlay above it
/// is open, and to open an overlay while the store writes its base.
@Suite struct BackingFileHandleTests {
    @Test func openOverlaysKeepTheirBaseFromBeingWritten() throws {
        let scratch = try Scratch()
        try scratch.sh("""
            mkdir pool && cd pool && qemu-img create -q -f qcow2 base.qcow2 1M &&
            qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 over.qcow2 && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 other.qcow2
            """)
        let store = VolumeStore(pool: try DirectoryPool(path: scratch.path("pool")), cache: BlockCache(capacityBytes: 1 << 20),
                                logsFailures: false, writesImages: true)
        let fs = PoolFileSystem(store: store)
        let base = try fs.lookup(parent: 1, name: "base.qcow2").get().attributes.inode
        let over = try fs.lookup(parent: 1, name: "over.qcow2").get().attributes.inode
        let other = try fs.lookup(parent: 1, name: "other.qcow2").get().attributes.inode
        let baseFile = scratch.path("pool/base.qcow2")

        #expect(FileLocks.on(baseFile).allSatisfy { $0.start == 100 }, "looked up, not open: at most the shared read")
        #expect(fs.open(inode: over, writing: false).isSuccess)
        #expect(fs.open(inode: over, writing: true).isSuccess)
        #expect(FileLocks.bytes(of: baseFile) == [100, 201, 203])
        #expect(fs.open(inode: base, writing: true).failure == Errno(EBUSY))
        #expect(throws: Qcow2Error.inUse("base.qcow2 is a backing file of over.qcow2, open through this mount: it stays read-only until they are closed")) {
            try store.openForWriting(try #require(store.volume("base.qcow2")).key)
        }
        fs.release(inode: over, writing: true)
        #expect(fs.open(inode: base, writing: true).failure == Errno(EBUSY), "one handle of over.qcow2 is still open")
        fs.release(inode: over, writing: false)
        #expect(FileLocks.bytes(of: baseFile).allSatisfy { $0 == 100 }, "the last release unlocks")

        #expect(fs.open(inode: base, writing: true).isSuccess)
        #expect(fs.open(inode: other, writing: false).failure == Errno(EBUSY))
        #expect(throws: Qcow2Error.inUse("its backing file base.qcow2 is open for writing through this mount")) {
            try store.retain(try #require(store.volume("other.qcow2")).key)
        }
        fs.release(inode: base, writing: true)
        #expect(fs.open(inode: other, writing: false).isSuccess)
        fs.release(inode: other, writing: false)
    }
}

/// A volume open for writing is the one every operation sees, from the open until its last
/// close has flushed it: reads never come from an image opened from the file in between, whose
/// tables would be older than what the writer acknowledged. Found by the soak (stale reads).
@Suite struct InPlaceChangeTests {
    /// Reads trust a volume's descriptors for `descriptorCheckInterval` after an fstat found them
    /// unmodified; a change made in place is seen once that has passed, without a path lookup.
    @Test func aVolumeChangedInPlaceIsReopenedAfterTheCheckInterval() throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir pool && qemu-img create -q -f qcow2 pool/a.qcow2 1M")
        let store = VolumeStore(pool: try DirectoryPool(path: scratch.path("pool")), cache: BlockCache(capacityBytes: 1 << 20))
        let first = try #require(store.volume("a.qcow2"))
        #expect(store.volume("a.qcow2") === first)
        // A new modification time, as a write in place would give it; well within the 100 ms
        // in which the path is not looked up again.
        #expect(utimensat(AT_FDCWD, scratch.path("pool/a.qcow2"), nil, 0) == 0)
        usleep(UInt32(VolumeStore.descriptorCheckInterval / 1000) + 5_000)  // and a coarse clock tick
        let after = try #require(store.volume("a.qcow2"))
        #expect(after !== first, "the change in place was not seen")
        #expect(store.volume("a.qcow2") === after)
    }
}

/// A test pool that is a directory pool but for what it declares itself: the rest is `base`'s.
protocol DirectoryPoolWrapper: Pool {
    var base: DirectoryPool { get }
}

extension DirectoryPoolWrapper {
    var displayName: String { base.displayName }
    var statisticsPath: String { base.statisticsPath }
    func volumeNames() throws -> [String] { try base.volumeNames() }
    func volume(_ name: String) -> PoolVolume? { base.volume(name) }
    func openImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        try base.openImage(name, volume: volume, cache: cache)
    }
    func openWritableImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
        try base.openWritableImage(name, volume: volume, cache: cache)
    }
}

@Suite struct WriterHandoverTests {
    /// A directory pool that runs `hook` (once) in the middle of opening a volume read-only.
    final class HookedPool: DirectoryPoolWrapper {
        let base: DirectoryPool
        let hook = Mutex<(@Sendable () -> Void)?>(nil)
        init(_ base: DirectoryPool) { self.base = base }
        func openImage(_ name: String, volume: PoolVolume, cache: BlockCache) throws -> Image {
            let image = try base.openImage(name, volume: volume, cache: cache)
            hook.withLock { hook in
                defer { hook = nil }
                return hook
            }?()
            return image
        }
    }

    static let data = [UInt8](repeating: 0x5a, count: 4096)

    static func makePool(_ scratch: Scratch) throws -> DirectoryPool {
        try scratch.sh("mkdir pool && qemu-img create -q -f qcow2 pool/vm.qcow2 4M")
        return try DirectoryPool(path: scratch.path("pool"))
    }

    @Test func theLastCloseFlushesBeforeReadsGoBackToTheFile() throws {
        let scratch = try Scratch()
        let store = VolumeStore(pool: try Self.makePool(scratch), cache: BlockCache(capacityBytes: 1 << 20),
                                logsFailures: false, writesImages: true)
        try store.openForWriting(try #require(store.volume("vm.qcow2")).key)
        let volume = try #require(store.volume("vm.qcow2"))
        try Self.data.withUnsafeBytes { try volume.writer!.write($0, at: 1 << 20) }
        // Each change the flush of the last close makes, a reader comes in.
        let reads = Mutex<[Bool]>([])
        volume.image!.hostFiles[0].observeChanges { _ in
            let read = try? store.volume("vm.qcow2")?.image?.live.read(at: 1 << 20, count: 4096)
            reads.withLock { $0.append(read == Self.data) }
        }
        store.releaseWriting(try #require(store.volume("vm.qcow2")).key)
        let seen = reads.withLock { $0 }
        #expect(!seen.isEmpty && seen.allSatisfy { $0 }, "reads during the last close's flush: \(seen)")
        #expect(try store.volume("vm.qcow2")?.image?.live.read(at: 1 << 20, count: 4096) == Self.data)
    }

    @Test func aReopenUnderWayNeverReplacesTheWriter() throws {
        let scratch = try Scratch()
        let pool = HookedPool(try Self.makePool(scratch))
        let store = VolumeStore(pool: pool, cache: BlockCache(capacityBytes: 1 << 20), logsFailures: false, writesImages: true)
        _ = store.volume("vm.qcow2")
        // The file changes, so the next lookup reopens it; while it does, the volume is opened
        // for writing.
        try scratch.sh("touch -d '2001-01-01' pool/vm.qcow2")
        pool.hook.withLock { $0 = { try? store.openForWriting(try #require(store.volume("vm.qcow2")).key) } }
        _ = store.volume("vm.qcow2")
        let writer = store.volume("vm.qcow2")?.writer
        #expect(writer != nil, "the volume open for writing was replaced by a read-only image")
        try Self.data.withUnsafeBytes { try writer?.write($0, at: 0) }
        #expect(try store.volume("vm.qcow2")?.image?.live.read(at: 0, count: 4096) == Self.data)
        store.releaseWriting(try #require(store.volume("vm.qcow2")).key)
    }
}

extension Result {
    var isSuccess: Bool { if case .success = self { return true } else { return false } }
    var failure: Failure? { if case .failure(let e) = self { return e } else { return nil } }
}

@Suite struct MountLockTests {
    /// `poolfs unmount` waits on this lock for the daemon to finish; here `flock` stands in for
    /// a daemon that needs a second after the unmount.
    @Test func unmountWaitsWhileTheDaemonHoldsTheLock() throws {
        let scratch = try Scratch()
        let mountpoint = scratch.path("mnt")
        let lock = try #require(MountLock.hold(mountpoint))
        #expect(MountLock.hold(mountpoint) == nil, "a second daemon took the same mountpoint's lock")
        close(lock)
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/usr/bin/flock")
        holder.arguments = [MountLock.path(for: mountpoint), "sleep", "1"]
        try holder.run()
        defer { holder.waitUntilExit() }
        usleep(200_000)
        let start = Date()
        #expect(!MountLock.waitForRelease(mountpoint, seconds: 0.2), "returned while the lock was held")
        #expect(MountLock.waitForRelease(mountpoint, seconds: 10))
        #expect(Date().timeIntervalSince(start) > 0.5, "did not wait for the holder")
        #expect(MountLock.waitForRelease(scratch.path("never-mounted"), seconds: 0), "no lock file: nothing to wait for")
    }
}

/// A pool that closes idle volumes (LVM through device-mapper, where a device held open is an LV
/// in use) has nothing of a volume open once its last handle closes; others keep it for the next.
@Suite struct IdleVolumeTests {
    final class IdlePool: DirectoryPoolWrapper {
        let base: DirectoryPool
        let closesIdleVolumes: Bool
        init(_ base: DirectoryPool, closesIdleVolumes: Bool) { self.base = base; self.closesIdleVolumes = closesIdleVolumes }
    }

    /// Descriptors of this process open on `path`.
    static func descriptors(on path: String) -> Int {
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return fds.filter { (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\($0)")) == path }.count
    }

    @Test(arguments: [true, false])
    func theLastCloseLetsTheVolumeGo(closesIdle: Bool) throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir pool && head -c 65536 /dev/urandom > pool/disk.raw")
        let pool = IdlePool(try DirectoryPool(path: scratch.path("pool")), closesIdleVolumes: closesIdle)
        let store = VolumeStore(pool: pool, cache: BlockCache(capacityBytes: 1 << 20), logsFailures: false)
        let file = pool.base.path + "/disk.raw"
        let key = try #require(store.volume("disk.raw")).key
        try store.retain(key)
        try store.retain(key)
        #expect(Self.descriptors(on: file) == 1)
        store.release(key)
        #expect(Self.descriptors(on: file) == 1, "a handle is still open")
        store.release(key)
        #expect(Self.descriptors(on: file) == (closesIdle ? 0 : 1))
        #expect(try Data(#require(store.volume("disk.raw")?.image).live.read(at: 0, count: 16)) == Data(contentsOf: URL(fileURLWithPath: file)).prefix(16),
                "opened again on the next use")
    }
}
