/// Byte ranges `start..<start + length`, in order, adjacent ones merged: how the tests compare
/// allocation maps (`qemu-img map`, `rbd diff`) with SEEK_DATA/SEEK_HOLE.
public func mergedRanges(_ extents: [(start: UInt64, length: UInt64)]) -> [Range<UInt64>] {
    var ranges: [Range<UInt64>] = []
    for (start, length) in extents {
        let end = start + length
        if let last = ranges.last, last.upperBound == start {
            ranges[ranges.count - 1] = last.lowerBound..<end
        } else {
            ranges.append(start..<end)
        }
    }
    return ranges
}
