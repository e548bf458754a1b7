import Glibc
@testable import Block
import TestSupport
import Testing

/// Inputs the libFuzzer targets (Fuzz/, `make fuzz`) found a bug with, reduced to the fields that
/// matter and built here; each stays as a named test.
@Suite("Fuzz regressions: qcow2")
struct Qcow2FuzzRegressionTests {
    /// FuzzQcow2Write: an L2 entry (COPIED, refcount 0) pointing at the first cluster past the end
    /// of the file. Writing another cluster allocated that very cluster (allocation starts at the
    /// end of the file); the in-place write through the stale entry then passed the refcount
    /// check and overwrote the other cluster's data, and its later free punched it out.
    @Test func writerRefusesL2EntryPastTheEndOfTheFile() throws {
        let scratch = try Scratch()
        var tiny = TinyImage()  // 512-byte clusters 0...5; L2 table in cluster 4
        tiny.l2Entry0 = tiny.cluster(6) | 1 << 63  // guest cluster 0 → host cluster 6, COPIED: past the end
        try scratch.write("img.qcow2", tiny.bytes())
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 64 << 10), writable: true)
        let writer = try image.makeWriter()
        let guestOne = [UInt8](repeating: 0x11, count: 512)
        #expect(throws: Qcow2Error.corrupt("L2 entry refers to host cluster 6, past the end of the file (6 clusters)",
                                           offset: tiny.cluster(4))) {
            try guestOne.withUnsafeBytes { try writer.write($0, at: 512) }
        }
        #expect(throws: Qcow2Error.self) { try guestOne.withUnsafeBytes { try writer.write($0, at: 0) } }
        try? writer.close()
        #expect(try scratch.bytes("img.qcow2")[79] & 2 == 2, "not marked corrupt")
        #expect(try scratch.bytes("img.qcow2").count == 6 * 512, "something was written past the end")
    }

    /// FuzzQcow2Write: an L2 entry (COPIED) naming its own L2 table as a data cluster. Zeroing
    /// that guest cluster freed the "data" cluster: after the flush its refcount dropped to 0 and
    /// the hole punched into it erased the L2 table with every other mapping in it.
    @Test func writerRefusesToFreeMetadataThroughAnL2Entry() throws {
        let scratch = try Scratch()
        var tiny = TinyImage()
        tiny.l2Entry0 = tiny.cluster(4) | 1 << 63  // guest cluster 0 → host cluster 4: the L2 table itself
        try scratch.write("img.qcow2", tiny.bytes())
        let l2Table = Array(tiny.bytes()[2048..<2560])
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 64 << 10), writable: true)
        let writer = try image.makeWriter()
        #expect(throws: Qcow2Error.corrupt("data cluster at 2048 overlaps the image's metadata", offset: tiny.cluster(4))) {
            try writer.zero(at: 0, length: 512)
        }
        try? writer.close()
        let after = try scratch.bytes("img.qcow2")
        #expect(Array(after[2048..<2560]) == l2Table, "the L2 table changed")
        #expect(after[79] & 2 == 2, "not marked corrupt")
    }

    /// FuzzQcow2Read (a timeout): a snapshot whose disk size (extra data, byte 8) is 2^61 while
    /// its L1 table maps nothing. Its status walked the range past the table one L2 span (32 KiB
    /// here) at a time, 2^46 steps, and st_blocks took it in 4 GiB windows, 2^29 calls.
    @Test func snapshotLargerThanItsL1TableIsMappedAtOnce() throws {
        let scratch = try Scratch()
        var tiny = TinyImage()
        tiny.nbSnapshots = 1
        tiny.snapshotsOffset = tiny.cluster(6)
        var entry = [UInt8](repeating: 0, count: 512)  // the snapshot table, in cluster 6
        put64(&entry, 0, 0)        // l1_table_offset
        put32(&entry, 8, 0)        // l1_size: the table maps nothing
        put16(&entry, 12, 1)       // id_str_size
        put16(&entry, 14, 3)       // name_size
        put32(&entry, 36, 16)      // extra_data_size
        put64(&entry, 48, 1 << 61) // extra data byte 8: disk_size
        entry.replaceSubrange(56..<60, with: Array("1big".utf8))  // id, name
        tiny.tail = entry
        try scratch.write("img.qcow2", tiny.bytes())
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 64 << 10))
        let snapshot = try #require(image.snapshots.first)
        let view = try #require(image.device(of: snapshot))
        #expect(view.size == 1 << 61)
        let start = ContinuousClock.now
        #expect(try view.status() == [MapExtent(start: 0, length: 1 << 61, depth: 0, present: false, zero: true, data: false)])
        #expect(try view.allocatedBytes() == 0)
        #expect(try view.read(at: (1 << 61) - 512, count: 512) == [UInt8](repeating: 0, count: 512))
        #expect(ContinuousClock.now - start < .seconds(5))
    }

    /// FuzzQcow2Write: a preallocated zero cluster entry (not COPIED) naming the data cluster of
    /// another guest cluster, refcount 1. Writing it copied it elsewhere and freed the old
    /// cluster: its refcount fell to 0 and the hole punched into it erased the other guest
    /// cluster's data. A cluster that is not COPIED must be counted at least twice.
    @Test func writerRefusesToFreeAnUnsharedClusterThroughAnEntryMarkedShared() throws {
        let scratch = try Scratch()
        let tiny = TinyImage()  // L2 entry 0: guest cluster 0 → data cluster 5 (0xab), COPIED, refcount 1
        var bytes = tiny.bytes()
        put64(&bytes, Int(tiny.cluster(4)) + 8, tiny.cluster(5) | 1)  // entry 1: zero, allocated at cluster 5, not COPIED
        try scratch.write("img.qcow2", bytes)
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 64 << 10), writable: true)
        let writer = try image.makeWriter()
        let data = [UInt8](repeating: 0x11, count: 512)
        #expect(throws: Qcow2Error.corrupt("data cluster at 2560 is shared (not COPIED) but its refcount is 1",
                                           offset: tiny.cluster(4) + 8)) {
            try data.withUnsafeBytes { try writer.write($0, at: 512) }
        }
        try? writer.close()
        let reopened = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 64 << 10))
        #expect(try reopened.live.read(at: 0, count: 512) == [UInt8](repeating: 0xab, count: 512))
    }

    /// FuzzQcow2Write: an image with an external data file (data_file_raw) whose L2 entries map
    /// guest clusters to other guest clusters' offsets in the data file. Nothing counts data
    /// file clusters; the writer allocates a cluster at its guest offset, as QEMU does, so a
    /// write there landed on data another entry maps, and reads of it changed.
    @Test func writerRefusesExternalDataNotMappedOneToOne() throws {
        let scratch = try Scratch()
        var tiny = TinyImage()
        tiny.incompatible = 1 << 2  // external data file
        tiny.extensions = TinyImage.extensionBytes(type: 0x4441_5441, data: Array("data.raw".utf8))
        tiny.l2Entry0 = tiny.cluster(6) | 1 << 63  // guest cluster 0 → data file offset 3072 (guest cluster 6's)
        try scratch.write("img.qcow2", tiny.bytes())
        try scratch.write("data.raw", [UInt8](repeating: 0x5a, count: 4096))
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 64 << 10), writable: true)
        let writer = try image.makeWriter()
        let data = [UInt8](repeating: 0x11, count: 512)
        #expect(throws: Qcow2Error.corrupt("L2 entry maps guest offset 0 to 3072 in the external data file, not one to one",
                                           offset: tiny.cluster(4))) {
            try data.withUnsafeBytes { try writer.write($0, at: 3072) }
        }
        try? writer.close()
        #expect(try scratch.bytes("data.raw") == [UInt8](repeating: 0x5a, count: 4096))
    }

    /// Found while fixing the one above, by reading: two L1 entries naming one L2 table (COPIED,
    /// refcount 1). Each guest range wrote through the other's table, so a write at 32 KiB
    /// overwrote guest cluster 0 in place.
    @Test func writerRefusesAnL2TableSharedByTwoL1Entries() throws {
        let scratch = try Scratch()
        var tiny = TinyImage()
        tiny.size = 64 << 10  // two L1 entries of 32 KiB each
        var bytes = tiny.bytes()
        put64(&bytes, Int(tiny.cluster(3)) + 8, tiny.cluster(4) | 1 << 63)  // L1[1] → the L2 table of L1[0]
        try scratch.write("img.qcow2", bytes)
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 64 << 10), writable: true)
        let writer = try image.makeWriter()
        let data = [UInt8](repeating: 0x11, count: 512)
        try data.withUnsafeBytes { try writer.write($0, at: 512) }
        #expect(throws: Qcow2Error.corrupt("L2 table at 2048 is also the table of L1 entry 0", offset: tiny.cluster(3) + 8)) {
            try data.withUnsafeBytes { try writer.write($0, at: 32 << 10) }
        }
        try? writer.close()
        let reopened = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 64 << 10))
        #expect(try reopened.live.read(at: 0, count: 512) == [UInt8](repeating: 0xab, count: 512))
    }

    /// FuzzQcow2Write: two L2 entries of one table both naming cluster 5 as their own (COPIED,
    /// refcount 1). Writes to either guest cluster went in place into the same cluster, so each
    /// overwrote the other.
    @Test func writerRefusesOneClusterCopiedTwice() throws {
        let scratch = try Scratch()
        let tiny = TinyImage()  // L2 entry 0: guest cluster 0 → data cluster 5 (0xab), COPIED
        var bytes = tiny.bytes()
        put64(&bytes, Int(tiny.cluster(4)) + 8, tiny.cluster(5) | 1 << 63)  // entry 1: the same cluster, COPIED
        try scratch.write("img.qcow2", bytes)
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 64 << 10), writable: true)
        let writer = try image.makeWriter()
        let data = [UInt8](repeating: 0x11, count: 512)
        #expect(throws: Qcow2Error.corrupt("data cluster at 2560 is marked COPIED in two L2 entries", offset: tiny.cluster(4) + 8)) {
            try data.withUnsafeBytes { try writer.write($0, at: 512) }
        }
        try? writer.close()
        let reopened = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 64 << 10))
        #expect(try reopened.live.read(at: 0, count: 512) == [UInt8](repeating: 0xab, count: 512))
    }

    /// FuzzQcow2Write, the same across two tables: L1 entries 0 and 1 have tables of their own,
    /// and the second names guest cluster 0's data cluster (COPIED) for its first entry.
    @Test func writerRefusesOneClusterCopiedInTwoTables() throws {
        let scratch = try Scratch()
        var tiny = TinyImage()
        tiny.size = 64 << 10  // two L1 entries of 32 KiB each
        var second = [UInt8](repeating: 0, count: 512)  // a second L2 table, in cluster 6
        put64(&second, 0, tiny.cluster(5) | 1 << 63)    // its entry 0: guest cluster 0's data cluster, COPIED
        tiny.tail = second
        var bytes = tiny.bytes()
        put64(&bytes, Int(tiny.cluster(3)) + 8, tiny.cluster(6) | 1 << 63)  // L1[1] → the second table
        put16(&bytes, Int(tiny.cluster(2)) + 12, 1)                         // cluster 6 counted once
        try scratch.write("img.qcow2", bytes)
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 64 << 10), writable: true)
        let writer = try image.makeWriter()
        let data = [UInt8](repeating: 0x11, count: 512)
        try data.withUnsafeBytes { try writer.write($0, at: 512) }
        #expect(throws: Qcow2Error.corrupt("data cluster at 2560 is marked COPIED in two L2 entries", offset: tiny.cluster(6))) {
            try data.withUnsafeBytes { try writer.write($0, at: 32 << 10) }
        }
        try? writer.close()
        let reopened = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 64 << 10))
        #expect(try reopened.live.read(at: 0, count: 512) == [UInt8](repeating: 0xab, count: 512))
    }

    /// FuzzQcow2Write (LeakSanitizer, at the end of a run): each thread's decoders (libdeflate,
    /// zstd) sat in a __thread pointer and were never freed, so every Dispatch worker that decoded
    /// a compressed cluster and then exited leaked them: a long mount grew without bound. Other
    /// tests decode on their own threads meanwhile, so the bound is loose: with the leak, each of
    /// the 64 threads here left one set behind.
    @Test func decodersOfExitedThreadsAreFreed() {
        let before = Decompressor.liveDecoderSets
        var threads: [pthread_t] = []
        for _ in 0..<64 {
            var thread = pthread_t()
            #expect(pthread_create(&thread, nil, { _ in decodeOneStoredBlock(); return nil }, nil) == 0)
            threads.append(thread)
        }
        for thread in threads { pthread_join(thread, nil) }
        #expect(Decompressor.liveDecoderSets - before < 32)
    }
}

/// Decodes a raw deflate stream of one final stored block (header 0x01, LEN 512, NLEN) of 512
/// zero bytes, as a compressed cluster of a 512-byte-cluster image.
private func decodeOneStoredBlock() {
    let stream: [UInt8] = [0x01, 0x00, 0x02, 0xff, 0xfd] + [UInt8](repeating: 0, count: 512)
    var output = [UInt8](repeating: 0xee, count: 512)
    let ok = (try? stream.withUnsafeBytes { input in
        try output.withUnsafeMutableBytes { try Decompressor.decompress(input, into: $0, kind: .zlib, offset: 0) }
    }) != nil
    precondition(ok && output.allSatisfy { $0 == 0 }, "the stored block did not decode")
}
