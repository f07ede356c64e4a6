/* The cache table of ExCache: sets of lines, their victims and prefetch
 * windows, the requests a miss or a write-back sends to the memory node, and
 * the service of one fault. See dh_excache.h for the design.
 *
 * Everything reachable from ex_serve_fault() is async-signal-safe (see
 * excache.c): no malloc, no stdio, no pthread locks. */
#include <sched.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "excache_int.h"

struct region *ex_find(dh_excache *c, uintptr_t a)
{
    for (int i = 0; i < DH_EXCACHE_MAX_REGIONS; i++) {
        struct region *r = &c->regions[i];
        if (r->used && a >= (uintptr_t)r->base && a < (uintptr_t)r->base + r->size)
            return r;
    }
    return NULL;
}

uint64_t ex_page_index(struct region *r, uintptr_t page)
{
    return (page - (uintptr_t)r->base) / DH_PAGE;
}

static int on_mnode(struct region *r, uint64_t idx)
{
    return r->on_mnode[idx / 8] >> (idx % 8) & 1;
}

uint8_t *ex_was_dirty(struct region *r) { return r->on_mnode + (r->size / DH_PAGE + 7) / 8; }

/* A page written back now is on the mnode. Whether writes are expected when
 * it comes back is learnt only from writes the cache saw (a write-protect
 * fault), or kept for a page that was predicted: a fresh page counted dirty
 * by assumption teaches nothing (numpy's inputs are written once, at their
 * creation, and only read after). */
static void mark_written_back(struct region *r, uint64_t idx, const struct line *l)
{
    r->on_mnode[idx / 8] |= (uint8_t)(1u << (idx % 8));
    uint8_t *w = &ex_was_dirty(r)[idx / 8], bit = (uint8_t)(1u << (idx % 8));
    if (l->assumed == ASSUMED_FRESH)
        *w &= (uint8_t)~bit;
    else
        *w |= bit;
}

/* Whether a page comes back writable and dirty: it was written in its last
 * stay in the cache, so it is likely written again (redis's LRU clock,
 * CPython's refcounts, a match finder's tables), and its write-protect
 * fault would only cost another round through the handler. */
static int expects_writes(dh_excache *c, struct region *r, uint64_t idx)
{
    return c->predict_writes && (ex_was_dirty(r)[idx / 8] >> (idx % 8) & 1);
}

/* The prediction for a miss: one in eight comes in clean anyway, so a page
 * that stopped being written is evicted clean, which forgets it. */
static int predicted_dirty(dh_excache *c, struct region *r, uint64_t idx)
{
    return expects_writes(c, r, idx) && ++c->predict_tick % 8 != 0;
}

/* ---- the requests to the memory node -------------------------------------- */

/* Fetches n pages from idx into c->page, carrying the write-backs of the
 * ndirty victims in c->dv (their pages write-protected by now, still
 * mapped) along. */
static int fetch(dh_excache *c, struct region *r, uint64_t idx, uint32_t n, uint32_t ndirty)
{
    if (!c->link) { /* the floor: a local store */
        for (uint32_t i = 0; i < ndirty; i++)
            memcpy(c->dv[i]->r->local + ex_page_index(c->dv[i]->r, c->dv[i]->page) * DH_PAGE,
                   (void *)c->dv[i]->page, DH_PAGE);
        memcpy(c->page, r->local + idx * DH_PAGE, (size_t)n * DH_PAGE);
        return 0;
    }
    if (ndirty) {
        struct p2m_miss_flush *q = &c->req->miss_flush;
        q->region = r->id;
        q->n = n;
        q->page = idx;
        q->nflush = ndirty;
        q->zero = 0;
        for (uint32_t i = 0; i < ndirty; i++) {
            const struct line *v = c->dv[i];
            q->ref[i] = (struct p2m_flush_ref){.region = v->r->id,
                                               .page = ex_page_index(v->r, v->page)};
            memcpy(q->data[i], (void *)v->page, DH_PAGE);
        }
        c->st.piggybacked += ndirty;
        return ex_rpc(c, DH_OP_P2M_PCACHE_MISS_FLUSH,
                      (uint32_t)(offsetof(struct p2m_miss_flush, data) + ndirty * DH_PAGE),
                      n * DH_PAGE);
    }
    c->req->miss = (struct p2m_miss){.region = r->id, .n = n, .page = idx};
    return ex_rpc(c, DH_OP_P2M_PCACHE_MISS, sizeof c->req->miss, n * DH_PAGE);
}

/* Writes the page at addr back as page idx of the memory node's region id. */
static int send_flush(dh_excache *c, uint32_t id, uint64_t idx, uintptr_t addr)
{
    struct p2m_flush *q = &c->req->flush;
    q->region = id;
    q->zero = 0;
    q->page = idx;
    memcpy(q->data, (void *)addr, DH_PAGE);
    return ex_rpc(c, DH_OP_P2M_PCACHE_FLUSH, sizeof *q, 0);
}

/* While a fork is under way, a page written back also goes to the region's
 * copy (made when the fork began): the child's memory is the parent's as
 * it is at the fork, written back or not. The page is still mapped (and
 * write-protected) here. */
static int mirror(dh_excache *c, struct region *r, uint64_t idx, uintptr_t page)
{
    if (!c->mirroring || !c->link)
        return 0;
    return send_flush(c, r->clone_id, idx, page);
}

/* Writes back a line whose page is write-protected (and still mapped). */
static int flush_one(dh_excache *c, struct line *v)
{
    uint64_t idx = ex_page_index(v->r, v->page);
    if (!c->link) {
        memcpy(v->r->local + idx * DH_PAGE, (void *)v->page, DH_PAGE);
        return 0;
    }
    return send_flush(c, v->r->id, idx, v->page);
}

/* ---- the cache table ------------------------------------------------------- */

void ex_lock(dh_excache *c)
{
    /* Spin a little, then yield: the holder may be waiting for the memory
     * node, which needs a core that a spinner would keep. */
    for (unsigned i = 0; atomic_flag_test_and_set_explicit(&c->lock, memory_order_acquire); i++) {
        if (i < 256)
            __builtin_ia32_pause();
        else
            sched_yield();
    }
}

void ex_unlock(dh_excache *c) { atomic_flag_clear_explicit(&c->lock, memory_order_release); }

static struct line *victim_of(dh_excache *c, struct line *set)
{
    struct line *v = NULL;
    for (uint32_t w = 0; w < c->ways; w++)
        if (!set[w].page)
            return &set[w];
    switch (c->policy) {
    case DH_POLICY_RANDOM:
        c->rng ^= c->rng << 13;
        c->rng ^= c->rng >> 17;
        c->rng ^= c->rng << 5;
        return &set[c->rng % c->ways];
    case DH_POLICY_LRU: /* least recently faulted: hits are invisible to userfaultfd */
        v = &set[0];
        for (uint32_t w = 1; w < c->ways; w++)
            if (set[w].touched < v->touched)
                v = &set[w];
        return v;
    default:
        v = &set[0];
        for (uint32_t w = 1; w < c->ways; w++)
            if (set[w].filled < v->filled)
                v = &set[w];
        return v;
    }
}

struct line *ex_set_of(dh_excache *c, uintptr_t page)
{
    return &c->lines[(uint64_t)(page / DH_PAGE) % c->nsets * c->ways];
}

struct line *ex_resident_line(dh_excache *c, struct line *set, uintptr_t page)
{
    for (uint32_t w = 0; w < c->ways; w++)
        if (set[w].page == page)
            return &set[w];
    return NULL;
}

/* How many lines a remote miss at page idx brings in: the following pages
 * while they are on the memory node and not resident. Their victims go to
 * c->pf[1..]; dirty ones are written back by the same request (LegoOS
 * piggybacks one; a window of them keeps a stream of misses long while it
 * evicts written pages). Consecutive pages fall in distinct sets (the
 * window is at most nsets), so no victim is chosen twice. */
static uint32_t window(dh_excache *c, struct region *r, uint64_t idx)
{
    uint32_t n = 1;
    uint64_t pages = r->size / DH_PAGE;
    int dirty = expects_writes(c, r, idx); /* one UFFDIO_COPY: one mode for the window */
    for (; n < c->prefetch && idx + n < pages && on_mnode(r, idx + n) &&
           expects_writes(c, r, idx + n) == dirty;
         n++) {
        uintptr_t q = (uintptr_t)r->base + (idx + n) * DH_PAGE;
        struct line *set = ex_set_of(c, q);
        if (ex_resident_line(c, set, q))
            break;
        c->pf[n] = victim_of(c, set);
    }
    return n;
}

/* Unmaps the runs in c->zap. One process_madvise for all of them flushes
 * the TLB once: with a second thread of the program on another core, each
 * madvise's flush interrupts it (16 single pages: ~170 us by madvise, ~19
 * us by one process_madvise on this kind of machine). Kernels that refuse
 * MADV_DONTNEED there (before 6.13, as a 6.1 guest's) get one madvise a run. */
static void zap(dh_excache *c)
{
    uint32_t done = 0;
    if (c->pidfd != -2 && c->nzap > 1) {
        pid_t me = getpid();
        if (c->pidfd >= 0 && c->pidfd_of != me) /* a forked child holds its parent's */
            close(c->pidfd), c->pidfd = -1;
        if (c->pidfd == -1) {
            c->pidfd = dh_fd_high((int)syscall(SYS_pidfd_open, me, 0));
            c->pidfd_of = me;
        }
        long got = c->pidfd >= 0 ? syscall(SYS_process_madvise, c->pidfd, c->zap,
                                           (size_t)c->nzap, MADV_DONTNEED, 0u)
                                 : -1;
        if (got < 0) { /* refused: madvise from now on */
            if (c->pidfd >= 0)
                close(c->pidfd);
            c->pidfd = -2;
            got = 0;
        }
        for (; got > 0 && done < c->nzap; done++) /* whole runs it did */
            got -= (long)c->zap[done].iov_len;
        if (got < 0)
            done--;
    }
    for (uint32_t i = done; i < c->nzap; i++)
        madvise(c->zap[i].iov_base, c->zap[i].iov_len, MADV_DONTNEED);
    c->nzap = 0;
}

/* Drops a clean or written-back victim's mapping; runs of adjacent pages go
 * in one entry of c->zap. */
static void drop(dh_excache *c, struct line *v)
{
    if (!v->dirty) { /* not written in this stay: no longer expect writes */
        uint64_t i = ex_page_index(v->r, v->page);
        ex_was_dirty(v->r)[i / 8] &= (uint8_t)~(1u << (i % 8));
    }
    c->st.resident--;
    v->r->resident--;
    v->r->dirty -= v->dirty;
    struct iovec *last = c->nzap ? &c->zap[c->nzap - 1] : NULL;
    if (last && (uintptr_t)last->iov_base + last->iov_len == v->page) {
        last->iov_len += DH_PAGE;
        return;
    }
    c->zap[c->nzap].iov_base = (void *)v->page;
    c->zap[c->nzap++].iov_len = DH_PAGE;
}

static void record(dh_excache *c, uint64_t t0)
{
    uint64_t d = dh_now_ns() - t0;
    int b = d ? 63 - __builtin_clzll(d) : 0;
    c->st.hist[b < DH_HIST_BUCKETS ? b : DH_HIST_BUCKETS - 1]++;
}

static int in_region(const struct region *r, uintptr_t a)
{
    return r->used && a >= (uintptr_t)r->base && a - (uintptr_t)r->base < r->size;
}

/* wp: 1 a write-protect fault, 0 a missing page, -1 unknown (SIGBUS says
 * neither): a resident page means a write to a clean line. */
int ex_serve_fault(dh_excache *c, struct region *r, uintptr_t addr, int wp)
{
    uintptr_t page = addr & ~(uintptr_t)(DH_PAGE - 1);
    ex_lock(c);
    c->why = NULL; /* set again only by a local call of this fault that fails */
    /* r was found without the lock: dh_excache_free may have taken it since
     * (it marks it unused under the lock before it unmaps it). Then there is
     * nothing to serve; a handler thread's faulting thread is woken when
     * free unregisters the range. */
    if (!in_region(r, addr) && !(r = ex_find(c, addr))) {
        ex_unlock(c);
        return c->mode == DH_FAULT_SIGBUS ? EX_GONE : 0;
    }
    uint64_t t0 = dh_now_ns();
    struct line *set = ex_set_of(c, page);
    struct line *hit = ex_resident_line(c, set, page);
    int rc = 0;
    if (hit) {
        /* Present: the first write to a clean line (or a fault another
         * thread already served). Marking dirty is always safe. */
        hit->touched = ++c->clock;
        if (wp == 1 || (wp == -1 && !hit->dirty)) {
            hit->r->dirty += !hit->dirty;
            hit->dirty = 1;
            hit->assumed = SEEN;
            c->st.wp_faults++;
            rc = ex_protect(c, page, 0);
        } else if (wp == -1) {
            /* A fault on a dirty line: still write-protected (a write-back
             * that failed left it so) or made writable by another thread
             * meanwhile. A dirty line is writable: without this the write
             * would fault again forever. */
            rc = ex_protect(c, page, 0);
        } else if (c->mode == DH_FAULT_THREAD) { /* a stale message: just wake */
            rc = ex_wake(c, page);
        }
        ex_unlock(c);
        return rc;
    }
    c->st.misses++;
    struct line *v = victim_of(c, set);
    c->pf[0] = v;
    uint64_t idx = ex_page_index(r, page);
    int fresh = !on_mnode(r, idx); /* zero-filled: written soon, so maybe dirty at once */
    uint32_t n = fresh ? 1 : window(c, r, idx), ndirty = 0;
    for (uint32_t i = 0; i < n; i++) {
        struct line *l = c->pf[i];
        if (!l->page)
            continue;
        c->st.evictions++;
        if (l->dirty) {
            /* Stop writers first, so no store lands after the copy. */
            if ((rc = ex_protect(c, l->page, 1)))
                goto out;
            c->dv[ndirty++] = l;
            c->st.dirty_flushes++;
        } else {
            c->st.clean_drops++;
        }
    }
    if (!fresh) {
        rc = fetch(c, r, idx, n, ndirty);
        c->st.remote_fetches++;
    } else {
        if (ndirty)
            rc = flush_one(c, c->dv[0]);
        memset(c->page, 0, DH_PAGE);
        c->st.zero_fills++;
    }
    if (rc)
        goto out;
    for (uint32_t i = 0; i < ndirty; i++) {
        struct line *d = c->dv[i];
        uint64_t vi = ex_page_index(d->r, d->page);
        mark_written_back(d->r, vi, d);
        if ((rc = mirror(c, d->r, vi, d->page)))
            goto out;
    }
    for (uint32_t i = 0; i < n; i++)
        if (c->pf[i]->page)
            drop(c, c->pf[i]);
    zap(c);
    int dirty = fresh ? c->predict_writes : predicted_dirty(c, r, idx);
    if ((rc = ex_install(c, page, n, dirty)))
        goto out;
    r->dirty += (uint64_t)dirty * n;
    for (uint32_t i = 0; i < n; i++) {
        struct line *l = c->pf[i];
        l->page = page + (uintptr_t)i * DH_PAGE;
        l->r = r;
        l->dirty = (uint8_t)dirty;
        l->assumed = !dirty ? SEEN : fresh ? ASSUMED_FRESH : ASSUMED_PREDICTED;
        l->filled = l->touched = ++c->clock;
    }
    c->st.prefetched += n - 1;
    c->st.resident += n;
    r->resident += n;
    record(c, t0);
out:
    ex_unlock(c);
    return rc;
}

int ex_write_back(dh_excache *c, struct line *l)
{
    int rc;
    if ((rc = ex_protect(c, l->page, 1)))
        return rc;
    if ((rc = flush_one(c, l)))
        return rc;
    uint64_t vi = ex_page_index(l->r, l->page);
    mark_written_back(l->r, vi, l);
    if ((rc = mirror(c, l->r, vi, l->page)))
        return rc;
    l->dirty = 0;
    l->assumed = SEEN;
    l->r->dirty--;
    c->st.dirty_flushes++;
    return 0;
}

int dh_excache_flush(dh_excache *c)
{
    int rc = 0;
    ex_lock(c);
    for (uint64_t i = 0; i < (uint64_t)c->nsets * c->ways && !rc; i++)
        if (c->lines[i].page && c->lines[i].dirty)
            rc = ex_write_back(c, &c->lines[i]);
    ex_unlock(c);
    return rc;
}
