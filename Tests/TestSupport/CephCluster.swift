#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// A one-node Ceph cluster of the test process's own: one monitor on its own port, one OSD on
/// memstore (1 GiB of memory), one manager, no auth, pool size 1, with its conf, data, sockets,
/// logs and pid files in its own directory. It starts in about 7 s, once per test process
/// (`shared`), and every daemon is stopped by its pid file when the process exits. A test that
/// freezes the cluster starts one of its own (`own`) and stops it.
///
/// Tests share the pool `P` and keep apart by namespace (`newNamespace`), so they may run at once.
public final class CephCluster: @unchecked Sendable {
    public let scratch: Scratch
    public let port: Int
    public var conf: String { scratch.path("ceph.conf") }
    /// `-c CONF`, for `rbd` and `ceph` command lines.
    public var c: String { "-c \(conf)" }
    public static let pool = "P"
    private static let daemons = ["mon.a", "osd.0", "mgr.x"]
    private let namespaces = NSLock()
    private var namespaceCount = 0

    private static let lock = NSLock()
    nonisolated(unsafe) private static var started: Result<CephCluster, any Error>?

    /// The process's cluster, started on first use; stopped at exit.
    public static func shared() throws -> CephCluster {
        lock.lock()
        defer { lock.unlock() }
        if let started { return try started.get() }
        let result = Result { try CephCluster() }
        started = result
        if case .success = result { atexit { try? CephCluster.started?.get().stop() } }
        return try result.get()
    }

    /// A cluster of the caller's alone, for a test that freezes it (the shared one serves tests
    /// running at the same time); the caller stops it.
    public static func own() throws -> CephCluster {
        try CephCluster()
    }

    /// Whether the Ceph daemons are installed (scripts/install-deps.sh).
    public static var available: Bool {
        ["/usr/bin/ceph-mon", "/usr/bin/ceph-osd", "/usr/bin/ceph-mgr", "/usr/bin/rbd"].allSatisfy { FileManager.default.isExecutableFile(atPath: $0) }
    }

    private init() throws {
        scratch = try Scratch()
        port = try TestTarget.freePort()
        let d = scratch.dir
        try (Self.global(port: port, dir: d, auth: "none")
             + Self.template("ceph-one-node.conf.in", ["DIR": d, "MEMSTORE_BYTES": "1073741824"]))
            .write(toFile: conf, atomically: true, encoding: .utf8)
        do {
            try scratch.sh("mkdir -p run mon osd/osd.0 mgr/mgr.x")
            try scratch.sh("ceph-mon \(c) --id a --mkfs --keyring /dev/null 2>&1 && \(Self.detached) ceph-mon \(c) --id a")
            try scratch.sh("timeout 30 ceph \(c) osd create && timeout 30 ceph \(c) osd crush add osd.0 1 root=default")
            try scratch.sh("ceph-osd \(c) --id 0 --mkjournal --mkfs 2>&1 && \(Self.detached) ceph-osd \(c) --id 0")
            try scratch.sh("\(Self.detached) ceph-mgr \(c) --id x")
            try scratch.sh("timeout 30 ceph \(c) osd pool create \(Self.pool) 8 && timeout 30 rbd \(c) pool init \(Self.pool)")
        } catch {
            stop()
            throw error
        }
    }

    /// The `[global]` lines every test cluster's conf starts with: one monitor `a` on
    /// 127.0.0.1:`port`, authentication `auth` (none or cephx), and every file under `dir`.
    public static func global(port: Int, dir d: String, auth: String) throws -> String {
        try template("ceph-global.conf.in", ["FSID": UUID().uuidString.lowercased(), "PORT": "\(port)", "AUTH": auth, "DIR": d])
    }

    /// A conf template of bench/fixtures/, which the bench's cluster (bench/fixtures/ceph.py) is
    /// made from too, with each `@KEY@` replaced by `values[KEY]`.
    static func template(_ name: String, _ values: [String: String]) throws -> String {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        var text = try String(contentsOf: root.appendingPathComponent("bench/fixtures/\(name)"), encoding: .utf8)
        for (key, value) in values { text = text.replacingOccurrences(of: "@\(key)@", with: value) }
        return text
    }

    /// Runs the daemon that follows with no descriptor but 0-2 (and those to /dev/null and a
    /// log): Foundation's Process learns that a child exited when a descriptor it shares with
    /// it closes, and a daemon that kept it would make the `sh` that started it never end.
    public static let detached = #"/usr/bin/python3 -c 'import os, sys; os.closerange(3, 65536); os.execvp(sys.argv[1], sys.argv[1:])' </dev/null >>daemons.log 2>&1"#

    /// The pid a daemon wrote to its pid file; nil when it wrote none.
    public func pid(_ daemon: String) -> Int32? {
        guard let text = try? String(contentsOfFile: scratch.path("run/\(daemon).pid"), encoding: .utf8) else { return nil }
        return Int32(text.trimmingCharacters(in: .whitespacesAndNewlines))
    }

    /// Kills every daemon by its pid file and waits (up to 10 s each) until it is gone.
    public func stop() {
        for daemon in Self.daemons.reversed() {
            guard let pid = pid(daemon), pid > 0 else { continue }
            kill(pid, SIGCONT)
            kill(pid, SIGKILL)
            for _ in 0..<200 where Self.alive(pid) { usleep(50_000) }
            try? FileManager.default.removeItem(atPath: scratch.path("run/\(daemon).pid"))
        }
    }

    /// Whether `pid` runs (a zombie no longer does: the daemons are children of whoever reaps).
    static func alive(_ pid: Int32) -> Bool {
        guard kill(pid, 0) == 0 else { return false }
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return false }
        return !stat[close...].hasPrefix(") Z")
    }

    /// Freezes the OSD (SIGSTOP): the cluster stops answering, as when its host hangs or its
    /// network goes; memstore keeps the data for `resumeOSD`.
    public func pauseOSD() { if let pid = pid("osd.0") { kill(pid, SIGSTOP) } }
    public func resumeOSD() { if let pid = pid("osd.0") { kill(pid, SIGCONT) } }

    /// A fresh namespace of pool P, for one test: `P/NAME`.
    public func newNamespace() throws -> String {
        namespaces.lock()
        namespaceCount += 1
        let name = "t\(namespaceCount)"
        namespaces.unlock()
        try rbd("namespace create \(Self.pool)/\(name)")
        return "\(Self.pool)/\(name)"
    }

    /// Runs `rbd -c CONF ARGUMENTS` (a shell command line), bounded by 60 s.
    @discardableResult
    public func rbd(_ arguments: String) throws -> String {
        try scratch.sh("timeout 60 rbd \(c) \(arguments)")
    }

    /// What `rbd diff --whole-object` says holds data, merged into ranges.
    /// In namespace `ns`: `disk`, imported from `file`; its snapshots `before` and `after`, with
    /// random 4 KiB writes between them; and `child`, a clone of `disk@after` with writes of its own.
    public func makeSampleImages(in ns: String, from file: String) throws {
        try rbd("import --no-progress \(file) \(ns)/disk")
        try rbd("snap create \(ns)/disk@before")
        try rbd("bench --io-type write --io-pattern rand --io-size 4K --io-total 64K \(ns)/disk >/dev/null")
        try rbd("snap create \(ns)/disk@after")
        try rbd("snap protect \(ns)/disk@after")
        try rbd("clone \(ns)/disk@after \(ns)/child")
        try rbd("bench --io-type write --io-size 64K --io-total 128K \(ns)/child >/dev/null")
    }

    public func diffRanges(_ spec: String) throws -> [Range<UInt64>] {
        let json = try rbd("diff --whole-object --format json \(spec)")
        let rows = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [[String: Any]]
        return mergedRanges(rows.filter { "\($0["exists"] ?? "")" == "true" }.map {
            (($0["offset"] as! NSNumber).uint64Value, ($0["length"] as! NSNumber).uint64Value)
        })
    }

    /// `rbd export SPEC` as bytes.
    public func export(_ spec: String) throws -> [UInt8] {
        let file = scratch.path("export-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(atPath: file) }
        try rbd("export --no-progress \(spec) \(file)")
        return Array(try Data(contentsOf: URL(fileURLWithPath: file)))
    }
}
