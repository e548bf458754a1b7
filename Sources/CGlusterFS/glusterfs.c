// libgfapi loaded on first use (dlopen), not linked: linked, libgfapi and libglusterfs with their
// dependencies (about 20 libraries) were mapped and bound at the start of every poolfs process.
// Each function pointer has glfs.h's own type, so a wrong signature does not compile.
//
// Bounds: libgfapi's calls wait for the server as long as its ping timeout (42 s) or frame
// timeout (30 min) allow. Every call here runs on a detached thread of its own and the caller
// waits at most `timeout_ms`; a call that outlives its caller keeps a reference to its volume and
// file (and its own copy of the buffer), and cleans up what it made when it finally returns.
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <glusterfs/api/glfs.h>
#include "cglusterfs.h"

static void *library;
static pthread_once_t loaded = PTHREAD_ONCE_INIT;
static struct {
    __typeof__(glfs_new) *new_;
    __typeof__(glfs_set_volfile_server) *set_volfile_server;
    __typeof__(glfs_set_logging) *set_logging;
    __typeof__(glfs_init) *init;
    __typeof__(glfs_fini) *fini;
    __typeof__(glfs_lstat) *lstat;
    __typeof__(glfs_open) *open;
    __typeof__(glfs_close) *close;
    __typeof__(glfs_pread) *pread;
    __typeof__(glfs_fstat) *fstat;
    __typeof__(glfs_lseek) *lseek;
    __typeof__(glfs_opendir) *opendir;
    __typeof__(glfs_readdir_r) *readdir_r;
    __typeof__(glfs_closedir) *closedir;
} api;

static void load(void) {
    library = dlopen("libgfapi.so.0", RTLD_NOW | RTLD_LOCAL);
    if (!library) return;
#define BIND(field, name) api.field = (__typeof__(api.field))dlsym(library, name)
    BIND(new_, "glfs_new"); BIND(set_volfile_server, "glfs_set_volfile_server");
    BIND(set_logging, "glfs_set_logging"); BIND(init, "glfs_init"); BIND(fini, "glfs_fini");
    BIND(lstat, "glfs_lstat"); BIND(open, "glfs_open"); BIND(close, "glfs_close");
    BIND(pread, "glfs_pread"); BIND(fstat, "glfs_fstat"); BIND(lseek, "glfs_lseek");
    BIND(opendir, "glfs_opendir"); BIND(readdir_r, "glfs_readdir_r"); BIND(closedir, "glfs_closedir");
#undef BIND
    void **all = (void **)&api;
    for (size_t i = 0; i < sizeof api / sizeof(void *); i++) {
        if (!all[i]) { library = NULL; return; }
    }
}

int pgl_load(void) {
    pthread_once(&loaded, load);
    return library ? 0 : -ELIBACC;
}

// ---- reference-counted volumes and files ---------------------------------------------------

struct pgl_volume { int refs; glfs_t *fs; };
struct pgl_file { int refs; glfs_fd_t *fd; pgl_volume *volume; };

static void *fini_thread(void *fs) { api.fini(fs); return NULL; }

static void detach(void *(*body)(void *), void *arg) {
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&thread, &attr, body, arg) != 0) body(arg);
    pthread_attr_destroy(&attr);
}

static pgl_volume *volume_retain(pgl_volume *v) { __atomic_add_fetch(&v->refs, 1, __ATOMIC_RELAXED); return v; }
static void volume_release(pgl_volume *v) {
    if (!v || __atomic_sub_fetch(&v->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
    // glfs_fini takes about 10 s (upstream wontfix): nobody waits for it.
    if (v->fs) detach(fini_thread, v->fs);
    free(v);
}
static pgl_file *file_retain(pgl_file *f) { __atomic_add_fetch(&f->refs, 1, __ATOMIC_RELAXED); return f; }
/// glfs_close, then the file's reference on its volume (so glfs_fini never runs under it).
static void *close_thread(void *arg) {
    pgl_file *f = arg;
    if (f->fd) api.close(f->fd);
    volume_release(f->volume);
    free(f);
    return NULL;
}

static void file_release(pgl_file *f) {
    if (!f || __atomic_sub_fetch(&f->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
    // glfs_close waits for the brick (up to its 42 s ping timeout when it does not answer): on
    // a thread nobody waits for.
    detach(close_thread, f);
}

// ---- one bounded call -----------------------------------------------------------------------

struct call {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int refs, done;
    void (*run)(struct call *);
    pgl_volume *volume;
    pgl_file *file;
    char *path;
    void *buffer;
    size_t count;
    uint64_t offset;
    int whence;
    int64_t ret;
    struct stat st;
    glfs_fd_t *opened;
    char *records;
    size_t length;
    const char *host;
    const char *logfile;
    int port;
};

/// Frees the call and what it holds; `opened` and `records` only if nobody took them.
static void call_free(struct call *c) {
    if (c->opened) api.close(c->opened);
    free(c->records);
    free(c->buffer);
    free(c->path);
    file_release(c->file);
    volume_release(c->volume);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->cond);
    free(c);
}

static void call_drop(struct call *c) {
    pthread_mutex_lock(&c->lock);
    int left = --c->refs;
    pthread_mutex_unlock(&c->lock);
    if (left == 0) call_free(c);
}

static void *call_thread(void *arg) {
    struct call *c = arg;
    c->run(c);
    pthread_mutex_lock(&c->lock);
    c->done = 1;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(&c->lock);
    call_drop(c);
    return NULL;
}

static struct call *call_new(void (*run)(struct call *)) {
    struct call *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    pthread_mutex_init(&c->lock, NULL);
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&c->cond, &attr);
    pthread_condattr_destroy(&attr);
    c->refs = 2;
    c->run = run;
    return c;
}

/// Runs `c` on its own thread and waits up to `timeout_ms`: 0 when it finished (the caller reads
/// its results, then drops it), -ETIMEDOUT when not (already dropped: the thread frees it).
static int call_wait(struct call *c, int timeout_ms) {
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int started = pthread_create(&thread, &attr, call_thread, c);
    pthread_attr_destroy(&attr);
    if (started != 0) {
        c->refs = 1;
        call_free(c);
        return -EAGAIN;
    }
    struct timespec deadline;
    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) { deadline.tv_sec++; deadline.tv_nsec -= 1000000000L; }
    pthread_mutex_lock(&c->lock);
    while (!c->done) {
        if (pthread_cond_timedwait(&c->cond, &c->lock, &deadline) == ETIMEDOUT && !c->done) break;
    }
    int done = c->done;
    pthread_mutex_unlock(&c->lock);
    if (!done) {
        call_drop(c);
        return -ETIMEDOUT;
    }
    return 0;
}

static int64_t failed(int64_t r) { return r < 0 ? -(int64_t)(errno ? errno : EIO) : r; }

static void fill(struct pgl_stat *out, const struct stat *st) {
    out->size = (uint64_t)st->st_size;
    out->blocks = (uint64_t)st->st_blocks;
    out->ino = (uint64_t)st->st_ino;
    out->dev = (uint64_t)st->st_dev;
    out->nlink = (uint64_t)st->st_nlink;
    out->mode = st->st_mode;
    out->uid = st->st_uid;
    out->gid = st->st_gid;
    out->mtime_sec = st->st_mtim.tv_sec;
    out->mtime_nsec = st->st_mtim.tv_nsec;
    out->ctime_sec = st->st_ctim.tv_sec;
    out->ctime_nsec = st->st_ctim.tv_nsec;
}

// ---- the calls --------------------------------------------------------------------------------

static void run_connect(struct call *c) {
    glfs_t *fs = api.new_(c->path);
    if (!fs) { c->ret = failed(-1); return; }
    if (api.set_volfile_server(fs, "tcp", c->host, c->port) != 0
        || api.set_logging(fs, c->logfile ? c->logfile : "/dev/null", 3) != 0
        || api.init(fs) != 0) {
        c->ret = failed(-1);
        detach(fini_thread, fs);
        return;
    }
    c->volume = calloc(1, sizeof *c->volume);
    if (!c->volume) { c->ret = -ENOMEM; detach(fini_thread, fs); return; }
    c->volume->refs = 1;
    c->volume->fs = fs;
}

int pgl_connect(const char *host, int port, const char *volume, const char *logfile, int timeout_ms, pgl_volume **out) {
    if (pgl_load() != 0) return -ELIBACC;
    struct call *c = call_new(run_connect);
    if (!c) return -ENOMEM;
    // The thread may outlive this frame: it gets copies.
    c->path = strdup(volume);
    char *h = strdup(host), *l = logfile ? strdup(logfile) : NULL;
    c->host = h;
    c->logfile = l;
    c->port = port;
    // host and logfile are freed with the call (through `records` and `buffer`).
    c->records = h;
    c->buffer = l;
    int r = call_wait(c, timeout_ms);
    if (r != 0) return r;
    r = (int)c->ret;
    if (r == 0) { *out = c->volume; c->volume = NULL; }
    call_drop(c);
    return r;
}

void pgl_disconnect(pgl_volume *volume) { volume_release(volume); }

static void run_lstat(struct call *c) { c->ret = failed(api.lstat(c->volume->fs, c->path, &c->st)); }

int pgl_lstat(pgl_volume *volume, const char *path, struct pgl_stat *st, int timeout_ms) {
    struct call *c = call_new(run_lstat);
    if (!c) return -ENOMEM;
    c->volume = volume_retain(volume);
    c->path = strdup(path);
    int r = call_wait(c, timeout_ms);
    if (r != 0) return r;
    r = (int)c->ret;
    if (r == 0) fill(st, &c->st);
    call_drop(c);
    return r;
}

static void run_open(struct call *c) {
    c->opened = api.open(c->volume->fs, c->path, O_RDONLY | O_NOFOLLOW);
    c->ret = c->opened ? 0 : failed(-1);
}

int pgl_open(pgl_volume *volume, const char *path, pgl_file **out, int timeout_ms) {
    struct call *c = call_new(run_open);
    if (!c) return -ENOMEM;
    c->volume = volume_retain(volume);
    c->path = strdup(path);
    int r = call_wait(c, timeout_ms);
    if (r != 0) return r;
    r = (int)c->ret;
    if (r == 0) {
        pgl_file *f = calloc(1, sizeof *f);
        if (!f) { r = -ENOMEM; }
        else {
            f->refs = 1;
            f->fd = c->opened;
            f->volume = volume_retain(volume);
            c->opened = NULL;
            *out = f;
        }
    }
    call_drop(c);
    return r;
}

void pgl_close(pgl_file *file) { file_release(file); }

static void run_pread(struct call *c) {
    c->ret = failed(api.pread(c->file->fd, c->buffer, c->count, (off_t)c->offset, 0, NULL));
}

int64_t pgl_pread(pgl_file *file, void *buffer, size_t count, uint64_t offset, int timeout_ms) {
    struct call *c = call_new(run_pread);
    if (!c) return -ENOMEM;
    // Read into a buffer of the call's own: a late reply must not land in the caller's.
    c->buffer = malloc(count ? count : 1);
    if (!c->buffer) { c->refs = 1; call_free(c); return -ENOMEM; }
    c->file = file_retain(file);
    c->count = count;
    c->offset = offset;
    int r = call_wait(c, timeout_ms);
    if (r != 0) return r;
    int64_t n = c->ret;
    if (n > 0) memcpy(buffer, c->buffer, (size_t)n);
    call_drop(c);
    return n;
}

static void run_fstat(struct call *c) { c->ret = failed(api.fstat(c->file->fd, &c->st)); }

int pgl_fstat(pgl_file *file, struct pgl_stat *st, int timeout_ms) {
    struct call *c = call_new(run_fstat);
    if (!c) return -ENOMEM;
    c->file = file_retain(file);
    int r = call_wait(c, timeout_ms);
    if (r != 0) return r;
    r = (int)c->ret;
    if (r == 0) fill(st, &c->st);
    call_drop(c);
    return r;
}

static void run_lseek(struct call *c) { c->ret = failed(api.lseek(c->file->fd, (off_t)c->offset, c->whence)); }

int64_t pgl_lseek(pgl_file *file, uint64_t offset, int whence, int timeout_ms) {
    struct call *c = call_new(run_lseek);
    if (!c) return -ENOMEM;
    c->file = file_retain(file);
    c->offset = offset;
    c->whence = whence;
    int r = call_wait(c, timeout_ms);
    if (r != 0) return r;
    int64_t at = c->ret;
    call_drop(c);
    return at;
}

/// Appends one record (type byte, name, NUL) to the call's buffer.
static int append_record(struct call *c, size_t *capacity, unsigned char type, const char *name) {
    size_t need = 1 + strlen(name) + 1;
    if (c->length + need > *capacity) {
        size_t grown = (*capacity ? *capacity * 2 : 4096);
        while (grown < c->length + need) grown *= 2;
        char *bigger = realloc(c->records, grown);
        if (!bigger) return -ENOMEM;
        c->records = bigger;
        *capacity = grown;
    }
    c->records[c->length] = (char)type;
    memcpy(c->records + c->length + 1, name, need - 1);
    c->length += need;
    return 0;
}

static void run_list(struct call *c) {
    glfs_fd_t *dir = api.opendir(c->volume->fs, c->path);
    if (!dir) { c->ret = failed(-1); return; }
    size_t capacity = 0;
    struct dirent entry, *result = NULL;
    c->ret = 0;
    for (;;) {
        errno = 0;
        if (api.readdir_r(dir, &entry, &result) != 0) { c->ret = failed(-1); break; }
        if (!result) break;
        int r = append_record(c, &capacity, result->d_type, result->d_name);
        if (r != 0) { c->ret = r; break; }
    }
    api.closedir(dir);
}

int pgl_list(pgl_volume *volume, const char *path, char **records, size_t *length, int timeout_ms) {
    struct call *c = call_new(run_list);
    if (!c) return -ENOMEM;
    c->volume = volume_retain(volume);
    c->path = strdup(path);
    int r = call_wait(c, timeout_ms);
    if (r != 0) return r;
    r = (int)c->ret;
    if (r == 0) {
        *records = c->records;
        *length = c->length;
        c->records = NULL;
    }
    call_drop(c);
    return r;
}
