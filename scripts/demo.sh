#!/usr/bin/env bash
# Makes a small sample pool with qemu-img, mounts it with poolfs and shows it working.
# Usage: scripts/demo.sh POOLFS_BINARY | scripts/demo.sh --stop
set -euo pipefail
cd "$(dirname "$0")/.."
pool="$PWD/demo-pool"
mnt="$PWD/demo-mnt"

stop() {
    if grep -q " $mnt fuse.poolfs " /proc/mounts; then fusermount3 -u "$mnt"; echo "unmounted $mnt"; fi
}
if [ "${1:-}" = "--stop" ]; then stop; exit 0; fi
poolfs="${1:?usage: demo.sh POOLFS_BINARY}"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

stop
rm -rf "$pool" && mkdir -p "$pool" "$mnt"
step "Making a sample pool in demo-pool/ with qemu-img"
work=$(mktemp -d)
cleanup() {
    umount "$work/inside" 2>/dev/null || true
    fusermount3 -u "$work/rw-mnt" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/files" && echo "Hello from inside the guest's ext4 filesystem" > "$work/files/README.txt"
truncate -s 256M "$work/disk.raw"
printf 'label: dos\nstart=2048, type=83\n' | sfdisk -q "$work/disk.raw"
mkfs.ext4 -q -F -d "$work/files" -E offset=1048576 "$work/disk.raw" 200M
qemu-img convert -O qcow2 "$work/disk.raw" "$pool/guest.qcow2"
qemu-img snapshot -c installed "$pool/guest.qcow2"
qemu-io -c 'write -P 0x5a 100M 8M' "$pool/guest.qcow2" >/dev/null
qemu-img snapshot -c "lesson 1/start" "$pool/guest.qcow2"
qemu-io -c 'write -P 0x6b 120M 4M' "$pool/guest.qcow2" >/dev/null
qemu-img convert -c -O qcow2 "$pool/guest.qcow2" "$pool/guest-compressed.qcow2"
qemu-img create -q -f raw "$pool/base.raw" 64M
qemu-io -f raw -c 'write -P 0x11 0 16M' "$pool/base.raw" >/dev/null
qemu-img create -q -f qcow2 -b base.raw -F raw "$pool/web.qcow2"
qemu-io -c 'write -P 0x22 4M 4M' "$pool/web.qcow2" >/dev/null
qemu-img create -q -f qcow2 -b web.qcow2 -F qcow2 "$pool/web-clone.qcow2"
qemu-io -c 'write -P 0x33 8M 1M' "$pool/web-clone.qcow2" >/dev/null
qemu-img create -q -f raw "$pool/scratch.img" 32M
"$poolfs" ls "$pool"

step "Mounting: poolfs mount demo-pool demo-mnt"
"$poolfs" mount "$pool" "$mnt"

step "ls -l demo-mnt demo-mnt/.snapshots/guest.qcow2 (sizes are virtual disk sizes)"
ls -l "$mnt" "$mnt/.snapshots/guest.qcow2"

step "A snapshot through poolfs, and the same snapshot from qemu-img (revert a copy, convert)"
cp "$pool/guest.qcow2" "$work/revert.qcow2"
qemu-img snapshot -a installed "$work/revert.qcow2"
qemu-img convert -O raw "$work/revert.qcow2" "$work/installed.raw"
echo "poolfs:   $(sha256sum < "$mnt/.snapshots/guest.qcow2/installed" | cut -d' ' -f1)  .snapshots/guest.qcow2/installed"
echo "qemu-img: $(sha256sum < "$work/installed.raw" | cut -d' ' -f1)  snapshot -a installed + convert -O raw"

step "fdisk -l demo-mnt/guest.qcow2"
fdisk -l "$mnt/guest.qcow2"

if [ "$(id -u)" -eq 0 ]; then
    step "ls demo-mnt/.partitions/guest.qcow2, then mount -o loop,ro its part1: the guest's ext4 partition, no offset"
    ls -l "$mnt/.partitions/guest.qcow2"
    getfattr -d -m user.poolfs.partition "$mnt/.partitions/guest.qcow2/part1" 2>/dev/null || true
    inside="$work/inside" && mkdir "$inside"
    mount -o loop,ro "$mnt/.partitions/guest.qcow2/part1" "$inside"
    ls -l "$inside" && cat "$inside/README.txt"
    umount "$inside"
fi

if [ "$(id -u)" -eq 0 ]; then
    step "Writing into an image: poolfs mount -o rw, on a copy of guest.qcow2"
    mkdir "$work/rw-pool" "$work/rw-mnt" && cp "$pool/guest.qcow2" "$work/rw-pool/"
    "$poolfs" mount -o rw "$work/rw-pool" "$work/rw-mnt"
    mount -o loop "$work/rw-mnt/.partitions/guest.qcow2/part1" "$inside"
    echo "Written through poolfs -o rw" > "$inside/NOTE.txt"
    umount "$inside"
    "$poolfs" unmount "$work/rw-mnt"
    qemu-img check "$work/rw-pool/guest.qcow2"
    qemu-img convert -O raw "$work/rw-pool/guest.qcow2" "$work/after.raw"
    mount -o loop,ro,offset=1048576 "$work/after.raw" "$inside"
    echo "NOTE.txt, read from qemu-img's conversion of the image: $(cat "$inside/NOTE.txt")"
    umount "$inside"
fi

step "getfattr -d -m user.poolfs demo-mnt/web-clone.qcow2 demo-mnt/.snapshots/guest.qcow2/installed"
getfattr -d -m user.poolfs "$mnt/web-clone.qcow2" "$mnt/.snapshots/guest.qcow2/installed"

step "Done. The pool stays mounted at demo-mnt/; unmount with:"
echo "    make demo-stop        (or: poolfs unmount demo-mnt, or: fusermount3 -u demo-mnt)"
