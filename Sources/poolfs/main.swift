import ArgumentParser
import PoolFS

// `mount -t fuse.poolfs` and fstab run `poolfs SOURCE MOUNTPOINT -o OPTIONS`: without a
// subcommand, `mount` is meant. ArgumentParser's own requests stay with the root command:
// --experimental-dump-help (the JSON the man page is made from), --generate-completion-script
// and ---completion (what the completion scripts call).
var arguments = Array(CommandLine.arguments.dropFirst())
let subcommands: Set<String> = ["mount", "unmount", "umount", "ls", "snapshot", "format", "help", "-h", "--help", "--version",
                                "--experimental-dump-help", "--generate-completion-script", "---completion"]
if let first = arguments.first, !subcommands.contains(first), !first.hasPrefix("--generate-completion-script=") {
    arguments.insert("mount", at: 0)
}
PoolfsCommand.main(arguments)
