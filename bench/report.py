#!/usr/bin/env python3
"""Makes the benchmark tables of docs/benchmarks.md from figures, so that none is pasted by hand.

docs/benchmarks.json keeps, for each section, the figures of the last full run that measured it
(every round's, with that run's date, machine, rounds and load average). `bench/report.py
RESULTS.json` merges the sections of a bench/run.py run into it (a --quick run is a smoke run and
is refused unless --allow-quick), then rewrites the part of docs/benchmarks.md between its two
markers from docs/benchmarks.json; with no RESULTS.json it only rewrites that part. `--check`
changes nothing and exits 1 if docs/benchmarks.md is not what docs/benchmarks.json makes.
Usage: bench/report.py [RESULTS.json] [--allow-quick] [--check]
"""
import argparse, json, os, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.run import header  # noqa: E402
from bench.sections import SECTIONS  # noqa: E402

DOCS = os.path.join(ROOT, "docs", "benchmarks.md")
STORE = os.path.join(ROOT, "docs", "benchmarks.json")
BEGIN = "<!-- bench/report.py: begin (made from docs/benchmarks.json; edit neither by hand) -->"
END = "<!-- bench/report.py: end -->"
RUN_KEYS = ["date", "host", "cores", "memory_gib", "kernel", "rounds", "quick"]


def load_store():
    if not os.path.exists(STORE):
        return {"sections": {}}
    with open(STORE) as f:
        return json.load(f)


def merge(store, run, allow_quick):
    """Each section of `run` replaces the stored one, with its run's header and timing."""
    if run.get("quick") and not allow_quick:
        sys.exit("bench/report.py: a --quick run is a smoke run (small images, few rounds); "
                 "its figures go into the docs only with --allow-quick")
    for name, data in run["sections"].items():
        store["sections"][name] = {"run": {k: run[k] for k in RUN_KEYS}, "timing": run.get("timing", {}).get(name),
                                   "figures": data}
    return store


def block(store):
    """The generated part of docs/benchmarks.md."""
    lines = [BEGIN, "## Latest figures", "",
             "Each section as the last full run of `make bench` that measured it left it: the tables are made by "
             "`bench/report.py` from [benchmarks.json](benchmarks.json), which holds every round's figures."]
    stored = store["sections"]
    if not stored:
        lines += ["", "No run has been recorded yet: `make bench` records one."]
    for name, section in SECTIONS.items():
        if name not in stored:
            continue
        entry = stored[name]
        title = (section.__doc__ or name).strip().split("\n\n")[0].replace("\n", " ")
        lines += ["", f"### {name}", "", title, "", header(entry["run"])]
        if entry.get("timing"):
            t = entry["timing"]
            lines[-1] += (f" Started {t['started']}, {t['seconds']:.0f} s; load average {t['load_average'][0]} "
                          f"before, {t['load_average'][1]} after.")
        lines += section.render(entry["figures"])
    return "\n".join(lines + ["", END])


def rewrite(text, store):
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        sys.exit(f"bench/report.py: {DOCS} must hold the markers once each:\n{BEGIN}\n{END}")
    before, rest = text.split(BEGIN)
    _, after = rest.split(END)
    return before + block(store) + after


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="?", help="a results.json of bench/run.py (bench-work/results.json)")
    parser.add_argument("--allow-quick", action="store_true")
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    store = load_store()
    if args.results:
        with open(args.results) as f:
            store = merge(store, json.load(f), args.allow_quick)
    with open(DOCS) as f:
        text = f.read()
    new = rewrite(text, store)
    if args.check:
        if new != text:
            sys.exit(f"bench/report.py: {DOCS} is not what {STORE} makes (run bench/report.py)")
        return
    if args.results:
        with open(STORE, "w") as f:
            json.dump(store, f, indent=1)
            f.write("\n")
    with open(DOCS, "w") as f:
        f.write(new)
    print(f"{os.path.relpath(DOCS, ROOT)}: {', '.join(n for n in SECTIONS if n in store['sections']) or 'no sections'}")


if __name__ == "__main__":
    main()
