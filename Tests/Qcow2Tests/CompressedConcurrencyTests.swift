import Dispatch
import Foundation
@testable import Block
import Synchronization
import TestSupport
import Testing

/// Threads that read the same compressed clusters at once share one decode of each (the
/// decode-ahead among them); every reader gets the right bytes, or the same error, and none hangs.
@Suite("compressed reads from many threads")
struct CompressedConcurrencyTests {
    @Test func everyReaderGetsQemusBytes() throws {
        let scratch = try Scratch()
        try scratch.sh("head -c 6000000 /dev/urandom | base64 -w 0 | head -c 8388608 > data.raw")
        try scratch.sh("qemu-img convert -c -O qcow2 -o cluster_size=64k data.raw packed.qcow2 && qemu-img convert -O raw packed.qcow2 expected.raw")
        let expected = try Array(Data(contentsOf: URL(fileURLWithPath: scratch.path("expected.raw"))))
        let mismatches = Atomic<Int>(0)
        // Two rounds: the first decodes everything, the second finds it cached.
        for round in 0..<2 {
            let cache = BlockCache(capacityBytes: 32 << 20)
            let image = try Image.open(path: scratch.path("packed.qcow2"), cache: cache)
            let device = image.live
            DispatchQueue.concurrentPerform(iterations: 8) { reader in
                let wrong = Self.readAround(device, expected: expected, reader: reader)
                mismatches.add(wrong, ordering: .relaxed)
            }
            #expect(mismatches.load(ordering: .relaxed) == 0, "round \(round)")
        }
    }

    /// Reads the whole device once, sequentially (which starts decode-ahead), all readers from
    /// the same start so that they meet on clusters, in chunks of their own size (some straddle
    /// clusters), wrapping around; returns the chunks that differ.
    static func readAround(_ device: some BlockDevice, expected: [UInt8], reader: Int) -> Int {
        let chunk = [65536, 65536, 131072, 100_000][reader % 4]
        var offset = reader < 4 ? 0 : 4 << 20
        var done = 0
        var wrong = 0
        while done < expected.count {
            let n = min(chunk, expected.count - offset)
            let bytes: [UInt8]? = try? device.read(at: UInt64(offset), count: n)
            if bytes.map({ $0[...] != expected[offset..<offset + n] }) ?? true { wrong += 1 }
            done += n
            offset = (offset + n) % expected.count
        }
        return wrong
    }

    /// Threads that wait for a decode get its outcome, whether they came before or after it ended.
    @Test func waitersGetTheOwnersOutcome() throws {
        let failure = Qcow2Error.corrupt("zlib compressed cluster does not decompress to 512 bytes", offset: 2560)
        let pending = PendingDecode()
        let seen = Mutex<[String]>([])
        let waiters = DispatchGroup()
        func wait() {
            DispatchQueue.global().async(group: waiters) {
                let outcome: String
                do {
                    _ = try pending.wait()
                    outcome = "a block"
                } catch {
                    outcome = "\(error)"
                }
                seen.withLock { $0.append(outcome) }
            }
        }
        for _ in 0..<8 { wait() }
        usleep(50_000)
        pending.finish(.failure(failure))
        for _ in 0..<8 { wait() }
        #expect(waiters.wait(timeout: .now() + 30) == .success, "a waiter hangs")
        let outcomes = seen.withLock { $0 }
        #expect(outcomes.count == 16)
        #expect(Set(outcomes) == ["\(failure)"])
    }

    @Test func everyReaderOfABrokenClusterGetsTheError() throws {
        let scratch = try Scratch()
        var tiny = TinyImage()
        tiny.l2Entry0 = 1 << 62 | 5 * 512  // a compressed cluster of bytes that do not inflate
        try scratch.write("bad.qcow2", tiny.bytes())
        let image = try Image.open(path: scratch.path("bad.qcow2"), cache: BlockCache(capacityBytes: 1 << 20))
        let device = image.live
        let errors = Mutex<[String]>([])
        DispatchQueue.concurrentPerform(iterations: 16) { _ in
            for _ in 0..<50 {
                do {
                    _ = try device.read(at: 0, count: 512)
                    errors.withLock { $0.append("no error") }
                } catch {
                    errors.withLock { $0.append("\(error)") }
                }
            }
        }
        let seen = errors.withLock { $0 }
        #expect(seen.count == 16 * 50)
        #expect(Set(seen) == ["\(Qcow2Error.corrupt("zlib compressed cluster does not decompress to 512 bytes", offset: 2560))"])
    }
}
