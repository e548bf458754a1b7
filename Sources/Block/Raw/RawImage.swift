/// A raw image: the file is the disk.
public final class RawImage: BlockDevice {
    public let file: HostFile
    public var size: UInt64 { file.size }

    public init(file: HostFile) { self.file = file }

    public func plan(at offset: UInt64, length: Int, into plan: inout ReadPlan) throws {
        plan.appendHost(file, offset: offset, length: length)
    }

    public func status(at offset: UInt64, length: UInt64, detection: HoleDetection, into extents: inout [MapExtent]) throws {
        appendHostStatus(file, guest: offset, host: offset, length: length, depth: 0, holeIsData: false, into: &extents)
    }
}
