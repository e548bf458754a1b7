"""qcow2 images (live with a snapshot, compressed, a 3-level chain) through poolfs,
qemu-storage-daemon's FUSE export and qcowmount: sequential and random reads, peak RSS.

Rounds are interleaved (poolfs, qsd, qcowmount, poolfs, ...); each figure is a median. Before each
measurement the image files are read into the page cache and every cached page of the system's
mounted files is dropped (posix_fadvise DONTNEED), so the figure is the FUSE path and the qcow2
engine. (Pages a system's earlier reads left cached slow the kernel's later FUSE reads of other
files on the same mount: with the measured file's own pages alone dropped, a 3-level chain read
after the live and snapshot reads ran at 350-400 MB/s, and at 1.9 GB/s with all of them dropped.)"""
import os, shutil, signal, subprocess

from ..common import (WORK, MiB, GiB, System, digest, drop_file_cache, fmt, median, peak_rss_kib, pid_serving,
                      random_iops, ratio, sequential, sh, unmount, wait_mounted, warm)

NAME = "peers"


class Poolfs(System):
    name = "poolfs"
    def __init__(self, binary):
        self.binary, self.mnt = binary, os.path.join(WORK, "mnt-poolfs")
    def start(self, images):
        os.makedirs(self.mnt, exist_ok=True)
        self.proc = subprocess.Popen([self.binary, "mount", "--foreground", *getattr(self, "extra", []),
                                      os.path.join(WORK, "images"), self.mnt],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_mounted(self.mnt, self.proc)
        self.pid = self.proc.pid
    def path(self, image, snapshot=None):
        return os.path.join(self.mnt, ".snapshots", image, snapshot) if snapshot else os.path.join(self.mnt, image)
    def all_paths(self):
        top = [os.path.join(self.mnt, n) for n in os.listdir(self.mnt) if n != ".snapshots"]
        snaps = os.path.join(self.mnt, ".snapshots")
        return top + [os.path.join(snaps, v, n) for v in os.listdir(snaps) for n in os.listdir(os.path.join(snaps, v))]
    def stop(self):
        unmount(self.mnt)
        self.proc.wait(timeout=30)


class QemuStorageDaemon(System):
    name = "qemu-storage-daemon"
    def start(self, images):
        args = ["qemu-storage-daemon"]
        self.files = {}
        for i, image in enumerate(images):
            target = os.path.join(WORK, f"qsd-{i}.raw")
            open(target, "a").close()
            src = os.path.join(WORK, "images", image)
            args += ["--blockdev", f"driver=file,node-name=f{i},filename={src},read-only=on",
                     "--blockdev", f"driver=qcow2,node-name=q{i},file=f{i},read-only=on",
                     "--export", f"type=fuse,id=e{i},node-name=q{i},mountpoint={target},writable=off"]
            self.files[image] = target
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for target in self.files.values():
            wait_mounted(target, self.proc)
        self.pid = self.proc.pid
    def path(self, image, snapshot=None):
        return None if snapshot else self.files.get(image)
    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        for target in self.files.values():
            unmount(target)


class Qcowmount(System):
    """libqcow's qcowmount: one image per mount, no backing files, no internal snapshots."""
    name = "qcowmount"
    def start(self, images):
        self.procs, self.files = [], {}
        for i, image in enumerate(images):
            mnt = os.path.join(WORK, f"qcm-{i}")
            os.makedirs(mnt, exist_ok=True)
            proc = subprocess.Popen(["qcowmount", "-X", "allow_root", os.path.join(WORK, "images", image), mnt],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_mounted(mnt, proc, timeout=10)
                self.files[image] = os.path.join(mnt, "qcow1")
                self.procs.append((proc, mnt))
            except RuntimeError:
                pass  # an image qcowmount cannot open (a backing chain): reported as n/a
        live = [mnt for proc, mnt in self.procs if self.files.get("live.qcow2", "").startswith(mnt + "/")]
        self.pid = pid_serving(live[0]) if live else None
    def path(self, image, snapshot=None):
        return None if snapshot else self.files.get(image)
    def stop(self):
        for proc, mnt in self.procs:
            unmount(mnt)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def make_images(quick):
    images = os.path.join(WORK, "images")
    stamp = os.path.join(images, ".made")
    size = 256 * MiB if quick else 1 * GiB
    if os.path.exists(stamp) and open(stamp).read() == str(size):
        return size
    shutil.rmtree(images, ignore_errors=True)
    os.makedirs(images)
    print(f"making {size >> 20} MiB images in {images} ...", flush=True)
    # Compressible but not trivial data: base64 of random bytes (about 4:3 with deflate).
    sh(f"head -c {size * 3 // 4} /dev/urandom | base64 -w 0 | head -c {size} > {WORK}/data.raw")
    sh(f"qemu-img convert -O qcow2 {WORK}/data.raw {images}/live.qcow2", cwd=images)
    sh("qemu-img snapshot -c snap live.qcow2", cwd=images)
    sh(f"qemu-io -c 'write -P 0x5a 0 {size // 4}' live.qcow2 >/dev/null", cwd=images)
    sh(f"qemu-img convert -c -O qcow2 {WORK}/data.raw compressed.qcow2", cwd=images)
    sh(f"qemu-img convert -O qcow2 {WORK}/data.raw base.qcow2", cwd=images)
    sh("qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2", cwd=images)
    sh(f"qemu-io -c 'write -P 0x11 {size // 3} {size // 3}' mid.qcow2 >/dev/null", cwd=images)
    sh("qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2", cwd=images)
    sh(f"qemu-io -c 'write -P 0x22 {2 * size // 3} {size // 3}' top.qcow2 >/dev/null", cwd=images)
    os.remove(f"{WORK}/data.raw")
    with open(stamp, "w") as f:
        f.write(str(size))
    return size


CASES = [("sequential MB/s: live", "live.qcow2", None), ("sequential MB/s: snapshot", "live.qcow2", "snap"),
         ("sequential MB/s: compressed", "compressed.qcow2", None), ("sequential MB/s: top of 3-level chain", "top.qcow2", None)]
RANDOM = "4 KiB random read IOPS, 4 jobs: live"


def measure(ctx):
    """poolfs, qemu-storage-daemon and qcowmount on the same qcow2 images, every round's figures."""
    binary, rounds, quick = ctx.binary, ctx.rounds, ctx.quick
    size = make_images(quick)
    image_files = [os.path.join(WORK, "images", n) for n in os.listdir(os.path.join(WORK, "images")) if n.endswith(".qcow2")]
    systems = [Poolfs(binary), QemuStorageDaemon(), Qcowmount()]
    images = ["live.qcow2", "compressed.qcow2", "top.qcow2"]
    results = {label: {s.name: [] for s in systems} for label in [c[0] for c in CASES] + [RANDOM]}
    rss = {s.name: 0 for s in systems}
    reference, wrong = {}, set()  # poolfs's bytes (tested against qemu-img) and peers that differ
    for r in range(rounds):
        for system in systems:
            system.start(images)
            try:
                for label, image, snapshot in CASES:
                    path = system.path(image, snapshot)
                    if path is None:
                        continue
                    if r == 0:
                        d = digest(path)
                        reference.setdefault(label, d)
                        if d != reference[label]:
                            wrong.add((label, system.name))
                    warm(image_files)
                    for other in system.all_paths():
                        drop_file_cache(other)
                    results[label][system.name].append(sequential(path, os.path.getsize(path)))
                path = system.path("live.qcow2")
                if path:
                    results[RANDOM][system.name].append(random_iops(path, 3 if quick else 8))
                if r == 0 and system.pid and path:
                    streamed = 0
                    while streamed < 4 * GiB:
                        sequential(path, os.path.getsize(path))
                        streamed += os.path.getsize(path)
                    rss[system.name] = peak_rss_kib(system.pid)
            finally:
                system.stop()
        print(f"round {r + 1}/{rounds} done", flush=True)
    return {"image_bytes": size, "results": results, "wrong": sorted(list(w) for w in wrong), "peak_rss_kib": rss}


def render(data):
    results, rss = data["results"], data["peak_rss_kib"]
    wrong = {tuple(w) for w in data["wrong"]}
    lines = ["", f"qcow2 images of {data['image_bytes'] >> 20} MiB, one mount per system per round:", "",
             "| measurement | poolfs | qemu-storage-daemon | qcowmount | poolfs / qsd | poolfs / qcowmount |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, sides in results.items():
        p, q, c = median(sides["poolfs"]), median(sides["qemu-storage-daemon"]), median(sides["qcowmount"])
        cell = lambda v, name: fmt(v) + (" (wrong data)" if (label, name) in wrong else "")
        lines.append(f"| {label} | {fmt(p)} | {cell(q, 'qemu-storage-daemon')} | {cell(c, 'qcowmount')} | "
                     f"{ratio(p, q)} | {ratio(p, c)} |")
    lines.append(f"| peak RSS streaming 4 GiB, MiB (poolfs: cache_size=64M) | {rss['poolfs'] / 1024:.0f} | "
                 f"{rss['qemu-storage-daemon'] / 1024:.0f} | {rss['qcowmount'] / 1024:.0f} | | |")
    if wrong:
        lines += ["", "(wrong data): the peer's bytes differ from poolfs's, which the test suite checks against qemu-img."]
    return lines
