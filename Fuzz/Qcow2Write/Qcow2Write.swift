// libFuzzer target: the qcow2 writer. The input is a 64-byte program (four operations of 16
// bytes) followed by an image file. The image is opened for writing with the engine's normal
// API; each operation writes a pattern, zeroes a range or flushes, then the writer is closed.
// Every call must succeed or throw a `Qcow2Error`. When all of them succeed, the image must read
// back what was written: through the writer's own image before closing, and reopened afterwards.
//
// Operation (16 bytes, little-endian): byte 0 kind (mod 4: write, write, zero, flush), byte 1
// pattern, bytes 2...7 unused, bytes 8...11 offset (× 512, mod the disk size), bytes 12...15
// length (mod 256 KiB, + 1, clipped to the disk). Backing and data files as in FuzzQcow2Read.
import FuzzSupport
import Glibc
@testable import Block

let scratch = FuzzDirectory()
nonisolated(unsafe) var prepared = false

struct Operation {
    enum Kind { case write(UInt8), zero, flush }
    var kind: Kind
    var offset: UInt64
    var length: UInt64
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    if !prepared {
        scratch.patternFile("backing.raw", size: 3 << 20, patterned: 256 << 10)
        prepared = true
    }
    var input = FuzzInput(data, size)
    let program = FuzzInput(input.take(64))
    let imageBytes = input.rest()
    let names = referencedFiles(imageBytes)
    guard names.allSatisfy(isLocalName) else { return -1 }
    let path = scratch.write("image.qcow2", imageBytes)
    if names.contains("copy.qcow2") { scratch.write("copy.qcow2", imageBytes) }
    scratch.patternFile("data.raw", size: 4 << 20, patterned: 64 << 10)
    do {
        let image = try Image.open(path: path, cache: BlockCache(capacityBytes: 64 << 10, shardCount: 1), writable: true)
        let operations = decode(program, diskSize: image.virtualSize)
        let writer = try image.makeWriter()
        var failed = false
        for operation in operations {
            do {
                try apply(operation, to: writer)
            } catch is Qcow2Error {
                failed = true
            }
        }
        if !failed { try verify(operations, image.live, when: "before close") }
        do { try writer.close() } catch is Qcow2Error { failed = true }
        if !failed {
            let reopened = try Image.open(path: path, cache: BlockCache(capacityBytes: 1 << 20))
            try verify(operations, reopened.live, when: "reopened after close")
        }
    } catch is Qcow2Error {
    } catch {
        untypedError(error, "qcow2 write")
    }
    return 0
}

func decode(_ program: FuzzInput, diskSize: UInt64) -> [Operation] {
    var program = program
    var operations: [Operation] = []
    for _ in 0..<4 {
        let kind = program.u8(), pattern = program.u8()
        _ = program.take(6)
        let offset = diskSize == 0 ? 0 : (UInt64(program.u32()) * 512) % diskSize
        let length = min(UInt64(program.u32() % (256 << 10)) + 1, diskSize - offset)
        switch kind % 4 {
        case 0, 1: operations.append(Operation(kind: .write(pattern), offset: offset, length: length))
        case 2: operations.append(Operation(kind: .zero, offset: offset, length: length))
        default: operations.append(Operation(kind: .flush, offset: 0, length: 0))
        }
    }
    return operations
}

func apply(_ operation: Operation, to writer: any VolumeWriter) throws {
    switch operation.kind {
    case .write(let pattern):
        guard operation.length > 0 else { return }
        var bytes = [UInt8](repeating: 0, count: Int(operation.length))
        bytes.withUnsafeMutableBytes { fill($0, at: operation.offset, pattern: pattern) }
        try bytes.withUnsafeBytes { try writer.write($0, at: operation.offset) }
    case .zero:
        guard operation.length > 0 else { return }
        try writer.zero(at: operation.offset, length: operation.length)
    case .flush:
        try writer.flush()
    }
}

/// What a write with each pattern puts on the disk: byte `at` of the disk is
/// `period[(at + 509 × pattern) % 8192]`, never 0, so a lost write shows.
let period: [UInt8] = (0..<16384).map { i in UInt8(truncatingIfNeeded: (i % 8192) &* 31 &+ (i % 8192) >> 7) | 1 }

/// Fills `buffer` with what a write of `pattern` at disk offset `at` writes (copies of the period).
func fill(_ buffer: UnsafeMutableRawBufferPointer, at: UInt64, pattern: UInt8) {
    period.withUnsafeBytes { source in
        var done = 0
        while done < buffer.count {
            let phase = Int((at + UInt64(done) + 509 * UInt64(pattern)) % 8192)
            let n = min(8192, buffer.count - done)
            UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + n])
                .copyMemory(from: UnsafeRawBufferPointer(rebasing: source[phase..<phase + n]))
            done += n
        }
    }
}

/// Reads each written range back and compares it with what the last operation over each byte put there.
func verify(_ operations: [Operation], _ device: any BlockDevice, when: String) throws {
    for operation in operations where operation.length > 0 {
        if case .flush = operation.kind { continue }
        let got = try device.read(at: operation.offset, count: Int(operation.length))
        fuzzCheck(got.count == Int(operation.length), "\(when): read of \(operation.length) bytes at \(operation.offset) returned \(got.count)")
        var expected = [UInt8](repeating: 0, count: got.count)
        expected.withUnsafeMutableBytes { expected in
            for o in operations where o.length > 0 {
                let start = max(o.offset, operation.offset), end = min(o.offset + o.length, operation.offset + operation.length)
                guard start < end else { continue }
                let slice = UnsafeMutableRawBufferPointer(rebasing: expected[Int(start - operation.offset)..<Int(end - operation.offset)])
                switch o.kind {
                case .write(let pattern): fill(slice, at: start, pattern: pattern)
                case .zero: slice.initializeMemory(as: UInt8.self, repeating: 0)
                case .flush: break
                }
            }
        }
        let same = got.withUnsafeBytes { a in expected.withUnsafeBytes { b in memcmp(a.baseAddress!, b.baseAddress!, a.count) == 0 } }
        if !same {
            let i = got.indices.first { got[$0] != expected[$0] }!
            fatalError("\(when): byte \(operation.offset + UInt64(i)) reads \(got[i]), not the \(expected[i]) written there")
        }
    }
}
