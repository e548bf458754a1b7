import ArgumentParser
import PoolFS

// `mount -t fuse.poolfs` and fstab run `poolfs SOURCE MOUNTPOINT -o OPTIONS`: without a
// subcommand, `mount` is meant.
var arguments = Array(CommandLine.arguments.dropFirst())
let subcommands: Set<String> = ["mount", "unmount", "umount", "ls", "help", "-h", "--help", "--version"]
if let first = arguments.first, !subcommands.contains(first) {
    arguments.insert("mount", at: 0)
}
PoolfsCommand.main(arguments)
