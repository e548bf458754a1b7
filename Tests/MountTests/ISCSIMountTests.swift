import Foundation
import TestSupport
import Testing

/// An iSCSI target (a tgtd of the test's own) mounted through the built binary.
@Suite("iSCSI mounts", .serialized)
struct ISCSIMountTests {
    func poolfs(_ arguments: String, in scratch: Scratch) -> (status: Int32, output: String) {
        runPoolfs(arguments, in: scratch)
    }

    @Test func lunsAreFilesAndRwWritesThem() throws {
        let scratch = try Scratch()
        try scratch.sh("""
            head -c 3146240 /dev/urandom > one.raw && truncate -s 6M two.raw && \
            dd if=/dev/urandom of=two.raw bs=64K seek=40 count=3 conv=notrunc 2>/dev/null && mkdir mnt
            """)
        let target = try TestTarget(scratch: scratch)
        defer { target.stop() }
        try target.define(luns: ["one.raw", "two.raw"])
        try target.admin("--op update --mode logicalunit --tid 1 --lun 2 --params thin_provisioning=1")
        do {
            let mount = try PoolMount(target.url, in: scratch, options: ["type=iscsi"])
            defer { mount.unmount() }
            #expect(try FileManager.default.contentsOfDirectory(atPath: mount.mountpoint).sorted() == [".partitions", ".snapshots", "unit:0:0:1", "unit:0:0:2"])
            try scratch.sh("cmp one.raw mnt/unit:0:0:1 && cmp two.raw mnt/unit:0:0:2")
            #expect(try dataRanges(of: mount.path("unit:0:0:2")) == [(40 << 16)..<(43 << 16)])
            let attributes = try FileManager.default.attributesOfItem(atPath: mount.path("unit:0:0:1"))
            #expect((attributes[.posixPermissions] as? Int) == 0o444)
            #expect(!scratch.attempt("dd if=/dev/zero of=mnt/unit:0:0:1 bs=512 count=1 conv=notrunc 2>&1").ok)
        }
        do {
            let mount = try PoolMount(target.url, in: scratch, options: ["rw"])
            defer { mount.unmount() }
            try scratch.sh("head -c 100000 /dev/urandom > patch && dd if=patch of=mnt/unit:0:0:1 bs=1000 seek=77 conv=notrunc,fsync 2>/dev/null")
            try scratch.sh("dd if=patch of=one.raw bs=1000 seek=77 conv=notrunc 2>/dev/null && cmp one.raw mnt/unit:0:0:1")
        }
        try scratch.sh("cmp one.raw \(target.scratch.path("one.raw"))")
    }

    @Test func mountFailuresAreOneLineAndLeaveNothingMounted() throws {
        let scratch = try Scratch()
        try scratch.sh("truncate -s 1M one.raw && mkdir mnt && printf 's3cretpassw0rd\\n' > secret && printf 'wrong\\n' > wrong")
        let target = try TestTarget(scratch: scratch)
        defer { target.stop() }
        try target.define(luns: ["one.raw"])
        try target.requireCHAP(user: "alice", password: "s3cretpassw0rd")
        let wrongIQN = poolfs("mount --foreground iscsi://127.0.0.1:\(target.port)/iqn.2026-01.org.poolfs.test:nosuch mnt", in: scratch)
        #expect(wrongIQN.status != 0 && wrongIQN.output.hasPrefix("poolfs: iSCSI login") && wrongIQN.output.contains("Target not found"), "\(wrongIQN.output)")
        let badChap = poolfs("mount --foreground -o chap_user=alice,chap_secret_file=wrong \(target.url) mnt", in: scratch)
        #expect(badChap.status != 0 && badChap.output.contains("Authentication failure"), "\(badChap.output)")
        #expect(!badChap.output.contains("s3cret") && !badChap.output.contains("wrong\n"))
        let refused = poolfs("mount --foreground iscsi://127.0.0.1:\(try TestTarget.freePort())/\(TestTarget.iqn) mnt", in: scratch)
        #expect(refused.status != 0 && refused.output.contains("Connection refused"), "\(refused.output)")
        for failure in [wrongIQN, badChap, refused] {
            #expect(failure.output.split(separator: "\n").count == 1, "\(failure.output)")
        }
        let noFile = poolfs("mount --foreground -o chap_user=alice,chap_secret_file=nosuch \(target.url) mnt", in: scratch)
        #expect(noFile.status != 0 && noFile.output.contains("chap_secret_file=nosuch: cannot be read"), "\(noFile.output)")
        #expect(!PoolMount.isMounted(scratch.path("mnt")))

        let mount = try PoolMount(target.url, in: scratch, options: ["chap_user=alice,chap_secret_file=\(scratch.path("secret"))"])
        defer { mount.unmount() }
        #expect(FileManager.default.fileExists(atPath: mount.path("unit:0:0:1")))
    }
}
