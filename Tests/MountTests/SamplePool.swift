import TestSupport

/// A pool of every kind of volume, made by qemu-img and qemu-io in `scratch/pool`.
enum SamplePool {
    static let commands = [
        "mkdir -p pool && cd pool",
        // A raw base, a qcow2 over it, and a top with snapshots: a three-level chain.
        "qemu-img create -q -f raw base.raw 8M",
        "qemu-io -f raw -c 'write -P 0x61 0 2M' -c 'write -P 0x62 6M 512k' base.raw >/dev/null",
        "qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2",
        "qemu-io -c 'write -P 0x63 1M 1M' -c 'write -z 6M 64k' mid.qcow2 >/dev/null",
        "qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2",
        "qemu-io -c 'write -P 0x64 1536k 64k' top.qcow2 >/dev/null",
        "qemu-img snapshot -c before top.qcow2",
        "qemu-io -c 'write -P 0x65 0 128k' -c 'discard 1M 64k' top.qcow2 >/dev/null",
        // Snapshots before a resize, with a shared name and a name with a slash.
        "qemu-img create -q -f qcow2 vm.qcow2 4M",
        "qemu-io -c 'write -P 0x01 0 4M' vm.qcow2 >/dev/null",
        "qemu-img snapshot -c daily vm.qcow2",
        "qemu-img resize -q vm.qcow2 12M",
        "qemu-io -c 'write -P 0x02 8M 1M' -c 'write -z 0 64k' vm.qcow2 >/dev/null",
        "qemu-img snapshot -c daily vm.qcow2",
        "qemu-io -c 'write -P 0x03 10M 64k' vm.qcow2 >/dev/null",
        "qemu-img snapshot -c 'lesson/1' vm.qcow2",
        // Compressed (zstd) and extended L2.
        "qemu-img create -q -f qcow2 src.tmp 6M",
        "qemu-io -c 'write -P 0x71 0 3M' -c 'write -P 0x72 5M 100k' src.tmp >/dev/null",
        "qemu-img convert -c -O qcow2 -o compression_type=zstd src.tmp packed.qcow2 && rm src.tmp",
        "qemu-img create -q -f qcow2 -o extended_l2=on sub.qcow2 4M",
        "qemu-io -c 'write -P 0x81 4k 4k' -c 'write -z 64k 8k' -c 'write -P 0x82 1M 100k' sub.qcow2 >/dev/null",
        // An old v2 image and a plain raw one.
        "qemu-img create -q -f qcow2 -o compat=0.10 old.qcow2 2M",
        "qemu-io -c 'write -P 0x91 100k 200k' old.qcow2 >/dev/null",
        "qemu-img create -q -f raw plain.img 3M",
        "qemu-io -f raw -c 'write -P 0xa1 1M 4k' plain.img >/dev/null",
    ]

    static let volumes = ["base.raw", "mid.qcow2", "old.qcow2", "packed.qcow2", "plain.img", "sub.qcow2", "top.qcow2", "vm.qcow2"]

    /// Snapshot file names, as the escaping rules give them, with the qemu-img id they stand for.
    static let snapshots: [(volume: String, file: String, id: String)] = [
        ("top.qcow2", "before", "1"),
        ("vm.qcow2", "daily@1", "1"), ("vm.qcow2", "daily@2", "2"), ("vm.qcow2", "lesson%2F1", "3"),
    ]

    static func build(in scratch: Scratch) throws {
        try scratch.sh(commands.joined(separator: " && "))
    }
}
