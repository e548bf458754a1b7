#if canImport(Glibc)
import Glibc
#endif
import Foundation
@testable import Pools
import TestSupport
import Testing

/// LockHolders naming the processes that hold a block device (what `poolfs snapshot` says of an
/// open LV), against a loop device and processes this test starts.
@Suite("lock holders")
struct LockHoldersTests {
    /// Starts `sleep` with `path` open on its standard input.
    static func sleeper(holding path: String) throws -> Process {
        let sleep = Process()
        sleep.executableURL = URL(fileURLWithPath: "/bin/sleep")
        sleep.arguments = ["30"]
        sleep.standardInput = try FileHandle(forReadingFrom: URL(fileURLWithPath: path))
        try sleep.run()
        return sleep
    }

    /// A process with a loop device open is named by its program and pid; a process with only the
    /// loop device's backing file open is not; and the device number splits into the major and
    /// minor the kernel shows in sysfs.
    @Test func blockDeviceOpenersAreNamed() throws {
        let scratch = try Scratch()
        try scratch.sh("truncate -s 1M disk.img")
        let loop = try scratch.sh("losetup --show -f disk.img").trimmingCharacters(in: .whitespacesAndNewlines)
        defer { _ = try? scratch.sh("losetup -d \(loop)") }
        var st = stat()
        try #require(stat(loop, &st) == 0)
        let device = UInt64(st.st_rdev)

        let (major, minor) = LockHolders.split(device)
        let sysfs = try String(contentsOfFile: "/sys/block/\((loop as NSString).lastPathComponent)/dev", encoding: .utf8)
        #expect("\(major):\(minor)" == sysfs.trimmingCharacters(in: .whitespacesAndNewlines))

        #expect(LockHolders.openers(ofBlockDevice: device).isEmpty)
        let holder = try Self.sleeper(holding: loop)
        let bystander = try Self.sleeper(holding: scratch.path("disk.img"))
        defer {
            for process in [holder, bystander] { kill(process.processIdentifier, SIGKILL); process.waitUntilExit() }
        }
        #expect(LockHolders.openers(ofBlockDevice: device) == [.init(pid: holder.processIdentifier, program: "sleep")])
        #expect(LockHolders.openers(ofBlockDevice: device).map(\.description) == ["sleep (pid \(holder.processIdentifier))"])
    }
}
