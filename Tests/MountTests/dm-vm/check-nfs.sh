#!/bin/sh
# check-nfs.sh WORK EXPORT PORT POOLFS: run in the device-mapper VM (scripts/dm-vm.sh --net),
# whose kernel has the NFS client. Mounts the host's ganesha export (127.0.0.1:PORT on the
# host, 10.0.2.2 from the VM) with the kernel's NFSv4.1 client, serves it with a poolfs dir pool
# and checks:
#   read       every volume reads as WORK/expect/<name>.raw (made on the host by qemu-img);
#   fresh      disk.qcow2 rewritten on the server's side (its export directory, shared with
#              the VM) while mounted: read anew ("check-nfs: fresh after N s");
#   lock       top.qcow2 held open through the mount (poolfs takes QEMU's consistent-read lock
#              on its backing file base.qcow2, refusing write): qemu-io writing base.qcow2
#              through the NFS mount is refused (the kernel client sends the OFD locks to the
#              server as NFSv4 LOCKs: local_lock=none); once top.qcow2 is closed and poolfs has
#              let it go, the write is allowed.
# Each check prints "check-nfs: <check> OK" or "check-nfs: <check> FAILED ...".
set -u
work="$1" export="$2" port="$3" poolfs="$4"
say() { echo "check-nfs: $*"; }
modprobe -a virtio_net nfsv4 || { say "setup FAILED: modprobe"; exit 1; }
n=0; while [ $n -lt 50 ] && ! ip link show eth0 >/dev/null 2>&1; do sleep 0.1; n=$((n+1)); done
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 || { say "setup FAILED: eth0"; exit 1; }
mkdir -p /run/nfs /run/pool
mount -t nfs -o vers=4.1,port="$port",proto=tcp,timeo=50,retrans=2 10.0.2.2:/export /run/nfs \
    || { say "setup FAILED: mount -t nfs"; exit 1; }
say "mounted: $(grep ' /run/nfs ' /proc/mounts)"
"$poolfs" mount --foreground /run/nfs /run/pool > "$work/poolfs-vm.log" 2>&1 &
pid=$!
n=0; while [ $n -lt 100 ] && ! grep -q ' /run/pool ' /proc/mounts; do sleep 0.1; n=$((n+1)); done
grep -q ' /run/pool ' /proc/mounts || { say "setup FAILED: poolfs did not mount"; cat "$work/poolfs-vm.log"; exit 1; }

status=0
fail() { say "$1 FAILED $2"; status=1; }
ok=1
for f in "$work"/expect/*.raw; do
    name="$(basename "$f" .raw)"
    cmp "$f" "/run/pool/$name" || { ok=0; fail read "$name"; }
done
[ $ok = 1 ] && say "read OK"

# The server's side: the export directory itself (WORK is shared with the VM).
qemu-io -c 'write -P 0x77 0 1M' -c 'write -P 0x78 3M 64k' "$export/disk.qcow2" >/dev/null || fail fresh "qemu-io on the server"
qemu-img convert -O raw "$export/disk.qcow2" "$work/disk2.raw"
start=$(cut -d' ' -f1 /proc/uptime | cut -d. -f1)
fresh=0
for i in $(seq 1 90); do
    if cmp -s "$work/disk2.raw" /run/pool/disk.qcow2; then fresh=1; break; fi
    sleep 1
done
now=$(cut -d' ' -f1 /proc/uptime | cut -d. -f1)
if [ $fresh = 1 ]; then say "fresh after $((now - start)) s"; say "fresh OK"; else fail fresh "not read anew in 90 s"; fi

exec 3< /run/pool/top.qcow2
head -c 4096 <&3 >/dev/null
out="$(qemu-io -c 'write 0 4k' /run/nfs/base.qcow2 2>&1)"
say "lock: qemu-io while top.qcow2 is open: $out"
if echo "$out" | grep -q 'Failed to get "write" lock'; then
    exec 3<&-
    # poolfs lets a volume go a while after its last close.
    released=0
    for i in $(seq 1 60); do
        if qemu-io -c 'write 0 4k' /run/nfs/base.qcow2 >/dev/null 2>&1; then released=1; break; fi
        sleep 1
    done
    if [ $released = 1 ]; then say "lock: released after top.qcow2 closed ($i s)"; say "lock OK"; else fail lock "still held 60 s after top.qcow2 closed"; fi
else
    exec 3<&-
    fail lock "a write to base.qcow2 was not refused"
fi

fusermount3 -u /run/pool 2>/dev/null || umount /run/pool
wait $pid
umount /run/nfs
exit $status
