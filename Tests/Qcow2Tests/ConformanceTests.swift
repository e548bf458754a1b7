import TestSupport
import Block
import Testing

/// One fixture: shell commands run in a scratch directory that leave `img.qcow2` (or the named
/// image) behind, for comparison with qemu-img.
struct Scenario: CustomTestStringConvertible, Sendable {
    var name: String
    var image = "img.qcow2"
    var commands: [String]
    var testDescription: String { name }
}

/// qemu-io write commands shared by many scenarios: patterns at odd places, zero writes, discards.
private func io(_ image: String, _ ops: String...) -> String { io(image, ops) }

private func io(_ image: String, _ ops: [String]) -> String {
    "qemu-io -f qcow2 " + ops.map { "-c '\($0)'" }.joined(separator: " ") + " \(image) >/dev/null"
}

private let mixedWrites = [
    "write -P 0x11 0 96k", "write -P 0x22 200k 4k", "write -P 0x33 1000k 300k",
    "write -z 50k 30k", "discard 1100k 64k", "write -P 0x44 2047k 1k",
]

extension Scenario {
    static let all: [Scenario] = clusterSizes + features + snapshots + chains

    static let clusterSizes: [Scenario] = [512, 4096, 65536, 2 << 20].map { size in
        Scenario(name: "cluster size \(size)", commands: [
            "qemu-img create -q -f qcow2 -o cluster_size=\(size) img.qcow2 3M",
            io("img.qcow2", "write -P 0x11 0 96k", "write -P 0x22 200k 4k", "write -P 0x33 1000k 300k",
               "write -z 50k 30k", "discard 1100k 64k", "write -P 0x44 3071k 1k"),
        ])
    }

    static let features: [Scenario] = [
        Scenario(name: "version 2 (compat 0.10)", commands: [
            "qemu-img create -q -f qcow2 -o compat=0.10 img.qcow2 2M",
            io("img.qcow2", "write -P 0x11 0 96k", "write -P 0x55 1500k 100k", "write -z 0 4k"),
        ]),
        Scenario(name: "zero clusters, plain and preallocated", commands: [
            "qemu-img create -q -f qcow2 -o preallocation=metadata img.qcow2 2M",
            io("img.qcow2", "write -P 0x66 0 512k", "write -z 64k 128k", "write -z 1M 64k", "discard 300k 64k"),
        ]),
        Scenario(name: "falloc preallocation", commands: [
            "qemu-img create -q -f qcow2 -o preallocation=falloc img.qcow2 1M",
            io("img.qcow2", "write -P 0x12 100k 10k"),
        ]),
        Scenario(name: "zlib compressed (convert -c)", commands: [
            "qemu-img create -q -f qcow2 src.qcow2 2M",
            io("src.qcow2", mixedWrites),
            "qemu-img convert -c -O qcow2 src.qcow2 img.qcow2",
            io("img.qcow2", "write -P 0x77 64k 4k"),
        ]),
        Scenario(name: "zstd compressed", commands: [
            "qemu-img create -q -f qcow2 src.qcow2 2M",
            io("src.qcow2", mixedWrites),
            "qemu-img convert -c -O qcow2 -o compression_type=zstd src.qcow2 img.qcow2",
            io("img.qcow2", "write -c -P 0x78 1536k 64k"),
        ]),
        Scenario(name: "compressed with 2 MiB and 512 B clusters", commands: [
            "qemu-img create -q -f qcow2 src.qcow2 4M",
            io("src.qcow2", "write -P 0x11 0 3M", "write -P 0x12 3001k 7k"),
            "qemu-img convert -c -O qcow2 -o cluster_size=2M src.qcow2 img.qcow2",
            "qemu-img convert -c -O qcow2 -o cluster_size=512 src.qcow2 small.qcow2",
        ]),
        Scenario(name: "extended L2 entries", commands: [
            "qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k img.qcow2 2M",
            io("img.qcow2", "write -P 0x21 4k 4k", "write -P 0x22 10k 3k", "write -z 20k 2k",
               "write -P 0x23 128k 64k", "write -z 300k 64k", "discard 128k 2k", "write -P 0x24 1M 100k"),
        ]),
        Scenario(name: "extended L2 over a backing file", commands: [
            "qemu-img create -q -f qcow2 base.qcow2 2M",
            io("base.qcow2", "write -P 0xaa 0 2M"),
            "qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k -b base.qcow2 -F qcow2 img.qcow2",
            io("img.qcow2", "write -P 0x31 8k 4k", "write -z 64k 8k", "write -P 0x32 1M 5k"),
        ]),
        Scenario(name: "external data file", commands: [
            "qemu-img create -q -f qcow2 -o data_file=data.bin img.qcow2 2M",
            io("img.qcow2", "write -P 0x41 0 64k", "write -P 0x42 1M 10k", "write -z 64k 64k"),
        ]),
        Scenario(name: "external data file, data_file_raw", commands: [
            "qemu-img create -q -f qcow2 -o data_file=data.bin,data_file_raw=on img.qcow2 2M",
            io("img.qcow2", "write -P 0x43 0 64k", "write -P 0x44 1M 10k"),
        ]),
        Scenario(name: "refcount widths 1 and 64 bits", commands: [
            "qemu-img create -q -f qcow2 -o refcount_bits=1 img.qcow2 1M",
            io("img.qcow2", "write -P 0x51 0 100k"),
            "qemu-img create -q -f qcow2 -o refcount_bits=64 wide.qcow2 1M",
            io("wide.qcow2", "write -P 0x52 0 100k"),
        ]),
    ]

    static let snapshots: [Scenario] = [
        Scenario(name: "snapshots between writes", commands: [
            "qemu-img create -q -f qcow2 img.qcow2 2M",
            io("img.qcow2", "write -P 0x01 0 1M"),
            "qemu-img snapshot -c first img.qcow2",
            io("img.qcow2", "write -P 0x02 512k 100k", "write -z 0 64k", "discard 900k 64k"),
            "qemu-img snapshot -c second img.qcow2",
            io("img.qcow2", "write -P 0x03 0 2M"),
        ]),
        Scenario(name: "snapshot taken before a resize, duplicate names", commands: [
            "qemu-img create -q -f qcow2 img.qcow2 1M",
            io("img.qcow2", "write -P 0x04 0 1M"),
            "qemu-img snapshot -c same img.qcow2",
            "qemu-img resize -q img.qcow2 3M",
            io("img.qcow2", "write -P 0x05 2M 1M"),
            "qemu-img snapshot -c same img.qcow2",
            "qemu-img resize -q img.qcow2 4M",
        ]),
        Scenario(name: "compressed image with snapshots", commands: [
            "qemu-img create -q -f qcow2 src.qcow2 2M",
            io("src.qcow2", mixedWrites),
            "qemu-img convert -c -O qcow2 src.qcow2 img.qcow2",
            "qemu-img snapshot -c packed img.qcow2",
            io("img.qcow2", "write -P 0x09 0 1M"),
        ]),
    ]

    static let chains: [Scenario] = [
        Scenario(name: "three-level chain over raw, relative paths", commands: [
            "mkdir -p sub && qemu-img create -q -f raw sub/base.raw 3M",
            "qemu-io -f raw -c 'write -P 0x61 0 1M' -c 'write -P 0x62 2M 512k' sub/base.raw >/dev/null",
            "qemu-img create -q -f qcow2 -b base.raw -F raw sub/mid.qcow2",
            io("sub/mid.qcow2", "write -P 0x63 512k 256k", "write -z 2100k 64k"),
            "qemu-img create -q -f qcow2 -b sub/mid.qcow2 -F qcow2 img.qcow2",
            io("img.qcow2", "write -P 0x64 600k 8k", "discard 0 64k"),
            "qemu-img snapshot -c top img.qcow2",
            io("img.qcow2", "write -P 0x65 1M 64k"),
        ]),
        Scenario(name: "backing file shorter than its overlay", commands: [
            "qemu-img create -q -f qcow2 base.qcow2 1M",
            io("base.qcow2", "write -P 0x71 0 1M"),
            "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2 3M",
            io("img.qcow2", "write -P 0x72 900k 200k"),
        ]),
        Scenario(name: "raw backing shorter than overlay, with holes", commands: [
            "qemu-img create -q -f raw base.raw 1536k",
            "qemu-io -f raw -c 'write -P 0x73 0 256k' -c 'write -P 0x74 1M 100k' base.raw >/dev/null",
            "qemu-img create -q -f qcow2 -b base.raw -F raw img.qcow2 4M",
            io("img.qcow2", "write -P 0x75 128k 64k"),
        ]),
        Scenario(name: "absolute backing path", commands: [
            "qemu-img create -q -f qcow2 base.qcow2 1M",
            io("base.qcow2", "write -P 0x76 0 1M"),
            "qemu-img create -q -f qcow2 -b \"$PWD/base.qcow2\" -F qcow2 img.qcow2",
            io("img.qcow2", "write -P 0x77 4k 4k"),
        ]),
    ]
}

@Suite("qcow2 engine against qemu-img")
struct ConformanceTests {
    @Test(arguments: Scenario.all)
    func matchesQemu(_ scenario: Scenario) throws {
        let scratch = try Scratch()
        for command in scenario.commands { try scratch.sh(command) }
        let images = try scratch.sh("ls *.qcow2").split(separator: "\n").map(String.init)
        for image in images where image != "src.qcow2" && !image.hasPrefix("revert-") {
            try Oracle.expectMatchesQemu(image, in: scratch)
        }
    }

    /// A cache far smaller than the image's metadata evicts constantly; results must not change.
    @Test func tinyCacheReadsTheSame() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 -o cluster_size=4k img.qcow2 16M")
        try scratch.sh(io("img.qcow2", "write -P 0x11 0 16M"))
        try scratch.sh("qemu-img convert -c -O qcow2 -o cluster_size=4k img.qcow2 packed.qcow2")
        try Oracle.expectMatchesQemu("img.qcow2", in: scratch, cacheBytes: 64 << 10)
        try Oracle.expectMatchesQemu("packed.qcow2", in: scratch, cacheBytes: 64 << 10)
    }

    @Test func snapshotMetadata() throws {
        let scratch = try Scratch()
        for command in Scenario.snapshots[1].commands { try scratch.sh(command) }
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 1 << 20))
        #expect(image.virtualSize == 4 << 20)
        #expect(image.snapshots.map(\.id) == ["1", "2"])
        #expect(image.snapshots.map(\.name) == ["same", "same"])
        #expect(image.snapshots.map(\.diskSize) == [1 << 20, 3 << 20])
        #expect(image.device(of: image.snapshots[0])?.size == 1 << 20)
        #expect(image.snapshots.allSatisfy { $0.dateSeconds > 1_600_000_000 && $0.vmStateSize == 0 })
    }

    @Test func backingChainIsReported() throws {
        let scratch = try Scratch()
        for command in Scenario.chains[0].commands { try scratch.sh(command) }
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 1 << 20))
        #expect(image.chain.map(\.format) == [.qcow2, .qcow2, .raw])
        #expect(image.chain.map(\.path) == [scratch.path("img.qcow2"), scratch.path("sub/mid.qcow2"), scratch.path("sub/base.raw")])
    }
}
