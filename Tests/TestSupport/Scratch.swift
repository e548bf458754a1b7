import Foundation

/// A temporary directory for one test, removed when the test ends. Shell commands run inside it;
/// a missing tool (qemu-img, qemu-io) fails the test with its exit status, never skips it.
public final class Scratch {
    public let dir: String

    public init() throws {
        var template = Array(("/tmp/poolfs-test-XXXXXX").utf8CString)
        guard let made = mkdtemp(&template) else { throw ShellError(command: "mkdtemp", status: errno, output: "") }
        dir = String(cString: made)
    }

    deinit { try? FileManager.default.removeItem(atPath: dir) }

    public func path(_ name: String) -> String { dir + "/" + name }

    @discardableResult
    public func sh(_ command: String) throws -> String {
        try Shell.run(command, in: dir)
    }

    /// Runs `command` like `sh`, for a command that may fail: whether it succeeded, and its output.
    public func attempt(_ command: String) -> (ok: Bool, output: String) {
        do {
            return (true, try sh(command))
        } catch let error as ShellError {
            return (false, error.output)
        } catch {
            return (false, "\(error)")
        }
    }

    public func bytes(_ name: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: URL(fileURLWithPath: path(name))))
    }

    public func write(_ name: String, _ bytes: [UInt8]) throws {
        try Data(bytes).write(to: URL(fileURLWithPath: path(name)))
    }
}

public struct ShellError: Error, CustomStringConvertible {
    public var command: String
    public var status: Int32
    public var output: String
    public init(command: String, status: Int32, output: String) {
        self.command = command; self.status = status; self.output = output
    }
    public var description: String { "`\(command)` exited \(status): \(output)" }
}

public enum Shell {
    /// Runs `command` with /bin/sh in `dir`; throws with the output when it exits non-zero.
    public static func run(_ command: String, in dir: String) throws -> String {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", command]
        process.currentDirectoryURL = URL(fileURLWithPath: dir)
        let outFile = dir + "/.out-\(UUID().uuidString)"
        FileManager.default.createFile(atPath: outFile, contents: nil)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: outFile))
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
        process.waitUntilExit()
        try handle.close()
        let output = (try? String(contentsOfFile: outFile, encoding: .utf8)) ?? ""
        try? FileManager.default.removeItem(atPath: outFile)
        guard process.terminationStatus == 0 else {
            throw ShellError(command: command, status: process.terminationStatus, output: output)
        }
        return output
    }
}
