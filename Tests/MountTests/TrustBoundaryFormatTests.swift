import Foundation
import TestSupport
import Testing

/// Issue 22's attacks on formats (3 and 4): a guest, or a user of the pool, cannot turn a raw disk
/// into a qcow2 that names host files, and `poolfs snapshot` writes only qcow2 files in the pool.
@Suite("trust boundary: formats")
struct TrustBoundaryFormatTests {
    typealias World = TrustBoundaryTests

    /// The first 64 KiB of a qcow2 that names `backing`: what a guest would write over sector 0.
    static func qcow2Header(naming backing: String, in scratch: Scratch) throws -> String {
        let name = "header-\(UUID().uuidString).qcow2"
        try scratch.sh("qemu-img create -q -f qcow2 -u -b '\(backing)' -F raw \(name) 1M && truncate -s 64K \(name)")
        return name
    }

    @Test func aRawDiskStaysRawWhenItsGuestWritesAQcow2Header() throws {
        let scratch = try World.world()
        try scratch.sh("head -c 1048576 /dev/urandom > pool/guest.img")
        do {
            let mount = try PoolMount(scratch.path("pool"), in: scratch, options: World.options)
            defer { mount.unmount() }
            #expect(try contents(mount.path("guest.img")) == (try contents(scratch.path("pool/guest.img"))))
        }
        #expect(runPoolfs("format show pool/guest.img", in: scratch).output.contains("raw (probed and recorded)"))
        let header = try Self.qcow2Header(naming: scratch.path("secret"), in: scratch)
        try scratch.sh("dd if=\(header) of=pool/guest.img conv=notrunc status=none")
        do {
            let mount = try PoolMount(scratch.path("pool"), in: scratch, options: World.options)
            defer { mount.unmount() }
            #expect(try contents(mount.path("guest.img")) == (try contents(scratch.path("pool/guest.img"))), "still its own bytes")
            #expect(World.xattr("user.poolfs.format", of: mount.path("guest.img"), in: scratch) == "raw")
        }
        // An administrator's reset: the next open probes it, and the trust rules refuse what it names.
        #expect(runPoolfs("format reset pool/guest.img", in: scratch).status == 0)
        do {
            let mount = try PoolMount(scratch.path("pool"), in: scratch, options: World.options)
            defer { mount.unmount() }
            try World.expectRefused("guest.img", mount, in: scratch, because: "outside the pool")
        }
        #expect(runPoolfs("format set raw pool/guest.img", in: scratch).status == 0)
        #expect(runPoolfs("format show pool/guest.img", in: scratch).output.contains("raw (declared with poolfs format set)"))
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: World.options)
        defer { mount.unmount() }
        #expect(try contents(mount.path("guest.img")) == (try contents(scratch.path("pool/guest.img"))))
    }

    @Test func aLibvirtDomainsDeclarationWinsOverTheProbe() throws {
        let scratch = try World.world()
        let header = try Self.qcow2Header(naming: "good.raw", in: scratch)
        try scratch.sh("mkdir domains && head -c 1048576 /dev/urandom > pool/vm.img && dd if=\(header) of=pool/vm.img conv=notrunc status=none")
        let domain = """
            <domain type='kvm'><name>vm</name><devices>
              <disk type='file' device='disk'><driver name='qemu' type='raw'/>
                <source file='\(scratch.path("pool/vm.img"))'/><target dev='vda' bus='virtio'/></disk>
            </devices></domain>
            """
        try domain.write(toFile: scratch.path("domains/vm.xml"), atomically: true, encoding: .utf8)
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: World.options,
                                  environment: ["POOLFS_LIBVIRT_DOMAINS": scratch.path("domains")])
        defer { mount.unmount() }
        #expect(try contents(mount.path("vm.img")) == (try contents(scratch.path("pool/vm.img"))), "read as the raw the domain declares")
        #expect(World.xattr("user.poolfs.format", of: mount.path("vm.img"), in: scratch) == "raw")
        // The declaration stays with the file when the domain goes.
        mount.unmount()
        try scratch.sh("rm domains/vm.xml")
        #expect(runPoolfs("format show pool/vm.img", in: scratch).output.contains("raw (declared"))
    }

    @Test func writesCannotGiveARawVolumeAnotherFormatsHeader() throws {
        let scratch = try World.world()
        let qcow2 = try Self.qcow2Header(naming: scratch.path("secret"), in: scratch)
        try scratch.sh("qemu-img create -q -f vmdk header.vmdk 1M && chmod 644 \(qcow2) header.vmdk")
        World.asUser("head -c 1048576 /dev/urandom > pool/mine.img", in: scratch)
        let before = try scratch.sh("sha256sum < pool/mine.img")
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: World.rwOptions)
        defer { mount.unmount() }
        for header in [qcow2, "header.vmdk"] {
            let wrote = World.asUser("dd if='\(scratch.path(header))' of='\(mount.path("mine.img"))' bs=512 count=1 conv=notrunc,fsync 2>&1", in: scratch)
            #expect(!wrote.ok && wrote.output.contains("Operation not permitted"), "\(header): \(wrote.output)")
            #expect(try scratch.sh("sha256sum < pool/mine.img") == before, "\(header): the volume is unchanged")
        }
        // A hole punched into an allowed prefix ("QEDx" → "QED\0") would make it qed; a vmdk
        // descriptor may start with comments and lines of spaces (QEMU's rule: an empty line
        // there makes it raw, DetectionTests).
        #expect(World.asUser("printf 'QEDx' | dd of='\(mount.path("mine.img"))' conv=notrunc,fsync", in: scratch).ok)
        let punched = World.asUser("fallocate -p -o 3 -l 1 '\(mount.path("mine.img"))' 2>&1", in: scratch)
        #expect(!punched.ok && punched.output.contains("Operation not permitted"), "\(punched.output)")
        let descriptor = World.asUser("printf '# x\\n  \\nversion=1\\nRW 2048 FLAT \\\"/etc/shadow\\\" 0\\n' | dd of='\(mount.path("mine.img"))' conv=notrunc,fsync 2>&1", in: scratch)
        #expect(!descriptor.ok && descriptor.output.contains("Operation not permitted"), "\(descriptor.output)")
        // Ordinary writes to the first sector (zeros, a partition table's signature) go through.
        #expect(World.asUser("dd if=/dev/zero of='\(mount.path("mine.img"))' bs=512 count=1 conv=notrunc,fsync", in: scratch).ok)
        #expect(World.asUser("printf '\\125\\252' | dd of='\(mount.path("mine.img"))' bs=1 seek=510 conv=notrunc,fsync", in: scratch).ok)
        #expect(try scratch.sh("od -An -tx1 -j510 -N2 pool/mine.img").trimmingCharacters(in: .whitespacesAndNewlines) == "55 aa")
        #expect(mount.log.isEmpty == false)
        #expect((try String(contentsOfFile: mount.log, encoding: .utf8)).contains("would make this raw volume look like qcow2"))
    }

    @Test func snapshotsAreNeverWrittenIntoRawFilesOrOutsideThePool() throws {
        let scratch = try World.world()
        try scratch.sh("""
            head -c 1048576 /dev/urandom > pool/guest.img && qemu-img create -q -f qcow2 pool/vm.qcow2 1M &&
            mkdir -m 700 private && qemu-img create -q -f qcow2 private/root.qcow2 1M &&
            ln -s "$PWD/private/root.qcow2" pool/link.qcow2
            """)
        // Seen once (poolfs ls decides and keeps every format), then given a qcow2 header.
        _ = runPoolfs("ls pool", in: scratch)
        let header = try Self.qcow2Header(naming: "vm.qcow2", in: scratch)
        try scratch.sh("dd if=\(header) of=pool/guest.img conv=notrunc status=none")
        let before = try scratch.sh("sha256sum pool/guest.img private/root.qcow2")
        let created = runPoolfs("snapshot create pool class", in: scratch)
        #expect(try scratch.sh("sha256sum pool/guest.img private/root.qcow2") == before, "\(created.output)")
        #expect(created.output.contains("raw file"), "\(created.output)")
        #expect(created.output.contains("outside the pool"), "\(created.output)")
        #expect(try scratch.sh("qemu-img snapshot -l pool/vm.qcow2").contains("class"), "the other volumes get theirs")
        for operation in ["revert", "delete"] {
            _ = runPoolfs("snapshot \(operation) pool class", in: scratch)
            #expect(try scratch.sh("sha256sum pool/guest.img private/root.qcow2") == before, "\(operation)")
        }
    }

    @Test func formatsPoolfsCannotReadAreNeverServedAsRaw() throws {
        let scratch = try World.world()
        try scratch.sh("""
            qemu-img create -q -f parallels pool/disk.hdd 1M && qemu-img create -q -f qcow pool/old.qcow 1M &&
            \(LuksImages.raw("pool/disk.luks", bytes: 1 << 20))
            """)
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: World.options)
        defer { mount.unmount() }
        let cases = [("disk.hdd", "parallels", "parallels images are not supported"),
                     ("old.qcow", "qcow", "qcow (version 1) images are not supported"),
                     ("disk.luks", "luks", "LUKS encrypted images are not supported")]
        for (file, format, reason) in cases {
            #expect(FileManager.default.contents(atPath: mount.path(file)) == nil, "\(file) is not served as its container bytes")
            let error = World.xattr("user.poolfs.error", of: mount.path(file), in: scratch)
            #expect(error.contains(reason), "\(file): \(error)")
            #expect(World.xattr("user.poolfs.format", of: mount.path(file), in: scratch) == format, "\(file)")
        }
        // poolfs ls names the format and says why; the daemon's log says it too.
        let listing = runPoolfs("ls pool", in: scratch).output
        for (file, format, reason) in cases {
            let row = listing.split(separator: "\n").first { $0.hasPrefix(file + " ") } ?? ""
            #expect(row.contains(format) && row.contains(reason), "poolfs ls: \(row)")
        }
        let log = try String(contentsOfFile: mount.log, encoding: .utf8)
        #expect(cases.allSatisfy { log.contains($0.2) }, "the log says why: \(log)")
    }
}
