#!/usr/bin/env python3
"""poolfs against qemu-storage-daemon's FUSE export and qcowmount, on the same images, in one run;
and on an RBD image, against rbd-fuse and qemu-storage-daemon's rbd driver.

Rounds are interleaved (poolfs, qsd, qcowmount, poolfs, ...); each figure is a median. Before each
measurement the image files are read into the page cache and every cached page of the system's
mounted files is dropped (posix_fadvise DONTNEED), so the figure is the FUSE path and the qcow2
engine. (Pages a system's earlier reads left cached slow the kernel's later FUSE reads of other
files on the same mount: with the measured file's own pages alone dropped, a 3-level chain read
after the live and snapshot reads ran at 350-400 MB/s, and at 1.9 GB/s with all of them dropped.)
Usage: bench/run.py POOLFS_BINARY [--rounds N] [--quick] [--sections a,b]
"""
import argparse, contextlib, datetime, hashlib, json, os, platform, shutil, signal, socket, statistics, subprocess, sys, time

WORK = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "bench-work"))
MiB, GiB = 1 << 20, 1 << 30


def sh(cmd, **kw):
    return subprocess.run(cmd, shell=True, check=True, text=True, capture_output=True, **kw).stdout


def mounted(path):
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def wait_mounted(path, proc=None, timeout=30):
    end = time.time() + timeout
    while not mounted(path):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"mount of {path} exited with {proc.returncode}")
        if time.time() > end:
            raise RuntimeError(f"{path} not mounted after {timeout}s")
        time.sleep(0.01)


def unmount(path):
    if mounted(path):
        subprocess.run(["fusermount3", "-u", path], check=False)


def stop_mount(path, proc):
    """Unmounts `path` and waits for its daemon `proc`, killing it by its pid if it does not end."""
    unmount(path)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def drop_file_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(paths):
    for p in paths:
        with open(p, "rb") as f:
            while f.read(8 * MiB):
                pass


def sequential(path, size, offset=0):
    """MB/s of reading `size` bytes of `path` from `offset` with 1 MiB reads."""
    drop_file_cache(path)
    buf = bytearray(MiB)
    fd = os.open(path, os.O_RDONLY)
    start = time.perf_counter()
    total = 0
    try:
        while total < size:
            n = os.preadv(fd, [memoryview(buf)[:min(MiB, size - total)]], offset + total)
            if n <= 0:
                break
            total += n
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    if total != size:
        raise RuntimeError(f"{path}: read {total} of {size} bytes")
    return total / elapsed / 1e6


def digest(path, offset=0, size=None):
    """sha256 of `size` bytes of `path` from `offset` (to the end when size is None)."""
    drop_file_cache(path)
    h = hashlib.sha256()
    left = os.path.getsize(path) - offset if size is None else size
    with open(path, "rb") as f:
        f.seek(offset)
        while left > 0 and (chunk := f.read(min(4 * MiB, left))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def pid_serving(mountpoint):
    """The process whose command line names `mountpoint` (FUSE daemons may fork)."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if mountpoint.encode() in f.read().split(b"\0"):
                        return int(entry)
            except OSError:
                pass
    return None


def random_iops(path, seconds):
    drop_file_cache(path)
    # fio splits --filename on colons (iSCSI LUN files are unit:0:0:N) unless they are escaped.
    escaped = path.replace(":", "\\:")
    out = sh(f"fio --name=rand --filename='{escaped}' --readonly --rw=randread --bs=4k --numjobs=4 "
             f"--ioengine=psync --direct=1 --time_based --runtime={seconds} --group_reporting "
             f"--output-format=json")
    return json.loads(out)["jobs"][0]["read"]["iops"]


class System:
    """A way to expose an image as a raw file: start(), path(image) -> file, stop(), pid."""
    name = ""
    def start(self, images): ...
    def stop(self): ...
    def all_paths(self):
        """Every file the system exposes now."""
        return list(self.files.values())


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


def make_big_pool(count, snapshots):
    pool = os.path.join(WORK, f"pool-{count}x{snapshots}")
    if os.path.exists(os.path.join(pool, ".made")):
        return pool
    shutil.rmtree(pool, ignore_errors=True)
    os.makedirs(pool)
    template = os.path.join(WORK, "template.qcow2")
    sh(f"qemu-img create -q -f qcow2 {template} 64M")
    for s in range(snapshots):
        sh(f"qemu-io -c 'write -P {s + 1} {s}M 64k' {template} >/dev/null && qemu-img snapshot -c snap{s} {template}")
    for i in range(count):
        shutil.copyfile(template, os.path.join(pool, f"vm{i:04}.qcow2"))
    open(os.path.join(pool, ".made"), "w").close()
    return pool


LVM_SCRIPT = """set -e
vg=pfsbench
pvcreate -q /dev/vda && vgcreate -q $vg /dev/vda
lvcreate -q -y -an -Zn -L {size}b -n lin $vg
lvchange -q -ay $vg/lin
dd if=/dev/urandom of=/dev/$vg/lin bs=1M count={mib} oflag=direct status=none
lvcreate -q -y -s --chunksize 4k -L {cow}b -n snap $vg/lin
# Every other MiB of the origin's first half changes: half of the snapshot's first half is in its COW.
for i in $(seq 0 2 $(({mib} / 2 - 1))); do dd if=/dev/urandom of=/dev/$vg/lin bs=1M seek=$i count=1 oflag=direct status=none; done
lvcreate -q -y --type thin-pool -L {pool}b -n pool $vg
lvcreate -q -y -V {size}b -T $vg/pool -n thin
dd if=/dev/urandom of=/dev/$vg/thin bs=1M count={mib} oflag=direct status=none
vgchange -q -an $vg
"""


def make_lvm_disk(size):
    """A disk image holding a VG made by a real device-mapper kernel (scripts/dm-vm.sh): a linear
    LV, a classic snapshot of it with half its first half in the COW, and a thin LV as large, all
    full of data."""
    work = os.path.join(WORK, "lvm")
    stamp = os.path.join(work, ".made")
    if os.path.exists(stamp) and open(stamp).read() == str(size):
        return os.path.join(work, "disk.img")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    print(f"making an LVM disk with {size >> 20} MiB LVs in a device-mapper VM ...", flush=True)
    sh(f"truncate -s {size * 3 + size // 2 + 64 * MiB} {work}/disk.img")
    with open(os.path.join(work, "make.sh"), "w") as f:
        f.write(LVM_SCRIPT.format(size=size, mib=size >> 20, cow=size // 2 + 16 * MiB, pool=size + 64 * MiB))
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "dm-vm.sh")
    subprocess.run([script, "--disk", f"{work}/disk.img", "--timeout", "1200", work, f"{work}/make.sh"],
                   check=True, stdout=subprocess.DEVNULL)
    with open(stamp, "w") as f:
        f.write(str(size))
    return os.path.join(work, "disk.img")


def lvm_without_devicemapper(binary, size, rounds):
    """MB/s of a linear LV, a classic snapshot and a thin LV read from the PVs (-o noactivate),
    interleaved on one mount, with each read's pages dropped first."""
    disk = make_lvm_disk(size)
    loop = sh(f"losetup -r --show -f {disk}").strip()
    mnt = os.path.join(WORK, "mnt-lvm")
    os.makedirs(mnt, exist_ok=True)
    files = {"linear LV": "lin", "classic snapshot": ".snapshots/lin/snap", "thin LV": "thin"}
    results = {label: [] for label in files}
    try:
        subprocess.run([binary, "mount", "--type", "logical", "-o", "noactivate", "pfsbench", mnt], check=True)
        try:
            for _ in range(rounds):
                for label, name in files.items():
                    path = os.path.join(mnt, name)
                    warm([loop])
                    for other in files.values():
                        drop_file_cache(os.path.join(mnt, other))
                    results[label].append(sequential(path, os.path.getsize(path)))
        finally:
            unmount(mnt)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
    return {label: statistics.median(v) for label, v in results.items()}


def missing_tools(*tools):
    return [t for t in tools if shutil.which(t) is None]


def free_port():
    """A port nothing listens on now (bound and released; the server binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TgtTarget:
    """A tgtd of the bench's own, on its own port and control socket (TGT_IPC_SOCKET, which tgtd
    and tgtadm both read), serving one file as LUN 1. tgtd ignores SIGTERM: stop() kills it by its
    pid with SIGKILL."""
    iqn = "iqn.2026-12.poolfs:bench"

    def __init__(self, work, lun_file):
        self.port = free_port()
        self.env = dict(os.environ, TGT_IPC_SOCKET=os.path.join(work, f"tgtd-ipc-{self.port}"))
        with open(os.path.join(work, "tgtd.log"), "w") as log:
            self.proc = subprocess.Popen(["tgtd", "-f", "--iscsi", f"portal=127.0.0.1:{self.port}"], env=self.env,
                                         cwd=work, stdout=log, stderr=log)
        try:
            end = time.time() + 10
            while self.admin("--op show --mode target", check=False).returncode != 0:
                if self.proc.poll() is not None or time.time() > end:
                    raise RuntimeError(f"tgtd did not start (see {work}/tgtd.log)")
                time.sleep(0.05)
            self.admin(f"--op new --mode target --tid 1 -T {self.iqn}")
            self.admin(f"--op new --mode logicalunit --tid 1 --lun 1 -b {lun_file}")
            self.admin("--op bind --mode target --tid 1 -I ALL")
        except BaseException:
            self.stop()
            raise

    def admin(self, args, check=True):
        return subprocess.run(f"tgtadm --lld iscsi {args}", shell=True, env=self.env, check=check,
                              capture_output=True, text=True)

    @property
    def url(self):
        return f"iscsi://127.0.0.1:{self.port}/{self.iqn}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def make_random_file(path, size):
    stamp = path + ".made"
    if os.path.exists(stamp) and open(stamp).read() == str(size):
        return
    sh(f"head -c {size} /dev/urandom > {path}")
    with open(stamp, "w") as f:
        f.write(str(size))


def iscsi_vs_qsd(binary, size, rounds, seconds):
    """A LUN of a tgtd of the bench's own, read through poolfs (`--type iscsi`) and through
    qemu-storage-daemon's FUSE export (its libiscsi driver), both mounted at once, in interleaved
    rounds (alternating which side goes first): sequential MB/s (1 MiB reads) and 4 KiB random
    read IOPS. Before each sequential read the LUN's file is read into the page cache (tgtd
    serves from it) and both FUSE files' pages are dropped. Returns {measurement: {side: [values
    per round]}}, or a reason to skip."""
    missing = missing_tools("tgtd", "tgtadm", "qemu-storage-daemon", "fio")
    if missing:
        return f"skipped: {', '.join(missing)} not found (scripts/install-deps.sh installs tgt, qemu-system-common, fio)"
    work = os.path.join(WORK, "iscsi")
    os.makedirs(work, exist_ok=True)
    lun_file = os.path.join(work, "lun.raw")
    make_random_file(lun_file, size)
    mnt, qsd_file = os.path.join(work, "mnt-poolfs"), os.path.join(work, "qsd.raw")
    os.makedirs(mnt, exist_ok=True)
    open(qsd_file, "a").close()
    seq, rand = "sequential MB/s", "4 KiB random read IOPS, 4 jobs"
    results = {seq: {"poolfs": [], "qsd": []}, rand: {"poolfs": [], "qsd": []}}
    target = TgtTarget(work, lun_file)
    try:
        poolfs = subprocess.Popen([binary, "mount", "--foreground", "--type", "iscsi", target.url, mnt],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_mounted(mnt, poolfs)
            with open(os.path.join(work, "qsd.log"), "w") as log:
                qsd = subprocess.Popen(["qemu-storage-daemon", "--blockdev",
                                        f"driver=iscsi,node-name=lun,transport=tcp,portal=127.0.0.1:{target.port},"
                                        f"target={target.iqn},lun=1,read-only=on",
                                        "--export", f"type=fuse,id=e,node-name=lun,mountpoint={qsd_file},writable=off"],
                                       stdout=log, stderr=log)
            try:
                try:
                    wait_mounted(qsd_file, qsd)
                except RuntimeError as e:
                    return f"skipped: qemu-storage-daemon could not export the LUN ({e}; see {work}/qsd.log)"
                files = {"poolfs": os.path.join(mnt, "unit:0:0:1"), "qsd": qsd_file}
                expected = digest(lun_file)
                for side, path in files.items():
                    if os.path.getsize(path) != size or digest(path) != expected:
                        raise RuntimeError(f"iSCSI: {side}'s {path} differs from {lun_file}")
                for r in range(rounds):
                    # Each round the other side goes first, so a load that changes within a round
                    # (others share this machine) does not always fall on the same side.
                    order = list(files.items())[::1 if r % 2 == 0 else -1]
                    for side, path in order:
                        warm([lun_file])
                        for other in files.values():
                            drop_file_cache(other)
                        results[seq][side].append(sequential(path, size))
                    for side, path in order:
                        results[rand][side].append(random_iops(path, seconds))
                    print(f"iSCSI round {r + 1}/{rounds}: " + "; ".join(
                        f"{m}: poolfs {v['poolfs'][-1]:,.0f}, qsd {v['qsd'][-1]:,.0f}, {v['poolfs'][-1] / v['qsd'][-1]:.2f}×"
                        for m, v in results.items()), flush=True)
            finally:
                qsd.send_signal(signal.SIGTERM)
                qsd.wait(timeout=30)
                unmount(qsd_file)
        finally:
            stop_mount(mnt, poolfs)
    finally:
        target.stop()
    return results


def make_partitioned_pool(size):
    """A pool of one raw disk image with a GPT and one partition from 1 MiB to the end, full of
    random data, and a qcow2 of the same bytes. Returns the pool and the partition's offset and size."""
    pool = os.path.join(WORK, "partitions")
    stamp = os.path.join(pool, ".made")
    if not (os.path.exists(stamp) and open(stamp).read() == str(size)):
        shutil.rmtree(pool, ignore_errors=True)
        os.makedirs(pool)
        print(f"making a {size >> 20} MiB partitioned disk in {pool} ...", flush=True)
        raw = os.path.join(pool, "disk.raw")
        sh(f"truncate -s {size} {raw} && echo 'start=1MiB, type=linux' | sfdisk -q --label gpt {raw}")
        part = json.loads(sh(f"sfdisk -J {raw}"))["partitiontable"]["partitions"][0]
        start, length = part["start"] * 512, part["size"] * 512
        sh(f"head -c {length} /dev/urandom | dd of={raw} bs=1M seek={start} oflag=seek_bytes conv=notrunc status=none")
        sh(f"qemu-img convert -O qcow2 {raw} {pool}/disk.qcow2")
        with open(stamp, "w") as f:
            f.write(str(size))
    part = json.loads(sh(f"sfdisk -J {pool}/disk.raw"))["partitiontable"]["partitions"][0]
    return pool, part["start"] * 512, part["size"] * 512


def partitions_vs_volumes(binary, size, rounds):
    """Sequential MB/s of `.partitions/<vol>/part1` and of the same byte range of `<vol>`, for a
    raw and a qcow2 volume, interleaved on one mount; before each read the images are read into
    the page cache and every file's pages on the mount are dropped. Returns {volume: {side: [MB/s
    per round]}}, or a reason to skip."""
    missing = missing_tools("sfdisk", "qemu-img")
    if missing:
        return f"skipped: {', '.join(missing)} not found (scripts/install-deps.sh installs fdisk, qemu-utils)"
    pool, start, length = make_partitioned_pool(size)
    mnt = os.path.join(WORK, "mnt-partitions")
    os.makedirs(mnt, exist_ok=True)
    volumes = ["disk.raw", "disk.qcow2"]
    images = [os.path.join(pool, v) for v in volumes]
    results = {v: {"partition": [], "volume": []} for v in volumes}
    proc = subprocess.Popen([binary, "mount", "--foreground", pool, mnt], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_mounted(mnt, proc)
        reads = {v: {"partition": (os.path.join(mnt, ".partitions", v, "part1"), 0),
                     "volume": (os.path.join(mnt, v), start)} for v in volumes}
        every = [path for sides in reads.values() for path, _ in sides.values()]
        expected = digest(images[0], start, length)
        for v, sides in reads.items():
            for side, (path, offset) in sides.items():
                if digest(path, offset, length) != expected:
                    raise RuntimeError(f"partitions: {path} at {offset} differs from the partition in {images[0]}")
        for r in range(rounds):
            for v, sides in reads.items():
                for side, (path, offset) in list(sides.items())[::1 if r % 2 == 0 else -1]:  # as in iscsi_vs_qsd
                    warm(images)
                    for other in every:
                        drop_file_cache(other)
                    results[v][side].append(sequential(path, length, offset))
            print(f"partitions round {r + 1}/{rounds}: " + "; ".join(
                f"{v}: partition {s['partition'][-1]:,.0f}, volume {s['volume'][-1]:,.0f}, "
                f"{s['partition'][-1] / s['volume'][-1]:.2f}×" for v, s in results.items()), flush=True)
    finally:
        stop_mount(mnt, proc)
    return results


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def pool_metadata(binary, pool, rounds):
    """Mount time, and cold and warm `ls -l` + stat of every file, for a big pool (poolfs only)."""
    mnt = os.path.join(WORK, "mnt-pool")
    os.makedirs(mnt, exist_ok=True)
    results = {"mount": [], "ls_cold": [], "ls_warm": [], "stat_all": []}
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run([binary, "mount", pool, mnt], check=True)  # returns once mounted
        results["mount"].append(time.perf_counter() - start)
        try:
            for key in ("ls_cold", "ls_warm"):
                start = time.perf_counter()
                sh(f"ls -l {mnt} > /dev/null")
                results[key].append(time.perf_counter() - start)
            start = time.perf_counter()
            n = 0
            for root, dirs, files in os.walk(mnt):
                for name in files:
                    os.stat(os.path.join(root, name))
                    n += 1
            results["stat_all"].append(time.perf_counter() - start)
        finally:
            unmount(mnt)
            time.sleep(0.2)
    return {k: statistics.median(v) for k, v in results.items()}, n


class CephCluster:
    """A one-node Ceph (monitor, one OSD on memstore, manager; no auth, pool size 1) in WORK/ceph,
    as Tests/TestSupport/CephCluster.swift starts it; stopped by its pid files."""
    daemons = ["mon.a", "osd.0", "mgr.x"]

    def __init__(self):
        import socket, uuid
        self.dir = os.path.join(WORK, "ceph")
        shutil.rmtree(self.dir, ignore_errors=True)
        for d in ["run", "mon", "osd/osd.0", "mgr/mgr.x"]:
            os.makedirs(os.path.join(self.dir, d))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        d = self.dir
        self.conf = os.path.join(d, "ceph.conf")
        with open(self.conf, "w") as f:
            f.write(f"""[global]
fsid = {uuid.uuid4()}
mon host = 127.0.0.1:{port}
mon initial members = a
auth cluster required = none
auth service required = none
auth client required = none
osd pool default size = 1
osd pool default min size = 1
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
ms bind ipv6 = false
run dir = {d}/run
log file = {d}/$name.log
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
mon data = {d}/mon/$name
osd data = {d}/osd/$name
mgr data = {d}/mgr/$name
keyring = /dev/null
[client]
admin socket =
log file = {d}/client.log
[osd.0]
osd objectstore = memstore
memstore device bytes = 2147483648
""")
        c = f"-c {self.conf}"
        try:
            sh(f"ceph-mon {c} --id a --mkfs --keyring /dev/null && ceph-mon {c} --id a")
            sh(f"timeout 30 ceph {c} osd create && timeout 30 ceph {c} osd crush add osd.0 1 root=default")
            sh(f"ceph-osd {c} --id 0 --mkjournal --mkfs && ceph-osd {c} --id 0")
            sh(f"ceph-mgr {c} --id x")
            sh(f"timeout 60 ceph {c} osd pool create P 8 && timeout 60 rbd {c} pool init P")
        except Exception:
            self.stop()
            raise

    def rbd(self, args):
        return sh(f"timeout 120 rbd -c {self.conf} {args}")

    def stop(self):
        for daemon in reversed(self.daemons):
            pidfile = os.path.join(self.dir, "run", daemon + ".pid")
            try:
                pid = int(open(pidfile).read().strip())
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            for _ in range(200):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                            break
                except OSError:
                    break
                time.sleep(0.05)


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
    snapshot) through poolfs, rbd-fuse and qemu-storage-daemon, in interleaved rounds."""
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
    med = lambda label, name: statistics.median(results[(label, name)]) if results[(label, name)] else None
    fmt = lambda v: "n/a" if v is None else f"{v:,.0f}"
    ratio = lambda a, b: "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}×"
    lines = ["", f"Ceph RBD: one {size >> 20} MiB image on a one-node cluster on this machine (memstore OSD), "
             f"{rounds} interleaved rounds, medians:", "",
             "| measurement | poolfs | rbd-fuse | qemu-storage-daemon | poolfs / rbd-fuse | poolfs / qsd |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for label in labels:
        p, f, q = med(label, "poolfs"), med(label, "rbd-fuse"), med(label, "qemu-storage-daemon")
        lines.append(f"| {label} | {fmt(p)} | {fmt(f)} | {fmt(q)} | {ratio(p, f)} | {ratio(p, q)} |")
    if no_direct:
        lines += ["", f"n/a random reads: {', '.join(sorted(no_direct))} cannot open the file with O_DIRECT (fio --direct=1)."]
    return lines


def fio_json(args):
    return json.loads(sh("fio --output-format=json --group_reporting --ioengine=psync " + args))["jobs"][0]


def raw_random_iops(path, size):
    """4 KiB random read IOPS, 4 jobs, buffered: each job reads its quarter of `path` once in
    random order (fio's random map), so no read is served by a page an earlier read cached, and
    fio's RANDOM fadvise hint turns readahead off. --invalidate=0: the caller drops pages."""
    escaped = path.replace(":", "\\:")
    return fio_json(f"--name=rand --filename='{escaped}' --readonly --rw=randread --bs=4k --numjobs=4 "
                    f"--size={size // 4} --offset_increment={size // 4} --invalidate=0")["read"]["iops"]


def sequential_cached(path, size):
    """MB/s of 1 MiB reads of `path`, its pages left as they are (a file read from the page cache)."""
    buf = bytearray(MiB)
    fd = os.open(path, os.O_RDONLY)
    start, total = time.perf_counter(), 0
    try:
        while total < size and (n := os.preadv(fd, [memoryview(buf)[:min(MiB, size - total)]], total)) > 0:
            total += n
    finally:
        os.close(fd)
    if total != size:
        raise RuntimeError(f"{path}: read {total} of {size} bytes")
    return total / (time.perf_counter() - start) / 1e6


def start_poolfs(binary, pool, mnt, options, log):
    os.makedirs(mnt, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen([binary, "mount", "--foreground", *(["-o", options] if options else []), pool, mnt],
                                stdout=f, stderr=f)
    try:
        wait_mounted(mnt, proc)
    except BaseException:
        stop_mount(mnt, proc)
        raise
    return proc


def start_qsd_export(target, log, image, driver, writable):
    """qemu-storage-daemon exporting `image` (driver=file, then `driver`: raw or qcow2, QEMU's
    default cache mode: the host page cache, flushes on fsync) over FUSE at `target`."""
    open(target, "a").close()
    ro = "off" if writable else "on"
    with open(log, "w") as f:
        proc = subprocess.Popen(["qemu-storage-daemon",
                                 "--blockdev", f"driver=file,node-name=f,filename={image},read-only={ro}",
                                 "--blockdev", f"driver={driver},node-name=d,file=f,read-only={ro}",
                                 "--export", f"type=fuse,id=e,node-name=d,mountpoint={target},"
                                             f"writable={'on' if writable else 'off'}"],
                                stdout=f, stderr=f)
    try:
        wait_mounted(target, proc)
    except BaseException:
        stop_qsd(target, proc)
        raise
    return proc


def start_qsd_raw(source, target, log, writable):
    """qemu-storage-daemon exporting the raw file `source` at `target`."""
    return start_qsd_export(target, log, source, "raw", writable)


def stop_qsd(target, proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    unmount(target)


def which_path(log):
    """What poolfs's log says about the raw read path (Mounter.swift)."""
    lines = [l.strip() for l in open(log) if "reads of raw volumes" in l]
    return lines[0].split("reads of raw volumes: ", 1)[-1] if lines else "not logged"


def raw_reads(binary, size, rounds):
    """Sequential 1 MiB and 4 KiB random reads of one raw file of random data through poolfs
    (FUSE passthrough), poolfs -o nopassthrough, qemu-storage-daemon's raw FUSE export and the file
    itself, all mounted at once, in interleaved rounds (the order reverses every round). Before
    each read the file is read into the page cache and every FUSE file's pages are dropped.
    Returns ({measurement: {side: [values per round]}}, {side: path poolfs logged}) or a reason."""
    missing = missing_tools("qemu-storage-daemon", "fio")
    if missing:
        return f"skipped: {', '.join(missing)} not found (scripts/install-deps.sh installs qemu-system-common, fio)", {}
    work = os.path.join(WORK, "raw")
    pool = os.path.join(work, "pool")
    os.makedirs(pool, exist_ok=True)
    source = os.path.join(pool, "data.raw")
    make_random_file(source, size)
    mounts = {"poolfs": ("", os.path.join(work, "mnt-pt")), "nopassthrough": ("nopassthrough", os.path.join(work, "mnt-npt"))}
    seq, rand = "sequential MB/s", "4 KiB random read IOPS, 4 jobs"
    sides = ["poolfs", "nopassthrough", "qsd", "file"]
    results = {seq: {s: [] for s in sides}, rand: {s: [] for s in sides}}
    procs, logged = {}, {}
    qsd_file, qsd = os.path.join(work, "qsd.raw"), None
    try:
        for side, (options, mnt) in mounts.items():
            procs[side] = start_poolfs(binary, pool, mnt, options, os.path.join(work, f"poolfs-{side}.log"))
        qsd = start_qsd_raw(source, qsd_file, os.path.join(work, "qsd.log"), writable=False)
        files = {"poolfs": os.path.join(mounts["poolfs"][1], "data.raw"),
                 "nopassthrough": os.path.join(mounts["nopassthrough"][1], "data.raw"), "qsd": qsd_file, "file": source}
        fuse_files = [files[s] for s in sides if s != "file"]
        expected = digest(source)
        for side, path in files.items():
            if os.path.getsize(path) != size or digest(path) != expected:
                raise RuntimeError(f"raw: {side}'s {path} differs from {source}")
        logged = {side: which_path(os.path.join(work, f"poolfs-{side}.log")) for side in mounts}
        for r in range(rounds):
            order = sides[::1 if r % 2 == 0 else -1]
            for measure, run in [(seq, lambda p: sequential_cached(p, size)), (rand, lambda p: raw_random_iops(p, size))]:
                for side in order:
                    warm([source])
                    for other in fuse_files:
                        drop_file_cache(other)
                    results[measure][side].append(run(files[side]))
            print(f"raw round {r + 1}/{rounds}: " + "; ".join(
                f"{m}: " + ", ".join(f"{s} {v[s][-1]:,.0f}" for s in sides) for m, v in results.items()), flush=True)
    finally:
        if qsd is not None:
            stop_qsd(qsd_file, qsd)
        for side, proc in procs.items():
            stop_mount(mounts[side][1], proc)
    return results, logged


def settle_writeback():
    """Writes back every dirty page of the system (sync) before a timed write run. Each run ends
    with an fsync, which on this ext4 also waited for what earlier steps had left dirty (the other
    side's image, the checking convert's output): the side that went first in a round paid for
    the previous round, 0.82-0.93× in every round poolfs went first and 1.69-2.43× in every round
    it went second."""
    os.sync()


def raw_writes(binary, size, rounds):
    """1 MiB sequential writes of `size` bytes and 4 KiB random writes of 256 MiB (or `size` if
    less) with fio (psync, one job, end_fsync) into a fresh sparse raw file each time, through
    poolfs -o rw (passthrough when the kernel offers it) and qemu-storage-daemon's writable raw
    export, alternating which goes first. fio verifies what it wrote (crc32c, read back through the
    same file after the timed phase), and the backing file's digest must equal the digest read
    through the mount. Returns {measurement: {side: [values per round]}} or a reason."""
    missing = missing_tools("qemu-storage-daemon", "fio")
    if missing:
        return f"skipped: {', '.join(missing)} not found (scripts/install-deps.sh installs qemu-system-common, fio)"
    work = os.path.join(WORK, "raw-write")
    shutil.rmtree(work, ignore_errors=True)
    pool, mnt, qsd_file = os.path.join(work, "pool"), os.path.join(work, "mnt"), os.path.join(work, "qsd.raw")
    os.makedirs(pool)
    rand_size = min(size, 256 * MiB)
    jobs = {"sequential 1 MiB writes, MB/s": (f"--rw=write --bs=1M --size={size}", lambda j: j["write"]["bw_bytes"] / 1e6),
            "4 KiB random write IOPS": (f"--rw=randwrite --bs=4k --size={rand_size}", lambda j: j["write"]["iops"])}
    results = {m: {"poolfs": [], "qsd": []} for m in jobs}

    def poolfs_side(backing, args):
        proc = start_poolfs(binary, pool, mnt, "rw", os.path.join(work, "poolfs.log"))
        try:
            path = os.path.join(mnt, os.path.basename(backing))
            job = fio_json(f"--name=w --filename={path} --numjobs=1 --end_fsync=1 --verify=crc32c --verify_state_save=0 {args}")
            seen = digest(path)
        finally:
            stop_mount(mnt, proc)
        return job, seen

    def qsd_side(backing, args):
        proc = start_qsd_raw(backing, qsd_file, os.path.join(work, "qsd.log"), writable=True)
        try:
            job = fio_json(f"--name=w --filename={qsd_file} --numjobs=1 --end_fsync=1 --verify=crc32c --verify_state_save=0 {args}")
            seen = digest(qsd_file)
        finally:
            stop_qsd(qsd_file, proc)
        return job, seen

    for r in range(rounds):
        for measure, (args, value) in jobs.items():
            for side, run in [("poolfs", poolfs_side), ("qsd", qsd_side)][::1 if r % 2 == 0 else -1]:
                backing = os.path.join(pool, "w.raw")
                if os.path.exists(backing):
                    os.remove(backing)
                sh(f"truncate -s {size} {backing}")
                settle_writeback()
                job, seen = run(backing, args)
                if job["error"]:  # a failed verify also makes fio exit non-zero (sh raises)
                    raise RuntimeError(f"raw writes: fio reported errors through {side}: {job.get('error')}")
                if digest(backing) != seen:
                    raise RuntimeError(f"raw writes: {backing} differs from what {side} read back")
                results[measure][side].append(value(job))
        print(f"raw write round {r + 1}/{rounds}: " + "; ".join(
            f"{m}: poolfs {v['poolfs'][-1]:,.0f}, qsd {v['qsd'][-1]:,.0f}, {v['poolfs'][-1] / v['qsd'][-1]:.2f}×"
            for m, v in results.items()), flush=True)
    os.remove(os.path.join(pool, "w.raw"))
    return results


def start_qsd_qcow2(image, target, log):
    """qemu-storage-daemon exporting the qcow2 `image` writable at `target`."""
    return start_qsd_export(target, log, image, "qcow2", writable=True)


def qcow2_writes(binary, rounds, image_size=2 * GiB, seq_size=1 * GiB, rand_size=256 * MiB):
    """1 MiB sequential writes of `seq_size` bytes and 4 KiB random writes of `rand_size` (each block
    of the first `rand_size` bytes once, in fio's random order) with fio (psync, one job, end_fsync)
    into a fresh qcow2 image of `image_size` each time (qemu-img create), through poolfs -o rw and
    qemu-storage-daemon's writable qcow2 export, alternating which goes first.

    fio fills every write with fresh random bytes from its fixed seed (refill_buffers,
    scramble_buffers=0), so both sides write the same data, and no verification runs in the
    timed phase (fio's verify headers and checksums cost fio as much CPU per 4 KiB write as the
    daemon spends). After each run the image, unmounted, must pass `qemu-img check`; what QEMU
    reads from it (qemu-img convert) must equal what the mount read back with its cache dropped;
    and in each round what QEMU reads from poolfs's image must equal what it reads from its own.
    Returns {measurement: {side: [values per round]}} or a reason."""
    missing = missing_tools("qemu-storage-daemon", "qemu-img", "fio")
    if missing:
        return f"skipped: {', '.join(missing)} not found (scripts/install-deps.sh installs qemu-utils, qemu-system-common, fio)"
    work = os.path.join(WORK, "qcow2-write")
    shutil.rmtree(work, ignore_errors=True)
    pool, mnt, qsd_file = os.path.join(work, "pool"), os.path.join(work, "mnt"), os.path.join(work, "qsd.raw")
    image, converted = os.path.join(pool, "w.qcow2"), os.path.join(work, "converted.raw")
    os.makedirs(pool)
    jobs = {"sequential 1 MiB writes, MB/s": (f"--rw=write --bs=1M --size={seq_size}", seq_size,
                                               lambda j: j["write"]["bw_bytes"] / 1e6),
            "4 KiB random write IOPS": (f"--rw=randwrite --bs=4k --size={rand_size}", rand_size,
                                        lambda j: j["write"]["iops"])}
    results = {m: {"poolfs": [], "qsd": []} for m in jobs}
    fio = "--name=w --numjobs=1 --end_fsync=1 --randrepeat=1 --refill_buffers --scramble_buffers=0"

    def poolfs_side(args, region):
        proc = start_poolfs(binary, pool, mnt, "rw", os.path.join(work, "poolfs.log"))
        try:
            path = os.path.join(mnt, "w.qcow2")
            job = fio_json(f"{fio} --filename={path} {args}")
            seen = digest(path, 0, region)
        finally:
            stop_mount(mnt, proc)
        return job, seen

    def qsd_side(args, region):
        proc = start_qsd_qcow2(image, qsd_file, os.path.join(work, "qsd.log"))
        try:
            job = fio_json(f"{fio} --filename={qsd_file} {args}")
            seen = digest(qsd_file, 0, region)
        finally:
            stop_qsd(qsd_file, proc)
        return job, seen

    try:
        for r in range(rounds):
            for measure, (args, region, value) in jobs.items():
                written = {}
                for side, run in [("poolfs", poolfs_side), ("qsd", qsd_side)][::1 if r % 2 == 0 else -1]:
                    if os.path.exists(image):
                        os.remove(image)
                    sh(f"qemu-img create -q -f qcow2 {image} {image_size}")
                    settle_writeback()
                    job, seen = run(args, region)
                    if job["error"]:
                        raise RuntimeError(f"qcow2 writes: fio reported errors through {side}: {job.get('error')}")
                    check = subprocess.run(["qemu-img", "check", image], text=True, capture_output=True)
                    if check.returncode != 0:
                        raise RuntimeError(f"qcow2 writes: qemu-img check of the image {side} wrote failed "
                                           f"(round {r + 1}, {measure}):\n{check.stdout}{check.stderr}")
                    sh(f"qemu-img convert -O raw {image} {converted}")
                    written[side] = digest(converted, 0, region)
                    os.remove(converted)
                    if written[side] != seen:
                        raise RuntimeError(f"qcow2 writes: QEMU reads other bytes from the image {side} wrote "
                                           f"than {side} read back (round {r + 1}, {measure})")
                    results[measure][side].append(value(job))
                if written["poolfs"] != written["qsd"]:
                    raise RuntimeError(f"qcow2 writes: the same fio job left other bytes through poolfs than through "
                                       f"qemu-storage-daemon (round {r + 1}, {measure})")
            print(f"qcow2 write round {r + 1}/{rounds}: " + "; ".join(
                f"{m}: poolfs {v['poolfs'][-1]:,.0f}, qsd {v['qsd'][-1]:,.0f}, {v['poolfs'][-1] / v['qsd'][-1]:.2f}×"
                for m, v in results.items()), flush=True)
    finally:
        for leftover in (image, converted):
            if os.path.exists(leftover):
                os.remove(leftover)
    return results


def make_copyout_image(size):
    """A qcow2 of `size` with every other 64 MiB region written (half allocated), each region its
    own byte pattern, and snapshot `mid` taken after the first half of those writes. Returns the
    image's path."""
    work = os.path.join(WORK, "copyout")
    pool = os.path.join(work, "pool")
    image = os.path.join(pool, "v.qcow2")
    stamp = os.path.join(work, ".made")
    if os.path.exists(stamp) and open(stamp).read() == str(size):
        return image
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(pool)
    print(f"making a {size >> 20} MiB half-allocated qcow2 with a snapshot in {pool} ...", flush=True)
    region = 64 * MiB
    writes = [f"-c 'write -P {(i // 2) % 255 + 1} {i * region} {region}'" for i in range(0, size // region, 2)]
    half = len(writes) // 2
    sh(f"qemu-img create -q -f qcow2 {image} {size}")
    sh(f"qemu-io -f qcow2 {' '.join(writes[:half])} {image} >/dev/null")
    sh(f"qemu-img snapshot -c mid {image}")
    sh(f"qemu-io -f qcow2 {' '.join(writes[half:])} {image} >/dev/null")
    with open(stamp, "w") as f:
        f.write(str(size))
    return image


def syscall_counts(cmd):
    """{syscall: calls} of `cmd` under strace -c -f."""
    out = subprocess.run(f"strace -c -f -o /dev/stderr {cmd}", shell=True, check=True, text=True,
                         capture_output=True).stderr
    counts = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 5 and f[3].isdigit():
            counts[f[-1]] = int(f[3])
    return counts


def copyout(binary, size, rounds):
    """Copying snapshot `mid` out to a raw file, in interleaved rounds (the order rotates):
    `cp --sparse=always` of poolfs's `.snapshots/v.qcow2/mid`; `qemu-img convert -O raw` of a copy
    of the image reverted to `mid` (copied and reverted once, untimed); and `qemu-img convert -l
    snapshot.name=mid -O raw` of the image; and, as the floor of cp itself, `cp --sparse=always` of
    the same bytes as a sparse raw file in the page cache. Each timing includes an fsync of the output (`sync
    FILE`; qemu-img flushes its output itself, cp does not). Before each copy the images are read
    into the page cache and the snapshot file's pages are dropped. Every output must equal
    poolfs's byte for byte (cmp). Returns ({way: [seconds per round]}, {way: allocated bytes},
    strace counts of cp or None) or a reason."""
    missing = missing_tools("qemu-img", "qemu-io", "cmp")
    if missing:
        return f"skipped: {', '.join(missing)} not found (scripts/install-deps.sh installs qemu-utils)", {}, None
    image = make_copyout_image(size)
    work = os.path.dirname(os.path.dirname(image))
    reverted = os.path.join(work, "reverted.qcow2")
    if not os.path.exists(reverted):
        sh(f"cp {image} {reverted}.tmp && qemu-img snapshot -a mid {reverted}.tmp && mv {reverted}.tmp {reverted}")
    mnt = os.path.join(work, "mnt")
    snapshot = os.path.join(mnt, ".snapshots", "v.qcow2", "mid")
    reference = os.path.join(work, "reference.raw")
    if not os.path.exists(reference):
        sh(f"qemu-img convert -O raw {reverted} {reference}")
    outs = {w: os.path.join(work, f"out-{i}.raw") for i, w in enumerate(["poolfs", "convert", "convert -l", "cp floor"])}
    commands = {"poolfs": f"cp --sparse=always {snapshot} {outs['poolfs']}",
                "convert": f"qemu-img convert -O raw {reverted} {outs['convert']}",
                "convert -l": f"qemu-img convert -l snapshot.name=mid -O raw {image} {outs['convert -l']}",
                "cp floor": f"cp --sparse=always {reference} {outs['cp floor']}"}
    results = {w: [] for w in commands}
    strace = None
    proc = start_poolfs(binary, os.path.dirname(image), mnt, "", os.path.join(work, "poolfs.log"))
    try:
        for r in range(rounds):
            for way in list(commands)[r % 4:] + list(commands)[:r % 4]:
                if os.path.exists(outs[way]):
                    os.remove(outs[way])
                warm([image, reverted, reference])
                drop_file_cache(snapshot)
                start = time.perf_counter()
                sh(f"{commands[way]} && sync {outs[way]}")
                results[way].append(time.perf_counter() - start)
            if r == 0:
                for way, out in outs.items():
                    if os.path.getsize(out) != size or subprocess.run(["cmp", outs["poolfs"], out]).returncode != 0:
                        raise RuntimeError(f"copyout: {out} ({way}) differs from {outs['poolfs']} (poolfs)")
            print(f"copyout round {r + 1}/{rounds}: " + ", ".join(f"{w} {v[-1]:.2f} s" for w, v in results.items()),
                  flush=True)
        if shutil.which("strace"):
            drop_file_cache(snapshot)
            os.remove(outs["poolfs"])
            strace = syscall_counts(commands["poolfs"])
    finally:
        stop_mount(mnt, proc)
    allocated = {w: os.stat(out).st_blocks * 512 for w, out in outs.items()}
    return results, allocated, strace


REVERT_VOLUMES, REVERT_DISK, REVERT_STEP = 30, 20 * GiB, 16 * MiB
# The scratch XFS the pool lives on: a sparse file, so only what is written takes host disk.
REVERT_XFS_BYTES = 64 * GiB


@contextlib.contextmanager
def reflink_filesystem(work):
    """An XFS with reflinks (`mkfs.xfs -m reflink=1`) on a sparse file through a loop device,
    mounted at work/xfs, unmounted and detached in the end (also on failure). XFS rather than
    btrfs: its reflinks share extents as btrfs does, but it has no checksums, compression or
    copy-on-write of data in place, so a punch and an fdatasync there cost what they cost on the
    XFS or ext4 a pool usually lives on. Yields the mount point."""
    image, mnt, loop = os.path.join(work, "xfs.img"), os.path.join(work, "xfs"), None
    try:
        with open(image, "wb") as f:
            f.truncate(REVERT_XFS_BYTES)
        loop = sh(f"losetup --find --show {image}").strip()
        sh(f"mkfs.xfs -q -f -m reflink=1 {loop}")
        os.makedirs(mnt, exist_ok=True)
        sh(f"mount -t xfs {loop} {mnt}")
        yield mnt
    finally:
        if mounted(mnt):
            subprocess.run(["umount", mnt], capture_output=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        if os.path.exists(image):
            os.remove(image)


def make_revert_template(work, written, reflinks):
    """A 20 GiB qcow2 (64 KiB clusters) with snapshot `class`: 64 KiB of 0x5a every 16 MiB of
    [1 GiB, 1 GiB + written) before the snapshot, then all of that range written again after it
    (one contiguous range, so `written` bytes of new clusters, in one run at the end of the file).
    With `reflinks`, they are written with 0xa5 once, here: each copy shares their extents.
    Otherwise (ext4), with zeros, dug out of the file (fallocate --dig-holes) so each copy is small,
    and `fallocate` of the copy gives those clusters their disk blocks back (unwritten extents).
    Returns the template's path."""
    template = os.path.join(work, f"template-{written >> 20}M.qcow2")
    if os.path.exists(template):
        return template
    marks = " ".join(f"-c 'write -P 0x5a {GiB + o} 64k'" for o in range(0, written, REVERT_STEP))
    # qemu-io writes at most 2 GiB - 512 in one request.
    after = " ".join(f"-c 'write -P {0xa5 if reflinks else 0} {GiB + o} {min(GiB, written - o)}'" for o in range(0, written, GiB))
    sh(f"qemu-img create -q -f qcow2 -o cluster_size=64k {template}.tmp {REVERT_DISK}")
    sh(f"qemu-io -f qcow2 {marks} {template}.tmp >/dev/null")
    sh(f"qemu-img snapshot -c class {template}.tmp")
    sh(f"qemu-io -f qcow2 {after} {template}.tmp >/dev/null")
    if not reflinks:
        sh(f"fallocate --dig-holes {template}.tmp")
    sh(f"mv {template}.tmp {template} && sync")
    return template


def fill_revert_pool(pool, template, written, reflinks):
    """The pool's 30 volumes as copies of `template` (reflinks: `cp --reflink=always`, extents
    shared; ext4: every hole of each copy allocated again), then synced: setup, never timed. Each
    volume must have at least `written` bytes allocated, and with reflinks share the template's
    extents (filefrag: `shared`), or the bench stops."""
    shutil.rmtree(pool, ignore_errors=True)
    os.makedirs(pool)
    for i in range(REVERT_VOLUMES):
        v = os.path.join(pool, f"vm{i:02}.qcow2")
        if reflinks:
            sh(f"cp --reflink=always {template} {v}")
        else:
            sh(f"cp --sparse=always {template} {v} && fallocate -l $(stat -c %s {v}) {v}")
        if os.stat(v).st_blocks * 512 < written:
            raise RuntimeError(f"revert: {v} has {os.stat(v).st_blocks * 512} bytes allocated, under {written}")
    if reflinks and "shared" not in sh(f"filefrag -v {os.path.join(pool, 'vm00.qcow2')}"):
        raise RuntimeError("revert: the copies do not share the template's extents")
    sh("sync")


def check_reverted(pool, written, who):
    """Spot checks of three volumes: qemu-img check clean, the marks of the snapshot back, the
    snapshot still listed."""
    for i in (0, REVERT_VOLUMES // 2, REVERT_VOLUMES - 1):
        v = os.path.join(pool, f"vm{i:02}.qcow2")
        reads = " ".join(f"-c 'read -P 0x5a {GiB + o} 64k' -c 'read -P 0 {GiB + o + 64 * 1024} 64k'"
                         for o in (0, written - REVERT_STEP))
        out = sh(f"qemu-img check {v} && qemu-io -f qcow2 {reads} {v} && qemu-img snapshot -l {v}")
        if "Pattern verification failed" in out or " class " not in out:
            raise RuntimeError(f"revert: {v} not reverted by {who}:\n{out}")


def revert_section(binary, rounds, sizes, reflinks):
    """`poolfs snapshot revert` of a pool of 30 volumes against a shell loop of `qemu-img snapshot -a`
    over the same pool, interleaved rounds (the order alternates), for each size written after the
    snapshot. The pool lives on a scratch XFS with reflinks when `reflinks`, else in WORK (ext4).
    Returns ({written: {side: [seconds per round]}}, {written: {side: allocated bytes of the pool
    after}}) or a reason."""
    missing = missing_tools("qemu-img", "qemu-io", "fallocate", *(["mkfs.xfs", "losetup", "filefrag"] if reflinks else []))
    if missing:
        return f"skipped: {', '.join(missing)} not found (scripts/install-deps.sh installs qemu-utils, xfsprogs, e2fsprogs)", {}
    work = os.path.join(WORK, "revert")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    results, allocated = {}, {}
    try:
        with (reflink_filesystem(work) if reflinks else contextlib.nullcontext(work)) as where:
            pool = os.path.join(where, "pool")
            commands = {"poolfs": f"'{binary}' snapshot revert --type dir {pool} class >/dev/null",
                        "qemu-img": f"for f in {pool}/*.qcow2; do qemu-img snapshot -a class \"$f\" || exit 1; done"}
            for written in sizes:
                template = make_revert_template(where, written, reflinks)
                results[written] = {side: [] for side in commands}
                allocated[written] = {}
                for r in range(rounds):
                    for side in (list(commands) if r % 2 == 0 else list(commands)[::-1]):
                        fill_revert_pool(pool, template, written, reflinks)
                        start = time.perf_counter()
                        sh(commands[side])
                        results[written][side].append(time.perf_counter() - start)
                        if r == 0:
                            check_reverted(pool, written, side)
                            allocated[written][side] = sum(os.stat(os.path.join(pool, f)).st_blocks * 512 for f in os.listdir(pool))
                    v = results[written]
                    print(f"revert {written >> 20} MiB round {r + 1}/{rounds}: poolfs {v['poolfs'][-1]:.3f} s, "
                          f"qemu-img {v['qemu-img'][-1]:.3f} s, {v['qemu-img'][-1] / v['poolfs'][-1]:.1f}×", flush=True)
                shutil.rmtree(pool, ignore_errors=True)
                os.remove(template)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results, allocated


SECTIONS = ["peers", "pool", "lvm", "iscsi", "partitions", "rbd", "raw", "writes", "copyout", "revert"]


def peers(binary, rounds, quick):
    """poolfs, qemu-storage-daemon and qcowmount on the same qcow2 images: markdown lines."""
    size = make_images(quick)
    image_files = [os.path.join(WORK, "images", n) for n in os.listdir(os.path.join(WORK, "images")) if n.endswith(".qcow2")]
    cases = [("sequential MB/s: live", "live.qcow2", None), ("sequential MB/s: snapshot", "live.qcow2", "snap"),
             ("sequential MB/s: compressed", "compressed.qcow2", None), ("sequential MB/s: top of 3-level chain", "top.qcow2", None)]
    systems = [Poolfs(binary), QemuStorageDaemon(), Qcowmount()]
    images = ["live.qcow2", "compressed.qcow2", "top.qcow2"]
    results = {(c[0], s.name): [] for c in cases for s in systems}
    results.update({("4 KiB random read IOPS, 4 jobs: live", s.name): [] for s in systems})
    rss = {s.name: 0 for s in systems}
    reference, wrong = {}, set()  # poolfs's bytes (tested against qemu-img) and peers that differ
    for r in range(rounds):
        for system in systems:
            system.start(images)
            try:
                for label, image, snapshot in cases:
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
                    results[(label, system.name)].append(sequential(path, os.path.getsize(path)))
                path = system.path("live.qcow2")
                if path:
                    results[("4 KiB random read IOPS, 4 jobs: live", system.name)].append(random_iops(path, 3 if quick else 8))
                if r == 0 and system.pid and path:
                    streamed = 0
                    while streamed < 4 * GiB:
                        sequential(path, os.path.getsize(path))
                        streamed += os.path.getsize(path)
                    rss[system.name] = peak_rss_kib(system.pid)
            finally:
                system.stop()
        print(f"round {r + 1}/{rounds} done", flush=True)

    def med(label, name):
        values = results.get((label, name)) or []
        return statistics.median(values) if values else None

    lines = ["", f"qcow2 images of {size >> 20} MiB, one mount per system per round:", "",
             "| measurement | poolfs | qemu-storage-daemon | qcowmount | poolfs / qsd | poolfs / qcowmount |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    fmt = lambda v: "n/a" if v is None else f"{v:,.0f}"
    ratio = lambda a, b: "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}×"
    for label in [c[0] for c in cases] + ["4 KiB random read IOPS, 4 jobs: live"]:
        p, q, c = med(label, "poolfs"), med(label, "qemu-storage-daemon"), med(label, "qcowmount")
        cell = lambda v, name: fmt(v) + (" (wrong data)" if (label, name) in wrong else "")
        lines.append(f"| {label} | {fmt(p)} | {cell(q, 'qemu-storage-daemon')} | {cell(c, 'qcowmount')} | "
                     f"{ratio(p, q)} | {ratio(p, c)} |")
    lines.append(f"| peak RSS streaming 4 GiB, MiB (poolfs: cache_size=64M) | {rss['poolfs'] / 1024:.0f} | "
                 f"{rss['qemu-storage-daemon'] / 1024:.0f} | {rss['qcowmount'] / 1024:.0f} | | |")
    if wrong:
        lines += ["", "(wrong data): the peer's bytes differ from poolfs's, which the test suite checks against qemu-img."]
    return lines


def ratio_table(results, a, b, header):
    """Markdown rows of the medians of sides `a` and `b`, their ratio and each round's ratio, or
    the reason the section was skipped."""
    if isinstance(results, str):
        print(results, flush=True)
        return [results]
    lines = [header, "| --- | ---: | ---: | ---: | --- |"]
    for label, sides in results.items():
        x, y = statistics.median(sides[a]), statistics.median(sides[b])
        per_round = ", ".join(f"{p / q:.2f}" for p, q in zip(sides[a], sides[b]))
        lines.append(f"| {label} | {x:,.0f} | {y:,.0f} | {x / y:.2f}× | {per_round} |")
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("binary")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="256 MiB images, 100-volume pool: a smoke run")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, of {', '.join(SECTIONS)} (default: all)")
    args = parser.parse_args()
    sections = args.sections.split(",")
    if unknown := [x for x in sections if x not in SECTIONS]:
        parser.error(f"unknown sections: {', '.join(unknown)}")
    os.makedirs(WORK, exist_ok=True)
    binary = os.path.abspath(args.binary)
    lines = [f"Measured {datetime.date.today()} on {platform.node()}: {os.cpu_count()} cores, "
             f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30} GiB, kernel {platform.release()}; "
             f"{args.rounds} interleaved rounds, medians."]
    if "peers" in sections:
        lines += peers(binary, args.rounds, args.quick)
    if "pool" in sections:
        count = 100 if args.quick else 1000
        meta, files = pool_metadata(binary, make_big_pool(count, 5), args.rounds)
        lines += ["", f"Pool of {count} volumes × 5 snapshots ({files} files), poolfs only (the peers mount one image each):", "",
                  "| measurement | seconds |", "| --- | ---: |",
                  f"| mount | {meta['mount']:.3f} |", f"| `ls -l` of the top, cold | {meta['ls_cold']:.3f} |",
                  f"| `ls -l` of the top, warm | {meta['ls_warm']:.3f} |", f"| stat of every file | {meta['stat_all']:.3f} |"]
    if "lvm" in sections:
        lvm_size = 128 * MiB if args.quick else 512 * MiB
        lvm = lvm_without_devicemapper(binary, lvm_size, args.rounds)
        lines += ["", f"LVM without device-mapper (`-o noactivate`, the PVs on a loop device), {lvm_size >> 20} MiB LVs "
                  "made by a real kernel in a VM, one mount, interleaved rounds:", "",
                  "| sequential read | MB/s | / linear LV |", "| --- | ---: | ---: |"]
        for label, value in lvm.items():
            lines.append(f"| {label} | {value:,.0f} | {value / lvm['linear LV']:.2f}× |")
    if "iscsi" in sections:
        lun_size = 256 * MiB if args.quick else 1 * GiB
        lines += ["", f"iSCSI: a {lun_size >> 20} MiB LUN of random data served by a tgtd of the bench's own on 127.0.0.1, "
                  "read through poolfs (`--type iscsi`) and through qemu-storage-daemon's FUSE export (its iscsi driver), "
                  "both mounted, interleaved rounds:", ""]
        lines += ratio_table(iscsi_vs_qsd(binary, lun_size, args.rounds, 3 if args.quick else 8), "poolfs", "qsd",
                             "| measurement | poolfs | qemu-storage-daemon | poolfs / qsd | per round |")
    if "partitions" in sections:
        disk_size = 256 * MiB if args.quick else 1 * GiB
        lines += ["", f"Partition files: a {disk_size >> 20} MiB disk with a GPT and one partition from 1 MiB to the end "
                  "(random data), raw and qcow2; sequential MB/s of `.partitions/<vol>/part1` and of the same bytes "
                  "of `<vol>`, one mount, interleaved rounds:", ""]
        lines += ratio_table(partitions_vs_volumes(binary, disk_size, args.rounds), "partition", "volume",
                             "| volume | partition | volume | partition / volume | per round |")
    if "rbd" in sections:
        if shutil.which("ceph-mon") and shutil.which("rbd-fuse"):
            lines += rbd_section(binary, 256 * MiB if args.quick else 1 * GiB, args.rounds, args.quick)
        else:
            lines += ["", "Ceph RBD: skipped (ceph-mon or rbd-fuse not installed: scripts/install-deps.sh)."]
    if "raw" in sections:
        raw_size = 256 * MiB if args.quick else 1 * GiB
        reads, logged = raw_reads(binary, raw_size, args.rounds)
        lines += ["", f"Raw files: a {raw_size >> 20} MiB raw file of random data in a dir pool, read from the page cache "
                  "through poolfs (FUSE passthrough), poolfs `-o nopassthrough`, qemu-storage-daemon's FUSE export "
                  "(`driver=file` + `driver=raw`) and directly, all mounted at once, interleaved rounds; random reads "
                  "are fio psync, 4 jobs, buffered, each 4 KiB block read once:", ""]
        if isinstance(reads, str):
            print(reads, flush=True)
            lines.append(reads)
        else:
            lines += [f"poolfs's log, default mount: \"{logged['poolfs']}\"; `-o nopassthrough` mount: \"{logged['nopassthrough']}\".", "",
                      "| measurement | poolfs | nopassthrough | qsd | file | poolfs / nopassthrough | poolfs / qsd | poolfs / file | poolfs / qsd per round |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
            for label, sides in reads.items():
                m = {s: statistics.median(v) for s, v in sides.items()}
                per_round = ", ".join(f"{p / q:.2f}" for p, q in zip(sides["poolfs"], sides["qsd"]))
                lines.append(f"| {label} | {m['poolfs']:,.0f} | {m['nopassthrough']:,.0f} | {m['qsd']:,.0f} | {m['file']:,.0f} | "
                             f"{m['poolfs'] / m['nopassthrough']:.2f}× | {m['poolfs'] / m['qsd']:.2f}× | "
                             f"{m['poolfs'] / m['file']:.2f}× | {per_round} |")
        lines += ["", f"Writes into a fresh sparse raw file each time ({raw_size >> 20} MiB of 1 MiB writes, "
                  f"{min(raw_size, 256 * MiB) >> 20} MiB of 4 KiB random writes; fio psync, one job, end_fsync, "
                  "verify=crc32c), through poolfs `-o rw` and qemu-storage-daemon's `writable=on` export, interleaved rounds:", ""]
        lines += ratio_table(raw_writes(binary, raw_size, args.rounds), "poolfs", "qsd",
                             "| measurement | poolfs -o rw | qemu-storage-daemon | poolfs / qsd | per round |")
    if "writes" in sections:
        seq_size, rand_size = (256 * MiB, 64 * MiB) if args.quick else (1 * GiB, 256 * MiB)
        lines += ["", f"qcow2 writes into a fresh 2 GiB qcow2 image each time (`qemu-img create`; {seq_size >> 20} MiB of "
                  f"1 MiB sequential writes, {rand_size >> 20} MiB of 4 KiB random writes; fio psync, one job, end_fsync, "
                  "the same random data on both sides), through poolfs `-o rw` and qemu-storage-daemon's `writable=on` "
                  "qcow2 export, interleaved rounds; after every run `qemu-img check` clean and QEMU reading back what the "
                  "mount read, and QEMU reading the same bytes from both sides' images:", ""]
        lines += ratio_table(qcow2_writes(binary, args.rounds, seq_size=seq_size, rand_size=rand_size), "poolfs", "qsd",
                             "| measurement | poolfs -o rw | qemu-storage-daemon | poolfs / qsd | per round |")
    if "copyout" in sections:
        co_size = 1 * GiB if args.quick else 4 * GiB
        times, allocated, strace = copyout(binary, co_size, args.rounds)
        lines += ["", f"Copying out a snapshot: a {co_size >> 30} GiB qcow2, every other 64 MiB written (half allocated), "
                  "snapshot `mid` taken after the first half of the writes; seconds to a raw file (with an fsync of it), "
                  "the images in the page cache, interleaved rounds:", ""]
        if isinstance(times, str):
            print(times, flush=True)
            lines.append(times)
        else:
            label = {"poolfs": "`cp --sparse=always` of poolfs's `.snapshots/v.qcow2/mid`",
                     "convert": "`qemu-img convert -O raw` of a copy reverted to `mid`",
                     "convert -l": "`qemu-img convert -l snapshot.name=mid -O raw`",
                     "cp floor": "`cp --sparse=always` of the same bytes as a raw file in the page cache (cp's floor)"}
            lines += ["| way | seconds | GB/s of the virtual size | allocated MiB | seconds / poolfs's | per round |",
                      "| --- | ---: | ---: | ---: | ---: | --- |"]
            p = statistics.median(times["poolfs"])
            for way, v in times.items():
                m = statistics.median(v)
                per_round = ", ".join(f"{x / y:.2f}" for x, y in zip(v, times["poolfs"]))
                lines.append(f"| {label[way]} | {m:.2f} | {co_size / m / 1e9:.2f} | {allocated[way] >> 20:,} | "
                             f"{m / p:.2f}× | {per_round} |")
            lines += ["", "All four outputs are equal (cmp). A ratio above 1× means poolfs is faster."]
            if strace:
                keys = ["lseek", "read", "write", "copy_file_range", "ioctl", "fadvise64"]
                lines.append("`strace -c -f` of the poolfs `cp`: " + ", ".join(f"{k} {strace[k]:,}" for k in keys if k in strace) + ".")
    if "revert" in sections:
        # 30 × 2 GiB allocated is 60 GiB: on a scratch XFS with reflinks the 30 copies share one
        # template's extents, so every size fits. Without it (no xfsprogs, not root), the pool is
        # made in WORK by fallocate, and the sizes are capped by the disk's free space.
        want = [64 * MiB, 256 * MiB] if args.quick else [256 * MiB, 1 * GiB, 2 * GiB]
        reflinks = os.geteuid() == 0 and not missing_tools("mkfs.xfs", "losetup", "filefrag")
        sizes, note = want, ""
        if not reflinks:
            free = shutil.disk_usage(WORK).free
            big = want[-1]
            while big > want[0] and REVERT_VOLUMES * big * 1.3 + 8 * GiB > free:
                big //= 2
            sizes = sorted({min(want[0], big // 4), big})
            note = (" No scratch XFS (needs root, xfsprogs and a loop device): the pool is in WORK, each copy's clusters allocated by `fallocate`."
                    + ("" if big == want[-1] else f" 30 × {want[-1] >> 20} MiB would not fit ({free >> 30} GiB free): {big >> 20} MiB per volume, the most that leaves a margin."))
        times, allocated = revert_section(binary, args.rounds, sizes, reflinks)
        lines += ["", f"Reverting a pool: {REVERT_VOLUMES} qcow2 volumes of {REVERT_DISK >> 30} GiB (64 KiB clusters), each with snapshot "
                  "`class`, then one contiguous range written after it (its clusters allocated, one run at the end of the file). "
                  + ("The pool is on a scratch XFS (`mkfs.xfs -m reflink=1` on a sparse file, loop device) and each volume is a "
                     "`cp --reflink=always` copy of one template: the copies share the written clusters' extents (checked: "
                     "st_blocks and filefrag), so 30 × 2 GiB allocated costs no 60 GiB of disk, while the revert's writes, "
                     "fdatasyncs and punches are real. " if reflinks else "")
                  + "`poolfs snapshot revert` of the pool (every volume, default --jobs) against a shell loop of "
                  f"`qemu-img snapshot -a class` over the same pool; seconds for all {REVERT_VOLUMES}, interleaved rounds, "
                  "the pool made again (untimed) before each." + note, ""]
        if isinstance(times, str):
            print(times, flush=True)
            lines.append(times)
        else:
            lines += ["| written after the snapshot, per volume | poolfs | qemu-img loop | qemu-img / poolfs | per round | pool allocated after: poolfs, qemu-img |",
                      "| --- | ---: | ---: | ---: | --- | --- |"]
            for written, sides in times.items():
                p, q = statistics.median(sides["poolfs"]), statistics.median(sides["qemu-img"])
                per_round = ", ".join(f"{b / a:.1f}" for a, b in zip(sides["poolfs"], sides["qemu-img"]))
                a = allocated[written]
                lines.append(f"| {written >> 20} MiB ({REVERT_VOLUMES * written >> 20} MiB in all) | {p:.3f} | {q:.3f} | {q / p:.1f}× | {per_round} | "
                             f"{a['poolfs'] >> 20} MiB, {a['qemu-img'] >> 20} MiB |")
            lines += ["", "Both leave every volume reverted (qemu-img check, the snapshot's bytes read back on three of them) "
                      "and give the freed clusters' disk space back (poolfs punches them, qemu-img discards them)."]
    report = "\n".join(lines)
    print(report)
    with open(os.path.join(WORK, "results.md"), "w") as f:
        f.write(report + "\n")


if __name__ == "__main__":
    main()
