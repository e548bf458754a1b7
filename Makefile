# poolfs: `make demo` and `make test` do all set-up on a fresh Debian/Ubuntu machine.
SHELL := /bin/bash
export PATH := /opt/swift/usr/bin:$(PATH)
PREFIX ?= /usr/local
SWIFT_RELEASE := swift build -c release
BIN_RELEASE = $(shell swift build -c release --show-bin-path 2>/dev/null)/poolfs

.PHONY: all deps build release demo demo-stop test fuzz bench bench-quick install uninstall clean

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
	POOLFS_BIN="$$(swift build --show-bin-path)/poolfs" swift test
	FUZZ_SMOKE_SECONDS=$(FUZZ_SMOKE_SECONDS) scripts/fuzz.sh smoke

# libFuzzer + AddressSanitizer over every parser of untrusted input (Fuzz/): each target runs
# FUZZ_SECONDS from its seeds and the corpus of earlier runs (fuzz/); crashes go to fuzz/crashes/.
FUZZ_SECONDS ?= 600
FUZZ_SMOKE_SECONDS ?= 3
fuzz: deps
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh run

# poolfs against qemu-storage-daemon's FUSE export and qcowmount, same images, one run (bench/run.py).
bench: release
	@scripts/install-deps.sh libqcow-utils
	bench/run.py "$(BIN_RELEASE)"

bench-quick: release
	@scripts/install-deps.sh libqcow-utils
	bench/run.py "$(BIN_RELEASE)" --quick --rounds 2

# Installs the binary, and the helper that lets mount(8) and fstab use `-t fuse.poolfs`.
install: release
	install -D -m 755 "$(BIN_RELEASE)" "$(DESTDIR)$(PREFIX)/bin/poolfs"
	install -D -m 755 mount-helpers/mount.fuse.poolfs "$(DESTDIR)/sbin/mount.fuse.poolfs"
	sed -i 's|^POOLFS=.*|POOLFS="$(PREFIX)/bin/poolfs"|' "$(DESTDIR)/sbin/mount.fuse.poolfs"

uninstall:
	rm -f "$(DESTDIR)$(PREFIX)/bin/poolfs" "$(DESTDIR)/sbin/mount.fuse.poolfs"

clean:
	rm -rf .build .build-fuzz demo-pool demo-mnt bench-work fuzz
