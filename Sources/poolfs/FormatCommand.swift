import ArgumentParser
import Foundation
import Pools
import Block

/// `poolfs format show|set|reset`: the format decisions poolfs keeps on a dir pool's image files
/// (FormatDecisions, docs/security.md). Root only: the decision is a trusted.* attribute.
struct FormatCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "format",
        abstract: "Show, set or reset the format poolfs keeps for image files.",
        discussion: """
        poolfs decides each image file's format once and keeps the decision
        in the file's trusted.poolfs.format attribute, so that a guest that
        writes a qcow2 header into its raw disk cannot make poolfs read it as
        qcow2. A libvirt domain that declares the disk's format wins over
        the kept decision.
          show FILE...          the format and where the decision came from
          set raw|qcow2 FILE... declare the format (an administrator's
                                declaration, as a libvirt domain's)
          reset FILE...         forget it: the next open probes the file
                                and keeps what it finds
        """)

    @Argument(help: "show, set or reset")
    var action: String

    @Argument(help: "for set: the format (raw or qcow2), then the files; otherwise the files")
    var arguments: [String]

    func run() throws {
        var files = arguments
        var format: Image.Format?
        switch action {
        case "show", "reset": break
        case "set":
            guard let first = files.first, let parsed = Image.Format(rawValue: first) else {
                throw ValidationError("poolfs format set: give raw or qcow2, then the files")
            }
            format = parsed
            files.removeFirst()
        default:
            throw ValidationError("poolfs format: the action is show, set or reset, not '\(action)'")
        }
        // trusted.* attributes are read and written by CAP_SYS_ADMIN only: anyone else would be
        // told "undecided" of a file that has a decision.
        guard geteuid() == 0 else { throw ValidationError("poolfs format: run as root (the decisions are trusted.* attributes)") }
        guard !files.isEmpty else { throw ValidationError("poolfs format \(action): name at least one file") }
        let decisions = FormatDecisions()
        var failed = false
        for path in files {
            do {
                let file = try HostFile(path: path)
                guard file.isRegularFile else { throw Qcow2Error.refused("\(path) is not a regular file") }
                switch action {
                case "show":
                    print("\(Printable.escaped(path)): \(decisions.describe(path: path, fd: file.fd))")
                case "set":
                    let code = FormatDecisions.record(fd: file.fd, format!, declared: true)
                    guard code == 0 else { throw Qcow2Error.io(errno: code, operation: "setting \(FormatDecisions.attribute) on", path: path) }
                    print("\(Printable.escaped(path)): \(format!.rawValue) (declared)")
                default:
                    let code = FormatDecisions.reset(fd: file.fd)
                    guard code == 0 else { throw Qcow2Error.io(errno: code, operation: "removing \(FormatDecisions.attribute) from", path: path) }
                    print("\(Printable.escaped(path)): reset; the next open probes it")
                }
            } catch {
                failed = true
                var standardError = StandardError()
                print("poolfs format: \(Printable.escaped("\(error)"))", to: &standardError)
            }
        }
        if failed { throw ExitCode(1) }
    }
}
