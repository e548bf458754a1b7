import Foundation
import Synchronization

/// Runs the external commands pool adapters need (lvs, pvs, zfs...). Every adapter takes one, so
/// tests can replay recorded output through a fake.
public protocol CommandRunner: Sendable {
    /// Runs `arguments` (the first is the program, looked up in PATH); returns its stdout, or
    /// throws `CommandError` when it cannot start or exits non-zero.
    func run(_ arguments: [String]) throws -> String
}

/// A failed command, with everything a user needs to see what happened.
public struct CommandError: Error, Equatable, CustomStringConvertible {
    public var commandLine: String
    public var status: Int32
    public var stderr: String

    public init(commandLine: String, status: Int32, stderr: String) {
        self.commandLine = commandLine
        self.status = status
        self.stderr = stderr
    }

    public var description: String {
        let detail = stderr.trimmingCharacters(in: .whitespacesAndNewlines)
        return "`\(commandLine)` exited with status \(status)" + (detail.isEmpty ? "" : ": \(detail)")
    }
}

/// Runs commands for real. LVM's warnings about inherited descriptors are silenced; its other
/// messages stay in the error.
public struct SystemCommandRunner: CommandRunner {
    public init() {}

    public func run(_ arguments: [String]) throws -> String {
        let commandLine = arguments.map { $0.contains(" ") ? "'\($0)'" : $0 }.joined(separator: " ")
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = arguments
        var environment = ProcessInfo.processInfo.environment
        environment["LVM_SUPPRESS_FD_WARNINGS"] = "1"
        environment["LC_ALL"] = "C"
        process.environment = environment
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        do {
            try process.run()
        } catch {
            throw CommandError(commandLine: commandLine, status: -1, stderr: "\(error)")
        }
        // Read both pipes to the end before waiting, so a chatty command cannot block on a full pipe.
        let group = DispatchGroup()
        let stderrBox = Mutex(Data())
        DispatchQueue.global().async(group: group) {
            let data = err.fileHandleForReading.readDataToEndOfFile()
            stderrBox.withLock { $0 = data }
        }
        let stdoutData = out.fileHandleForReading.readDataToEndOfFile()
        group.wait()
        let stderrData = stderrBox.withLock { $0 }
        process.waitUntilExit()
        guard process.terminationStatus == 0 else {
            throw CommandError(commandLine: commandLine, status: process.terminationStatus,
                               stderr: String(decoding: stderrData, as: UTF8.self))
        }
        return String(decoding: stdoutData, as: UTF8.self)
    }
}
