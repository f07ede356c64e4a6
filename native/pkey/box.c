/* What a boxed library is built from: its heap's allocator and its shared
 * buffer and gate. See dh_box.h. */
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#include "dh_box.h"
#include "dh_error.h"

#define ALIGN 16
#define NCLASS 17 /* 16 B << 0 .. 16: up to 1 MiB from free lists by size class */
#define SMALL_MAX ((size_t)ALIGN << (NCLASS - 1))

struct block {
    size_t size; /* usable bytes after this header */
    struct block *next; /* on a free list */
};

struct dh_heap {
    pthread_mutex_t mu;
    uint8_t *bump, *end;
    size_t used;
    struct block *free_small[NCLASS];
    struct block *free_big; /* larger than SMALL_MAX, page multiples, first fit */
};

static int class_of(size_t n)
{
    int c = 0;
    while (((size_t)ALIGN << c) < n)
        c++;
    return c;
}

size_t dh_heap_roundup(size_t n)
{
    if (n <= SMALL_MAX)
        return (size_t)ALIGN << class_of(n ? n : 1);
    return (n + 4095) & ~(size_t)4095;
}

dh_heap *dh_heap_init(void *mem, size_t bytes)
{
    size_t head = (sizeof(dh_heap) + ALIGN - 1) & ~(size_t)(ALIGN - 1);
    if (bytes < head + sizeof(struct block) + ALIGN)
        return NULL;
    dh_heap *h = mem;
    memset(h, 0, sizeof *h);
    pthread_mutex_init(&h->mu, NULL);
    h->bump = (uint8_t *)h + head;
    h->end = (uint8_t *)h + bytes;
    return h;
}

void *dh_heap_alloc(dh_heap *h, size_t n)
{
    if (!n)
        return NULL;
    size_t size = dh_heap_roundup(n);
    struct block *b = NULL, **link;
    pthread_mutex_lock(&h->mu);
    if (size <= SMALL_MAX) {
        link = &h->free_small[class_of(size)];
        if ((b = *link))
            *link = b->next;
    } else {
        for (link = &h->free_big; *link; link = &(*link)->next)
            if ((*link)->size >= size) {
                b = *link;
                *link = b->next;
                break;
            }
    }
    if (!b && (size_t)(h->end - h->bump) >= size + sizeof *b) {
        b = (struct block *)h->bump;
        b->size = size;
        h->bump += size + sizeof *b;
    }
    if (b)
        h->used += b->size;
    pthread_mutex_unlock(&h->mu);
    return b ? b + 1 : NULL;
}

void dh_heap_free(dh_heap *h, void *p)
{
    if (!p)
        return;
    struct block *b = (struct block *)p - 1, **link;
    pthread_mutex_lock(&h->mu);
    h->used -= b->size;
    link = b->size <= SMALL_MAX ? &h->free_small[class_of(b->size)] : &h->free_big;
    b->next = *link;
    *link = b;
    pthread_mutex_unlock(&h->mu);
}

size_t dh_heap_size(const void *p) { return p ? ((const struct block *)p - 1)->size : 0; }

size_t dh_heap_used(const dh_heap *h) { return h->used; }

int dh_box_open(dh_box *b, dh_comp *lib, int private_stack, size_t shared_bytes)
{
    *b = (dh_box){.lib = lib, .private_stack = private_stack, .shared_bytes = shared_bytes};
    b->shared = mmap(NULL, shared_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                     -1, 0);
    return b->shared == MAP_FAILED ? DH_ENOMEM : 0;
}

uint64_t dh_box_call(const dh_box *b, dh_gate_fn fn, void *arg)
{
    return b->private_stack ? dh_gate_call_stack(b->lib, fn, arg) : dh_gate_call(b->lib, fn, arg);
}

void dh_box_close(dh_box *b, dh_gate_fn close_fn)
{
    if (close_fn)
        dh_box_call(b, close_fn, b->shared);
    munmap(b->shared, b->shared_bytes);
}
