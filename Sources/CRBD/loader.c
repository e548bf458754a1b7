// librados and librbd loaded on first use (dlopen), not linked. Both are built with BIND_NOW:
// linked, they and ceph-common (with boost, ibverbs, rdmacm, fmt) were mapped and every symbol
// bound at the start of every poolfs process, about half of a `poolfs --version` (19 ms of CPU),
// whether or not it ever touched an RBD pool. Each call below has librados.h's or librbd.h's own
// declaration (so a wrong signature does not compile) and forwards to the library's function.
// If the libraries cannot be loaded, the calls that return a status return -ELIBACC and the
// others (cleanups of what only a successful call made) do nothing.
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include "shim.h"

static void *rados_library, *rbd_library;
static pthread_once_t loaded = PTHREAD_ONCE_INIT;

static void load(void) {
    rados_library = dlopen("librados.so.2", RTLD_NOW | RTLD_LOCAL);
    rbd_library = dlopen("librbd.so.1", RTLD_NOW | RTLD_LOCAL);
}

/// The function `name` of `*library` (after loading), or NULL. Looked up once per call site:
/// `slot` caches it (atomically: calls come from many threads).
static void *symbol(void **library, const char *name, void **slot) {
    void *fn = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    if (fn) return fn;
    pthread_once(&loaded, load);
    if (!*library) return NULL;
    fn = dlsym(*library, name);
    __atomic_store_n(slot, fn, __ATOMIC_RELEASE);
    return fn;
}

#define FORWARD(library, type, name, params, args, fallback)                        \
    type name params {                                                                \
        static void *slot;                                                            \
        type (*fn) params = (type (*) params)symbol(&library, #name, &slot);          \
        return fn ? fn args : fallback;                                               \
    }
#define FORWARD_VOID(library, name, params, args)                                    \
    void name params {                                                                \
        static void *slot;                                                            \
        void (*fn) params = (void (*) params)symbol(&library, #name, &slot);          \
        if (fn) fn args;                                                              \
    }

FORWARD(rados_library, int, rados_create, (rados_t *cluster, const char * const id), (cluster, id), -ELIBACC)
FORWARD(rados_library, int, rados_conf_read_file, (rados_t cluster, const char *path), (cluster, path), -ELIBACC)
FORWARD(rados_library, int, rados_conf_set, (rados_t cluster, const char *option, const char *value), (cluster, option, value), -ELIBACC)
FORWARD(rados_library, int, rados_connect, (rados_t cluster), (cluster), -ELIBACC)
FORWARD(rados_library, int, rados_cluster_fsid, (rados_t cluster, char *buf, size_t len), (cluster, buf, len), -ELIBACC)
FORWARD(rados_library, int, rados_ioctx_create, (rados_t cluster, const char *pool_name, rados_ioctx_t *ioctx), (cluster, pool_name, ioctx), -ELIBACC)
FORWARD_VOID(rados_library, rados_ioctx_destroy, (rados_ioctx_t io), (io))
FORWARD_VOID(rados_library, rados_ioctx_set_namespace, (rados_ioctx_t io, const char *nspace), (io, nspace))
FORWARD_VOID(rados_library, rados_shutdown, (rados_t cluster), (cluster))
FORWARD(rados_library, int, rados_aio_create_completion2, (void *cb_arg, rados_callback_t cb_complete, rados_completion_t *pc),
        (cb_arg, cb_complete, pc), -ELIBACC)
FORWARD(rados_library, int, rados_aio_get_return_value, (rados_completion_t c), (c), -ELIBACC)
FORWARD_VOID(rados_library, rados_aio_release, (rados_completion_t c), (c))
FORWARD(rados_library, rados_read_op_t, rados_create_read_op, (void), (), NULL)
FORWARD_VOID(rados_library, rados_release_read_op, (rados_read_op_t read_op), (read_op))
FORWARD_VOID(rados_library, rados_read_op_exec_user_buf,
             (rados_read_op_t read_op, const char *cls, const char *method, const char *in_buf, size_t in_len, char *out_buf,
              size_t out_len, size_t *used_len, int *prval),
             (read_op, cls, method, in_buf, in_len, out_buf, out_len, used_len, prval))
FORWARD(rados_library, int, rados_aio_read_op_operate, (rados_read_op_t read_op, rados_ioctx_t io, rados_completion_t completion, const char *oid, int flags),
        (read_op, io, completion, oid, flags), -ELIBACC)

FORWARD(rbd_library, int, rbd_aio_create_completion, (void *cb_arg, rbd_callback_t complete_cb, rbd_completion_t *c), (cb_arg, complete_cb, c), -ELIBACC)
FORWARD(rbd_library, int, rbd_aio_flush, (rbd_image_t image, rbd_completion_t c), (image, c), -ELIBACC)
FORWARD(rbd_library, ssize_t, rbd_aio_get_return_value, (rbd_completion_t c), (c), -ELIBACC)
FORWARD(rbd_library, int, rbd_aio_read, (rbd_image_t image, uint64_t off, size_t len, char *buf, rbd_completion_t c), (image, off, len, buf, c), -ELIBACC)
FORWARD_VOID(rbd_library, rbd_aio_release, (rbd_completion_t c), (c))
FORWARD(rbd_library, int, rbd_aio_write, (rbd_image_t image, uint64_t off, size_t len, const char *buf, rbd_completion_t c), (image, off, len, buf, c), -ELIBACC)
FORWARD(rbd_library, int, rbd_aio_write_zeroes, (rbd_image_t image, uint64_t off, size_t len, rbd_completion_t c, int zero_flags, int op_flags),
        (image, off, len, c, zero_flags, op_flags), -ELIBACC)
FORWARD(rbd_library, int, rbd_close, (rbd_image_t image), (image), -ELIBACC)
FORWARD(rbd_library, int, rbd_diff_iterate2,
        (rbd_image_t image, const char *fromsnapname, uint64_t ofs, uint64_t len, uint8_t include_parent, uint8_t whole_object,
         int (*cb)(uint64_t, size_t, int, void *), void *arg),
        (image, fromsnapname, ofs, len, include_parent, whole_object, cb, arg), -ELIBACC)
FORWARD(rbd_library, int, rbd_get_create_timestamp, (rbd_image_t image, struct timespec *timestamp), (image, timestamp), -ELIBACC)
FORWARD(rbd_library, int, rbd_get_features, (rbd_image_t image, uint64_t *features), (image, features), -ELIBACC)
FORWARD(rbd_library, int, rbd_get_flags, (rbd_image_t image, uint64_t *flags), (image, flags), -ELIBACC)
FORWARD(rbd_library, int, rbd_get_id, (rbd_image_t image, char *id, size_t id_len), (image, id, id_len), -ELIBACC)
FORWARD(rbd_library, int, rbd_get_parent, (rbd_image_t image, rbd_linked_image_spec_t *parent_image, rbd_snap_spec_t *parent_snap),
        (image, parent_image, parent_snap), -ELIBACC)
FORWARD_VOID(rbd_library, rbd_image_spec_list_cleanup, (rbd_image_spec_t *images, size_t num_images), (images, num_images))
FORWARD_VOID(rbd_library, rbd_linked_image_spec_cleanup, (rbd_linked_image_spec_t *image), (image))
FORWARD(rbd_library, int, rbd_list2, (rados_ioctx_t io, rbd_image_spec_t *images, size_t *max_images), (io, images, max_images), -ELIBACC)
FORWARD(rbd_library, int, rbd_lock_acquire, (rbd_image_t image, rbd_lock_mode_t lock_mode), (image, lock_mode), -ELIBACC)
FORWARD(rbd_library, int, rbd_lock_get_owners, (rbd_image_t image, rbd_lock_mode_t *lock_mode, char **lock_owners, size_t *max_lock_owners),
        (image, lock_mode, lock_owners, max_lock_owners), -ELIBACC)
FORWARD_VOID(rbd_library, rbd_lock_get_owners_cleanup, (char **lock_owners, size_t lock_owner_count), (lock_owners, lock_owner_count))
FORWARD(rbd_library, int, rbd_lock_release, (rbd_image_t image), (image), -ELIBACC)
FORWARD(rbd_library, int, rbd_open, (rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name), (io, name, image, snap_name), -ELIBACC)
FORWARD(rbd_library, int, rbd_open_read_only, (rados_ioctx_t io, const char *name, rbd_image_t *image, const char *snap_name),
        (io, name, image, snap_name), -ELIBACC)
FORWARD(rbd_library, int, rbd_snap_create, (rbd_image_t image, const char *snapname), (image, snapname), -ELIBACC)
FORWARD(rbd_library, int, rbd_snap_get_timestamp, (rbd_image_t image, uint64_t snap_id, struct timespec *timestamp), (image, snap_id, timestamp), -ELIBACC)
FORWARD(rbd_library, int, rbd_snap_list, (rbd_image_t image, rbd_snap_info_t *snaps, int *max_snaps), (image, snaps, max_snaps), -ELIBACC)
FORWARD_VOID(rbd_library, rbd_snap_list_end, (rbd_snap_info_t *snaps), (snaps))
FORWARD(rbd_library, int, rbd_snap_remove, (rbd_image_t image, const char *snapname), (image, snapname), -ELIBACC)
FORWARD(rbd_library, int, rbd_snap_rollback, (rbd_image_t image, const char *snapname), (image, snapname), -ELIBACC)
FORWARD_VOID(rbd_library, rbd_snap_spec_cleanup, (rbd_snap_spec_t *snap), (snap))
FORWARD(rbd_library, int, rbd_stat, (rbd_image_t image, rbd_image_info_t *info, size_t infosize), (image, info, infosize), -ELIBACC)
