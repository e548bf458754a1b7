import Foundation
import TestSupport
import Testing

@Suite("signals")
struct SignalTests {
    /// SIGINT and SIGTERM end the daemon with the mount cleanly removed, even when it was started
    /// with those signals blocked (as Foundation's Process starts it from a dispatch thread).
    @Test(arguments: [SIGINT, SIGTERM])
    func aSignalUnmounts(_ signal: Int32) throws {
        let scratch = try Scratch()
        try scratch.sh("mkdir pool && qemu-img create -q -f qcow2 pool/a.qcow2 1M")
        let mount = try PoolMount(scratch.path("pool"), in: scratch)
        defer { mount.unmount() }
        kill(mount.process.processIdentifier, signal)
        let deadline = Date().addingTimeInterval(10)
        while mount.process.isRunning, Date() < deadline { usleep(20_000) }
        try #require(!mount.process.isRunning, "the daemon exits")
        #expect(mount.process.terminationStatus == 0)
        #expect(!PoolMount.isMounted(mount.mountpoint), "and leaves nothing mounted")
        #expect(FileManager.default.fileExists(atPath: mount.mountpoint) && (try? FileManager.default.contentsOfDirectory(atPath: mount.mountpoint))?.isEmpty == true)
    }
}
