import Foundation
import TestSupport
import Testing

/// LVM pools against a real device-mapper kernel. This project's host kernel has no
/// device-mapper, so `scripts/dm-vm.sh` boots Debian's kernel in QEMU with this machine's root
/// filesystem (the freshly built poolfs, lvm2, fuse3) and two blank disk images. In one boot,
/// `dm-vm/make-matrix.sh` builds the LVM matrix (linear, striped, classic snapshots, one of them
/// overflowed, a thin pool, a thin LV, a thin snapshot and a snapshot of it) and dumps what
/// device-mapper reads from every LV; `dm-vm/check-in-vm.sh` then mounts the VG with poolfs
/// (device-mapper mode with every LV inactive, then with some active, then `-o noactivate`) and
/// compares every file with its dump; `dm-vm/check-snapshots.sh` runs `poolfs snapshot` on a
/// small VG of its own (a loop device in the VM) and compares the reverted LVs with their dumps,
/// mounted and not. Afterwards this host mounts the same images, attached
/// read-only, with `-o noactivate` and compares them with the same dumps.
///
/// Never skipped: a VM that cannot boot fails the test. It takes a few minutes under TCG.
/// Alone, as root: `POOLFS_BIN=$(swift build --show-bin-path)/poolfs swift test --filter DeviceMapperVMTests`.
@Suite("LVM on a device-mapper kernel, in a QEMU VM", .serialized)
struct DeviceMapperVMTests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    static let dmVM = root + "/scripts/dm-vm.sh"
    static let scripts = root + "/Tests/MountTests/dm-vm"

    /// Each dump (`expected/<lv>.raw`) and the file of the mount that must read as it. A snapshot
    /// shows under the volume its chain of origins ends at: thinsnap2, a snapshot of thinsnap,
    /// beside thinsnap under `thin` (thinsnap is no volume of its own).
    static let files: [(lv: String, path: String)] = [
        ("linear", "linear"), ("striped", "striped"), ("thin", "thin"),
        ("snap", ".snapshots/linear/snap"), ("thinsnap", ".snapshots/thin/thinsnap"),
        ("thinsnap2", ".snapshots/thin/thinsnap2"),
    ]
    /// The classic snapshot whose COW overflowed: every read fails with EIO.
    static let overflowed = ".snapshots/linear/snapfull"
    /// check-snapshots.sh's checks, in order (see its header), on a VG of its own.
    static let snapshotChecks = ["create", "held", "mount:new", "revert", "mount:revert", "kept", "revert2", "mount:held", "delete", "untouched"]
    /// The parts of check-in-vm.sh, each a fresh mount.
    static let parts = [
        ("dm-inactive", "device-mapper mode, every LV inactive before the mount"),
        ("dm-active", "device-mapper mode, linear, striped and thin active before the mount"),
        ("noactivate", "-o noactivate (from the PVs)"),
    ]

    @Test func lvmMatrixReadsAsDeviceMapperDoes() throws {
        #expect(getuid() == 0, "the device-mapper VM test needs root (loop devices and FUSE on this host)")
        let scratch = try Scratch()
        let vg = "pfsvm\(getpid())"
        // The VM sees this machine's root, but with tmpfs over /tmp, /run and /var/tmp.
        var poolfs = URL(fileURLWithPath: Binary.path).standardizedFileURL.path
        #expect(FileManager.default.isExecutableFile(atPath: poolfs), "poolfs is not built at \(poolfs)")
        if ["/tmp/", "/run/", "/var/tmp/", "/dev/"].contains(where: poolfs.hasPrefix) {
            try scratch.sh("cp '\(poolfs)' poolfs")
            poolfs = scratch.path("poolfs")
        }
        // So are the scripts when the checkout is there (CI clones anywhere): they go with the disks.
        try scratch.sh("truncate -s 96M disk0.img disk1.img && mkdir out && cp '\(Self.scripts)'/*.sh .")
        let scripts = scratch.dir
        try """
            VG=\(vg) sh '\(scripts)/make-matrix.sh' '\(scratch.path("out"))' || { echo "make-matrix.sh failed: $?"; exit 1; }
            sh '\(scripts)/check-in-vm.sh' '\(scratch.path("out"))' '\(poolfs)' \(vg)
            sh '\(scripts)/check-snapshots.sh' '\(scratch.path("out"))' '\(poolfs)' \(vg)s

            """.write(toFile: scratch.path("run.sh"), atomically: true, encoding: .utf8)

        let started = Date()
        // The script's output, from vm.log (decoded leniently: it may hold any bytes).
        func vmLog() -> String { String(decoding: (try? contents(scratch.path("vm.log"))) ?? Data(), as: UTF8.self) }
        do {
            try scratch.sh("'\(Self.dmVM)' --timeout 1200 --disk disk0.img --disk disk1.img '\(scratch.dir)' run.sh")
        } catch let error as ShellError {
            Issue.record("the device-mapper VM failed (scripts/dm-vm.sh exited \(error.status)); its output ends:\n\(vmLog().suffix(6000))\n\(error.output.suffix(3000))")
            throw error
        }
        let vmOutput = vmLog()
        print("DeviceMapperVMTests: the VM ran for \(Int(Date().timeIntervalSince(started))) s")
        for line in vmOutput.split(separator: "\n") where line.hasPrefix("make-matrix: built") || line.hasPrefix("check-snapshots: took")
            || line.hasPrefix("check-in-vm: ") && (line.hasSuffix(" s") || line.contains(" OK, ")) {
            print("DeviceMapperVMTests: \(line)")
        }
        let syslog = String(decoding: (try? contents(scratch.path("out/syslog.txt"))) ?? Data(), as: UTF8.self)
            .split(separator: "\n").filter { $0.contains("poolfs") }.suffix(80).joined(separator: "\n")

        // 1 and 2: the checks made in the VM.
        let rows = try String(contentsOfFile: scratch.path("out/results.txt"), encoding: .utf8)
            .split(separator: "\n").map { $0.split(separator: "\t", omittingEmptySubsequences: false).map(String.init) }
            .filter { $0.count == 4 }
        var failedInVM = false
        for (part, meaning) in Self.parts + [("live", "changes while mounted, -o cow and -o rw"), ("snapshot", "poolfs snapshot create|revert|delete")] {
            let checks = part == "live" ? ["cow:write", "cow:unchanged", "live:create", "rw:write", "rw:snapshot", "live:remove"]
                : part == "snapshot" ? Self.snapshotChecks
                : ["mount"] + Self.files.map { "cmp:\($0.path)" } + ["tree", "ls", "eio:\(Self.overflowed)", "unmount", "activation"]
            for check in checks {
                guard let row = rows.first(where: { $0[0] == part && $0[2] == check }) else {
                    Issue.record("in the VM, \(part) (\(meaning)): the check \(check) did not run; the VM's output ends:\n\(vmOutput.suffix(4000))")
                    failedInVM = true
                    break
                }
                if row[1] != "OK" {
                    Issue.record("in the VM, \(part) (\(meaning)): \(check) failed: \(row[3])")
                    failedInVM = true
                    if check == "mount" { break }  // the rest of the part did not run
                } else if check == "tree" {
                    let listed = Set(row[3].split(separator: " ").map(String.init))
                    let expected = Set(Self.files.map(\.path) + [Self.overflowed])
                    #expect(listed == expected, "in the VM, \(part) (\(meaning)): the files of the mount (find -type f) are not the volumes and snapshots of the VG: missing \(expected.subtracting(listed).sorted()), unexpected \(listed.subtracting(expected).sorted())")
                }
            }
        }
        if failedInVM { print("DeviceMapperVMTests: poolfs's syslog in the VM:\n\(syslog)") }

        // 3: this host, no device-mapper: the same images, read-only loops, -o noactivate.
        setenv("LVM_SUPPRESS_FD_WARNINGS", "1", 1)
        var loops: [String] = []
        defer { for loop in loops { _ = try? scratch.sh("losetup -d \(loop)") } }
        for image in ["disk0.img", "disk1.img"] {
            loops.append(try scratch.sh("losetup -r --show -f \(image)").trimmingCharacters(in: .whitespacesAndNewlines))
        }
        var failedOnHost = false
        do {
            let mount = try PoolMount(vg, in: scratch, options: ["type=logical", "noactivate"], name: "hostmnt")
            defer { mount.unmount() }
            for (lv, path) in Self.files {
                let expected = try contents(scratch.path("out/expected/\(lv).raw"))
                do {
                    let read = try contents(mount.path(path))
                    if let difference = describeDifference(read, expected) {
                        Issue.record("on this host (-o noactivate): \(path) differs from what device-mapper read from \(lv): \(difference)")
                        failedOnHost = true
                    }
                } catch {
                    Issue.record("on this host (-o noactivate): reading \(path) failed: \(error)")
                    failedOnHost = true
                }
            }
            let listed = Set(try scratch.sh("timeout 60 find hostmnt -type f -printf '%P\\n'").split(separator: "\n").map(String.init))
            let expected = Set(Self.files.map(\.path) + [Self.overflowed])
            #expect(listed == expected, "on this host (-o noactivate): the files of the mount are not the volumes and snapshots of the VG: missing \(expected.subtracting(listed).sorted()), unexpected \(listed.subtracting(expected).sorted())")
            let eio = readErrors(mount.path(Self.overflowed), at: [0, 4 << 20, 11 << 20])
            if !eio.isEmpty {
                Issue.record("on this host (-o noactivate): the overflowed snapshot \(Self.overflowed) must fail every read with EIO: \(eio.joined(separator: "; "))")
                failedOnHost = true
            }
            // The thin LV's data ranges (SEEK_DATA/SEEK_HOLE through the mount) are exactly the
            // blocks thin_dump finds mapped in the kernel's own metadata, copied off the PV.
            let thinDump = try thinDumpRanges(vg: vg, thinLV: "thin", in: scratch)
            let seen = try dataRanges(of: mount.path("thin"))
            #expect(!thinDump.isEmpty && seen == thinDump, "on this host: SEEK_DATA/SEEK_HOLE of thin are not thin_dump's mappings: \(seen) vs \(thinDump)")
            mount.unmount()
        } catch {
            Issue.record("on this host (-o noactivate): \(error)")
            failedOnHost = true
        }
        if failedOnHost, let log = try? String(contentsOfFile: scratch.path("hostmnt.log"), encoding: .utf8) {
            print("DeviceMapperVMTests: poolfs's log on this host:\n\(log.suffix(6000))")
        }
        print("DeviceMapperVMTests: \(Int(Date().timeIntervalSince(started))) s in all")
    }
}

/// The byte ranges of thin LV `thinLV` that its pool maps, from thin_dump (thin-provisioning-tools)
/// run on the pool's metadata LV copied straight off the PV (`pe_start + extent × extent size`),
/// merged where adjacent.
private func thinDumpRanges(vg: String, thinLV: String, in scratch: Scratch) throws -> [Range<UInt64>] {
    func field(_ command: String) throws -> String {
        try scratch.sh("LVM_SUPPRESS_FD_WARNINGS=1 \(command)").trimmingCharacters(in: .whitespacesAndNewlines)
    }
    let pool = try field("lvs --noheadings -o pool_lv \(vg)/\(thinLV)")
    let thinID = try field("lvs --noheadings -o thin_id \(vg)/\(thinLV)")
    // Hidden LVs are listed with -a only: "[pool_tmeta] /dev/loop3:2-2".
    let rows = try field("lvs -a --noheadings -o lv_name,seg_pe_ranges \(vg)").split(separator: "\n")
    let row = try #require(rows.first { $0.contains("[\(pool)_tmeta]") }, "no [\(pool)_tmeta] in lvs -a")
    let parts = try #require(row.split(separator: " ").last).split(separator: ":")
    let extents = try #require(parts.count == 2 ? parts[1].split(separator: "-").compactMap { UInt64($0) } : nil)
    try #require(extents.count == 2, "seg_pe_ranges of [\(pool)_tmeta]: \(row)")
    let peStartText = try field("pvs --noheadings -o pe_start --units b --nosuffix \(parts[0])")
    let extentSizeText = try field("vgs --noheadings -o vg_extent_size --units b --nosuffix \(vg)")
    let peStart = try #require(UInt64(peStartText)), extentSize = try #require(UInt64(extentSizeText))
    let at = peStart + extents[0] * extentSize, count = (extents[1] - extents[0] + 1) * extentSize
    try scratch.sh("dd if=\(parts[0]) of=tmeta.bin bs=65536 iflag=skip_bytes,count_bytes skip=\(at) count=\(count) status=none")
    let xml = try scratch.sh("thin_dump tmeta.bin")
    let sizeMatch = try #require(xml.firstMatch(of: /data_block_size="(\d+)"/))
    let blockSize = try #require(UInt64(sizeMatch.1)) * 512
    let devicePattern = try Regex("<device dev_id=\"\(thinID)\"[^>]*>([\\s\\S]*?)</device>")
    let device = try #require(xml.firstMatch(of: devicePattern))
    var blocks: [Range<UInt64>] = []
    for match in String(device.output[1].substring ?? "").matches(of: /<(single|range)_mapping ([^\/]*)\/>/) {
        let attributes = Dictionary(uniqueKeysWithValues: String(match.2).matches(of: /(\w+)="(\d+)"/).map { (String($0.1), UInt64($0.2)!) })
        let start = attributes["origin_block"] ?? attributes["origin_begin"]!
        blocks.append(start..<start + (attributes["length"] ?? 1))
    }
    var merged: [Range<UInt64>] = []
    for block in blocks.sorted(by: { $0.lowerBound < $1.lowerBound }) {
        let range = block.lowerBound * blockSize..<block.upperBound * blockSize
        if let last = merged.last, last.upperBound == range.lowerBound {
            merged[merged.count - 1] = last.lowerBound..<range.upperBound
        } else {
            merged.append(range)
        }
    }
    return merged
}

/// Nil when equal; otherwise the sizes or the first differing byte and how many 4 KiB blocks differ.
private func describeDifference(_ read: Data, _ expected: Data) -> String? {
    if read.count != expected.count { return "it has \(read.count) bytes, device-mapper \(expected.count)" }
    return read.withUnsafeBytes { (a: UnsafeRawBufferPointer) -> String? in
        expected.withUnsafeBytes { (b: UnsafeRawBufferPointer) -> String? in
            var first: Int?
            var blocks = 0
            var at = 0
            while at < a.count {
                let n = min(4096, a.count - at)
                if memcmp(a.baseAddress! + at, b.baseAddress! + at, n) != 0 {
                    blocks += 1
                    if first == nil {
                        first = (at..<at + n).first { a[$0] != b[$0] }
                    }
                }
                at += n
            }
            guard let first else { return nil }
            return "first at byte \(first) (0x\(String(first, radix: 16))), \(blocks) of \(a.count / 4096) 4 KiB blocks differ"
        }
    }
}

/// What is wrong with reading 4 KiB of `path` at each offset, when that should fail with EIO
/// (at open, or at every read).
private func readErrors(_ path: String, at offsets: [off_t]) -> [String] {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { return errno == EIO ? [] : ["open failed with \(String(cString: strerror(errno))), not EIO"] }
    defer { close(fd) }
    var buffer = [UInt8](repeating: 0, count: 4096)
    var problems: [String] = []
    for offset in offsets {
        let n = pread(fd, &buffer, buffer.count, offset)
        if n >= 0 {
            problems.append("read at \(offset) returned \(n) bytes")
        } else if errno != EIO {
            problems.append("read at \(offset) failed with \(String(cString: strerror(errno))), not EIO")
        }
    }
    return problems
}
