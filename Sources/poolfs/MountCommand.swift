import ArgumentParser
import Foundation
import PoolFS

struct MountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract: "Mount a pool: a directory of images, an LVM volume group, a ZFS dataset, or a libvirt pool name.",
        discussion: """
        Options (-o, comma-separated, repeatable): cache_size=SIZE (default 64M), threads=N (16), \
        readahead=SIZE (2M; above the kernel's 128K only for root), max_read=SIZE (512K: the largest read request), nosplice, type=dir|logical|zfs|disk, noactivate (LVM: read LVs from their PVs); \
        cow, cache_dir=DIR (/var/tmp), cow_memory=SIZE (256M): writable files whose writes are kept apart \
        and dropped at unmount; rw (dir pools): writes go into the images, with QEMU's image locks \
        (a volume a VM is writing cannot be opened for writing); snapshots stay read-only. \
        Anything else goes to FUSE (allow_other, default_permissions, noatime, ...). \
        Without cow or rw the mount is read-only.
        """)

    @Option(name: .long, help: "Pool type: dir (a directory of qcow2/raw images), logical (an LVM volume group), zfs (a dataset's zvols) or disk (the partitions of a disk or disk image).")
    var type: String?

    @Option(name: .customShort("o"), help: "Mount options.")
    var options: [String] = []

    @Flag(name: [.short, .long], help: "Stay in the foreground instead of daemonizing.")
    var foreground = false

    @Argument(help: "A pool directory or libvirt pool name.")
    var source: String

    @Argument(help: "Where to mount it.")
    var mountpoint: String

    func run() throws {
        do {
            var parsed = try MountOptions.parse(options)
            if let type { parsed.type = type }
            try Mounter.mount(source: source, mountpoint: mountpoint, options: parsed, foreground: foreground)
        } catch {
            throw fail(error)
        }
    }
}

struct UnmountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "unmount", abstract: "Unmount a poolfs mount.",
                                                    aliases: ["umount"])

    @Argument(help: "The mountpoint.")
    var mountpoint: String

    func run() throws {
        do { try Mounter.unmount(mountpoint) } catch { throw fail(error) }
    }
}

struct ListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ls", abstract: "List a pool's volumes: format, sizes, backing chain, snapshots, errors.")

    @Option(name: .long, help: "Pool type: dir, logical, zfs or disk.")
    var type: String?

    @Flag(name: .long, help: "Print JSON.")
    var json = false

    @Flag(name: .long, help: "LVM: read LVs from their PVs, never through device-mapper.")
    var noactivate = false

    @Option(name: .customShort("o"), help: "Pool options, as `poolfs mount -o` takes them (noactivate, and a remote pool's connection).")
    var options: [String] = []

    @Argument(help: "A pool directory or libvirt pool name.")
    var source: String

    func run() throws {
        do {
            var parsed = try MountOptions.parse(options)
            if let type { parsed.type = type }
            if noactivate { parsed.noactivate = true }
            let (reports, problem) = try Mounter.reports(source: source, options: parsed)
            if let problem { FileHandle.standardError.write(Data("poolfs: \(problem)\n".utf8)) }
            print(json ? VolumeReport.json(reports) : VolumeReport.table(reports))
        } catch {
            throw fail(error)
        }
    }
}
