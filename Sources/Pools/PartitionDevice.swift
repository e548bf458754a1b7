import Block

/// A partition as a disk of its own: the window `start ..< start + size` of another device.
/// Reads forward the parent's plan for the shifted range (host runs stay host runs, so spliced
/// FUSE replies stay zero-copy); status extents are re-based to the window, with the host
/// `offset` as the parent reports it.
public struct PartitionDevice: BlockDevice {
    public enum WindowError: Error, Equatable, CustomStringConvertible {
        case outside(start: UInt64, size: UInt64, deviceSize: UInt64)
        public var description: String {
            switch self {
            case .outside(let start, let size, let deviceSize):
                return "partition at byte \(start), \(size) bytes long, runs past the end of its \(deviceSize)-byte device"
            }
        }
    }

    public let parent: any BlockDevice
    public let start: UInt64
    public let size: UInt64

    public init(_ parent: any BlockDevice, start: UInt64, size: UInt64) throws(WindowError) {
        guard start <= parent.size, size <= parent.size - start else {
            throw .outside(start: start, size: size, deviceSize: parent.size)
        }
        self.parent = parent
        self.start = start
        self.size = size
    }

    public init(_ parent: any BlockDevice, partition: Partition) throws(WindowError) {
        try self.init(parent, start: partition.start, size: partition.size)
    }

    public func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        try parent.plan(at: start + offset, length: length, into: &plan)
    }

    public func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        var below: [MapExtent] = []
        try parent.status(at: start + offset, length: length, detection: detection, into: &below)
        for var extent in below {
            extent.start -= start
            extents.appendMerging(extent)
        }
    }
}
