/* SQLite in a compartment (FlexOS's SQLite experiment): Debian's libsqlite3,
 * unmodified, gets all of its memory from one compartment's heap
 * (SQLITE_CONFIG_MALLOC over an allocator whose state lives in that heap
 * too), and every call into its API is a gate into that compartment. What
 * crosses (SQL text, result rows, error messages) goes through a buffer
 * outside every compartment. One box per process: SQLite's allocator is
 * process-wide and must be set before anything in the process initialises
 * SQLite (so not beside Python's sqlite3 module). */
#ifndef DH_SQLBOX_H
#define DH_SQLBOX_H

#include <stddef.h>
#include <stdint.h>

#include "dh_pkey.h"

typedef struct dh_sqlbox dh_sqlbox;

/* Opens an in-memory database inside `lib` (its heap holds SQLite's memory),
 * with a shared buffer of shared_bytes for what crosses. private_stack: the
 * calls run on the compartment's own stack (an MPK compartment with one).
 * On an SQLite error, err (errlen bytes) says why. */
int dh_sqlbox_open(dh_comp *lib, int private_stack, size_t shared_bytes, dh_sqlbox **out,
                   char *err, size_t errlen);
void dh_sqlbox_close(dh_sqlbox *b);

/* Runs the statements of sql (len bytes) through one gate. Rows come back in
 * *rows (rows_len bytes, in the shared buffer, valid until the next call):
 * columns separated by 0x1f, each row ended by 0x1e, NULL as 0x00 alone.
 * On an SQLite error it returns DH_EIO and dh_sqlbox_error() says why. */
int dh_sqlbox_exec(dh_sqlbox *b, const char *sql, size_t len, const char **rows,
                   size_t *rows_len);
const char *dh_sqlbox_error(const dh_sqlbox *b);

/* FlexOS's workload: n INSERTs into a fresh table t(a INTEGER, b TEXT), each
 * its own statement formatted by the caller and run through its own gate;
 * *ns is the time of the n. */
int dh_sqlbox_bench_insert(dh_sqlbox *b, size_t n, uint64_t *ns);

/* SQLite's heap (for probing it from outside) and how much of it is used. */
void *dh_sqlbox_heap(const dh_sqlbox *b);
size_t dh_sqlbox_heap_used(const dh_sqlbox *b);

#endif
