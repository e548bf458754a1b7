#define _GNU_SOURCE
#include "chostio.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <malloc.h>
#include <signal.h>
#include <spawn.h>
#include <stdlib.h>
#include <string.h>
#include <linux/openat2.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int fallocate_mode(int fd, int mode, uint64_t offset, uint64_t length) {
    int r;
    do {
        r = fallocate(fd, mode, (off_t)offset, (off_t)length);
    } while (r < 0 && errno == EINTR);
    return r < 0 ? -errno : 0;
}

int poolfs_punch_hole(int fd, uint64_t offset, uint64_t length) {
    return fallocate_mode(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

int poolfs_zero_range(int fd, uint64_t offset, uint64_t length) {
    return fallocate_mode(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
}

static struct flock byte_lock(uint64_t byte, short type) {
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)byte;
    fl.l_len = 1;
    fl.l_type = type;
    return fl;
}

int poolfs_ofd_lock_byte(int fd, uint64_t byte, int exclusive, int unlock) {
    struct flock fl = byte_lock(byte, unlock ? F_UNLCK : (exclusive ? F_WRLCK : F_RDLCK));
    return fcntl(fd, F_OFD_SETLK, &fl) < 0 ? -errno : 0;
}

int poolfs_ofd_byte_locked(int fd, uint64_t byte) {
    struct flock fl = byte_lock(byte, F_WRLCK);
    if (fcntl(fd, F_OFD_GETLK, &fl) < 0) return -errno;
    return fl.l_type != F_UNLCK;
}

/// `count` NUL-terminated strings packed in `packed`, as a NULL-terminated array (malloc'ed).
static char **unpack(const char *packed, int count) {
    char **list = calloc((size_t)count + 1, sizeof *list);
    if (!list) return NULL;
    for (int i = 0; i < count; i++) {
        list[i] = (char *)packed;
        packed += strlen(packed) + 1;
    }
    return list;
}

int poolfs_spawn(const char *args, int argc, const char *env, int envc, int out_fd, int err_fd, int *pid) {
    if (argc < 1) return EINVAL;
    char **argv = unpack(args, argc), **envp = unpack(env, envc);
    int rc = ENOMEM;
    posix_spawn_file_actions_t actions;
    posix_spawnattr_t attr;
    if (argv && envp && posix_spawn_file_actions_init(&actions) == 0) {
        if (posix_spawnattr_init(&attr) == 0) {
            sigset_t none, all;
            sigemptyset(&none);
            sigfillset(&all);
            posix_spawnattr_setsigmask(&attr, &none);
            posix_spawnattr_setsigdefault(&attr, &all);
            posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
            rc = posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
            if (rc == 0) rc = posix_spawn_file_actions_adddup2(&actions, out_fd, 1);
            if (rc == 0) rc = posix_spawn_file_actions_adddup2(&actions, err_fd, 2);
            if (rc == 0) rc = posix_spawn_file_actions_addclosefrom_np(&actions, 3);
            if (rc == 0) rc = posix_spawnp(pid, argv[0], &actions, &attr, argv, envp);
            posix_spawnattr_destroy(&attr);
        }
        posix_spawn_file_actions_destroy(&actions);
    }
    free(argv);
    free(envp);
    return rc;
}

int poolfs_wait(int pid, int timeout_ms, int *status) {
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    long pause_us = 200;
    for (;;) {
        int st = 0;
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid) {
            *status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            return 0;
        }
        if (r < 0 && errno != EINTR) return -errno;
        clock_gettime(CLOCK_MONOTONIC, &now);
        long elapsed_ms = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
        if (elapsed_ms >= timeout_ms) return -ETIMEDOUT;
        usleep((useconds_t)pause_us);
        if (pause_us < 20000) pause_us *= 2;
    }
}

void poolfs_keep_freed_memory(int mmap_threshold, int trim_threshold) {
    mallopt(M_MMAP_THRESHOLD, mmap_threshold);
    mallopt(M_TRIM_THRESHOLD, trim_threshold);
}

int poolfs_open_beneath(int dirfd, const char *path, int flags) {
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = (uint64_t)(flags | O_CLOEXEC);
    how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
    long fd;
    do {
        fd = syscall(SYS_openat2, dirfd, path, &how, sizeof how);
    } while (fd < 0 && errno == EINTR);
    return fd < 0 ? -errno : (int)fd;
}

long long poolfs_fs_type(int fd) {
    struct statfs fs;
    if (fstatfs(fd, &fs) != 0) return -1;
    return (long long)(unsigned long)fs.f_type;
}
