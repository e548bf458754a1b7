#!/bin/sh
# Mounts the LVM matrix that make-matrix.sh built with poolfs, inside scripts/dm-vm.sh's VM, and
# compares every volume and snapshot file with what device-mapper read (OUTDIR/expected/<lv>.raw).
# Usage (in the VM): sh check-in-vm.sh OUTDIR POOLFS [VG]
#
# Parts, each on a fresh mount of the VG (poolfs daemonized, the default form):
#   dm-inactive   device-mapper mode, every LV inactive before the mount (this used to hang)
#   dm-active     device-mapper mode, linear (with its snapshots), striped and thin active before
#   noactivate    -o noactivate: read from the PVs, no device-mapper, every LV inactive before
#   live          device-mapper mode: -o cow writes read back and leave the LV alone; with -o rw,
#                 an LV and a thin snapshot made while mounted show up, the LV takes writes
#                 through its device, the snapshot refuses them, and removed, it goes away
# Checks per part: mount; cmp:<file> for every file with a dump; tree (find -type f, its list is
# the detail); ls (ls -lR returns); eio:<file> (the overflowed snapshot fails with EIO, at open
# or at reads at three offsets, and returns no data); unmount (and the daemon is gone);
# activation (lv_active of every LV is as before the mount). Every command runs under `timeout`,
# so a hang fails its check (and the reads after it in that part are not tried).
# Results: OUTDIR/results.txt, one line per check: PART<TAB>OK|FAIL<TAB>CHECK<TAB>DETAIL; also
# printed as "RESULT ..." lines. poolfs's syslog messages go to OUTDIR/syslog.txt.
# Exits non-zero only when the checks themselves could not run.
set -u
out="${1:?usage: check-in-vm.sh OUTDIR POOLFS [VG]}"
poolfs="${2:?usage: check-in-vm.sh OUTDIR POOLFS [VG]}"
vg="${3:-pfsvm}"
export LVM_SUPPRESS_FD_WARNINGS=1
results="$out/results.txt"
: > "$results"
t() { timeout -k 5 "$@"; }  # t SECONDS COMMAND...: a hang becomes exit status 124 (137 if killed)

result() {  # result PART OK|FAIL CHECK [DETAIL...]
    r_part="$1"; r_status="$2"; r_check="$3"; shift 3
    r_detail="$(printf '%s' "$*" | tr '\n\t' '  ' | cut -c1-3000)"
    printf '%s\t%s\t%s\t%s\n' "$r_part" "$r_status" "$r_check" "$r_detail" >> "$results"
    echo "RESULT $r_part $r_status $r_check $r_detail [at $(cut -d' ' -f1 /proc/uptime) s]"
}

state() {  # every LV's activation, one "name=active" word each, sorted
    t 60 lvs -a --noheadings -o lv_name,lv_active "$vg" 2>/dev/null | awk '{ print $1 "=" ($2 == "" ? "inactive" : $2) }' | sort | tr '\n' ' '
}

daemon_pids() {  # pids of processes with the absolute path $1 (a mountpoint) as an argument
    # One grep over every command line (NUL-separated arguments, whole-argument match); the
    # pattern "[/]..." does not match grep's own argument.
    grep -lzx -- "[/]${1#/}" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3
}

# Every 30 s, what every process waits for, into OUTDIR/monitor.txt (read it from the host while
# the VM runs, or after): a hang shows there even when this script is stuck too.
(
    while :; do
        {
            echo "=== $(cut -d' ' -f1 /proc/uptime) s"
            timeout 10 ps -eo pid,ppid,stat,wchan:32,etime,args | grep -v ' \[[a-z]'
            for d in $(awk '$3 == "D" { sub("/stat$", "", FILENAME); print FILENAME }' /proc/[0-9]*/task/[0-9]*/stat 2>/dev/null); do
                echo "--- D: $d $(cat "$d/comm" 2>/dev/null)"; timeout 5 cat "$d/stack" 2>/dev/null
            done
            dmesg | tail -n 30
        } > "$out/monitor.tmp" 2>&1
        mv "$out/monitor.tmp" "$out/monitor.txt"
        sleep 30
    done
) &
monitor_pid=$!

# A syslog for the daemon's messages.
/bin/busybox syslogd -n -O "$out/syslog.txt" &
syslogd_pid=$!
sleep 0.5

# The expected bytes in RAM, and the file each dump belongs to (from lvs' origin column).
rm -rf /tmp/expected && mkdir -p /tmp/expected
cp "$out"/expected/*.raw /tmp/expected/ || { echo "check-in-vm: no dumps in $out/expected" >&2; exit 1; }
echo "check-in-vm: dumps copied into the VM [at $(cut -d' ' -f1 /proc/uptime) s]"
files=/tmp/files.txt
: > "$files"
# A snapshot shows under the volume its chain of origins ends at (a thin snapshot of a thin
# snapshot beside the first: its origin is no volume of its own).
t 60 lvs -a --noheadings --separator , -o lv_name,origin "$vg" | tr -d ' ' > /tmp/origins.txt
origin_of() { awk -F, -v lv="$1" '$1 == lv { print $2 }' /tmp/origins.txt; }
path_of() {
    p_origin="$(origin_of "$1")"
    [ -n "$p_origin" ] || { echo "$1"; return; }
    while p_next="$(origin_of "$p_origin")"; [ -n "$p_next" ]; do p_origin="$p_next"; done
    echo ".snapshots/$p_origin/$1"
}
for dump in /tmp/expected/*.raw; do
    lv="$(basename "$dump" .raw)"
    echo "$lv $(path_of "$lv")" >> "$files"
done
full="$(path_of snapfull)"
echo "check-in-vm: files: $(tr '\n' ',' < "$files") and $full (overflowed)"

check_mount() {  # check_mount PART [POOLFS OPTIONS...]
    part="$1"; shift
    m="/tmp/mnt-$part"
    mkdir -p "$m"
    before="$(state)"
    echo "check-in-vm: $part: before the mount: $before"
    start=$(date +%s)
    # To a file, not $(...): the daemon may keep the output open.
    if t 180 "$poolfs" mount --type logical "$@" "$vg" "$m" > /tmp/mount.out 2>&1; then
        result "$part" OK mount "$(cat /tmp/mount.out)"
    else
        result "$part" FAIL mount "status $?: $(cat /tmp/mount.out)"
        cleanup_mount "$part" "$m"
        return
    fi
    hung=""
    while read -r lv rel; do
        if [ -n "$hung" ]; then result "$part" FAIL "cmp:$rel" "not tried: the mount hung at $hung"; continue; fi
        if cmp_out="$(t 120 cmp "/tmp/expected/$lv.raw" "$m/$rel" 2>&1)"; then
            result "$part" OK "cmp:$rel"
        else
            st=$?
            if [ $st -eq 124 ] || [ $st -eq 137 ]; then
                hung="cmp:$rel"
                result "$part" FAIL "cmp:$rel" "hung: no answer in 120 s (status $st): $cmp_out"
                diagnose "$m"
            else
                result "$part" FAIL "cmp:$rel" "status $st: $cmp_out (size $(t 10 stat -c %s "$m/$rel" 2>&1), expected $(stat -c %s "/tmp/expected/$lv.raw"))"
            fi
        fi
    done < "$files"
    if tree="$(t 30 find "$m" -type f -printf '%P\n' 2>&1)"; then
        result "$part" OK tree "$(echo "$tree" | sort | tr '\n' ' ')"
    else
        result "$part" FAIL tree "status $?: $tree"
    fi
    if ls_out="$(t 30 ls -lR "$m" 2>&1)"; then result "$part" OK ls; else result "$part" FAIL ls "status $?: $ls_out"; fi
    echo "$ls_out"
    eio_fail=""
    [ -z "$hung" ] || eio_fail="not tried: the mount hung at $hung"
    [ -n "$hung" ] || for skip in 0 1024 2816; do  # 4 KiB blocks: the start, 4 MiB in, 11 MiB in (chunks copied before the overflow)
        rm -f /tmp/eio.out
        if t 60 dd if="$m/$full" of=/tmp/eio.out bs=4096 skip=$skip count=1 2>/tmp/eio.err; then
            eio_fail="$eio_fail read at block $skip succeeded ($(stat -c %s /tmp/eio.out) bytes);"
        else
            st=$?
            n="$(stat -c %s /tmp/eio.out 2>/dev/null || echo 0)"
            if ! grep -q 'Input/output error' /tmp/eio.err || [ "$n" != 0 ]; then
                eio_fail="$eio_fail read at block $skip: status $st, $n bytes, $(cat /tmp/eio.err);"
            fi
        fi
    done
    if [ -z "$eio_fail" ]; then result "$part" OK "eio:$full"; else result "$part" FAIL "eio:$full" "$eio_fail"; fi
    u_start=$(date +%s)
    if un_out="$(t 120 "$poolfs" unmount "$m" 2>&1)"; then
        left="$(daemon_pids "$m")"
        if [ -z "$left" ]; then result "$part" OK unmount "took $(( $(date +%s) - u_start )) s"; else result "$part" FAIL unmount "the daemon (pid $left) still runs after poolfs unmount returned"; fi
    else
        result "$part" FAIL unmount "status $?: $un_out"
    fi
    cleanup_mount "$part" "$m"
    after="$(state)"
    if [ "$after" = "$before" ]; then
        result "$part" OK activation "$after"
    else
        result "$part" FAIL activation "before the mount: $before; after the unmount: $after"
    fi
    echo "check-in-vm: $part took $(( $(date +%s) - start )) s"
}

diagnose() {  # what the processes are waiting for, when a check hung
    echo "check-in-vm: DIAGNOSIS: processes:"
    ps -eo pid,ppid,stat,wchan:32,etime,args | grep -v '\[' 
    for pid in $(daemon_pids "$1"); do
        for task in /proc/"$pid"/task/*; do
            echo "check-in-vm: DIAGNOSIS: $task ($(cat "$task/comm" 2>/dev/null)) kernel stack:"
            cat "$task/stack" 2>/dev/null | head -12
        done
    done
    echo "check-in-vm: DIAGNOSIS: dmsetup:"; t 10 dmsetup info -c 2>&1
    echo "check-in-vm: DIAGNOSIS: poolfs's syslog:"; grep -a poolfs "$out/syslog.txt" | tail -n 30 | LC_ALL=C tr -c '[:print:]\n' '?'
}

cleanup_mount() {  # unmount and kill whatever is left, by pid
    if grep -q " $2 " /proc/self/mounts; then t 30 fusermount3 -u "$2" 2>/dev/null || t 30 umount -l "$2"; fi
    c_pids="$(daemon_pids "$2")"
    [ -n "$c_pids" ] || return 0
    for pid in $c_pids; do kill "$pid" 2>/dev/null; done
    sleep 1
    for pid in $c_pids; do kill -9 "$pid" 2>/dev/null; done
}

t 60 vgchange -q -an "$vg" >/dev/null
check_mount dm-inactive

t 60 lvchange -q -ay "$vg/linear" "$vg/striped" "$vg/thin"
check_mount dm-active
t 60 vgchange -q -an "$vg" >/dev/null

check_mount noactivate -o noactivate
t 60 vgchange -q -an "$vg" >/dev/null

# live: what changes while mounted, -o cow and -o rw, in device-mapper mode. It makes its own
# LVs and removes them, so the VG is as make-matrix.sh left it for the host's checks after.
check_live() {
    part=live
    m=/tmp/mnt-live
    mkdir -p "$m"
    head -c 1048576 /dev/urandom > /tmp/pattern
    # -o cow: writes land in the overlay and read back; the LV itself is untouched.
    if t 180 "$poolfs" mount --type logical -o cow "$vg" "$m" > /tmp/mount.out 2>&1; then
        t 60 dd if=/tmp/pattern of="$m/linear" bs=65536 seek=16 conv=notrunc status=none 2>/tmp/dd.err
        if t 60 dd if="$m/linear" bs=65536 skip=16 count=16 status=none 2>/dev/null | cmp -s - /tmp/pattern; then
            result "$part" OK cow:write
        else
            result "$part" FAIL cow:write "what was written through -o cow does not read back: $(cat /tmp/dd.err)"
        fi
        t 120 "$poolfs" unmount "$m" >/dev/null 2>&1
        cleanup_mount "$part" "$m"
        t 60 lvchange -q -ay -K "$vg/linear" && t 60 cmp "/dev/$vg/linear" /tmp/expected/linear.raw > /tmp/cmp.out 2>&1
        if [ $? -eq 0 ]; then result "$part" OK cow:unchanged; else result "$part" FAIL cow:unchanged "the LV changed: $(cat /tmp/cmp.out)"; fi
        t 60 vgchange -q -an "$vg" >/dev/null
    else
        result "$part" FAIL cow:write "mount -o cow: status $?: $(cat /tmp/mount.out)"
    fi
    # LVs and snapshots made and removed while mounted show and go within a few seconds.
    if t 180 "$poolfs" mount --type logical -o rw "$vg" "$m" > /tmp/mount.out 2>&1; then
        t 60 lvcreate -q -y -Zn -L 8M -n rwlv "$vg" >/dev/null 2>&1
        t 60 lvcreate -q -y -s -n thinsnap3 "$vg/thin" >/dev/null 2>&1
        seen=""
        for i in 1 2 3 4 5 6 7 8 9 10; do
            if [ -e "$m/rwlv" ] && t 10 ls "$m/.snapshots/thin" | grep -qx thinsnap3; then seen=yes; break; fi
            sleep 0.5
        done
        if [ -n "$seen" ]; then result "$part" OK live:create; else result "$part" FAIL live:create "after 5 s: $(t 10 ls "$m" "$m/.snapshots/thin" 2>&1)"; fi
        # -o rw: a volume's bytes change through its device; a snapshot refuses writes.
        if t 60 dd if=/tmp/pattern of="$m/rwlv" bs=65536 seek=32 conv=notrunc,fsync status=none 2>/tmp/dd.err \
            && t 60 dd if="/dev/$vg/rwlv" bs=65536 skip=32 count=16 iflag=direct status=none 2>/dev/null | cmp -s - /tmp/pattern; then
            result "$part" OK rw:write
        else
            result "$part" FAIL rw:write "$(cat /tmp/dd.err)"
        fi
        if t 60 dd if=/tmp/pattern of="$m/.snapshots/thin/thinsnap3" bs=65536 count=1 conv=notrunc status=none 2>/tmp/dd.err; then
            result "$part" FAIL rw:snapshot "a write to a snapshot through -o rw succeeded"
        else
            result "$part" OK rw:snapshot "$(cat /tmp/dd.err)"
        fi
        t 60 lvremove -q -y "$vg/thinsnap3" >/dev/null 2>&1
        gone=""
        for i in 1 2 3 4 5 6 7 8 9 10; do
            if ! t 10 ls "$m/.snapshots/thin" | grep -qx thinsnap3; then gone=yes; break; fi
            sleep 0.5
        done
        if [ -n "$gone" ]; then result "$part" OK live:remove; else result "$part" FAIL live:remove "after 5 s: $(t 10 ls "$m/.snapshots/thin" 2>&1)"; fi
        t 120 "$poolfs" unmount "$m" >/dev/null 2>&1
        cleanup_mount "$part" "$m"
        t 60 lvremove -q -y "$vg/rwlv" >/dev/null 2>&1
    else
        result "$part" FAIL live:create "mount -o rw: status $?: $(cat /tmp/mount.out)"
    fi
    t 60 vgchange -q -an "$vg" >/dev/null
}
check_live

echo "check-in-vm: poolfs's syslog:"
grep -a -i poolfs "$out/syslog.txt" | tail -n 60 | LC_ALL=C tr -c '[:print:]\n' '?'
kill "$syslogd_pid" "$monitor_pid" 2>/dev/null
echo "check-in-vm: final activation: $(state)"
echo "check-in-vm: $(grep -c "	OK	" "$results") OK, $(grep -c "	FAIL	" "$results") FAIL"
exit 0
