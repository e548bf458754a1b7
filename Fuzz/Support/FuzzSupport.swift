#if canImport(Glibc)
import Glibc
#endif
import CFuzzDriver

/// The fuzz target's main: hands the command line to libFuzzer's driver, which runs the target's
/// `LLVMFuzzerTestOneInput`.
public func runLibFuzzer() -> Never {
    exit(poolfs_run_libfuzzer(CommandLine.argc, CommandLine.unsafeArgv))
}

/// What every libFuzzer target shares: a private scratch directory for the files an input
/// becomes, and a reader that takes parameters (offsets, lengths) from the input's bytes.
///
/// Files are written as new inodes each time (unlink, then create), so that an image object left
/// over from a previous input, or a background decode it started, never sees the next input.
public final class FuzzDirectory: @unchecked Sendable {
    // SAFETY: `path` is set once in init; libFuzzer runs one input at a time.
    public let path: String

    /// A fresh directory under $POOLFS_FUZZ_TMP, /dev/shm or /tmp, removed at exit.
    public init() {
        let base = getenv("POOLFS_FUZZ_TMP").map { String(cString: $0) }
            ?? (access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp")
        var template = Array((base + "/poolfs-fuzz-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { fatalError("mkdtemp in \(base): errno \(errno)") }
        path = String(cString: made)
        FuzzDirectory.made.append(path)
        if FuzzDirectory.made.count == 1 {
            atexit {
                for dir in FuzzDirectory.made {
                    if let entries = opendir(dir) {
                        while let entry = readdir(entries) {
                            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
                            if name != "." && name != ".." { unlink(dir + "/" + name) }
                        }
                        closedir(entries)
                    }
                    rmdir(dir)
                }
            }
        }
    }

    nonisolated(unsafe) private static var made: [String] = []

    public func file(_ name: String) -> String { path + "/" + name }

    /// Writes `bytes` as a new file `name` (replacing any), optionally grown to `size` (sparse).
    @discardableResult
    public func write(_ name: String, _ bytes: UnsafeRawBufferPointer, size: UInt64? = nil) -> String {
        let full = file(name)
        unlink(full)
        let fd = open(full, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0o600)
        guard fd >= 0 else { fatalError("create \(full): errno \(errno)") }
        var done = 0
        while done < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done)
            guard n > 0 else { fatalError("write \(full): errno \(errno)") }
            done += n
        }
        if let size, size > UInt64(bytes.count) { guard ftruncate(fd, off_t(size)) == 0 else { fatalError("ftruncate \(full): errno \(errno)") } }
        close(fd)
        return full
    }

    @discardableResult
    public func write(_ name: String, _ bytes: [UInt8], size: UInt64? = nil) -> String {
        bytes.withUnsafeBytes { write(name, $0, size: size) }
    }

    /// A file of `size` bytes whose every 8-byte word holds its own offset (so misplaced reads
    /// show), sparse past `patterned` bytes.
    @discardableResult
    public func patternFile(_ name: String, size: UInt64, patterned: Int = 1 << 20) -> String {
        let n = Int(min(size, UInt64(patterned))) & ~7
        var bytes = [UInt8](repeating: 0, count: n)
        bytes.withUnsafeMutableBytes { raw in
            for word in 0..<(n / 8) { raw.storeBytes(of: (UInt64(word * 8) | 0xA5 << 56).littleEndian, toByteOffset: word * 8, as: UInt64.self) }
        }
        return write(name, bytes, size: size)
    }
}

/// Takes little-endian integers from the front of an input; past its end every value is 0.
public struct FuzzInput {
    public let bytes: UnsafeRawBufferPointer
    public private(set) var position = 0

    public init(_ data: UnsafePointer<UInt8>?, _ size: Int) {
        bytes = UnsafeRawBufferPointer(start: data, count: data == nil ? 0 : size)
    }

    public init(_ bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

    public var remaining: Int { bytes.count - position }

    public mutating func u8() -> UInt8 {
        guard position < bytes.count else { return 0 }
        defer { position += 1 }
        return bytes[position]
    }

    public mutating func u16() -> UInt16 { UInt16(u8()) | UInt16(u8()) << 8 }
    public mutating func u32() -> UInt32 { UInt32(u16()) | UInt32(u16()) << 16 }
    public mutating func u64() -> UInt64 { UInt64(u32()) | UInt64(u32()) << 32 }

    /// The next `count` bytes (fewer at the end).
    public mutating func take(_ count: Int) -> UnsafeRawBufferPointer {
        let n = max(0, min(count, remaining))
        defer { position += n }
        return UnsafeRawBufferPointer(rebasing: bytes[position..<position + n])
    }

    /// Everything not taken yet.
    public mutating func rest() -> UnsafeRawBufferPointer { take(remaining) }
}

/// Stops the run with the input saved: an error that is not one of the parser's typed errors
/// (each parser says what is wrong and where with its own error type).
public func untypedError(_ error: any Error, _ target: String) -> Never {
    fatalError("\(target): untyped error \(type(of: error)): \(error)")
}

/// Stops the run with the input saved: a result that contradicts what the input made certain.
public func fuzzCheck(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String,
                      file: StaticString = #fileID, line: UInt = #line) {
    if !condition() { fatalError(message(), file: file, line: line) }
}
