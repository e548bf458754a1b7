import Foundation
import Block
import TestSupport
import Testing

/// Real images with metadata bytes overwritten at random (seeded, so failures reproduce): opening
/// and reading the whole disk may fail with a Qcow2Error, but must never trap, hang or grow the
/// cache past its bound. A crash found here becomes a named case in MalformedImageTests.
@Suite("mutated images")
struct MutationTests {
    static let fixtures = [
        "qemu-img create -q -f qcow2 -o cluster_size=4k img.qcow2 1M && qemu-io -c 'write -P 1 0 300k' -c 'write -z 400k 8k' img.qcow2 >/dev/null && qemu-img snapshot -c s img.qcow2 && qemu-io -c 'write -P 2 100k 8k' img.qcow2 >/dev/null",
        "qemu-img create -q -f qcow2 -o cluster_size=4k src.qcow2 1M && qemu-io -c 'write -P 3 0 1M' src.qcow2 >/dev/null && qemu-img convert -c -O qcow2 -o cluster_size=4k src.qcow2 img.qcow2",
        "qemu-img create -q -f qcow2 -o cluster_size=16k,extended_l2=on img.qcow2 1M && qemu-io -c 'write -P 4 4k 4k' -c 'write -z 40k 2k' -c 'write -P 5 200k 50k' img.qcow2 >/dev/null",
    ]

    @Test(arguments: Array(fixtures.indices))
    func mutatedMetadataNeverCrashes(_ fixture: Int) throws {
        let scratch = try Scratch()
        try scratch.sh(Self.fixtures[fixture])
        let original = try scratch.bytes("img.qcow2")
        var rng = SplitMix(seed: UInt64(fixture) &* 7919 &+ 1)
        // Mutate where metadata lives: the header cluster and the first tables after it.
        let metadataEnd = min(original.count, 8 * 16384)
        var readWhole = 0, refused = 0
        // POOLFS_FUZZ_ROUNDS=5000 searches longer; CI runs the default.
        let rounds = Int(ProcessInfo.processInfo.environment["POOLFS_FUZZ_ROUNDS"] ?? "") ?? 150
        for round in 0..<rounds {
            var bytes = original
            for _ in 0..<Int.random(in: 1...4, using: &rng) {
                let at = Int.random(in: 0..<metadataEnd, using: &rng)
                bytes[at] = round % 3 == 0 ? 0xff : UInt8.random(in: 0...255, using: &rng)
            }
            try scratch.write("mutant.qcow2", bytes)
            let cache = BlockCache(capacityBytes: 256 << 10)
            do {
                let image = try Image.open(path: scratch.path("mutant.qcow2"), format: .qcow2, cache: cache)
                let devices = [image.live] + image.snapshots.compactMap { image.device(of: $0) }
                for device in devices {
                    let length = min(device.size, 4 << 20)  // a hostile size must not make us read forever
                    var offset: UInt64 = 0
                    while offset < length {
                        _ = try device.read(at: offset, count: 256 << 10)
                        offset += 256 << 10
                    }
                    _ = try device.status(at: 0, length: length)
                }
                readWhole += 1
            } catch is Qcow2Error {
                refused += 1
            }
            #expect(cache.bytesUsed <= cache.capacity)
        }
        #expect(readWhole + refused == rounds, "every mutant either reads or fails with a Qcow2Error")
        #expect(readWhole > 0 && refused > 0, "the mutations reach both outcomes (\(readWhole) read, \(refused) refused)")
    }

    /// Reading from many threads at once gives the same bytes as reading alone.
    @Test func concurrentReadsAgree() throws {
        let scratch = try Scratch()
        try scratch.sh("qemu-img create -q -f qcow2 -o cluster_size=4k src.qcow2 8M && qemu-io -c 'write -P 7 0 3M' -c 'write -P 8 5M 2M' src.qcow2 >/dev/null")
        try scratch.sh("qemu-img convert -c -O qcow2 -o cluster_size=4k src.qcow2 img.qcow2 && qemu-img convert -O raw img.qcow2 img.raw")
        let expected = try scratch.bytes("img.raw")
        let image = try Image.open(path: scratch.path("img.qcow2"), cache: BlockCache(capacityBytes: 128 << 10))
        let live = image.live
        let mismatches = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 8) { worker in
            var rng = SplitMix(seed: UInt64(worker + 1))
            for _ in 0..<200 {
                let offset = Int.random(in: 0..<expected.count, using: &rng)
                let count = min(Int.random(in: 1...70_000, using: &rng), expected.count - offset)
                let got = (try? live.read(at: UInt64(offset), count: count)) ?? []
                if got[...] != expected[offset..<offset + count] { mismatches.add(1, ordering: .relaxed) }
            }
        }
        #expect(mismatches.load(ordering: .relaxed) == 0)
    }
}

import Dispatch
import Synchronization
