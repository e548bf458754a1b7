#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// A tgtd of the test's own: its own port, its own control socket (TGT_IPC_SOCKET, which tgtd
/// and tgtadm both read: tgtd makes `<path>.0`), its own directory; stopped by its pid.
public final class TestTarget {
    public static let iqn = "iqn.2026-01.org.poolfs.test:target"
    public let scratch: Scratch
    public let port: Int
    var socket: String { scratch.path("tgtd-ipc-\(port)") }
    private var process: Process?
    public var url: String { "iscsi://127.0.0.1:\(port)/\(Self.iqn)" }
    public var pid: Int32? { process?.processIdentifier }

    public init(scratch: Scratch) throws {
        self.scratch = scratch
        port = try Self.freePort()
        try start()
    }

    deinit { stop() }

    /// A port nothing listens on now (bound and released; tgtd binds it right after).
    public static func freePort() throws -> Int {
        let fd = Glibc.socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) == 0 && getsockname(fd, $0, &length) == 0 }
        }
        guard bound else { throw ShellError(command: "bind", status: errno, output: "") }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    public func start() throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/sbin/tgtd")
        process.arguments = ["-f", "--iscsi", "portal=127.0.0.1:\(port)"]
        process.environment = ["TGT_IPC_SOCKET": socket, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"]
        process.currentDirectoryURL = URL(fileURLWithPath: scratch.dir)
        let log = FileHandle(forWritingAtPath: scratch.path("tgtd.log")) ?? {
            FileManager.default.createFile(atPath: scratch.path("tgtd.log"), contents: nil)
            return FileHandle(forWritingAtPath: scratch.path("tgtd.log"))!
        }()
        process.standardOutput = log
        process.standardError = log
        try process.run()
        self.process = process
        // Ready once its control socket answers.
        let deadline = Date().addingTimeInterval(10)
        while !(scratch.attempt("TGT_IPC_SOCKET=\(socket) tgtadm --lld iscsi --op show --mode target").ok) {
            guard Date() < deadline, process.isRunning else { throw ShellError(command: "tgtd", status: -1, output: "did not start") }
            usleep(50_000)
        }
    }

    /// Kills tgtd (SIGKILL: a target that goes away without a word) and waits for it.
    public func stop() {
        guard let process, process.isRunning else { return }
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
        self.process = nil
    }

    public func admin(_ arguments: String) throws {
        try scratch.sh("TGT_IPC_SOCKET=\(socket) tgtadm --lld iscsi \(arguments)")
    }

    /// The target, LUNs from files (LUN n is files[n-1]) and access for any initiator.
    public func define(luns files: [String], thin: Bool = false) throws {
        try admin("--op new --mode target --tid 1 -T \(Self.iqn)")
        for (i, file) in files.enumerated() { try addLun(i + 1, file: file, thin: thin) }
        try admin("--op bind --mode target --tid 1 -I ALL")
    }

    /// Makes target 1 (see `define`) ask for CHAP: an account `user` with `password`, bound to it.
    public func requireCHAP(user: String, password: String) throws {
        try admin("--op new --mode account --user \(user) --password \(password)")
        try admin("--op bind --mode account --tid 1 --user \(user)")
    }

    public func addLun(_ lun: Int, file: String, thin: Bool = false) throws {
        try admin("--op new --mode logicalunit --tid 1 --lun \(lun) -b \(scratch.path(file))")
        if thin { try admin("--op update --mode logicalunit --tid 1 --lun \(lun) --params thin_provisioning=1") }
    }
}

