#!/usr/bin/env python3
"""poolfs against qemu-storage-daemon's FUSE export and qcowmount, on the same images, in one run;
and the other sections of bench/sections/ (a big pool, LVM, iSCSI, partitions, RBD, raw files,
qcow2 writes, copying a snapshot out, reverting a pool).

Writes bench-work/results.json, every round's figures of every section run (written again after
each section, so a failure keeps what was measured), and bench-work/results.md, the tables made
from them, which it also prints. bench/report.py puts those tables into docs/benchmarks.md.
Usage: bench/run.py POOLFS_BINARY [--rounds N] [--quick] [--sections a,b]
"""
import argparse, datetime, json, os, platform, sys, time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import WORK  # noqa: E402
from bench.sections import SECTIONS  # noqa: E402


class Context:
    """What every section's measure() is given."""
    def __init__(self, binary, rounds, quick):
        self.binary, self.rounds, self.quick = binary, rounds, quick


def header(run):
    return (f"Measured {run['date']} on {run['host']}: {run['cores']} cores, {run['memory_gib']} GiB, "
            f"kernel {run['kernel']}; {run['rounds']} interleaved rounds, medians.")


def render(run):
    """The markdown of a results.json: its header, then each section's tables."""
    lines = [header(run)]
    for name, data in run["sections"].items():
        lines += SECTIONS[name].render(data)
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("binary")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="256 MiB images, 100-volume pool: a smoke run")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, of {', '.join(SECTIONS)} (default: all)")
    args = parser.parse_args()
    sections = args.sections.split(",")
    if unknown := [x for x in sections if x not in SECTIONS]:
        parser.error(f"unknown sections: {', '.join(unknown)}")
    os.makedirs(WORK, exist_ok=True)
    binary = os.path.abspath(args.binary)
    run = {"date": str(datetime.date.today()), "host": platform.node(), "cores": os.cpu_count(),
           "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 30, "kernel": platform.release(),
           "rounds": args.rounds, "quick": args.quick, "binary": binary, "complete": False,
           "timing": {}, "sections": {}}
    results_json = os.path.join(WORK, "results.json")
    ctx = Context(binary, args.rounds, args.quick)
    for name, section in SECTIONS.items():
        if name not in sections:
            continue
        started, load = time.time(), os.getloadavg()[0]
        run["sections"][name] = section.measure(ctx)
        # When and under what load each section ran: figures on a shared machine need it.
        run["timing"][name] = {"started": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(timespec="seconds"),
                               "seconds": round(time.time() - started, 1),
                               "load_average": [round(load, 2), round(os.getloadavg()[0], 2)]}
        with open(results_json, "w") as f:
            json.dump(run, f, indent=1)
    run["complete"] = True
    with open(results_json, "w") as f:
        json.dump(run, f, indent=1)
    report = "\n".join(render(run))
    print(report)
    with open(os.path.join(WORK, "results.md"), "w") as f:
        f.write(report + "\n")


if __name__ == "__main__":
    main()
