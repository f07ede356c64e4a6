/* An allocator whose memory and state all live in one compartment's heap, so
 * a C library boxed in a compartment (native/sqlbox, native/zbox) gets every
 * byte it allocates from there: only code running inside that compartment
 * can read or change the allocator's state or what it hands out. Size
 * classes of 16 B << 0..16 on free lists, larger blocks in page multiples,
 * first fit; a bump pointer for the rest. Thread-safe. */
#ifndef DH_HEAP_H
#define DH_HEAP_H

#include <stddef.h>

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

#endif
