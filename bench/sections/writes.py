"""qcow2 writes through `-o rw` against qemu-storage-daemon's writable qcow2 export, into a fresh
image each time, checked by qemu-img after every run."""
import os, shutil, subprocess

from ..common import (WORK, MiB, GiB, digest, fio_json, missing_tools, ratio_table, settle_writeback, sh, skipped,
                      start_poolfs, start_qsd_qcow2, stop_mount, stop_qsd)

NAME = "writes"


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


def measure(ctx):
    seq_size, rand_size = (256 * MiB, 64 * MiB) if ctx.quick else (1 * GiB, 256 * MiB)
    results = qcow2_writes(ctx.binary, ctx.rounds, seq_size=seq_size, rand_size=rand_size)
    return {"image_bytes": 2 * GiB, "sequential_bytes": seq_size, "random_bytes": rand_size,
            "results": skipped(results) if isinstance(results, str) else results}


def render(data):
    return ["", f"qcow2 writes into a fresh {data['image_bytes'] >> 30} GiB qcow2 image each time (`qemu-img create`; "
            f"{data['sequential_bytes'] >> 20} MiB of 1 MiB sequential writes, {data['random_bytes'] >> 20} MiB of 4 KiB "
            "random writes; fio psync, one job, end_fsync, the same random data on both sides), through poolfs `-o rw` "
            "and qemu-storage-daemon's `writable=on` qcow2 export, interleaved rounds; after every run `qemu-img check` "
            "clean and QEMU reading back what the mount read, and QEMU reading the same bytes from both sides' images:",
            ""] + ratio_table(data["results"], "poolfs", "qsd",
                              "| measurement | poolfs -o rw | qemu-storage-daemon | poolfs / qsd | per round |")
