"""`poolfs snapshot revert` of a pool of 30 qcow2 volumes against a shell loop of `qemu-img snapshot
-a`, the pool on a scratch XFS with reflinks (xfsprogs) so that 30 × 2 GiB written costs no 60 GiB."""
import contextlib, os, shutil, subprocess, statistics, time

from ..common import WORK, MiB, GiB, missing_tools, mounted, sh, skipped

NAME = "revert"


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


def measure(ctx):
    # 30 × 2 GiB allocated is 60 GiB: on a scratch XFS with reflinks the 30 copies share one
    # template's extents, so every size fits. Without it (no xfsprogs, not root), the pool is
    # made in WORK by fallocate, and the sizes are capped by the disk's free space.
    want = [64 * MiB, 256 * MiB] if ctx.quick else [256 * MiB, 1 * GiB, 2 * GiB]
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
    times, allocated = revert_section(ctx.binary, ctx.rounds, sizes, reflinks)
    # JSON keys are strings: each size written after the snapshot, in bytes.
    return {"volumes": REVERT_VOLUMES, "disk_bytes": REVERT_DISK, "reflinks": reflinks, "note": note,
            "seconds": skipped(times) if isinstance(times, str) else {str(k): v for k, v in times.items()},
            "allocated_bytes": {str(k): v for k, v in allocated.items()}}


def render(data):
    volumes, times, allocated = data["volumes"], data["seconds"], data["allocated_bytes"]
    lines = ["", f"Reverting a pool: {volumes} qcow2 volumes of {data['disk_bytes'] >> 30} GiB (64 KiB clusters), each with snapshot "
             "`class`, then one contiguous range written after it (its clusters allocated, one run at the end of the file). "
             + ("The pool is on a scratch XFS (`mkfs.xfs -m reflink=1` on a sparse file, loop device) and each volume is a "
                "`cp --reflink=always` copy of one template: the copies share the written clusters' extents (checked: "
                "st_blocks and filefrag), so 30 × 2 GiB allocated costs no 60 GiB of disk, while the revert's writes, "
                "fdatasyncs and punches are real. " if data["reflinks"] else "")
             + "`poolfs snapshot revert` of the pool (every volume, default --jobs) against a shell loop of "
             f"`qemu-img snapshot -a class` over the same pool; seconds for all {volumes}, interleaved rounds, "
             "the pool made again (untimed) before each." + data["note"], ""]
    if isinstance(times, str):
        return lines + [times]
    lines += ["| written after the snapshot, per volume | poolfs | qemu-img loop | qemu-img / poolfs | per round | pool allocated after: poolfs, qemu-img |",
              "| --- | ---: | ---: | ---: | --- | --- |"]
    for key, sides in times.items():
        written = int(key)
        p, q = statistics.median(sides["poolfs"]), statistics.median(sides["qemu-img"])
        per_round = ", ".join(f"{b / a:.1f}" for a, b in zip(sides["poolfs"], sides["qemu-img"]))
        a = allocated[key]
        lines.append(f"| {written >> 20} MiB ({volumes * written >> 20} MiB in all) | {p:.3f} | {q:.3f} | {q / p:.1f}× | {per_round} | "
                     f"{a['poolfs'] >> 20} MiB, {a['qemu-img'] >> 20} MiB |")
    lines += ["", "Both leave every volume reverted (qemu-img check, the snapshot's bytes read back on three of them) "
              "and give the freed clusters' disk space back (poolfs punches them, qemu-img discards them)."]
    return lines
