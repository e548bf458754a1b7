import Synchronization

/// Writes into the live disk of an image whose top file was opened writable (`Image.open` with
/// `writable: true`). Reads through the image see every write at once. Writes are serialized per
/// image; each call checks its range against the disk size.
public protocol VolumeWriter: AnyObject, Sendable {
    /// Writes `data` at `offset`.
    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws
    /// Makes the range read as zeros, freeing its storage where the format can.
    func zero(at offset: UInt64, length: UInt64) throws
    /// Puts everything written so far on stable storage (fsync).
    func flush() throws
    /// Flushes, marks the image clean and gives back the write lock. Later calls fail.
    func close() throws
}

extension Image {
    /// Takes QEMU's write lock on the top file and returns its writer. The image must have been
    /// opened with `writable: true`.
    public func makeWriter() throws -> any VolumeWriter {
        let top = hostFiles.first ?? (live as? RawImage)?.file
        guard let top, top.writable else { throw Qcow2Error.writeRefused("\(path) was opened read-only") }
        switch format {
        case .raw:
            try top.lockForWriting()
            return RawWriter(file: top)
        case .qcow2:
            return try Qcow2Writer(image: qcow2!)
        default:
            throw Qcow2Error.readOnlyFormat("\(path) is a \(format.rawValue) image, which poolfs reads but does not write; mount with -o cow for a writable view")
        }
    }
}

/// Raw images: writes go straight to the file.
final class RawWriter: VolumeWriter {
    let file: HostFile
    let size: UInt64
    private let closed = Atomic<Bool>(false)

    init(file: HostFile) {
        self.file = file
        self.size = file.size
    }

    func check(_ offset: UInt64, _ length: UInt64) throws {
        guard !closed.load(ordering: .relaxed) else { throw Qcow2Error.writeRefused("\(file.path) is closed for writing") }
        guard offset <= size, length <= size - offset else {
            throw Qcow2Error.writeRefused("\(length) bytes at \(offset) run past the end of the disk (\(size) bytes)")
        }
    }

    func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) throws {
        try check(offset, UInt64(data.count))
        try file.write(data, at: offset)
    }

    func zero(at offset: UInt64, length: UInt64) throws {
        try check(offset, length)
        if !file.punchHole(at: offset, length: length) { try file.zero(at: offset, length: length) }
    }

    func flush() throws {
        try file.syncData()
    }

    func close() throws {
        guard !closed.exchange(true, ordering: .relaxed) else { return }
        defer { file.unlockWriting() }
        try file.syncData()
    }
}
