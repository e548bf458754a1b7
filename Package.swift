// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "poolfs",
    products: [
        .executable(name: "poolfs", targets: ["poolfs"]),
        .library(name: "Block", targets: ["Block"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // C libraries. Nothing but these nine targets touches C headers directly.
        .systemLibrary(name: "CFuse3", pkgConfig: "fuse3", providers: [.apt(["libfuse3-dev"])]),
        .systemLibrary(name: "CBlkid", pkgConfig: "blkid", providers: [.apt(["libblkid-dev"])]),
        .target(name: "CFuseShim", dependencies: ["CFuse3"]),
        .target(name: "CCompress", linkerSettings: [.linkedLibrary("deflate"), .linkedLibrary("z"), .linkedLibrary("zstd")]),
        .target(name: "CHostIO"),
        .systemLibrary(name: "CISCSI", pkgConfig: "libiscsi", providers: [.apt(["libiscsi-dev"])]),
        // librados and librbd (librbd-dev): loaded on first use (loader.c), not linked.
        .target(name: "CRBD", linkerSettings: [.linkedLibrary("dl")]),
        // libgfapi (libglusterfs-dev) and libnfs (libnfs-dev): loaded on first use, not linked;
        // every call bounded in time (glusterfs.c, nfs.c).
        .target(name: "CGlusterFS", cSettings: [.define("_FILE_OFFSET_BITS", to: "64"), .define("__USE_FILE_OFFSET64"), .define("__USE_LARGEFILE64")],
                linkerSettings: [.linkedLibrary("dl")]),
        .target(name: "CNFS", linkerSettings: [.linkedLibrary("dl")]),
        // The lock every module uses: a pthread mutex, which ThreadSanitizer understands.
        .target(name: "Locking"),

        // The Block core (Core/: devices, read plans, host files, the chain resolver, format
        // detection) and one folder per image format (Qcow2/, Raw/, ...): no FUSE, no processes.
        .target(name: "Block", dependencies: ["CCompress", "CHostIO", "Locking"]),
        // The only Swift module that imports libfuse.
        .target(name: "FuseKit", dependencies: ["CFuse3", "CFuseShim", "Locking"]),
        // Pool adapters: directories, LVM volume groups, disks, iSCSI targets; external commands
        // through one runner. Partition tables are read by libblkid (CBlkid), from
        // PartitionTable.swift only; iSCSI goes through libiscsi (CISCSI), from ISCSIClient.swift only.
        // Ceph RBD through librados/librbd (CRBD), from RBDClient.swift only.
        // GlusterFS through libgfapi (CGlusterFS), from Gluster/GlusterClient.swift only; NFS through
        // libnfs (CNFS), from NFS/NFSClient.swift only.
        .target(name: "Pools", dependencies: ["Block", "CHostIO", "CBlkid", "CISCSI", "CRBD", "CGlusterFS", "CNFS", "Locking"]),
        // The filesystem: the tree of volumes and snapshots, FUSE operations.
        .target(name: "PoolFS", dependencies: ["Block", "FuseKit", "Pools", "Locking"]),
        .executableTarget(name: "poolfs", dependencies: [
            "PoolFS", "Pools", "Block",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        .target(name: "TestSupport", path: "Tests/TestSupport"),
        .testTarget(name: "Qcow2Tests", dependencies: ["Block", "TestSupport"]),
        // The readers of every other format (vmdk, vpc, vhdx, vdi, qed), each against qemu-img.
        .testTarget(name: "FormatTests", dependencies: ["Block", "TestSupport"]),
        .testTarget(name: "PoolFSTests", dependencies: ["PoolFS", "Pools", "FuseKit", "Block", "TestSupport"]),
        .testTarget(name: "PoolsTests", dependencies: ["Pools", "Block", "TestSupport"], resources: [.copy("Fixtures")]),
        // Mounts the built `poolfs` binary through FUSE and compares with qemu-img.
        .testTarget(name: "MountTests", dependencies: ["Block", "FuseKit", "TestSupport", "CHostIO"], exclude: ["dm-vm"]),
    ]
)

// libFuzzer targets (Fuzz/, `make fuzz`): declared only when POOLFS_FUZZ=1, so that a plain
// `swift build` or `swift test` neither compiles nor links them. Their main calls libFuzzer's
// driver, which only `-sanitize=fuzzer` links in, and they use `@testable import`: they build
// with `-sanitize=fuzzer,address -enable-testing` (scripts/fuzz.sh).
if Context.environment["POOLFS_FUZZ"] == "1" {
    func fuzzTarget(_ name: String, _ dependencies: [Target.Dependency]) -> Target {
        .executableTarget(name: "Fuzz\(name)", dependencies: dependencies + ["FuzzSupport"], path: "Fuzz/\(name)")
    }
    package.targets += [
        .target(name: "CFuzzDriver", path: "Fuzz/Driver"),
        .target(name: "FuzzSupport", dependencies: ["Block", "CFuzzDriver"], path: "Fuzz/Support"),
        fuzzTarget("Qcow2Read", ["Block"]),
        fuzzTarget("Qcow2Write", ["Block"]),
        fuzzTarget("VdiRead", ["Block"]),
        fuzzTarget("QedRead", ["Block"]),
        fuzzTarget("VmdkRead", ["Block"]),
        fuzzTarget("VpcRead", ["Block"]),
        fuzzTarget("VhdxRead", ["Block"]),
        fuzzTarget("LVMReport", ["Pools", "Block"]),
        fuzzTarget("SnapshotStore", ["Pools", "Block"]),
        fuzzTarget("ThinMetadata", ["Pools", "Block"]),
        fuzzTarget("LibvirtXML", ["Pools"]),
        fuzzTarget("MountOptions", ["PoolFS"]),
    ]
}
