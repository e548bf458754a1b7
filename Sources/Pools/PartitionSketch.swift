import CBlkid
import Glibc
import Block

/// The file libblkid probes in place of a volume: a `memfd_create` file as large as the device,
/// holes everywhere except the ranges copied in from the device. libblkid reads only a file
/// descriptor (lseek + read, size from fstat: a memfd is a regular file), and most volumes here
/// are not files, so the partition reader copies in what libblkid will look at and nothing more.
/// One thread uses a sketch; it closes its descriptor when released.
final class PartitionSketch {
    let fd: Int32
    let device: any BlockDevice
    /// Bytes copied in so far, and the most that may be.
    private(set) var copiedBytes: UInt64 = 0
    let budget: UInt64
    /// Whether a range was cut short because the budget ran out.
    private(set) var exhausted = false
    /// Device ranges already looked at (copied, or found to be holes), sorted and disjoint.
    private var visited: [Range<UInt64>] = []

    init(_ device: any BlockDevice, budget: UInt64) throws(PartitionTableError) {
        self.device = device
        self.budget = budget
        let fd = cblkid_memfd_create("poolfs-partitions")
        guard fd >= 0 else { throw .system(errno: errno, call: "memfd_create") }
        self.fd = fd
        guard device.size <= UInt64(Int64.max), ftruncate(fd, off_t(device.size)) == 0 else {
            let error = device.size > UInt64(Int64.max) ? EFBIG : errno
            close(fd)
            throw .system(errno: error, call: "ftruncate")
        }
    }

    deinit { close(fd) }

    /// Copies the allocated bytes of `range` (clipped to the device) not looked at before; whether
    /// anything new was looked at. Holes and zero extents stay holes in the sketch.
    @discardableResult
    func copy(_ range: Range<UInt64>) throws -> Bool {
        let clipped = min(range.lowerBound, device.size)..<min(range.upperBound, device.size)
        var grew = false
        for piece in unvisited(clipped) {
            guard !exhausted else { return grew }
            var extents: [MapExtent] = []
            try device.status(at: piece.lowerBound, length: UInt64(piece.count), detection: .metadataOnly, into: &extents)
            for extent in extents where extent.data && !extent.zero {
                let start = max(extent.start, piece.lowerBound)
                let end = min(extent.start + extent.length, piece.upperBound)
                guard start < end else { continue }
                let room = budget - copiedBytes
                let n = min(end - start, room)
                try transfer(start..<start + n)
                if n < end - start {
                    exhausted = true
                    markVisited(piece.lowerBound..<start + n)
                    return true
                }
            }
            markVisited(piece)
            grew = true
        }
        return grew
    }

    /// Reads the range from the device and writes it at the same offset of the memfd.
    private func transfer(_ range: Range<UInt64>) throws {
        let chunk = 1 << 20
        var buffer = [UInt8](repeating: 0, count: chunk)
        var at = range.lowerBound
        while at < range.upperBound {
            let n = Int(min(UInt64(chunk), range.upperBound - at))
            let got = try buffer.withUnsafeMutableBytes { try device.read(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n]), at: at) }
            let written = buffer.withUnsafeBytes { writeAll(UnsafeRawBufferPointer(rebasing: $0[0..<got]), at: at) }
            guard written == 0 else { throw PartitionTableError.system(errno: written, call: "pwrite") }
            copiedBytes += UInt64(got)
            at += UInt64(n)
        }
    }

    /// pwrite(2) of all of `bytes` at `offset` of the memfd, retried on EINTR; 0 or an errno value.
    private func writeAll(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) -> Int32 {
        var done = 0
        while done < bytes.count {
            let w = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            if w < 0, errno == EINTR { continue }
            guard w > 0 else { return w < 0 ? errno : EIO }
            done += w
        }
        return 0
    }

    /// The parts of `range` not visited yet, in order.
    private func unvisited(_ range: Range<UInt64>) -> [Range<UInt64>] {
        var pieces: [Range<UInt64>] = []
        var at = range.lowerBound
        for seen in visited where seen.upperBound > at && seen.lowerBound < range.upperBound {
            if seen.lowerBound > at { pieces.append(at..<seen.lowerBound) }
            at = max(at, seen.upperBound)
        }
        if at < range.upperBound { pieces.append(at..<range.upperBound) }
        return pieces
    }

    private func markVisited(_ range: Range<UInt64>) {
        guard !range.isEmpty else { return }
        var merged = range
        var kept: [Range<UInt64>] = []
        for seen in visited {
            if seen.upperBound < merged.lowerBound || seen.lowerBound > merged.upperBound {
                kept.append(seen)
            } else {
                merged = min(seen.lowerBound, merged.lowerBound)..<max(seen.upperBound, merged.upperBound)
            }
        }
        kept.append(merged)
        visited = kept.sorted { $0.lowerBound < $1.lowerBound }
    }
}
