"""poolfs's benchmark, as a package: bench/run.py runs the sections registered in
bench/sections/__init__.py (one file each), with the fixtures of bench/fixtures/ and the helpers
of bench/common.py, and writes bench-work/results.json (every round's figures) and
bench-work/results.md (the tables, made from those figures). bench/report.py puts the tables of a
results.json into docs/benchmarks.md. Standard library only."""
