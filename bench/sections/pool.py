"""A big pool (1000 volumes × 5 snapshots; 100 with --quick), poolfs only: mount time, cold and
warm `ls -l`, stat of every file."""
import os, shutil, subprocess, time

from ..common import WORK, median, sh, unmount

NAME = "pool"


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


def pool_metadata(binary, pool, rounds):
    """Mount time, and cold and warm `ls -l` + stat of every file, for a big pool (poolfs only):
    ({measurement: [seconds per round]}, files)."""
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
    return results, n


def measure(ctx):
    count = 100 if ctx.quick else 1000
    rounds, files = pool_metadata(ctx.binary, make_big_pool(count, 5), ctx.rounds)
    return {"volumes": count, "snapshots": 5, "files": files, "seconds": rounds}


def render(data):
    meta = {k: median(v) for k, v in data["seconds"].items()}
    return ["", f"Pool of {data['volumes']} volumes × {data['snapshots']} snapshots ({data['files']} files), poolfs only "
            "(the peers mount one image each):", "",
            "| measurement | seconds |", "| --- | ---: |",
            f"| mount | {meta['mount']:.3f} |", f"| `ls -l` of the top, cold | {meta['ls_cold']:.3f} |",
            f"| `ls -l` of the top, warm | {meta['ls_warm']:.3f} |", f"| stat of every file | {meta['stat_all']:.3f} |"]
