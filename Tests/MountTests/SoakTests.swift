import Foundation
import TestSupport
import Testing

/// A soak of one `-o rw` mount under load (`SoakRun`): 16 readers and 4 writers over 20 volumes
/// of every layout, every read checked against a model of the volume's bytes, with storms of
/// opens, stats and listings beside them. Afterwards the daemon's memory stayed within its cache
/// and a fixed bound, its descriptors are back where they started, a new mount reads every byte
/// of the models, and qemu-img finds the images clean and holding exactly the models' bytes.
///
/// `POOLFS_SOAK_SECONDS` sets how long the load runs (default 60), `POOLFS_SOAK_SEED` the seed.
@Suite("soak", .serialized)
struct SoakTests {
    static let environment = ProcessInfo.processInfo.environment
    static let seconds = environment["POOLFS_SOAK_SECONDS"].flatMap(Double.init) ?? 60
    static let seed = environment["POOLFS_SOAK_SEED"].flatMap { UInt64($0) } ?? 1
    static let cacheSize = 8 << 20
    static let options = ["rw", "cache_size=8M"]
    static let workers = 16
    /// What the daemon may hold above its idle RSS (every volume open, nothing read) and the
    /// cache: the free list of recycled cache blocks (`BlockMemory.freeListBytes`, 16 MiB); for
    /// each of libfuse's 16 workers its request buffer (up to the largest write, 256 KiB here)
    /// and a reply's decoded clusters the cache may have evicted meanwhile (up to max_read,
    /// 512 KiB), 12 MiB; and 4 MiB for thread stacks, the writers' cluster buffers and dirty
    /// tables, and what malloc keeps. Measured here: 18-25 MiB, flat after the first minute; a
    /// leak would cross it in a long run.
    static let rssAboveIdleAndCache = 32 << 20

    @Test func anRwMountUnderLoadKeepsEveryByte() throws {
        let began = ContinuousClock.now
        let scratch = try Scratch()
        try SoakPool.build(in: scratch)
        let models = try Self.models(in: scratch)
        let setUp = ContinuousClock.now - began

        let mount = try PoolMount(scratch.path("pool"), in: scratch, options: Self.options)
        defer { mount.unmount() }
        let daemon = DaemonUsage(pid: mount.process.processIdentifier)
        // Every volume opened once (a getxattr always reaches the daemon): what stays open with
        // nothing in use.
        Self.touchEveryVolume(mount, models)
        let descriptorsAtStart = daemon.descriptors
        let filesAtStart = daemon.fileDescriptors
        let rssAtStart = daemon.rss ?? 0

        // The tops of the chains stay open: their backing files must refuse writers (EBUSY).
        let holders = SoakPool.overlays.map { open(mount.path($0), O_RDONLY) }
        #expect(holders.allSatisfy { $0 >= 0 }, "opening the overlays: \(holders)")
        let run = SoakRun(mountpoint: mount.mountpoint, models: models, seconds: Self.seconds, seed: Self.seed, daemon: daemon)
        let group = run.start(readers: 16, writers: 4, openers: 2, listers: 2)
        if group.wait(timeout: .now() + Self.seconds + 60) == .timedOut {
            // Threads blocked in the mount: killing the daemon fails their calls with ENOTCONN.
            kill(daemon.pid, SIGKILL)
            let ended = group.wait(timeout: .now() + 30) == .success
            let failures = run.failures.joined(separator: "\n")
            Issue.record("threads still busy 60 s after the deadline (the daemon hangs; killed it\(ended ? "" : ", threads still stuck")):\n\(failures)\nlog:\n\(Self.logTail(mount))")
            return
        }
        let loadTime = ContinuousClock.now - run.began
        run.sample()
        for fd in holders where fd >= 0 { close(fd) }
        let tally = run.tally
        #expect(run.failures.isEmpty, "\(run.failures.joined(separator: "\n"))\nlog:\n\(Self.logTail(mount))")

        // Everything closed: the kernel's releases come after close returns, then the daemon holds
        // the files it held at the start.
        let settled = FileLocks.wait(seconds: 10) {
            Self.touchEveryVolume(mount, models)
            return daemon.fileDescriptors == filesAtStart
        }
        let descriptorsAtEnd = daemon.descriptors
        let filesAtEnd = daemon.fileDescriptors
        #expect(settled, "the daemon's descriptors other than pipes differ at the end from the start:\nstart: \(filesAtStart)\nend: \(filesAtEnd)")
        let runtimeGrowth = (descriptorsAtEnd - filesAtEnd.count) - (descriptorsAtStart - filesAtStart.count)
        #expect(runtimeGrowth <= 2 * Self.workers + 3,
                "more new pipes and event descriptors than libfuse's workers and libdispatch hold: \(daemon.descriptorTargets)")
        let highWaterMark = daemon.highWaterMark ?? 0
        let peakRSS = max(run.peakRSS, highWaterMark)
        let rssLimit = rssAtStart + Self.cacheSize + Self.rssAboveIdleAndCache
        let parts = "idle \(rssAtStart >> 20) MiB + cache_size \(Self.cacheSize >> 20) MiB + \(Self.rssAboveIdleAndCache >> 20) MiB"
        // Under AddressSanitizer (`make test-sanitizers` sets ASAN_OPTIONS for the ASan build of
        // the daemon) RSS is mostly shadow memory and the quarantine of freed blocks: it says
        // nothing of poolfs's own bound.
        let underASan = ProcessInfo.processInfo.environment["ASAN_OPTIONS"] != nil
        #expect(underASan || peakRSS <= rssLimit, "peak RSS \(peakRSS >> 20) MiB is above \(rssLimit >> 20) MiB (\(parts)); by quarter: \(run.rssByQuarter.map { $0 >> 20 })")
        print("""
            soak: \(SoakPool.volumes.count) volumes (\(SoakPool.volumes.filter(\.writable).count) written), \
            \(models.count - SoakPool.volumes.count) snapshots, seed \(Self.seed); set-up \(setUp), load \(loadTime)
            soak: operations: \(tally)
            soak: daemon RSS idle \(rssAtStart >> 20) MiB, peak \(peakRSS >> 20) MiB (VmHWM \(highWaterMark >> 20) MiB; \
            peak by quarter \(run.rssByQuarter.map { $0 >> 20 }) MiB), cache_size \(Self.cacheSize >> 20) MiB, limit \(rssLimit >> 20) MiB
            soak: descriptors \(descriptorsAtStart) at the start (\(filesAtStart.count) files), peak \(run.peakDescriptors), \
            \(descriptorsAtEnd) at the end (\(filesAtEnd.count) files, \(runtimeGrowth) more libfuse worker pipes and event descriptors)
            """)
        mount.unmount()
        // Nothing went wrong that the daemon kept to itself (a failed flush at a last close).
        let unexpected = Self.unexpectedLogLines(mount)
        #expect(unexpected.isEmpty, "the daemon logged:\n\(unexpected.prefix(20).joined(separator: "\n"))")

        // A new mount reads every byte of every file as the model has it.
        let verifyBegan = ContinuousClock.now
        do {
            let again = try PoolMount(scratch.path("pool"), in: scratch, options: Self.options, name: "again")
            defer { again.unmount() }
            for model in models {
                let data = try contents(again.path(model.path))
                let first = data.withUnsafeBytes { $0.count == model.size ? model.firstDifference($0, at: 0) : 0 }
                #expect(first == nil, "\(model.path) after a remount: \(data.count) bytes, differs from the model at \(first ?? -1)")
            }
        }
        // qemu-img: every image clean, every volume and snapshot holding the model's bytes.
        for volume in SoakPool.volumes where volume.qcow2 {
            #expect(throws: Never.self, "qemu-img check \(volume.name)") { try scratch.sh("qemu-img check pool/\(volume.name)") }
        }
        for model in models {
            let snapshot = model.snapshot.map { "-l snapshot.name=\($0) " } ?? ""
            try scratch.sh("qemu-img convert -O raw \(snapshot)pool/\(model.volume) after.raw")
            let data = try contents(scratch.path("after.raw"))
            let first = data.withUnsafeBytes { $0.count == model.size ? model.firstDifference($0, at: 0) : 0 }
            #expect(first == nil, "qemu-img convert of \(model.path): \(data.count) bytes, differs from the model at \(first ?? -1)")
        }
        print("soak: remount, re-read, qemu-img check and convert \(ContinuousClock.now - verifyBegan); total \(ContinuousClock.now - began)")
    }

    /// The models: every volume's bytes (`qemu-img convert -O raw`, raw files as they are) and
    /// every snapshot's.
    static func models(in scratch: Scratch) throws -> [FileModel] {
        var models: [FileModel] = []
        for volume in SoakPool.volumes {
            for snapshot in [nil] + volume.snapshots.map(Optional.some) {
                let source = "pool/\(volume.name)"
                if volume.qcow2 || snapshot != nil {
                    let option = snapshot.map { "-l snapshot.name=\($0) " } ?? ""
                    try scratch.sh("qemu-img convert -O raw \(option)\(source) model.raw")
                } else {
                    try scratch.sh("cp \(source) model.raw")
                }
                models.append(FileModel(volume: volume.name, snapshot: snapshot, writable: volume.writable && snapshot == nil,
                                        contents: try contents(scratch.path("model.raw"))))
            }
        }
        try scratch.sh("rm model.raw")
        return models
    }

    static func touchEveryVolume(_ mount: PoolMount, _ models: [FileModel]) {
        var value = [UInt8](repeating: 0, count: 64)
        for model in models where model.snapshot == nil {
            _ = c_getxattr(mount.path(model.volume), "user.poolfs.format", &value, value.count)
        }
    }

    /// What the mount logged besides mounting, unmounting and the refusals the soak provokes
    /// (opening a backing file of an open overlay for writing).
    static func unexpectedLogLines(_ mount: PoolMount) -> [String] {
        let log = (try? String(contentsOfFile: mount.log, encoding: .utf8)) ?? ""
        return log.split(separator: "\n").map(String.init).filter { line in
            !line.hasPrefix("poolfs: mounted ") && !line.hasPrefix("poolfs: unmounted ")
                && !line.hasPrefix("poolfs: readahead stays") && !line.hasPrefix("poolfs: reads of raw volumes: ")
                && !line.hasPrefix("poolfs: writes: ")
                && !(line.contains("image in use: ") && line.contains(", open through this mount: it stays read-only until they are closed"))
        }
    }

    static func logTail(_ mount: PoolMount) -> String {
        let log = (try? String(contentsOfFile: mount.log, encoding: .utf8)) ?? ""
        return log.split(separator: "\n").suffix(30).joined(separator: "\n")
    }
}
