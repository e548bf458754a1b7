#!/usr/bin/env bash
# Makes the seed corpora of the fuzz targets (Fuzz/) in DIR/<target>/, with the reference tools:
# qemu-img/qemu-io for qcow2 layouts, thin_restore for dm-thin metadata, a Python writer of
# dm-snapshot exception stores, the recorded lvs/vgs/pvs fixtures, and a few pool definitions and
# option lists. Nothing here is committed; `make fuzz` and `make test` run it.
# Usage: scripts/fuzz-seeds.sh DIR
set -euo pipefail
out="$(realpath -m "${1:?usage: fuzz-seeds.sh DIR}")"
root="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d /tmp/poolfs-seeds-XXXXXX)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$out"/{qcow2-read,qcow2-write,vmdk-read,vpc-read,vhdx-read,lvm-report,snapshot-store,thin-metadata,libvirt-xml,mount-options}
cd "$work"

# --- qcow2: small images of every layout the engine reads. Backing and data file names are the
# ones the harness provides in its scratch directory (backing.raw, copy.qcow2, data.raw).
qi() { qemu-io -f qcow2 "$@" >/dev/null; }
truncate -s 3M backing.raw && qemu-io -f raw -c "write -P 0x42 0 3M" backing.raw >/dev/null
qemu-img create -q -f qcow2 copy.qcow2 256K
images=()
make_image() {  # name, create options, size, qemu-io commands...
    local name=$1 opts=$2 size=$3; shift 3
    qemu-img create -q -f qcow2 ${opts:+-o "$opts"} "$name.qcow2" "$size"
    for c in "$@"; do qi -c "$c" "$name.qcow2"; done
    images+=("$name")
}
make_image v3-512 cluster_size=512 128K "write -P 0x11 0 8K" "write -z 16K 4K" "write -P 0x12 64K 1536"
make_image v3-4k cluster_size=4096,refcount_bits=16 1M "write -P 0x21 0 12K" "write -P 0x22 512K 8K" "write -z 768K 64K"
make_image v2 compat=0.10,cluster_size=4096 512K "write -P 0x31 4K 8K"
make_image refcount1 cluster_size=1024,refcount_bits=1 256K "write -P 0x41 0 4K"
make_image refcount64 cluster_size=1024,refcount_bits=64 256K "write -P 0x42 8K 4K"
make_image lazy cluster_size=4096,lazy_refcounts=on 256K "write -P 0x43 0 8K"
make_image prealloc cluster_size=4096,preallocation=metadata 64K
make_image extl2 cluster_size=16384,extended_l2=on 256K "write -P 0x51 2K 3K" "write -z 40K 1K"
make_image extl2-backing cluster_size=16384,extended_l2=on,backing_file=backing.raw,backing_fmt=raw 3M "write -P 0x52 1K 1K"
make_image backing-raw cluster_size=4096,backing_file=backing.raw,backing_fmt=raw 3M "write -P 0x53 8K 4K"
make_image backing-qcow2 cluster_size=4096,backing_file=copy.qcow2,backing_fmt=qcow2 256K "write -P 0x54 0 4K"
make_image datafile cluster_size=4096,data_file=data.raw 256K "write -P 0x55 0 8K"
make_image datafile-raw cluster_size=4096,data_file=data.raw,data_file_raw=on 256K "write -P 0x56 4K 4K"
make_image big-disk cluster_size=65536 64G "write -P 0x57 32G 4K"
make_image snapshots cluster_size=2048 256K "write -P 0x61 0 8K" "write -P 0x62 64K 2K"
qemu-img snapshot -c first snapshots.qcow2 && qi -c "write -P 0x63 0 4K" snapshots.qcow2
qemu-img snapshot -c "lesson 1/start" snapshots.qcow2 && qemu-img resize -q snapshots.qcow2 384K
qi -c "write -P 0x64 300K 2K" snapshots.qcow2
printf 'zlib\nzstd\n' | while read -r kind; do
    qemu-io -f raw -c "write -P 0x71 0 64K" -c "write -P 0x72 128K 32K" backing.raw >/dev/null
    head -c 256K backing.raw > plain.raw
    qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=4096,compression_type=$kind plain.raw "compressed-$kind.qcow2"
    echo "compressed-$kind"
done > compressed.list
images+=($(cat compressed.list))
for name in "${images[@]}"; do cp "$name.qcow2" "$out/qcow2-read/$name"; done

# --- vmdk: each subformat qemu-img makes, small, and descriptors naming the harness's files
# (flat.raw, copy.vmdk; see Fuzz/VmdkRead).
vi() { qemu-io -f vmdk "$@" >/dev/null; }
qemu-img create -q -f vmdk v-sparse.vmdk 1M && vi -c "write -P 0x11 0 64K" -c "write -P 0x12 700K 4K" v-sparse.vmdk
qemu-img create -q -f vmdk -o zeroed_grain=on v-zeroed.vmdk 1M && vi -c "write -P 0x13 0 4K" -c "write -z 64K 64K" v-zeroed.vmdk
qemu-img convert -q -f raw -O vmdk -o subformat=streamOptimized plain.raw v-stream.vmdk
printf 'version=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\nRW 1024 FLAT "flat.raw" 8\nRW 16 ZERO\nRW 2048 FLAT "flat.raw" 0\n' > v-flat.vmdk
printf 'version=1\nCID=1\nparentCID=ffffffff\ncreateType="twoGbMaxExtentSparse"\nRW 64 SPARSE "copy.vmdk"\n' > v-copy.vmdk
for name in v-sparse v-zeroed v-stream v-flat v-copy; do cp "$name.vmdk" "$out/vmdk-read/$name"; done

# --- vdi and qed: every layout qemu-img makes, cut to the 1 MiB the targets read. Backing names
# are the ones Fuzz/QedRead provides (backing.raw, copy.qed).
mkdir -p "$out"/{vdi-read,qed-read}
for v in dynamic:static=off static:static=on; do
    qemu-img create -q -f vdi -o "${v#*:}" "${v%%:*}.vdi" 2M
    qemu-io -f vdi -c "write -P 0x61 1048000 2000" "${v%%:*}.vdi" >/dev/null
    head -c 1M "${v%%:*}.vdi" > "$out/vdi-read/${v%%:*}"
done
qemu-img create -q -f vdi empty-big.vdi 100G && cp empty-big.vdi "$out/vdi-read/empty-big"
qemu-img create -q -f qed copy.qed 1M
qed_seed() {  # name, create options, size, qemu-io commands...
    local name=$1 opts=$2 size=$3; shift 3
    qemu-img create -q -f qed -o "$opts" "$name.qed" "$size"
    for c in "$@"; do qemu-io -f qed -c "$c" "$name.qed" >/dev/null; done
    head -c 1M "$name.qed" > "$out/qed-read/$name"
}
qed_seed c4k cluster_size=4096 5M "write -P 0x71 0 8K" "write -z 1M 4K" "write -P 0x72 4194304 512"
qed_seed t2 cluster_size=4096,table_size=2 64M "write -P 0x73 40M 4K"
qed_seed c64k cluster_size=65536 1M "write -P 0x74 0 64K"
qed_seed backing-raw cluster_size=4096,backing_file=backing.raw,backing_fmt=raw 4M "write -P 0x75 1M 4K"
qed_seed backing-qed cluster_size=4096,backing_file=copy.qed,backing_fmt=qed 1M "write -P 0x76 0 4K"

# The writer's seeds: a 64-byte program (4 operations: kind, pattern, 6 unused bytes, offset in
# sectors, length; see Fuzz/Qcow2Write) before each image.
python3 - "$out/qcow2-write" "${images[@]}" <<'PY'
import struct, sys
out, names = sys.argv[1], sys.argv[2:]
programs = [
    [(0, 0x11, 0, 4096), (2, 0, 16, 8192), (3, 0, 0, 0), (0, 0x22, 7, 70000)],
    [(1, 0x33, 1, 511), (0, 0x44, 0, 65536), (2, 0, 0, 4096), (3, 0, 0, 0)],
    [(2, 0, 0, 131072), (0, 0x55, 3, 100), (0, 0x66, 2, 2000), (3, 0, 0, 0)],
]
for i, name in enumerate(names):
    program = b"".join(struct.pack("<BB6xII", k, p, o, l) for k, p, o, l in programs[i % len(programs)])
    with open(f"{out}/{name}", "wb") as f:
        f.write(program + open(f"{name}.qcow2", "rb").read())
PY

# --- vhd and vhdx: each subformat qemu-img makes, small, with a pattern (vhdx with 1 MiB blocks).
for sub in dynamic fixed; do
    qemu-img create -q -f vpc -o subformat=$sub "$out/vpc-read/$sub" 1M
    qemu-io -f vpc -c "write -P 0x81 0 8K" -c "write -P 0x82 1020K 4K" "$out/vpc-read/$sub" >/dev/null
    qemu-img create -q -f vhdx -o subformat=$sub,block_size=1M "$out/vhdx-read/$sub" 1M
    qemu-io -f vhdx -c "write -P 0x83 4K 8K" "$out/vhdx-read/$sub" >/dev/null
done
qemu-img create -q -f vpc -o force_size=on "$out/vpc-read/force-size" 1049088

# --- dm-thin metadata: thin_restore of small pools, cut after the last block in use.
thin_pool() {  # name, xml
    printf '%s\n' "$2" > "$1.xml"
    truncate -s 4M "$1.meta"
    thin_restore -q -i "$1.xml" -o "$1.meta"
    python3 - "$1.meta" "$out/thin-metadata/$1" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
blocks = [data[i:i + 4096] for i in range(0, len(data), 4096)]
while blocks and blocks[-1] == bytes(4096): blocks.pop()
open(sys.argv[2], "wb").write(b"".join(blocks))
PY
}
thin_pool two-devices '<superblock uuid="" time="2" transaction="3" flags="0" version="2" data_block_size="128" nr_data_blocks="64">
  <device dev_id="1" mapped_blocks="4" transaction="0" creation_time="0" snap_time="1">
    <single_mapping origin_block="0" data_block="5" time="0"/>
    <range_mapping origin_begin="3" data_begin="9" length="3" time="1"/>
  </device>
  <device dev_id="2" mapped_blocks="3" transaction="1" creation_time="1" snap_time="1">
    <single_mapping origin_block="0" data_block="5" time="0"/>
    <range_mapping origin_begin="10" data_begin="20" length="2" time="1"/>
  </device>
</superblock>'
thin_pool empty '<superblock uuid="" time="0" transaction="1" flags="0" version="1" data_block_size="1024" nr_data_blocks="16">
  <device dev_id="7" mapped_blocks="0" transaction="0" creation_time="0" snap_time="0">
  </device>
</superblock>'
python3 - > deep.xml <<'PY'
print('<superblock uuid="" time="1" transaction="1" flags="0" version="2" data_block_size="128" nr_data_blocks="300">')
print('  <device dev_id="3" mapped_blocks="600" transaction="0" creation_time="0" snap_time="0">')
for i in range(600):
    print(f'    <single_mapping origin_block="{i * 3}" data_block="{i % 300}" time="{i % 2}"/>')
print('  </device>')
print('</superblock>')
PY
thin_pool deep "$(cat deep.xml)"

# --- dm-snapshot exception stores: a 4-byte origin size (sectors) before each COW.
python3 - "$out/snapshot-store" <<'PY'
import struct, sys
out = sys.argv[1]
def store(chunk, chunks, records, origin_sectors, valid=1, cut=None):
    e = chunk // 16
    cow = bytearray(chunk * chunks)
    cow[0:16] = struct.pack("<IIII", 0x70416E53, valid, 1, chunk // 512)
    for k, (old, new) in enumerate(records):
        at = (1 + (k // e) * (e + 1)) * chunk + (k % e) * 16
        cow[at:at + 16] = struct.pack("<QQ", old, new)
    for k, (_, new) in enumerate(records):
        cow[new * chunk:new * chunk + 8] = struct.pack("<Q", 0xC0FFEE00 + k)
    return struct.pack("<I", origin_sectors) + bytes(cow[:cut])
def allocation(n, chunk):
    stride, nxt, out = chunk // 16 + 1, 2, []
    for _ in range(n):
        out.append(nxt); nxt += 1
        if nxt % stride == 1: nxt += 1
    return out
seeds = {
    "empty": store(4096, 4, [], 2048),
    "few": store(4096, 12, list(zip([0, 3, 4, 9], allocation(4, 4096))), 2048),
    "two-areas": store(512, 80, list(zip(range(0, 80, 2), allocation(40, 512))), 512),
    "runs": store(1024, 40, list(zip([5, 6, 7, 8, 20, 21, 2], allocation(7, 1024))), 256),
    "invalid": store(4096, 4, [], 64, valid=0),
}
for name, data in seeds.items():
    open(f"{out}/{name}", "wb").write(data)
PY

# --- LVM reports: lvs, vgs and pvs JSON separated by NUL bytes (recorded, then constructed rows).
fixtures="$root/Tests/PoolsTests/Fixtures"
{ cat "$fixtures/lvs.json"; printf '\0'; cat "$fixtures/vgs.json"; printf '\0'; cat "$fixtures/pvs.json"; } > "$out/lvm-report/recorded"
row() { printf '{"lv_name":"%s", "vg_name":"testvg", "lv_size":"%s", "lv_attr":"%s", "origin":"%s", "pool_lv":"%s", "segtype":"%s", "seg_start":"%s", "seg_size":"%s", "stripes":"1", "stripe_size":"%s", "seg_pe_ranges":"%s", "lv_path":"/dev/testvg/%s", "thin_id":"%s", "transaction_id":"%s", "data_lv":"%s", "metadata_lv":"%s", "chunk_size":"%s"}' "$@"; }
{
    printf '{"report":[{"lv":['
    row lin 8388608 -wi-a----- "" "" linear 0 8388608 0 "/dev/loop0:0-1" lin "" "" "" "" 0; printf ','
    row snap 4194304 swi-a-s--- lin "" linear 0 4194304 0 "/dev/loop1:2-2" snap "" "" "" "" 4096; printf ','
    row pool 8388608 twi-a-tz-- "" "" thin-pool 0 8388608 0 "" pool "" 5 "[pool_tdata]" "[pool_tmeta]" 65536; printf ','
    row "[pool_tdata]" 8388608 Twi-ao---- "" "" linear 0 8388608 0 "/dev/loop0:3-4" "[pool_tdata]" "" "" "" "" 0; printf ','
    row thin 16777216 Vwi-a-tz-- "" pool thin 0 16777216 0 "" thin 1 "" "" "" 0; printf ','
    row st 8388608 -wi-a----- "" "" striped 0 4194304 4096 "/dev/loop0:5-5 /dev/loop1:0-0" st "" "" "" "" 0; printf ','
    row st 8388608 -wi-a----- "" "" linear 4194304 4194304 0 "/dev/loop1:7-7" st "" "" "" "" 0
    printf ']}]}\0'
    printf '{"report":[{"vg":[{"vg_name":"testvg", "vg_extent_size":"2097152"}]}]}\0'
    printf '{"report":[{"pv":[{"pv_name":"/dev/loop0", "vg_name":"testvg", "pe_start":"1048576"},{"pv_name":"/dev/loop1", "vg_name":"testvg", "pe_start":"1048576"}]}]}'
} > "$out/lvm-report/constructed"
# Extreme numbers, for mutations to start from (digits mutate slowly into 20-digit ones).
{
    printf '{"report":[{"lv":['
    row big 18446744073709551615 -wi-a----- "" "" striped 0 9223372036854775808 9223372036854775808 "/dev/loop0:4611686018427387904-18446744073709551614 /dev/loop1:0-4398046511103" big "" "" "" "" 0; printf ','
    row big 18446744073709551615 -wi-a----- "" "" linear 9223372036854775808 9223372036854775807 0 "/dev/loop1:18446744073709551614-18446744073709551614" big "" "" "" "" 0
    printf ']}]}\0'
    printf '{"report":[{"vg":[{"vg_name":"testvg", "vg_extent_size":"9223372036854775808"}]}]}\0'
    printf '{"report":[{"pv":[{"pv_name":"/dev/loop0", "vg_name":"testvg", "pe_start":"18446744073709551615"},{"pv_name":"/dev/loop1", "vg_name":"testvg", "pe_start":"0"}]}]}'
} > "$out/lvm-report/extremes"

# --- libvirt pool definitions and -o option lists.
printf "<pool type='dir'>\n  <name>default</name>\n  <target>\n    <path>/var/lib/libvirt/images</path>\n  </target>\n</pool>\n" > "$out/libvirt-xml/dir"
printf '<pool type="logical"><name>vgpool</name><source><name>vg</name></source><target><path>/dev/vg</path></target></pool>' > "$out/libvirt-xml/logical"
printf "<pool type='zfs'><name>tank</name><target><path> /dev/zvol/tank/vms </path></target></pool>" > "$out/libvirt-xml/zfs"
printf "<?xml version='1.0'?><pool  type = 'netfs' ><source><host name='nfs'/></source><target><permissions/><path>/mnt/nfs</path></target></pool>" > "$out/libvirt-xml/netfs"
printf 'ro,allow_other,default_permissions,nofail' > "$out/mount-options/fstab"
printf 'cache_size=64M,threads=16,readahead=2M,max_read=512K\0cow,cow_memory=1G,cache_dir=/var/tmp' > "$out/mount-options/sizes"
printf 'rw,type=logical,noactivate,nosplice,x-systemd.automount,comment=x\0ro' > "$out/mount-options/flags"
echo "fuzz-seeds: $(find "$out" -type f | wc -l) seeds in $out"
