"""A raw file in a dir pool: reads through FUSE passthrough, `-o nopassthrough`, qemu-storage-daemon
and the file itself; writes through `-o rw` and qemu-storage-daemon's writable export."""
import os, shutil, statistics

from ..common import (WORK, MiB, GiB, digest, drop_file_cache, fio_json, make_random_file, missing_tools, raw_random_iops,
                      ratio_table, sequential_cached, settle_writeback, sh, skipped, start_poolfs, start_qsd_raw, stop_mount,
                      stop_qsd, warm, which_path)

NAME = "raw"


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


def measure(ctx):
    size = 256 * MiB if ctx.quick else 1 * GiB
    reads, logged = raw_reads(ctx.binary, size, ctx.rounds)
    if isinstance(reads, str):
        skipped(reads)
    writes = raw_writes(ctx.binary, size, ctx.rounds)
    return {"file_bytes": size, "reads": reads, "logged": logged,
            "writes": skipped(writes) if isinstance(writes, str) else writes}


def render(data):
    raw_size, reads, logged = data["file_bytes"], data["reads"], data["logged"]
    lines = ["", f"Raw files: a {raw_size >> 20} MiB raw file of random data in a dir pool, read from the page cache "
             "through poolfs (FUSE passthrough), poolfs `-o nopassthrough`, qemu-storage-daemon's FUSE export "
             "(`driver=file` + `driver=raw`) and directly, all mounted at once, interleaved rounds; random reads "
             "are fio psync, 4 jobs, buffered, each 4 KiB block read once:", ""]
    if isinstance(reads, str):
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
    return lines + ratio_table(data["writes"], "poolfs", "qsd",
                               "| measurement | poolfs -o rw | qemu-storage-daemon | poolfs / qsd | per round |")
