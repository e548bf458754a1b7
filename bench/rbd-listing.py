#!/usr/bin/env python3
"""What listing an RBD pool of many images costs the cluster: `ls -l MNT` in a loop for 10 s
through each given poolfs binary, in interleaved rounds, on the bench's one-node cluster (bench/fixtures/ceph.py) with
IMAGES images. Prints, per binary and round, the number of `ls -l`, their median and slowest
time, and the OSD ops a second (from the OSD's `perf dump`, so every binary is counted alike).
Usage: bench/rbd-listing.py [--images N] [--rounds N] POOLFS_BINARY...
"""
import argparse, json, os, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import sh  # noqa: E402
from bench.fixtures.ceph import CephCluster  # noqa: E402
from bench.sections.rbd import RbdPoolfs  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("binaries", nargs="+")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cluster = CephCluster()
    try:
        c = f"-c {cluster.conf}"
        sh(f"seq 0 {args.images - 1} | xargs -P 4 -I{{}} timeout 60 rbd {c} create --size 16M P/img{{}}")
        asok = os.path.join(cluster.dir, "run", "osd.0.asok")

        def osd_ops():
            return json.loads(subprocess.check_output(["ceph", "--admin-daemon", asok, "perf", "dump"]))["osd"]["op"]

        for r in range(args.rounds):
            order = args.binaries if r % 2 == 0 else list(reversed(args.binaries))
            for binary in order:
                fs = RbdPoolfs(binary, cluster.conf)
                fs.start(None)
                try:
                    subprocess.run(["ls", "-l", fs.mnt], stdout=subprocess.DEVNULL, check=True)
                    time.sleep(1.5)
                    ops, start, times = osd_ops(), time.time(), []
                    while time.time() - start < 10:
                        t = time.time()
                        subprocess.run(["ls", "-l", fs.mnt], stdout=subprocess.DEVNULL, check=True)
                        times.append(time.time() - t)
                    ops_per_s = (osd_ops() - ops) / (time.time() - start)
                    times.sort()
                    print(f"round {r + 1} {binary}: {len(times)} ls -l, median {1000 * times[len(times) // 2]:.1f} ms, "
                          f"slowest {1000 * times[-1]:.0f} ms, {ops_per_s:.0f} OSD ops/s", flush=True)
                finally:
                    fs.stop()
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
