#!/usr/bin/env bash
# Builds and runs the libFuzzer targets in Fuzz/ (AddressSanitizer, coverage-guided).
#
#   scripts/fuzz.sh build                  build every target (-sanitize=fuzzer,address)
#   scripts/fuzz.sh run [TARGET...]        run each for FUZZ_SECONDS (default 600), corpus kept
#   scripts/fuzz.sh smoke                  run each for FUZZ_SMOKE_SECONDS (default 3) from its seeds
#
# Everything lives in fuzz/ (gitignored): seeds/ (remade by scripts/fuzz-seeds.sh), corpus/ (what
# runs found, kept between runs), crashes/TARGET/ (crash-*, timeout-*, oom-*, leak-* inputs) and
# logs/. Exits non-zero if any target found a crash, a hang (-timeout) or an allocation over the
# limits: each is a bug to fix, and then a named regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="/opt/swift/usr/bin:$PATH"

# target  product  max_len
targets=(
    "qcow2-read      FuzzQcow2Read      1048576"
    "qcow2-write     FuzzQcow2Write     1048576"
    "vdi-read        FuzzVdiRead        1048576"
    "qed-read        FuzzQedRead        1048576"
    "vmdk-read       FuzzVmdkRead       1048576"
    "vpc-read        FuzzVpcRead        4194304"
    "vhdx-read       FuzzVhdxRead       12582912"
    "lvm-report      FuzzLVMReport      16384"
    "snapshot-store  FuzzSnapshotStore  262144"
    "thin-metadata   FuzzThinMetadata   131072"
    "libvirt-xml     FuzzLibvirtXML     4096"
    "mount-options   FuzzMountOptions   1024"
)
work=fuzz
scratch=.build-fuzz
# Release (-O keeps Swift's bounds, overflow and precondition checks; Sources/ has no assert) is 5
# to 20 times faster per input than debug here. -enable-testing for the targets' @testable imports.
build_flags=(-c release --scratch-path "$scratch" -Xswiftc -enable-testing
             -Xswiftc -sanitize=fuzzer,address -Xcc -fsanitize=fuzzer-no-link,address)
bin="$scratch/release"
# Crashes are reported by ASan and libFuzzer, whose handlers the Swift backtracer would pre-empt.
export SWIFT_BACKTRACE=enable=no

build() {
    for t in "${targets[@]}"; do
        read -r _ product _ <<<"$t"
        # gold warns about every ASan register thunk it cannot export; they are harmless.
        POOLFS_FUZZ=1 swift build "${build_flags[@]}" --product "$product" 2>&1 | grep -v "Cannot export local symbol" || true
        [ -x "$bin/$product" ] || { echo "fuzz: $product did not build" >&2; exit 1; }
    done
}

# run SECONDS CORPUS_ROOT LEAKS TARGET...
# LEAKS: LeakSanitizer after inputs that freed less than they allocated. The engine's caches do
# that on purpose, and the scan of a 500 MB process then costs more than the input: long runs
# leave it off and rely on -rss_limit_mb for growth without bound; the smoke run keeps it.
run() {
    local seconds=$1 corpus_root=$2 leaks=$3; shift 3
    local failed=()
    scripts/fuzz-seeds.sh "$work/seeds" >/dev/null
    mkdir -p "$work/logs"
    for t in "${targets[@]}"; do
        read -r name product max_len <<<"$t"
        if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
        mkdir -p "$corpus_root/$name" "$work/crashes/$name"
        local log="$work/logs/$name.log" tmp
        tmp=$(mktemp -d /dev/shm/poolfs-fuzz-run-XXXXXX 2>/dev/null || mktemp -d)
        local status=0 dict=()
        [ -f "Fuzz/Dictionaries/$name.dict" ] && dict=(-dict="Fuzz/Dictionaries/$name.dict")
        # -timeout: a hang is a bug. -rss_limit_mb and -malloc_limit_mb: no input may make the
        # engine allocate without bound (its largest legitimate buffers are a few MiB).
        POOLFS_FUZZ_TMP="$tmp" "$bin/$product" -max_total_time="$seconds" -timeout=10 \
            -rss_limit_mb=2048 -malloc_limit_mb=512 -detect_leaks="$leaks" -max_len="$max_len" -print_final_stats=1 \
            "${dict[@]}" -artifact_prefix="$work/crashes/$name/" "$corpus_root/$name" "$work/seeds/$name" >"$log" 2>&1 || status=$?
        rm -rf "$tmp"
        local runs
        runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo "?")
        if [ "$status" -ne 0 ]; then
            failed+=("$name")
            echo "fuzz: $name FAILED after $runs executions (exit $status); log $log, inputs in $work/crashes/$name/:" >&2
            grep -m1 -A12 -E "^==[0-9]+==ERROR|Fatal error|deadly signal|ALARM|out-of-memory|malloc\(" "$log" >&2 || tail -20 "$log" >&2
        else
            echo "fuzz: $name: $runs executions in ${seconds}s, no crash (corpus $(ls "$corpus_root/$name" | wc -l) inputs)"
        fi
    done
    [ ${#failed[@]} -eq 0 ] || { echo "fuzz: crashes in: ${failed[*]}" >&2; return 1; }
}

case "${1:-}" in
    build) build ;;
    run) shift; build; run "${FUZZ_SECONDS:-600}" "$work/corpus" 0 "$@" ;;
    smoke)
        build
        corpus=$(mktemp -d)
        trap 'rm -rf "$corpus"' EXIT
        run "${FUZZ_SMOKE_SECONDS:-3}" "$corpus" 1 ;;
    *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac
