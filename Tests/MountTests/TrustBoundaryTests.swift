import Foundation
import TestSupport
import Testing

/// Issue 22's attacks, each run as an unprivileged user (uid 65534) through a real mount of a
/// world-writable pool (mode 1777) with allow_other,default_permissions, read-only and `-o rw`.
/// Each must fail safely: the open fails, the file outside stays unread and unchanged, the reason
/// is in user.poolfs.error and `poolfs ls`, and the other volumes still read.
@Suite("trust boundary: files that images name")
struct TrustBoundaryTests {
    static let options = ["allow_other,default_permissions"]
    static let rwOptions = ["allow_other,default_permissions,rw"]

    /// A scratch directory (0755) with `pool` (1777), a root-only `secret` outside it, and an
    /// ordinary volume `good.raw` that must keep reading whatever happens to the others.
    static func world() throws -> Scratch {
        let scratch = try Scratch()
        try scratch.sh("""
            chmod 755 . && mkdir pool && chmod 1777 pool &&
            printf 'TOP-SECRET-%.0s' $(seq 1 200) > secret && chmod 600 secret &&
            head -c 65536 /dev/urandom > pool/good.raw && chmod 644 pool/good.raw
            """)
        return scratch
    }

    /// Runs `script` with sh as uid/gid 65534 with no supplementary groups; whether it succeeded,
    /// and its output.
    @discardableResult
    static func asUser(_ script: String, in scratch: Scratch) -> (ok: Bool, output: String) {
        let file = scratch.path("user-\(UUID().uuidString).sh")
        FileManager.default.createFile(atPath: file, contents: Data(script.utf8), attributes: [.posixPermissions: 0o755])
        return scratch.attempt("setpriv --reuid=65534 --regid=65534 --clear-groups sh '\(file)' 2>&1")
    }

    static func xattr(_ name: String, of path: String, in scratch: Scratch) -> String {
        scratch.attempt("getfattr --absolute-names --only-values -n \(name) '\(path)'").output
    }

    /// What a refused volume must look like through `mount`: listed, unreadable by anyone, its
    /// reason in user.poolfs.error; and `good.raw` still reads.
    static func expectRefused(_ volume: String, _ mount: PoolMount, in scratch: Scratch, because reason: String,
                              sourceLocation: SourceLocation = #_sourceLocation) throws {
        let listing = try FileManager.default.contentsOfDirectory(atPath: mount.mountpoint)
        #expect(listing.contains(volume), "\(volume) stays listed: \(listing)", sourceLocation: sourceLocation)
        let read = asUser("head -c 4096 '\(mount.path(volume))' | od -c | head -3", in: scratch)
        #expect(!read.output.contains("T   O   P   -   S"), "the secret leaked: \(read.output)", sourceLocation: sourceLocation)
        #expect(!asUser("head -c 1 '\(mount.path(volume))' > /dev/null", in: scratch).ok, "\(volume) must not open", sourceLocation: sourceLocation)
        #expect(FileManager.default.contents(atPath: mount.path(volume)) == nil, "\(volume) must not open for root either",
                sourceLocation: sourceLocation)
        let error = xattr("user.poolfs.error", of: mount.path(volume), in: scratch)
        #expect(error.contains(reason), "user.poolfs.error of \(volume): \(error)", sourceLocation: sourceLocation)
        #expect(try contents(mount.path("good.raw")) == (try contents(scratch.path("pool/good.raw"))), sourceLocation: sourceLocation)
    }

    /// A qcow2 made by the user in the pool whose backing file is `name` (no checks: -u).
    static func userOverlay(_ image: String, backing name: String, format: String? = "raw", in scratch: Scratch) {
        let made = asUser("cd pool && qemu-img create -q -f qcow2 -u -b '\(name)' -F \(format ?? "raw") '\(image)' 1M", in: scratch)
        #expect(made.ok, "\(made.output)")
        if format == nil { dropBackingFormat(scratch.path("pool/" + image)) }
    }

    /// Turns the image's backing-format header extension (0xe2792aca) into an unknown one, so
    /// the image records no backing format (qemu-img no longer makes such images).
    static func dropBackingFormat(_ path: String) {
        let handle = FileHandle(forUpdatingAtPath: path)!
        defer { try? handle.close() }
        var header = [UInt8](handle.readData(ofLength: 4096))
        // Extensions start at header_length (offset 100 of a version 3 header).
        var at = Int(header[100..<104].reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
        while at + 8 <= header.count {
            let type = header[at..<at + 4].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            let length = Int(header[at + 4..<at + 8].reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
            if type == 0 { break }
            if type == 0xe279_2aca {
                header.replaceSubrange(at..<at + 4, with: [0x7f, 0x00, 0x00, 0x01])
                try! handle.seek(toOffset: 0)
                handle.write(Data(header))
                return
            }
            at += 8 + (length + 7) / 8 * 8
        }
        Issue.record("no backing format extension in \(path)")
    }

    @Test func backingFilesOutsideThePoolAreNotRead() throws {
        let scratch = try Self.world()
        let secret = scratch.path("secret")
        Self.userOverlay("absolute.qcow2", backing: secret, in: scratch)
        Self.userOverlay("relative.qcow2", backing: "../secret", in: scratch)
        Self.userOverlay("probed.qcow2", backing: secret, format: nil, in: scratch)
        try scratch.sh("mkdir -m 1777 pool/sub")
        Self.userOverlay("sub/deep.qcow2", backing: "../../secret", in: scratch)
        try scratch.sh("ln -s sub/deep.qcow2 pool/deep.qcow2")
        // A NUL in the name: "<secret>\0.x" must not open the part before the NUL.
        Self.userOverlay("nul.qcow2", backing: secret + "X.x", in: scratch)
        try scratch.sh("python3 -c \"import sys; p='pool/nul.qcow2'; d=bytearray(open(p,'rb').read()); i=d.find(b'secretX.x'); d[i+6]=0; open(p,'wb').write(d)\"")
        for options in [Self.options, Self.rwOptions] {
            let mount = try PoolMount(scratch.path("pool"), in: scratch, options: options)
            defer { mount.unmount() }
            for volume in ["absolute.qcow2", "relative.qcow2", "probed.qcow2", "deep.qcow2", "nul.qcow2"] {
                try Self.expectRefused(volume, mount, in: scratch, because: "outside the pool")
            }
        }
        let listed = runPoolfs("ls '\(scratch.path("pool"))'", in: scratch)
        #expect(listed.output.contains("outside the pool"), "poolfs ls says why: \(listed.output)")
        #expect(!listed.output.contains("TOP-SECRET"))
    }

    @Test func filesInsideThePoolTheOwnerCannotReadAreNotShown() throws {
        let scratch = try Self.world()
        try scratch.sh("cp secret pool/root-only.raw && chmod 600 pool/root-only.raw")
        Self.userOverlay("peek.qcow2", backing: "root-only.raw", in: scratch)
        // Attack 5: an overlay of the user's over a base only root may read locks nothing.
        try scratch.sh("mkdir pool/private && qemu-img create -q -f qcow2 pool/private/base.qcow2 1M && chmod 600 pool/private/base.qcow2")
        Self.userOverlay("over.qcow2", backing: "private/base.qcow2", format: "qcow2", in: scratch)
        // A backing file with no recorded format is probed; probed as qcow2, it may name no file.
        Self.asUser("cd pool && qemu-img create -q -f qcow2 -u -b good.raw -F raw mid.qcow2 1M", in: scratch)
        Self.userOverlay("chain.qcow2", backing: "mid.qcow2", format: nil, in: scratch)
        Self.userOverlay("probed-raw.qcow2", backing: "good.raw", format: nil, in: scratch)
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: Self.options)
        defer { mount.unmount() }
        try Self.expectRefused("peek.qcow2", mount, in: scratch, because: "not readable by the image's owner")
        try Self.expectRefused("chain.qcow2", mount, in: scratch, because: "may not name other files")
        try scratch.sh("qemu-img convert -O raw pool/probed-raw.qcow2 probed-raw.expected")
        #expect(try contents(mount.path("probed-raw.qcow2")) == (try contents(scratch.path("probed-raw.expected"))),
                "a backing file probed as raw reads")
        try Self.expectRefused("over.qcow2", mount, in: scratch, because: "not readable by the image's owner")
        #expect(FileLocks.on(scratch.path("pool/private/base.qcow2")).isEmpty, "no lock on a base the overlay's owner cannot read")
        #expect(scratch.attempt("qemu-io -c 'write 0 512' '\(scratch.path("pool/private/base.qcow2"))'").ok, "a VM may still use the base")
    }

    @Test func theShownModeGrantsNothingALowerFileRefuses() throws {
        let scratch = try Self.world()
        try scratch.sh("""
            qemu-img create -q -f qcow2 pool/base.qcow2 1M && chmod 600 pool/base.qcow2 &&
            qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 pool/top.qcow2 && chmod 644 pool/top.qcow2 &&
            qemu-img create -q -f qcow2 pool/open-base.qcow2 1M && chmod 644 pool/open-base.qcow2 &&
            qemu-img create -q -f qcow2 -b open-base.qcow2 -F qcow2 pool/open-top.qcow2 && chmod 644 pool/open-top.qcow2
            """)
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: Self.options)
        defer { mount.unmount() }
        let mode = { (name: String) in
            ((try FileManager.default.attributesOfItem(atPath: mount.path(name)))[.posixPermissions] as! NSNumber).intValue
        }
        #expect(try mode("top.qcow2") == 0o600, "root's overlay of a 0600 base shows 0600")
        #expect(try mode("open-top.qcow2") == 0o644)
        #expect(!Self.asUser("head -c 1 '\(mount.path("top.qcow2"))' > /dev/null", in: scratch).ok)
        #expect(Self.asUser("head -c 1 '\(mount.path("open-top.qcow2"))' > /dev/null", in: scratch).ok)
    }

    @Test func dataFilesOutsideThePoolAreNeverWritten() throws {
        let scratch = try Self.world()
        try scratch.sh("head -c 1048576 /dev/urandom > victim && chmod 644 victim && truncate -s 4M disk.img")
        let loop = try scratch.sh("losetup -f --show disk.img").trimmingCharacters(in: .whitespacesAndNewlines)
        defer { _ = scratch.attempt("losetup -d \(loop)") }
        let before = try scratch.sh("sha256sum victim disk.img")
        for (image, target) in [("w.qcow2", scratch.path("victim")), ("dev.qcow2", loop)] {
            let made = Self.asUser("""
                cd pool && qemu-img create -q -f qcow2 -o data_file=\(image).data,data_file_raw=on \(image) 1M &&
                qemu-img amend -f qcow2 -o data_file='\(target)' \(image)
                """, in: scratch)
            #expect(made.ok, "\(made.output)")
        }
        for options in [Self.rwOptions, Self.options] {
            let mount = try PoolMount(scratch.path("pool"), in: scratch, options: options)
            defer { mount.unmount() }
            for volume in ["w.qcow2", "dev.qcow2"] {
                let wrote = Self.asUser("dd if=/dev/zero of='\(mount.path(volume))' bs=4096 count=300 conv=notrunc,fsync", in: scratch)
                #expect(!wrote.ok, "\(volume): \(wrote.output)")
                try Self.expectRefused(volume, mount, in: scratch, because: "outside the pool")
            }
        }
        #expect(try scratch.sh("sha256sum victim disk.img") == before, "the data files outside the pool are unchanged")
        #expect(try scratch.sh("stat -c %s victim") == "1048576\n")
    }

    @Test func dataFilesInThePoolShowInTheirXattr() throws {
        let scratch = try Self.world()
        try scratch.sh("cd pool && qemu-img create -q -f qcow2 -o data_file=d.data,data_file_raw=on d.qcow2 1M && qemu-io -c 'write -P 7 0 64k' d.qcow2")
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: Self.options)
        defer { mount.unmount() }
        try scratch.sh("cd pool && qemu-img convert -O raw d.qcow2 ../d.expected")
        #expect(try contents(mount.path("d.qcow2")) == (try contents(scratch.path("d.expected"))))
        #expect(Self.xattr("user.poolfs.data_file", of: mount.path("d.qcow2"), in: scratch).hasSuffix("d.data"))
    }

    @Test func protocolsAndSpecialFilesAreRefusedWithoutWaiting() throws {
        let scratch = try Self.world()
        for (image, name) in [("file.qcow2", "file:\(scratch.path("secret"))"), ("nbd.qcow2", "nbd:localhost:10809"),
                              ("hostdev.qcow2", "host_device:/dev/loop0"), ("json.qcow2", "json:{\"file.filename\":\"/etc/passwd\"}")] {
            Self.userOverlay(image, backing: name, in: scratch)
        }
        // Attack 6: a FIFO as the backing file; nothing ever opens it for writing.
        try scratch.sh("mkfifo -m 666 pool/fifo")
        Self.userOverlay("fifo.qcow2", backing: "fifo", in: scratch)
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: Self.options)
        defer { mount.unmount() }
        for image in ["file.qcow2", "nbd.qcow2", "hostdev.qcow2", "json.qcow2"] {
            try Self.expectRefused(image, mount, in: scratch, because: "names a protocol")
        }
        // A hang would outlive these generous deadlines; a refusal comes at once.
        #expect(scratch.attempt("timeout 60 stat '\(mount.path("fifo.qcow2"))'").ok)
        #expect(!scratch.attempt("timeout 60 head -c 1 '\(mount.path("fifo.qcow2"))'").ok)
        #expect(Self.xattr("user.poolfs.error", of: mount.path("fifo.qcow2"), in: scratch).contains("FIFO"))
        #expect(scratch.attempt("timeout 60 ls '\(mount.mountpoint)'").ok, "the root still lists")
        let names = try FileManager.default.contentsOfDirectory(atPath: mount.mountpoint)
        #expect(!names.contains("fifo"), "a FIFO is no volume")
    }

    @Test func legitimateOverlaysStillReadAndBackingDirsAllowsMore() throws {
        let scratch = try Self.world()
        try scratch.sh("""
            mkdir pool/bases other && qemu-img create -q -f qcow2 pool/bases/base.qcow2 4M &&
            qemu-io -c 'write -P 1 0 1M' pool/bases/base.qcow2 > /dev/null &&
            qemu-img create -q -f qcow2 -b bases/base.qcow2 -F qcow2 pool/rel.qcow2 &&
            qemu-img create -q -f qcow2 -b "$PWD/pool/bases/base.qcow2" -F qcow2 pool/abs.qcow2 &&
            qemu-io -c 'write -P 2 1M 1M' pool/rel.qcow2 > /dev/null &&
            qemu-img create -q -f raw other/far.raw 4M && qemu-io -f raw -c 'write -P 3 0 2M' other/far.raw > /dev/null &&
            qemu-img create -q -f qcow2 -b "$PWD/other/far.raw" -F raw pool/far.qcow2 &&
            qemu-img create -q -f qcow2 pool/nulname.qcow2 1M
            """)
        // A backing name made only of NULs is no backing file.
        try scratch.sh("""
            python3 -c "import struct; p='pool/nulname.qcow2'; d=bytearray(open(p,'rb').read()); d[8:16]=struct.pack('>Q',4000); d[16:20]=struct.pack('>I',4); d[4000:4004]=bytes(4); open(p,'wb').write(d)"
            """)
        do {
            let mount = try PoolMount(scratch.path("pool"), in: scratch, options: Self.options)
            defer { mount.unmount() }
            for name in ["rel.qcow2", "abs.qcow2"] {
                try scratch.sh("qemu-img convert -O raw pool/\(name) \(name).expected")
                #expect(try contents(mount.path(name)) == (try contents(scratch.path("\(name).expected"))), "\(name)")
            }
            #expect(try contents(mount.path("nulname.qcow2")) == Data(count: 1 << 20))
            try Self.expectRefused("far.qcow2", mount, in: scratch, because: "backing_dirs")
        }
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: Self.options + ["backing_dirs=\(scratch.path("other"))"])
        defer { mount.unmount() }
        try scratch.sh("qemu-img convert -O raw pool/far.qcow2 far.expected")
        #expect(try contents(mount.path("far.qcow2")) == (try contents(scratch.path("far.expected"))))
    }
}

/// Issue 22, attack 7: a lookup's work does not grow with what an image claims.
@Suite("trust boundary: bounded lookups")
struct TrustBoundaryBoundsTests {
    /// The daemon's user + system CPU seconds so far (/proc/PID/stat, clock ticks).
    static func cpuSeconds(_ pid: Int32) throws -> Double {
        let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
        let fields = stat[stat.range(of: ")")!.upperBound...].split(separator: " ")
        return (Double(fields[11])! + Double(fields[12])!) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    @Test func oneTableBehindEveryL1EntryCostsOneTable() throws {
        let scratch = try TrustBoundaryTests.world()
        try HostileImages.oneTableEverywhere("pool/hostile.qcow2", in: scratch)
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: TrustBoundaryTests.options)
        defer { mount.unmount() }
        let before = try Self.cpuSeconds(mount.process.processIdentifier)
        var st = stat()
        // stat(2) with a deadline only a hang would miss: the count is bounded, and beside the lookup.
        #expect(scratch.attempt("timeout 60 stat '\(mount.path("hostile.qcow2"))'").ok)
        #expect(stat(mount.path("good.raw"), &st) == 0, "another volume's lookup")
        // A loaded machine may not finish the count within the lookup's short wait; it goes on
        // beside it, and a later stat shows it (a deadline only a hang would miss).
        let deadline = Date().addingTimeInterval(60)
        repeat {
            #expect(stat(mount.path("hostile.qcow2"), &st) == 0)
            if UInt64(st.st_blocks) * 512 == 32 << 40 { break }
            usleep(200_000)
        } while Date() < deadline
        #expect(UInt64(st.st_size) == 32 << 40)
        #expect(UInt64(st.st_blocks) * 512 == 32 << 40, "every byte is data, counted from one L2 table")
        // Counting it cluster by cluster took this daemon 30 s and more of CPU (2^29 L2 entries).
        let spent = try Self.cpuSeconds(mount.process.processIdentifier) - before
        #expect(spent < 10, "the daemon spent \(spent) s of CPU on two stats")
    }
}

/// Issue 22, attack 8: names from the pool and from images.
@Suite("trust boundary: names")
struct TrustBoundaryNameTests {
    @Test func everyNameIsReachableAndNoneReachesALogOrTerminalRaw() throws {
        let scratch = try TrustBoundaryTests.world()
        let long = String(repeating: "L", count: 300)
        try scratch.sh("""
            for f in .partitions .snapshots %2Epartitions; do head -c 4096 /dev/urandom > "pool/$f"; done &&
            qemu-img create -q -f qcow2 pool/s.qcow2 1M && qemu-img snapshot -c '\(long)' pool/s.qcow2 &&
            qemu-img snapshot -c aa pool/s.qcow2 && qemu-img snapshot -c bb pool/s.qcow2 && qemu-img snapshot -c cc pool/s.qcow2 &&
            python3 - pool/s.qcow2 <<'PY'
            import struct, sys
            p = sys.argv[1]; d = bytearray(open(p, 'rb').read())
            # Snapshot "bb" (id 3) becomes "aa" with id 2, a twin of the second; "cc" gets a NUL.
            i = d.find(b'bb'); d[i:i+2] = b'aa'; j = d.rfind(b'3', 0, i); d[j] = ord('2')
            k = d.find(b'cc'); d[k+1] = 0
            open(p, 'wb').write(d)
            PY
            """)
        try scratch.sh("head -c 4096 /dev/urandom > \"pool/$(printf 'evil\\nforged line \\033[31mred')\" && qemu-img create -q -f qcow2 -u -b \"$(printf 'x\\033]0;title\\007')\" -F raw pool/esc.qcow2 1M")
        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: TrustBoundaryTests.options + ["rw"])
        defer { mount.unmount() }
        let root = try FileManager.default.contentsOfDirectory(atPath: mount.mountpoint)
        for (shown, file) in [("%2Epartitions", ".partitions"), ("%2Esnapshots", ".snapshots"), ("%252Epartitions", "%2Epartitions")] {
            #expect(root.contains(shown), "\(shown) in \(root)")
            #expect(try contents(mount.path(shown)) == (try contents(scratch.path("pool/" + file))), "\(shown) reads \(file)")
        }
        #expect(root.filter { $0 == ".partitions" }.count == 1 && root.filter { $0 == ".snapshots" }.count == 1,
                "the tree's own directories are listed once: \(root)")
        let snapshots = try FileManager.default.contentsOfDirectory(atPath: mount.path(".snapshots/s.qcow2"))
        #expect(snapshots.count == 4, "\(snapshots)")
        #expect(Set(snapshots).count == 4, "every snapshot has a name of its own, twins included")
        for name in snapshots {
            #expect(name.utf8.count <= 255)
            var st = stat()
            #expect(stat(mount.path(".snapshots/s.qcow2/" + name), &st) == 0, "\(name) is reachable")
        }
        #expect(snapshots.contains("c%00"), "a NUL does not cut a name short: \(snapshots)")
        let listed = runPoolfs("ls '\(scratch.path("pool"))'", in: scratch).output
        _ = try? contents(mount.path("esc.qcow2"))
        let log = try String(contentsOfFile: mount.log, encoding: .utf8)
        for (what, text) in [("poolfs ls", listed), ("the log", log)] {
            #expect(!text.utf8.contains(0x1b) && !text.utf8.contains(0x07), "\(what) carries no raw escape sequence")
            #expect(!text.contains("\nforged line"), "\(what) carries no forged line")
        }
    }
}
