/// What a read of a virtual range resolves to, decided under no lock and carried out by the
/// caller: runs of host file bytes, zeros, and decoded (compressed) cluster bytes. The FUSE layer
/// turns host runs into zero-copy spliced replies; `execute` copies into a buffer.
public struct ReadPlan: Sendable {
    public enum Segment: Sendable {
        case host(HostFile, offset: UInt64, length: Int)
        case zero(length: Int)
        case bytes(CachedBlock, start: Int, length: Int)

        public var length: Int {
            switch self {
            case .host(_, _, let n), .zero(let n), .bytes(_, _, let n): return n
            }
        }
    }

    public private(set) var segments: [Segment] = []
    public private(set) var length = 0

    public init() {}

    /// Host bytes; a run that crosses the end of the file reads zeros past it, as QEMU does (the
    /// last cluster of an image may end past the end of the file). Callers decide whether a run
    /// that starts past the end is legitimate (`Qcow2View.checkInsideFile`).
    public mutating func appendHost(_ file: HostFile, offset: UInt64, length n: Int) {
        guard n > 0 else { return }
        let inside = offset >= file.size ? 0 : Int(min(UInt64(n), file.size - offset))
        if inside > 0 {
            if case .host(let f, let o, let m)? = segments.last, f === file, o + UInt64(m) == offset {
                segments[segments.count - 1] = .host(f, offset: o, length: m + inside)
            } else {
                segments.append(.host(file, offset: offset, length: inside))
            }
            length += inside
        }
        appendZero(n - inside)
    }

    public mutating func appendZero(_ n: Int) {
        guard n > 0 else { return }
        if case .zero(let m)? = segments.last {
            segments[segments.count - 1] = .zero(length: m + n)
        } else {
            segments.append(.zero(length: n))
        }
        length += n
    }

    /// `length` bytes from `start` of `count` bytes that `fill` reads into memory now (a network
    /// read of the whole blocks that cover the range).
    public mutating func appendRead(count: Int, start: Int, length n: Int,
                                    fill: (UnsafeMutableRawBufferPointer) throws -> Void) rethrows {
        precondition(start >= 0 && n >= 0 && start + n <= count, "read range outside its buffer")
        guard n > 0 else { return }
        appendBytes(try CachedBlock(count: count, fill: fill), start: start, length: n)
    }

    mutating func appendBytes(_ block: CachedBlock, start: Int, length n: Int) {
        guard n > 0 else { return }
        segments.append(.bytes(block, start: start, length: n))
        length += n
    }

    /// Whether any host run reads a block device.
    public var readsBlockDevice: Bool {
        segments.contains { segment in
            if case .host(let file, _, _) = segment { return file.isBlockDevice }
            return false
        }
    }

    /// Whether any host run reads a file of a network share, which has no descriptor to splice
    /// from: the reply is copied (`execute`).
    public var readsRemoteFile: Bool {
        segments.contains { segment in
            if case .host(let file, _, _) = segment { return file.isRemote }
            return false
        }
    }

    /// The plan with every run of a network file read now into memory: such a file has no
    /// descriptor the FUSE reply could splice from, and a failing server then fails the read
    /// here, where it is logged and answered with EIO.
    public func readingRemoteRuns() throws(Qcow2Error) -> ReadPlan {
        guard readsRemoteFile else { return self }
        var plan = ReadPlan()
        for segment in segments {
            switch segment {
            case .host(let file, let offset, let n) where file.isRemote:
                var failure: Qcow2Error?
                let block = CachedBlock(count: n) { buffer in
                    do throws(Qcow2Error) { try file.read(into: buffer, at: offset) } catch { failure = error }
                }
                if let failure { throw failure }
                plan.appendBytes(block, start: 0, length: n)
            default:
                plan.segments.append(segment)
                plan.length += segment.length
            }
        }
        return plan
    }

    /// Copies the planned bytes into `buffer`, which must hold `length` bytes.
    public func execute(into buffer: UnsafeMutableRawBufferPointer) throws(Qcow2Error) {
        precondition(buffer.count >= length, "read buffer smaller than its plan")
        var at = 0
        for segment in segments {
            let target = UnsafeMutableRawBufferPointer(rebasing: buffer[at..<at + segment.length])
            switch segment {
            case .host(let file, let offset, _):
                try file.read(into: target, at: offset)
            case .zero:
                target.initializeMemory(as: UInt8.self, repeating: 0)
            case .bytes(let block, let start, let n):
                target.copyMemory(from: UnsafeRawBufferPointer(rebasing: block.bytes[start..<start + n]))
            }
            at += segment.length
        }
    }
}

/// One entry of an allocation map, with the fields and meaning of `qemu-img map --output=json`.
public struct MapExtent: Equatable, Sendable, CustomStringConvertible {
    public var start: UInt64
    public var length: UInt64
    /// How many backing files down the data lives; 0 for ranges allocated nowhere.
    public var depth: Int
    /// Allocated in some layer of the chain.
    public var present: Bool
    /// Reads as zeros.
    public var zero: Bool
    /// Backed by stored data (possibly over a host hole, then also `zero`).
    public var data: Bool
    /// Host offset in the layer's data file, where QEMU reports one for data.
    public var offset: UInt64?

    public init(start: UInt64, length: UInt64, depth: Int, present: Bool, zero: Bool, data: Bool, offset: UInt64? = nil) {
        self.start = start; self.length = length; self.depth = depth
        self.present = present; self.zero = zero; self.data = data; self.offset = offset
    }

    public var description: String {
        "{start \(start) length \(length) depth \(depth) present \(present) zero \(zero) data \(data) offset \(offset.map(String.init) ?? "-")}"
    }

    /// Whether `next` continues this extent as QEMU would merge it.
    func continues(with next: MapExtent) -> Bool {
        guard start + length == next.start, depth == next.depth, present == next.present,
              zero == next.zero, data == next.data else { return false }
        switch (offset, next.offset) {
        case (nil, nil): return true
        case let (a?, b?): return a + length == b
        default: return false
        }
    }
}

extension Array where Element == MapExtent {
    public mutating func appendMerging(_ extent: MapExtent) {
        guard extent.length > 0 else { return }
        if let last = last, last.continues(with: extent) {
            self[count - 1].length += extent.length
        } else {
            append(extent)
        }
    }
}
