/* ExCache operations on ranges of a region, for a program whose memory it
 * serves: what munmap, MADV_DONTNEED and mprotect mean for cached lines, and
 * fork(). See dh_excache.h. */
#include <errno.h>
#include <linux/userfaultfd.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "excache_int.h"

static void forget_line(dh_excache *c, struct line *l)
{
    c->st.resident--;
    l->r->resident--;
    l->r->dirty -= l->dirty;
    l->page = 0;
    l->dirty = 0;
}

/* Calls fn on every resident line whose page is in [lo, hi): page by page
 * for a short range, over the whole line array for a long one. */
static int each_line(dh_excache *c, uintptr_t lo, uintptr_t hi,
                     int (*fn)(dh_excache *, struct line *))
{
    uint64_t pages = (hi - lo) / DH_PAGE, lines = (uint64_t)c->nsets * c->ways;
    int rc = 0;
    if (pages * c->ways < lines) {
        for (uintptr_t p = lo; p < hi && !rc; p += DH_PAGE) {
            struct line *l = ex_resident_line(c, ex_set_of(c, p), p);
            if (l)
                rc = fn(c, l);
        }
        return rc;
    }
    for (uint64_t i = 0; i < lines && !rc; i++)
        if (c->lines[i].page >= lo && c->lines[i].page < hi)
            rc = fn(c, &c->lines[i]);
    return rc;
}

static int drop_line(dh_excache *c, struct line *l)
{
    forget_line(c, l);
    return 0;
}

static int write_back_and_drop(dh_excache *c, struct line *l)
{
    int rc = l->dirty ? ex_write_back(c, l) : 0;
    if (!rc)
        forget_line(c, l);
    return rc;
}

/* The region holding all of [addr, addr+len), page-aligned, or NULL. */
static struct region *range_region(dh_excache *c, void *addr, uint64_t len, uintptr_t *lo,
                                   uintptr_t *hi)
{
    *lo = (uintptr_t)addr & ~(uintptr_t)(DH_PAGE - 1);
    *hi = ((uintptr_t)addr + len + DH_PAGE - 1) & ~(uintptr_t)(DH_PAGE - 1);
    struct region *r = ex_find(c, *lo);
    if (!r || *hi > (uintptr_t)r->base + r->size || *hi <= *lo)
        return NULL;
    return r;
}

int dh_excache_discard(dh_excache *c, void *addr, uint64_t len, int zap)
{
    uintptr_t lo, hi;
    ex_lock(c);
    struct region *r = range_region(c, addr, len, &lo, &hi);
    if (!r) {
        ex_unlock(c);
        return DH_EINVAL;
    }
    each_line(c, lo, hi, drop_line);
    for (uint64_t i = ex_page_index(r, lo); i < ex_page_index(r, hi); i++) {
        r->on_mnode[i / 8] &= (uint8_t)~(1u << (i % 8));
        ex_was_dirty(r)[i / 8] &= (uint8_t)~(1u << (i % 8));
    }
    /* Under the lock: a fault on this range must not install a page
     * between the bookkeeping and the unmapping. */
    int rc = zap && madvise((void *)lo, hi - lo, MADV_DONTNEED) ? DH_EIO : 0;
    ex_unlock(c);
    return rc;
}

int dh_excache_evict_range(dh_excache *c, void *addr, uint64_t len)
{
    uintptr_t lo, hi;
    ex_lock(c);
    struct region *r = range_region(c, addr, len, &lo, &hi);
    int rc = r ? each_line(c, lo, hi, write_back_and_drop) : DH_EINVAL;
    if (!rc && madvise((void *)lo, hi - lo, MADV_DONTNEED))
        rc = DH_EIO;
    ex_unlock(c);
    return rc;
}

int dh_excache_fork_prepare(dh_excache *c)
{
    /* The child's memory is the parent's at the fork: its resident pages
     * come with it, and the rest it fetches from a copy of each region,
     * which from now until the fork is done gets every write-back too. The
     * lock is not held across the fork: glibc's own fork path writes to
     * heap pages, whose faults the handler must be able to serve. */
    ex_lock(c);
    int rc = 0;
    for (int i = 0; i < DH_EXCACHE_MAX_REGIONS && !rc && c->link; i++) {
        struct region *r = &c->regions[i];
        if (!r->used)
            continue;
        c->req->clone.region = r->id;
        if (!(rc = ex_rpc(c, DH_OP_P2M_CLONE, sizeof c->req->clone, sizeof(struct p2m_region))))
            r->clone_id = ((const struct p2m_region *)(const void *)c->page)->id;
    }
    c->mirroring = !rc;
    ex_unlock(c);
    return rc;
}

void dh_excache_fork_parent(dh_excache *c)
{
    ex_lock(c);
    c->mirroring = 0;
    ex_unlock(c);
}

int dh_excache_fork_child(dh_excache *c, dh_link *link)
{
    /* The parent's userfaultfd and handler thread are the parent's; fork
     * without UFFD_FEATURE_EVENT_FORK left these mappings unregistered. */
    ex_lock(c);
    close(c->uffd);
    c->thread_running = 0;
    c->link = link;
    c->backup = NULL;
    c->mirroring = 0;
    int rc = ex_open_uffd(c);
    for (int i = 0; i < DH_EXCACHE_MAX_REGIONS && !rc; i++) {
        struct region *r = &c->regions[i];
        if (!r->used)
            continue;
        r->id = r->clone_id;
        rc = ex_register(c, r->base, r->size);
    }
    /* Every inherited line holds the page as it was at the fork, which the
     * copy may not have (a write just before the fork): dirty, so it is
     * written back to the copy when evicted. (The kernel dropped the
     * write protection in the child anyway.) */
    for (uint64_t i = 0; i < (uint64_t)c->nsets * c->ways; i++) {
        struct line *l = &c->lines[i];
        if (l->page && !l->dirty) {
            l->dirty = 1;
            l->assumed = SEEN;
            l->r->dirty++;
        }
    }
    if (!rc && c->mode == DH_FAULT_THREAD)
        rc = ex_start_handler(c);
    ex_unlock(c);
    return rc;
}

uint32_t dh_excache_region_id(dh_excache *c, void *addr)
{
    ex_lock(c);
    struct region *r = ex_find(c, (uintptr_t)addr);
    uint32_t id = r ? r->id : 0;
    ex_unlock(c);
    return id;
}

uint64_t dh_excache_untracked(dh_excache *c, void *addr, uint64_t len)
{
    enum { CHUNK = 1u << 28 };
    static unsigned char vec[CHUNK / DH_PAGE]; /* under the lock */
    uint64_t n = 0;
    ex_lock(c);
    for (uint64_t off = 0; off < len; off += CHUNK) {
        uint64_t part = len - off < CHUNK ? len - off : CHUNK;
        uintptr_t base = (uintptr_t)addr + off;
        if (mincore((void *)base, part, vec))
            continue;
        for (uint64_t p = 0; p < part / DH_PAGE; p++) {
            uintptr_t page = base + p * DH_PAGE;
            if ((vec[p] & 1) && !ex_resident_line(c, ex_set_of(c, page), page))
                n++;
        }
    }
    ex_unlock(c);
    return n;
}
