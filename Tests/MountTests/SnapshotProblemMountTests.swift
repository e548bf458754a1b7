import Foundation
import TestSupport
import Testing

/// A qcow2 with one corrupt snapshot entry (iotest 080's edit), or a snapshot table past the end
/// of the file, through the mount: the volume and its good snapshots read as qemu-img reads them;
/// the bad snapshot is listed, fails with EIO and says why in user.poolfs.error.
@Suite("mount: qcow2 snapshots QEMU can still open")
struct SnapshotProblemMountTests {
    typealias World = TrustBoundaryTests

    @Test func aCorruptSnapshotEntryFailsAloneAndTheTableRestIsReported() throws {
        let scratch = try World.world()
        try scratch.sh("""
            qemu-img create -q -f qcow2 pool/vm.qcow2 4M && qemu-io -c 'write -P 0x11 0 64k' pool/vm.qcow2 >/dev/null &&
            qemu-img snapshot -c one pool/vm.qcow2 && qemu-io -c 'write -P 0x22 64k 64k' pool/vm.qcow2 >/dev/null &&
            qemu-img snapshot -c two pool/vm.qcow2 && qemu-io -c 'write -P 0x33 1M 4k' pool/vm.qcow2 >/dev/null &&
            cp pool/vm.qcow2 pool/lost.qcow2 &&
            table=$(od -An -tu8 --endian=big -j64 -N8 pool/vm.qcow2 | tr -d ' ') &&
            printf '\\0\\0\\0\\0\\0\\100\\2\\0' | dd of=pool/vm.qcow2 bs=1 seek=$table conv=notrunc status=none &&
            printf '\\0\\0\\0\\0\\20\\0\\0\\0' | dd of=pool/lost.qcow2 bs=1 seek=64 conv=notrunc status=none &&
            qemu-img convert -O raw pool/vm.qcow2 live.raw && qemu-img convert -l snapshot.name=two -O raw pool/vm.qcow2 two.raw
            """)
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: World.options)
        defer { mount.unmount() }
        #expect(try contents(mount.path("vm.qcow2")) == (try contents(scratch.path("live.raw"))), "the live disk reads")
        let snapshots = mount.path(".snapshots/vm.qcow2")
        #expect(Set(try FileManager.default.contentsOfDirectory(atPath: snapshots)) == ["one", "two"])
        #expect(try contents(snapshots + "/two") == (try contents(scratch.path("two.raw"))), "the good snapshot reads")
        let bad = scratch.attempt("head -c 512 '\(snapshots)/one' 2>&1 >/dev/null")
        #expect(!bad.ok && bad.output.contains("Input/output error"), "\(bad.output)")
        let why = World.xattr("user.poolfs.error", of: snapshots + "/one", in: scratch)
        #expect(why.contains("is not cluster-aligned"), "\(why)")

        #expect(try contents(mount.path("lost.qcow2")) == (try contents(scratch.path("live.raw"))), "a table past the end")
        let lost = World.xattr("user.poolfs.snapshot_error", of: mount.path("lost.qcow2"), in: scratch)
        #expect(lost.contains("snapshot table entries 0...1 lie past the end of the file"), "\(lost)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: mount.path(".snapshots/lost.qcow2")).isEmpty)

        // poolfs ls --json says the same.
        let listed = runPoolfs("ls --json pool", in: scratch).output
        #expect(listed.contains("\"snapshot_error\" : \"snapshot table entries 0...1 lie past the end"), "\(listed)")
        #expect(listed.contains("is not cluster-aligned"), "\(listed)")
    }
}
