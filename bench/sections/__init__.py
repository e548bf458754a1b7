"""The sections of the benchmark, in the order they run. Each is a module with NAME, a docstring
whose first line says what it measures, `measure(ctx)`, which runs it and returns its figures as
JSON-ready data (every round's), and `render(data)`, which turns those figures into markdown lines.
A new section is one file and one line here."""
from . import copyout, formats, iscsi, lvm, network, partitions, peers, pool, raw, rbd, revert, writes

SECTIONS = {module.NAME: module for module in [
    peers,       # qcow2 images: poolfs, qemu-storage-daemon, qcowmount
    formats,     # vmdk, vhdx, vhd, vdi: poolfs, qemu-storage-daemon
    pool,        # a pool of 1000 volumes × 5 snapshots
    lvm,         # LVs read from their PVs
    iscsi,       # a tgtd LUN: poolfs, qemu-storage-daemon
    partitions,  # partition files against their volumes
    rbd,         # a Ceph image: poolfs, rbd-fuse, qemu-storage-daemon
    network,     # a qcow2 on gluster and NFS: poolfs, qemu-storage-daemon, a dir pool on the FUSE mount
    raw,         # raw files: passthrough, daemon, qemu-storage-daemon, the file; writes
    writes,      # qcow2 writes through -o rw against qemu-storage-daemon
    copyout,     # a snapshot copied out to a raw file
    revert,      # poolfs snapshot revert of 30 volumes against a qemu-img loop
]}
