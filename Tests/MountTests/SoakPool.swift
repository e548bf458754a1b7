import TestSupport

/// The soak's pool: 20 volumes of the layouts `-o rw` writes, made by qemu-img and qemu-io at test
/// time. Data is base64 text (compressible, never all zeros) placed among holes, patterns and zero
/// ranges, so that every kind of L2 entry is met by reads and overwritten by writes.
enum SoakPool {
    struct Volume {
        let name: String
        /// Written by the soak's writers. The others are backing files of overlays held open for
        /// the whole run, so opening them for writing must fail with EBUSY.
        let writable: Bool
        /// Internal snapshots, each read through `.snapshots/<volume>/<name>`.
        let snapshots: [String]
        var qcow2: Bool { name.hasSuffix(".qcow2") }
    }

    static let volumes: [Volume] = [
        Volume(name: "c64.qcow2", writable: true, snapshots: []),
        Volume(name: "c4k.qcow2", writable: true, snapshots: []),
        Volume(name: "snap64.qcow2", writable: true, snapshots: ["s1", "s2"]),
        Volume(name: "snap4k.qcow2", writable: true, snapshots: ["s1"]),
        Volume(name: "zlib.qcow2", writable: true, snapshots: []),
        Volume(name: "zstd.qcow2", writable: true, snapshots: ["s1"]),
        Volume(name: "zlib4k.qcow2", writable: true, snapshots: []),
        Volume(name: "ext.qcow2", writable: true, snapshots: []),
        Volume(name: "extback.qcow2", writable: true, snapshots: []),
        Volume(name: "extbase.raw", writable: false, snapshots: []),
        Volume(name: "chain-base.raw", writable: false, snapshots: []),
        Volume(name: "chain-mid.qcow2", writable: false, snapshots: []),
        Volume(name: "chain-top.qcow2", writable: true, snapshots: ["s1"]),
        Volume(name: "pair-base.qcow2", writable: false, snapshots: []),
        Volume(name: "pair-top.qcow2", writable: true, snapshots: []),
        Volume(name: "raw-full.img", writable: true, snapshots: []),
        Volume(name: "raw-sparse.img", writable: true, snapshots: []),
        Volume(name: "lazy.qcow2", writable: true, snapshots: []),
        Volume(name: "tiny.qcow2", writable: true, snapshots: []),
        Volume(name: "old.qcow2", writable: true, snapshots: []),
    ]

    /// The tops of the chains: held open (read-only) for the whole run, which locks their
    /// backing files against writers, the mount's own included.
    static let overlays = ["extback.qcow2", "chain-top.qcow2", "pair-top.qcow2"]

    static let script = """
        set -e
        mkdir pool && cd pool
        text() { base64 -w0 /dev/urandom | head -c "$2" > "$1"; }
        place() { dd if="$1" of="$2" bs=64k seek="$3" conv=notrunc status=none; }  # at $3 x 64 KiB
        text t1 3M && text t2 1M && text t3 5M
        # 64 KiB and 4 KiB clusters: text among holes, patterns, zeroed ranges.
        truncate -s 24M src && place t1 src 16 && place t3 src 160 && qemu-img convert -O qcow2 src c64.qcow2
        qemu-io -c 'write -P 0x11 8M 2M' -c 'write -z 9M 512k' c64.qcow2 >/dev/null
        truncate -s 16M src4 && place t2 src4 3 && place t3 src4 100 && qemu-img convert -O qcow2 -o cluster_size=4k src4 c4k.qcow2
        qemu-io -c 'write -P 0x21 5M 100k' -c 'write -z 7M 12k' c4k.qcow2 >/dev/null
        # Internal snapshots: the live disk differs from each.
        qemu-img create -q -f qcow2 snap64.qcow2 16M
        qemu-io -c 'write -P 0x31 0 6M' snap64.qcow2 >/dev/null && qemu-img snapshot -c s1 snap64.qcow2
        qemu-io -c 'write -P 0x32 2M 4M' -c 'write -z 0 64k' snap64.qcow2 >/dev/null && qemu-img snapshot -c s2 snap64.qcow2
        qemu-io -c 'write -P 0x33 5M 3M' -c 'discard 1M 1M' snap64.qcow2 >/dev/null
        truncate -s 12M src12 && place t1 src12 10 && qemu-img convert -O qcow2 -o cluster_size=4k src12 snap4k.qcow2
        qemu-img snapshot -c s1 snap4k.qcow2 && qemu-io -c 'write -P 0x41 1M 2M' snap4k.qcow2 >/dev/null
        # Compressed: zlib, zstd with a snapshot sharing its clusters, zlib with 4 KiB clusters.
        truncate -s 16M srcz && place t3 srcz 8 && place t1 srcz 150
        qemu-img convert -c -O qcow2 srcz zlib.qcow2
        qemu-img convert -c -O qcow2 -o compression_type=zstd srcz zstd.qcow2 && qemu-img snapshot -c s1 zstd.qcow2
        qemu-io -c 'write -P 0x51 12M 1M' zstd.qcow2 >/dev/null
        truncate -s 8M src8 && place t2 src8 4 && place t1 src8 40 && qemu-img convert -c -O qcow2 -o cluster_size=4k src8 zlib4k.qcow2
        # Extended L2 (2 KiB subclusters), alone and over a raw backing file.
        qemu-img create -q -f qcow2 -o extended_l2=on ext.qcow2 16M
        qemu-io -c 'write -P 0x61 4k 4k' -c 'write -z 64k 8k' -c 'write -P 0x62 1M 100k' -c 'write -P 0x63 3M 2k' ext.qcow2 >/dev/null
        truncate -s 16M extbase.raw && place t2 extbase.raw 0 && place t1 extbase.raw 100
        qemu-img create -q -f qcow2 -o extended_l2=on -b extbase.raw -F raw extback.qcow2
        qemu-io -c 'write -P 0x64 6k 2k' -c 'write -z 640k 6k' -c 'write -P 0x65 7M 300k' extback.qcow2 >/dev/null
        # A three-level chain (raw <- 4 KiB qcow2 <- 64 KiB qcow2 with a snapshot) and a two-level one.
        truncate -s 16M chain-base.raw && place t3 chain-base.raw 0 && place t2 chain-base.raw 200
        qemu-img create -q -f qcow2 -o cluster_size=4k -b chain-base.raw -F raw chain-mid.qcow2
        qemu-io -c 'write -P 0x71 1M 2M' -c 'write -z 4M 64k' chain-mid.qcow2 >/dev/null
        qemu-img create -q -f qcow2 -b chain-mid.qcow2 -F qcow2 chain-top.qcow2
        qemu-io -c 'write -P 0x72 1536k 1M' chain-top.qcow2 >/dev/null && qemu-img snapshot -c s1 chain-top.qcow2
        qemu-io -c 'write -P 0x73 0 128k' -c 'discard 2M 64k' chain-top.qcow2 >/dev/null
        truncate -s 12M src12b && place t1 src12b 0 && place t2 src12b 120 && qemu-img convert -O qcow2 -o cluster_size=4k src12b pair-base.qcow2
        qemu-img create -q -f qcow2 -b pair-base.qcow2 -F qcow2 pair-top.qcow2
        qemu-io -c 'write -P 0x81 2M 1M' pair-top.qcow2 >/dev/null
        # Raw files, full and sparse.
        text raw-full.img 16M
        truncate -s 24M raw-sparse.img && place t2 raw-sparse.img 50 && place t1 raw-sparse.img 300
        # Lazy refcounts, 512-byte clusters, version 2.
        qemu-img create -q -f qcow2 -o lazy_refcounts=on lazy.qcow2 16M && qemu-io -c 'write -P 0x91 0 5M' lazy.qcow2 >/dev/null
        qemu-img create -q -f qcow2 -o cluster_size=512 tiny.qcow2 4M
        qemu-io -c 'write -P 0xa1 0 1M' -c 'write -P 0xa2 3M 100k' tiny.qcow2 >/dev/null
        qemu-img create -q -f qcow2 -o compat=0.10 old.qcow2 8M && qemu-io -c 'write -P 0xb1 100k 2M' old.qcow2 >/dev/null
        rm -f t1 t2 t3 src src4 src12 srcz src8 src12b
        """

    static func build(in scratch: Scratch) throws {
        try scratch.sh(script)
    }
}
