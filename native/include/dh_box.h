/* What every C library boxed in a compartment (native/sqlbox, native/zbox)
 * is built from.
 *
 * An allocator whose memory and state all live in one compartment's heap, so
 * the library gets every byte it allocates from there: only code running
 * inside that compartment can read or change the allocator's state or what
 * it hands out. Size classes of 16 B << 0..16 on free lists, larger blocks in
 * page multiples, first fit; a bump pointer for the rest. Thread-safe. */
#ifndef DH_BOX_H
#define DH_BOX_H

#include <stddef.h>

#include "dh_pkey.h"

typedef struct dh_heap dh_heap;

/* Lays an allocator out at the start of mem (bytes long) and returns it, or
 * NULL if mem is too small. Call it inside the compartment, or from the
 * shared view, before the library starts. */
dh_heap *dh_heap_init(void *mem, size_t bytes);
void *dh_heap_alloc(dh_heap *h, size_t n);
void dh_heap_free(dh_heap *h, void *p);
/* Usable bytes of p (0 for NULL), what n rounds up to, and the bytes held. */
size_t dh_heap_size(const void *p);
size_t dh_heap_roundup(size_t n);
size_t dh_heap_used(const dh_heap *h);

/* A box: the compartment the library lives in, how its calls enter it, and
 * the shared buffer (outside every compartment) what crosses goes through. */
typedef struct dh_box {
    dh_comp *lib;
    int private_stack;
    void *shared;
    size_t shared_bytes;
} dh_box;

/* Maps the shared buffer: 0 or DH_ENOMEM. */
int dh_box_open(dh_box *b, dh_comp *lib, int private_stack, size_t shared_bytes);
/* Runs fn(arg) inside the box's compartment, through its gate. */
uint64_t dh_box_call(const dh_box *b, dh_gate_fn fn, void *arg);
/* Calls close_fn(shared) inside the compartment, then unmaps the buffer. */
void dh_box_close(dh_box *b, dh_gate_fn close_fn);

#endif
