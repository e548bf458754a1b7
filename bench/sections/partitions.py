"""Partition files against their volumes: `.partitions/<vol>/part1` and the same bytes of `<vol>`,
for a raw and a qcow2 disk with a GPT."""
import json, os, shutil, subprocess

from ..common import (WORK, MiB, GiB, digest, drop_file_cache, missing_tools, ratio_table, sequential, sh, skipped,
                      stop_mount, wait_mounted, warm)

NAME = "partitions"


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


def measure(ctx):
    size = 256 * MiB if ctx.quick else 1 * GiB
    results = partitions_vs_volumes(ctx.binary, size, ctx.rounds)
    return {"disk_bytes": size, "results": skipped(results) if isinstance(results, str) else results}


def render(data):
    return ["", f"Partition files: a {data['disk_bytes'] >> 20} MiB disk with a GPT and one partition from 1 MiB to the end "
            "(random data), raw and qcow2; sequential MB/s of `.partitions/<vol>/part1` and of the same bytes "
            "of `<vol>`, one mount, interleaved rounds:", ""] + ratio_table(
        data["results"], "partition", "volume", "| volume | partition | volume | partition / volume | per round |")
