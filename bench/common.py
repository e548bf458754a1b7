"""What every section uses: shell commands, mounts, timed reads, digests, fio, qemu-storage-daemon
exports, and the helpers that turn figures into markdown. Standard library only."""
import hashlib, json, os, shutil, signal, socket, statistics, subprocess, time

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


def fio_json(args):
    return json.loads(sh("fio --output-format=json --group_reporting --ioengine=psync " + args))["jobs"][0]


def raw_random_iops(path, size):
    """4 KiB random read IOPS, 4 jobs, buffered: each job reads its quarter of `path` once in
    random order (fio's random map), so no read is served by a page an earlier read cached, and
    fio's RANDOM fadvise hint turns readahead off. --invalidate=0: the caller drops pages."""
    escaped = path.replace(":", "\\:")
    return fio_json(f"--name=rand --filename='{escaped}' --readonly --rw=randread --bs=4k --numjobs=4 "
                    f"--size={size // 4} --offset_increment={size // 4} --invalidate=0")["read"]["iops"]


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


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


def missing_tools(*tools):
    return [t for t in tools if shutil.which(t) is None]


def free_port():
    """A port nothing listens on now (bound and released; the server binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_random_file(path, size):
    stamp = path + ".made"
    if os.path.exists(stamp) and open(stamp).read() == str(size):
        return
    sh(f"head -c {size} /dev/urandom > {path}")
    with open(stamp, "w") as f:
        f.write(str(size))


def settle_writeback():
    """Writes back every dirty page of the system (sync) before a timed write run. Each run ends
    with an fsync, which on this ext4 also waited for what earlier steps had left dirty (the other
    side's image, the checking convert's output): the side that went first in a round paid for
    the previous round, 0.82-0.93× in every round poolfs went first and 1.69-2.43× in every round
    it went second."""
    os.sync()


def started(proc, mountpoint, stop):
    """`proc` once its FUSE mount at `mountpoint` is up; stopped with `stop` if it never is."""
    try:
        wait_mounted(mountpoint, proc)
    except BaseException:
        stop(mountpoint, proc)
        raise
    return proc


def start_poolfs(binary, pool, mnt, options, log):
    os.makedirs(mnt, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen([binary, "mount", "--foreground", *(["-o", options] if options else []), pool, mnt],
                                stdout=f, stderr=f)
    return started(proc, mnt, stop_mount)


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
    return started(proc, target, stop_qsd)


def start_qsd_raw(source, target, log, writable):
    """qemu-storage-daemon exporting the raw file `source` at `target`."""
    return start_qsd_export(target, log, source, "raw", writable)


def start_qsd_qcow2(image, target, log):
    """qemu-storage-daemon exporting the qcow2 `image` writable at `target`."""
    return start_qsd_export(target, log, image, "qcow2", writable=True)


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


class System:
    """A way to expose an image as a raw file: start(), path(image) -> file, stop(), pid."""
    name = ""
    def start(self, images): ...
    def stop(self): ...
    def all_paths(self):
        """Every file the system exposes now."""
        return list(self.files.values())


def median(values):
    """The median of a section's per-round figures, or None when it has none."""
    return statistics.median(values) if values else None


def fmt(value):
    return "n/a" if value is None else f"{value:,.0f}"


def ratio(a, b):
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def skipped(reason):
    """A section (or a part of one) that cannot run here: says why now, and the reason is its result."""
    print(reason, flush=True)
    return reason


def ratio_table(results, a, b, header):
    """Markdown rows of the medians of sides `a` and `b`, their ratio and each round's ratio, or
    the reason the section was skipped (a string in place of the results)."""
    if isinstance(results, str):
        return [results]
    lines = [header, "| --- | ---: | ---: | ---: | --- |"]
    for label, sides in results.items():
        x, y = statistics.median(sides[a]), statistics.median(sides[b])
        per_round = ", ".join(f"{p / q:.2f}" for p, q in zip(sides[a], sides[b]))
        lines.append(f"| {label} | {x:,.0f} | {y:,.0f} | {x / y:.2f}× | {per_round} |")
    return lines
