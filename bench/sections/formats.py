"""Image formats read natively (vmdk monolithicSparse and streamOptimized, vhdx, vhd, vdi):
poolfs against qemu-storage-daemon's FUSE export of the same file, sequential and 4 KiB random
reads, interleaved rounds.

One pool holds the five images, converted by qemu-img from the same 1 GiB of compressible data
(base64 of random bytes) with a 64 MiB hole; poolfs mounts the pool once per round, qsd exports
each image with its own driver. Before each sequential read the image files are read into the
page cache and the measured file's cached pages are dropped, so the figure is the FUSE path and
the format reader. Target (issue 24): ≥ 2× qsd sequentially, no worse on random reads."""
import os, shutil, subprocess

from ..common import (WORK, MiB, GiB, digest, drop_file_cache, missing_tools, random_iops, ratio_table,
                      sequential, sh, skipped, start_poolfs, start_qsd_export, stop_mount, stop_qsd, warm)

NAME = "formats"

# volume, qemu-img format (qsd's driver), qemu-img convert options
IMAGES = [("sparse.vmdk", "vmdk", "-o subformat=monolithicSparse"),
          ("stream.vmdk", "vmdk", "-o subformat=streamOptimized"),
          ("disk.vhdx", "vhdx", ""),
          ("disk.vhd", "vpc", "-o subformat=dynamic"),
          ("disk.vdi", "vdi", "")]


def make_images(size):
    pool = os.path.join(WORK, "formats")
    stamp = os.path.join(pool, ".made")
    if os.path.exists(stamp) and open(stamp).read() == str(size):
        return pool
    shutil.rmtree(pool, ignore_errors=True)
    os.makedirs(pool)
    print(f"making {size >> 20} MiB images of each format in {pool} ...", flush=True)
    data = os.path.join(WORK, "formats-data.raw")
    sh(f"head -c {size * 3 // 4} /dev/urandom | base64 -w 0 | head -c {size} > {data}")
    sh(f"dd if=/dev/zero of={data} bs=1M seek={size // MiB // 2} count=64 conv=notrunc status=none")
    for name, fmt, options in IMAGES:
        sh(f"qemu-img convert -f raw -O {fmt} {options} {data} {os.path.join(pool, name)}")
    os.remove(data)
    with open(stamp, "w") as f:
        f.write(str(size))
    return pool


def measure(ctx):
    missing = missing_tools("qemu-img", "qemu-storage-daemon")
    if missing:
        return {"results": skipped(f"skipped: {', '.join(missing)} not found")}
    size = 256 * MiB if ctx.quick else 1 * GiB
    pool = make_images(size)
    images = [os.path.join(pool, name) for name, _, _ in IMAGES]
    mnt = os.path.join(WORK, "mnt-formats")
    labels = {name: (f"sequential MB/s: {name}", f"4 KiB random IOPS: {name}") for name, _, _ in IMAGES}
    results = {label: {"poolfs": [], "qsd": []} for pair in labels.values() for label in pair}
    for r in range(ctx.rounds):
        sides = ["poolfs", "qsd"] if r % 2 == 0 else ["qsd", "poolfs"]
        for side in sides:
            for name, fmt, _ in IMAGES:
                if side == "poolfs":
                    proc = start_poolfs(ctx.binary, pool, mnt, "", os.path.join(WORK, "formats-poolfs.log"))
                    path, stop = os.path.join(mnt, name), lambda: stop_mount(mnt, proc)
                else:
                    target = os.path.join(WORK, "formats-qsd.raw")
                    proc = start_qsd_export(target, os.path.join(WORK, "formats-qsd.log"), os.path.join(pool, name),
                                            fmt, writable=False)
                    path, stop = target, lambda: stop_qsd(target, proc)
                try:
                    if r == 0:
                        results.setdefault("_digest", {}).setdefault(name, {})[side] = digest(path)
                    warm(images)
                    drop_file_cache(path)
                    results[labels[name][0]][side].append(sequential(path, os.path.getsize(path)))
                    results[labels[name][1]][side].append(random_iops(path, 3 if ctx.quick else 8))
                finally:
                    stop()
        print(f"formats round {r + 1}/{ctx.rounds} done", flush=True)
    digests = results.pop("_digest", {})
    wrong = sorted(name for name, d in digests.items() if d.get("poolfs") != d.get("qsd"))
    if wrong:
        raise RuntimeError(f"formats: poolfs and qemu-storage-daemon read different bytes of {', '.join(wrong)}")
    return {"image_bytes": size, "results": results}


def render(data):
    lines = ["", f"Image formats: {data.get('image_bytes', 0) >> 20} MiB disks (compressible data, a 64 MiB hole), "
             "poolfs and qemu-storage-daemon's FUSE export of the same file, interleaved rounds:", ""]
    return lines + ratio_table(data["results"], "poolfs", "qsd",
                               "| measurement | poolfs | qemu-storage-daemon | poolfs / qsd | per round |")
