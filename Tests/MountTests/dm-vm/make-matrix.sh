#!/bin/sh
# Builds the LVM matrix the device-mapper tests read, inside scripts/dm-vm.sh's VM, on two blank
# disks (/dev/vda, /dev/vdb, ~96 MiB each), and dumps what device-mapper itself reads from every
# LV into OUTDIR/expected/<lv>.raw. Also OUTDIR/lvs.json (the lvs report, all active),
# OUTDIR/lvs-inactive.json (after vgchange -an) and OUTDIR/matrix.txt.
# Leaves every LV of the VG inactive. Usage (in the VM): [VG=name] sh make-matrix.sh OUTDIR
#
#   VG pfsvm (or $VG) over vda and vdb, 4 MiB extents:
#   linear     16 MiB linear on vda, random data
#   striped    16 MiB striped over both PVs (-i2 -I64k), random data
#   snap       classic snapshot of linear (-L 8M, 4 KiB chunks), then writes to linear:
#              2 MiB at 1 MiB and partial chunks (512 B at odd offsets)
#   snapfull   classic snapshot of linear (-L 4M, 4 KiB chunks) that overflows: 4.5 MiB more is
#              written to linear afterwards, so lvm marks it invalid (attr I); no dump for it
#   pool       thin pool, 32 MiB, 64 KiB chunks (hidden by poolfs)
#   thin       thin LV, -V 64M, data at scattered offsets (partial chunks too)
#   thinsnap   thin snapshot of thin (activation skip set), then writes and discards to thin
#   thinsnap2  thin snapshot of thinsnap (after writing to thinsnap), then more writes to thinsnap
set -eu
out="${1:?usage: make-matrix.sh OUTDIR}"
vg="${VG:-pfsvm}"
export LVM_SUPPRESS_FD_WARNINGS=1
t() { timeout 120 "$@"; }
# wr LV OFFSET_BYTES COUNT_BYTES: random bytes written through the dm device, synchronously.
wr() { t sh -c "head -c $3 /dev/urandom | dd of=/dev/$vg/$1 bs=512 seek=$(($2 / 512)) conv=notrunc,fsync iflag=fullblock status=none"; }
# wrb LV OFFSET_BYTES COUNT_BYTES: the same at any byte offset (partial sectors).
wrb() { t sh -c "head -c $3 /dev/urandom | dd of=/dev/$vg/$1 bs=1 seek=$2 conv=notrunc,fsync status=none"; }
mkdir -p "$out/expected"
start=$(date +%s)

t pvcreate -q -y -ff /dev/vda /dev/vdb
t vgcreate -q -s 4M $vg /dev/vda /dev/vdb
t lvcreate -q -y -Wn -Zn -L 16M -n linear $vg /dev/vda
wr linear 0 16777216
t lvcreate -q -y -Wn -Zn -i2 -I64k -L 16M -n striped $vg
wr striped 0 16777216

t lvcreate -q -y -s -L 8M --chunksize 4k -n snap $vg/linear
wr linear 1048576 2097152
wrb linear 8389000 512
wrb linear 9000001 100
wrb linear 12582912 4097
t lvcreate -q -y -s -L 4M --chunksize 4k -n snapfull $vg/linear
wr linear 10485760 4718592

t lvcreate -q -y --type thin-pool -L 32M -n pool $vg
t lvcreate -q -y -V 64M -T $vg/pool -n thin
wr thin 0 1048576
wr thin 5242880 262144
wrb thin 20974520 70000
wr thin 41943040 2097152
wr thin 66056192 4096
t lvcreate -q -y -s -n thinsnap $vg/thin
wr thin 5242880 524288
wr thin 31457280 1048576
t blkdiscard -o 0 -l 1048576 /dev/$vg/thin
t blkdiscard -o 42008576 -l 131072 /dev/$vg/thin
t lvchange -q -ay -K $vg/thinsnap
wr thinsnap 2097152 262144
t lvcreate -q -y -s -n thinsnap2 $vg/thinsnap
wr thinsnap 2359296 131072
t blkdiscard -o 41943040 -l 65536 /dev/$vg/thinsnap
t lvchange -q -ay -K $vg/thinsnap2
sync

# What device-mapper reads: the expected bytes of every volume and snapshot file.
for lv in linear striped snap thin thinsnap thinsnap2; do
    t dd if=/dev/$vg/$lv of="$out/expected/$lv.raw" bs=1M status=none
done
if t dd if=/dev/$vg/snapfull of=/dev/null bs=1M count=1 status=none 2>/dev/null; then
    echo "make-matrix: snapfull still reads: it did not overflow" >&2; exit 1
fi
t lvs -a --reportformat json --units b --nosuffix -o lv_name,vg_name,lv_size,lv_attr,origin,pool_lv,segtype,seg_start,seg_size,stripes,stripe_size,seg_pe_ranges,lv_path,thin_id,transaction_id,data_lv,metadata_lv,chunk_size,snap_percent,lv_active,lv_skip_activation,devices $vg > "$out/lvs.json"
t lvs -a -o lv_name,lv_attr,origin,pool_lv,segtype,lv_size,data_percent,snap_percent,lv_skip_activation,devices $vg > "$out/matrix.txt"
t vgchange -q -an $vg
t lvs -a --reportformat json --units b --nosuffix -o lv_name,vg_name,lv_size,lv_attr,origin,pool_lv,segtype,seg_start,seg_size,stripes,stripe_size,seg_pe_ranges,lv_path,thin_id,transaction_id,data_lv,metadata_lv,chunk_size,snap_percent,lv_active,lv_skip_activation,devices $vg > "$out/lvs-inactive.json"
echo "make-matrix: built in $(( $(date +%s) - start )) s"
