import Foundation
import TestSupport
import Testing

/// Every image format poolfs reads natively, through a real mount, as a user meets it: a disk
/// with a partition table and an ext4 filesystem, converted by qemu-img into each format (and
/// subformat), must show the true disk: its virtual size, the bytes `qemu-img convert -O raw`
/// makes, its partitions under `.partitions/` (one mounted with `mount -o loop`), `fdisk -l`;
/// `-o rw` refuses writes with EROFS and a reason, `-o cow` takes them and leaves the image as it
/// was (`qemu-img check`), and `poolfs snapshot` passes over them with a reason.
@Suite("image formats through a mount", .serialized)
struct FormatMountTests {
    /// A volume name, qemu-img's format name and the options that make it.
    static let volumes: [(name: String, format: String, options: String)] = [
        ("sparse.vmdk", "vmdk", "-o subformat=monolithicSparse"),
        ("stream.vmdk", "vmdk", "-o subformat=streamOptimized"),
        ("flat.vmdk", "vmdk", "-o subformat=monolithicFlat"),
        ("split.vmdk", "vmdk", "-o subformat=twoGbMaxExtentSparse"),
        ("dynamic.vhd", "vpc", "-o subformat=dynamic"),
        ("fixed.vhd", "vpc", "-o subformat=fixed"),
        ("disk.vhdx", "vhdx", ""),
        ("disk.vdi", "vdi", ""),
        ("static.vdi", "vdi", "-o static=on"),
        ("disk.qed", "qed", ""),
    ]

    /// guest.raw: 64 MiB of random bytes with an MBR (an 8 MiB ext4 holding hello.txt, then a
    /// second partition); each volume is a conversion of it.
    static func makePool(_ scratch: Scratch) throws {
        try scratch.sh("""
            mkdir -p pool root && echo 'hello from a converted disk' > root/hello.txt &&
            head -c 64M /dev/urandom > guest.raw &&
            printf 'label: dos\\n,8M,83\\n,20M,83\\n' | sfdisk -q guest.raw &&
            mkfs.ext4 -q -F -d root -E offset=1048576 guest.raw 8M &&
            dd if=/dev/zero of=guest.raw bs=1M seek=40 count=16 conv=notrunc status=none
            """)
        for v in volumes {
            try scratch.sh("qemu-img convert -f raw -O \(v.format) \(v.options) guest.raw pool/\(v.name)")
        }
    }

    static func virtualSize(_ path: String, format: String, in scratch: Scratch) throws -> UInt64 {
        let json = try scratch.sh("qemu-img info -f \(format) --output=json '\(path)'")
        let info = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [String: Any]
        return (info["virtual-size"] as! NSNumber).uint64Value
    }

    @Test func everyFormatShowsTheTrueDiskWithItsPartitions() throws {
        let scratch = try Scratch()
        try Self.makePool(scratch)
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        let listed = Set(try FileManager.default.contentsOfDirectory(atPath: mount.mountpoint))
        #expect(listed.isSuperset(of: Self.volumes.map(\.name)), "listed: \(listed.sorted())")
        #expect(!listed.contains { $0.hasSuffix("-flat.vmdk") || $0.contains("-s00") }, "vmdk extents are not volumes: \(listed.sorted())")
        for v in Self.volumes {
            let file = mount.path(v.name)
            try scratch.sh("qemu-img convert -f \(v.format) -O raw pool/\(v.name) \(v.name).raw")
            let size = try Self.virtualSize(scratch.path("pool/\(v.name)"), format: v.format, in: scratch)
            let attributes = try FileManager.default.attributesOfItem(atPath: file)
            #expect(attributes[.size] as? UInt64 == size, "\(v.name): st_size is the virtual size")
            #expect(scratch.attempt("cmp '\(file)' \(v.name).raw").ok, "\(v.name): the bytes qemu-img converts")
            #expect(TrustBoundaryTests.xattr("user.poolfs.format", of: file, in: scratch) == v.format, "\(v.name)")
            let fdisk = try scratch.sh("fdisk -l '\(file)'")
            #expect(fdisk.contains("\(file)1") && fdisk.contains("\(file)2"), "\(v.name): fdisk -l\n\(fdisk)")
            let parts = try FileManager.default.contentsOfDirectory(atPath: mount.path(".partitions/\(v.name)")).sorted()
            #expect(parts == ["part1", "part2"], "\(v.name): \(parts)")
            var blocks = stat()
            #expect(stat(file, &blocks) == 0 && blocks.st_blocks > 0 && UInt64(blocks.st_blocks) * 512 <= size + (1 << 20),
                    "\(v.name): st_blocks \(blocks.st_blocks) for \(size) bytes")
        }
        // The filesystem inside, through the partition file of a compressed (streamOptimized) vmdk.
        try scratch.sh("mkdir -p inside && mount -o loop,ro '\(mount.path(".partitions/stream.vmdk/part1"))' inside")
        defer { _ = try? scratch.sh("umount inside") }
        #expect(try String(contentsOfFile: scratch.path("inside/hello.txt"), encoding: .utf8) == "hello from a converted disk\n")
    }

    @Test func writesAreRefusedOnRwAndTakenOnCowWithTheImagesUnchanged() throws {
        let scratch = try Scratch()
        try Self.makePool(scratch)
        let sums = try scratch.sh("sha256sum pool/*")
        do {
            let rw = try PoolMount(scratch.path("pool"), in: scratch, options: ["rw"], name: "rw")
            defer { rw.unmount() }
            for v in Self.volumes {
                let write = scratch.attempt("printf x | dd of='\(rw.path(v.name))' bs=1 seek=4096 conv=notrunc status=none")
                #expect(!write.ok && write.output.contains("Read-only file system"), "\(v.name): \(write.output)")
            }
            #expect(try String(contentsOfFile: rw.log, encoding: .utf8).contains("mount with -o cow for a writable view"))
        }
        do {
            let cow = try PoolMount(scratch.path("pool"), in: scratch, options: ["cow"], name: "cow")
            defer { cow.unmount() }
            for v in Self.volumes {
                try scratch.sh("printf written | dd of='\(cow.path(v.name))' bs=1 seek=45000000 conv=notrunc status=none")
                let back = try scratch.sh("dd if='\(cow.path(v.name))' bs=1 skip=45000000 count=7 status=none")
                #expect(back == "written", "\(v.name): reads see the write")
            }
        }
        #expect(try scratch.sh("sha256sum pool/*") == sums, "no image changed")
        // qemu-img has no check for vpc.
        for v in Self.volumes where v.format != "vpc" {
            let check = scratch.attempt("qemu-img check -f \(v.format) pool/\(v.name)")
            #expect(check.ok, "\(v.name): qemu-img check: \(check.output)")
        }
    }

    @Test func poolfsSnapshotPassesOverThemWithAReason() throws {
        let scratch = try Scratch()
        try Self.makePool(scratch)
        try scratch.sh("qemu-img create -q -f qcow2 pool/vm.qcow2 16M")
        let sums = try scratch.sh("sha256sum pool/*.vmdk pool/*.vhd pool/*.vhdx pool/*.vdi pool/*.qed")
        let created = runPoolfs("snapshot create pool class", in: scratch)
        #expect(created.status != 0, "skipped volumes make the exit status non-zero")
        for v in Self.volumes {
            let line = created.output.split(separator: "\n").first { $0.hasPrefix(v.name + " ") } ?? ""
            #expect(line.contains("skipped") && line.contains("only into qcow2 images"), "\(v.name): \(line)")
        }
        #expect(try scratch.sh("qemu-img snapshot -l pool/vm.qcow2").contains("class"))
        #expect(try scratch.sh("sha256sum pool/*.vmdk pool/*.vhd pool/*.vhdx pool/*.vdi pool/*.qed") == sums)
    }
}
