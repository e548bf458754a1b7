import Foundation
import Block
import TestSupport
import Testing

/// An image cut short after it was written (a truncation while in use, a copy that stopped):
/// QEMU reads zeros for whatever lies past the end of the file, while `qemu-img check` calls a
/// cluster that starts past the end corruption. The engine keeps QEMU's zeros where the check
/// allows them (the last cluster may end past the end of the file) and refuses the rest, so lost
/// data never reads as an empty disk.
@Suite("truncated images")
struct TruncatedImageTests {
    /// 1 MiB of 0x44 in sixteen 64 KiB clusters at host offsets 327680...1310720; the file ends at
    /// 1376256 (checked below against qemu-img map).
    static let commands = "qemu-img create -q -f qcow2 a.qcow2 1M && qemu-io -c 'write -P 0x44 0 1M' a.qcow2 >/dev/null"
    static let firstData: UInt64 = 327_680
    static let fileEnd: UInt64 = 1_376_256

    @Test func theLastClusterMayEndPastTheEndOfTheFile() throws {
        let scratch = try Scratch()
        try scratch.sh(Self.commands)
        #expect(try scratch.sh("stat -c %s a.qcow2") == "\(Self.fileEnd)\n")
        try scratch.sh("truncate -s \(Self.fileEnd - 40_000) a.qcow2 && qemu-img check a.qcow2 && qemu-img convert -O raw a.qcow2 a.raw")
        let image = try Image.open(path: scratch.path("a.qcow2"), cache: BlockCache(capacityBytes: 1 << 20))
        try Oracle.expectSame(image.live, as: scratch.path("a.raw"), "the image cut inside its last cluster")
    }

    @Test func clustersPastTheEndOfTheFileAreAnErrorNotZeros() throws {
        let scratch = try Scratch()
        try scratch.sh(Self.commands)
        // Two whole clusters cut off: guest offsets 896 KiB and 960 KiB lose their data.
        try scratch.sh("truncate -s \(Self.fileEnd - 2 * 65_536) a.qcow2")
        #expect(throws: ShellError.self, "qemu-img check calls the cut image corrupt") { try scratch.sh("qemu-img check a.qcow2") }
        let image = try Image.open(path: scratch.path("a.qcow2"), cache: BlockCache(capacityBytes: 1 << 20))
        #expect(try image.live.read(at: 0, count: 917_504) == [UInt8](repeating: 0x44, count: 917_504))
        let lost: UInt64 = 917_504
        #expect(throws: Qcow2Error.corrupt("the data of guest offset \(lost) is at \(Self.fileEnd - 2 * 65_536), past the end of \(scratch.path("a.qcow2")) (\(Self.fileEnd - 2 * 65_536) bytes)",
                                           offset: Self.l2EntryOffset(guest: lost))) {
            try image.live.read(at: lost - 4096, count: 8192)
        }
        // The allocation map still says where the data was.
        #expect(try image.live.status().allSatisfy { $0.data })
    }

    /// The L2 entry of the cluster at `guest`: the first L2 table sits at 262144 (qemu-img's
    /// layout: header, refcount table, refcount block, L1 table, L2 table).
    static func l2EntryOffset(guest: UInt64) -> UInt64 { 262_144 + guest / 65_536 * 8 }

    /// A file that shrinks between planning a read and carrying it out: the short read is an
    /// error, not zeros.
    @Test func aFileThatShrinksUnderAPlannedReadFails() throws {
        let scratch = try Scratch()
        try scratch.sh(Self.commands)
        let image = try Image.open(path: scratch.path("a.qcow2"), cache: BlockCache(capacityBytes: 1 << 20))
        let plan = try image.live.plan(at: 0, length: 1 << 20)
        try scratch.sh("truncate -s \(Self.fileEnd - 65_536) a.qcow2")
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        #expect(throws: Qcow2Error.self) { try buffer.withUnsafeMutableBytes { try plan.execute(into: $0) } }
    }
}
