import Foundation
import Synchronization

/// What one file of the mount must read as: its bytes in memory, and the byte ranges threads are
/// using now.
///
/// Soundness: a writer holds its range exclusively from before its pwrite (or fallocate) until the
/// model shows the acknowledged result; a reader holds its range shared from before its pread until
/// it has compared the bytes. So a range is never read while a write to any of its bytes is under
/// way, and every write a reader could see has returned and is in the model: POSIX says the read
/// returns exactly those bytes. Readers and writers still meet in the same clusters, L2 tables and
/// refcount blocks (ranges are bytes, not clusters), which is where an engine's races would show.
/// Writers and the readers of written files use O_DIRECT, so the kernel's page cache (whose
/// coherence between concurrent buffered reads and writes is the kernel's business) is not in
/// between; files nobody writes (backing files, snapshots) are read through it.
final class FileModel: @unchecked Sendable {
    /// Path relative to the mountpoint: a volume, or `.snapshots/<volume>/<snapshot>`.
    let path: String
    let volume: String
    let snapshot: String?
    let writable: Bool
    let size: Int
    // SAFETY: bytes of a range are written only under an exclusive hold of it in `ranges`, and
    // read only under a hold of it; the memory lives as long as the model.
    let bytes: UnsafeMutableRawBufferPointer
    let ranges = RangeLock()

    init(volume: String, snapshot: String?, writable: Bool, contents: Data) {
        self.volume = volume
        self.snapshot = snapshot
        self.path = snapshot.map { ".snapshots/\(volume)/\($0)" } ?? volume
        self.writable = writable
        size = contents.count
        bytes = .allocate(byteCount: max(size, 1), alignment: 4096)
        contents.withUnsafeBytes { bytes.copyMemory(from: $0) }
    }

    deinit { bytes.deallocate() }

    /// Whether `data` holds exactly the model's bytes at `offset`; else where the first difference is.
    func firstDifference(_ data: UnsafeRawBufferPointer, at offset: Int) -> Int? {
        guard memcmp(data.baseAddress!, bytes.baseAddress! + offset, data.count) != 0 else { return nil }
        return (0..<data.count).first { data[$0] != bytes[offset + $0] }
    }
}

/// A reader-writer lock on byte ranges: holds on overlapping ranges wait for each other unless
/// both are shared. Empty ranges overlap nothing.
final class RangeLock: @unchecked Sendable {
    private let condition = NSCondition()
    // SAFETY: `held` and `next` are touched only with `condition` locked.
    private var held: [UInt64: (range: Range<Int>, exclusive: Bool)] = [:]
    private var next: UInt64 = 0

    func with<R>(_ range: Range<Int>, exclusive: Bool, _ body: () throws -> R) rethrows -> R {
        condition.lock()
        while held.values.contains(where: { $0.range.overlaps(range) && ($0.exclusive || exclusive) }) {
            condition.wait()
        }
        next += 1
        let id = next
        held[id] = (range, exclusive)
        condition.unlock()
        defer {
            condition.lock()
            held[id] = nil
            condition.broadcast()
            condition.unlock()
        }
        return try body()
    }
}

/// Operations done, by kind, summed over every thread of the soak.
struct SoakTally: CustomStringConvertible {
    private(set) var counts: [String: Int] = [:]

    mutating func add(_ kind: String, _ n: Int = 1) { counts[kind, default: 0] += n }

    mutating func merge(_ other: SoakTally) {
        for (kind, n) in other.counts { add(kind, n) }
    }

    subscript(kind: String) -> Int { counts[kind] ?? 0 }

    var description: String {
        counts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
    }
}

/// The daemon's memory and descriptors, from /proc.
struct DaemonUsage {
    let pid: Int32

    /// A field of /proc/PID/status in bytes ("VmRSS:   1234 kB").
    func status(_ field: String) -> Int? {
        guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix(field + ":") {
            let kB = line.dropFirst(field.count + 1).split(whereSeparator: { $0 == " " || $0 == "\t" }).first.flatMap { Int($0) }
            return kB.map { $0 * 1024 }
        }
        return nil
    }

    var rss: Int? { status("VmRSS") }
    var highWaterMark: Int? { status("VmHWM") }

    /// Open descriptors (`ls /proc/PID/fd | wc -l`).
    var descriptors: Int {
        (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1
    }

    /// What each open descriptor refers to (its /proc/PID/fd link), sorted.
    var descriptorTargets: [String] {
        let dir = "/proc/\(pid)/fd"
        let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
        return names.map { (try? FileManager.default.destinationOfSymbolicLink(atPath: dir + "/" + $0)) ?? "?" }.sorted()
    }

    /// The descriptors that are not the runtime's: libfuse gives each worker thread a pipe (two
    /// descriptors) the first time it splices a reply, and keeps it while the thread lives;
    /// libdispatch opens its epoll, eventfd and timerfd once. Everything else (files, /dev/fuse,
    /// the log, the lock) must be the same set at the end as at the start.
    var fileDescriptors: [String] {
        descriptorTargets.filter { !$0.hasPrefix("pipe:") && !$0.hasPrefix("anon_inode:") }
    }
}
