"""Network pools: a qcow2 on GlusterFS and on NFS read through poolfs (libgfapi, libnfs) against
qemu-storage-daemon's FUSE export of the same image through QEMU's gluster and nfs drivers, and,
for gluster, against a poolfs dir pool over the gluster FUSE mount. Sequential 1 MiB and 4 KiB
random reads, interleaved rounds.

The section starts its own servers (bench/fixtures/network.py): a glusterd with a one-brick volume
on loopback, and nfs-ganesha serving NFSv3 (QEMU's nfs driver speaks v3 only) through an rpcbind of
its own. One qcow2 of random data (1 GiB; 256 MiB with --quick) is made on each with qemu-img. The
servers' files are in this host's page cache in every round, so the figures are the client paths:
FUSE, the client library, the loopback RPC and the server. Target (issue 26): ≥ 1.5× qsd on each."""
import os, signal, subprocess

from ..common import (WORK, MiB, GiB, digest, drop_file_cache, missing_tools, random_iops, ratio_table,
                      sequential, sh, skipped, start_poolfs, started, stop_mount, unmount)
from ..fixtures.network import GlusterServer, NFSServer

NAME = "network"


def make_image(directory, size):
    """bench.qcow2 of `size` random bytes in `directory` (a share, as a client or the server sees it)."""
    data = os.path.join(WORK, "network-data.raw")
    sh(f"head -c {size} /dev/urandom > {data}")
    sh(f"qemu-img convert -f raw -O qcow2 {data} {os.path.join(directory, 'bench.qcow2')}")
    os.remove(data)


def start_qsd(file_options, log):
    """qemu-storage-daemon: a qcow2 node over the protocol node `file_options`, exported over FUSE."""
    target = os.path.join(WORK, "network-qsd.raw")
    open(target, "a").close()
    with open(log, "w") as f:
        proc = subprocess.Popen(["qemu-storage-daemon",
                                 "--blockdev", f"{file_options},node-name=f,read-only=on",
                                 "--blockdev", "driver=qcow2,node-name=d,file=f,read-only=on",
                                 "--export", f"type=fuse,id=e,node-name=d,mountpoint={target},writable=off"],
                                stdout=f, stderr=f)
    def stop(path, p):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=60)  # libgfapi's glfs_fini takes about 10 s
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        unmount(path)
    return target, started(proc, target, stop), stop


def run_sides(sides, labels, rounds, quick, size, what, drop=lambda: None):
    """Each side (name -> start() returning (path, stop)) in every round, the order turned each
    round: sequential MB/s and 4 KiB random IOPS; the bytes compared in round 1. `drop` runs
    before each measurement (the gluster FUSE client's page cache of the image dropped)."""
    results = {label: {name: [] for name in sides} for label in labels}
    digests = {}
    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            path, stop = sides[name]()
            try:
                if r == 0:
                    digests[name] = digest(path)
                drop()
                drop_file_cache(path)
                results[labels[0]][name].append(sequential(path, size))
                drop()
                results[labels[1]][name].append(random_iops(path, 3 if quick else 8))
            finally:
                stop()
        print(f"network {what} round {r + 1}/{rounds} done", flush=True)
    if len(set(digests.values())) > 1:
        raise RuntimeError(f"network {what}: the sides read different bytes: {digests}")
    return results


def gluster_part(ctx, size):
    missing = missing_tools("glusterd", "gluster", "glusterfs")
    if missing:
        return skipped(f"gluster: skipped: {', '.join(missing)} not found (scripts/install-deps.sh)")
    try:
        server = GlusterServer()
    except RuntimeError as e:
        return skipped(f"gluster: skipped: {e}")
    try:
        make_image(server.mnt, size)
        mnt = os.path.join(WORK, "mnt-network")
        log = os.path.join(WORK, "network-poolfs.log")
        def native():
            proc = start_poolfs(ctx.binary, server.url(), mnt, "", log)
            return os.path.join(mnt, "bench.qcow2"), lambda: stop_mount(mnt, proc)
        def over_fuse():
            proc = start_poolfs(ctx.binary, server.mnt, mnt, "", log)
            return os.path.join(mnt, "bench.qcow2"), lambda: stop_mount(mnt, proc)
        def qsd():
            target, proc, stop = start_qsd("driver=gluster,volume=v0,path=bench.qcow2,server.0.type=inet,"
                                           "server.0.host=127.0.0.1,server.0.port=24007",
                                           os.path.join(WORK, "network-qsd.log"))
            return target, lambda: stop(target, proc)
        sides = {"poolfs gluster://": native, "qsd driver=gluster": qsd, "poolfs dir pool on the FUSE mount": over_fuse}
        labels = ["gluster: sequential MB/s", "gluster: 4 KiB random IOPS"]
        # The dir pool reads the image through the gluster FUSE client, whose kernel page cache
        # would otherwise serve it from memory after the first read.
        fuse_file = os.path.join(server.mnt, "bench.qcow2")
        return run_sides(sides, labels, ctx.rounds, ctx.quick, size, "gluster", drop=lambda: drop_file_cache(fuse_file))
    finally:
        server.stop()


def nfs_part(ctx, size):
    missing = missing_tools("ganesha.nfsd", "rpcbind", "rpcinfo", "nfs-ls")
    if missing:
        return skipped(f"NFS: skipped: {', '.join(missing)} not found (scripts/install-deps.sh)")
    try:
        server = NFSServer()
    except RuntimeError as e:
        return skipped(f"NFS: skipped: {e}")
    try:
        make_image(server.export, size)
        mnt = os.path.join(WORK, "mnt-network")
        log = os.path.join(WORK, "network-poolfs.log")
        def native():
            proc = start_poolfs(ctx.binary, server.v3_url(), mnt, "", log)
            return os.path.join(mnt, "bench.qcow2"), lambda: stop_mount(mnt, proc)
        def qsd():
            target, proc, stop = start_qsd(f"driver=nfs,server.type=inet,server.host=127.0.0.1,"
                                           f"path={server.export}/bench.qcow2",
                                           os.path.join(WORK, "network-qsd.log"))
            return target, lambda: stop(target, proc)
        sides = {"poolfs nfs:// (v3)": native, "qsd driver=nfs": qsd}
        labels = ["NFSv3: sequential MB/s", "NFSv3: 4 KiB random IOPS"]
        return run_sides(sides, labels, ctx.rounds, ctx.quick, size, "NFS")
    finally:
        server.stop()


def measure(ctx):
    missing = missing_tools("qemu-img", "qemu-storage-daemon", "fio")
    if missing:
        return {"gluster": skipped(f"skipped: {', '.join(missing)} not found"), "nfs": ""}
    size = 256 * MiB if ctx.quick else 1 * GiB
    os.makedirs(WORK, exist_ok=True)
    return {"image_bytes": size, "gluster": gluster_part(ctx, size), "nfs": nfs_part(ctx, size)}


def render(data):
    lines = ["", f"Network pools: a {data.get('image_bytes', 0) >> 20} MiB qcow2 (random data) on a one-brick gluster "
             "volume and on an NFSv3 export (nfs-ganesha), both on loopback, interleaved rounds:", ""]
    gluster = data["gluster"]
    if isinstance(gluster, str):
        lines.append(gluster)
    else:
        lines += ratio_table({k: {"a": v["poolfs gluster://"], "b": v["qsd driver=gluster"]} for k, v in gluster.items()},
                             "a", "b", "| measurement | poolfs gluster:// | qsd driver=gluster | poolfs / qsd | per round |")
        lines.append("")
        lines += ratio_table({k: {"a": v["poolfs gluster://"], "b": v["poolfs dir pool on the FUSE mount"]}
                              for k, v in gluster.items()},
                             "a", "b", "| measurement | poolfs gluster:// | poolfs dir pool on the gluster FUSE mount | "
                                       "native / FUSE mount | per round |")
    lines.append("")
    nfs = data["nfs"]
    if isinstance(nfs, str):
        lines.append(nfs)
    else:
        lines += ratio_table(nfs, "poolfs nfs:// (v3)", "qsd driver=nfs",
                             "| measurement | poolfs nfs:// (v3) | qsd driver=nfs | poolfs / qsd | per round |")
    return lines
