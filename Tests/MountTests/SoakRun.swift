import CHostIO
import Foundation
#if canImport(Glibc)
import Glibc
#endif
import Synchronization
import TestSupport

/// The soak's threads, working on one `-o rw` mount until the deadline: readers and writers
/// checked against the models (see `FileModel` for why that is sound), and storms of opens and
/// closes, stats, directory listings and extended attributes. Every thread stops at the first
/// failure of any; failures are collected, not asserted, since they happen off the test's thread.
final class SoakRun: Sendable {
    let mountpoint: String
    let models: [FileModel]
    let deadline: ContinuousClock.Instant
    let seed: UInt64
    let daemon: DaemonUsage
    private let stop = Atomic<Bool>(false)
    private let failureList = Mutex<[String]>([])
    private let total = Mutex(SoakTally())
    private let peaks = Mutex<(rss: Int, descriptors: Int)>((0, 0))
    /// The highest RSS sampled in each quarter of the run: a leak shows as a rising series.
    private let quarterPeaks = Mutex<[Int]>([0, 0, 0, 0])
    let began: ContinuousClock.Instant

    /// O_DIRECT from <fcntl.h>, which Glibc's module hides behind _GNU_SOURCE.
    #if arch(x86_64)
    static let oDirect: Int32 = 0o40000
    #else
    static let oDirect: Int32 = 0o200000
    #endif

    init(mountpoint: String, models: [FileModel], seconds: Double, seed: UInt64, daemon: DaemonUsage) {
        self.mountpoint = mountpoint
        self.models = models
        self.began = .now
        self.deadline = began + .milliseconds(Int(seconds * 1000))
        self.seed = seed
        self.daemon = daemon
    }

    var stopped: Bool { stop.load(ordering: .relaxed) || ContinuousClock.now >= deadline }
    var failures: [String] { failureList.withLock { $0 } }
    var tally: SoakTally { total.withLock { $0 } }
    var peakRSS: Int { peaks.withLock { $0.rss } }
    var peakDescriptors: Int { peaks.withLock { $0.descriptors } }
    var rssByQuarter: [Int] { quarterPeaks.withLock { $0 } }

    func fail(_ message: String) {
        failureList.withLock { if $0.count < 20 { $0.append(message) } }
        stop.store(true, ordering: .relaxed)
    }

    func path(_ model: FileModel) -> String { mountpoint + "/" + model.path }

    /// Starts `readers`, `writers`, `openers` and `listers` threads and the sampler; the group
    /// is left when all have ended.
    func start(readers: Int, writers: Int, openers: Int, listers: Int) -> DispatchGroup {
        let group = DispatchGroup()
        func launch(_ name: String, _ body: @escaping @Sendable () -> Void) {
            group.enter()
            let thread = Thread {
                body()
                group.leave()
            }
            thread.name = name
            thread.start()
        }
        for i in 0..<readers { launch("reader \(i)") { self.reader(i) } }
        for i in 0..<writers { launch("writer \(i)") { self.writer(i) } }
        for i in 0..<openers { launch("opener \(i)") { self.opener(i) } }
        for i in 0..<listers { launch("lister \(i)") { self.lister(i) } }
        launch("sampler") { self.sampler() }
        return group
    }

    // MARK: Ranges and data

    /// A random range of a file of `size` bytes: mostly 4 KiB multiples, half of them aligned,
    /// some of a few bytes anywhere, some at the end of the disk (reads then cross it).
    static func range(size: Int, maxLength: Int, _ rng: inout SplitMix) -> (offset: Int, length: Int) {
        let roll = Int.random(in: 0..<100, using: &rng)
        let length: Int
        switch roll {
        case 0..<15: length = Int.random(in: 1...4096, using: &rng)
        case 15..<75: length = Int.random(in: 1...16, using: &rng) * 4096
        default: length = Int.random(in: 17...max(17, maxLength / 4096), using: &rng) * 4096
        }
        var offset = Int.random(in: 0..<size, using: &rng)
        if roll % 2 == 0 { offset &= ~4095 }
        if roll % 10 == 1 { offset = max(0, size - length / 2) }
        return (offset, length)
    }

    static func fill(_ buffer: UnsafeMutableRawBufferPointer, random rng: inout SplitMix) {
        var i = 0
        while i + 8 <= buffer.count {
            buffer.storeBytes(of: rng.next(), toByteOffset: i, as: UInt64.self)
            i += 8
        }
        while i < buffer.count {
            buffer[i] = UInt8(truncatingIfNeeded: rng.next())
            i += 1
        }
    }

    static func describe(_ code: Int32) -> String { "errno \(code) (\(String(cString: strerror(code))))" }

    /// What a failed comparison found: where the bytes differ and what they look like.
    func mismatch(_ model: FileModel, _ data: UnsafeRawBufferPointer, at offset: Int, first: Int, what: String) -> String {
        let differing = (first..<data.count).filter { data[$0] != model.bytes[offset + $0] }
        let last = differing.last ?? first
        let got = data[first..<min(data.count, first + 16)].map { String(format: "%02x", $0) }.joined()
        let want = (first..<min(data.count, first + 16)).map { String(format: "%02x", model.bytes[offset + $0]) }.joined()
        let zeros = differing.allSatisfy { data[$0] == 0 }
        return "\(model.path): \(what) of \(data.count) bytes at \(offset) differs at \(offset + first)...\(offset + last) "
            + "(\(differing.count) bytes\(zeros ? ", all read as zeros" : "")): got \(got), expected \(want)"
    }

    // MARK: Threads

    /// Runs a reader's or writer's loop with what the thread owns: its random numbers, its tally
    /// (merged into the total when the loop ends), its descriptors (closed then) and a buffer.
    func withThreadState(seed: UInt64, bufferBytes: Int,
                         _ loop: (inout SplitMix, inout SoakTally, inout Descriptors, UnsafeMutableRawBufferPointer) -> Void) {
        var rng = SplitMix(seed: seed)
        var tally = SoakTally()
        var fds = Descriptors()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bufferBytes, alignment: 4096)
        defer {
            buffer.deallocate()
            fds.closeAll(&tally)
            total.withLock { $0.merge(tally) }
        }
        loop(&rng, &tally, &fds, buffer)
    }

    /// Reads random ranges of every file and compares them with the model.
    func reader(_ index: Int) {
        withThreadState(seed: seed &+ 0x1000 &+ UInt64(index), bufferBytes: 1 << 20) { rng, tally, fds, buffer in
            var ops = 0
            while !stopped {
                ops += 1
                if ops % 200 == 0 { fds.closeAll(&tally) }
                let i = Int.random(in: 0..<models.count, using: &rng)
                let model = models[i]
                let flags = O_RDONLY | (model.writable ? Self.oDirect : 0)
                guard let fd = fds.open(i, path(model), flags, &tally, failing: fail) else { return }
                let (offset, length) = Self.range(size: model.size, maxLength: 512 << 10, &rng)
                let end = min(offset + length, model.size)
                let ok = model.ranges.with(offset..<end, exclusive: false) { () -> Bool in
                    let n = pread(fd, buffer.baseAddress, length, off_t(offset))
                    let code = errno
                    guard n >= 0 else {
                        fail("\(model.path): pread of \(length) bytes at \(offset): \(Self.describe(code))")
                        return false
                    }
                    guard n == end - offset else {
                        fail("\(model.path): pread of \(length) bytes at \(offset) returned \(n), expected \(end - offset)")
                        return false
                    }
                    let data = UnsafeRawBufferPointer(rebasing: buffer[0..<n])
                    if let first = model.firstDifference(data, at: offset) {
                        fail(mismatch(model, data, at: offset, first: first, what: "read"))
                        return false
                    }
                    return true
                }
                guard ok else { return }
                tally.add("read")
                tally.add("read bytes", end - offset)
            }
        }
    }

    /// Writes, punches holes, zeroes ranges and fsyncs the writable volumes; each acknowledged
    /// change goes into the model before the range is let go. Descriptors are closed every few
    /// dozen operations, so volumes keep being closed for writing (flushed) and reopened.
    func writer(_ index: Int) {
        let writable = models.indices.filter { models[$0].writable }
        withThreadState(seed: seed &+ 0x2000 &+ UInt64(index), bufferBytes: 256 << 10) { rng, tally, fds, buffer in
            var ops = 0
            while !stopped {
                ops += 1
                if ops % 48 == 0 { fds.closeAll(&tally) }
                let i = writable.randomElement(using: &rng)!
                let model = models[i]
                guard let fd = fds.open(i, path(model), O_RDWR | Self.oDirect, &tally, failing: fail) else { return }
                // Out of 100: 5 fsync, 8 punch hole, 8 zero range, 10 writes of zeros, 7 of a byte
                // pattern, 62 of random bytes.
                let roll = Int.random(in: 0..<100, using: &rng)
                if roll < 5 {
                    guard fsync(fd) == 0 else { return fail("\(model.path): fsync: \(Self.describe(errno))") }
                    tally.add("fsync")
                    continue
                }
                var (offset, length) = Self.range(size: model.size, maxLength: roll < 21 ? 1 << 20 : buffer.count, &rng)
                let zeros = roll >= 21 && roll < 31
                if zeros {
                    // Whole 64 KiB clusters of zeros (become zero clusters), or parts of them.
                    offset &= ~0xffff
                    if length >= 0x10000 { length &= ~0xffff }
                }
                offset = min(offset, model.size - 1)
                length = min(length, model.size - offset)
                let range = offset..<offset + length
                let ok = model.ranges.with(range, exclusive: true) { () -> Bool in
                    if roll < 21 {
                        let punch = roll < 13
                        let r = punch ? poolfs_punch_hole(fd, UInt64(offset), UInt64(length))
                                      : poolfs_zero_range(fd, UInt64(offset), UInt64(length))
                        guard r == 0 else {
                            fail("\(model.path): fallocate \(punch ? "punch hole" : "zero range") of \(length) at \(offset): \(Self.describe(-r))")
                            return false
                        }
                        memset(model.bytes.baseAddress! + offset, 0, length)
                        tally.add(punch ? "punch hole" : "zero range")
                        return true
                    }
                    let data = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<length])
                    if zeros {
                        data.initializeMemory(as: UInt8.self, repeating: 0)
                    } else if roll < 38 {
                        data.initializeMemory(as: UInt8.self, repeating: UInt8.random(in: 1...255, using: &rng))
                    } else {
                        Self.fill(data, random: &rng)
                    }
                    let n = pwrite(fd, data.baseAddress, length, off_t(offset))
                    let code = errno
                    guard n == length else {
                        fail("\(model.path): pwrite of \(length) bytes at \(offset) returned \(n): \(Self.describe(code))")
                        return false
                    }
                    model.bytes.baseAddress!.advanced(by: offset).copyMemory(from: data.baseAddress!, byteCount: length)
                    tally.add("write")
                    tally.add("write bytes", length)
                    return true
                }
                guard ok else { return }
            }
        }
    }

    /// Opens and closes files: writable volumes read-only and read-write (which opens and closes
    /// their writers), backing files read-write (must fail with EBUSY: an overlay holds them),
    /// snapshots read-write (must fail with EROFS), and reads a little of what is read-only.
    func opener(_ index: Int) {
        var rng = SplitMix(seed: seed &+ 0x3000 &+ UInt64(index))
        var tally = SoakTally()
        defer { total.withLock { $0.merge(tally) } }
        var buffer = [UInt8](repeating: 0, count: 4096)
        while !stopped {
            let model = models.randomElement(using: &rng)!
            let roll = Int.random(in: 0..<100, using: &rng)
            if !model.writable, roll < 30 {
                let fd = open(path(model), O_RDWR)
                let code = errno
                if fd >= 0 { close(fd) }
                let expected = model.snapshot == nil ? EBUSY : EROFS
                guard fd < 0, code == expected else {
                    return fail("\(model.path): open for writing gave \(fd < 0 ? Self.describe(code) : "a descriptor"), expected \(Self.describe(expected))")
                }
                tally.add(model.snapshot == nil ? "open refused EBUSY" : "open refused EROFS")
                continue
            }
            let flags = model.writable && roll < 50 ? O_RDWR : O_RDONLY
            let fd = open(path(model), flags)
            guard fd >= 0 else { return fail("\(model.path): open(\(flags == O_RDWR ? "O_RDWR" : "O_RDONLY")): \(Self.describe(errno))") }
            tally.add("open")
            defer {
                close(fd)
                tally.add("close")
            }
            if model.writable {
                // SEEK_DATA: an offset or ENXIO (nothing but holes after it); never another error.
                let r = lseek(fd, off_t(Int.random(in: 0..<model.size, using: &rng)), 3)
                if r < 0, errno != ENXIO { return fail("\(model.path): lseek SEEK_DATA: \(Self.describe(errno))") }
                tally.add("seek")
            } else {
                let length = Int.random(in: 1...4096, using: &rng)
                let offset = Int.random(in: 0..<model.size, using: &rng)
                let end = min(model.size, offset + length)
                let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress, length, off_t(offset)) }
                guard n == end - offset else { return fail("\(model.path): pread of \(length) at \(offset) returned \(n): \(Self.describe(errno))") }
                let differs = buffer.withUnsafeBytes { model.firstDifference(UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: offset) }
                if let first = differs {
                    return buffer.withUnsafeBytes { fail(mismatch(model, UnsafeRawBufferPointer(rebasing: $0[0..<n]), at: offset, first: first, what: "read after open")) }
                }
                tally.add("read")
                tally.add("read bytes", n)
            }
        }
    }

    /// Lists directories, stats files, reads extended attributes and statfs, checking what
    /// cannot change: the names, the sizes, the formats.
    func lister(_ index: Int) {
        var rng = SplitMix(seed: seed &+ 0x4000 &+ UInt64(index))
        var tally = SoakTally()
        defer { total.withLock { $0.merge(tally) } }
        let volumes = models.filter { $0.snapshot == nil }.map(\.volume)
        let rootNames = Set(volumes + [".snapshots", ".partitions"])
        while !stopped {
            let roll = Int.random(in: 0..<100, using: &rng)
            switch roll {
            case 0..<25:
                let names = (try? FileManager.default.contentsOfDirectory(atPath: mountpoint)).map(Set.init)
                guard names == rootNames else { return fail("readdir of the mount: \(names.map { "\($0.sorted())" } ?? "failed")") }
                tally.add("readdir")
            case 25..<45:
                let volume = volumes.randomElement(using: &rng)!
                let expected = Set(models.filter { $0.volume == volume }.compactMap(\.snapshot))
                let names = (try? FileManager.default.contentsOfDirectory(atPath: mountpoint + "/.snapshots/" + volume)).map(Set.init)
                guard names == expected else { return fail(".snapshots/\(volume): \(names.map { "\($0.sorted())" } ?? "failed"), expected \(expected.sorted())") }
                tally.add("readdir")
            case 45..<85:
                let model = models.randomElement(using: &rng)!
                var st = stat()
                guard stat(path(model), &st) == 0 else { return fail("stat \(model.path): \(Self.describe(errno))") }
                guard st.st_size == model.size else { return fail("stat \(model.path): size \(st.st_size), expected \(model.size)") }
                tally.add("stat")
            case 85..<95:
                let model = models.randomElement(using: &rng)!
                var value = [UInt8](repeating: 0, count: 64)
                let n = c_getxattr(path(model), "user.poolfs.format", &value, value.count)
                guard n > 0 else { return fail("getxattr \(model.path): \(Self.describe(errno))") }
                let format = String(decoding: value[0..<n], as: UTF8.self)
                let expected = model.snapshot != nil ? "qcow2-snapshot" : model.volume.hasSuffix(".qcow2") ? "qcow2" : "raw"
                guard format == expected else { return fail("getxattr \(model.path): format \(format), expected \(expected)") }
                tally.add("getxattr")
            default:
                var st = statvfs()
                guard statvfs(mountpoint, &st) == 0 else { return fail("statfs: \(Self.describe(errno))") }
                tally.add("statfs")
            }
        }
    }

    /// Samples the daemon's RSS and descriptors every 100 ms.
    func sampler() {
        while !stopped {
            sample()
            usleep(100_000)
        }
    }

    func sample() {
        let rss = daemon.rss ?? 0
        let descriptors = daemon.descriptors
        peaks.withLock { $0 = (max($0.rss, rss), max($0.descriptors, descriptors)) }
        let quarter = min(3, max(0, Int(4 * ((ContinuousClock.now - began) / (deadline - began)))))
        quarterPeaks.withLock { $0[quarter] = max($0[quarter], rss) }
    }
}

/// A thread's open descriptors, one per file, opened on first use.
struct Descriptors {
    private var fds: [Int: Int32] = [:]

    mutating func open(_ index: Int, _ path: String, _ flags: Int32, _ tally: inout SoakTally,
                       failing fail: (String) -> Void) -> Int32? {
        if let fd = fds[index] { return fd }
        let fd = Glibc.open(path, flags)
        guard fd >= 0 else {
            fail("open \(path) with flags \(String(flags, radix: 8)): \(SoakRun.describe(errno))")
            return nil
        }
        tally.add("open")
        fds[index] = fd
        return fd
    }

    mutating func closeAll(_ tally: inout SoakTally) {
        for fd in fds.values {
            close(fd)
            tally.add("close")
        }
        fds.removeAll()
    }
}
