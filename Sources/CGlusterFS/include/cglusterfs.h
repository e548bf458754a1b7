// GlusterFS through libgfapi, loaded on first use (dlopen; see glusterfs.c). Only
// Sources/Pools/Gluster/GlusterClient.swift imports this module. Every call that talks to the
// volume takes a bound in milliseconds: it runs on a thread of its own, and when the bound passes
// first the call returns -ETIMEDOUT while the thread finishes (or hangs) on its own, holding
// references to what it uses, so nothing it touches is freed under it.
#ifndef POOLFS_CGLUSTERFS_H
#define POOLFS_CGLUSTERFS_H
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

typedef struct pgl_volume pgl_volume;
typedef struct pgl_file pgl_file;

/// What poolfs needs of a stat.
struct pgl_stat {
    uint64_t size, blocks, ino, dev, nlink;
    uint32_t mode, uid, gid;
    int64_t mtime_sec, mtime_nsec, ctime_sec, ctime_nsec;
};

/// 0 when libgfapi loads; -ELIBACC otherwise.
int pgl_load(void);
/// glfs_new, volfile server tcp HOST:PORT, logging to `logfile` (NULL: /dev/null), glfs_init.
int pgl_connect(const char *host, int port, const char *volume, const char *logfile, int timeout_ms, pgl_volume **out);
/// Drops the caller's reference; glfs_fini runs on a detached thread once nothing uses the
/// volume (it takes about 10 s and nobody waits for it).
void pgl_disconnect(pgl_volume *volume);
int pgl_lstat(pgl_volume *volume, const char *path, struct pgl_stat *st, int timeout_ms);
/// Opens `path` read-only with O_NOFOLLOW.
int pgl_open(pgl_volume *volume, const char *path, pgl_file **out, int timeout_ms);
void pgl_close(pgl_file *file);
/// Bytes read (0 at the end), or -errno.
int64_t pgl_pread(pgl_file *file, void *buffer, size_t count, uint64_t offset, int timeout_ms);
int pgl_fstat(pgl_file *file, struct pgl_stat *st, int timeout_ms);
/// lseek with SEEK_DATA (3) or SEEK_HOLE (4): the offset, or -errno (-ENXIO: none).
int64_t pgl_lseek(pgl_file *file, uint64_t offset, int whence, int timeout_ms);
/// The entries of directory `path` as one malloc'd buffer of records: one byte of d_type, the
/// name, a NUL. The caller frees it.
int pgl_list(pgl_volume *volume, const char *path, char **records, size_t *length, int timeout_ms);
#endif
