#if canImport(Glibc)
import Glibc
#endif
import FuseKit
import Block
import Synchronization
import Locking

/// `-o cow`: writes to any volume or snapshot file land here, never in the images. Each file gets
/// an overlay of 64 KiB blocks; a block is filled from the image on its first write, then kept in
/// memory while the store's memory budget lasts and in a spill file (created and unlinked in
/// `cache_dir`, so nothing survives the mount) after that. Reads take written blocks from the
/// overlay and the rest from the image. Everything is discarded at unmount.
///
/// Blocks are never freed or moved while mounted: a reply may still point into one.
public final class CowStore: Sendable {
    public static let blockSize = 64 << 10
    let memoryLimit: Int
    let spillDirectory: String
    let memoryUsed = Atomic<Int>(0)
    let spill: Locked<SpillFile?> = Locked(nil)
    let overlays = Locked<[Node: CowOverlay]>([:])

    public init(memoryLimit: Int, spillDirectory: String) {
        self.memoryLimit = memoryLimit
        self.spillDirectory = spillDirectory
    }

    func overlay(for node: Node, create: Bool) -> CowOverlay? {
        overlays.withLock { all in
            if let existing = all[node] { return existing }
            guard create else { return nil }
            let fresh = CowOverlay(store: self)
            all[node] = fresh
            return fresh
        }
    }

    enum Location {
        case memory(UnsafeMutableRawPointer)
        case spilled(offset: UInt64)
    }

    /// Room for one new block: memory while the budget lasts, then the spill file.
    func allocateBlock() throws(Errno) -> Location {
        let size = Self.blockSize
        if memoryUsed.add(size, ordering: .relaxed).newValue <= memoryLimit {
            return .memory(UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 4096))
        }
        memoryUsed.subtract(size, ordering: .relaxed)
        return try spill.withLock { (file: inout SpillFile?) throws(Errno) -> Location in
            if file == nil { file = try SpillFile(directory: spillDirectory) }
            return .spilled(offset: file!.reserve(UInt64(size)))
        }
    }

    var spillFD: Int32 { spill.withLock { $0?.fd ?? -1 } }

    deinit {
        for overlay in overlays.withLock({ Array($0.values) }) { overlay.freeMemory() }
    }
}

/// A file of spilled blocks, unlinked as soon as it is made.
struct SpillFile: ~Copyable {
    let fd: Int32
    private var end: UInt64 = 0

    init(directory: String) throws(Errno) {
        var template = Array((directory + "/poolfs-cow-XXXXXX").utf8CString)
        let fd = mkstemp(&template)
        guard fd >= 0 else { throw Errno(errno) }
        unlink(template)
        self.fd = fd
    }

    mutating func reserve(_ size: UInt64) -> UInt64 {
        defer { end += size }
        return end
    }

    deinit { close(fd) }
}

/// The written blocks of one file.
final class CowOverlay: @unchecked Sendable {
    // SAFETY: `blocks` is only touched under `lock`; block memory is written by pwrite/memcpy
    // outside it, as a disk's sectors are: concurrent readers of a block being written see old or
    // new bytes, never freed memory.
    private let lock = Locked<[UInt64: CowStore.Location]>([:])
    unowned let store: CowStore

    init(store: CowStore) { self.store = store }

    /// Writes `data` at `offset` of a file whose unwritten bytes come from `base`.
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64, base: any BlockDevice) -> Result<Int, Errno> {
        guard offset < base.size else { return .failure(.noSpace) }
        let n = Int(min(UInt64(data.count), base.size - offset))
        let blockSize = UInt64(CowStore.blockSize)
        var done = 0
        while done < n {
            let at = offset + UInt64(done)
            let index = at / blockSize
            let within = Int(at % blockSize)
            let count = min(n - done, Int(blockSize) - within)
            let location: CowStore.Location
            switch block(index, base: base) {
            case .success(let l): location = l
            case .failure(let e): return done > 0 ? .success(done) : .failure(e)
            }
            let source = UnsafeRawBufferPointer(rebasing: data[done..<done + count])
            switch location {
            case .memory(let memory):
                (memory + within).copyMemory(from: source.baseAddress!, byteCount: count)
            case .spilled(let spillOffset):
                if !pwriteAll(store.spillFD, source, at: spillOffset + UInt64(within)) {
                    return done > 0 ? .success(done) : .failure(Errno(errno))
                }
            }
            done += count
        }
        return .success(n)
    }

    /// Block `index`, made from the image's bytes on first use.
    private func block(_ index: UInt64, base: any BlockDevice) -> Result<CowStore.Location, Errno> {
        if let known = lock.withLock({ $0[index] }) { return .success(known) }
        let blockSize = CowStore.blockSize
        let location: CowStore.Location
        do throws(Errno) { location = try store.allocateBlock() } catch { return .failure(error) }
        // The image's bytes for the block; past the end of the disk, zeros.
        var original = [UInt8](repeating: 0, count: blockSize)
        do {
            _ = try original.withUnsafeMutableBytes { try base.read(into: $0, at: index * UInt64(blockSize)) }
        } catch {
            return .failure(Errno((error as? Qcow2Error)?.errno ?? EIO))
        }
        switch location {
        case .memory(let memory):
            original.withUnsafeBytes { memory.copyMemory(from: $0.baseAddress!, byteCount: blockSize) }
        case .spilled(let offset):
            let ok = original.withUnsafeBytes { pwriteAll(store.spillFD, $0, at: offset) }
            guard ok else { return .failure(Errno(errno)) }
        }
        // Another writer may have made the block meanwhile: theirs wins, ours is never used (a
        // memory block goes back; a spill slot stays unused, bounded by such races).
        let winner = lock.withLock { blocks -> CowStore.Location in
            if let theirs = blocks[index] { return theirs }
            blocks[index] = location
            return location
        }
        if case .memory(let ours) = location, case .memory(let theirs) = winner, ours != theirs {
            ours.deallocate()
            store.memoryUsed.subtract(blockSize, ordering: .relaxed)
        }
        return .success(winner)
    }

    /// The reply for a read: overlay blocks where written, the image's plan elsewhere.
    func read(at offset: UInt64, length: Int, base: any BlockDevice) throws -> ReadData {
        let blockSize = UInt64(CowStore.blockSize)
        var segments: [ReadData.Segment] = []
        var plans: [ReadPlan] = []
        var pos = offset
        let end = offset + UInt64(length)
        var pendingStart: UInt64?
        func flushBase(upTo limit: UInt64) throws {
            guard let start = pendingStart else { return }
            let plan = try base.plan(at: start, length: Int(limit - start)).readingRemoteRuns()
            segments += PoolFileSystem.replySegments(plan)
            plans.append(plan)
            pendingStart = nil
        }
        let spillFD = store.spillFD
        while pos < end {
            let index = pos / blockSize
            let blockEnd = min(end, (index + 1) * blockSize)
            let within = pos - index * blockSize
            let count = Int(blockEnd - pos)
            switch lock.withLock({ $0[index] }) {
            case nil:
                if pendingStart == nil { pendingStart = pos }
            case .memory(let memory)?:
                try flushBase(upTo: pos)
                segments.append(.memory(UnsafeRawBufferPointer(start: memory + Int(within), count: count)))
            case .spilled(let spillOffset)?:
                try flushBase(upTo: pos)
                segments.append(.file(fd: spillFD, offset: spillOffset + within, length: count))
            }
            pos = blockEnd
        }
        try flushBase(upTo: end)
        return ReadData(segments: segments, owner: plans)
    }

    func freeMemory() {
        for case .memory(let memory) in lock.withLock({ Array($0.values) }) { memory.deallocate() }
    }
}

/// pwrite(2) of all of `bytes`, retrying short writes and EINTR.
func pwriteAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer, at offset: UInt64) -> Bool {
    var done = 0
    while done < bytes.count {
        let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
        if n < 0 {
            if errno == EINTR { continue }
            return false
        }
        done += n
    }
    return true
}
