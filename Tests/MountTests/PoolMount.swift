import Foundation
import FuseKit
import TestSupport
import Testing

/// The built `poolfs` binary: $POOLFS_BIN, or the debug build beside these sources.
enum Binary {
    static var path: String {
        if let env = ProcessInfo.processInfo.environment["POOLFS_BIN"] { return env }
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        return root.appendingPathComponent(".build/debug/poolfs").path
    }
}

/// Runs the built `poolfs` with `arguments` (shell words): its exit status and output.
func runPoolfs(_ arguments: String, in scratch: Scratch) -> (status: Int32, output: String) {
    do {
        return (0, try scratch.sh("'\(Binary.path)' \(arguments)"))
    } catch let error as ShellError {
        return (error.status, error.output)
    } catch {
        return (-1, "\(error)")
    }
}

/// A running `poolfs mount --foreground`, unmounted when the test ends, failed or not.
final class PoolMount {
    let mountpoint: String
    let process = Process()
    let log: String

    init(_ source: String, in scratch: Scratch, options: [String] = [], name: String = "mnt",
         environment: [String: String] = [:]) throws {
        #expect(FileManager.default.isExecutableFile(atPath: Binary.path), "poolfs is not built at \(Binary.path)")
        #expect(FileManager.default.fileExists(atPath: "/dev/fuse"), "/dev/fuse is missing: these tests need FUSE")
        mountpoint = scratch.path(name)
        log = scratch.path(name + ".log")
        try FileManager.default.createDirectory(atPath: mountpoint, withIntermediateDirectories: true)
        FileManager.default.createFile(atPath: log, contents: nil)
        let output = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        process.executableURL = URL(fileURLWithPath: Binary.path)
        process.arguments = ["mount", "--foreground"] + options.flatMap { ["-o", $0] } + [source, mountpoint]
        process.standardOutput = output
        process.standardError = output
        if !environment.isEmpty {
            process.environment = ProcessInfo.processInfo.environment.merging(environment) { _, new in new }
        }
        try process.run()
        let deadline = Date().addingTimeInterval(20)
        while !Self.isMounted(mountpoint) {
            guard process.isRunning else {
                throw ShellError(command: "poolfs mount \(source)", status: process.terminationStatus,
                                 output: (try? String(contentsOfFile: log, encoding: .utf8)) ?? "")
            }
            guard Date() < deadline else {
                unmount()
                throw ShellError(command: "poolfs mount \(source)", status: -1, output: "not mounted after 20 s")
            }
            usleep(20_000)
        }
    }

    deinit { unmount() }

    func path(_ name: String) -> String { mountpoint + "/" + name }

    func unmount() {
        if Self.isMounted(mountpoint) {
            _ = try? Shell.run("fusermount3 -u '\(mountpoint)' || umount -l '\(mountpoint)'", in: "/")
        }
        if process.isRunning {
            let deadline = Date().addingTimeInterval(10)
            while process.isRunning, Date() < deadline { usleep(20_000) }
            if process.isRunning { process.terminate() }
        }
    }

    static func isMounted(_ path: String) -> Bool {
        MountTable.current().entries.contains { $0.mountpoint == path }
    }
}

/// Byte ranges holding data, as found by lseek(SEEK_DATA/SEEK_HOLE) on a file.
func dataRanges(of path: String) throws -> [Range<UInt64>] {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { throw POSIXError(.init(rawValue: errno)!) }
    defer { close(fd) }
    var ranges: [Range<UInt64>] = []
    var at: off_t = 0
    while true {
        let start = lseek(fd, at, 3)  // SEEK_DATA
        if start < 0 { break }
        let end = lseek(fd, start, 4)  // SEEK_HOLE
        ranges.append(UInt64(start)..<UInt64(end))
        at = end
    }
    return ranges
}

/// Data ranges (data and not zero) from `qemu-img map --output=json`, merged.
func qemuDataRanges(_ image: String, in scratch: Scratch) throws -> [Range<UInt64>] {
    let json = try scratch.sh("qemu-img map --output=json '\(image)'")
    let rows = try JSONSerialization.jsonObject(with: Data(json.utf8)) as! [[String: Any]]
    return mergedRanges(rows.filter { ($0["data"] as! Bool) && !($0["zero"] as! Bool) }.map {
        (($0["start"] as! NSNumber).uint64Value, ($0["length"] as! NSNumber).uint64Value)
    })
}

func contents(_ path: String) throws -> Data {
    try Data(contentsOf: URL(fileURLWithPath: path))
}
