"""One RBD image (and its snapshot) on the one-node Ceph cluster of bench/fixtures, through poolfs,
rbd-fuse and qemu-storage-daemon's rbd driver."""
import os, shutil, signal, subprocess

from ..common import WORK, MiB, GiB, System, drop_file_cache, fmt, median, random_iops, ratio, sequential, unmount, wait_mounted
from ..fixtures.ceph import CephCluster

NAME = "rbd"


class RbdPoolfs(System):
    name = "poolfs"
    def __init__(self, binary, conf):
        self.binary, self.conf, self.mnt = binary, conf, os.path.join(WORK, "mnt-rbd-poolfs")
    def start(self, images):
        os.makedirs(self.mnt, exist_ok=True)
        self.proc = subprocess.Popen([self.binary, "mount", "--foreground", "--type", "rbd", "-o", f"conf={self.conf}", "P", self.mnt],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_mounted(self.mnt, self.proc)
    def path(self, image, snapshot=None):
        return os.path.join(self.mnt, ".snapshots", image, snapshot) if snapshot else os.path.join(self.mnt, image)
    def all_paths(self):
        return [os.path.join(self.mnt, "bench"), os.path.join(self.mnt, ".snapshots", "bench", "snap")]
    def stop(self):
        unmount(self.mnt)
        self.proc.wait(timeout=30)


class RbdFuse(System):
    """Ceph's own rbd-fuse: every image of the pool a file, no snapshots."""
    name = "rbd-fuse"
    def __init__(self, conf):
        self.conf, self.mnt = conf, os.path.join(WORK, "mnt-rbd-fuse")
    def start(self, images):
        os.makedirs(self.mnt, exist_ok=True)
        self.proc = subprocess.Popen(["rbd-fuse", "-f", "-c", self.conf, "-p", "P", self.mnt],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_mounted(self.mnt, self.proc)
    def path(self, image, snapshot=None):
        return None if snapshot else os.path.join(self.mnt, image)
    def all_paths(self):
        return [os.path.join(self.mnt, "bench")]
    def stop(self):
        unmount(self.mnt)
        self.proc.wait(timeout=30)


class RbdQsd(System):
    """qemu-storage-daemon's FUSE export of --blockdev driver=rbd (package qemu-block-extra)."""
    name = "qemu-storage-daemon"
    def __init__(self, conf):
        self.conf, self.target = conf, os.path.join(WORK, "qsd-rbd.raw")
    def start(self, images):
        open(self.target, "a").close()
        self.proc = subprocess.Popen(["qemu-storage-daemon",
                                      "--blockdev", f"driver=rbd,node-name=r,pool=P,image=bench,conf={self.conf},read-only=on",
                                      "--export", f"type=fuse,id=e,node-name=r,mountpoint={self.target},writable=off"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_mounted(self.target, self.proc)
    def path(self, image, snapshot=None):
        return None if snapshot else self.target
    def all_paths(self):
        return [self.target]
    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        unmount(self.target)


def rbd_section(binary, size, rounds, quick):
    """Sequential 1 MiB and 4 KiB random reads of one RBD image (and, through poolfs, of its
    snapshot) through poolfs, rbd-fuse and qemu-storage-daemon, in interleaved rounds: every round's
    figures, by measurement and system."""
    cluster = CephCluster()
    try:
        cluster.rbd(f"create --size {size >> 20}M P/bench")
        cluster.rbd(f"bench --io-type write --io-size 4M --io-total {size >> 20}M P/bench")
        cluster.rbd("snap create P/bench@snap")
        systems = [RbdPoolfs(binary, cluster.conf), RbdFuse(cluster.conf), RbdQsd(cluster.conf)]
        labels = ["sequential MB/s: live", "sequential MB/s: snapshot", "4 KiB random read IOPS, 4 jobs: live"]
        results = {(l, s.name): [] for l in labels for s in systems}
        no_direct = set()
        for r in range(rounds):
            for system in systems:
                system.start(["bench"])
                try:
                    for label, snapshot in [(labels[0], None), (labels[1], "snap")]:
                        path = system.path("bench", snapshot)
                        if path is None:
                            continue
                        for other in system.all_paths():
                            drop_file_cache(other)
                        results[(label, system.name)].append(sequential(path, os.path.getsize(path)))
                    try:
                        results[(labels[2], system.name)].append(random_iops(system.path("bench"), 3 if quick else 8))
                    except subprocess.CalledProcessError:
                        no_direct.add(system.name)  # rbd-fuse refuses O_DIRECT opens
                finally:
                    system.stop()
            print(f"rbd round {r + 1}/{rounds} done", flush=True)
    finally:
        cluster.stop()
    return {"image_bytes": size, "rounds": rounds,
            "results": {label: {s.name: results[(label, s.name)] for s in systems} for label in labels},
            "no_direct": sorted(no_direct)}


def measure(ctx):
    size = 256 * MiB if ctx.quick else 1 * GiB
    if shutil.which("ceph-mon") and shutil.which("rbd-fuse"):
        return rbd_section(ctx.binary, size, ctx.rounds, ctx.quick)
    return {"image_bytes": size, "skipped": "Ceph RBD: skipped (ceph-mon or rbd-fuse not installed: scripts/install-deps.sh)."}


def render(data):
    if "skipped" in data:
        return ["", data["skipped"]]
    lines = ["", f"Ceph RBD: one {data['image_bytes'] >> 20} MiB image on a one-node cluster on this machine (memstore OSD), "
             f"{data['rounds']} interleaved rounds, medians:", "",
             "| measurement | poolfs | rbd-fuse | qemu-storage-daemon | poolfs / rbd-fuse | poolfs / qsd |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, sides in data["results"].items():
        p, f, q = median(sides["poolfs"]), median(sides["rbd-fuse"]), median(sides["qemu-storage-daemon"])
        lines.append(f"| {label} | {fmt(p)} | {fmt(f)} | {fmt(q)} | {ratio(p, f)} | {ratio(p, q)} |")
    if data["no_direct"]:
        lines += ["", f"n/a random reads: {', '.join(data['no_direct'])} cannot open the file with O_DIRECT (fio --direct=1)."]
    return lines
