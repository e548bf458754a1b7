import ArgumentParser
import Foundation
import PoolFS

struct MountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract: "Mount a pool: a directory of images, an LVM volume group, a ZFS dataset, a disk's partitions, an iSCSI target, or a libvirt pool by name.",
        discussion: """
        poolfs mounts SOURCE at MOUNTPOINT, then daemonizes and logs to
        syslog (with --foreground, to stderr too). SIGINT, SIGTERM,
        SIGHUP unmount, as do poolfs unmount and fusermount3 -u.
        poolfs --help (or man poolfs) describes pool types, the tree
        and its attributes.

        OPTIONS (-o, comma-separated, repeatable; the last one wins)
          SIZE: bytes, or with a K, M, G or T suffix (powers of 1024).
          ro                  read-only: the default (cancels rw)
          rw                  writes go into the volumes: dir, disk
                              and iscsi pools, logical pools through
                              device-mapper; snapshots stay read-only
          cow                 every file writable; writes are kept
                              apart, dropped at unmount (not with rw)
          cow_memory=SIZE     cow: written blocks kept in memory
                              before they go to a spill file (256M)
          cache_dir=DIR       cow: where the spill file is made; it
                              is unlinked at once (/var/tmp)
          backing_dirs=DIR[:DIR...]
                              directories outside the pool where
                              backing and data files that images name
                              may be read (other pools' directories);
                              by default only the pool's own
                              (see docs/security.md)
          type=TYPE           the pool type, as --type: dir, fs,
                              netfs, logical, zfs, disk, iscsi,
                              iscsi-direct
          noactivate          logical: never use device-mapper; read
                              LVs and snapshots from their PVs
          cow_size=SIZE|N%    logical, poolfs snapshot create: the
                              copy-on-write space of a classic
                              snapshot, or N% of the origin (20%)
          net_timeout=SECONDS gluster, nfs: how long any call to the
                              server may take before the read fails
                              (EIO); 1-300, default 10
          initiator=IQN       iscsi: the initiator name to log in as
                              (iqn.2026-01.org.poolfs:initiator)
          chap_user=NAME      iscsi: log in with CHAP as NAME
          chap_secret_file=FILE
                              iscsi: the file that holds the CHAP
                              secret, read at mount (a final newline
                              is not part of it), so that it is never
                              on a command line; needs chap_user.
                              A libvirt pool without it takes the
                              secret its <auth> names from
                              /etc/libvirt/secrets
          cache_size=SIZE     metadata (L1/L2 tables, refcounts) and
                              decompressed clusters cached, for all
                              volumes together (64M)
          threads=N           libfuse worker threads, 1 to 256 (16)
          readahead=SIZE      the kernel's readahead for the files
                              (2M); above 128K only when run as root
          max_read=SIZE       the largest read request, 4K to 1M
                              (512K)
          nosplice            reply with copies instead of splicing
                              image data into the kernel
          nopassthrough       raw image files read through the daemon
                              instead of by the kernel itself (FUSE
                              passthrough, used when the kernel offers
                              it, as root, without cow)
          cached_writes       with rw or cow: writers' opens go through
                              the kernel's page cache (small reads
                              through them are cached; each write is
                              copied once more)
          defaults, auto, noauto, user, users, nouser, nofail,
          _netdev, owner, group, comment=..., x-*
                              for mount(8), fstab and systemd: ignored
          Anything else goes to FUSE and the kernel: allow_other (let
          other users in), default_permissions (the kernel checks the
          files' modes and owners), noatime, nodev, nosuid, ...
        """)

    @Option(name: .long, help: "Pool type: dir (also fs, netfs), logical, zfs, disk, iscsi (also iscsi-direct), rbd or gluster. Default: dir, or the type a iscsi://, gluster:// or nfs:// SOURCE names.",
            completion: .list(poolTypes))
    var type: String?

    @Option(name: .customShort("o"), help: ArgumentHelp("Mount options, comma-separated (listed above).", valueName: "options"),
            completion: .list(mountOptionNames))
    var options: [String] = []

    @Flag(name: [.short, .long], help: "Stay in the foreground instead of daemonizing.")
    var foreground = false

    @Argument(help: "The pool: a directory, volume group, dataset, disk or disk image, iscsi:// URL, or libvirt pool name.",
              completion: .file())
    var source: String

    @Argument(help: "Where to mount it.", completion: .directory)
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

    @Argument(help: "The mountpoint.", completion: .directory)
    var mountpoint: String

    func run() throws {
        do { try Mounter.unmount(mountpoint) } catch { throw fail(error) }
    }
}

struct ListCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ls", abstract: "List a pool's volumes: format, sizes, backing chain, snapshots, errors.",
        discussion: """
        SOURCE and --type are as poolfs mount takes them. -o takes the same
        options: the ones that choose and reach the pool matter here
        (type=, noactivate, initiator=, chap_user=, chap_secret_file=);
        the others are checked and have no effect.
        """)

    @Option(name: .long, help: "Pool type, as poolfs mount takes it.", completion: .list(poolTypes))
    var type: String?

    @Flag(name: .long, help: "Print JSON.")
    var json = false

    @Flag(name: .long, help: "LVM: read LVs from their PVs, never through device-mapper.")
    var noactivate = false

    @Option(name: .customShort("o"), help: ArgumentHelp("Pool options, as poolfs mount -o takes them.", valueName: "options"),
            completion: .list(mountOptionNames))
    var options: [String] = []

    @Argument(help: "The pool, as poolfs mount takes it.", completion: .file())
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

/// What the completion scripts offer for --type and -o.
let poolTypes = ["dir", "fs", "netfs", "logical", "zfs", "disk", "iscsi", "iscsi-direct"]
let mountOptionNames = ["ro", "rw", "cow", "cow_memory=", "cache_dir=", "backing_dirs=", "type=", "noactivate", "initiator=", "chap_user=",
                        "chap_secret_file=", "cache_size=", "threads=", "readahead=", "max_read=", "nosplice", "nopassthrough", "cached_writes",
                        "allow_other", "default_permissions", "noatime"]
