#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// A one-brick GlusterFS volume `v0` on loopback, of the test's own: glusterd with its own
/// volfile and working directory (bound to 127.0.0.1), a brick in the test's scratch directory,
/// and a FUSE mount of the volume (`mountPoint`) through which tests make their images with
/// qemu-img at local speed. Stopped by pid (glusterd's pid file, the brick's pid file checked
/// against its command line), never by name.
///
/// glusterd allows one instance per machine (its CLI socket is fixed: /var/run/glusterd.socket,
/// and clients find it on port 24007), so servers run one at a time: `init` waits for the
/// process-wide turn and `stop` gives it back. A test holds one server for its whole length.
public final class GlusterServer: @unchecked Sendable {
    public static let volume = "v0"
    public let scratch: Scratch
    public var brick: String { scratch.path("brick") }
    /// The volume mounted by the gluster FUSE client: files made here are on the volume.
    public var mountPoint: String { scratch.path("mnt") }
    private var stopped = false
    private var mounted = false

    /// One server at a time in this process (a semaphore, since `stop` may run on another thread).
    private static let turn = DispatchSemaphore(value: 1)

    /// Whether glusterd, the CLI and the FUSE client are installed (scripts/install-deps.sh).
    public static var available: Bool {
        ["/usr/sbin/glusterd", "/usr/sbin/gluster", "/usr/sbin/glusterfs"].allSatisfy { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// `gluster://127.0.0.1/v0/PATH`, as QEMU and poolfs take it.
    public func url(_ path: String = "") -> String {
        "gluster://127.0.0.1/\(Self.volume)" + (path.isEmpty ? "" : "/" + path)
    }

    public init() throws {
        Self.turn.wait()
        do {
            scratch = try Scratch()
        } catch {
            Self.turn.signal()
            throw error
        }
        do {
            try start()
        } catch {
            stop()
            throw error
        }
    }

    deinit { stop() }

    private func start() throws {
        let d = scratch.dir
        try scratch.sh("mkdir -p wd brick mnt run log")
        try """
        volume management
            type mgmt/glusterd
            option working-directory \(d)/wd
            option transport-type socket
            option transport.socket.bind-address 127.0.0.1
            option transport.socket.listen-port 24007
            option ping-timeout 0
            option event-threads 1
        end-volume

        """.write(toFile: scratch.path("glusterd.vol"), atomically: true, encoding: .utf8)
        try scratch.sh("\(CephCluster.detached) glusterd -N -f \(d)/glusterd.vol -p \(d)/run/glusterd.pid -l \(d)/log/glusterd.log &")
        let deadline = Date().addingTimeInterval(30)
        while !scratch.attempt("timeout 10 gluster --mode=script volume list").ok {
            guard Date() < deadline else { throw ShellError(command: "glusterd", status: -1, output: "did not answer in 30 s") }
            usleep(100_000)
        }
        try scratch.sh("timeout 60 gluster --mode=script volume create \(Self.volume) $(hostname):\(brick) force")
        try startVolume()
        try scratch.sh("\(CephCluster.detached) glusterfs --volfile-server=127.0.0.1 --volfile-id=\(Self.volume) --log-file=\(d)/log/fuse.log \(mountPoint)")
        mounted = true
        // The FUSE client answers once it has the volume's graph.
        let ready = Date().addingTimeInterval(20)
        while !scratch.attempt("stat -f -c %T \(mountPoint) | grep -q fuse && touch \(mountPoint)/.ready && rm \(mountPoint)/.ready").ok {
            guard Date() < ready else { throw ShellError(command: "glusterfs", status: -1, output: "mount did not answer") }
            usleep(100_000)
        }
    }

    private func startVolume() throws {
        try scratch.sh("timeout 60 gluster --mode=script volume start \(Self.volume) force")
    }

    /// The pid of glusterd, from its pid file.
    public var glusterdPID: Int32? { Self.pid(in: scratch.path("run/glusterd.pid")) }

    /// The brick's pid file, which glusterd names HOSTNAME + the brick path with '/' as '-'.
    var brickPIDFile: String? {
        let dir = "/var/run/gluster/vols/\(Self.volume)"
        let suffix = brick.replacingOccurrences(of: "/", with: "-") + ".pid"
        return ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).first { $0.hasSuffix(suffix) }.map { dir + "/" + $0 }
    }

    /// The pid of this server's brick process (glusterfsd), from its pid file, only if its
    /// command line names this brick.
    public var brickPID: Int32? {
        guard let file = brickPIDFile, let pid = Self.pid(in: file),
              let cmdline = try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8),
              cmdline.contains(brick) else { return nil }
        return pid
    }

    /// Kills the brick (the server that holds the data) as a crash would.
    public func killBrick() {
        guard let pid = brickPID else { return }
        Self.kill(pid, signal: SIGKILL)
        // A killed daemon may stay a zombie here (nothing reaps it), which glusterd would take
        // for a running brick and not start again.
        if let file = brickPIDFile { try? FileManager.default.removeItem(atPath: file) }
    }

    /// Freezes the brick (SIGSTOP): the volume stops answering, as when its host hangs.
    public func pauseBrick() { if let pid = brickPID { Glibc.kill(pid, SIGSTOP) } }
    public func resumeBrick() { if let pid = brickPID { Glibc.kill(pid, SIGCONT) } }

    /// Starts the brick again after `killBrick` (on a new port: clients ask glusterd).
    public func restartBrick() throws {
        try startVolume()
    }

    /// Unmounts the FUSE client, kills the brick and glusterd by pid and waits until they are
    /// gone, then gives the turn to the next server. Safe to call twice.
    public func stop() {
        guard !stopped else { return }
        stopped = true
        if mounted { _ = scratch.attempt("umount -l \(mountPoint)") }
        if let pid = brickPID { Self.kill(pid, signal: SIGKILL) }
        if let file = brickPIDFile { try? FileManager.default.removeItem(atPath: file) }
        if let pid = glusterdPID { Self.kill(pid, signal: SIGKILL) }
        Self.turn.signal()
    }

    /// Whether `pid` runs (a zombie does not).
    public static func running(_ pid: Int32) -> Bool { CephCluster.alive(pid) }

    static func pid(in file: String) -> Int32? {
        guard let text = try? String(contentsOfFile: file, encoding: .utf8) else { return nil }
        return Int32(text.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// Sends `signal` (after SIGCONT, so a frozen process dies too) and waits up to 10 s.
    static func kill(_ pid: Int32, signal: Int32) {
        guard pid > 0 else { return }
        Glibc.kill(pid, SIGCONT)
        Glibc.kill(pid, signal)
        for _ in 0..<200 where CephCluster.alive(pid) { usleep(50_000) }
    }
}
