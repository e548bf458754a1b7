// NFS through libnfs (4.0), loaded on first use (dlopen; see nfs.c). Only
// Sources/Pools/NFS/NFSClient.swift imports this module. A libnfs context is one connection and
// not thread safe: each `pnfs_mount` is one, and its caller serializes calls on it. Every sync
// call is bounded by nfs_set_timeout (whole seconds).
#ifndef POOLFS_CNFS_H
#define POOLFS_CNFS_H
#include <stddef.h>
#include <stdint.h>

typedef struct pnfs_mount pnfs_mount;
typedef struct pnfs_file pnfs_file;

struct pnfs_stat {
    uint64_t size, blocks, ino, dev, nlink;
    uint32_t mode, uid, gid;
    int64_t mtime_sec, mtime_nsec, ctime_sec, ctime_nsec;
};

/// 0 when libnfs loads; -ELIBACC otherwise.
int pnfs_load(void);
/// Connects to `server` (port 0: ask the portmapper) and mounts `export` with NFS `version`
/// (3 or 4); every call on it then times out after `timeout_ms`. On failure, `error` (of
/// `error_size` bytes) says why in libnfs's words.
int pnfs_connect(const char *server, int port, const char *export_path, int version, int timeout_ms,
                 pnfs_mount **out, char *error, size_t error_size);
void pnfs_disconnect(pnfs_mount *mount);
int pnfs_lstat(pnfs_mount *mount, const char *path, struct pnfs_stat *st);
/// Opens `path` read-only with O_NOFOLLOW.
int pnfs_open(pnfs_mount *mount, const char *path, pnfs_file **out);
void pnfs_close(pnfs_mount *mount, pnfs_file *file);
/// Bytes read (0 at the end), or -errno.
int64_t pnfs_pread(pnfs_mount *mount, pnfs_file *file, void *buffer, uint64_t count, uint64_t offset);
int pnfs_fstat(pnfs_mount *mount, pnfs_file *file, struct pnfs_stat *st);
/// lseek SEEK_DATA (3) or SEEK_HOLE (4): the offset, or -errno (-EINVAL: the server cannot say).
int64_t pnfs_lseek(pnfs_mount *mount, pnfs_file *file, uint64_t offset, int whence);
/// The entries of `path` as in pgl_list: one byte of type (DT_*), the name, a NUL.
int pnfs_list(pnfs_mount *mount, const char *path, char **records, size_t *length);
/// The last error of the connection, in libnfs's words.
const char *pnfs_error(pnfs_mount *mount);
#endif
