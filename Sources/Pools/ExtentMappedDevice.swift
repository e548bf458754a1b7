import Block

/// An LV read straight from its physical volumes, without device-mapper: each linear or striped
/// segment maps LV bytes to PV bytes at `pe_start + extent × extent_size`. This reads an LVM
/// disk inside an image, or a VG on a detached disk, without touching kernel state.
public final class ExtentMappedDevice: BlockDevice {
    struct Piece {
        var start: UInt64
        var size: UInt64
        var stripeSize: UInt64           // 0 for linear
        var stripes: [(file: HostFile, offset: UInt64)]
    }

    public enum MapError: Error, Equatable, CustomStringConvertible {
        case unsupportedSegment(volume: String, type: String)
        case missingPhysicalVolume(String)
        case inconsistent(volume: String, why: String)
        public var description: String {
            switch self {
            case .unsupportedSegment(let volume, let type):
                return "\(volume): \(type) segments can only be read through device-mapper"
            case .missingPhysicalVolume(let device):
                return "physical volume \(device) is not in the report or cannot be opened"
            case .inconsistent(let volume, let why):
                return "\(volume): \(why)"
            }
        }
    }

    public let size: UInt64
    let pieces: [Piece]

    /// `open` gives the HostFile of a PV device path (cached by the caller, so PVs open once).
    public init(volume: VolumeGroupReport.LogicalVolume, in group: VolumeGroupReport,
                open: (String) throws -> HostFile) throws {
        var pieces: [Piece] = []
        var covered: UInt64 = 0
        for segment in volume.segments.sorted(by: { $0.start < $1.start }) {
            guard segment.start == covered else {
                throw MapError.inconsistent(volume: volume.name, why: "segments leave a gap at byte \(covered)")
            }
            let stripeSize: UInt64
            switch segment.kind {
            case .linear: stripeSize = 0
            case .striped(let size): stripeSize = size
            case .other(let type): throw MapError.unsupportedSegment(volume: volume.name, type: type)
            }
            guard !segment.ranges.isEmpty else {
                throw MapError.inconsistent(volume: volume.name, why: "a segment has no extents")
            }
            // A linear segment reads one range from end to end; a striped one needs a chunk size.
            guard stripeSize != 0 || segment.ranges.count == 1 else {
                throw MapError.inconsistent(volume: volume.name, why: "a linear segment has \(segment.ranges.count) extent ranges")
            }
            let perStripe = segment.size / UInt64(segment.ranges.count)
            var stripes: [(HostFile, UInt64)] = []
            // Every number comes from the report: products and sums are checked, never trapped.
            for range in segment.ranges {
                guard let start = group.extentStart[range.device] else { throw MapError.missingPhysicalVolume(range.device) }
                let (count, countOverflow) = (range.lastExtent - range.firstExtent).addingReportingOverflow(1)
                let (bytes, bytesOverflow) = count.multipliedReportingOverflow(by: group.extentSize)
                guard !countOverflow, !bytesOverflow, bytes == perStripe else {
                    throw MapError.inconsistent(volume: volume.name, why: "extents of \(range.device) do not match the segment size")
                }
                let file = try open(range.device)
                let (skip, skipOverflow) = range.firstExtent.multipliedReportingOverflow(by: group.extentSize)
                let (offset, offsetOverflow) = start.addingReportingOverflow(skip)
                guard !skipOverflow, !offsetOverflow, offset <= file.size, perStripe <= file.size - offset else {
                    throw MapError.inconsistent(volume: volume.name, why: "extents run past the end of \(range.device)")
                }
                stripes.append((file, offset))
            }
            if stripeSize != 0 {
                let (row, rowOverflow) = stripeSize.multipliedReportingOverflow(by: UInt64(stripes.count))
                guard !rowOverflow, perStripe % stripeSize == 0, segment.size % row == 0 else {
                    throw MapError.inconsistent(volume: volume.name, why: "stripe size \(stripeSize) does not divide the segment")
                }
            }
            pieces.append(Piece(start: segment.start, size: segment.size, stripeSize: stripeSize, stripes: stripes))
            let (end, endOverflow) = covered.addingReportingOverflow(segment.size)
            guard !endOverflow else {
                throw MapError.inconsistent(volume: volume.name, why: "segments run past 2^64 bytes")
            }
            covered = end
        }
        guard covered == volume.size else {
            throw MapError.inconsistent(volume: volume.name, why: "segments cover \(covered) of \(volume.size) bytes")
        }
        self.pieces = pieces
        self.size = covered
    }

    /// Calls `body` with each run of the range: the PV file, the offset on it, and the length.
    func forEachRun(at offset: UInt64, length: UInt64, _ body: (HostFile, UInt64, UInt64) throws -> Void) rethrows {
        var pos = offset
        let end = offset + length
        var index = pieces.firstIndex { $0.start + $0.size > pos } ?? pieces.count
        while pos < end, index < pieces.count {
            let piece = pieces[index]
            let inPiece = pos - piece.start
            let pieceEnd = min(end, piece.start + piece.size)
            if piece.stripeSize == 0 {
                try body(piece.stripes[0].file, piece.stripes[0].offset + inPiece, pieceEnd - pos)
                pos = pieceEnd
            } else {
                // Chunk c of the segment lives on stripe c mod n, as chunk c / n of that stripe.
                let n = UInt64(piece.stripes.count)
                let chunk = inPiece / piece.stripeSize
                let within = inPiece % piece.stripeSize
                let stripe = piece.stripes[Int(chunk % n)]
                let count = min(piece.stripeSize - within, pieceEnd - pos)
                try body(stripe.file, stripe.offset + (chunk / n) * piece.stripeSize + within, count)
                pos += count
            }
            if pos >= piece.start + piece.size { index += 1 }
        }
    }

    public func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        forEachRun(at: offset, length: UInt64(length)) { file, at, n in plan.appendHost(file, offset: at, length: Int(n)) }
    }

    /// Every byte of an LV is allocated; holes in PV files (sparse images) read as zeros.
    public func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        var guest = offset
        forEachRun(at: offset, length: length) { file, at, n in
            appendHostStatus(file, guest: guest, host: at, length: n, depth: 0, holeIsData: false, into: &extents)
            guest += n
        }
    }
}
