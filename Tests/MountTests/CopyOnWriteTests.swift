import Foundation
import TestSupport
import Testing

/// `-o cow`: volumes and snapshots take writes, which land in a block cache and never in the
/// images. The case that needs it: an ext4 whose journal needs recovery mounts only writable.
@Suite("copy-on-write mounts")
struct CopyOnWriteTests {
    @Test func aJournalNeedingRecoveryMountsAndTheImageStaysUntouched() throws {
        let scratch = try Scratch()
        try scratch.sh("""
            mkdir pool files spill && echo 'kept in the image' > files/a.txt &&
            truncate -s 64M fs.raw && mkfs.ext4 -q -F -d files fs.raw &&
            debugfs -w -R 'feature needs_recovery' fs.raw >/dev/null 2>&1 &&
            dumpe2fs -h fs.raw 2>/dev/null | grep -q needs_recovery &&
            qemu-img convert -O qcow2 fs.raw pool/guest.qcow2 && qemu-img snapshot -c before pool/guest.qcow2 &&
            qemu-img create -q -f raw pool/plain.img 1M && sha256sum pool/* > sums
            """)
        do {
            let readOnly = try PoolMount(scratch.path("pool"), in: scratch, name: "ro")
            defer { readOnly.unmount() }
            #expect(throws: ShellError.self, "without cow the loop device is read-only and the journal cannot be replayed") {
                try scratch.sh("mkdir -p inside && mount -o loop '\(readOnly.path("guest.qcow2"))' inside")
            }
        }
        do {
            let mount = try PoolMount(scratch.path("pool"), in: scratch,
                                      options: ["cow,cow_memory=1M,cache_dir=\(scratch.path("spill"))"], name: "cow")
            defer { mount.unmount() }
            try scratch.sh("mkdir -p inside && mount -o loop '\(mount.path("guest.qcow2"))' inside")
            defer { _ = try? scratch.sh("umount inside") }
            #expect(try String(contentsOfFile: scratch.path("inside/a.txt"), encoding: .utf8) == "kept in the image\n")
            // 3 MB through a 1 MiB memory budget: most blocks spill to cache_dir.
            try scratch.sh("head -c 3000000 /dev/urandom > inside/new && cp inside/new new.expected && sync && umount inside")
            try scratch.sh("mount -o loop,ro '\(mount.path("guest.qcow2"))' inside && cmp inside/new new.expected && umount inside")
            let unlinkedSpill = try FileManager.default.contentsOfDirectory(atPath: scratch.path("spill"))
            #expect(unlinkedSpill.isEmpty, "the spill file is unlinked as soon as it is made")

            // Every file takes writes, snapshots too, and reads see them; unwritten bytes stay the image's.
            for file in ["plain.img", ".snapshots/guest.qcow2/before"] {
                let fd = open(mount.path(file), O_RDWR)
                #expect(fd >= 0, "\(file) opens read-write")
                var pattern = [UInt8](repeating: 0xc5, count: 70_000)
                #expect(pwrite(fd, &pattern, pattern.count, 65_000) == pattern.count)
                var back = [UInt8](repeating: 0, count: 70_010)
                #expect(pread(fd, &back, back.count, 64_995) == back.count)
                if file == "plain.img" { #expect(back[0..<5].allSatisfy { $0 == 0 }, "bytes around the write are the image's") }
                #expect(Array(back[5..<70_005]) == pattern, "\(file): reads see the write")
                #expect(ftruncate(fd, 12345) < 0 && errno == EPERM, "a disk keeps its size")
                close(fd)
            }
            #expect(try contents(mount.path("plain.img")).count == 1 << 20)
        }
        try scratch.sh("sha256sum -c --quiet sums")
        // A new mount starts from the images again: what was written is gone.
        let again = try PoolMount(scratch.path("pool"), in: scratch, options: ["cow"], name: "again")
        defer { again.unmount() }
        #expect(try contents(again.path("plain.img")) == Data(count: 1 << 20))
    }
}
