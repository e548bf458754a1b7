#!/bin/sh
# `poolfs snapshot create|revert|delete` on a logical pool, inside scripts/dm-vm.sh's VM, on a
# VG of its own (a 32 MiB loop device on the VM's tmpfs, 1 MiB extents), so the matrix of
# make-matrix.sh stays as it is for the host's checks after. The VG is mounted (device-mapper
# mode) throughout but for the delete. Usage: sh check-snapshots.sh OUTDIR POOLFS VG
#
#   lin    4 MiB linear: classic snapshots (-o cow_size=50%: 2 extents)
#   thin   4 MiB thin LV in a 12 MiB pool: thin snapshots
#   held   2 MiB linear, held open by a process (a running VM): skipped with it named, untouched
#
# Checks (part "snapshot", lines appended to OUTDIR/results.txt as check-in-vm.sh writes them):
#   create       exit status 1 (held skipped), lin and thin done; the LVs lin+class (classic,
#                origin lin) and thin+class (thin, origin thin) exist
#   held         the row of held says "in use" and names the process holding it (sleep, its pid)
#   mount:new    the mount shows .snapshots/lin/class and .snapshots/thin/class within 5 s
#   revert       lin and thin read through the mount, then written on their devices; revert:
#                exit status 1, both done, the devices' bytes equal the dumps
#   mount:revert the mount reads the dumps too (it let the devices go when the files closed)
#   kept         the snapshots are still snapshots of their volume (lvs origin), nothing left over
#   revert2      written again, reverted again: the bytes are the dumps'
#   mount:held   a revert of lin while a file of it is open through the mount: skipped, naming
#                poolfs, and lin untouched
#   delete       (unmounted) delete: no snapshot LV is left
#   untouched    held's bytes and lv_attr are as before; it never had a snapshot
set -u
out="${1:?usage: check-snapshots.sh OUTDIR POOLFS VG}"
poolfs="${2:?usage: check-snapshots.sh OUTDIR POOLFS VG}"
vg="${3:?usage: check-snapshots.sh OUTDIR POOLFS VG}"
export LVM_SUPPRESS_FD_WARNINGS=1
results="$out/results.txt"
part=snapshot
t() { timeout -k 5 "$@"; }
result() {  # result OK|FAIL CHECK [DETAIL...]
    r_status="$1"; r_check="$2"; shift 2
    r_detail="$(printf '%s' "$*" | tr '\n\t' '  ' | cut -c1-3000)"
    printf '%s\t%s\t%s\t%s\n' "$part" "$r_status" "$r_check" "$r_detail" >> "$results"
    echo "RESULT $part $r_status $r_check $r_detail [at $(cut -d' ' -f1 /proc/uptime) s]"
}
start=$(date +%s)
w=/tmp/snapshots
mkdir -p "$w"
# wr LV: 1 MiB of new bytes at 1 MiB, through the device.
wr() { t 60 sh -c "head -c 1048576 /dev/urandom | dd of=/dev/$vg/$1 bs=65536 seek=16 conv=notrunc,fsync iflag=fullblock status=none"; }
# same LV...: every LV's bytes equal its dump; prints what differs.
same() { for s_lv in "$@"; do t 60 cmp "/dev/$vg/$s_lv" "$w/$s_lv.raw" 2>&1 || echo "($s_lv differs)"; done; }
# snap COMMAND NAME [VOLUME...]: poolfs snapshot (with $opts), its output in $w/out.txt, its status in $st.
opts=""
snap() {
    s_cmd="$1"; s_name="$2"; shift 2
    t 300 "$poolfs" snapshot "$s_cmd" --type logical $opts "$vg" "$s_name" "$@" > "$w/out.txt" 2>&1
    st=$?
    echo "check-snapshots: snapshot $s_cmd $s_name: status $st: $(cat "$w/out.txt")"
}
row() { grep -E "^$1 " "$w/out.txt"; }  # the result row of volume $1
origins() { t 60 lvs --noheadings --separator , -o lv_name,lv_attr,origin "$vg" | tr -d ' ' | sort | tr '\n' ' '; }

truncate -s 32M "$w/pv.img"
loop="$(losetup --show -f "$w/pv.img")" || { result FAIL create "no loop device"; exit 0; }
if ! { t 60 pvcreate -q -y "$loop" && t 60 vgcreate -q -s 1M "$vg" "$loop" \
       && t 60 lvcreate -q -y -Wn -Zn -L 4M -n lin "$vg" && t 60 lvcreate -q -y -Wn -Zn -L 2M -n held "$vg" \
       && t 60 lvcreate -q -y --type thin-pool -L 12M -n pool "$vg" && t 60 lvcreate -q -y -V 4M -T "$vg/pool" -n thin; } >/dev/null 2>&1; then
    result FAIL create "the VG could not be built"
    exit 0
fi
for lv in lin held thin; do
    t 60 sh -c "head -c \$(blockdev --getsize64 /dev/$vg/$lv) /dev/urandom | dd of=/dev/$vg/$lv bs=1M conv=notrunc,fsync iflag=fullblock status=none 2>/dev/null"
    t 60 dd if="/dev/$vg/$lv" of="$w/$lv.raw" bs=1M status=none
done
sleep 3600 < "/dev/$vg/held" &
holder=$!
held_attr="$(t 60 lvs --noheadings -o lv_attr "$vg/held" | tr -d ' ')"

m=/tmp/mnt-snapshots
mkdir -p "$m"
if ! t 120 "$poolfs" mount --type logical "$vg" "$m" > "$w/mount.out" 2>&1; then
    result FAIL create "mount: $(cat "$w/mount.out")"
    exit 0
fi
t 10 ls "$m/.snapshots/lin" "$m/.snapshots/thin" >/dev/null 2>&1

opts="-o cow_size=50%"
snap create class
opts=""
lvs_now="$(origins)"
if [ $st -eq 1 ] && row lin | grep -q done && row thin | grep -q done \
   && echo "$lvs_now" | grep -q "lin+class,s[^,]*,lin " && echo "$lvs_now" | grep -q "thin+class,V[^,]*,thin "; then
    result OK create "$lvs_now"
else
    result FAIL create "status $st: $(cat "$w/out.txt"); lvs: $lvs_now"
fi
if row held | grep -q "skipped.*in use: $vg/held is open by sleep (pid $holder)"; then result OK held "$(row held)"; else result FAIL held "$(row held)"; fi
seen=""
for i in 1 2 3 4 5 6 7 8 9 10; do
    if t 10 ls "$m/.snapshots/lin" 2>/dev/null | grep -qx class && t 10 ls "$m/.snapshots/thin" 2>/dev/null | grep -qx class; then seen=yes; break; fi
    sleep 0.5
done
if [ -n "$seen" ]; then
    result OK mount:new "$(t 10 ls "$m/.snapshots/lin" "$m/.snapshots/thin" | tr '\n' ' ')"
else
    result FAIL mount:new "after 5 s: $(t 10 ls "$m/.snapshots/lin" "$m/.snapshots/thin" 2>&1)"
fi

# Read through the mount (it opens the devices), written on the devices, reverted while mounted.
mdiff=""
for lv in lin thin; do t 60 cmp "$m/$lv" "$w/$lv.raw" >/dev/null 2>&1 || mdiff="$mdiff $lv differs through the mount before;"; done
wr lin; wr thin
sleep 0.5  # the kernel's release of the files reaches the daemon
snap revert class
diff="$(same lin thin)"
if [ $st -eq 1 ] && row lin | grep -q done && row thin | grep -q done && [ -z "$diff" ]; then
    result OK revert
else
    result FAIL revert "status $st: $(cat "$w/out.txt"); $diff"
fi
for lv in lin thin; do t 60 cmp "$m/$lv" "$w/$lv.raw" >/dev/null 2>&1 || mdiff="$mdiff $lv differs through the mount after;"; done
if [ -z "$mdiff" ]; then result OK mount:revert; else result FAIL mount:revert "$mdiff"; fi
lvs_now="$(origins)"
if echo "$lvs_now" | grep -q "lin+class,s[^,]*,lin " && echo "$lvs_now" | grep -q "thin+class,V[^,]*,thin " && ! echo "$lvs_now" | grep -q "+old\|+new"; then
    result OK kept "$lvs_now"
else
    result FAIL kept "$lvs_now"
fi

sleep 0.5
wr lin; wr thin
snap revert class
diff="$(same lin thin)"
if [ $st -eq 1 ] && [ -z "$diff" ]; then result OK revert2; else result FAIL revert2 "status $st: $(cat "$w/out.txt"); $diff"; fi

# A file of lin open through the mount: the daemon holds lin's device, so lin is in use.
sleep 3600 < "$m/lin" &
reader=$!
sleep 0.5
wr lin
t 60 dd if="/dev/$vg/lin" of="$w/lin.now" bs=1M status=none
snap revert class lin
kill "$reader" 2>/dev/null; wait "$reader" 2>/dev/null
if [ $st -eq 1 ] && row lin | grep -q "skipped.*in use: $vg/lin is open by poolfs" && t 60 cmp -s "/dev/$vg/lin" "$w/lin.now"; then
    result OK mount:held "$(row lin)"
else
    result FAIL mount:held "status $st: $(cat "$w/out.txt"); lin changed: $(t 60 cmp "/dev/$vg/lin" "$w/lin.now" 2>&1)"
fi
t 120 "$poolfs" unmount "$m" >/dev/null 2>&1 || t 30 umount -l "$m"

snap delete class
left="$(t 60 lvs --noheadings -o lv_name,origin "$vg" | awk 'NF > 1 { print $1 }' | tr '\n' ' ')"
lvs_now="$(origins)"
if [ -z "$left" ] && [ $st -eq 1 ]; then result OK delete "$lvs_now"; else result FAIL delete "status $st, snapshots left: $left; $(cat "$w/out.txt")"; fi
diff="$(same held)"
attr="$(t 60 lvs --noheadings -o lv_attr "$vg/held" | tr -d ' ')"
if [ -z "$diff" ] && [ "$attr" = "$held_attr" ] && ! echo "$lvs_now" | grep -q "held+"; then
    result OK untouched "$attr"
else
    result FAIL untouched "$diff; lv_attr $attr (was $held_attr); $lvs_now"
fi

kill "$holder" 2>/dev/null
wait "$holder" 2>/dev/null
t 60 vgchange -q -an "$vg" >/dev/null 2>&1
losetup -d "$loop"
rm -f "$w/pv.img"
echo "check-snapshots: took $(( $(date +%s) - start )) s"
