import TestSupport
import Block
import Testing

/// One malformed image and the error it must produce, at open or at the first read.
struct Malformed: CustomTestStringConvertible, Sendable {
    var name: String
    var image: @Sendable () -> TinyImage
    var expected: Qcow2Error
    /// Whether the image opens and the error comes with the first read.
    var failsOnRead = false
    var rawEdit: (@Sendable (inout [UInt8]) -> Void)?
    var testDescription: String { name }

    static func header(_ name: String, _ expected: Qcow2Error, _ edit: @escaping @Sendable (inout TinyImage) -> Void) -> Malformed {
        Malformed(name: name, image: { var t = TinyImage(); edit(&t); return t }, expected: expected)
    }

    static func read(_ name: String, _ expected: Qcow2Error, _ edit: @escaping @Sendable (inout TinyImage) -> Void) -> Malformed {
        Malformed(name: name, image: { var t = TinyImage(); edit(&t); return t }, expected: expected, failsOnRead: true)
    }
}

extension Malformed {
    static let all: [Malformed] = [
        header("version 4", .unsupportedVersion(4)) { $0.version = 4 },
        header("cluster_bits 8", .corrupt("cluster_bits 8 is outside 9...21", offset: 20)) { $0.clusterBits = 8 },
        header("cluster_bits 22", .corrupt("cluster_bits 22 is outside 9...21", offset: 20)) { $0.clusterBits = 22 },
        header("crypt_method aes", .encrypted(method: 1)) { $0.cryptMethod = 1 },
        header("LUKS header extension", .encrypted(method: 2)) {
            $0.extensions = TinyImage.extensionBytes(type: 0x0537_be77, data: [UInt8](repeating: 0, count: 16))
        },
        header("unknown incompatible bit, named", .unsupportedFeature(bit: 7, name: "future feature")) {
            $0.incompatible = 1 << 7
            $0.extensions = TinyImage.extensionBytes(type: 0x6803_f857, data: TinyImage.featureName(type: 0, bit: 7, "future feature"))
        },
        header("unknown incompatible bit, unnamed", .unsupportedFeature(bit: 40, name: nil)) { $0.incompatible = 1 << 40 },
        header("header_length below 104", .corrupt("header_length 96 is smaller than 104", offset: 100)) { $0.headerLength = 96 },
        header("absurd virtual size", .corrupt("virtual size \(UInt64(1) << 62) is too large", offset: 24)) { $0.size = 1 << 62 },
        header("absurd l1_size", .corrupt("l1_size 268435456 is too large", offset: 36)) { $0.l1Size = 1 << 28 },
        header("l1_size too small for the disk", .corrupt("l1_size 0 cannot map the virtual size 4096", offset: 36)) { $0.l1Size = 0 },
        header("unaligned L1 table", .corrupt("L1 table offset 1544 is not cluster-aligned", offset: 40)) { $0.l1Offset = 3 * 512 + 8 },
        header("L1 table past the end of the file",
               .corrupt("L1 table (8 bytes at 1099511627776) lies past the end of the file (3072 bytes)", offset: 40)) { $0.l1Offset = 1 << 40 },
        header("L1 table overrunning the end of the file",
               .corrupt("L1 table (2048 bytes at 1536) lies past the end of the file (3072 bytes)", offset: 40)) {
            $0.l1Size = 256; $0.size = 256 * 32 * 1024
        },
        header("refcount table past the end of the file",
               .corrupt("refcount table (512 bytes at 5120) lies past the end of the file (3072 bytes)", offset: 48)) { $0.refcountTableOffset = 10 * 512 },
        header("absurd refcount table", .corrupt("refcount_table_clusters 1000000 is too large", offset: 56)) { $0.refcountTableClusters = 1_000_000 },
        header("absurd nb_snapshots", .corrupt("nb_snapshots 100000 is too large", offset: 60)) { $0.nbSnapshots = 100_000 },
        header("snapshot with absurd extra data", .corrupt("too much extra metadata in snapshot table entry 0 (65536 bytes)", offset: 3108)) {
            $0.nbSnapshots = 1; $0.snapshotsOffset = 6 * 512
            var entry = [UInt8](repeating: 0, count: 512)
            put64(&entry, 0, 3 * 512); put32(&entry, 8, 1); put32(&entry, 36, 65536)
            $0.tail = entry
        },
        // A snapshot table past the end of the file, or one bad entry, no longer fails the
        // image (QEMU opens it): IotestDifferencesTests covers those.
        header("header extension overrunning the cluster", .corrupt("header extension too large: 0x1234 of 4096 bytes runs past byte 512 (the end of the first cluster)", offset: 112)) {
            var e = [UInt8](repeating: 0, count: 8)
            put32(&e, 0, 0x1234); put32(&e, 4, 4096)
            $0.extensions = e
        },
        header("feature table of odd length", .corrupt("feature name table length 40 is not a multiple of 48", offset: 112)) {
            $0.extensions = TinyImage.extensionBytes(type: 0x6803_f857, data: [UInt8](repeating: 0, count: 40))
        },
        header("backing name outside the first cluster",
               .corrupt("backing file name (4 bytes at 510) lies outside the first cluster", offset: 8)) {
            $0.backingName = "base"; $0.backingOffset = 510
        },
        header("external data file without a name",
               .corrupt("external data file bit set but no data file name extension", offset: 72)) { $0.incompatible = 1 << 2 },
        header("extended L2 with 512-byte clusters", .corrupt("extended L2 entries need clusters of at least 16 KiB", offset: 72)) {
            $0.incompatible = 1 << 4
        },
        read("L2 table unaligned", .corrupt("L1 entry points to unaligned L2 table offset 16896", offset: 12288)) {
            $0.clusterBits = 12
        }.editing { bytes in put64(&bytes, 3 * 4096, 4 * 4096 + 512) },
        read("L2 table past the end of the file", .corrupt("L2 table at 1048576 lies past the end of the file", offset: 1536)) { _ in }
            .editing { bytes in put64(&bytes, 3 * 512, 1 << 20) },
        read("data cluster unaligned", .corrupt("L2 entry points to unaligned cluster offset 20992", offset: 16384)) {
            $0.clusterBits = 12; $0.l2Entry0 = 5 * 4096 + 512 | 1 << 63
        },
        read("compressed cluster past the end of the file",
             .corrupt("compressed cluster at 1048576 lies past the end of the file", offset: 2048)) {
            $0.l2Entry0 = 1 << 62 | 1 << 20
        },
        read("compressed cluster that does not inflate",
             .corrupt("zlib compressed cluster does not decompress to 512 bytes", offset: 2560)) {
            $0.l2Entry0 = 1 << 62 | 5 * 512
        },
        Malformed(name: "subcluster both allocated and zero", image: {
            var t = TinyImage(); t.clusterBits = 14; t.incompatible = 1 << 4; t.headerLength = 112
            t.l2Bitmap0 = 1 | 1 << 32
            return t
        }, expected: .corrupt("subcluster 0 is marked both allocated and zero", offset: 4 * 16384 + 8), failsOnRead: true),
        Malformed(name: "subcluster allocated in an unallocated cluster", image: {
            var t = TinyImage(); t.clusterBits = 14; t.incompatible = 1 << 4
            t.l2Entry0 = 0; t.l2Bitmap0 = 1 << 3
            return t
        }, expected: .corrupt("subcluster 3 is allocated in an unallocated cluster", offset: 4 * 16384 + 8), failsOnRead: true),
    ]

    /// Applies a raw byte edit after building, for fields the builder does not name.
    func editing(_ edit: @escaping @Sendable (inout [UInt8]) -> Void) -> Malformed {
        var copy = self
        let build = image
        copy.image = { build() }
        copy.rawEdit = edit
        return copy
    }
}

@Suite("malformed and hostile images")
struct MalformedImageTests {
    /// The builder's image is valid: qemu-img checks it clean and reads what we read.
    @Test func tinyImageIsValid() throws {
        let scratch = try Scratch()
        try scratch.write("tiny.qcow2", TinyImage().bytes())
        try scratch.sh("qemu-img check -q tiny.qcow2")
        try Oracle.expectMatchesQemu("tiny.qcow2", in: scratch)
        var extended = TinyImage(); extended.clusterBits = 14; extended.incompatible = 1 << 4; extended.l2Bitmap0 = 0b110 | 1 << 35
        try scratch.write("ext.qcow2", extended.bytes())
        try scratch.sh("qemu-img check -q ext.qcow2")
        try Oracle.expectMatchesQemu("ext.qcow2", in: scratch)
    }

    @Test(arguments: Malformed.all)
    func refusedWithAClearError(_ c: Malformed) throws {
        let scratch = try Scratch()
        var bytes = c.image().bytes()
        c.rawEdit?(&bytes)
        try scratch.write("bad.qcow2", bytes)
        let cache = BlockCache(capacityBytes: 1 << 20)
        do {
            let image = try Image.open(path: scratch.path("bad.qcow2"), cache: cache)
            #expect(c.failsOnRead, "\(c.name): opened, but should have failed with \(c.expected)")
            _ = try image.live.read(at: 0, count: Int(image.virtualSize))
            Issue.record("\(c.name): read succeeded, expected \(c.expected)")
        } catch let error as Qcow2Error {
            #expect(error == c.expected)
        }
    }

    @Test func notQcow2WhenForced() throws {
        let scratch = try Scratch()
        try scratch.write("short.img", [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3])
        let cache = BlockCache(capacityBytes: 1 << 20)
        #expect(throws: Qcow2Error.notQcow2(path: scratch.path("short.img"))) {
            try Image.open(path: scratch.path("short.img"), format: .qcow2, cache: cache)
        }
        // Probing calls a file without the full magic raw, as QEMU does.
        try scratch.write("plain.img", [1, 2, 3])
        #expect(try Image.open(path: scratch.path("plain.img"), cache: cache).format == .raw)
    }

    @Test func realLuksImageIsRefused() throws {
        let scratch = try Scratch()
        try scratch.sh(LuksImages.qcow2("luks.qcow2", bytes: 1 << 20))
        #expect(throws: Qcow2Error.encrypted(method: 2)) {
            try Image.open(path: scratch.path("luks.qcow2"), cache: BlockCache(capacityBytes: 1 << 20))
        }
    }

    @Test func backingLoopsAndDepth() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 a.qcow2 1M && qemu-img create -q -f qcow2 -b a.qcow2 -F qcow2 b.qcow2 && qemu-img rebase -u -b b.qcow2 -F qcow2 a.qcow2")
        let cache = BlockCache(capacityBytes: 1 << 20)
        #expect(throws: Qcow2Error.backing("\(scratch.path("b.qcow2")) appears twice in its own backing chain (a loop)")) {
            try Image.open(path: scratch.path("b.qcow2"), cache: cache)
        }
        try scratch.sh("qemu-img create -q -f qcow2 l0.qcow2 1M && for i in 1 2 3 4; do qemu-img create -q -f qcow2 -b l$((i-1)).qcow2 -F qcow2 l$i.qcow2; done")
        var options = Image.Options()
        options.maxChainDepth = 3
        #expect(throws: Qcow2Error.backing("chain deeper than 3 images at \(scratch.dir)/l1.qcow2")) {
            try Image.open(path: scratch.path("l4.qcow2"), cache: cache, options: options)
        }
        #expect(try Image.open(path: scratch.path("l4.qcow2"), cache: cache).chain.count == 5)
        try scratch.sh("rm l0.qcow2")
        #expect(throws: Qcow2Error.io(errno: 2, operation: "open", path: scratch.dir + "/l0.qcow2")) {
            try Image.open(path: scratch.path("l4.qcow2"), cache: cache)
        }
    }

    /// Fields QEMU sets on images that crashed or were found corrupt: still readable.
    @Test func dirtyAndCorruptBitsStillRead() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 -o lazy_refcounts=on img.qcow2 1M")
        try scratch.sh("qemu-io -c 'write -P 0x5a 0 100k' -c 'sigraise 9' img.qcow2 >/dev/null 2>&1 || true")
        let dirty = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 1 << 20))
        #expect(dirty.qcow2?.header.isDirty == true)
        try Oracle.expectMatchesQemu("img.qcow2", in: scratch)
        var tiny = TinyImage()
        tiny.incompatible = 1 << 1
        try scratch.write("corrupt.qcow2", tiny.bytes())
        let corrupt = try Image.open(path: scratch.path("corrupt.qcow2"), cache: BlockCache(capacityBytes: 1 << 20))
        #expect(corrupt.qcow2?.header.isMarkedCorrupt == true)
        #expect(try corrupt.live.read(at: 0, count: 512) == [UInt8](repeating: 0xab, count: 512))
    }

    /// Without a backing format extension the backing file's format is probed.
    @Test func backingFormatIsProbed() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 base.qcow2 1M && qemu-io -c 'write -P 0x3c 0 1M' base.qcow2 >/dev/null")
        try scratch.sh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2 && qemu-io -c 'write -P 0x3d 4k 4k' img.qcow2 >/dev/null")
        var bytes = try scratch.bytes("img.qcow2")
        let marker: [UInt8] = [0xe2, 0x79, 0x2a, 0xca]
        let at = try #require((0..<4096).first { Array(bytes[$0..<$0 + 4]) == marker })
        put32(&bytes, at, 0x7fff_0000)  // an unknown extension type, which readers skip
        try scratch.write("img.qcow2", bytes)
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 1 << 20))
        #expect(image.qcow2?.backingFormat == nil)
        #expect(image.chain.map(\.format) == [.qcow2, .qcow2])
        try Oracle.expectMatchesQemu("img.qcow2", in: scratch)
    }
}

/// Issue 22, attack 7: st_blocks of an image that claims far more than its file holds.
@Suite("bounded allocation counts")
struct BoundedAllocationTests {
    @Test func oneL2TableBehindEveryL1EntryIsWalkedOnce() throws {
        let scratch = try Scratch()
        try HostileImages.oneTableEverywhere("hostile.qcow2", in: scratch)
        let image = try Image.open(path: scratch.path("hostile.qcow2"), cache: BlockCache(capacityBytes: 1 << 20))
        let view = try #require(image.live as? Qcow2View)
        let count = try #require(try view.allocationCount())
        #expect(count.tablesWalked == 1, "one distinct table, walked once")
        #expect(count.bytes == 32 << 40, "every byte reads as data")
        #expect(try image.live.allocatedBytes() == 32 << 40)
        // A budget ends a count early rather than letting it run its course.
        var asked = 0
        #expect(try view.allocatedBytes(shouldStop: { asked += 1; return asked > 10 }) == nil)
    }
}
