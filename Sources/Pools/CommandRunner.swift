#if canImport(Glibc)
import Glibc
#endif
import CHostIO
import Foundation

/// Runs the external commands pool adapters need (lvs, pvs, zfs...). Every adapter takes one, so
/// tests can replay recorded output through a fake.
public protocol CommandRunner: Sendable {
    /// Runs `arguments` (the first is the program, looked up in PATH); returns its stdout, or
    /// throws `CommandError` when it cannot start, exits non-zero or outlives its time limit.
    func run(_ arguments: [String]) throws -> String
    /// The same with its own time limit, for a command whose work grows with the data (merging a
    /// snapshot into its origin). Runners without limits ignore it.
    func run(_ arguments: [String], timeout: Double) throws -> String
}

extension CommandRunner {
    public func run(_ arguments: [String], timeout: Double) throws -> String { try run(arguments) }
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

/// Runs commands for real, each within `timeout` seconds: one that outlives it is killed
/// (SIGKILL) and fails, so no caller waits on a stuck lvm or zfs command for ever. The command
/// inherits no descriptor but its output files (`poolfs_spawn`), and its output goes to unlinked
/// temporary files rather than pipes: a daemon it leaves behind (dmeventd, lvmpolld) could keep
/// a pipe open, and reading it to its end would then never return. LVM's warnings about
/// inherited descriptors are silenced; its other messages stay in the error.
public struct SystemCommandRunner: CommandRunner {
    public let timeout: Double

    public init(timeout: Double = 60) {
        self.timeout = timeout
    }

    public func run(_ arguments: [String]) throws -> String {
        try run(arguments, timeout: timeout)
    }

    public func run(_ arguments: [String], timeout: Double) throws -> String {
        let commandLine = arguments.map { $0.contains(" ") ? "'\($0)'" : $0 }.joined(separator: " ")
        func failure(_ why: String) -> CommandError { CommandError(commandLine: commandLine, status: -1, stderr: why) }
        guard !arguments.isEmpty else { throw failure("no command") }
        let out: FileHandle, err: FileHandle
        do {
            out = try Self.anonymousFile()
            err = try Self.anonymousFile()
        } catch {
            throw failure("cannot make an output file: \(error)")
        }
        var environment = ProcessInfo.processInfo.environment
        environment["LVM_SUPPRESS_FD_WARNINGS"] = "1"
        environment["LC_ALL"] = "C"
        let args = Self.packed(arguments), env = Self.packed(environment.map { "\($0.key)=\($0.value)" })
        var pid: Int32 = 0
        let spawned = poolfs_spawn(args, Int32(arguments.count), env, Int32(environment.count),
                                   out.fileDescriptor, err.fileDescriptor, &pid)
        guard spawned == 0 else { throw failure("cannot start \(arguments[0]): \(String(cString: strerror(spawned)))") }
        var status: Int32 = 0
        if poolfs_wait(pid, Int32(timeout * 1000), &status) != 0 {
            kill(pid, SIGKILL)
            // SIGKILL cannot be ignored; a process stuck in the kernel is left behind after a bound.
            _ = poolfs_wait(pid, 5000, &status)
            throw failure("did not finish within \(Int(timeout)) seconds and was killed")
        }
        guard status == 0 else {
            throw CommandError(commandLine: commandLine, status: status, stderr: Self.contents(of: err))
        }
        return Self.contents(of: out)
    }

    /// Strings one after another, each ended by a NUL, as `poolfs_spawn` takes them.
    static func packed(_ strings: [String]) -> [CChar] {
        strings.flatMap { $0.utf8CString }
    }

    /// A file in /tmp (or TMPDIR) that is unlinked at once: it goes away with its last descriptor.
    static func anonymousFile() throws -> FileHandle {
        let directory = ProcessInfo.processInfo.environment["TMPDIR"] ?? "/tmp"
        var template = Array((directory + "/poolfs-cmd-XXXXXX").utf8CString)
        let fd = mkstemp(&template)
        guard fd >= 0 else { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        unlink(String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self))
        return FileHandle(fileDescriptor: fd, closeOnDealloc: true)
    }

    static func contents(of file: FileHandle) -> String {
        (try? file.seek(toOffset: 0)).flatMap { _ in try? file.readToEnd() }.map { String(decoding: $0, as: UTF8.self) } ?? ""
    }
}
