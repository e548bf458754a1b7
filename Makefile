# poolfs: `make demo` and `make test` do all set-up on a fresh Debian/Ubuntu machine.
SHELL := /bin/bash
export PATH := /opt/swift/usr/bin:$(PATH)
PREFIX ?= /usr/local
SWIFT_RELEASE := swift build -c release
BIN_RELEASE = $(shell swift build -c release --show-bin-path 2>/dev/null)/poolfs

.PHONY: all deps build release demo demo-stop test test-sanitizers fuzz bench bench-quick man install uninstall clean

all: release

deps:
	@scripts/install-deps.sh

build: deps
	swift build

release: deps
	$(SWIFT_RELEASE)

# Builds in release mode, makes a sample pool, mounts it and shows it working.
demo: release
	@scripts/demo.sh "$(BIN_RELEASE)"

demo-stop:
	@scripts/demo.sh --stop

# The whole suite: engine conformance against qemu-img, malformed images, and real FUSE mounts;
# then a few seconds of each fuzz target (it fails on any crash).
# Mount tests need root and /dev/fuse; in CI (CI=true) their absence is a failure, not a skip.
test: deps
	@if [ "$$CI" = "true" ] && [ "$$(id -u)" -ne 0 ]; then echo "make test: CI must run as root (FUSE and loop mounts)" >&2; exit 1; fi
	swift build --build-tests
	swift build --product generate-manual
	POOLFS_BIN="$$(swift build --show-bin-path)/poolfs" swift test
	FUZZ_SMOKE_SECONDS=$(FUZZ_SMOKE_SECONDS) scripts/fuzz.sh smoke
	scripts/check-doc-links.sh

# libFuzzer + AddressSanitizer over every parser of untrusted input (Fuzz/): each target runs
# FUZZ_SECONDS from its seeds and the corpus of earlier runs (fuzz/); crashes go to fuzz/crashes/.
FUZZ_SECONDS ?= 600
FUZZ_SMOKE_SECONDS ?= 3
fuzz: deps
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh run

# Not part of `test`: the concurrent engine, writer and pool tests under ThreadSanitizer (TSan makes
# the power-loss replay and the fuzzers take too long, and they run on one thread), then the
# whole suite (mount tests included, against an ASan-built daemon) under AddressSanitizer. Each
# sanitizer has its own scratch path. Reports from any process (the daemon's go nowhere once it
# daemonizes) are written to $(SAN_REPORTS)/*.PID, and any such file fails the target.
# The dm-vm test boots a VM for minutes and exercises nothing the other mount tests do not; the
# SIGKILL test wants 100 fsync'ed writes before its kills, which an ASan daemon here does not reach.
SAN_REPORTS = $(CURDIR)/.build-sanitizer-reports
SAN_FAIL = { cat "$(SAN_REPORTS)"/* 2>/dev/null; echo "test-sanitizers: failed (reports above, in $(SAN_REPORTS))" >&2; exit 1; }
TSAN_TESTS := CompressedConcurrencyTests|concurrentReadsAgree|readsSeeWritesUnderConcurrency|BackingLockTests|manyThreadsReadOneTable|ThinPoolTests|LogicalPoolActivationTests|CommandRunnerTests|PoolFSTests
test-sanitizers: deps
	rm -rf "$(SAN_REPORTS)" && mkdir -p "$(SAN_REPORTS)"
	swift build --build-tests --sanitize=thread --scratch-path .build-tsan
	TSAN_OPTIONS="log_path=$(SAN_REPORTS)/tsan suppressions=$(CURDIR)/scripts/sanitizers/tsan.supp" \
	    swift test --skip-build --sanitize=thread --scratch-path .build-tsan --filter '$(TSAN_TESTS)' || $(SAN_FAIL)
	swift build --build-tests --sanitize=address --scratch-path .build-asan
	swift build --product generate-manual --sanitize=address --scratch-path .build-asan
	POOLFS_BIN="$$(swift build --sanitize=address --scratch-path .build-asan --show-bin-path)/poolfs" \
	ASAN_OPTIONS="log_path=$(SAN_REPORTS)/asan detect_leaks=0" \
	    swift test --skip-build --sanitize=address --scratch-path .build-asan --skip DeviceMapperVMTests \
	        --skip killedMidWriteLosesNothingAcknowledged || $(SAN_FAIL)
	@if compgen -G "$(SAN_REPORTS)/*" >/dev/null; then $(SAN_FAIL); fi
	@echo "test-sanitizers: no reports"

# poolfs against qemu-storage-daemon's FUSE export and qcowmount, same images, one run; then a big
# pool, LVM from the PVs, an iSCSI LUN against qemu-storage-daemon, partition files against their
# volumes, an RBD image against rbd-fuse and qemu-storage-daemon's rbd driver, raw files (passthrough,
# nopassthrough, qemu-storage-daemon, the file; and writes), qcow2 writes through -o rw against
# qemu-storage-daemon's writable export (fresh images, qemu-img check after each), copying a snapshot
# out, and reverting a pool of 30 qcow2 volumes against a qemu-img snapshot -a loop (bench/run.py; the
# pool on a scratch XFS with reflinks, from xfsprogs, so 30 × 2 GiB written costs no 60 GiB of disk).
# BENCH_ARGS="--sections iscsi,partitions" runs some sections only; "--sections revert" the revert.
# Each section is a file of bench/sections/; every round's figures go to bench-work/results.json, and
# bench/report.py makes the tables of docs/benchmarks.md from them (docs/benchmarks.json keeps them).
bench: release
	@scripts/install-deps.sh libqcow-utils xfsprogs
	bench/run.py "$(BIN_RELEASE)" $(BENCH_ARGS)
	bench/report.py bench-work/results.json

bench-quick: release
	@scripts/install-deps.sh libqcow-utils xfsprogs
	bench/run.py "$(BIN_RELEASE)" --quick --rounds 2 $(BENCH_ARGS)

# The man page, poolfs.1 (every subcommand on one page), made by swift-argument-parser's
# GenerateManual plugin from the release build's help texts (Sources/poolfs). The plugin builds
# the package (a no-op after `release`), then runs its generate-manual tool on the binary.
MAN_DIR := .build/plugins/GenerateManual/outputs/poolfs
man: release
	rm -rf "$(MAN_DIR)"
	swift package plugin generate-manual

# Installs the binary, the helper that lets mount(8) and fstab use `-t fuse.poolfs`, the man page
# and bash, zsh and fish completions (scripts/install.sh lists where).
install: man
	scripts/install.sh install "$(BIN_RELEASE)" "$(MAN_DIR)" "$(DESTDIR)" "$(PREFIX)"

uninstall:
	scripts/install.sh uninstall "$(DESTDIR)" "$(PREFIX)"

clean:
	rm -rf .build .build-fuzz demo-pool demo-mnt bench-work fuzz
