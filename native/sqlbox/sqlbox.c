/* SQLite in a compartment. See dh_sqlbox.h. */
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dh_error.h"
#include "dh_box.h"
#include "dh_sqlbox.h"
#include "dh_transport.h" /* dh_now_ns */

/* ---- the allocator SQLite is given: all of it inside the compartment ----------- */

/* SQLite's allocator hooks carry no context: the heap's state (in the
 * compartment, where only SQLite and this code reach it) is found from here. */
struct state {
    dh_heap *heap;
    sqlite3 *db;
};

static struct state *the_state; /* set once, before SQLite starts: read only after */

static void *h_malloc(int n) { return n > 0 ? dh_heap_alloc(the_state->heap, (size_t)n) : NULL; }
static void h_free(void *p) { dh_heap_free(the_state->heap, p); }
static int h_size(void *p) { return (int)dh_heap_size(p); }

static void *h_realloc(void *p, int n)
{
    if (p && (size_t)n <= dh_heap_size(p))
        return p;
    void *q = h_malloc(n);
    if (q && p) {
        memcpy(q, p, dh_heap_size(p));
        h_free(p);
    }
    return q;
}

static int h_roundup(int n) { return (int)dh_heap_roundup((size_t)n); }
static int h_init(void *app) { (void)app; return SQLITE_OK; }
static void h_shutdown(void *app) { (void)app; }

static const sqlite3_mem_methods heap_methods = {
    h_malloc, h_free, h_realloc, h_size, h_roundup, h_init, h_shutdown, NULL,
};

/* ---- the box --------------------------------------------------------------------- */

/* What crosses a gate: outside every compartment, so both sides reach it. */
struct call {
    const char *sql;
    size_t len;
    int rc;
    size_t rows_len;
    char err[512];
    char *rows; /* the rest of the shared buffer */
    size_t rows_cap;
};

struct dh_sqlbox {
    dh_box box;
    void *heap; /* inside lib: the app cannot dereference it */
    struct call *call; /* box.shared */
};

static int opened; /* one box per process: SQLite's allocator is process-wide */
static sqlite3_mem_methods saved; /* SQLite's own allocator, back after a box closes */

static void put(struct call *c, const void *p, size_t n)
{
    if (c->rows_len + n <= c->rows_cap)
        memcpy(c->rows + c->rows_len, p, n);
    c->rows_len += n; /* past rows_cap: the result did not fit (DH_ETOOBIG) */
}

/* Inside the compartment: every statement of c->sql, its rows into c->rows. */
static uint64_t in_exec(void *arg)
{
    struct call *c = arg;
    sqlite3 *db = the_state->db;
    const char *sql = c->sql, *end = c->sql + c->len;
    c->rc = SQLITE_OK;
    c->rows_len = 0;
    c->err[0] = 0;
    while (sql < end && c->rc == SQLITE_OK) {
        sqlite3_stmt *st = NULL;
        const char *tail = NULL;
        c->rc = sqlite3_prepare_v2(db, sql, (int)(end - sql), &st, &tail);
        if (c->rc != SQLITE_OK || !st) {
            sql = tail ? tail : end;
            continue; /* an error, or only whitespace or a comment */
        }
        int cols = sqlite3_column_count(st);
        while ((c->rc = sqlite3_step(st)) == SQLITE_ROW) {
            for (int i = 0; i < cols; i++) {
                if (i)
                    put(c, "\x1f", 1);
                const unsigned char *v = sqlite3_column_text(st, i);
                if (v)
                    put(c, v, (size_t)sqlite3_column_bytes(st, i));
                else
                    put(c, "", 1); /* NULL: a lone 0x00 */
            }
            put(c, "\x1e", 1);
        }
        if (c->rc == SQLITE_DONE)
            c->rc = SQLITE_OK;
        sqlite3_finalize(st);
        sql = tail;
    }
    if (c->rc != SQLITE_OK)
        snprintf(c->err, sizeof c->err, "%s", sqlite3_errmsg(db));
    return 0;
}

static uint64_t in_open(void *arg)
{
    struct call *c = arg;
    c->rc = sqlite3_initialize();
    if (c->rc == SQLITE_OK)
        c->rc = sqlite3_open_v2(":memory:", &the_state->db,
                                SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE, NULL);
    if (c->rc != SQLITE_OK)
        snprintf(c->err, sizeof c->err, "%s", the_state->db ? sqlite3_errmsg(the_state->db)
                                                           : sqlite3_errstr(c->rc));
    return 0;
}

static uint64_t in_close(void *arg)
{
    (void)arg;
    sqlite3_close_v2(the_state->db);
    the_state->db = NULL;
    sqlite3_shutdown();
    return 0;
}

/* Outside any gate, before SQLite starts: the compartment's heap must be
 * reachable to lay the allocator out in it. */
static uint64_t in_layout(void *arg)
{
    dh_comp *lib = arg;
    dh_heap *h = dh_heap_init(dh_comp_heap(lib), dh_comp_heap_size(lib));
    the_state = h ? dh_heap_alloc(h, sizeof *the_state) : NULL;
    if (the_state) {
        the_state->heap = h;
        the_state->db = NULL;
    }
    return 0;
}

int dh_sqlbox_open(dh_comp *lib, int private_stack, size_t shared_bytes, dh_sqlbox **out,
                   char *err, size_t errlen)
{
    if (!lib || shared_bytes < 2 * sizeof(struct call) || !err || !errlen)
        return DH_EINVAL;
    err[0] = 0;
    if (opened) {
        snprintf(err, errlen, "SQLite is already in a compartment in this process (one box "
                              "per process: its allocator is process-wide)");
        return DH_EINVAL;
    }
    /* Before the layout: SQLite refuses a new allocator once it has started. */
    if (sqlite3_config(SQLITE_CONFIG_GETMALLOC, &saved) != SQLITE_OK ||
        sqlite3_config(SQLITE_CONFIG_MALLOC, &heap_methods) != SQLITE_OK) {
        snprintf(err, errlen, "SQLite was already started in this process (Python's sqlite3 "
                              "module, say): a compartmentalised SQLite needs a process of "
                              "its own");
        return DH_EINVAL;
    }
    dh_sqlbox *b = calloc(1, sizeof *b);
    if (!b)
        return DH_ENOMEM;
    b->heap = dh_comp_heap(lib);
    if (dh_box_open(&b->box, lib, private_stack, shared_bytes)) {
        free(b);
        return DH_ENOMEM;
    }
    b->call = b->box.shared;
    b->call->rows = (char *)(b->call + 1);
    b->call->rows_cap = shared_bytes - sizeof(struct call);
    dh_gate_call(lib, in_layout, lib);
    if (!the_state) {
        snprintf(err, errlen, "the compartment's heap is too small for SQLite's allocator");
        sqlite3_config(SQLITE_CONFIG_MALLOC, &saved);
        dh_box_close(&b->box, NULL);
        free(b);
        return DH_EINVAL;
    }
    opened = 1;
    dh_box_call(&b->box, in_open, b->call);
    if (b->call->rc != SQLITE_OK) {
        snprintf(err, errlen, "%s", b->call->err);
        dh_sqlbox_close(b);
        return DH_EIO;
    }
    *out = b;
    return 0;
}

void dh_sqlbox_close(dh_sqlbox *b)
{
    if (!b)
        return;
    dh_box_close(&b->box, in_close);
    free(b);
    sqlite3_config(SQLITE_CONFIG_MALLOC, &saved); /* SQLite is shut down: allowed */
    opened = 0;
}

int dh_sqlbox_exec(dh_sqlbox *b, const char *sql, size_t len, const char **rows,
                   size_t *rows_len)
{
    struct call *c = b->call;
    if (len > c->rows_cap)
        return DH_ETOOBIG;
    /* The SQL text crosses in the shared buffer, after where rows will go. */
    char *text = c->rows + c->rows_cap - len;
    memcpy(text, sql, len);
    c->sql = text;
    c->len = len;
    c->rows_cap -= len;
    dh_box_call(&b->box, in_exec, c);
    c->rows_cap += len;
    *rows = c->rows;
    *rows_len = c->rows_len;
    if (c->rc != SQLITE_OK)
        return DH_EIO;
    return c->rows_len > c->rows_cap - len ? DH_ETOOBIG : 0;
}

const char *dh_sqlbox_error(const dh_sqlbox *b) { return b->call->err; }

int dh_sqlbox_bench_insert(dh_sqlbox *b, size_t n, uint64_t *ns)
{
    const char *rows;
    size_t rows_len;
    static const char create[] = "DROP TABLE IF EXISTS t; CREATE TABLE t(a INTEGER, b TEXT)";
    int rc = dh_sqlbox_exec(b, create, sizeof create - 1, &rows, &rows_len);
    if (rc)
        return rc;
    char sql[128];
    uint64_t t0 = dh_now_ns();
    for (size_t i = 0; i < n && !rc; i++) {
        int len = snprintf(sql, sizeof sql, "INSERT INTO t VALUES (%zu, 'row %zu')", i, i * 7);
        rc = dh_sqlbox_exec(b, sql, (size_t)len, &rows, &rows_len);
    }
    *ns = dh_now_ns() - t0;
    return rc;
}

void *dh_sqlbox_heap(const dh_sqlbox *b) { return b->heap; }

static uint64_t in_used(void *arg)
{
    *(size_t *)arg = dh_heap_used(the_state->heap);
    return 0;
}

size_t dh_sqlbox_heap_used(const dh_sqlbox *b)
{
    size_t *used = (size_t *)b->call->rows; /* the shared buffer: reachable inside */
    dh_gate_call(b->box.lib, in_used, used);
    return *used;
}
