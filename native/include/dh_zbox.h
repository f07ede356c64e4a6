/* zlib in a compartment: Debian's libz, unmodified, keeps its deflate state
 * and every allocation in one compartment's heap (zalloc/zfree over a
 * dh_heap in that heap), and each compression is a gate into that
 * compartment. The data in and the stream out cross in a buffer outside
 * every compartment. Any number of boxes per process: zlib has no global
 * allocator. */
#ifndef DH_ZBOX_H
#define DH_ZBOX_H

#include <stddef.h>
#include <stdint.h>

#include "dh_pkey.h"

typedef struct dh_zbox dh_zbox;

/* A deflate stream at `level` (0-9, or -1 for zlib's default) inside lib,
 * with shared_bytes of shared buffer. private_stack: as dh_sqlbox_open. */
int dh_zbox_open(dh_comp *lib, int private_stack, int level, size_t shared_bytes,
                 dh_zbox **out);
void dh_zbox_close(dh_zbox *b);

/* Compresses len bytes at in into one zlib stream (as zlib's compress2 at the
 * box's level would), through one gate: *out (in the shared buffer, valid
 * until the next call) and *out_len. DH_ETOOBIG if in or its stream does not
 * fit the shared buffer. */
int dh_zbox_compress(dh_zbox *b, const void *in, size_t len, const uint8_t **out,
                     size_t *out_len);

/* zlib's heap (for probing it from outside) and how much of it is used. */
void *dh_zbox_heap(const dh_zbox *b);
size_t dh_zbox_heap_used(const dh_zbox *b);

#endif
