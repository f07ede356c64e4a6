/* The DBOS file system as a FUSE mount, in C: libfuse3's low-level API
 * over the `dirs`, `files`, `blocks` and `events` tables of a local DBOS
 * database (harness mount --db). It keeps exactly the layout and the rules
 * of harness/dbos/vfs.py, which serves the same tables to the pyfuse3
 * mount of a remote snode; see that module for them (inodes 2d-1 for
 * directories and 2f for files, the `.orphans` directory, EPERM for hard
 * links and device nodes, a fsync that fdatasyncs the WAL).
 *
 * Why C here: a request through pyfuse3 and trio costs ~60 us of Python
 * before any SQL, and a create with its fsyncs is six requests; in C a
 * request costs what the kernel's round trip and its SQLite statements do.
 *
 * One thread serves every request in order, so no locks. Provenance events
 * (create, read, write, rename, unlink, with the pid and the program) are
 * deduplicated per (kind, file, pid) and written once a second in one
 * transaction. Loaded with ctypes: dh_dbosfs() serves until unmounted or
 * sent SIGINT/SIGTERM/SIGHUP. */
#define FUSE_USE_VERSION 34
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <poll.h>
#include <signal.h>
#include <sqlite3.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096
#define NAME_MAX_ 255
#define TIMEOUT 1.0     /* seconds the kernel may keep an attribute or a name (ATTR_TIMEOUT) */
#define LOG_EVERY 1.0   /* seconds between provenance flushes */
#define SPIN 100e-6      /* seconds the server stays awake after a request (see serve) */
#define READDIR_BATCH 256
#define MAX_EVENTS 4096
#define FUSERMOUNT "/usr/bin/fusermount3" /* Debian's fuse3; execv, no PATH search after fork */
#define MAX_READ (64 << 20)
/* The WAL's size between checkpoints: 1000 frames (SQLite's autocheckpoint)
 * of a 4 KiB page and its 24-byte header, and the WAL header; rounded up. */
#define WAL_PREWRITE (5 << 20)

#define FILE_COLS "file_id, mode, uid, gid, size, accessed, modified, changed, created, dir_id"
#define DIR_COLS "dir_id, mode, uid, gid, accessed, modified, changed, created"

enum stmt {
    S_BEGIN, S_BEGIN_W, S_COMMIT, S_ROLLBACK,
    S_FILE_ATTR, S_DIR_ATTR, S_SUBDIRS, S_DIR_EXISTS, S_FILE_BY_NAME, S_DIR_BY_NAME,
    S_FILE_SIZE, S_TOUCH_DIR, S_NEW_FILE, S_NEW_DIR, S_ORPHAN, S_DEL_FILE, S_DIR_USED,
    S_DEL_DIR, S_MOVE_DIR, S_MOVE_FILE, S_PARENT, S_FORGET, S_READLINK,
    S_RD_DIRS, S_RD_FILES, S_COUNT, S_BLOCK, S_PUT_BLOCK, S_BLOCKS, S_CUT_BLOCKS,
    S_TAIL_BLOCK, S_GROW, S_WROTE, S_SET_SIZE, S_SET_FILE, S_SET_DIR, S_EVENT, N_STMT
};

static const char *const SQL[N_STMT] = {
    [S_BEGIN] = "BEGIN",
    [S_BEGIN_W] = "BEGIN IMMEDIATE",
    [S_COMMIT] = "COMMIT",
    [S_ROLLBACK] = "ROLLBACK",
    [S_FILE_ATTR] = "SELECT " FILE_COLS " FROM files WHERE file_id = ?",
    [S_DIR_ATTR] = "SELECT " DIR_COLS " FROM dirs WHERE dir_id = ?",
    [S_SUBDIRS] = "SELECT count(*) FROM dirs WHERE parent_id = ?",
    [S_DIR_EXISTS] = "SELECT 1 FROM dirs WHERE dir_id = ?",
    [S_FILE_BY_NAME] = "SELECT file_id FROM files WHERE dir_id = ? AND name = ?",
    [S_DIR_BY_NAME] = "SELECT dir_id FROM dirs WHERE parent_id = ? AND name = ?",
    [S_FILE_SIZE] = "SELECT size, mode FROM files WHERE file_id = ?",
    [S_TOUCH_DIR] = "UPDATE dirs SET modified = ?2, changed = ?2 WHERE dir_id = ?1",
    [S_NEW_FILE] = "INSERT INTO files (dir_id, name, size, created, modified, mode, uid, gid, "
                   "target) VALUES (?, ?, ?, ?4, ?4, ?, ?, ?, ?) RETURNING file_id",
    [S_NEW_DIR] = "INSERT INTO dirs (parent_id, name, created, modified, mode, uid, gid) "
                  "VALUES (?, ?, ?3, ?3, ?, ?, ?) RETURNING dir_id",
    [S_ORPHAN] = "UPDATE files SET dir_id = ?, name = ?, changed = ? WHERE file_id = ?",
    [S_DEL_FILE] = "DELETE FROM files WHERE file_id = ?",
    [S_DIR_USED] = "SELECT 1 FROM dirs WHERE parent_id = ?1 UNION ALL "
                   "SELECT 1 FROM files WHERE dir_id = ?1 LIMIT 1",
    [S_DEL_DIR] = "DELETE FROM dirs WHERE dir_id = ?",
    [S_MOVE_DIR] = "UPDATE dirs SET parent_id = ?, name = ?, changed = ? WHERE dir_id = ?",
    [S_MOVE_FILE] = "UPDATE files SET dir_id = ?, name = ?, changed = ? WHERE file_id = ?",
    [S_PARENT] = "SELECT parent_id FROM dirs WHERE dir_id = ?",
    [S_FORGET] = "DELETE FROM files WHERE file_id = ? AND dir_id = ?",
    [S_READLINK] = "SELECT mode, target FROM files WHERE file_id = ?",
    [S_RD_DIRS] = "SELECT name, " DIR_COLS " FROM dirs WHERE parent_id = ? AND dir_id > ? "
                  "ORDER BY dir_id LIMIT ?",
    [S_RD_FILES] = "SELECT name, " FILE_COLS " FROM files WHERE dir_id = ? AND file_id > ? "
                   "ORDER BY file_id LIMIT ?",
    [S_COUNT] = "SELECT (SELECT count(*) FROM files) + (SELECT count(*) FROM dirs)",
    [S_BLOCK] = "SELECT bytes FROM blocks WHERE file_id = ? AND block_number = ?",
    [S_PUT_BLOCK] = "INSERT OR REPLACE INTO blocks (file_id, block_number, bytes) "
                    "VALUES (?, ?, ?)",
    [S_BLOCKS] = "SELECT block_number, bytes FROM blocks WHERE file_id = ? AND "
                 "block_number BETWEEN ? AND ?",
    [S_CUT_BLOCKS] = "DELETE FROM blocks WHERE file_id = ? AND block_number >= ?",
    [S_TAIL_BLOCK] = "UPDATE blocks SET bytes = substr(bytes, 1, ?) WHERE file_id = ? "
                     "AND block_number = ?",
    [S_GROW] = "UPDATE files SET size = ?, modified = ?3, changed = ?3 WHERE file_id = ?2",
    /* size not SET: SQLite then leaves the files_size index alone */
    [S_WROTE] = "UPDATE files SET modified = ?2, changed = ?2 WHERE file_id = ?1",
    [S_SET_SIZE] = "UPDATE files SET size = ?, modified = ? WHERE file_id = ?",
    /* setattr: ?1 the change time; ?2-?6 NULL where not asked to change */
#define SET_COLS "SET changed = ?1, mode = coalesce(?2, mode), uid = coalesce(?3, uid), " \
                 "gid = coalesce(?4, gid), accessed = coalesce(?5, accessed), " \
                 "modified = coalesce(?6, modified)"
    [S_SET_FILE] = "UPDATE files " SET_COLS " WHERE file_id = ?7",
    [S_SET_DIR] = "UPDATE dirs " SET_COLS " WHERE dir_id = ?7",
    [S_EVENT] = "INSERT INTO events (time, node, task_id, kind, detail, pid, program) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
};

/* What the kernel holds of an inode: its lookup count and open handles. */
struct known {
    uint64_t ino;
    uint64_t nlookup;
    uint32_t opens;
    int orphan; /* unlinked while known: deleted at the last release or forget */
};

struct event {
    const char *kind;
    uint64_t ino;
    pid_t pid;
    double time;
    char program[17];
};

struct fs {
    sqlite3 *db;
    sqlite3_stmt *st[N_STMT];
    const char *path;
    char wal[4096 + 8];
    char dir[4096];
    const char *node;
    long long task; /* < 0: none */
    int64_t orphans;
    int unsynced;
    struct known *known; /* open addressing on ino, a power of two long */
    size_t nknown, cap;
    struct event *events;
    size_t nevents, evcap;
    double first_event;
};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t dir_ino(int64_t d) { return 2 * (uint64_t)d - 1; }
static uint64_t file_ino(int64_t f) { return 2 * (uint64_t)f; }
static int64_t ino_dir(uint64_t ino) { return (int64_t)((ino + 1) / 2); }
static int64_t ino_file(uint64_t ino) { return (int64_t)(ino / 2); }

/* ---- the kernel's inodes ------------------------------------------------- */

static size_t slot_of(struct fs *fs, uint64_t ino)
{
    size_t mask = fs->cap - 1, i = (size_t)(ino * 0x9E3779B97F4A7C15ull) & mask;
    while (fs->known[i].ino && fs->known[i].ino != ino)
        i = (i + 1) & mask;
    return i;
}

static struct known *known(struct fs *fs, uint64_t ino, int add)
{
    if (add && 2 * (fs->nknown + 1) > fs->cap) {
        struct known *old = fs->known;
        size_t ocap = fs->cap;
        fs->cap = ocap ? 2 * ocap : 1024;
        fs->known = calloc(fs->cap, sizeof *fs->known);
        if (fs->known == NULL)
            abort();
        for (size_t i = 0; i < ocap; i++)
            if (old[i].ino)
                fs->known[slot_of(fs, old[i].ino)] = old[i];
        free(old);
    }
    if (fs->cap == 0)
        return NULL;
    struct known *k = &fs->known[slot_of(fs, ino)];
    if (k->ino == 0) {
        if (!add)
            return NULL;
        *k = (struct known){.ino = ino}; /* a freed slot keeps nothing of its last inode */
        fs->nknown++;
    }
    return k;
}

/* Removes an entry the kernel no longer holds, re-placing the run after it. */
static void drop_known(struct fs *fs, struct known *k)
{
    size_t mask = fs->cap - 1, i = (size_t)(k - fs->known);
    fs->known[i] = (struct known){0};
    fs->nknown--;
    for (size_t j = (i + 1) & mask; fs->known[j].ino; j = (j + 1) & mask) {
        struct known moved = fs->known[j];
        fs->known[j] = (struct known){0};
        fs->known[slot_of(fs, moved.ino)] = moved;
    }
}

/* ---- statements and transactions ---------------------------------------- */

static sqlite3_stmt *q(struct fs *fs, enum stmt s)
{
    sqlite3_stmt *st = fs->st[s];
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return st;
}

/* Runs a statement that returns no row; 0 or an errno. */
static int run(struct fs *fs, sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    sqlite3_reset(st);
    if (rc == SQLITE_DONE || rc == SQLITE_ROW)
        return 0;
    fprintf(stderr, "[mount] %s: %s (the program sees EIO)\n", sqlite3_sql(st),
            sqlite3_errmsg(fs->db));
    return EIO;
}

/* The first row of a statement: 1 if there is one, 0 if none, -EIO. */
static int row(struct fs *fs, sqlite3_stmt *st)
{
    int rc = sqlite3_step(st);
    if (rc == SQLITE_ROW)
        return 1;
    sqlite3_reset(st);
    if (rc == SQLITE_DONE)
        return 0;
    fprintf(stderr, "[mount] %s: %s (the program sees EIO)\n", sqlite3_sql(st),
            sqlite3_errmsg(fs->db));
    return -EIO;
}

static int begin(struct fs *fs, int write) { return run(fs, q(fs, write ? S_BEGIN_W : S_BEGIN)); }

/* Ends a transaction: commits when err is 0, else rolls back; returns err
 * (or EIO if the commit failed). */
static int end(struct fs *fs, int err, int write)
{
    if (err == 0) {
        err = run(fs, q(fs, S_COMMIT));
        if (err == 0 && write)
            fs->unsynced = 1;
    }
    if (err)
        run(fs, q(fs, S_ROLLBACK));
    return err;
}

/* ---- names and attributes ------------------------------------------------ */

/* EINVAL for what vfs._name refuses (not UTF-8, '.', '..'), ENAMETOOLONG. */
static int check_name(const char *name)
{
    size_t n = strlen(name);
    if (n == 0 || strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
        return EINVAL;
    if (n > NAME_MAX_)
        return ENAMETOOLONG;
    /* Well-formed UTF-8 only, as Python decodes it: no overlong forms, no
     * surrogates, nothing above U+10FFFF (RFC 3629's table). */
    for (const unsigned char *p = (const unsigned char *)name; *p;) {
        unsigned c = *p++, lo = 0x80, hi = 0xBF;
        int more = c < 0x80 ? 0 : c >= 0xC2 && c <= 0xDF ? 1 : c >= 0xE0 && c <= 0xEF ? 2
                 : c >= 0xF0 && c <= 0xF4 ? 3 : -1;
        if (more < 0)
            return EINVAL;
        if (c == 0xE0)
            lo = 0xA0;
        else if (c == 0xED)
            hi = 0x9F;
        else if (c == 0xF0)
            lo = 0x90;
        else if (c == 0xF4)
            hi = 0x8F;
        for (int i = 0; i < more; i++, p++, lo = 0x80, hi = 0xBF)
            if (*p < lo || *p > hi)
                return EINVAL;
    }
    return 0;
}

static struct timespec ts_of(double t)
{
    struct timespec ts;
    ts.tv_sec = (time_t)t;
    ts.tv_nsec = (long)((t - (double)ts.tv_sec) * 1e9);
    if (ts.tv_nsec < 0)
        ts.tv_nsec = 0;
    return ts;
}

/* A time column, or t where it is NULL (never set: vfs.py's fallbacks). */
static double time_or(sqlite3_stmt *st, int col, double t)
{
    return sqlite3_column_type(st, col) == SQLITE_NULL ? t : sqlite3_column_double(st, col);
}

/* Attributes from a FILE_COLS row starting at column c. */
static void file_attr(struct fs *fs, sqlite3_stmt *st, int c, struct stat *a)
{
    memset(a, 0, sizeof *a);
    int64_t size = sqlite3_column_int64(st, c + 4);
    double mt = time_or(st, c + 6, sqlite3_column_double(st, c + 8));
    a->st_ino = file_ino(sqlite3_column_int64(st, c));
    a->st_mode = (mode_t)sqlite3_column_int(st, c + 1);
    a->st_nlink = sqlite3_column_int64(st, c + 9) == fs->orphans ? 0 : 1;
    a->st_uid = (uid_t)sqlite3_column_int(st, c + 2);
    a->st_gid = (gid_t)sqlite3_column_int(st, c + 3);
    a->st_size = size;
    a->st_blocks = (size + BLOCK - 1) / BLOCK * 8;
    a->st_blksize = BLOCK;
    a->st_mtim = ts_of(mt);
    a->st_atim = ts_of(time_or(st, c + 5, mt));
    a->st_ctim = ts_of(time_or(st, c + 7, mt));
}

/* Attributes from a DIR_COLS row starting at column c; 0 or an errno. */
static int dir_attr(struct fs *fs, sqlite3_stmt *st, int c, struct stat *a)
{
    memset(a, 0, sizeof *a);
    int64_t d = sqlite3_column_int64(st, c);
    double mt = time_or(st, c + 5, sqlite3_column_double(st, c + 7));
    a->st_ino = dir_ino(d);
    a->st_mode = (mode_t)sqlite3_column_int(st, c + 1);
    a->st_uid = (uid_t)sqlite3_column_int(st, c + 2);
    a->st_gid = (gid_t)sqlite3_column_int(st, c + 3);
    a->st_size = BLOCK;
    a->st_blocks = 8;
    a->st_blksize = BLOCK;
    a->st_mtim = ts_of(mt);
    a->st_atim = ts_of(time_or(st, c + 4, mt));
    a->st_ctim = ts_of(time_or(st, c + 6, mt));
    sqlite3_stmt *sub = q(fs, S_SUBDIRS);
    sqlite3_bind_int64(sub, 1, d);
    int r = row(fs, sub);
    if (r < 0)
        return EIO;
    a->st_nlink = 2 + (nlink_t)sqlite3_column_int64(sub, 0);
    sqlite3_reset(sub);
    return 0;
}

/* The attributes of an inode (vfs._attr); 0 or an errno. */
static int attr(struct fs *fs, uint64_t ino, struct stat *a)
{
    int isdir = ino % 2, r, err = 0;
    sqlite3_stmt *st = q(fs, isdir ? S_DIR_ATTR : S_FILE_ATTR);
    sqlite3_bind_int64(st, 1, isdir ? ino_dir(ino) : ino_file(ino));
    r = row(fs, st);
    if (r < 0)
        return EIO;
    if (r == 0 || (isdir && sqlite3_column_int64(st, 0) == fs->orphans))
        err = ENOENT;
    else if (isdir)
        err = dir_attr(fs, st, 0, a);
    else
        file_attr(fs, st, 0, a);
    sqlite3_reset(st);
    return err;
}

/* The directory id of a directory inode (vfs._dir_of); 0 or an errno. */
static int dir_of(struct fs *fs, uint64_t ino, int64_t *d)
{
    if (!(ino % 2))
        return ENOTDIR;
    *d = ino_dir(ino);
    if (*d == fs->orphans)
        return ENOENT;
    sqlite3_stmt *st = q(fs, S_DIR_EXISTS);
    sqlite3_bind_int64(st, 1, *d);
    int r = row(fs, st);
    sqlite3_reset(st);
    return r < 0 ? EIO : r ? 0 : ENOENT;
}

/* The size and mode of a file inode (vfs._file_of); 0 or an errno. */
static int file_of(struct fs *fs, uint64_t ino, int64_t *size, int *mode)
{
    if (ino % 2)
        return EISDIR;
    sqlite3_stmt *st = q(fs, S_FILE_SIZE);
    sqlite3_bind_int64(st, 1, ino_file(ino));
    int r = row(fs, st);
    if (r <= 0)
        return r < 0 ? EIO : ENOENT;
    *size = sqlite3_column_int64(st, 0);
    if (mode)
        *mode = sqlite3_column_int(st, 1);
    sqlite3_reset(st);
    return 0;
}

/* The inode of a name in directory d, or 0 (vfs._entry); -EIO on error. */
static int64_t entry(struct fs *fs, int64_t d, const char *name)
{
    for (int isdir = 0; isdir < 2; isdir++) {
        sqlite3_stmt *st = q(fs, isdir ? S_DIR_BY_NAME : S_FILE_BY_NAME);
        sqlite3_bind_int64(st, 1, d);
        sqlite3_bind_text(st, 2, name, -1, SQLITE_STATIC);
        int r = row(fs, st);
        if (r < 0)
            return -EIO;
        if (r) {
            int64_t id = sqlite3_column_int64(st, 0);
            sqlite3_reset(st);
            return (int64_t)(isdir ? dir_ino(id) : file_ino(id));
        }
    }
    return 0;
}

static int touch_dir(struct fs *fs, int64_t d, double t)
{
    sqlite3_stmt *st = q(fs, S_TOUCH_DIR);
    sqlite3_bind_int64(st, 1, d);
    sqlite3_bind_double(st, 2, t);
    return run(fs, st);
}

/* ---- provenance ---------------------------------------------------------- */

static void program_of(pid_t pid, char out[17])
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/comm", (int)pid);
    strcpy(out, "?");
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return;
    if (fgets(out, 17, f) == NULL)
        strcpy(out, "?");
    out[strcspn(out, "\n")] = 0;
    fclose(f);
}

/* One event per (kind, file, pid) per flush interval: a program reading a
 * file block by block is one read. The batch is written early when it
 * holds MAX_EVENTS, which bounds its memory and this scan. */
static void flush_log(struct fs *fs);

static void note(struct fs *fs, const char *kind, uint64_t ino, pid_t pid)
{
    char program[17] = "";
    for (size_t i = 0; i < fs->nevents; i++) {
        struct event *e = &fs->events[i];
        if (e->pid == pid) {
            if (e->kind == kind && e->ino == ino)
                return;
            memcpy(program, e->program, sizeof program);
        }
    }
    if (fs->nevents >= MAX_EVENTS)
        flush_log(fs);
    if (fs->nevents == fs->evcap) {
        fs->evcap = fs->evcap ? 2 * fs->evcap : 256;
        fs->events = realloc(fs->events, fs->evcap * sizeof *fs->events);
        if (fs->events == NULL)
            abort();
    }
    struct event *e = &fs->events[fs->nevents++];
    e->kind = kind, e->ino = ino, e->pid = pid, e->time = now();
    if (*program)
        memcpy(e->program, program, sizeof e->program);
    else
        program_of(pid, e->program);
    if (fs->nevents == 1)
        fs->first_event = e->time;
}

/* Writes the pending events in one transaction; if that fails they stay
 * pending for the next flush. */
static void flush_log(struct fs *fs)
{
    if (fs->nevents == 0 || begin(fs, 1))
        return;
    int err = 0;
    for (size_t i = 0; i < fs->nevents && !err; i++) {
        struct event *e = &fs->events[i];
        char detail[32];
        snprintf(detail, sizeof detail, "file:%llu", (unsigned long long)(e->ino / 2));
        sqlite3_stmt *st = q(fs, S_EVENT);
        sqlite3_bind_double(st, 1, e->time);
        if (*fs->node)
            sqlite3_bind_text(st, 2, fs->node, -1, SQLITE_STATIC);
        if (fs->task >= 0)
            sqlite3_bind_int64(st, 3, fs->task);
        sqlite3_bind_text(st, 4, e->kind, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 5, detail, -1, SQLITE_TRANSIENT);
        sqlite3_bind_int(st, 6, e->pid);
        sqlite3_bind_text(st, 7, e->program, -1, SQLITE_STATIC);
        err = run(fs, st);
    }
    if (end(fs, err, 1) == 0)
        fs->nevents = 0;
}

/* ---- replies ------------------------------------------------------------- */

static struct fs *fs_of(fuse_req_t req) { return fuse_req_userdata(req); }

/* Replies with an entry the kernel now knows (one more lookup). */
static void reply_known(fuse_req_t req, struct fs *fs, const struct stat *a,
                        struct fuse_file_info *fi)
{
    struct fuse_entry_param e;
    memset(&e, 0, sizeof e);
    e.ino = a->st_ino;
    e.attr = *a;
    e.attr_timeout = e.entry_timeout = TIMEOUT;
    known(fs, a->st_ino, 1)->nlookup++;
    if (fi)
        fuse_reply_create(req, &e, fi);
    else
        fuse_reply_entry(req, &e);
}

static void reply_attr(fuse_req_t req, int err, const struct stat *a)
{
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_attr(req, a, TIMEOUT);
}

/* ---- lookups ------------------------------------------------------------- */

/* Begins a transaction and finds a name in directory inode parent: 0 with
 * the transaction open, or an errno with it ended. */
static int begin_at(struct fs *fs, int write, fuse_ino_t parent, const char *name, int64_t *d,
                    int64_t *ino)
{
    int err = check_name(name);
    if (err || (err = begin(fs, write)))
        return err;
    err = dir_of(fs, parent, d);
    if (!err)
        err = (*ino = entry(fs, *d, name)) < 0 ? EIO : *ino == 0 ? ENOENT : 0;
    return err ? end(fs, err, write) : 0;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fs *fs = fs_of(req);
    struct stat a;
    int64_t d, ino = 0;
    int err = begin_at(fs, 0, parent, name, &d, &ino);
    if (!err)
        err = end(fs, attr(fs, (uint64_t)ino, &a), 0);
    if (err)
        fuse_reply_err(req, err);
    else
        reply_known(req, fs, &a, NULL);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    struct stat a;
    int err = begin(fs, 0);
    (void)fi;
    if (!err)
        err = end(fs, attr(fs, ino, &a), 0);
    reply_attr(req, err, &a);
}

static void op_readlink(fuse_req_t req, fuse_ino_t ino)
{
    struct fs *fs = fs_of(req);
    int err = ino % 2 ? EINVAL : begin(fs, 0);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    sqlite3_stmt *st = q(fs, S_READLINK);
    sqlite3_bind_int64(st, 1, ino_file(ino));
    int r = row(fs, st);
    if (r == 1 && S_ISLNK(sqlite3_column_int(st, 0))) {
        int n = sqlite3_column_bytes(st, 1);
        char *target = malloc((size_t)n + 1);
        if (target) {
            memcpy(target, sqlite3_column_blob(st, 1), (size_t)n);
            target[n] = 0;
        }
        sqlite3_reset(st);
        end(fs, 0, 0);
        if (target)
            fuse_reply_readlink(req, target);
        else
            fuse_reply_err(req, ENOMEM);
        free(target);
        return;
    }
    sqlite3_reset(st);
    fuse_reply_err(req, end(fs, r < 0 ? EIO : EINVAL, 0));
}

/* ---- making and removing names ------------------------------------------- */

/* (directory, checked name) for a new entry; EEXIST if the name is taken. */
static int free_name(struct fs *fs, fuse_ino_t parent, const char *name, int64_t *d)
{
    int err = check_name(name);
    int64_t ino;
    if (!err)
        err = dir_of(fs, parent, d);
    if (!err)
        err = (ino = entry(fs, *d, name)) < 0 ? EIO : ino ? EEXIST : 0;
    return err;
}

static int new_file(struct fs *fs, fuse_ino_t parent, const char *name, mode_t mode,
                    const struct fuse_ctx *ctx, const char *target, struct stat *a)
{
    int64_t d;
    int err = begin(fs, 1);
    if (err)
        return err;
    err = free_name(fs, parent, name, &d);
    double t = now();
    if (!err) {
        sqlite3_stmt *st = q(fs, S_NEW_FILE);
        sqlite3_bind_int64(st, 1, d);
        sqlite3_bind_text(st, 2, name, -1, SQLITE_STATIC);
        sqlite3_bind_int64(st, 3, target ? (int64_t)strlen(target) : 0);
        sqlite3_bind_double(st, 4, t);
        sqlite3_bind_int(st, 5, (int)mode);
        sqlite3_bind_int(st, 6, (int)ctx->uid);
        sqlite3_bind_int(st, 7, (int)ctx->gid);
        if (target)
            sqlite3_bind_blob(st, 8, target, (int)strlen(target), SQLITE_STATIC);
        int r = row(fs, st);
        int64_t fid = r == 1 ? sqlite3_column_int64(st, 0) : 0;
        sqlite3_reset(st);
        err = r == 1 ? 0 : EIO;
        if (!err)
            err = touch_dir(fs, d, t);
        if (!err)
            err = attr(fs, file_ino(fid), a);
    }
    return end(fs, err, 1);
}

static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                      struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    struct stat a;
    int err = (mode & S_IFMT) && !S_ISREG(mode) ? EPERM : 0; /* files, dirs, symlinks only */
    if (!err)
        err = new_file(fs, parent, name, S_IFREG | (mode & ~ctx->umask & 07777), ctx, NULL, &a);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    note(fs, "file_create", a.st_ino, ctx->pid);
    if (fi) {
        fi->fh = (uint64_t)ctx->pid;
        fi->keep_cache = 0; /* every program's reads reach here and are logged */
        known(fs, a.st_ino, 1)->opens++;
    }
    reply_known(req, fs, &a, fi);
}

static void op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                     dev_t rdev)
{
    (void)rdev;
    op_create(req, parent, name, mode, NULL);
}

static void op_symlink(fuse_req_t req, const char *target, fuse_ino_t parent, const char *name)
{
    struct fs *fs = fs_of(req);
    struct stat a;
    int err = new_file(fs, parent, name, S_IFLNK | 0777, fuse_req_ctx(req), target, &a);
    if (err)
        fuse_reply_err(req, err);
    else
        reply_known(req, fs, &a, NULL);
}

static void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
    struct fs *fs = fs_of(req);
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    struct stat a;
    int64_t d;
    int err = begin(fs, 1);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    err = free_name(fs, parent, name, &d);
    double t = now();
    if (!err) {
        sqlite3_stmt *st = q(fs, S_NEW_DIR);
        sqlite3_bind_int64(st, 1, d);
        sqlite3_bind_text(st, 2, name, -1, SQLITE_STATIC);
        sqlite3_bind_double(st, 3, t);
        sqlite3_bind_int(st, 4, (int)(S_IFDIR | (mode & ~ctx->umask & 07777)));
        sqlite3_bind_int(st, 5, (int)ctx->uid);
        sqlite3_bind_int(st, 6, (int)ctx->gid);
        int r = row(fs, st);
        int64_t nd = r == 1 ? sqlite3_column_int64(st, 0) : 0;
        sqlite3_reset(st);
        err = r == 1 ? 0 : EIO;
        if (!err)
            err = touch_dir(fs, d, t);
        if (!err)
            err = attr(fs, dir_ino(nd), &a);
    }
    err = end(fs, err, 1);
    if (err)
        fuse_reply_err(req, err);
    else
        reply_known(req, fs, &a, NULL);
}

static void op_link(fuse_req_t req, fuse_ino_t ino, fuse_ino_t parent, const char *name)
{
    (void)ino, (void)parent, (void)name;
    fuse_reply_err(req, EPERM); /* hard links are not supported on the DBOS mount */
}

/* Removes a file's name: it goes to the orphans while the kernel still
 * knows it, else at once with its blocks (vfs._drop_file). */
static int drop_file(struct fs *fs, int64_t fid, double t)
{
    struct known *k = known(fs, file_ino(fid), 0);
    sqlite3_stmt *st;
    if (k && k->nlookup) {
        char name[24];
        snprintf(name, sizeof name, "%lld", (long long)fid);
        st = q(fs, S_ORPHAN);
        sqlite3_bind_int64(st, 1, fs->orphans);
        sqlite3_bind_text(st, 2, name, -1, SQLITE_TRANSIENT);
        sqlite3_bind_double(st, 3, t);
        sqlite3_bind_int64(st, 4, fid);
        k->orphan = 1;
    } else {
        st = q(fs, S_DEL_FILE);
        sqlite3_bind_int64(st, 1, fid);
    }
    return run(fs, st);
}

/* Deletes an empty directory d (vfs._rmdir). */
static int remove_dir(struct fs *fs, int64_t d)
{
    sqlite3_stmt *st = q(fs, S_DIR_USED);
    sqlite3_bind_int64(st, 1, d);
    int r = row(fs, st);
    sqlite3_reset(st);
    if (r)
        return r < 0 ? EIO : ENOTEMPTY;
    st = q(fs, S_DEL_DIR);
    sqlite3_bind_int64(st, 1, d);
    return run(fs, st);
}

/* unlink (dir 0) and rmdir (dir 1) of a name in directory inode parent. */
static void remove_name(fuse_req_t req, fuse_ino_t parent, const char *name, int dir)
{
    struct fs *fs = fs_of(req);
    int64_t d, ino = 0;
    int err = begin_at(fs, 1, parent, name, &d, &ino);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    err = ino % 2 == dir ? 0 : dir ? ENOTDIR : EISDIR;
    double t = now();
    if (!err)
        err = dir ? remove_dir(fs, ino_dir((uint64_t)ino))
                  : drop_file(fs, ino_file((uint64_t)ino), t);
    if (!err)
        err = touch_dir(fs, d, t);
    err = end(fs, err, 1);
    struct known *k = dir ? NULL : known(fs, (uint64_t)ino, 0);
    if (!dir && !err)
        note(fs, "file_unlink", (uint64_t)ino, fuse_req_ctx(req)->pid);
    else if (k)
        k->orphan = 0; /* rolled back: the file keeps its name */
    fuse_reply_err(req, err);
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    remove_name(req, parent, name, 0);
}

static void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    remove_name(req, parent, name, 1);
}

/* POSIX rename: replaces a file, or an empty directory by a directory;
 * never moves a directory below itself (vfs.rename). */
static int do_rename(struct fs *fs, fuse_ino_t op, const char *old, fuse_ino_t np,
                     const char *new, unsigned flags, int64_t *src, int64_t *replaced)
{
    int64_t od, nd, dst = 0;
    int err = check_name(old);
    if (!err)
        err = check_name(new);
    if (!err)
        err = dir_of(fs, op, &od);
    if (!err)
        err = dir_of(fs, np, &nd);
    if (!err)
        err = (*src = entry(fs, od, old)) < 0 ? EIO : *src == 0 ? ENOENT : 0;
    if (!err)
        err = (dst = entry(fs, nd, new)) < 0 ? EIO : 0;
    if (err || dst == *src)
        return err;
    if (dst && (flags & RENAME_NOREPLACE))
        return EEXIST;
    double t = now();
    sqlite3_stmt *st;
    if (*src % 2) { /* a directory: not into itself or below */
        for (int64_t anc = nd; anc;) {
            if (anc == ino_dir((uint64_t)*src))
                return EINVAL;
            st = q(fs, S_PARENT);
            sqlite3_bind_int64(st, 1, anc);
            int r = row(fs, st);
            if (r < 0)
                return EIO;
            anc = r ? sqlite3_column_int64(st, 0) : 0;
            sqlite3_reset(st);
        }
        if (dst) {
            if (!(dst % 2))
                return ENOTDIR;
            if ((err = remove_dir(fs, ino_dir((uint64_t)dst))))
                return err;
        }
        st = q(fs, S_MOVE_DIR);
        sqlite3_bind_int64(st, 4, ino_dir((uint64_t)*src));
    } else {
        if (dst) {
            if (dst % 2)
                return EISDIR;
            if ((err = drop_file(fs, ino_file((uint64_t)dst), t)))
                return err;
            *replaced = dst;
        }
        st = q(fs, S_MOVE_FILE);
        sqlite3_bind_int64(st, 4, ino_file((uint64_t)*src));
    }
    sqlite3_bind_int64(st, 1, nd);
    sqlite3_bind_text(st, 2, new, -1, SQLITE_STATIC);
    sqlite3_bind_double(st, 3, t);
    if ((err = run(fs, st)))
        return err;
    if ((err = touch_dir(fs, od, t)))
        return err;
    return touch_dir(fs, nd, t);
}

static void op_rename(fuse_req_t req, fuse_ino_t op, const char *old, fuse_ino_t np,
                      const char *new, unsigned int flags)
{
    struct fs *fs = fs_of(req);
    int64_t src = 0, replaced = 0;
    int err = flags & RENAME_EXCHANGE ? EINVAL : begin(fs, 1);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    err = end(fs, do_rename(fs, op, old, np, new, flags, &src, &replaced), 1);
    struct known *k = replaced ? known(fs, (uint64_t)replaced, 0) : NULL;
    if (err && k)
        k->orphan = 0;
    if (!err && src > 0 && !(src % 2))
        note(fs, "file_rename", (uint64_t)src, fuse_req_ctx(req)->pid);
    fuse_reply_err(req, err);
}

/* The kernel no longer knows an inode: an orphan goes for good. */
static void forget_one(struct fs *fs, fuse_ino_t ino, uint64_t n)
{
    struct known *k = known(fs, ino, 0);
    if (k == NULL)
        return;
    k->nlookup = k->nlookup > n ? k->nlookup - n : 0;
    if (k->nlookup || k->opens)
        return;
    int orphan = k->orphan;
    drop_known(fs, k);
    if (orphan && !begin(fs, 1)) {
        sqlite3_stmt *st = q(fs, S_FORGET);
        sqlite3_bind_int64(st, 1, ino_file(ino));
        sqlite3_bind_int64(st, 2, fs->orphans);
        end(fs, run(fs, st), 1);
    }
}

static void op_forget(fuse_req_t req, fuse_ino_t ino, uint64_t nlookup)
{
    forget_one(fs_of(req), ino, nlookup);
    fuse_reply_none(req);
}

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
    for (size_t i = 0; i < count; i++)
        forget_one(fs_of(req), forgets[i].ino, forgets[i].nlookup);
    fuse_reply_none(req);
}

/* ---- attributes and data ------------------------------------------------- */

/* Drops a file's blocks past size and cuts the last one (fs.truncate_blocks). */
static int truncate_blocks(struct fs *fs, int64_t fid, int64_t size)
{
    int64_t nblocks = (size + BLOCK - 1) / BLOCK;
    sqlite3_stmt *st = q(fs, S_CUT_BLOCKS);
    sqlite3_bind_int64(st, 1, fid);
    sqlite3_bind_int64(st, 2, nblocks);
    int err = run(fs, st);
    if (!err && size % BLOCK) {
        st = q(fs, S_TAIL_BLOCK);
        sqlite3_bind_int64(st, 1, size % BLOCK);
        sqlite3_bind_int64(st, 2, fid);
        sqlite3_bind_int64(st, 3, nblocks - 1);
        err = run(fs, st);
    }
    return err;
}

static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *in, int to_set,
                       struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    struct stat a;
    int64_t size;
    int mode = 0, err = begin(fs, 1);
    double t = now();
    (void)fi;
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    if (ino % 2) {
        int64_t d;
        err = to_set & FUSE_SET_ATTR_SIZE ? EISDIR : dir_of(fs, ino, &d);
        if (!err) {
            sqlite3_stmt *st = q(fs, S_DIR_ATTR);
            sqlite3_bind_int64(st, 1, d);
            err = row(fs, st) == 1 ? 0 : EIO;
            mode = sqlite3_column_int(st, 1);
            sqlite3_reset(st);
        }
    } else {
        err = file_of(fs, ino, &size, &mode);
        if (!err && (to_set & FUSE_SET_ATTR_SIZE)) {
            err = in->st_size < 0 ? EINVAL : truncate_blocks(fs, ino_file(ino), in->st_size);
            if (!err) {
                sqlite3_stmt *st = q(fs, S_SET_SIZE);
                sqlite3_bind_int64(st, 1, in->st_size);
                sqlite3_bind_double(st, 2, t);
                sqlite3_bind_int64(st, 3, ino_file(ino));
                err = run(fs, st);
            }
        }
    }
    if (!err) { /* a value left NULL keeps its column */
        sqlite3_stmt *st = q(fs, ino % 2 ? S_SET_DIR : S_SET_FILE);
        sqlite3_bind_double(st, 1, t);
        if (to_set & FUSE_SET_ATTR_MODE)
            sqlite3_bind_int(st, 2, (int)((mode & S_IFMT) | (in->st_mode & 07777)));
        if (to_set & FUSE_SET_ATTR_UID)
            sqlite3_bind_int(st, 3, (int)in->st_uid);
        if (to_set & FUSE_SET_ATTR_GID)
            sqlite3_bind_int(st, 4, (int)in->st_gid);
        if (to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_ATIME_NOW))
            sqlite3_bind_double(st, 5, to_set & FUSE_SET_ATTR_ATIME_NOW ? t
                                : (double)in->st_atim.tv_sec + in->st_atim.tv_nsec / 1e9);
        if (to_set & (FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_MTIME_NOW))
            sqlite3_bind_double(st, 6, to_set & FUSE_SET_ATTR_MTIME_NOW ? t
                                : (double)in->st_mtim.tv_sec + in->st_mtim.tv_nsec / 1e9);
        sqlite3_bind_int64(st, 7, ino % 2 ? ino_dir(ino) : ino_file(ino));
        err = run(fs, st);
    }
    if (!err)
        err = attr(fs, ino, &a);
    err = end(fs, err, 1);
    if (!err && (to_set & FUSE_SET_ATTR_SIZE))
        note(fs, "file_write", ino, fuse_req_ctx(req)->pid);
    reply_attr(req, err, &a);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    struct stat a;
    int err = ino % 2 ? EISDIR : begin(fs, 0);
    if (!err)
        err = end(fs, attr(fs, ino, &a), 0);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    /* The opener's pid names the reads and writes of its handle: a read
     * the kernel makes ahead of a program carries no pid of its own. */
    fi->fh = (uint64_t)fuse_req_ctx(req)->pid;
    fi->keep_cache = 0; /* the kernel drops cached pages at each open: reads reach here */
    known(fs, ino, 1)->opens++;
    fuse_reply_open(req, fi);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    struct known *k = known(fs, ino, 0);
    (void)fi;
    if (k && k->opens && --k->opens == 0 && k->orphan) {
        /* Nothing can reach an unlinked file once its last handle closes. */
        k->orphan = 0;
        if (!begin(fs, 1)) {
            sqlite3_stmt *st = q(fs, S_FORGET);
            sqlite3_bind_int64(st, 1, ino_file(ino));
            sqlite3_bind_int64(st, 2, fs->orphans);
            end(fs, run(fs, st), 1);
        }
    }
    if (k && !k->opens && !k->nlookup)
        drop_known(fs, k);
    fuse_reply_err(req, 0);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    int64_t fsize = 0;
    int err = off < 0 ? EINVAL : 0;
    if (!err) {
        note(fs, "file_read", ino, (pid_t)fi->fh); /* outside the read: it may flush the log */
        err = begin(fs, 0);
    }
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    err = file_of(fs, ino, &fsize, NULL);
    if (size > MAX_READ)
        size = MAX_READ;
    int64_t stop = off + (int64_t)size < fsize ? off + (int64_t)size : fsize;
    size_t n = stop > off ? (size_t)(stop - off) : 0;
    char *out = n ? calloc(1, n) : NULL;
    if (!err && n && out == NULL)
        err = ENOMEM;
    if (!err && n) { /* holes read as zeros; only the blocks there are are read */
        sqlite3_stmt *st = q(fs, S_BLOCKS);
        sqlite3_bind_int64(st, 1, ino_file(ino));
        sqlite3_bind_int64(st, 2, off / BLOCK);
        sqlite3_bind_int64(st, 3, (stop - 1) / BLOCK);
        int r;
        while ((r = row(fs, st)) == 1) {
            int64_t base = sqlite3_column_int64(st, 0) * BLOCK;
            const char *b = sqlite3_column_blob(st, 1);
            int64_t lo = base > off ? base : off;
            int64_t hi = base + sqlite3_column_bytes(st, 1);
            hi = hi < stop ? hi : stop;
            if (lo < hi)
                memcpy(out + (lo - off), b + (lo - base), (size_t)(hi - lo));
        }
        err = r < 0 ? EIO : 0;
    }
    err = end(fs, err, 0);
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_buf(req, out, n);
    free(out);
}

/* Writes data at off into a file's blocks, merging partial blocks with
 * what is there (fs.write_blocks). */
static int write_blocks(struct fs *fs, int64_t fid, int64_t off, const char *data, size_t n)
{
    char block[BLOCK];
    for (int64_t pos = off, stop = off + (int64_t)n; pos < stop;) {
        int64_t bn = pos / BLOCK, boff = pos % BLOCK;
        int64_t take = BLOCK - boff < stop - pos ? BLOCK - boff : stop - pos;
        const char *chunk = data + (pos - off);
        int len = (int)take;
        if (boff || take < BLOCK) { /* a partial block: merge with what is there */
            sqlite3_stmt *st = q(fs, S_BLOCK);
            sqlite3_bind_int64(st, 1, fid);
            sqlite3_bind_int64(st, 2, bn);
            int r = row(fs, st), old = 0;
            if (r < 0)
                return EIO;
            if (r) {
                old = sqlite3_column_bytes(st, 0);
                old = old > BLOCK ? BLOCK : old; /* blocks are at most BLOCK bytes */
                memcpy(block, sqlite3_column_blob(st, 0), (size_t)old);
                sqlite3_reset(st);
            }
            if (old < boff + take)
                memset(block + old, 0, (size_t)(boff + take - old));
            memcpy(block + boff, chunk, (size_t)take);
            chunk = block;
            len = old > boff + take ? old : (int)(boff + take);
        }
        sqlite3_stmt *st = q(fs, S_PUT_BLOCK);
        sqlite3_bind_int64(st, 1, fid);
        sqlite3_bind_int64(st, 2, bn);
        sqlite3_bind_blob(st, 3, chunk, len, SQLITE_STATIC);
        int err = run(fs, st);
        if (err)
            return err;
        pos += take;
    }
    return 0;
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    int64_t fsize = 0;
    int err = off < 0 ? EINVAL : begin(fs, 1);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    err = file_of(fs, ino, &fsize, NULL);
    if (!err)
        err = write_blocks(fs, ino_file(ino), off, buf, size);
    if (!err) {
        int grow = off + (int64_t)size > fsize;
        sqlite3_stmt *st = q(fs, grow ? S_GROW : S_WROTE);
        sqlite3_bind_int64(st, grow ? 2 : 1, ino_file(ino));
        sqlite3_bind_double(st, grow ? 3 : 2, now());
        if (grow)
            sqlite3_bind_int64(st, 1, off + (int64_t)size);
        err = run(fs, st);
    }
    err = end(fs, err, 1);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    note(fs, "file_write", ino, (pid_t)fi->fh);
    fuse_reply_write(req, size);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    /* Writes reach the tables as they happen, so a close has nothing to
     * flush; ENOSYS tells the kernel to stop asking. */
    (void)ino, (void)fi;
    fuse_reply_err(req, ENOSYS);
}

/* Makes every committed transaction durable: commits do not wait for the
 * disk (synchronous=NORMAL), a program's fsync fdatasyncs the WAL, as
 * SQLite syncs it; SQLite syncs the database file at each checkpoint. */
static int sync_all(struct fs *fs)
{
    if (!fs->unsynced)
        return 0;
    int fd = open(fs->wal, O_RDONLY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) /* no WAL yet: the database file */
        fd = open(fs->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    int err = fdatasync(fd) ? errno : 0;
    close(fd);
    if (!err)
        fs->unsynced = 0;
    return err;
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    (void)ino, (void)datasync, (void)fi;
    fuse_reply_err(req, sync_all(fs_of(req)));
}

static void op_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    int64_t d;
    int err = begin(fs, 0);
    if (!err)
        err = end(fs, dir_of(fs, ino, &d), 0); /* ENOENT/ENOTDIR now, not at the first read */
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_open(req, fi);
}

/* Entries with inodes above off, in inode order, so a directory of any
 * size is read in parts and an offset stays valid while entries come and
 * go; each entry's offset is its inode. */
static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    struct fs *fs = fs_of(req);
    int64_t d;
    size_t used = 0;
    char *buf = malloc(size);
    int err = buf ? begin(fs, 0) : ENOMEM;
    (void)fi;
    if (err) {
        free(buf);
        fuse_reply_err(req, err);
        return;
    }
    err = dir_of(fs, ino, &d);
    for (int full = 0; !err && !full;) {
        sqlite3_stmt *ds = q(fs, S_RD_DIRS), *fs_ = q(fs, S_RD_FILES);
        sqlite3_bind_int64(ds, 1, d);
        sqlite3_bind_int64(ds, 2, ino_dir((uint64_t)off));
        sqlite3_bind_int(ds, 3, READDIR_BATCH);
        sqlite3_bind_int64(fs_, 1, d);
        sqlite3_bind_int64(fs_, 2, ino_file((uint64_t)off));
        sqlite3_bind_int(fs_, 3, READDIR_BATCH);
        int rd = row(fs, ds), rf = row(fs, fs_), added = 0, nd = 0, nf = 0;
        /* The smallest inodes of the two batches together are the smallest
         * of the directory only until a full batch runs out: then fetch on. */
        while (!err && (rd == 1 || rf == 1) &&
               !(rd == 0 && nd == READDIR_BATCH) && !(rf == 0 && nf == READDIR_BATCH)) {
            uint64_t di = rd == 1 ? dir_ino(sqlite3_column_int64(ds, 1)) : UINT64_MAX;
            uint64_t fi_ = rf == 1 ? file_ino(sqlite3_column_int64(fs_, 1)) : UINT64_MAX;
            sqlite3_stmt *st = di < fi_ ? ds : fs_;
            struct stat a;
            memset(&a, 0, sizeof a);
            a.st_ino = di < fi_ ? di : fi_;
            a.st_mode = (mode_t)sqlite3_column_int(st, 2);
            const char *name = (const char *)sqlite3_column_text(st, 0);
            size_t need = fuse_add_direntry(req, buf + used, size - used, name, &a,
                                            (off_t)a.st_ino);
            if (need > size - used) {
                full = 1;
                break;
            }
            used += need;
            off = (off_t)a.st_ino;
            added = 1;
            if (st == ds)
                rd = row(fs, ds), nd++;
            else
                rf = row(fs, fs_), nf++;
            if (rd < 0 || rf < 0)
                err = EIO;
        }
        if (rd < 0 || rf < 0)
            err = EIO;
        sqlite3_reset(ds);
        sqlite3_reset(fs_);
        if (!added)
            break;
    }
    err = end(fs, err, 0);
    if (err)
        fuse_reply_err(req, err);
    else
        fuse_reply_buf(req, buf, used);
    free(buf);
}

static void op_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    (void)ino, (void)fi;
    fuse_reply_err(req, 0);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    struct fs *fs = fs_of(req);
    struct statvfs st, out;
    (void)ino;
    if (statvfs(fs->dir, &st) || begin(fs, 0)) {
        fuse_reply_err(req, EIO);
        return;
    }
    sqlite3_stmt *c = q(fs, S_COUNT);
    int r = row(fs, c);
    int64_t nfiles = r == 1 ? sqlite3_column_int64(c, 0) : 0;
    sqlite3_reset(c);
    end(fs, r == 1 ? 0 : EIO, 0);
    double scale = (double)st.f_frsize / BLOCK;
    memset(&out, 0, sizeof out);
    out.f_bsize = out.f_frsize = BLOCK;
    out.f_blocks = (fsblkcnt_t)((double)st.f_blocks * scale);
    out.f_bfree = (fsblkcnt_t)((double)st.f_bfree * scale);
    out.f_bavail = (fsblkcnt_t)((double)st.f_bavail * scale);
    out.f_files = (fsfilcnt_t)nfiles + st.f_ffree;
    out.f_ffree = out.f_favail = st.f_ffree;
    out.f_namemax = NAME_MAX_;
    fuse_reply_statfs(req, &out);
}

/* Without atomic O_TRUNC the kernel truncates an opened file by a setattr
 * of its size, as for pyfuse3; with it (libfuse's default) open would have
 * to. */
static void op_init(void *userdata, struct fuse_conn_info *conn)
{
    (void)userdata;
    conn->want &= ~(unsigned)FUSE_CAP_ATOMIC_O_TRUNC;
}

static const struct fuse_lowlevel_ops OPS = {
    .init = op_init,
    .lookup = op_lookup, .forget = op_forget, .forget_multi = op_forget_multi,
    .getattr = op_getattr, .setattr = op_setattr, .readlink = op_readlink,
    .mknod = op_mknod, .mkdir = op_mkdir, .unlink = op_unlink, .rmdir = op_rmdir,
    .symlink = op_symlink, .rename = op_rename, .link = op_link, .open = op_open,
    .read = op_read, .write = op_write, .flush = op_flush, .release = op_release,
    .fsync = op_fsync, .opendir = op_opendir, .readdir = op_readdir,
    .releasedir = op_releasedir, .fsyncdir = op_fsync, .statfs = op_statfs,
    .create = op_create,
};

/* ---- the loop ------------------------------------------------------------ */

/* Writes the WAL's blocks once, as zeros, while it is empty: SQLite then
 * writes its frames over blocks the file already has (it starts the WAL
 * over after each checkpoint and never shortens it), so the fdatasync of a
 * program's fsync is a data flush without an ext4 journal commit for the
 * file's growth. Done under the write lock, so no other writer's frames are
 * overwritten; skipped if the WAL cannot be emptied (a reader holds it). */
static void prewrite_wal(struct fs *fs)
{
    static const char zeros[1 << 16];
    int busy = 1;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(fs->db, "PRAGMA wal_checkpoint(TRUNCATE)", -1, &st, NULL) != SQLITE_OK)
        return;
    if (sqlite3_step(st) == SQLITE_ROW)
        busy = sqlite3_column_int(st, 0);
    sqlite3_finalize(st);
    if (busy || begin(fs, 1))
        return;
    int fd = open(fs->wal, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    struct stat a;
    if (fd >= 0 && fstat(fd, &a) == 0 && a.st_size == 0) {
        for (off_t at = 0; at < WAL_PREWRITE; at += (off_t)sizeof zeros)
            if (pwrite(fd, zeros, sizeof zeros, at) != (ssize_t)sizeof zeros)
                break;
        if (fdatasync(fd))
            perror("[mount] fdatasync of the WAL");
    }
    if (fd >= 0)
        close(fd);
    end(fs, 0, 0);
}

static int open_db(struct fs *fs, const char *path)
{
    if (sqlite3_open_v2(path, &fs->db, SQLITE_OPEN_READWRITE, NULL) != SQLITE_OK) {
        fprintf(stderr, "[mount] %s: %s\n", path, sqlite3_errmsg(fs->db));
        return -1;
    }
    sqlite3_busy_timeout(fs->db, 10000);
    const char *setup = "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; "
                        "PRAGMA foreign_keys=ON";
    if (sqlite3_exec(fs->db, setup, NULL, NULL, NULL) != SQLITE_OK)
        goto fail;
    for (int i = 0; i < N_STMT; i++)
        if (sqlite3_prepare_v3(fs->db, SQL[i], -1, SQLITE_PREPARE_PERSISTENT, &fs->st[i],
                               NULL) != SQLITE_OK)
            goto fail;
    sqlite3_stmt *st;
    if (sqlite3_prepare_v2(fs->db, "SELECT dir_id FROM dirs WHERE parent_id IS NULL AND "
                           "name = '.orphans'", -1, &st, NULL) != SQLITE_OK)
        goto fail;
    int found = sqlite3_step(st) == SQLITE_ROW;
    fs->orphans = found ? sqlite3_column_int64(st, 0) : 0;
    sqlite3_finalize(st);
    if (!found) {
        fprintf(stderr, "[mount] %s is not a DBOS database of schema 2 or later\n", path);
        return -1;
    }
    prewrite_wal(fs);
    return 0;
fail:
    fprintf(stderr, "[mount] %s: %s\n", path, sqlite3_errmsg(fs->db));
    return -1;
}

static void close_db(struct fs *fs)
{
    for (int i = 0; i < N_STMT; i++)
        sqlite3_finalize(fs->st[i]);
    sqlite3_close(fs->db);
}

/* Serves requests until the session ends, flushing the provenance log at
 * least once a second while events are pending. After each request it
 * reads the device without sleeping for SPIN seconds: a program's next
 * request (a create with its fsyncs is five in a row) then finds the
 * server awake rather than paying for its wake-up, which on this kind of
 * machine costs more than serving the request. */
static int serve(struct fs *fs, struct fuse_session *se)
{
    struct fuse_buf buf = {.mem = NULL};
    struct pollfd p = {.fd = fuse_session_fd(se), .events = POLLIN};
    double spin_until = 0;
    int rc = 0;
    if (fcntl(p.fd, F_SETFL, fcntl(p.fd, F_GETFL) | O_NONBLOCK)) {
        perror("[mount] /dev/fuse");
        return -1;
    }
    while (!fuse_session_exited(se)) {
        double t = now();
        if (fs->nevents && t >= fs->first_event + LOG_EVERY)
            flush_log(fs);
        int got = fuse_session_receive_buf(se, &buf);
        if (got == -EAGAIN) {
            if (t < spin_until)
                continue;
            int wait = fs->nevents ? (int)((fs->first_event + LOG_EVERY - t) * 1000) + 1 : -1;
            if (fs->nevents && wait < 1000 * LOG_EVERY / 10) /* a flush failed: retry, not spin */
                wait = (int)(1000 * LOG_EVERY / 10);
            if (poll(&p, 1, wait) < 0 && errno != EINTR) {
                perror("[mount] poll");
                rc = -1;
                break;
            }
            continue;
        }
        if (got == -EINTR)
            continue;
        if (got <= 0) {
            rc = got < 0 && got != -ENODEV ? -1 : 0; /* ENODEV: unmounted */
            break;
        }
        fuse_session_process_buf(se, &buf);
        spin_until = now() + SPIN;
    }
    free(buf.mem);
    flush_log(fs);
    return rc;
}

/* Mounts the DBOS database at db (which must exist, migrated, with no
 * orphans: harness.dbos.mount does that first) on mountpoint and serves it;
 * 0 when unmounted or signalled, else -1 (said on stderr). node and task
 * (task < 0: none) name the events; fsname is how /proc/mounts shows it. */
__attribute__((visibility("default"))) int dh_dbosfs(const char *db, const char *mountpoint,
                                                     const char *fsname, const char *node,
                                                     long long task, int ready_fd)
{
    static struct fs fs;
    char opts[4200];
    snprintf(opts, sizeof opts, "default_permissions,auto_unmount,noatime,subtype=dbos,"
             "fsname=%s", fsname);
    char *argv[] = {"dh-dbosfs", "-o", opts, NULL};
    struct fuse_args args = FUSE_ARGS_INIT(3, argv);
    int rc = -1;

    memset(&fs, 0, sizeof fs);
    fs.path = db, fs.node = node, fs.task = task;
    snprintf(fs.wal, sizeof fs.wal, "%s-wal", db);
    snprintf(fs.dir, sizeof fs.dir, "%s", db);
    char *slash = strrchr(fs.dir, '/');
    if (slash)
        *(slash == fs.dir ? slash + 1 : slash) = 0;
    else
        strcpy(fs.dir, ".");
    if (open_db(&fs, db))
        goto out;
    struct fuse_session *se = fuse_session_new(&args, &OPS, sizeof OPS, &fs);
    if (se == NULL)
        goto out;
    if (fuse_set_signal_handlers(se) == 0) {
        if (fuse_session_mount(se, mountpoint) == 0) {
            if (ready_fd >= 0) { /* the caller learns the mount is up */
                ssize_t w = write(ready_fd, "up\n", 3);
                (void)w;
                close(ready_fd);
                ready_fd = -1;
            }
            rc = serve(&fs, se);
            fuse_session_unmount(se);
        }
        fuse_remove_signal_handlers(se);
    }
    fuse_session_destroy(se);
out:
    if (ready_fd >= 0) /* never mounted: the caller sees the end of the pipe */
        close(ready_fd);
    if (fs.db)
        close_db(&fs);
    free(fs.known);
    free(fs.events);
    return rc;
}

/* Forks a watcher, in a session of its own, that outlives this process:
 * when this process ends and leaves a dead FUSE mount at mountpoint
 * (ENOTCONN or ECONNABORTED), it runs `fusermount3 -u -z` on it. libfuse's
 * auto_unmount does the same but looks once, and can look while the dying
 * server's connection is still being aborted (ECONNABORTED), when it leaves
 * the mount behind; that happened under load in the tests. Used for both
 * servers (harness.dbos.mount). Returns the descriptor whose closing (by
 * the caller after a clean unmount, or by this process's end) wakes the
 * watcher, or -1 with errno. */
__attribute__((visibility("default"))) int dh_unmount_when_gone(const char *mountpoint)
{
    int p[2];
    if (pipe2(p, O_CLOEXEC))
        return -1;
    pid_t pid = fork();
    if (pid < 0) {
        close(p[0]);
        close(p[1]);
        return -1;
    }
    if (pid > 0) {
        close(p[0]);
        return p[1];
    }
    /* Only async-signal-safe calls from here: the parent has threads. */
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);
    setsid();
    int null = open("/dev/null", O_RDWR);
    for (int fd = 0; fd < 3 && null >= 0; fd++)
        if (fd != p[0])
            dup2(null, fd);
    if (p[0] != 3)
        dup2(p[0], 3);
    if (close_range(4, ~0u, 0)) /* before Linux 5.9: one by one */
        for (int fd = 4; fd < 65536; fd++)
            close(fd);
    char c;
    while (read(3, &c, 1) < 0 && errno == EINTR)
        ;
    /* The server is gone. statfs always asks the server (lstat could be
     * answered from cached attributes); it blocks until the connection is
     * aborted. */
    struct statvfs st;
    int rc;
    while ((rc = statvfs(mountpoint, &st)) < 0 && errno == EINTR)
        ;
    if (rc < 0 && (errno == ENOTCONN || errno == ECONNABORTED)) {
        sigprocmask(SIG_UNBLOCK, &all, NULL);
        execv(FUSERMOUNT, (char *const[]){"fusermount3", "-u", "-z", (char *)mountpoint, NULL});
    }
    _exit(0);
}
