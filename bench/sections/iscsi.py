"""An iSCSI LUN served by a tgtd of the bench's own, through poolfs (`--type iscsi`) and through
qemu-storage-daemon's FUSE export (its iscsi driver)."""
import os, signal, subprocess

from ..common import (WORK, MiB, GiB, digest, drop_file_cache, make_random_file, missing_tools, random_iops, ratio_table,
                      sequential, skipped, stop_mount, unmount, wait_mounted, warm)
from ..fixtures.tgt import TgtTarget

NAME = "iscsi"


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


def measure(ctx):
    size = 256 * MiB if ctx.quick else 1 * GiB
    results = iscsi_vs_qsd(ctx.binary, size, ctx.rounds, 3 if ctx.quick else 8)
    return {"lun_bytes": size, "results": skipped(results) if isinstance(results, str) else results}


def render(data):
    return ["", f"iSCSI: a {data['lun_bytes'] >> 20} MiB LUN of random data served by a tgtd of the bench's own on 127.0.0.1, "
            "read through poolfs (`--type iscsi`) and through qemu-storage-daemon's FUSE export (its iscsi driver), "
            "both mounted, interleaved rounds:", ""] + ratio_table(
        data["results"], "poolfs", "qsd", "| measurement | poolfs | qemu-storage-daemon | poolfs / qsd | per round |")
