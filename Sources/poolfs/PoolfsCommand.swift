import Glibc
import ArgumentParser

struct PoolfsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "poolfs",
        abstract: "Mount a virtualization storage pool: every volume a flat raw file, every snapshot a read-only file.",
        version: "0.1.0",
        subcommands: [MountCommand.self, UnmountCommand.self, ListCommand.self])
}

/// Prints `poolfs: message` and fails, for errors the user can act on.
func fail(_ error: any Error) -> ExitCode {
    var stderr = StandardError()
    print("poolfs: \(error)", to: &stderr)
    return .failure
}

struct StandardError: TextOutputStream {
    mutating func write(_ string: String) {
        let bytes = Array(string.utf8)
        bytes.withUnsafeBytes { _ = Glibc.write(2, $0.baseAddress, $0.count) }
    }
}
