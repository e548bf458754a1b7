#!/bin/bash
# What `make install` and `make uninstall` put in place, under DESTDIR and PREFIX:
#   PREFIX/bin/poolfs
#   /sbin/mount.fuse.poolfs                         (mount -t fuse.poolfs, fstab; runs PREFIX/bin/poolfs)
#   PREFIX/share/man/man1/poolfs.1                  (from MANDIR: swift-argument-parser's generate-manual)
#   PREFIX/share/bash-completion/completions/poolfs
#   PREFIX/share/zsh/site-functions/_poolfs
#   PREFIX/share/fish/vendor_completions.d/poolfs.fish
# The completions are the binary's own (--generate-completion-script), so they match what is
# installed.
#
#   scripts/install.sh install BIN MANDIR DESTDIR PREFIX
#   scripts/install.sh uninstall DESTDIR PREFIX
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

usage() { echo "usage: $0 install BIN MANDIR DESTDIR PREFIX | uninstall DESTDIR PREFIX" >&2; exit 2; }

files() {  # the installed paths, DESTDIR included
    local root=$1 prefix=$2
    echo "$root$prefix/bin/poolfs"
    echo "$root/sbin/mount.fuse.poolfs"
    echo "$root$prefix/share/man/man1/poolfs.1"
    echo "$root$prefix/share/bash-completion/completions/poolfs"
    echo "$root$prefix/share/zsh/site-functions/_poolfs"
    echo "$root$prefix/share/fish/vendor_completions.d/poolfs.fish"
}

case "${1:-}" in
install)
    [ $# -eq 5 ] || usage
    bin=$2 mandir=$3 root=$4 prefix=$5
    [ -x "$bin" ] || { echo "install.sh: $bin is not an executable" >&2; exit 1; }
    [ -s "$mandir/poolfs.1" ] || { echo "install.sh: no man page $mandir/poolfs.1 (make man)" >&2; exit 1; }
    mapfile -t to < <(files "$root" "$prefix")
    install -D -m 755 "$bin" "${to[0]}"
    install -D -m 755 "$here/../mount-helpers/mount.fuse.poolfs" "${to[1]}"
    sed -i "s|^POOLFS=.*|POOLFS=\"$prefix/bin/poolfs\"|" "${to[1]}"
    install -D -m 644 "$mandir/poolfs.1" "${to[2]}"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    shells=(bash zsh fish)
    for i in 0 1 2; do
        "$bin" --generate-completion-script "${shells[$i]}" >"$tmp/${shells[$i]}"
        [ -s "$tmp/${shells[$i]}" ] || { echo "install.sh: $bin made an empty ${shells[$i]} completion script" >&2; exit 1; }
        install -D -m 644 "$tmp/${shells[$i]}" "${to[$((i + 3))]}"
    done
    ;;
uninstall)
    [ $# -eq 3 ] || usage
    files "$2" "$3" | while read -r path; do rm -f "$path"; done
    ;;
*)
    usage
    ;;
esac
