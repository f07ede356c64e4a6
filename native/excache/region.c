/* ExCache regions: making and freeing them, on the memory node and here.
 * See dh_excache.h. Both may run on any thread, with faults being served on
 * others: a slot is taken and given back under the cache's lock, and a
 * region stops being visible to faults (under the lock) before it is
 * unmapped. */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "excache_int.h"

/* Gives back the slot an alloc took (busy), and the vRegion it made on the
 * memory node (id; 0: none). */
static void unreserve(dh_excache *c, struct region *r, uint32_t id)
{
    ex_lock(c);
    if (id) {
        c->req->free.region = id;
        ex_rpc(c, DH_OP_P2M_FREE, sizeof c->req->free, 0); /* best effort: the alloc failed */
    }
    r->busy = 0;
    ex_unlock(c);
}

int dh_excache_alloc(dh_excache *c, uint64_t size, void **addr, uint32_t *region_id)
{
    if (!size || size % DH_PAGE)
        return DH_EINVAL;
    /* The slot is taken under the lock (the binding calls this from any
     * thread, without the GIL) and stays busy until the region is in use. */
    ex_lock(c);
    struct region *r = NULL;
    for (int i = 0; i < DH_EXCACHE_MAX_REGIONS && !r; i++)
        if (!c->regions[i].used && !c->regions[i].busy)
            r = &c->regions[i];
    int rc = r ? 0 : DH_ENOMEM;
    uint32_t id = r ? (uint32_t)(r - c->regions) + 1 : 0;
    if (r)
        r->busy = 1;
    if (r && c->link) { /* a vRegion on the memory node */
        c->req->alloc.size = size;
        uint32_t got = 0, flags = 0;
        rc = ex_call(c, DH_OP_P2M_ALLOC, sizeof c->req->alloc, &got, &flags);
        if (!rc && ((flags & DH_F_ERROR) || got != sizeof(struct p2m_region)))
            rc = (flags & DH_F_ERROR) ? DH_ENOMEM : DH_EPROTO;
        if (!rc)
            id = ((const struct p2m_region *)(const void *)c->page)->id;
    }
    ex_unlock(c);
    if (rc) {
        if (r)
            unreserve(c, r, 0);
        return rc;
    }
    uint64_t npages = size / DH_PAGE;
    uint8_t *bits = calloc((npages + 7) / 8 * 2, 1); /* on_mnode, then was_dirty */
    void *base = mmap(NULL, size, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    void *local = c->link ? NULL
                          : mmap(NULL, size, PROT_READ | PROT_WRITE,
                                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    rc = !bits || base == MAP_FAILED || local == MAP_FAILED ? DH_ENOMEM
                                                            : ex_register(c, base, size);
    if (rc) {
        free(bits);
        if (base != MAP_FAILED)
            munmap(base, size);
        if (local && local != MAP_FAILED)
            munmap(local, size);
        unreserve(c, r, c->link ? id : 0); /* else the vRegion leaks on the memory node */
        return rc;
    }
    ex_lock(c);
    r->base = base;
    r->size = size;
    r->id = id;
    r->on_mnode = bits;
    r->local = local;
    r->used = 1;
    r->busy = 0;
    ex_unlock(c);
    *addr = base;
    *region_id = id;
    return 0;
}

int dh_excache_free(dh_excache *c, void *addr)
{
    ex_lock(c);
    struct region *r = ex_find(c, (uintptr_t)addr);
    if (!r || r->base != addr) {
        ex_unlock(c);
        return DH_EINVAL;
    }
    for (uint64_t i = 0; i < (uint64_t)c->nsets * c->ways; i++)
        if (c->lines[i].r == r && c->lines[i].page) {
            c->lines[i].page = 0;
            c->st.resident--;
        }
    /* Unused under the lock, before anything is unmapped: a fault being
     * served holds the lock till it is done, and one that found the region
     * without the lock checks it again under it (serve_fault). Busy keeps
     * the slot from another alloc until the mapping is gone. */
    r->used = 0;
    r->busy = 1;
    int rc = 0;
    if (c->link) {
        c->req->free.region = r->id;
        rc = ex_rpc(c, DH_OP_P2M_FREE, sizeof c->req->free, 0);
    }
    ex_unlock(c);
    ex_unregister(c, r->base, r->size); /* a failure changes nothing: munmap unregisters too */
    munmap(r->base, r->size);
    if (r->local)
        munmap(r->local, r->size);
    free(r->on_mnode);
    ex_lock(c);
    memset(r, 0, sizeof *r);
    ex_unlock(c);
    return rc;
}
