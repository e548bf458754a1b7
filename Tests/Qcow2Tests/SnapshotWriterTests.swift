import Foundation
import Block
import Synchronization
import TestSupport
import Testing

/// Internal snapshots made, reverted and deleted by poolfs, checked against qemu-img: the listing,
/// `qemu-img check` after every phase, and the bytes of a copy that qemu-img reverted itself.
@Suite("qcow2 snapshots written")
struct SnapshotWriterTests {
    typealias Case = ImageCase
    static let data = ImageCase.data
    static let later = "qemu-io -c 'write -P 0x33 512k 1M' -c 'write -P 0x44 3M 64k' -c 'write -z 64k 64k' img.qcow2 >/dev/null"

    static let cases: [Case] = [
        Case(name: "64k clusters", setup: "qemu-img create -q -f qcow2 img.qcow2 4M && \(data)"),
        Case(name: "4k clusters", setup: "qemu-img create -q -f qcow2 -o cluster_size=4k img.qcow2 4M && \(data)"),
        Case(name: "existing snapshots",
             setup: "qemu-img create -q -f qcow2 -o cluster_size=4k img.qcow2 4M && \(data) && qemu-img snapshot -c one img.qcow2 && qemu-io -c 'write -P 0x55 0 100k' img.qcow2 >/dev/null && qemu-img snapshot -c two img.qcow2"),
        Case(name: "compressed clusters",
             setup: "qemu-img create -q -f qcow2 src.qcow2 4M && qemu-io -c 'write -P 0x55 0 3M' src.qcow2 >/dev/null && qemu-img convert -c -O qcow2 -o cluster_size=4k src.qcow2 img.qcow2"),
        Case(name: "over a backing file",
             setup: "qemu-img create -q -f qcow2 base.qcow2 4M && qemu-io -c 'write -P 0x66 0 4M' base.qcow2 >/dev/null && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2 && qemu-io -c 'write -P 0x77 100k 10k' img.qcow2 >/dev/null"),
        Case(name: "extended L2",
             setup: "qemu-img create -q -f qcow2 base.qcow2 4M && qemu-io -c 'write -P 0x66 0 4M' base.qcow2 >/dev/null && qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k -b base.qcow2 -F qcow2 img.qcow2 && qemu-io -c 'write -P 0x77 4k 2k' -c 'write -z 70k 6k' img.qcow2 >/dev/null"),
        Case(name: "version 2", setup: "qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k img.qcow2 4M && \(data) && qemu-img snapshot -c one img.qcow2"),
        Case(name: "refcount_bits=2, 512-byte clusters",
             setup: "qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=2 img.qcow2 4M && \(data)"),
    ]

    static func open(_ scratch: Scratch) throws -> Qcow2Image {
        try #require(try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 1 << 20), writable: true).qcow2)
    }

    /// `qemu-img check` must find nothing at all: no leaks either.
    static func expectClean(_ scratch: Scratch, _ what: String) {
        let check = scratch.attempt("qemu-img check img.qcow2")
        #expect(check.ok, "\(what): \(check.output.prefix(600))")
    }

    /// The live state read and mapped as qemu-img reads and maps it, and each snapshot read as a
    /// copy that qemu-img reverted to it. (Not mapped: the copy is another file, and QEMU's guess
    /// at metadata preallocation, which decides whether holes in data clusters show as zeros,
    /// depends on how much of each file is allocated.)
    static func expectMatchesQemu(_ scratch: Scratch) throws {
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 4 << 20))
        try scratch.sh("qemu-img convert -O raw img.qcow2 live.expected")
        try Oracle.expectSame(image.live, as: scratch.path("live.expected"), "live")
        try Oracle.expectSameMap(image.live, as: "img.qcow2", in: scratch, "live")
        for snapshot in image.snapshots {
            try scratch.sh("cp img.qcow2 copy.qcow2 && qemu-img snapshot -a \(snapshot.id) copy.qcow2 && qemu-img convert -O raw copy.qcow2 snap.expected")
            let device = try #require(image.device(of: snapshot))
            try Oracle.expectSame(device, as: scratch.path("snap.expected"), "snapshot \(snapshot.id) '\(snapshot.name)'")
        }
    }

    @Test("create, write, revert and delete match qemu-img and leave clean images", arguments: cases)
    func createRevertDelete(_ c: Case) throws {
        let scratch = try Scratch()
        try scratch.sh(c.setup)
        try scratch.sh("qemu-img convert -O raw img.qcow2 before.raw")
        let before = try scratch.sh("qemu-img snapshot -l img.qcow2 | awk 'NR > 2 { print $2 }'")

        let date = Date(timeIntervalSince1970: 1_764_578_096.25)
        let made = try Self.open(scratch).createSnapshot(name: "class", date: date)
        Self.expectClean(scratch, "\(c.name): after create")
        let list = try scratch.sh("TZ=UTC qemu-img snapshot -l img.qcow2")
        #expect(list.contains(" class ") && list.contains("2025-12-01 08:34:56"), "\(c.name): \(list)")
        #expect(try scratch.sh("qemu-img snapshot -l img.qcow2 | awk 'NR > 2 { print $2 }'") == before + "class\n")
        #expect(made.id == String(before.split(separator: "\n").count + 1))
        try scratch.sh("qemu-img compare -f qcow2 -F raw img.qcow2 before.raw")
        try Self.expectMatchesQemu(scratch)

        // The class changes the disk; both revert it.
        try scratch.sh(Self.later)
        try scratch.sh("cp img.qcow2 qemu.qcow2 && qemu-img snapshot -a class qemu.qcow2 && qemu-img convert -O raw qemu.qcow2 qemu.raw")
        try Self.open(scratch).revertToSnapshot("class")
        Self.expectClean(scratch, "\(c.name): after revert")
        try scratch.sh("qemu-img convert -O raw img.qcow2 ours.raw && cmp ours.raw qemu.raw && cmp ours.raw before.raw")
        // Writable again by QEMU, and by us.
        try scratch.sh(Self.later)
        try Self.open(scratch).revertToSnapshot("class")
        try scratch.sh("qemu-img compare -f qcow2 -F raw img.qcow2 before.raw")

        // QEMU deletes what we made as cleanly as we do.
        try scratch.sh("cp img.qcow2 qemu.qcow2 && qemu-img snapshot -d class qemu.qcow2 && qemu-img check qemu.qcow2 && qemu-img compare -f qcow2 -F raw qemu.qcow2 before.raw")
        try Self.open(scratch).deleteSnapshot("class")
        Self.expectClean(scratch, "\(c.name): after delete")
        #expect(try scratch.sh("qemu-img snapshot -l img.qcow2 | awk 'NR > 2 { print $2 }'") == before)
        try scratch.sh("qemu-img compare -f qcow2 -F raw img.qcow2 before.raw")
        try Self.expectMatchesQemu(scratch)
    }

    @Test("deleting what qemu-img made, and reverting to it, match qemu-img")
    func qemuSnapshots() throws {
        let scratch = try Scratch()
        try scratch.sh("\(Self.cases[2].setup) && \(Self.later)")
        try scratch.sh("cp img.qcow2 qemu.qcow2 && qemu-img snapshot -a one qemu.qcow2 && qemu-img snapshot -d two qemu.qcow2")
        try Self.open(scratch).revertToSnapshot("one")
        Self.expectClean(scratch, "after revert")
        try Self.open(scratch).deleteSnapshot("2")  // by id
        Self.expectClean(scratch, "after delete")
        try scratch.sh("qemu-img compare img.qcow2 qemu.qcow2")
        try Self.expectMatchesQemu(scratch)
    }

    @Test("a revert to a snapshot taken before a resize gives the disk its old size back")
    func revertAcrossResize() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 -o cluster_size=4k img.qcow2 4M && \(Self.data)")
        try scratch.sh("qemu-img convert -O raw img.qcow2 before.raw")
        try Self.open(scratch).createSnapshot(name: "small")
        try scratch.sh("qemu-img resize -q img.qcow2 12M && qemu-io -c 'write -P 0x99 10M 1M' img.qcow2 >/dev/null")
        try scratch.sh("cp img.qcow2 qemu.qcow2 && qemu-img snapshot -a small qemu.qcow2")
        try Self.open(scratch).revertToSnapshot("small")
        Self.expectClean(scratch, "after revert")
        #expect(try Self.open(scratch).header.size == 4 << 20)
        try scratch.sh("qemu-img compare img.qcow2 qemu.qcow2 && qemu-img compare -f qcow2 -F raw img.qcow2 before.raw")
    }

    @Test("a name that exists is refused unless replaced; a missing one is an error")
    func names() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 -o cluster_size=4k img.qcow2 4M && \(Self.data) && qemu-img snapshot -c class img.qcow2")
        let file = try scratch.bytes("img.qcow2")
        #expect(throws: Qcow2Error.self) { try Self.open(scratch).createSnapshot(name: "class") }
        #expect(throws: Qcow2Error.self) { try Self.open(scratch).revertToSnapshot("nope") }
        #expect(throws: Qcow2Error.self) { try Self.open(scratch).deleteSnapshot("nope") }
        #expect(try scratch.bytes("img.qcow2") == file, "a refused operation changed the image")
        try scratch.sh(Self.later)
        try scratch.sh("qemu-img convert -O raw img.qcow2 now.raw")
        try Self.open(scratch).createSnapshot(name: "class", replace: true)
        Self.expectClean(scratch, "after replace")
        let names = try scratch.sh("qemu-img snapshot -l img.qcow2 | awk 'NR > 2 { print $2 }'")
        #expect(names == "class\n")
        try scratch.sh("cp img.qcow2 qemu.qcow2 && qemu-img snapshot -a class qemu.qcow2 && qemu-img compare -f qcow2 -F raw qemu.qcow2 now.raw")
    }

    @Test("refcount_bits=1 cannot count a second reference: refused, nothing changed")
    func refcountOverflow() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 -o cluster_size=4k,refcount_bits=1 img.qcow2 4M && \(Self.data)")
        let file = try scratch.bytes("img.qcow2")
        #expect(throws: Qcow2Error.self) { try Self.open(scratch).createSnapshot(name: "class") }
        #expect(try scratch.bytes("img.qcow2") == file)
    }

    /// What the live L2 table's first allocated entry is made to say, from the header's fields
    /// and the entry as qemu-io wrote it.
    enum BadEntry: String, CaseIterable, CustomTestStringConvertible {
        case refcountTable = "points at the refcount table", unaligned = "is not cluster-aligned", pastEnd = "points past the end of the file"
        var testDescription: String { rawValue }
        func entry(_ entry: UInt64, refcountTable: UInt64, fileSize: UInt64) -> UInt64 {
            switch self {
            case .refcountTable: refcountTable | 1 << 63
            case .unaligned: entry + 512
            case .pastEnd: (fileSize + 1 << 20) & ~0xffff | 1 << 63
            }
        }
    }

    @Test("a revert through a live L2 entry that is corrupt is refused, nothing changed", arguments: BadEntry.allCases)
    func corruptEntry(_ bad: BadEntry) throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 img.qcow2 4M && \(Self.data) && qemu-img snapshot -c class img.qcow2 && \(Self.later)")
        var file = try scratch.bytes("img.qcow2")
        func u64(_ at: Int) -> UInt64 { file[at..<at + 8].reduce(0) { $0 << 8 | UInt64($1) } }
        let l2 = Int(u64(Int(u64(40))) & 0x00ff_ffff_ffff_fe00)
        let at = try #require(stride(from: l2, to: l2 + 65536, by: 8).first { u64($0) & 0x00ff_ffff_ffff_fe00 != 0 })
        let patched = bad.entry(u64(at), refcountTable: u64(48), fileSize: UInt64(file.count))
        for i in 0..<8 { file[at + i] = UInt8(truncatingIfNeeded: patched >> (56 - 8 * UInt64(i))) }
        try scratch.write("img.qcow2", file)
        do {
            try Self.open(scratch).revertToSnapshot("class")
            Issue.record("the revert went through an entry that \(bad.rawValue)")
        } catch let error as Qcow2Error {
            guard case .corrupt = error else { Issue.record("\(error)"); return }
        }
        #expect(try scratch.bytes("img.qcow2") == file, "a refused revert changed the image")
    }

    @Test("an image that QEMU holds is never touched")
    func heldImage() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 img.qcow2 4M && \(Self.data) && qemu-img snapshot -c class img.qcow2")
        let file = try scratch.bytes("img.qcow2")
        let image = try Self.open(scratch)
        let qemu = try BackingLockTests.qemuHolding("img.qcow2", readOnly: false, in: scratch)
        defer { BackingLockTests.stop(qemu) }
        for op in [{ _ = try image.createSnapshot(name: "x") }, { try image.revertToSnapshot("class") }, { try image.deleteSnapshot("class") }] {
            do {
                try op()
                Issue.record("an operation on a held image succeeded")
            } catch Qcow2Error.inUse(let why) {
                #expect(!why.isEmpty)
            }
        }
        #expect(try scratch.bytes("img.qcow2") == file)
    }

    // MARK: Power loss

    enum Operation: String, CaseIterable, Sendable { case create, revert, delete, replace }

    /// Each change the operation makes is recorded; for every barrier, the file as found after a
    /// power loss there, with none and with random halves of the later writes, must pass
    /// `qemu-img check` (leaks allowed, nothing else) and read as the old or the new state.
    @Test("a power loss at any point of an operation leaves the old or the new state", arguments: Operation.allCases)
    func powerLoss(_ op: Operation) throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 img.qcow2 1M && qemu-io -c 'write -P 1 0 200k' img.qcow2 >/dev/null && qemu-img snapshot -c class img.qcow2 && qemu-io -c 'write -P 2 100k 200k' -c 'write -c -P 3 600k 4k' img.qcow2 >/dev/null")
        try scratch.sh("qemu-img convert -O raw img.qcow2 old.raw && qemu-img snapshot -l img.qcow2 | awk 'NR > 2 { print $2 }' > old.list")
        let initial = try scratch.bytes("img.qcow2")
        let image = try Self.open(scratch)
        let changes = Mutex<[HostFile.Change]>([])
        image.file.observeChanges { change in changes.withLock { $0.append(change) } }
        switch op {
        case .create: try image.createSnapshot(name: "next")
        case .revert: try image.revertToSnapshot("class")
        case .delete: try image.deleteSnapshot("class")
        case .replace: try image.createSnapshot(name: "class", replace: true)
        }
        Self.expectClean(scratch, "\(op) without a crash")
        try scratch.sh("qemu-img convert -O raw img.qcow2 new.raw && qemu-img snapshot -l img.qcow2 | awk 'NR > 2 { print $2 }' > new.list")
        let crash = PowerLoss(initial: initial, log: changes.withLock { $0 })
        let barriers = crash.barriers(end: true)
        #expect(barriers.count >= 3)
        var rng = SplitMix(seed: 7)
        try crash.replay(at: barriers, trials: 4, rng: &rng) { k, trial, state in
            try scratch.write("crash.qcow2", state)
            let check = scratch.attempt("qemu-img check crash.qcow2 >/dev/null 2>&1 || test $? = 3")
            #expect(check.ok, "\(op): power loss after barrier \(k) of \(barriers.count - 1), trial \(trial): \(scratch.attempt("qemu-img check crash.qcow2").output.prefix(400))")
            let same = scratch.attempt("""
                qemu-img snapshot -l crash.qcow2 | awk 'NR > 2 { print $2 }' > crash.list
                (cmp -s crash.list old.list && qemu-img compare -q -f qcow2 -F raw crash.qcow2 old.raw) ||
                (cmp -s crash.list new.list && qemu-img compare -q -f qcow2 -F raw crash.qcow2 new.raw)
                """)
            #expect(same.ok, "\(op): power loss after barrier \(k), trial \(trial): neither the old nor the new state")
            return true
        }
    }
}
