/* A FUSE file system that stores nothing: the floor of `harness bench
 * dbosfs`. It answers the requests a create + fsync + close + fsync(dir)
 * makes (lookup, getattr, mkdir, create, fsync, release, fsyncdir) at once
 * from memory, so what a benchmark measures on it is what the kernel's
 * FUSE round trips cost on this machine and nothing else. Directories made
 * in the root are remembered by name (so paths under them resolve); files
 * are numbered and forgotten. Loaded with ctypes; dh_fuse_null() serves
 * until the mount is unmounted. */
#define FUSE_USE_VERSION 34
#include <errno.h>
#include <fuse_lowlevel.h>
#include <string.h>

#define MAX_DIRS 64
#define TIMEOUT 1.0

static char dir_names[MAX_DIRS][256];
static unsigned n_dirs;
static fuse_ino_t next_file = 2; /* files even, directories odd (the root is 1) */

static void attr_of(fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    st->st_mode = (ino % 2) ? (S_IFDIR | 0755) : (S_IFREG | 0644);
    st->st_nlink = (ino % 2) ? 2 : 1;
}

static void reply_entry(fuse_req_t req, fuse_ino_t ino)
{
    struct fuse_entry_param e;
    memset(&e, 0, sizeof e);
    e.ino = ino;
    e.attr_timeout = e.entry_timeout = TIMEOUT;
    attr_of(ino, &e.attr);
    fuse_reply_entry(req, &e);
}

static void null_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    for (unsigned i = 0; parent == 1 && i < n_dirs; i++)
        if (strcmp(dir_names[i], name) == 0) {
            reply_entry(req, 3 + 2 * i);
            return;
        }
    fuse_reply_err(req, ENOENT);
}

static void null_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;
    (void)fi;
    attr_of(ino, &st);
    fuse_reply_attr(req, &st, TIMEOUT);
}

static void null_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
    (void)mode;
    if (parent != 1 || n_dirs == MAX_DIRS || strlen(name) >= sizeof dir_names[0]) {
        fuse_reply_err(req, EPERM);
        return;
    }
    strcpy(dir_names[n_dirs], name);
    reply_entry(req, 3 + 2 * n_dirs++);
}

static void null_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                        struct fuse_file_info *fi)
{
    struct fuse_entry_param e;
    (void)parent, (void)name, (void)mode;
    memset(&e, 0, sizeof e);
    e.ino = next_file += 2;
    e.attr_timeout = e.entry_timeout = TIMEOUT;
    attr_of(e.ino, &e.attr);
    fuse_reply_create(req, &e, fi);
}

static void null_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino;
    fuse_reply_open(req, fi);
}

static void null_done(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino, (void)fi;
    fuse_reply_err(req, 0);
}

static void null_sync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    (void)ino, (void)datasync, (void)fi;
    fuse_reply_err(req, 0);
}

/* No flush: ENOSYS, and the kernel stops sending it (as the DBOS mount). */
static const struct fuse_lowlevel_ops null_ops = {
    .lookup = null_lookup, .getattr = null_getattr, .mkdir = null_mkdir,
    .create = null_create, .open = null_open, .release = null_done,
    .opendir = null_open, .releasedir = null_done, .fsync = null_sync,
    .fsyncdir = null_sync,
};

__attribute__((visibility("default"))) int dh_fuse_null(const char *mountpoint)
{
    char *argv[] = {"dh-fuse-null", "-o", "default_permissions,auto_unmount,fsname=dh-null",
                    NULL};
    struct fuse_args args = FUSE_ARGS_INIT(3, argv);
    struct fuse_session *se = fuse_session_new(&args, &null_ops, sizeof null_ops, NULL);
    int rc = -1;

    if (se == NULL)
        return -1;
    if (fuse_session_mount(se, mountpoint) == 0) {
        rc = fuse_session_loop(se);
        fuse_session_unmount(se);
    }
    fuse_session_destroy(se);
    return rc;
}
