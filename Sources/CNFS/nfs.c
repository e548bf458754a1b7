// libnfs loaded on first use (dlopen), not linked, like librbd and libgfapi: a poolfs that never
// reads an NFS share never maps it. Each function pointer has libnfs.h's own type.
//
// Bounds: nfs_set_timeout bounds every sync call of a context; the context is then useless
// (libnfs gives no way to cancel what is in flight), so the caller drops it and connects again.
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <nfsc/libnfs.h>
#include "cnfs.h"

static void *library;
static pthread_once_t loaded = PTHREAD_ONCE_INIT;
static struct {
    __typeof__(nfs_init_context) *init_context;
    __typeof__(nfs_destroy_context) *destroy_context;
    __typeof__(nfs_parse_url_dir) *parse_url_dir;
    __typeof__(nfs_destroy_url) *destroy_url;
    __typeof__(nfs_set_timeout) *set_timeout;
    __typeof__(nfs_set_autoreconnect) *set_autoreconnect;
    __typeof__(nfs_mount) *mount;
    __typeof__(nfs_get_error) *get_error;
    __typeof__(nfs_lstat64) *lstat64;
    __typeof__(nfs_fstat64) *fstat64;
    __typeof__(nfs_open) *open;
    __typeof__(nfs_close) *close;
    __typeof__(nfs_pread) *pread;
    __typeof__(nfs_lseek) *lseek;
    __typeof__(nfs_opendir) *opendir;
    __typeof__(nfs_readdir) *readdir;
    __typeof__(nfs_closedir) *closedir;
    __typeof__(nfs4_set_client_name) *set_client_name;
} api;

static void load(void) {
    library = dlopen("libnfs.so.13", RTLD_NOW | RTLD_LOCAL);
    if (!library) return;
#define BIND(field, name) api.field = (__typeof__(api.field))dlsym(library, name)
    BIND(init_context, "nfs_init_context"); BIND(destroy_context, "nfs_destroy_context");
    BIND(parse_url_dir, "nfs_parse_url_dir"); BIND(destroy_url, "nfs_destroy_url");
    BIND(set_timeout, "nfs_set_timeout"); BIND(set_autoreconnect, "nfs_set_autoreconnect");
    BIND(mount, "nfs_mount"); BIND(get_error, "nfs_get_error");
    BIND(lstat64, "nfs_lstat64"); BIND(fstat64, "nfs_fstat64"); BIND(open, "nfs_open");
    BIND(close, "nfs_close"); BIND(pread, "nfs_pread"); BIND(lseek, "nfs_lseek");
    BIND(opendir, "nfs_opendir"); BIND(readdir, "nfs_readdir"); BIND(closedir, "nfs_closedir");
    BIND(set_client_name, "nfs4_set_client_name");
#undef BIND
    void **all = (void **)&api;
    for (size_t i = 0; i < sizeof api / sizeof(void *); i++) {
        if (!all[i]) { library = NULL; return; }
    }
}

int pnfs_load(void) {
    pthread_once(&loaded, load);
    return library ? 0 : -ELIBACC;
}

struct pnfs_mount { struct nfs_context *nfs; };
struct pnfs_file { struct nfsfh *fh; };

int pnfs_connect(const char *server, int port, const char *export_path, int version, int timeout_ms,
                 pnfs_mount **out, char *error, size_t error_size) {
    if (error_size) error[0] = 0;
    if (pnfs_load() != 0) return -ELIBACC;
    struct nfs_context *nfs = api.init_context();
    if (!nfs) return -ENOMEM;
    // libnfs 4.0 takes the port and version only as URL arguments; the server and export are
    // passed to nfs_mount as they are, so no name is parsed twice.
    char url[256];
    if (port > 0) snprintf(url, sizeof url, "nfs://localhost/?version=%d&nfsport=%d", version, port);
    else snprintf(url, sizeof url, "nfs://localhost/?version=%d", version);
    struct nfs_url *parsed = api.parse_url_dir(nfs, url);
    if (!parsed) {
        snprintf(error, error_size, "%s", api.get_error(nfs));
        api.destroy_context(nfs);
        return -EINVAL;
    }
    api.destroy_url(parsed);
    // NFSv4 knows a client by its name: libnfs names every context of a process alike, so a
    // second connection would take the first one's state away (NFS4ERR_STALE_CLIENTID, then
    // NFS4ERR_EXPIRED on its reads). One name per connection.
    static unsigned long connections;
    char name[96];
    snprintf(name, sizeof name, "poolfs-%ld-%lu", (long)getpid(), __atomic_add_fetch(&connections, 1, __ATOMIC_RELAXED));
    api.set_client_name(nfs, name);
    // No reconnecting inside libnfs (it retries forever or a set number of times, unbounded in
    // time): a failed call fails, and the caller connects again.
    api.set_autoreconnect(nfs, 0);
    api.set_timeout(nfs, timeout_ms < 1000 ? 1000 : (timeout_ms / 1000) * 1000);
    int r = api.mount(nfs, server, export_path);
    if (r != 0) {
        snprintf(error, error_size, "%s", api.get_error(nfs));
        api.destroy_context(nfs);
        return r < 0 ? r : -EIO;
    }
    pnfs_mount *m = malloc(sizeof *m);
    if (!m) { api.destroy_context(nfs); return -ENOMEM; }
    m->nfs = nfs;
    *out = m;
    return 0;
}

void pnfs_disconnect(pnfs_mount *mount) {
    if (!mount) return;
    api.destroy_context(mount->nfs);
    free(mount);
}

static void fill(struct pnfs_stat *out, const struct nfs_stat_64 *st) {
    out->size = st->nfs_size;
    out->blocks = st->nfs_blocks;
    out->ino = st->nfs_ino;
    out->dev = st->nfs_dev;
    out->nlink = st->nfs_nlink;
    out->mode = (uint32_t)st->nfs_mode;
    out->uid = (uint32_t)st->nfs_uid;
    out->gid = (uint32_t)st->nfs_gid;
    out->mtime_sec = (int64_t)st->nfs_mtime;
    out->mtime_nsec = (int64_t)st->nfs_mtime_nsec;
    out->ctime_sec = (int64_t)st->nfs_ctime;
    out->ctime_nsec = (int64_t)st->nfs_ctime_nsec;
}

static int status(int r) { return r < 0 ? r : r > 0 ? -EIO : 0; }

int pnfs_lstat(pnfs_mount *mount, const char *path, struct pnfs_stat *st) {
    struct nfs_stat_64 s;
    int r = status(api.lstat64(mount->nfs, path, &s));
    if (r == 0) fill(st, &s);
    return r;
}

int pnfs_open(pnfs_mount *mount, const char *path, pnfs_file **out) {
    struct nfsfh *fh = NULL;
    int r = status(api.open(mount->nfs, path, O_RDONLY | O_NOFOLLOW, &fh));
    if (r != 0) return r;
    pnfs_file *f = malloc(sizeof *f);
    if (!f) { api.close(mount->nfs, fh); return -ENOMEM; }
    f->fh = fh;
    *out = f;
    return 0;
}

void pnfs_close(pnfs_mount *mount, pnfs_file *file) {
    if (!file) return;
    if (mount) api.close(mount->nfs, file->fh);
    free(file);
}

int64_t pnfs_pread(pnfs_mount *mount, pnfs_file *file, void *buffer, uint64_t count, uint64_t offset) {
    int r = api.pread(mount->nfs, file->fh, offset, count, buffer);
    return r;
}

int pnfs_fstat(pnfs_mount *mount, pnfs_file *file, struct pnfs_stat *st) {
    struct nfs_stat_64 s;
    int r = status(api.fstat64(mount->nfs, file->fh, &s));
    if (r == 0) fill(st, &s);
    return r;
}

int64_t pnfs_lseek(pnfs_mount *mount, pnfs_file *file, uint64_t offset, int whence) {
    // libnfs 4.0 knows SEEK_SET, SEEK_CUR and SEEK_END only: it cannot ask the server for holes.
    if (whence != SEEK_SET && whence != SEEK_CUR && whence != SEEK_END) return -EINVAL;
    uint64_t at = 0;
    int r = status(api.lseek(mount->nfs, file->fh, (int64_t)offset, whence, &at));
    return r < 0 ? r : (int64_t)at;
}

static unsigned char type_of(uint32_t mode) {
    switch (mode & S_IFMT) {
    case S_IFREG: return DT_REG;
    case S_IFDIR: return DT_DIR;
    case S_IFLNK: return DT_LNK;
    case S_IFBLK: return DT_BLK;
    case S_IFCHR: return DT_CHR;
    case S_IFIFO: return DT_FIFO;
    case S_IFSOCK: return DT_SOCK;
    default: return DT_UNKNOWN;
    }
}

int pnfs_list(pnfs_mount *mount, const char *path, char **records, size_t *length) {
    struct nfsdir *dir = NULL;
    int r = status(api.opendir(mount->nfs, path, &dir));
    if (r != 0) return r;
    size_t used = 0, capacity = 4096;
    char *buffer = malloc(capacity);
    if (!buffer) { api.closedir(mount->nfs, dir); return -ENOMEM; }
    struct nfsdirent *entry;
    while ((entry = api.readdir(mount->nfs, dir)) != NULL) {
        size_t need = 1 + strlen(entry->name) + 1;
        if (used + need > capacity) {
            while (used + need > capacity) capacity *= 2;
            char *bigger = realloc(buffer, capacity);
            if (!bigger) { free(buffer); api.closedir(mount->nfs, dir); return -ENOMEM; }
            buffer = bigger;
        }
        buffer[used] = (char)type_of(entry->mode);
        memcpy(buffer + used + 1, entry->name, need - 1);
        used += need;
    }
    api.closedir(mount->nfs, dir);
    *records = buffer;
    *length = used;
    return 0;
}

const char *pnfs_error(pnfs_mount *mount) {
    const char *e = mount ? api.get_error(mount->nfs) : NULL;
    return e ? e : "";
}
