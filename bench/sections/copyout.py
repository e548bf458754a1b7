"""Copying a snapshot out to a raw file: `cp` of poolfs's snapshot file against `qemu-img convert`
of a reverted copy and `qemu-img convert -l`, with cp of a raw file as cp's floor."""
import os, shutil, statistics, subprocess, time

from ..common import (WORK, MiB, GiB, drop_file_cache, missing_tools, sh, skipped, start_poolfs, stop_mount,
                      syscall_counts, warm)

NAME = "copyout"


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


LABELS = {"poolfs": "`cp --sparse=always` of poolfs's `.snapshots/v.qcow2/mid`",
          "convert": "`qemu-img convert -O raw` of a copy reverted to `mid`",
          "convert -l": "`qemu-img convert -l snapshot.name=mid -O raw`",
          "cp floor": "`cp --sparse=always` of the same bytes as a raw file in the page cache (cp's floor)"}


def measure(ctx):
    size = 1 * GiB if ctx.quick else 4 * GiB
    times, allocated, strace = copyout(ctx.binary, size, ctx.rounds)
    return {"image_bytes": size, "seconds": skipped(times) if isinstance(times, str) else times,
            "allocated_bytes": allocated, "strace": strace}


def render(data):
    co_size, times, allocated, strace = data["image_bytes"], data["seconds"], data["allocated_bytes"], data["strace"]
    lines = ["", f"Copying out a snapshot: a {co_size >> 30} GiB qcow2, every other 64 MiB written (half allocated), "
             "snapshot `mid` taken after the first half of the writes; seconds to a raw file (with an fsync of it), "
             "the images in the page cache, interleaved rounds:", ""]
    if isinstance(times, str):
        return lines + [times]
    lines += ["| way | seconds | GB/s of the virtual size | allocated MiB | seconds / poolfs's | per round |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    p = statistics.median(times["poolfs"])
    for way, v in times.items():
        m = statistics.median(v)
        per_round = ", ".join(f"{x / y:.2f}" for x, y in zip(v, times["poolfs"]))
        lines.append(f"| {LABELS[way]} | {m:.2f} | {co_size / m / 1e9:.2f} | {allocated[way] >> 20:,} | "
                     f"{m / p:.2f}× | {per_round} |")
    lines += ["", "All four outputs are equal (cmp). A ratio above 1× means poolfs is faster."]
    if strace:
        keys = ["lseek", "read", "write", "copy_file_range", "ioctl", "fadvise64"]
        lines.append("`strace -c -f` of the poolfs `cp`: " + ", ".join(f"{k} {strace[k]:,}" for k in keys if k in strace) + ".")
    return lines
