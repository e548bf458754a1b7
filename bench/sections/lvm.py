"""LVM without device-mapper (`-o noactivate`): a linear LV, a classic snapshot and a thin LV read
from their PVs on a loop device."""
import os, subprocess

from ..common import WORK, MiB, drop_file_cache, median, sequential, sh, unmount, warm
from ..fixtures.lvm import make_lvm_disk

NAME = "lvm"


def lvm_without_devicemapper(binary, size, rounds):
    """MB/s of a linear LV, a classic snapshot and a thin LV read from the PVs (-o noactivate),
    interleaved on one mount, with each read's pages dropped first: {file: [MB/s per round]}."""
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
    return results


def measure(ctx):
    size = 128 * MiB if ctx.quick else 512 * MiB
    return {"lv_bytes": size, "results": lvm_without_devicemapper(ctx.binary, size, ctx.rounds)}


def render(data):
    lvm = {label: median(v) for label, v in data["results"].items()}
    lines = ["", f"LVM without device-mapper (`-o noactivate`, the PVs on a loop device), {data['lv_bytes'] >> 20} MiB LVs "
             "made by a real kernel in a VM, one mount, interleaved rounds:", "",
             "| sequential read | MB/s | / linear LV |", "| --- | ---: | ---: |"]
    for label, value in lvm.items():
        lines.append(f"| {label} | {value:,.0f} | {value / lvm['linear LV']:.2f}× |")
    return lines
