#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages poolfs needs to build, test and demo, when any is missing.
# Usage: scripts/install-deps.sh [extra packages...]
set -euo pipefail

# fio, python3 and qemu-system-common (qemu-storage-daemon) drive the -o rw tests; tgt (tgtd) serves
# the iSCSI tests' targets and qemu-block-extra lets qemu-img read them. man-db renders and mandoc
# checks the man page that make install installs; bsdextrautils has col. librbd-dev builds the RBD
# pools; ceph-mon, ceph-osd, ceph-mgr and ceph-common run the RBD tests' one-node cluster (started by
# the tests, from their own conf: the packages enable no daemon of their own), python3-rbd holds an
# image's lock in them and rbd-fuse is `make bench`'s comparison. libglusterfs-dev and libnfs-dev build
# the network pools (libgfapi and libnfs, loaded on first use); glusterfs-server and glusterfs-client
# (glusterd, the brick, the FUSE client the tests make images through), nfs-ganesha with
# nfs-ganesha-vfs and libnfs-utils (nfs-ls, nfs-cp) run their tests, each server started by the tests
# from its own config; rpcbind serves NFSv3 (`rpcbind -f`) where it is tested.
packages=(libfuse3-dev libblkid-dev fuse3 zlib1g-dev libdeflate-dev libzstd-dev pkg-config qemu-utils fdisk e2fsprogs mount util-linux kmod attr lvm2 fio python3 qemu-system-common qemu-system-x86 linux-image-amd64 busybox-static thin-provisioning-tools libiscsi-dev tgt qemu-block-extra man-db mandoc bsdextrautils librbd-dev ceph-mon ceph-osd ceph-mgr ceph-common python3-rbd rbd-fuse libglusterfs-dev glusterfs-server glusterfs-client libnfs-dev libnfs-utils nfs-ganesha nfs-ganesha-vfs rpcbind "$@")
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "install-deps: need root to install: ${missing[*]}" >&2; exit 1
    fi
}

if [ ${#missing[@]} -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -e /dev/fuse ]; then
    as_root modprobe fuse 2>/dev/null || true
fi
if [ ! -e /dev/fuse ]; then
    echo "install-deps: /dev/fuse is missing and 'modprobe fuse' did not create it: poolfs needs FUSE" >&2
    exit 1
fi

if ! command -v swift >/dev/null; then
    echo "install-deps: no Swift toolchain on PATH (expected in /opt/swift/usr/bin; see swift.org/install)" >&2
    exit 1
fi
