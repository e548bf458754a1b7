import Glibc
import ArgumentParser

/// The command tree. Its help texts are also the man page (swift-argument-parser's
/// generate-manual reads them through --experimental-dump-help; `make man`), where they are
/// mdoc text lines: ASCII only; no line may begin with `.` or `'` (a macro); a line that begins
/// with a space starts a new output line, the others are filled into the paragraph. So under a
/// heading every line is indented, and lines stay within 72 columns (66 in a subcommand's text,
/// which the page indents further).
struct PoolfsCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "poolfs",
        abstract: "Mount a virtualization storage pool: every volume a flat raw file, every snapshot a read-only file.",
        discussion: overview,
        version: "0.1.0",
        subcommands: [MountCommand.self, UnmountCommand.self, ListCommand.self, SnapshotCommand.self, FormatCommand.self])

    static let overview = """
        poolfs mounts a storage pool through FUSE. Every volume shows as a
        file of raw bytes, whatever its format (qcow2 images are read by
        poolfs's own qcow2 engine, raw ones are passed through); every
        snapshot as a read-only file under .snapshots/; every partition as
        a file of its own under .partitions/. fdisk, file -s, losetup,
        mount -o loop and cp --sparse=always then work on them. Without a
        subcommand, poolfs SOURCE MOUNTPOINT -o OPTIONS means poolfs mount:
        the form that mount -t fuse.poolfs and fstab use.

        POOL TYPES (poolfs mount --type TYPE SOURCE, or -o type=TYPE)
          dir      SOURCE is a directory: each regular file in it (or
                   symbolic link to one) is a volume, qcow2 or raw as its
                   content says. The default. fs and netfs (libvirt's
                   names for mounted directories) are dir pools.
          netfs    SOURCE nfs://HOST[:PORT]/EXPORT[/DIR][?version=4]: an
                   NFS share read through libnfs, no kernel mount; a
                   libvirt netfs pool whose share is mounted at its
                   target is a dir pool, one not mounted is read
                   natively (nfs, glusterfs) or refused (cifs).
          gluster  SOURCE gluster://HOST[:PORT]/VOLUME[/DIR]: a gluster
                   volume read through libgfapi. Both read-only (-o cow
                   works); -o net_timeout=SECONDS bounds every call to
                   the server (10). See docs/network-pools.md.
          logical  SOURCE is an LVM volume group (VG or /dev/VG): its LVs
                   (linear, striped, thin) are volumes, its classic and
                   thin snapshots the snapshots. An inactive LV is
                   activated through device-mapper at its first open
                   and deactivated at unmount; with -o noactivate, or on
                   a kernel without device-mapper, LVs and snapshots are
                   read from the physical volumes.
          zfs      SOURCE is a ZFS dataset (POOL/DATASET): its zvols are
                   volumes (tank/vms/web is web, tank/vms/sub/db is
                   sub%2Fdb), their ZFS snapshots the snapshots.
          disk     SOURCE is a block device or a disk image file (raw or
                   qcow2): its partitions are the volumes, named as the
                   kernel names them (sda1, loop0p1, nvme0n1p2), or
                   part1, part2, ... for an image file. An extended
                   partition is not a volume; its logical ones are.
          iscsi    SOURCE is an iSCSI target, iscsi://HOST[:PORT]/IQN
                   (port 3260 by default), read through libiscsi without
                   the kernel's initiator: its disk LUNs are the volumes,
                   named unit:0:0:LUN. A SOURCE that starts with iscsi://
                   needs no --type (iscsi-direct is the same). The login
                   takes -o initiator=IQN, chap_user=NAME and
                   chap_secret_file=FILE (see poolfs mount).
          A SOURCE without a slash that is no file names a libvirt pool:
          /etc/libvirt/storage/SOURCE.xml gives its type (any of the
          above) and where it is. The secret its <auth> names (a CHAP
          secret, a Ceph key), by uuid= or usage=, is read from
          libvirt's store, /etc/libvirt/secrets/UUID.xml and
          UUID.base64 (root only; an ephemeral secret cannot be read):
          -o chap_secret_file (iscsi) or keyring (rbd) gives it instead.

        THE TREE
          VOLUME
              each volume's live disk, as raw bytes: its size is the
              virtual disk size; unallocated ranges are holes
              (SEEK_DATA, SEEK_HOLE, st_blocks)
          .snapshots/VOLUME/SNAPSHOT
              each snapshot, read-only: qcow2 internal snapshots, LVM
              and ZFS snapshots. In file names % / and @ are written
              %25 %2F %40; a name that several snapshots share, or an
              empty one, gets @ID appended.
          .partitions/VOLUME/partN
              partition N of a volume, as libblkid reads its table
              (MBR, GPT, ...), so that mount -o loop needs no offset
          .partitions/.snapshots/VOLUME/SNAPSHOT/partN
              partition N of a snapshot, read-only
          The tree follows the pool while mounted: volumes and snapshots
          created or removed show within about a second, with no remount.
          A volume that cannot be opened (corrupt, encrypted, a missing
          backing file) still shows: opening it fails with EIO, and the
          log, poolfs ls and user.poolfs.error say why.

        WRITING
          The mount is read-only unless -o cow or -o rw is given.
          -o cow  every volume, snapshot and partition file takes writes,
                  kept apart (in memory, then a spill file) and dropped
                  at unmount: the pool is never written.
          -o rw   writes go into the volumes: the images of dir pools
                  (raw, or qcow2 through poolfs's own writer, with QEMU's
                  image locks), the partitions of disk pools, iSCSI LUNs,
                  and LVs through device-mapper; a partition file writes
                  into its volume. Snapshots stay read-only. zfs pools,
                  and logical pools without device-mapper or with
                  -o noactivate, refuse it.
          Files keep their size: truncate fails with EPERM.

        EXTENDED ATTRIBUTES (getfattr -d -m user.poolfs FILE)
          user.poolfs.format, user.poolfs.virtual_size
              every file: qcow2, raw or qcow2-snapshot; its size in bytes
          user.poolfs.backing_chain, user.poolfs.snapshots
              volumes: one "path (format)" a line, nearest first; the
              number of qcow2 snapshots
          user.poolfs.snapshot_id, snapshot_name, snapshot_date,
          vm_state_size, vm_clock_ns
              qcow2 snapshot files
          user.poolfs.partition_table, partition_number, partition_type,
          start_sector, sector_size, partition_label, partition_uuid
              partition files, and the volumes of disk pools
          user.poolfs.iscsi.target, iscsi.portal, iscsi.lun,
          iscsi.block_size, iscsi.serial
              the volumes of iscsi pools
          user.poolfs.error
              why a volume cannot be opened
          poolfs ls shows the same, as a table or as JSON.
        """
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
