#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// An NFS server of the test's own: nfs-ganesha with the VFS FSAL serving `exportDir` as
/// `/export`, NFSv4 only, on its own port of 127.0.0.1 (no rpcbind: v4 needs none), with its
/// own config, pid file, log and recovery directory. Files made in `exportDir` are on the
/// export. Stopped by its pid, never by name; `kill` and `start` again reuse the port, for
/// tests of a server restart.
public final class NFSServer: @unchecked Sendable {
    public let scratch: Scratch
    public let port: Int
    public static let export = "/export"
    public var exportDir: String { scratch.path("export") }
    private var stopped = false
    /// NFSv3 too: then an rpcbind of the server's own runs (`rpcbind -f`, port 111: one per
    /// machine), and v3 clients mount the export by its path, `exportDir`.
    public let v3: Bool

    /// Whether ganesha and libnfs's tools are installed (scripts/install-deps.sh).
    public static var available: Bool {
        ["/usr/bin/ganesha.nfsd", "/usr/bin/nfs-ls", "/usr/bin/nfs-cp"].allSatisfy { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// `nfs://127.0.0.1:PORT/export/PATH?version=4`, libnfs's URL form (which poolfs takes).
    public func url(_ path: String = "") -> String {
        "nfs://127.0.0.1:\(port)\(Self.export)" + (path.isEmpty ? "" : "/" + path) + "?version=4"
    }

    /// The same, with the port as libnfs's own tools (nfs-ls, nfs-cp 4.0) take it.
    public func toolURL(_ path: String = "") -> String {
        "nfs://127.0.0.1\(Self.export)" + (path.isEmpty ? "" : "/" + path) + "?version=4&nfsport=\(port)"
    }

    public init(v3: Bool = false) throws {
        scratch = try Scratch()
        port = try TestTarget.freePort()
        self.v3 = v3
        try scratch.sh("mkdir -p export recovery")
        if v3 {
            try scratch.sh("\(CephCluster.detached) rpcbind -f -w & echo $! > rpcbind.pid")
            let deadline = Date().addingTimeInterval(10)
            while !scratch.attempt("rpcinfo -p 127.0.0.1 >/dev/null 2>&1").ok {
                guard Date() < deadline else { stop(); throw ShellError(command: "rpcbind", status: -1, output: "did not answer (is another rpcbind running?)") }
                usleep(50_000)
            }
        }
        try config().write(toFile: scratch.path("ganesha.conf"), atomically: true, encoding: .utf8)
        do {
            try start()
        } catch {
            stop()
            throw error
        }
    }

    deinit { stop() }

    private func config() -> String {
        """
        NFS_CORE_PARAM {
            Protocols = \(v3 ? "3, 4" : "4");
            NFS_Port = \(port);\(v3 ? "\n    MNT_Port = \(try! TestTarget.freePort());" : "")
            Bind_addr = 127.0.0.1;
            Enable_NLM = false;
            Enable_RQUOTA = false;
        }
        NFS_KRB5 { Active_krb5 = false; }
        NFSV4 {
            RecoveryBackend = fs;
            RecoveryRoot = \(scratch.path("recovery"));
            Graceless = true;
        }
        EXPORT {
            Export_Id = 1;
            Path = \(exportDir);
            Pseudo = \(Self.export);
            Access_Type = RW;
            Squash = No_Root_Squash;
            Protocols = \(v3 ? "3, 4" : "4");
            Transports = TCP;
            SecType = sys;
            # Attributes read from the file at every GETATTR: a file changed on the server's
            # side (not through NFS) is seen at once, as freshness tests need.
            Attr_Expiration_Time = 0;
            FSAL { Name = VFS; }
        }

        """
    }

    /// Starts ganesha (it daemonizes and writes its pid file) and waits until the export lists.
    public func start() throws {
        let d = scratch.dir
        try scratch.sh("\(CephCluster.detached) ganesha.nfsd -f \(d)/ganesha.conf -p \(d)/ganesha.pid -L \(d)/ganesha.log -N NIV_EVENT")
        let deadline = Date().addingTimeInterval(20)
        // Ready once the export lists and the pid file is written (it may come later).
        while !scratch.attempt("timeout 5 nfs-ls '\(toolURL())' && test -s ganesha.pid").ok {
            guard Date() < deadline else { throw ShellError(command: "ganesha.nfsd", status: -1, output: "export did not answer in 20 s") }
            usleep(50_000)
        }
    }

    public var pid: Int32? { GlusterServer.pid(in: scratch.path("ganesha.pid")) }

    /// Kills ganesha (SIGKILL) as a crash would, and waits until it is gone.
    public func kill() {
        guard let pid else { return }
        GlusterServer.kill(pid, signal: SIGKILL)
        try? FileManager.default.removeItem(atPath: scratch.path("ganesha.pid"))
    }

    /// Freezes the server (SIGSTOP): connections stay open and nothing answers.
    public func pause() { if let pid { Glibc.kill(pid, SIGSTOP) } }
    public func resume() { if let pid { Glibc.kill(pid, SIGCONT) } }

    public func stop() {
        guard !stopped else { return }
        stopped = true
        kill()
        if let pid = GlusterServer.pid(in: scratch.path("rpcbind.pid")) { GlusterServer.kill(pid, signal: SIGKILL) }
    }

    /// `nfs://127.0.0.1/EXPORTDIR/PATH`: NFSv3 through the portmapper, as QEMU's nfs driver and
    /// poolfs take it (only with `v3`).
    public func v3URL(_ path: String = "") -> String {
        "nfs://127.0.0.1\(exportDir)" + (path.isEmpty ? "" : "/" + path)
    }
}
