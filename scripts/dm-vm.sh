#!/usr/bin/env bash
# dm-vm.sh: runs a shell script as root inside a throw-away QEMU VM that has a real device-mapper
# kernel, with this machine's root filesystem as the VM's (read-only), so the VM runs the very
# binaries built here (poolfs, lvm2, fuse3, ...) against dm-linear, dm-striped, dm-snapshot and
# dm-thin. For hosts whose own kernel has no device-mapper (containers, CI sandboxes).
#
# Usage: scripts/dm-vm.sh [--disk FILE]... [--timeout SECONDS] [--net] WORKDIR SCRIPT
#
#   --disk FILE     a raw image, attached as a virtio disk: the first is /dev/vda, the next
#                   /dev/vdb, ... (in the order given). Writes reach the file.
#   --timeout SECS  kill the VM (by its pid) when it has not finished after SECS (default 300);
#                   dm-vm.sh then says so and exits 124.
#   --net           a virtio NIC on QEMU's user network: the script brings it up (modprobe
#                   virtio_net; eth0 10.0.2.15/24) and reaches this host's 127.0.0.1 at 10.0.2.2.
#   WORKDIR         a host directory, shared read-write with the VM at the same absolute path.
#   SCRIPT          a script under WORKDIR, run with `sh SCRIPT` as root, cwd WORKDIR.
#
# Its output (stdout and stderr together) is printed as it runs and kept in WORKDIR/vm.log;
# its exit status goes to WORKDIR/vm.status, and dm-vm.sh exits with it. When the VM ends
# without a status (kernel panic, crash, timeout) the console's last lines are printed and the
# exit status is 125 (124 for a timeout). Two runs may go at once if their WORKDIRs differ.
#
# Inside the VM: the host's / is mounted read-only (9p), with tmpfs on /tmp, /var/tmp, /run,
# /dev/shm and /etc/lvm; WORKDIR is writable at its own path (9p, no caching). lvm.conf has udev
# sync and udev rules off, backups and archives off (there is no udev in the VM). Loaded modules:
# virtio_blk, dm_snapshot, dm_thin_pool, fuse, loop (others load with modprobe). `lo` is up.
# POOLFS_IN_VM=1 is set. When SCRIPT ends the VM powers off, whatever it left running: deactivate
# what must be clean on the disks (`vgchange -an VG`) and unmount what you mounted before it does.
#
# Environment:
#   DM_VM_KERNEL   the kernel release to boot (default: the newest /boot/vmlinuz-* whose
#                  /lib/modules has dm-thin-pool); needs its modules on this machine.
#   DM_VM_ACCEL    qemu accelerator: tcg (default) or kvm. KVM is not the default because
#                  QEMU 7.2 aborts or hangs with it under nested virtualization.
#   DM_VM_MEMORY   guest memory in MiB (default 2048); DM_VM_CPUS (default 2).
#   DM_VM_CACHE    where built initramfs images are kept (default /var/tmp/poolfs-dm-vm).
#   DM_VM_CONSOLE  a file to copy the VM's serial console to (kernel messages, for debugging).
#
# Needs (Debian): qemu-system-x86 linux-image-amd64 busybox-static kmod (scripts/install-deps.sh).
# The initramfs (busybox and the virtio/9p modules) is built on first use for each kernel and
# this script's version, and cached. A boot takes about 5-7 s under TCG.
set -euo pipefail

die() { echo "dm-vm: $*" >&2; exit 2; }

disks=()
timeout=300
nic="none"
while [ $# -gt 0 ]; do
    case "$1" in
        --disk) [ $# -ge 2 ] || die "--disk needs a file"; disks+=("$(realpath -e -- "$2")") || die "no such disk: $2"; shift 2 ;;
        --disk=*) disks+=("$(realpath -e -- "${1#--disk=}")") || die "no such disk: ${1#--disk=}"; shift ;;
        --timeout) [ $# -ge 2 ] || die "--timeout needs seconds"; timeout="$2"; shift 2 ;;
        --timeout=*) timeout="${1#--timeout=}"; shift ;;
        --net) nic="user,model=virtio-net-pci"; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) break ;;
    esac
done
[ $# -eq 2 ] || die "usage: dm-vm.sh [--disk FILE]... [--timeout SECONDS] [--net] WORKDIR SCRIPT"
case "$timeout" in ''|*[!0-9]*) die "--timeout takes whole seconds, not '$timeout'" ;; esac
workdir="$(realpath -e -- "$1")" || die "no such WORKDIR: $1"
[ -d "$workdir" ] || die "WORKDIR is not a directory: $workdir"
script="$(cd "$workdir" && realpath -e -- "$2")" || die "no such SCRIPT: $2"
case "$script" in "$workdir"/*) ;; *) die "SCRIPT must be under WORKDIR ($script is not under $workdir)" ;; esac
for p in "$workdir" "$script"; do
    case "$p" in *[[:space:]\"\'\\]*) die "paths with spaces, quotes or backslashes are not supported: $p" ;; esac
done
for tool in qemu-system-x86_64 modprobe gzip; do command -v "$tool" >/dev/null || die "$tool is missing (install qemu-system-x86 kmod gzip)"; done
busybox=""
for b in /bin/busybox /usr/bin/busybox; do
    if [ -x "$b" ] && ! grep -qa "/lib64/ld-linux" "$b"; then busybox="$b"; break; fi  # static
done
[ -n "$busybox" ] || die "a static busybox is missing (install busybox-static)"

# The kernel: newest with its image and the dm-thin module present.
kver="${DM_VM_KERNEL:-}"
if [ -z "$kver" ]; then
    for k in $(ls /boot/vmlinuz-* 2>/dev/null | sed 's|^/boot/vmlinuz-||' | sort -rV); do
        if [ -r "/boot/vmlinuz-$k" ] && ls /lib/modules/"$k"/kernel/drivers/md/dm-thin-pool.ko* >/dev/null 2>&1; then kver="$k"; break; fi
    done
fi
[ -n "$kver" ] || die "no kernel with device-mapper modules in /boot and /lib/modules (install linux-image-amd64)"
[ -r "/boot/vmlinuz-$kver" ] || die "/boot/vmlinuz-$kver is missing or unreadable"
[ -d "/lib/modules/$kver" ] || die "/lib/modules/$kver is missing"

# ---------------------------------------------------------------------------------------------
# The initramfs: busybox, the modules that reach the 9p root, /init (stage 1) and stage 2.

read -r -d '' STAGE1 <<'EOF' || true
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "dm-vm init: $*" > /dev/console; echo o > /proc/sysrq-trigger; sleep 30; exit 1; }
while read -r m; do insmod "/modules/$m" || fail "insmod $m failed"; done < /modules/order
for w in $(cat /proc/cmdline); do
    case "$w" in dmvm_work=*) work="${w#dmvm_work=}" ;; esac
done
[ -n "$work" ] || fail "no dmvm_work= on the kernel command line"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose,msize=262144 hostroot /newroot || fail "cannot mount the host root"
for d in tmp run var/tmp etc/lvm; do mount -t tmpfs -o mode=1777 tmpfs "/newroot/$d" || fail "tmpfs on /$d"; done
chmod 755 /newroot/run /newroot/etc/lvm
mkdir -p "/newroot$work" || fail "cannot make $work"
mount -t 9p -o trans=virtio,version=9p2000.L,rw,msize=262144 work "/newroot$work" || fail "cannot mount $work"
cp /stage2.sh /newroot/run/dm-vm-stage2.sh
for d in proc sys dev; do mount -o move "/$d" "/newroot/$d" || fail "cannot move /$d"; done
exec switch_root /newroot /bin/sh /run/dm-vm-stage2.sh
EOF

read -r -d '' STAGE2 <<'EOF' || true
#!/bin/sh
# Stage 2 of dm-vm.sh, in the host's root filesystem.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 POOLFS_IN_VM=1
for w in $(cat /proc/cmdline); do
    case "$w" in dmvm_work=*) work="${w#dmvm_work=}" ;; dmvm_script=*) script="${w#dmvm_script=}" ;; esac
done
off() { sync; echo "dm-vm: powering off at $(cut -d' ' -f1 /proc/uptime) s" > /dev/kmsg; echo o > /proc/sysrq-trigger; sleep 60; }
dmesg -n 1 2>/dev/null
mkdir -p /dev/shm /dev/pts /run/lock /run/lvm
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
ip link set lo up
hostname dm-vm 2>/dev/null
cat > /etc/lvm/lvm.conf <<'CONF'
devices {
    obtain_device_list_from_udev = 0
    external_device_info_source = "none"
}
activation {
    udev_sync = 0
    udev_rules = 0
    verify_udev_operations = 1
    monitoring = 0
}
global {
    use_lvmetad = 0
    event_activation = 0
}
backup {
    backup = 0
    archive = 0
}
CONF
modprobe -a virtio_blk dm_mod dm_snapshot dm_thin_pool fuse loop || echo "dm-vm: modprobe failed" > /dev/console
[ -e /dev/mapper/control ] || { mkdir -p /dev/mapper; dmsetup mknodes 2>/dev/null; }
# Give the kernel a moment to create the virtio disks' nodes.
n=0; while [ $n -lt 50 ] && [ "$(ls /sys/class/block | grep -c '^vd[a-z]*$')" -lt "$(ls /sys/bus/virtio/drivers/virtio_blk 2>/dev/null | grep -c '^virtio')" ]; do sleep 0.1; n=$((n+1)); done
cd "$work" || { echo "dm-vm: no $work in the VM" > /dev/console; off; }
# The output goes straight to vm.log (not through a pipe, which daemons the script leaves behind
# would hold open), and is copied to the console for when the VM dies.
tail -n +1 -f "$work/vm.log" > /dev/console 2>&1 &
tailpid=$!
sh "$script" < /dev/null >> "$work/vm.log" 2>&1
echo $? > "$work/vm.status.tmp" && mv "$work/vm.status.tmp" "$work/vm.status"
sleep 0.5; kill $tailpid 2>/dev/null
off
EOF

cache="${DM_VM_CACHE:-/var/tmp/poolfs-dm-vm}"
mkdir -p "$cache"
modlist="$(for m in virtio_pci 9pnet_virtio 9p; do modprobe -S "$kver" --show-depends "$m"; done | awk '$1 == "insmod" { print $2 }' | awk '!seen[$0]++')"
key="$( { printf '%s\n' "$STAGE1" "$STAGE2" "$kver" "$modlist"; stat -c '%Y %s' "/boot/vmlinuz-$kver" "$busybox"; } | sha256sum | cut -c1-16)"
initrd="$cache/$kver-$key.cpio.gz"
if [ ! -s "$initrd" ]; then
    build="$(mktemp -d "$cache/build.XXXXXX")"
    trap 'rm -rf "$build"' EXIT
    mkdir -p "$build/root/bin" "$build/root/modules"
    cp "$busybox" "$build/root/bin/busybox"
    : > "$build/root/modules/order"
    for ko in $modlist; do
        name="$(basename "$ko")"; name="${name%.xz}"; name="${name%.zst}"; name="${name%.gz}"
        case "$ko" in
            *.xz) xz -dc "$ko" > "$build/root/modules/$name" ;;
            *.zst) zstd -qdc "$ko" > "$build/root/modules/$name" ;;
            *.gz) gzip -dc "$ko" > "$build/root/modules/$name" ;;
            *) cp "$ko" "$build/root/modules/$name" ;;
        esac
        echo "$name" >> "$build/root/modules/order"
    done
    printf '%s\n' "$STAGE1" > "$build/root/init"
    printf '%s\n' "$STAGE2" > "$build/root/stage2.sh"
    chmod 755 "$build/root/init" "$build/root/stage2.sh"
    (cd "$build/root" && find . | "$busybox" cpio -o -H newc 2>/dev/null | gzip -1) > "$build/initrd"
    mv "$build/initrd" "$initrd"  # atomic: a concurrent run sees the whole file or none
    rm -rf "$build"; trap - EXIT
fi

# ---------------------------------------------------------------------------------------------
# The run.

tmp="$(mktemp -d /tmp/dm-vm.XXXXXX)"
qpid=""; tpid=""
cleanup() {
    if [ -n "$qpid" ] && kill -0 "$qpid" 2>/dev/null; then kill "$qpid" 2>/dev/null; sleep 0.5; kill -9 "$qpid" 2>/dev/null || true; fi
    if [ -n "$tpid" ] && kill -0 "$tpid" 2>/dev/null; then kill "$tpid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

rm -f "$workdir/vm.status" "$workdir/vm.status.tmp"
: > "$workdir/vm.log"
accel="${DM_VM_ACCEL:-tcg}"
args=(-machine "accel=$accel" -nic "$nic" -m "${DM_VM_MEMORY:-2048}" -smp "${DM_VM_CPUS:-2}" -nographic -no-reboot
      -kernel "/boot/vmlinuz-$kver" -initrd "$initrd"
      -append "console=ttyS0 quiet panic=-1 dmvm_work=$workdir dmvm_script=$script"
      -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
      -virtfs "local,path=$workdir,mount_tag=work,security_model=none,multidevs=remap")
[ "$accel" = kvm ] && args+=(-cpu host)
for d in "${disks[@]}"; do args+=(-drive "file=$d,if=virtio,format=raw"); done

start=$(date +%s)
qemu-system-x86_64 "${args[@]}" < /dev/null > "$tmp/console" 2>&1 &
qpid=$!
tail -n +1 -s 0.2 -f --pid="$qpid" "$workdir/vm.log" &
tpid=$!
timed_out=0
while kill -0 "$qpid" 2>/dev/null; do
    if [ $(( $(date +%s) - start )) -ge "$timeout" ]; then
        timed_out=1
        kill "$qpid" 2>/dev/null || true
        sleep 1
        kill -9 "$qpid" 2>/dev/null || true
        break
    fi
    sleep 0.2
done
wait "$qpid" 2>/dev/null || true
wait "$tpid" 2>/dev/null || true
qpid=""; tpid=""
[ -z "${DM_VM_CONSOLE:-}" ] || tr -d '\r' < "$tmp/console" > "$DM_VM_CONSOLE" || true

if [ "$timed_out" = 1 ]; then
    echo "dm-vm: the VM did not finish within $timeout s and was killed (pid-based); last console lines:" >&2
    tail -n 20 "$tmp/console" | tr -d '\r' >&2
    exit 124
fi
if [ ! -s "$workdir/vm.status" ]; then
    echo "dm-vm: the VM ended without the script's exit status (after $(( $(date +%s) - start )) s); last console lines:" >&2
    tail -n 30 "$tmp/console" | tr -d '\r' >&2
    exit 125
fi
status="$(cat "$workdir/vm.status")"
case "$status" in ''|*[!0-9]*) echo "dm-vm: bad status '$status'" >&2; exit 125 ;; esac
exit "$status"
